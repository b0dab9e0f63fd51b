"""pib_bayes.samplers.kernels: the registry and one step of each kernel against its update equation
(SPEC §2), with the noise from a known generator. Stationary laws are tested in test_samplers.py,
test_sgld.py and test_sgnht.py."""

from __future__ import annotations

import math

import pytest
import torch

from pib_bayes.samplers.core import GaussianNoise, Kernel
from pib_bayes.samplers.kernels import (
    KERNELS,
    build_kernel,
    build_psgld,
    build_sghmc,
    build_sgld,
    build_sgnht,
)

F64 = torch.float64


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(3, 2, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)]
    grads = [torch.randn_like(t) for t in w]
    return w, grads


def _xi(seed: int) -> list[torch.Tensor]:
    return GaussianNoise(torch.Generator().manual_seed(seed)).draw([torch.zeros(3, 2, dtype=F64),
                                                                    torch.zeros(4, dtype=F64)])


def _noise(seed: int) -> GaussianNoise:
    return GaussianNoise(torch.Generator().manual_seed(seed))


def test_the_registry_builds_every_kernel_by_name():
    assert set(KERNELS) == {"sgld", "psgld", "sghmc", "sgnht"}  # 'csgld' is a schedule, not a kernel
    for name in KERNELS:
        k = build_kernel(name)
        assert isinstance(k, Kernel) and k.curvature_rule is not None
    assert build_kernel("SGHMC", friction=0.2).settings == {"friction": 0.2}
    built = build_psgld(alpha=0.9)
    assert build_kernel(built) is built


