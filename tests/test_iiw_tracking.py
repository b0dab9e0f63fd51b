"""IIW tracking (peak of a rise-and-fall curve, optimizer hook, sample_stats), the differentiable IIW
regulariser and the held-out prior-mean fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pib_bayes as pb
from pib_bayes.iiw import (
    IIWRegularizer,
    IIWTracker,
    fisher,
    fit_prior_mean,
    iiw_stat_fn,
    iiw_stat_fns,
    peak,
    split_for_prior,
)
from pib_bayes.iiw.fisher import per_example_gradient_quadratic
from pib_bayes.optim import SGLD

F64 = torch.float64




# ----------------------------------------------------------------------------- peak
def _rise_and_fall(t):
    return t * np.exp(-t / 50.0)  # maximum at t = 50


def test_peak_on_noisy_rise_and_fall():
    t = np.arange(0.0, 300.0)
    truth = _rise_and_fall(t)
    rng = np.random.default_rng(0)
    noisy = truth + rng.normal(0, 0.3, t.shape)
    p = peak(t, noisy, window=15)
    # the smoothed maximum of a flat top: within ±10 steps (the curve is within 1% of its max on 40..62)
    assert abs(p.step - 50) <= 10 and p.interior
    true_fall = (truth.max() - truth[50:].min()) / truth.max()
    assert p.relative_fall == pytest.approx(true_fall, abs=0.03)
    assert p.final_relative_fall == pytest.approx(p.relative_fall, abs=0.03)


def test_peak_smoothing_ignores_a_spike():
    """Would catch an unsmoothed argmax: one outlier at step 150 beats the true peak in the raw curve."""
    t = np.arange(0.0, 300.0)
    v = _rise_and_fall(t)
    v[150] += 25.0
    assert t[np.argmax(v)] == 150
    assert abs(peak(t, v, window=15).step - 50) <= 3


def test_peak_monotone_and_bad_inputs():
    t = np.arange(10.0)
    p = peak(t, t**2, window=3)
    assert not p.interior and p.relative_fall == 0.0 and p.step == 9.0
    with pytest.raises(ValueError, match="at least 2"):
        peak([0.0], [1.0])
    with pytest.raises(ValueError, match="one value per step"):
        peak([0.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        peak([0.0, 1.0], [1.0, np.nan])
    with pytest.raises(ValueError, match="window"):
        peak(t, t, window=0)


# ----------------------------------------------------------------------------- tracker
def _problem(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=F64)
    y = (x[:, :1] - 2 * x[:, 1:2] > 0).long().squeeze(1) + (x[:, 2] > 1).long()
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    return net, x, y


def test_tracker_with_optimizer_hook_matches_fisher():
    net, x, y = _problem()
    theta_0 = {k: v.clone() for k, v in net.state_dict().items()}
    tracker = IIWTracker(net, "cross_entropy", (x, y), every=10, beta=0.01)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    handle = tracker.attach(opt)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    handle.remove()
    assert tracker.steps == [10, 20, 30, 40]
    last = fisher(net, "cross_entropy", (x, y), theta_0, beta=0.01)
    assert tracker.results[-1].total == pytest.approx(last.total, rel=1e-12)
    assert tracker.results[-1].per_group == pytest.approx(last.per_group, rel=1e-12)
    steps, total = tracker.curve()
    assert list(steps) == [10, 20, 30, 40] and np.all(total > 0)
    curves = tracker.curves()
    np.testing.assert_allclose(curves["0"] + curves["2"], curves["total"], rtol=1e-12)
    # per-epoch use by hand, with explicit epoch numbers
    tracker2 = IIWTracker(net, "cross_entropy", (x, y), theta_0, every=1)
    for epoch in range(3):
        tracker2.step(step=epoch)
    assert tracker2.steps == [0, 1, 2] and tracker2.peak(window=1).step in (0, 1, 2)


def test_tracker_bad_inputs():
    net, x, y = _problem()
    with pytest.raises(ValueError, match="every"):
        IIWTracker(net, "cross_entropy", (x, y), every=0)
    with pytest.raises(ValueError, match="theta_0"):
        IIWTracker(net, "cross_entropy", (x, y), {"0.weight": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match="optimizer"):
        IIWTracker(net, "cross_entropy", (x, y)).attach("sgd")


def test_stat_fns_land_in_sample_stats():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(64, 3, dtype=F64)
    y = torch.randn(64, 1, dtype=F64)
    theta_0 = {k: v.clone() for k, v in net.state_dict().items()}
    fns = iiw_stat_fns(net, "gaussian", (x, y), theta_0, beta=1 / 64)
    assert set(fns) == {"iiw", "iiw/0", "iiw/2"}
    post = pb.sample(net, "gaussian", (x, y), beta=1 / 64, step_size=1e-3, num_chains=2, num_warmup=20,
                     num_draws=6, seed=0, stat_fns=fns)
    stats = post.sample_stats
    assert stats["iiw"].shape == (2, 6) and bool(torch.isfinite(stats["iiw"]).all())
    torch.testing.assert_close(stats["iiw/0"] + stats["iiw/2"], stats["iiw"])
    c, k = 1, 4
    draw = {n: post.draws[n][c, k] for n in post.param_names}
    ref = fisher(net, "gaussian", (x, y), theta_0, beta=1 / 64, params=draw)
    assert float(stats["iiw"][c, k]) == pytest.approx(ref.total, rel=1e-10)
    assert float(stats["iiw/2"][c, k]) == pytest.approx(ref.per_group["2"], rel=1e-10)
    # a single stat_fn, as stat_fns={"iiw": ...}
    one = iiw_stat_fn(net, "gaussian", (x, y), theta_0, beta=1 / 64)
    post2 = pb.sample(net, "gaussian", (x, y), beta=1 / 64, step_size=1e-3, num_chains=2, num_warmup=20,
                      num_draws=6, seed=0, stat_fns={"iiw": one})
    torch.testing.assert_close(post2.sample_stats["iiw"], stats["iiw"])
    with pytest.raises(ValueError, match="group"):
        iiw_stat_fn(net, "gaussian", (x, y), theta_0, group="nope")


def test_tracker_in_a_hand_written_sgld_loop():
    """Tracking during sampling with the torch-optimizer SGLD (pib_bayes.optim) and the PIB energy."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(64, 3, dtype=F64), torch.randn(64, 1, dtype=F64)
    energy = pb.Energy(net, "gaussian", prior=1.0, beta=1 / 64)
    opt = SGLD(net.parameters(), lr=1e-3, generator=torch.Generator().manual_seed(0))
    tracker = IIWTracker(net, "gaussian", (x, y), every=5, beta=1 / 64)
    tracker.attach(opt)
    for _ in range(25):
        opt.zero_grad()
        energy.of_module(x, y).backward()
        opt.step()
    assert tracker.steps == [5, 10, 15, 20, 25]
    assert all(r.total > 0 and r.units == "nats" for r in tracker.results)


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


