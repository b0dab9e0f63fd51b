"""pib_bayes.iiw.regularizer: the differentiable IIW term beta * IIW_B(theta) of PIB-regularised training,
checked against brute-force per-example gradients, engine against engine, and in training."""

from __future__ import annotations

import pytest
import torch
from iiw_helpers import PaddedBag
from iiw_helpers import tiny_classifier as _problem
from torch import nn

from pib_bayes.iiw import IIWRegularizer, fisher
from pib_bayes.iiw.fisher import per_example_gradient_quadratic

F64 = torch.float64



# ----------------------------------------------------------------------------- regulariser
@pytest.mark.parametrize("engine", ["layerwise", "jvp"])
def test_regularizer_value_and_gradient_match_brute_force(engine):
    net, x, y = _problem(n=24)
    theta_0 = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    beta = 0.3
    reg = IIWRegularizer(net, "cross_entropy", theta_0, beta=beta, engine=engine)
    value = reg(x, y)
    assert reg.last_engine == engine
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    groups = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
    delta = {n: p.detach() - theta_0[n] for n, p in net.named_parameters()}
    ref_value = beta * sum(per_example_gradient_quadratic(net, loss_fn, (x, y), {n: delta[n] for n in m})
                           for m in groups.values())
    assert float(value.detach()) == pytest.approx(ref_value, rel=1e-8)
    # gradient: brute force with double backward through per-example gradients
    params = dict(net.named_parameters())
    total = 0.0
    for i in range(x.shape[0]):
        li = loss_fn(net(x[i:i + 1]), y[i:i + 1]).sum()
        gi = torch.autograd.grad(li, list(params.values()), create_graph=True)
        gi = dict(zip(params, gi, strict=True))
        for members in groups.values():
            dot = sum((gi[n] * (params[n] - theta_0[n])).sum() for n in members)
            total = total + dot**2
    total = beta * total / x.shape[0]
    ref_grads = torch.autograd.grad(total, list(params.values()))
    got = torch.autograd.grad(reg(x, y), list(params.values()))
    for a, b in zip(got, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


class _SmallCNN(nn.Module):
    def __init__(self, bn: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, affine=False) if bn else nn.Identity()
        self.act = nn.ReLU(inplace=True)  # overwrites the recorded conv output: the engine must notice
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.act(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("detach_fisher", [False, True])
@pytest.mark.parametrize("units", ["raw", "nats"])
def test_regularizer_engines_agree_in_value_and_gradient_on_a_cnn(detach_fisher, units):
    torch.manual_seed(0)
    net = _SmallCNN().double()
    x, y = torch.randn(10, 1, 6, 6, dtype=F64), torch.randint(0, 3, (10,))
    theta_0 = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = list(net.parameters())
    out = {}
    for engine in ("layerwise", "jvp"):
        reg = IIWRegularizer(net, "cross_entropy", theta_0, beta=0.2, units=units,
                             detach_fisher=detach_fisher, engine=engine)
        value = reg(x, y)
        out[engine] = (value.detach(), torch.autograd.grad(value, params))
        assert reg.last_engine == engine and value.dtype == F64
    torch.testing.assert_close(out["layerwise"][0], out["jvp"][0], rtol=1e-10, atol=0)
    for a, b in zip(out["layerwise"][1], out["jvp"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_regularizer_takes_jvp_while_batchnorm_mixes_the_batch():
    torch.manual_seed(0)
    net = _SmallCNN(bn=True).double()
    x, y = torch.randn(10, 1, 6, 6, dtype=F64), torch.randint(0, 3, (10,))
    theta_0 = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    running = [b.clone() for b in net.buffers()]
    reg = IIWRegularizer(net, "cross_entropy", theta_0, beta=1.0)
    value = reg(x, y)
    assert reg.last_engine == "jvp"  # train mode: l_i depends on the batch statistics
    assert all(torch.equal(a, b) for a, b in zip(running, net.buffers(), strict=True))  # stats untouched
    # reference: d_i = ∇l_iᵀΔθ per group, l_i from the whole batch's forward pass (batch statistics)
    params = dict(net.named_parameters())
    losses = nn.functional.cross_entropy(net(x), y, reduction="none")
    ref = 0.0
    for members in (["conv.weight", "conv.bias"], ["fc.weight", "fc.bias"]):
        d = []
        for i in range(len(x)):
            grads = torch.autograd.grad(losses[i], [params[n] for n in members], retain_graph=True)
            d.append(sum((g * (params[n] - theta_0[n])).sum() for n, g in zip(members, grads, strict=True)))
        ref += float(torch.stack(d).square().mean())
    assert float(value.detach()) == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError, match="engine: 'layerwise' needs per-example losses"):
        IIWRegularizer(net, "cross_entropy", theta_0, beta=1.0, engine="layerwise")(x, y)
    net.eval()
    reg(x, y)
    assert reg.last_engine == "layerwise"


def test_regularized_training_lowers_iiw():
    """Same data, seed and optimizer: adding β·IIW lowers the final Fisher IIW (and not to exactly 0)."""
    results = {}
    for beta in (0.0, 1.0):
        net, x, y = _problem(n=128, seed=1)
        theta_0 = {k: v.clone() for k, v in net.state_dict().items()}
        reg = IIWRegularizer(net, "cross_entropy", theta_0, beta=1.0)
        opt = torch.optim.SGD(net.parameters(), lr=0.2)
        for _ in range(150):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            if beta:
                loss = loss + beta * reg(x, y)
            loss.backward()
            opt.step()
        results[beta] = fisher(net, "cross_entropy", (x, y), theta_0).total
    assert 0 < results[1.0] < 0.5 * results[0.0]


def test_regularizer_bad_inputs():
    net, x, y = _problem()
    theta_0 = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="beta"):
        IIWRegularizer(net, "cross_entropy", theta_0, beta=0.0)
    with pytest.raises(ValueError, match="units"):
        IIWRegularizer(net, "cross_entropy", theta_0, beta=1.0, units="bits")
    with pytest.raises(ValueError, match="theta_0: missing"):
        IIWRegularizer(net, "cross_entropy", {"0.weight": theta_0["0.weight"]}, beta=1.0)
    with pytest.raises(ValueError, match="engine"):
        IIWRegularizer(net, "cross_entropy", theta_0, beta=1.0, engine="fast")
    net.register_parameter("scale", nn.Parameter(torch.ones((), dtype=F64)))  # not a Linear/Conv weight
    with pytest.raises(ValueError, match="engine: 'layerwise' needs"):
        IIWRegularizer(net, "cross_entropy", {**theta_0, "scale": torch.ones((), dtype=F64)}, beta=1.0,
                       engine="layerwise")


def test_regularizer_engines_agree_on_an_embedding_with_padding():
    """The padding row of an embedding counts zero in the layerwise and the JVP engine alike."""

    torch.manual_seed(0)
    net = PaddedBag().double()
    theta_0 = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x, y = torch.randint(0, 10, (12, 5)), torch.randint(0, 3, (12,))
    values = {}
    for engine in ("layerwise", "jvp"):
        reg = IIWRegularizer(net, "cross_entropy", theta_0, beta=1.0, engine=engine)
        values[engine] = float(reg(x, y).detach())
        assert reg.last_engine == engine
    assert values["layerwise"] == pytest.approx(values["jvp"], rel=1e-9)
