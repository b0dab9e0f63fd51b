"""GaussianPrior: the log-density against torch.distributions, its one-node autograd path and the
closed-form value-and-gradient the sampler uses instead of backpropagating through it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import grad, vmap

import pib_bayes as pb
from pib_bayes import Energy, GaussianPrior

F64 = torch.float64


def _params(batch: int | None, dtype=F64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    return {"w": torch.randn(*lead, 3, 4, generator=g, dtype=dtype).requires_grad_(),
            "b": torch.randn(*lead, 4, generator=g, dtype=dtype).requires_grad_()}


PRIORS = {
    "std 0.7, one mean": lambda: GaussianPrior(std=0.7, mean={"b": torch.linspace(-1, 1, 4, dtype=F64)}),
    "std 1, zero mean": lambda: GaussianPrior(std=1.0),
    "per-name floats": lambda: GaussianPrior(std={"w": 0.5, "b": 2.0},
                                             mean={"w": torch.ones(3, 4, dtype=F64)}),
    "a tensor std": lambda: GaussianPrior(std={"w": torch.full((3, 4), 0.3, dtype=F64)}, default_std=1.5),
}


def _reference(prior: GaussianPrior, params: dict[str, torch.Tensor], batch_ndim: int) -> torch.Tensor:
    total = 0.0
    for name, w in params.items():
        mean = prior.mean.get(name, torch.zeros((), dtype=w.dtype))
        lp = torch.distributions.Normal(mean, torch.as_tensor(prior.std_of(name), dtype=w.dtype)).log_prob(w)
        total = total + lp.sum(dim=tuple(range(batch_ndim, lp.dim())))
    return total


@pytest.mark.parametrize("kind", list(PRIORS))
@pytest.mark.parametrize("batch_ndim", [0, 1])
def test_log_prob_equals_normal_log_density_and_is_twice_differentiable(kind, batch_ndim):
    prior, params = PRIORS[kind](), _params(2 if batch_ndim else None)
    torch.testing.assert_close(prior.log_prob(params, batch_ndim), _reference(prior, params, batch_ndim),
                               rtol=1e-12, atol=1e-12)

    def f(w, b):
        return prior.log_prob({"w": w, "b": b}, batch_ndim)

    assert gradcheck(f, (params["w"], params["b"]))
    assert gradgradcheck(f, (params["w"], params["b"]))


@pytest.mark.parametrize("kind", list(PRIORS))
def test_log_prob_under_vmap_and_grad(kind):
    prior, params = PRIORS[kind](), _params(3)
    per_chain = vmap(lambda w, b: prior.log_prob({"w": w, "b": b}))(params["w"], params["b"])
    torch.testing.assert_close(per_chain, prior.log_prob(params, batch_ndim=1), rtol=1e-12, atol=1e-12)
    g = vmap(grad(lambda w, b: prior.log_prob({"w": w, "b": b})))(params["w"], params["b"])
    mean = prior.mean.get("w", torch.zeros(()))
    torch.testing.assert_close(g, -(params["w"].detach() - mean) / torch.as_tensor(prior.std_of("w")) ** 2)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kind", ["std 0.7, one mean", "std 1, zero mean", "per-name floats"])
@pytest.mark.parametrize("batch_ndim", [0, 1])
def test_closed_form_value_and_gradient_are_bit_identical_to_autograd(kind, batch_ndim, dtype):
    """What the sampler adds to the likelihood's gradient is exactly what backpropagating through
    log_prob gives, so the driver and the optimizer form keep identical trajectories."""
    prior = PRIORS[kind]()
    prior.mean = {k: v.to(dtype) for k, v in prior.mean.items()}
    params = _params(3 if batch_ndim else None, dtype)
    before = {k: v.detach().clone() for k, v in params.items()}
    value, grads = prior.log_prob_and_grad(params, batch_ndim)
    lp = prior.log_prob(params, batch_ndim)
    auto = torch.autograd.grad(-lp.sum(), list(params.values()))
    assert torch.equal(value, lp.detach())
    assert all(torch.equal(a, b) for a, b in zip(grads, auto, strict=True))
    assert all(torch.equal(before[k], v.detach()) for k, v in params.items())  # parameters untouched


def test_closed_form_declines_a_tensor_std():
    assert PRIORS["a tensor std"]().log_prob_and_grad(_params(None)) is None


def test_sampler_with_a_tensor_std_prior_records_the_exact_energy():
    """The driver falls back to backpropagating through log_prob when the closed form declines."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 2), torch.randn(32, 1)
    model = nn.Linear(2, 1)
    prior = GaussianPrior(std={"weight": torch.tensor([[0.5, 2.0]])}, default_std=1.0)
    post = pb.sample(model, pb.GaussianLoss(1.0), (x, y), beta=0.5, prior=prior, step_size=1e-3, num_warmup=0,
                     num_draws=5, seed=1)
    energy = Energy(model, pb.GaussianLoss(1.0), prior, beta=0.5)
    for t in range(5):
        u, _ = energy.functional({k: v[0, t] for k, v in post.draws.items()}, x, y)
        torch.testing.assert_close(post.sample_stats["energy"][0, t], u.detach(), rtol=1e-6, atol=1e-6)