# ----------------------------------------------------------------------------- prior mean
def test_fit_prior_mean_uses_only_the_held_out_split():
    net, x, y = _problem(n=200, seed=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    prior_data, sample = split_for_prior((x, y), fraction=0.25, seed=0)
    assert len(prior_data[0]) == 50 and len(sample[0]) == 150
    theta_0 = fit_prior_mean(net, "cross_entropy", prior_data, epochs=30, lr=0.05, seed=0)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # model untouched
    assert any(not torch.equal(theta_0[k], before[k]) for k in theta_0)
    # deterministic given the held-out split and the seed (it takes no other data)
    again = fit_prior_mean(net, "cross_entropy", prior_data, epochs=30, lr=0.05, seed=0)
    assert all(torch.equal(theta_0[k], again[k]) for k in theta_0)
    # it fits the held-out split better than the initial weights
    with torch.no_grad():
        init_loss = nn.functional.cross_entropy(net(prior_data[0]), prior_data[1])
    fitted = pb.GaussianPrior.from_module(net, std=0.1, mean=theta_0)
    assert set(fitted.mean) == set(theta_0)
    net2 = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    net2.load_state_dict(theta_0)
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(net2(prior_data[0]), prior_data[1])) < float(init_loss)


def test_prior_split_bad_inputs():
    x, y = torch.randn(10, 2), torch.randn(10)
    with pytest.raises(ValueError, match="fraction"):
        split_for_prior((x, y), fraction=1.5)
    with pytest.raises(ValueError, match="fraction"):
        split_for_prior((x, y), fraction=0.01)
    with pytest.raises(ValueError, match="epochs"):
        fit_prior_mean(nn.Linear(2, 1), "gaussian", (x, y[:, None]), epochs=0)


def test_fit_prior_mean_names_prior_data_when_the_model_cannot_take_it():
    net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="prior_data: the model and loss cannot be evaluated"):
        fit_prior_mean(net, "cross_entropy", (torch.randn(8, 4), torch.zeros(8, dtype=torch.long)), epochs=1)


def test_regularizer_engines_agree_on_an_embedding_with_padding():
    """The padding row of an embedding counts zero in the layerwise and the JVP engine alike."""

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4, padding_idx=0)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.embed(x).mean(1))

    torch.manual_seed(0)
    net = Bag().double()
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
