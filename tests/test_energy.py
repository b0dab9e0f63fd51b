"""pib_bayes.energy: U_B(w) = mean_B l / beta - log p(w), the built-in losses and their tasks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from pib_bayes import Energy, GaussianPrior
from pib_bayes.energy import (
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    GaussianLoss,
    HeteroscedasticGaussianLoss,
    beta_from_temperature,
    check_beta,
    loss_likelihood,
    loss_task,
    require_task,
    resolve_loss,
)
from pib_bayes.prior import DistributionPrior


def _setup(prior=0.7, beta=0.25):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    return model, Energy(model, "gaussian", prior=prior, beta=beta), x, y


def test_of_module_is_loss_over_beta_minus_log_prior():
    model, energy, x, y = _setup()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # away from the prior mean (the initial weights)
    u = energy.of_module(x, y)
    params = dict(model.named_parameters())
    expected = energy.mean_loss(model(x), y) / 0.25 - energy.prior.log_prob(params)
    assert torch.allclose(u, expected, rtol=1e-6)
    by_hand = ((model(x) - y) ** 2 / 2).sum(1).mean() / 0.25 + sum(
        ((p - p0) ** 2).sum() / (2 * 0.7**2) + p.numel() * (math.log(0.7) + 0.5 * math.log(2 * math.pi))
        for p, p0 in zip(model.parameters(), energy.prior.mean.values()))
    assert torch.allclose(u, by_hand, rtol=1e-5)


def test_of_module_gradient_is_the_closed_form_prior_plus_the_likelihood():
    model, energy, x, y = _setup()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)
    params = list(model.parameters())
    grads = torch.autograd.grad(energy.of_module(x, y), params)
    loss_grads = torch.autograd.grad(energy.mean_loss(model(x), y) / 0.25, params)
    for g, lg, p, p0 in zip(grads, loss_grads, params, energy.prior.mean.values()):
        torch.testing.assert_close(g, lg + (p - p0) / 0.7**2)


def test_of_module_is_twice_differentiable():
    # Hessian-vector product through the prior node equals the one through the plain expression
    model, energy, x, y = _setup()
    params = list(model.parameters())
    vs = [torch.randn_like(p) for p in params]
    g = torch.autograd.grad(energy.of_module(x, y), params, create_graph=True)
    hv = torch.autograd.grad(sum((a * v).sum() for a, v in zip(g, vs)), params)
    plain = energy.mean_loss(model(x), y) / 0.25 + sum(
        ((p - p0) ** 2).sum() / (2 * 0.7**2) for p, p0 in zip(params, energy.prior.mean.values()))
    g2 = torch.autograd.grad(plain, params, create_graph=True)
    hv2 = torch.autograd.grad(sum((a * v).sum() for a, v in zip(g2, vs)), params)
    for a, b in zip(hv, hv2):
        torch.testing.assert_close(a, b)


def test_of_module_follows_a_changed_prior_and_a_frozen_parameter():
    model, energy, x, y = _setup()
    u1 = energy.of_module(x, y)
    energy.prior = GaussianPrior(std=3.0)  # zero mean: the cached closed form must not be reused
    u2 = energy.of_module(x, y)
    params = dict(model.named_parameters())
    torch.testing.assert_close(u2, energy.mean_loss(model(x), y) / 0.25 - energy.prior.log_prob(params))
    assert not torch.allclose(u1, u2)
    model[2].bias.requires_grad_(False)  # frozen: out of the prior's sum
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(energy.of_module(x, y),
                               energy.mean_loss(model(x), y) / 0.25 - energy.prior.log_prob(trainable))


def test_of_module_with_a_non_gaussian_prior_uses_its_log_prob():
    model, _, x, y = _setup()
    energy = Energy(model, "gaussian", prior=torch.distributions.Laplace(0.0, 1.0), beta=0.5)
    assert isinstance(energy.prior, DistributionPrior)
    params = dict(model.named_parameters())
    expected = energy.mean_loss(model(x), y) / 0.5 - sum(
        torch.distributions.Laplace(0.0, 1.0).log_prob(p).sum() for p in params.values())
    torch.testing.assert_close(energy.of_module(x, y), expected)


def test_functional_matches_of_module_and_rejects_unknown_names():
    model, energy, x, y = _setup()
    params = {n: p.detach() + 0.05 for n, p in model.named_parameters()}
    u, loss = energy.functional(params, x, y)
    torch.testing.assert_close(loss, energy.mean_loss(functional_call(model, params, (x,)), y))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    torch.testing.assert_close(u, energy.of_module(x, y))
    with pytest.raises(KeyError, match="params: .*not parameters"):
        energy.functional({"0.wieght": params["0.weight"]}, x, y)


def test_builtin_losses_values():
    out, y = torch.tensor([[0.5, -1.0]]), torch.tensor([[1.5, 1.0]])
    torch.testing.assert_close(GaussianLoss(2.0)(out, y), torch.tensor([(1 + 4) / 8]))
    torch.testing.assert_close(GaussianLoss(2.0).nll(out, y),
                               torch.tensor([5 / 8 + 2 * (math.log(2.0) + 0.5 * math.log(2 * math.pi))]))
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    ce = -torch.log_softmax(logits, -1)[0, 0]
    torch.testing.assert_close(CrossEntropyLoss()(logits, torch.tensor([0])), ce.reshape(1))
    smooth = CrossEntropyLoss(0.3)(logits, torch.tensor([0]))
    q = torch.tensor([0.7 + 0.1, 0.1, 0.1])
    torch.testing.assert_close(smooth, -(q * torch.log_softmax(logits, -1)[0]).sum().reshape(1))
    torch.testing.assert_close(BCEWithLogitsLoss()(torch.tensor([[0.0], [2.0]]), torch.tensor([1, 0])),
                               torch.tensor([math.log(2), math.log(1 + math.exp(2))]))
    het = HeteroscedasticGaussianLoss()(torch.tensor([[1.0, math.log(2.0)]]), torch.tensor([3.0]))
    torch.testing.assert_close(het, torch.tensor([4 / 8 + math.log(2.0)]))


def test_losses_refuse_mismatched_targets():
    with pytest.raises(ValueError, match="^y: "):
        GaussianLoss()(torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="^y: "):
        BCEWithLogitsLoss()(torch.zeros(4, 1), torch.zeros(5))
    with pytest.raises(ValueError, match="^model: .*even last dimension"):
        HeteroscedasticGaussianLoss()(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="^label_smoothing: "):
        CrossEntropyLoss(1.0)


def test_resolve_loss_tasks_and_likelihoods():
    fn, task = resolve_loss("mse")
    assert isinstance(fn, GaussianLoss) and fn.noise_std == 1.0 and task == "regression"
    fn, task = resolve_loss("bce")
    assert isinstance(fn, BCEWithLogitsLoss) and task == "classification"
    assert loss_task(nn.MSELoss()) == "regression" and loss_task(nn.CrossEntropyLoss()) == "classification"
    assert loss_task(lambda o, t: o) is None
    assert loss_likelihood(nn.BCEWithLogitsLoss()) == "bernoulli"
    assert loss_likelihood(HeteroscedasticGaussianLoss()) == "heteroscedastic_gaussian"
    assert resolve_loss(lambda o, t: o, task="regression")[1] == "regression"
    with pytest.raises(ValueError, match="^loss_fn: unknown loss"):
        resolve_loss("hinge")
    with pytest.raises(TypeError, match="^loss_fn: "):
        resolve_loss(3)
    with pytest.raises(ValueError, match="^task: .*contradicts"):
        resolve_loss("cross_entropy", task="regression")
    with pytest.raises(ValueError, match="^task: cannot tell"):
        require_task(None, lambda o, t: o)


def test_beta_checks_and_temperature():
    assert beta_from_temperature(2.0, 100) == pytest.approx(0.02)
    assert check_beta(0.5) == 0.5
    for bad in (0, -1.0, math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError, match="^beta: "):
            check_beta(bad)
    with pytest.raises(ValueError, match="^temperature: "):
        beta_from_temperature(0.0, 10)
    with pytest.raises(TypeError, match="^model: "):
        Energy("not a module", "gaussian")


@pytest.mark.parametrize("prior", [0.7, {"std": {"0.weight": 0.5}}, "laplace"])
def test_value_and_grad_is_u_and_its_autograd_gradient(prior):
    # closed-form Gaussian prior (scalar sigma), per-tensor sigmas, and a distribution prior (autograd)
    model, energy, x, y = _setup()
    if prior == "laplace":
        energy.prior = DistributionPrior(torch.distributions.Laplace(0.0, 1.0))
    elif isinstance(prior, dict):
        energy.prior = GaussianPrior(std={**prior["std"]}, default_std=2.0)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    u, loss, grads = energy.value_and_grad(params, (x, y))
    u_ref, loss_ref = energy.functional(params, x, y)
    ref = torch.autograd.grad(u_ref, list(params.values()))
    torch.testing.assert_close(u, u_ref.detach())
    torch.testing.assert_close(loss, loss_ref.detach())
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r)


def test_value_and_grad_with_chain_dims_is_each_chains_own():
    model, energy, x, y = _setup()
    stacked = {n: torch.stack([p.detach(), p.detach() + 0.1]).requires_grad_(True)
               for n, p in model.named_parameters()}
    u, _, grads = energy.value_and_grad(stacked, (x, y), batch_ndim=1)
    assert u.shape == (2,)
    for k in range(2):
        one = {n: t[k].detach().clone().requires_grad_(True) for n, t in stacked.items()}
        u_k, _, g_k = energy.value_and_grad(one, (x, y))
        torch.testing.assert_close(u[k], u_k)
        for g, r in zip(grads, g_k, strict=True):
            torch.testing.assert_close(g[k], r)


def test_bound_energy_equals_value_and_grad():
    model, energy, x, y = _setup()
    names = [n for n, _ in model.named_parameters()]
    leaves = [p for _, p in model.named_parameters()]
    u, loss, grads = energy.bind(names, leaves).value_and_grad(x, y)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    u_ref, loss_ref, ref = energy.value_and_grad(params, (x, y))
    torch.testing.assert_close(u, u_ref)
    assert torch.equal(loss, loss_ref)
    for g, r in zip(grads, ref, strict=True):
        assert torch.equal(g, r)  # the same closed-form gradient, to the bit


def test_cross_entropy_batch_mean_is_the_mean_of_the_per_example_losses():
    out, target = torch.randn(50, 4), torch.randint(0, 4, (50,))
    loss = CrossEntropyLoss(label_smoothing=0.1)
    torch.testing.assert_close(loss.batch_mean(out, target), loss(out, target).mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prior", [0.7, 1.0, GaussianPrior(std={"0.weight": 0.5}, default_std=2.0),
                                   DistributionPrior(torch.distributions.Laplace(0.0, 1.0))])
def test_bound_energy_floats_are_value_and_grads_numbers(dtype, prior):
    """The one-chain sampler's float form: U and L to the bit, the same gradient buffer."""
    model, energy, x, y = _setup(prior=prior, beta=0.3)
    model, x, y = model.to(dtype), x.to(dtype), y.to(dtype)
    twin = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    a = energy.bind(names, list(model.parameters()))
    b = Energy(twin, "gaussian", prior=prior, beta=0.3).bind(names, list(twin.parameters()))
    unrounded_differs = False
    for step in range(5):
        xb, yb = x[3 * step:3 * step + 8], y[3 * step:3 * step + 8]
        u, loss, grads = a.value_and_grad(xb, yb)
        u_f, loss_f, grads_f = b._value_and_grad_floats(xb, yb)
        assert isinstance(u_f, float) and isinstance(loss_f, float)
        assert u_f == u.item() and loss_f == loss.item()
        for g, h in zip(grads, grads_f, strict=True):
            assert torch.equal(g, h)
        if dtype == torch.float32 and b.plan is not None and b._one_sigma:  # U in double: not the numbers
            flat = b._flat / (b.plan.scale or 1.0)
            plain = (loss_f / 0.3) - (torch.dot(flat, flat).item() * b._coef + b.plan.const)
            unrounded_differs |= plain != u_f
        with torch.no_grad():  # move both the same way
            for p, q, g in zip(model.parameters(), twin.parameters(), grads, strict=True):
                p.sub_(1e-3 * g)
                q.sub_(1e-3 * g)
    assert unrounded_differs == (dtype == torch.float32 and isinstance(prior, float))  # the twin fails


def test_to_float32_rounds_like_a_float32_tensor():
    from pib_bayes.energy import _to_float32

    for v in [1 / 3, -2.5e-40, 3.4028235e38, 1e-50, 123456789.123]:
        assert _to_float32(v) == torch.tensor(v, dtype=torch.float32).item()
    assert _to_float32(3.5e38) == math.inf and _to_float32(-1e39) == -math.inf
    assert math.isnan(_to_float32(math.nan))