@pytest.mark.parametrize(("call", "needle"), [
    (lambda: build_kernel("hmc"), "^sampler: unknown sampler 'hmc'"),
    (lambda: build_kernel("sgld", friction=0.1), "^sampler_kwargs: "),
    (lambda: build_kernel(build_sgld(), friction=0.1), "^sampler_kwargs: "),
    (lambda: build_sghmc(friction=0.0), "^friction: "),
    (lambda: build_psgld(alpha=1.5), "^alpha: "),
    (lambda: build_psgld(eps=0.0), "^eps: "),
    (lambda: build_sgnht(diffusion=-1.0), "^diffusion: "),
    (lambda: build_sgnht(init_thermostat=float("inf")), "^init_thermostat: "),
])
def test_bad_settings_name_themselves(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


def test_psgld_step():
    """V <- alpha V + (1 - alpha) g^2, M = eps + sqrt(V), w <- w - h g / M + sqrt(2 h / M) xi."""
    alpha, eps, h = 0.9, 1e-3, 0.01
    k = build_psgld(alpha=alpha, eps=eps)
    w, g = _problem(1)
    state = k.init(w)
    v0 = [torch.rand(t.shape, dtype=F64) for t in w]
    for s, v in zip(state["square_avg"], v0, strict=True):
        s.copy_(v)
    before = [t.clone() for t in w]
    stats = k.step(w, g, state, h, _noise(2), with_stats=True)
    for after, b, gg, v, x, s in zip(w, before, g, v0, _xi(2), state["square_avg"], strict=True):
        v_new = alpha * v + (1 - alpha) * gg * gg
        m = eps + v_new.sqrt()
        torch.testing.assert_close(s, v_new, rtol=1e-14, atol=0)
        torch.testing.assert_close(after, b - h * gg / m + (2 * h / m).sqrt() * x, rtol=1e-12, atol=1e-14)
    g_mean = torch.cat([(1 / (eps + v.sqrt())).flatten() for v in state["square_avg"]]).mean()
    torch.testing.assert_close(stats["precond_mean"], g_mean, rtol=1e-12, atol=0)


def test_sghmc_step():
    """v <- (1 - alpha) v - eta g + sqrt(2 alpha eta) xi, w <- w + v; kinetic energy sum v^2 / (2 eta)."""
    alpha, eta = 0.2, 0.01
    k = build_sghmc(friction=alpha)
    w, g = _problem(3)
    state = k.init(w)
    v0 = [0.1 * torch.randn(t.shape, dtype=F64) for t in w]
    for s, v in zip(state["momentum"], v0, strict=True):
        s.copy_(v)
    before = [t.clone() for t in w]
    stats = k.step(w, g, state, eta, _noise(4), with_stats=True)
    kinetic = 0.0
    for after, b, gg, v, x in zip(w, before, g, v0, _xi(4), strict=True):
        v_new = (1 - alpha) * v - eta * gg + math.sqrt(2 * alpha * eta) * x
        torch.testing.assert_close(after, b + v_new, rtol=1e-13, atol=1e-15)
        kinetic += float(v_new.square().sum()) / (2 * eta)
    assert float(stats["kinetic_energy"]) == pytest.approx(kinetic, rel=1e-12)
    # "would catch the bug": the momentum-free update w - eta g + noise differs
    wrong = before[1] - eta * g[1] + math.sqrt(2 * alpha * eta) * _xi(4)[1]
    assert float((wrong - w[1]).abs().max()) > 1e-3


def test_sgnht_step():
    """p <- p (1 - h xi) - h g + sqrt(2 A h) eta, w <- w + h p, xi <- xi + h (p.p / D - 1)."""
    a, h, xi0 = 0.7, 0.05, 1.3
    k = build_sgnht(diffusion=a, init_thermostat=xi0)
    w, g = _problem(5)
    state = k.init(w)
    p0 = [torch.randn(t.shape, dtype=F64) for t in w]
    for s, p in zip(state["momentum"], p0, strict=True):
        s.copy_(p)
    before = [t.clone() for t in w]
    stats = k.step(w, g, state, h, _noise(6), with_stats=True)
    pp, d = 0.0, sum(t.numel() for t in w)
    for after, b, gg, p, x in zip(w, before, g, p0, _xi(6), strict=True):
        p_new = p * (1 - h * xi0) - h * gg + math.sqrt(2 * a * h) * x
        torch.testing.assert_close(after, b + h * p_new, rtol=1e-13, atol=1e-15)
        pp += float(p_new.square().sum())
    assert float(stats["thermostat"]) == pytest.approx(xi0 + h * (pp / d - 1), rel=1e-12)
    assert float(stats["kinetic_energy"]) == pytest.approx(pp / 2, rel=1e-12)


def test_csgld_is_sgld_with_a_schedule():
    # the shorthand resolves to the SGLD kernel on a Cyclical schedule; build_kernel refuses the name
    from pib_bayes.samplers.schedules import Cyclical, expand_shorthand

    assert expand_shorthand("csgld", Cyclical(0.01, cycle_length=4)) == "sgld"
    with pytest.raises(ValueError, match="^step_size: sampler='csgld' needs a pib_bayes.samplers.Cyclical"):
        expand_shorthand("csgld", 0.01)
    with pytest.raises(ValueError, match="^sampler: 'csgld' is the kernel 'sgld' on a Cyclical schedule"):
        build_kernel("csgld")


def test_one_psgld_kernel_steps_states_of_different_shapes_as_two_kernels_would():
    """The scratch lives in the state (SCRATCH), so one kernel object alternating between two
    states of different shapes gives bit for bit the draws of two kernels, each state keeping its
    own scratch buffer across steps (not reallocated when the other state steps)."""
    from pib_bayes.samplers.core import SCRATCH

    shapes = {"a": [(3, 2), (4,)], "b": [(7, 5)]}

    def setup():
        ws = {n: [torch.zeros(s, dtype=F64) for s in shp] for n, shp in shapes.items()}
        return ws, {n: _noise(10 + i) for i, n in enumerate(shapes)}

    def grads(w, t):
        return [torch.sin(p + t) + 0.1 * t for p in w]

    shared = build_psgld(alpha=0.9, eps=1e-3)
    w1, noise1 = setup()
    states1 = {n: shared.init(w) for n, w in w1.items()}
    separate = {n: build_psgld(alpha=0.9, eps=1e-3) for n in shapes}
    w2, noise2 = setup()
    states2 = {n: separate[n].init(w) for n, w in w2.items()}
    scratch = {}
    for t in range(6):
        for n in shapes:  # a, b, a, b, ...
            s1 = shared.step(w1[n], grads(w1[n], t), states1[n], 0.01, noise1[n], with_stats=True)
            s2 = separate[n].step(w2[n], grads(w2[n], t), states2[n], 0.01, noise2[n], with_stats=True)
            assert torch.equal(s1["precond_mean"], s2["precond_mean"])
            buf = states1[n][SCRATCH].get(states1[n]["square_avg"], 1)[1][0]
            assert scratch.setdefault(n, buf) is buf  # the state's own buffer, kept across steps
    assert states1["a"][SCRATCH] is not states1["b"][SCRATCH]
    for n in shapes:
        for p1, p2 in zip(w1[n], w2[n], strict=True):
            assert torch.equal(p1, p2)
        for v1, v2 in zip(states1[n]["square_avg"], states2[n]["square_avg"], strict=True):
            assert torch.equal(v1, v2)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernels_keep_no_buffers_of_their_own(name):
    """A built kernel closes over its settings only (numbers): every buffer it uses is in the state,
    so sharing one kernel between states cannot mix them."""
    k = build_kernel(name)
    w, g = _problem(4)
    k.step(w, g, k.init(w), 0.01, _noise(5))
    for fn in (k.init, k.step):
        closed = [c.cell_contents for c in (fn.__closure__ or ())]
        assert all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in closed), (name, closed)
