"""pib_bayes.demo: the self-contained demo (embedded spirals, Adam point estimate, SGLD posterior)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pib_bayes.demo import format_demo, make_mlp, run_demo


def test_make_mlp_layout():
    net = make_mlp(2, 8, 3, depth=3, activation=nn.ReLU)
    assert [type(m) for m in net] == [nn.Linear, nn.ReLU] * 3 + [nn.Linear]
    assert (net[0].in_features, net[-1].out_features) == (2, 3)
    assert make_mlp(4, 5, 1, depth=0)[0].in_features == 4


def test_quick_demo_reports_both_predictors_reproducibly():
    a = run_demo(quick=True, seed=3)
    assert a["n_train"] == 300 and a["n_test"] == 2000 and a["chains"] == 4
    assert a["beta"] == 1 / 300 and a["draws_per_chain"] == 50 and a["diverged_chains"] == 0
    for key in ("point_estimate", "posterior_predictive", "point_estimate_train"):
        assert 0.0 <= a[key]["accuracy"] <= 1.0 and a[key]["nll"] > 0.0
    assert a["posterior_predictive"]["accuracy"] > 1 / 3  # better than chance on 3 classes
    b = run_demo(quick=True, seed=3)
    assert a["posterior_predictive"] == b["posterior_predictive"]  # same seed, same numbers
    text = format_demo(a)
    assert "PIB posterior predictive (SGLD)" in text and f"n_train={a['n_train']}" in text


def test_run_demo_leaves_the_global_rng_alone_and_its_seed_decides():
    torch.manual_seed(11)
    before = torch.get_rng_state()
    a = run_demo(quick=True, seed=3)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's global RNG is untouched
    torch.randn(100)  # another global state: the same seed gives the same numbers
    assert run_demo(quick=True, seed=3)["posterior_predictive"] == a["posterior_predictive"]
    # the would-catch twin: another seed, other numbers
    assert run_demo(quick=True, seed=4)["posterior_predictive"] != a["posterior_predictive"]
    with pytest.raises(ValueError, match="^seed: "):
        run_demo(quick=True, seed=-1)
