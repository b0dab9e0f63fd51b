"""Issue 19 items 3-5: relative energy explosions, the meaning of ``diverging``, resource pre-checks and
low-precision models."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import pib_bayes as pb
from pib_bayes import GaussianPrior, sample
from pib_bayes import _validate as V

X, Y = pb.data.make_classification_data(n=200, num_classes=2, seed=0)


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).to(dtype)


def run_mlp(step_size: float, method: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sample(mlp(), "cross_entropy", (X, Y), beta=1 / 200, step_size=step_size, num_chains=2,
                      num_warmup=10, num_draws=30, chain_method=method, seed=0, **kw)


# ------------------------------------------------------------------ relative energy explosion
@pytest.mark.parametrize("method", ["vectorized", "sequential"])
def test_step_size_one_is_flagged_as_divergence(method):
    """h = 1 drives the energy from ~2e2 to 1e6-1e8 within a few steps: flagged by the default threshold."""
    post = run_mlp(1.0, method)
    assert post.diverged.all()
    assert (post.divergence_step >= 1).all() and (post.divergence_step < 10).all()
    assert post.sample_stats["diverging"].all() and torch.isnan(post.draws["0.weight"]).all()


def test_without_the_relative_check_step_size_one_runs_unflagged():
    """The would-catch-the-bug twin: with only the non-finite check (the old behaviour) the same run is
    not flagged although its energies are > 1e6."""
    post = run_mlp(1.0, "vectorized", divergence_threshold=None)
    assert not post.diverged.any() and not post.sample_stats["diverging"].any()
    assert float(post.sample_stats["energy"].abs().max()) > 1e6


def test_healthy_run_is_not_flagged():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = sample(mlp(), "cross_entropy", (X, Y), beta=1 / 200, step_size=1e-3, num_chains=2,
                      num_warmup=500, num_draws=500, seed=0)
    assert not post.diverged.any() and not post.sample_stats["diverging"].any()


def test_threshold_is_relative_to_the_initial_energy():
    """A threshold below the explosion factor flags, one above it does not (same run, same draws)."""
    ref = run_mlp(1.0, "vectorized", divergence_threshold=None)
    u = ref.sample_stats["energy"].double().abs()
    post0 = sample(mlp(), "cross_entropy", (X, Y), beta=1 / 200, step_size=1.0, num_chains=2, num_warmup=0,
                   num_draws=1, seed=0)
    u0 = post0.sample_stats["energy"][:, 0].double().abs()
    ratio = float((u / u0[:, None]).max())
    assert not run_mlp(1.0, "vectorized", divergence_threshold=2 * ratio).diverged.any()
    assert run_mlp(1.0, "vectorized", divergence_threshold=ratio / 2).diverged.all()


# ------------------------------------------------------------------ the meaning of diverging
def _quartic(method: str):
    x, y = torch.ones(10, 1), torch.zeros(10, 1)
    init = {"weight": torch.tensor([[[0.1]], [[30.0]], [[0.2]]])}

    def quartic(out, target):
        return (out - target).pow(4).squeeze(1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sample(nn.Linear(1, 1, bias=False), quartic, (x, y), beta=1.0, prior=GaussianPrior(std=10.0),
                      step_size=0.01, num_chains=3, num_warmup=0, num_draws=50, init=init, seed=0,
                      chain_method=method, divergence_threshold=None, task="regression")


def test_diverging_means_the_same_for_vectorized_and_sequential_chains():
    """True at every draw of a diverged chain from its divergence on (exactly its NaN draws), for both
    chain methods (issue 19: it was 189 of 189 draws vectorized, 1 draw sequential)."""
    vec, seq = _quartic("vectorized"), _quartic("sequential")
    assert vec.diverged.tolist() == seq.diverged.tolist() == [False, True, False]
    assert torch.equal(vec.divergence_step, seq.divergence_step)
    step = int(vec.divergence_step[1])
    assert 0 < step < 50
    for post in (vec, seq):
        div = post.sample_stats["diverging"]
        assert torch.equal(div, torch.isnan(post.draws["weight"]).reshape(3, 50))
        assert div[1, step:].all() and not div[1, :step].any() and not div[[0, 2]].any()
    assert torch.equal(vec.sample_stats["diverging"], seq.sample_stats["diverging"])


def test_nan_draws_not_flagged_are_flagged_by_the_posterior():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, 2, 3, generator=g)
    w[1] = math.nan
    model = nn.Linear(3, 2)
    with pytest.warns(UserWarning, match=r"draws: chains \[1\] hold NaN"):
        post = pb.Posterior({"weight": w, "bias": torch.randn(3, 8, 2, generator=g)}, {},
                            {"task": "classification"}, model=model)
    assert post.diverged.tolist() == [False, True, False]
    with pytest.warns(UserWarning, match=r"chains \[1\] diverged"):
        pred = post.predict(torch.randn(4, 3, generator=g))
    assert pred.per_draw.shape[0] == 16 and torch.isfinite(pred.mean).all()
    with pytest.warns(UserWarning, match=r"chains \[1\] diverged"):
        table = pb.diagnostics.summary(post, warn=False)
    assert table.attrs["excluded_chains"] == [1]


# ------------------------------------------------------------------ resource pre-checks
def test_num_draws_beyond_memory_is_refused_before_allocating():
    with pytest.raises(ValueError, match=r"^num_draws: .* bytes.* available") as info:
        sample(nn.Linear(3, 2), "gaussian", (torch.randn(8, 3), torch.randn(8, 2)), beta=0.1,
               num_draws=10**10, num_warmup=0)
    assert "keep" in str(info.value)


def test_num_chains_beyond_memory_is_refused_before_allocating():
    with pytest.raises(ValueError, match=r"^num_chains: .* bytes.* available"):
        sample(nn.Linear(3, 2), "gaussian", (torch.randn(8, 3), torch.randn(8, 2)), beta=0.1,
               num_chains=10**8, num_draws=1, num_warmup=0)


def test_keep_reduces_the_estimate():
    """Storing one small tensor instead of all weights fits where all would not."""
    model = nn.Linear(200, 200)
    data = (torch.randn(4, 200), torch.randn(4, 200))
    budget = 8 * 100 * 200 * 200 * 4  # 8 chains x 100 draws of the weight matrix would need this
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(V, "available_memory", lambda: budget // 2)
        mp.setattr(V, "_ALWAYS_FITS", 0)
        with pytest.raises(ValueError, match="num_draws"):
            sample(model, "gaussian", data, beta=0.1, num_chains=8, num_draws=100, num_warmup=0)
        post = sample(model, "gaussian", data, beta=0.1, num_chains=8, num_draws=100, num_warmup=0,
                      keep=["bias"])
    assert list(post.draws) == ["bias"]


def test_predict_beyond_memory_is_refused_naming_x():
    g = torch.Generator().manual_seed(0)
    draws = {"weight": torch.randn(2, 5, 2, 3, generator=g), "bias": torch.randn(2, 5, 2, generator=g)}
    post = pb.Posterior(draws, {}, {"task": "classification"}, model=nn.Linear(3, 2))
    x = torch.randn(50, 3, generator=g)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(V, "available_memory", lambda: 1000)
        mp.setattr(V, "_ALWAYS_FITS", 0)  # below 64 MiB the check is skipped (hot path)
        with pytest.raises(ValueError, match=r"^x: .* bytes.* available"):
            post.predict(x)
    assert post.predict(x).per_draw.shape == (10, 50, 2)


def test_available_memory_is_positive():
    assert V.available_memory() > 0


# ------------------------------------------------------------------ low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_warns(dtype):
    with pytest.warns(pb.PrecisionWarning, match=r"round.* away.*float32 or float64") as rec:
        post = sample(mlp(dtype), "cross_entropy", (X.to(dtype), Y), beta=1 / 200, step_size=1e-6,
                      num_warmup=0, num_draws=3, seed=0)
    assert "h=1e-06" in str(rec[0].message)
    assert post.draws["0.weight"].dtype == dtype
    assert issubclass(pb.PrecisionWarning, UserWarning)


def test_bf16_fraction_in_the_warning_is_what_rounds_away():
    """The percentage the warning quotes is the share of weights w with bf16(w + sqrt(2h)) == w."""
    model = mlp(torch.bfloat16)
    w = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    expected = float(((w + math.sqrt(2e-6)).to(torch.bfloat16).float() == w).double().mean())
    with pytest.warns(pb.PrecisionWarning) as rec:
        sample(model, "cross_entropy", (X.to(torch.bfloat16), Y), beta=1 / 200, step_size=1e-6, num_warmup=0,
               num_draws=1, seed=0)
    assert f"leaves {100 * expected:.0f}% of the initial weights unchanged" in str(rec[0].message)
    assert expected > 0.05  # bf16 at h = 1e-6: a noise-sized change is lost on many weights


def test_float64_runs_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", pb.PrecisionWarning)
        post = sample(mlp(torch.float64), "cross_entropy", (X.double(), Y), beta=1 / 200, step_size=1e-3,
                      num_chains=2, num_warmup=20, num_draws=10, seed=0)
    assert post.draws["0.weight"].dtype == torch.float64
    assert torch.isfinite(post.draws["0.weight"]).all() and not post.diverged.any()
