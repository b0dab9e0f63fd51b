"""pib_bayes.samplers.core: the noise sources and the one Langevin move every kernel shares,
``target <- target - h drift + noise_scale sqrt(2 h D) xi``, checked number for number."""

from __future__ import annotations

import math

import pytest
import torch

from pib_bayes.samplers.core import SCRATCH, GaussianNoise, Kernel, langevin_move_, make_noise, scratch_of

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _like():
    return [torch.zeros(3, 5, dtype=F64), torch.zeros(7, dtype=F64)]


def test_gaussian_noise_is_one_flat_draw_whatever_the_grouping_of_tensors():
    xi = GaussianNoise(_gen(0)).draw(_like())
    flat = torch.randn(22, generator=_gen(0), dtype=F64)
    torch.testing.assert_close(torch.cat([t.flatten() for t in xi]), flat, rtol=0, atol=0)
    regrouped = GaussianNoise(_gen(0)).draw([torch.zeros(10, dtype=F64), torch.zeros(2, 6, dtype=F64)])
    torch.testing.assert_close(torch.cat([t.flatten() for t in regrouped]), flat, rtol=0, atol=0)
    # a second draw continues the stream
    nxt = GaussianNoise(_gen(0))
    nxt.draw(_like())
    assert not torch.equal(torch.cat([t.flatten() for t in nxt.draw(_like())]), flat)


def test_batched_noise_gives_chain_k_what_it_draws_alone():
    stacked = [torch.zeros(2, 3, 5, dtype=F64), torch.zeros(2, 7, dtype=F64)]
    rows = GaussianNoise([_gen(4), _gen(9)], batched=True).draw(stacked)
    for k, seed in enumerate((4, 9)):
        alone = GaussianNoise(_gen(seed)).draw(_like())
        assert all(torch.equal(r[k], a) for r, a in zip(rows, alone, strict=True))
    with pytest.raises(ValueError, match="^generators: "):
        GaussianNoise([_gen(0), _gen(1)])
    with pytest.raises(ValueError, match="^noise: expected one of"):
        make_noise("uniform", _gen(0))


def test_langevin_move_is_the_update_equation():
    g = _gen(1)
    w = [torch.randn(3, 5, generator=g, dtype=F64), torch.randn(7, generator=g, dtype=F64)]
    d = [torch.randn_like(t) for t in w]
    before = [t.clone() for t in w]
    h, diffusion, scale = 0.01, 0.3, 0.5
    langevin_move_(w, d, h, GaussianNoise(_gen(5)), diffusion, scale)
    xi = GaussianNoise(_gen(5)).draw(_like())
    for after, b, dd, x in zip(w, before, d, xi, strict=True):
        expected = b - h * dd + scale * math.sqrt(2 * h * diffusion) * x
        torch.testing.assert_close(after, expected, rtol=0, atol=1e-15)
    # "would catch the bug": noise scaled by sqrt(h) instead of sqrt(2 h D) is far off
    wrong = before[0] - h * d[0] + scale * math.sqrt(h) * xi[0]
    assert float((wrong - w[0]).abs().max()) > 1e-3


def test_langevin_move_with_a_diagonal_preconditioner():
    """``divide_by=M``: target - h drift / M + noise_scale sqrt(2 h) xi / sqrt(M) (pSGLD's G = 1/M)."""
    g = _gen(2)
    w = [torch.randn(3, 5, generator=g, dtype=F64), torch.randn(7, generator=g, dtype=F64)]
    d = [torch.randn_like(t) for t in w]
    m = [torch.rand(t.shape, generator=g, dtype=F64) + 0.5 for t in w]
    before, m_before = [t.clone() for t in w], [t.clone() for t in m]
    langevin_move_(w, d, 0.02, GaussianNoise(_gen(6)), divide_by=m)
    xi = GaussianNoise(_gen(6)).draw(_like())
    for after, b, dd, mm, x in zip(w, before, d, m_before, xi, strict=True):
        torch.testing.assert_close(after, b - 0.02 * dd / mm + math.sqrt(0.04) * x / mm.sqrt(), rtol=1e-14,
                                   atol=1e-15)


@pytest.mark.parametrize("off", ["none", "zero_scale"])
def test_without_noise_it_is_gradient_descent_and_draws_nothing(off):
    w = [torch.ones(4, dtype=F64)]
    gen = _gen(3)
    state = gen.get_state()
    noise = None if off == "none" else GaussianNoise(gen)
    langevin_move_(w, [torch.full((4,), 2.0, dtype=F64)], 0.1, noise, noise_scale=0.0 if noise else 1.0)
    torch.testing.assert_close(w[0], torch.full((4,), 0.8, dtype=F64), rtol=0, atol=1e-15)
    assert torch.equal(gen.get_state(), state)  # the stream is untouched


def test_kernel_init_state_passes_batch_ndim_only_to_an_init_that_takes_it():
    seen = {}

    def plain_init(params):
        seen["plain"] = len(params)
        return {}

    def batched_init(params, batch_ndim=0):
        seen["batched"] = batch_ndim
        return {}

    step = lambda *args, **kwargs: {}  # noqa: E731
    Kernel("a", (), plain_init, step).init_state([torch.zeros(2)], batch_ndim=1)
    Kernel("b", (), batched_init, step).init_state([torch.zeros(2)], batch_ndim=1)
    assert seen == {"plain": 1, "batched": 1}


def test_kernel_checks_its_callables_and_names_itself():
    def init(params):
        return {}

    def step(params, grads, state, step_size, noise, noise_scale=1.0, batch_ndim=0, with_stats=False):
        return {}

    Kernel("ok", (), init, step)
    Kernel("kwargs", (), init, lambda *args, **kwargs: {})
    with pytest.raises(TypeError, match=r"Kernel 'no_stats': step must accept .*with_stats"):
        Kernel("no_stats", (), init, lambda params, grads, state, step_size, noise, noise_scale=1.0,
               batch_ndim=0: {})
    with pytest.raises(TypeError, match=r"Kernel 'short': step must accept step\(params, grads, state"):
        Kernel("short", (), init, lambda params, grads: {})
    with pytest.raises(TypeError, match=r"Kernel 'two_args': init must accept init\(params\)"):
        Kernel("two_args", (), lambda params, extra: {}, step)
    with pytest.raises(TypeError, match=r"Kernel 'none': init must be callable"):
        Kernel("none", (), None, step)
    with pytest.raises(ValueError, match=r"Kernel 'r': state_names: 'scratch' is reserved"):
        Kernel("r", ("scratch",), init, step)
    with pytest.raises(ValueError, match=r"Kernel 'r': state_names: 'step' is reserved for the step count"):
        Kernel("r", ("step",), init, step)


def test_the_step_count_lives_in_the_state():
    from pib_bayes.samplers.core import STEP, count_step, step_count

    a, b = {}, {STEP: 41}
    assert step_count(a) == 0 and count_step(a) == 1 and a[STEP] == 1
    assert count_step(b) == 42 and step_count(a) == 1  # each state counts its own steps


def test_scratch_of_makes_one_workspace_per_state():
    a, b = {}, {}
    assert scratch_of(a) is scratch_of(a) is a[SCRATCH]
    assert scratch_of(b) is not scratch_of(a)
