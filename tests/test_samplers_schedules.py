"""pib_bayes.samplers.schedules: h_t, the noise scale and which steps may be kept, for every schedule,
against their closed forms (SPEC §2)."""

from __future__ import annotations

import math

import pytest

from pib_bayes.samplers.schedules import Constant, Cosine, Cyclical, PolynomialDecay, Schedule, as_schedule

STEPS = range(0, 50)


def test_constant():
    s = Constant(0.01)
    assert all(s(t) == s.step_size(t) == 0.01 and s.noise_scale(t) == 1.0 and s.collect(t) for t in STEPS)


def test_polynomial_decay_is_a_times_b_plus_t_to_the_minus_gamma():
    s = PolynomialDecay(a=0.5, b=10.0, gamma=0.55)
    for t in STEPS:
        assert s(t) == pytest.approx(0.5 * (10.0 + t) ** -0.55, rel=1e-15)
    assert all(s(t + 1) < s(t) for t in STEPS) and all(s.collect(t) and s.noise_scale(t) == 1 for t in STEPS)
    assert PolynomialDecay(a=2.0, gamma=0.0)(1000) == 2.0  # gamma = 0: constant


def test_cosine_anneals_from_h0_to_the_floor_and_stays_there():
    s = Cosine(1.0, total_steps=20, min_step_size=0.1)
    assert s(0) == 1.0 and s(20) == pytest.approx(0.1, abs=1e-15) and s(35) == s(20)
    assert s(10) == pytest.approx(0.55, rel=1e-15)  # halfway: the mean of h0 and the floor
    for t in range(20):
        expected = 0.1 + 0.45 * (1 + math.cos(math.pi * t / 20))
        assert s(t) == pytest.approx(expected, rel=1e-15) and s(t + 1) < s(t)


def test_cyclical_restarts_every_cycle_and_keeps_only_the_sampling_phase():
    """cSGLD (Zhang et al. 2020, eq. 1): h_t = h0/2 (cos(pi r_t) + 1), r_t = (t mod L)/L; the first
    exploration_fraction of each cycle has no noise and keeps no draw."""
    length, frac = 10, 0.3
    s = Cyclical(0.2, cycle_length=length, exploration_fraction=frac)
    for t in STEPS:
        r = (t % length) / length
        assert s(t) == pytest.approx(0.1 * (math.cos(math.pi * r) + 1), rel=1e-15)
        exploring = r < frac
        assert s.noise_scale(t) == (0.0 if exploring else 1.0) and s.collect(t) is (not exploring)
        assert s(t + length) == pytest.approx(s(t), rel=1e-15)
    assert sum(s.collect(t) for t in range(length)) == 7  # 30% of each cycle explores
    assert all(s(t) > 0 for t in STEPS)  # h never reaches 0 inside a cycle
    # "would catch the bug": without the exploration phase every step would be kept
    every = Cyclical(0.2, cycle_length=length, exploration_fraction=0.0)
    assert sum(every.collect(t) for t in range(length)) == length


def test_as_schedule():
    s = as_schedule(0.05)
    assert isinstance(s, Constant) and s(7) == 0.05
    cyc = Cyclical(1.0, cycle_length=4)
    assert as_schedule(cyc) is cyc and isinstance(cyc, Schedule)


@pytest.mark.parametrize(("build", "name"), [
    (lambda: Constant(0.0), "step_size"),
    (lambda: Constant(float("nan")), "step_size"),
    (lambda: Constant(True), "step_size"),
    (lambda: PolynomialDecay(a=-1.0), "a"),
    (lambda: PolynomialDecay(a=1.0, b=0.0), "b"),
    (lambda: PolynomialDecay(a=1.0, gamma=1.5), "gamma"),
    (lambda: Cosine(1.0, total_steps=0), "total_steps"),
    (lambda: Cosine(1.0, total_steps=10, min_step_size=2.0), "min_step_size"),
    (lambda: Cyclical(1.0, cycle_length=1), "cycle_length"),
    (lambda: Cyclical(1.0, cycle_length=4, exploration_fraction=1.0), "exploration_fraction"),
    (lambda: as_schedule("0.1"), "step_size"),
])
def test_bad_settings_name_themselves(build, name):
    with pytest.raises(ValueError, match=rf"^{name}: "):
        build()
