"""The statistics of the pre-registered reproductions (examples/_common.py, issue #20 item 5) against scipy
and textbook values on fixed numbers, each with a deliberately wrong twin that must fail the same check."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import _common as c  # noqa: E402

sys.path.pop(0)

# ten paired accuracies (fixed numbers, as a reproduction would produce them)
A = np.array([0.9315, 0.9290, 0.9340, 0.9300, 0.9325, 0.9280, 0.9335, 0.9310, 0.9295, 0.9330])
B = np.array([0.9300, 0.9295, 0.9310, 0.9285, 0.9320, 0.9265, 0.9300, 0.9305, 0.9290, 0.9305])


def test_paired_comparison_matches_scipy_and_unpaired_twin_differs():
    r = c.paired_comparison(A, B)
    ref = stats.ttest_rel(A, B)
    ci = ref.confidence_interval(0.95)
    assert r["t_p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert r["t_ci"] == pytest.approx([ci.low, ci.high], rel=1e-12)
    d = A - B
    assert r["mean_diff"] == pytest.approx(d.mean(), rel=1e-12)
    # the t interval by hand: mean +- t_{0.975, 9} sd / sqrt(10)
    half = stats.t.ppf(0.975, 9) * d.std(ddof=1) / math.sqrt(10)
    assert r["t_ci"] == pytest.approx([d.mean() - half, d.mean() + half], rel=1e-12)
    assert r["wilcoxon_p"] == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-12)
    # the twin: an unpaired (Welch) test of the same numbers gives another p-value
    unpaired = stats.ttest_ind(A, B, equal_var=False).pvalue
    assert abs(unpaired - r["t_p"]) > 0.01


def test_signed_rank_interval_is_the_textbook_one():
    # n = 10 at 95%: the exact interval runs from the 9th smallest to the 9th largest of the 55 Walsh
    # averages (Hollander & Wolfe, table A.4: P(T <= 8) = 0.0244, P(T <= 9) = 0.0322)
    d = np.array([0.3, -0.1, 0.7, 1.2, 0.05, 0.9, -0.4, 0.6, 1.5, 0.2])
    walsh = np.sort([(d[i] + d[j]) / 2 for i in range(10) for j in range(i, 10)])
    est, lo, hi = c.signed_rank_ci(d)
    assert (lo, hi) == (walsh[8], walsh[46])
    assert est == pytest.approx(np.median(walsh))
    # the twin: a normal-approximation interval (mean +- 1.96 se) is not the exact one
    se = d.std(ddof=1) / math.sqrt(10)
    assert not np.allclose([lo, hi], [d.mean() - 1.96 * se, d.mean() + 1.96 * se], rtol=1e-3)


def test_signed_rank_interval_coverage_matches_the_exact_law():
    # P(T <= c - 1) for c = 9, n = 10 by enumerating all 2^10 sign patterns
    ranks = np.arange(1, 11)
    sums = np.array([(ranks * ((k >> np.arange(10)) & 1)).sum() for k in range(1024)])
    assert (sums <= 8).mean() == pytest.approx(0.0244, abs=5e-5)
    assert (sums <= 8).mean() <= 0.025 < (sums <= 9).mean()


def test_min_detectable_effect_has_power_080_and_the_wrong_df_twin_misses():
    delta = c.min_detectable_effect(10)
    assert delta == pytest.approx(0.996, abs=5e-4)  # the figure stated in examples/configs/pib_vs_sgd.toml
    crit = stats.t.ppf(0.975, 9)
    nc = delta * math.sqrt(10)
    power = stats.nct.sf(crit, 9, nc) + stats.nct.cdf(-crit, 9, nc)
    assert power == pytest.approx(0.8, abs=1e-9)
    # the twin: a normal (z) approximation, (z_0.975 + z_0.8) / sqrt(n), understates the effect
    z = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) / math.sqrt(10)
    assert delta - z > 0.05


def test_holm_matches_the_step_down_rule_and_bonferroni_twin_differs():
    p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.20}
    adj = c.holm(p)
    # sorted 0.01, 0.03, 0.04, 0.20 -> 4*0.01, max(.04, 3*.03), max(.09, 2*.04), max(.09, .20)
    assert adj == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.20})
    bonferroni = {k: min(1.0, 4 * v) for k, v in p.items()}
    assert adj != pytest.approx(bonferroni)


def test_seed_sign_test_counts_ties_against_the_claim():
    r = c.seeds_sign_test([-1.0, -0.8, float("nan"), 0.0, -0.4, -1.0], "negative")
    assert (r["k"], r["opposite"], r["undefined_or_tied"], r["n"]) == (4, 0, 2, 6)
    assert r["p"] == pytest.approx(stats.binomtest(4, 6, 0.5).pvalue)
    all6 = c.seeds_sign_test([-0.2] * 6, "negative")
    assert all6["p"] == pytest.approx(2 / 64)  # 6/6: the smallest p with 6 seeds, 0.031
    # the twin: dropping the tied and undefined seeds (4 of 4) would claim significance it does not have
    assert stats.binomtest(4, 4, 0.5).pvalue < r["p"]
    with pytest.raises(ValueError, match="direction"):
        c.seeds_sign_test([1.0], "up")


def test_paired_comparison_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="a, b"):
        c.paired_comparison([0.1, 0.2], [0.1])
