"""pib_bayes.iiw.tracking: IIW tracking (peak of a rise-and-fall curve, optimizer hook, sample_stats).
The regulariser's tests are in test_iiw_regularizer.py, the prior-mean fit's in test_iiw_prior_fit.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from iiw_helpers import tiny_classifier as _problem
from torch import nn

import pib_bayes as pb
from pib_bayes.iiw import (
    IIWTracker,
    fisher,
    iiw_stat_fn,
    iiw_stat_fns,
    peak,
)
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
