"""Tests for pib_bayes.diagnostics: ArviZ export and scalar-summary convergence diagnostics."""

from __future__ import annotations

import math
import warnings

import arviz as az
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import pib_bayes as pb
from pib_bayes import _arviz_compat as compat
from pib_bayes.diagnostics import ConvergenceWarning, log_likelihood, random_projections, summary, to_arviz
from pib_bayes.posterior import Posterior

C, N = 4, 1000


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _iid_posterior(seed: int = 0, d: int = 3) -> Posterior:
    g = _gen(seed)
    return Posterior({"w": torch.randn(C, N, d, generator=g, dtype=torch.float64)},
                     {"energy": torch.randn(C, N, generator=g, dtype=torch.float64),
                      "loss": torch.randn(C, N, generator=g, dtype=torch.float64)},
                     {"task": "regression"})


def _ar1(phi: float, seed: int) -> torch.Tensor:
    g = _gen(seed)
    eps = torch.randn(C, N, generator=g, dtype=torch.float64)
    z = torch.empty(C, N, dtype=torch.float64)
    z[:, 0] = eps[:, 0] / math.sqrt(1 - phi**2)  # start in the stationary law
    for k in range(1, N):
        z[:, k] = phi * z[:, k - 1] + eps[:, k]
    return z


# --------------------------------------------------------------------------- R-hat and ESS
def test_iid_chains_rhat_near_one_and_ess_near_draw_count():
    # Under i.i.d. draws split R-hat - 1 has sd ~5e-4 for 4 x 1000 draws (measured over 200 repeats),
    # so 1.01 is ~19 sd away. Bulk ESS / (C N) has mean 0.99 and sd 0.039 (same measurement): 0.2 is ~5 sd.
    post = _iid_posterior()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # mixed chains must not warn
        table = summary(post)
    assert list(table.index) == ["energy", "loss", "w[0]", "w[1]", "w[2]"]
    assert (table["r_hat"] - 1).abs().max() < 0.01
    assert ((table["ess_bulk"] / (C * N) - 1).abs() < 0.2).all()
    assert ((table["ess_tail"] / (C * N) - 1).abs() < 0.3).all()
    # MCSE of the mean is sd / sqrt(ESS) (ArviZ); for i.i.d. draws that is ~ sd / sqrt(C N)
    np.testing.assert_allclose(table["mcse_mean"], table["sd"] / np.sqrt(table["ess_bulk"]), rtol=0.05)


def test_ess_check_would_catch_autocorrelated_draws():
    # AR(1) with phi = 0.9 has ESS = C N (1 - phi) / (1 + phi) ~ 0.053 C N: the i.i.d. check above must reject
    # it, and ArviZ's estimate must sit near the theory (its relative sd is ~0.2 here, so a factor 2 is wide).
    phi = 0.9
    post = Posterior({"w": _ar1(phi, 1)[..., None]}, {}, {"task": "regression"})
    with pytest.warns(ConvergenceWarning) as record:
        table = summary(post)
    assert any(str(w.message).startswith("bulk ESS < 400") and "w[0]" in str(w.message) for w in record)
    ratio = table.loc["w[0]", "ess_bulk"] / (C * N)
    assert abs(ratio - 1) > 0.2
    assert 0.5 < ratio / ((1 - phi) / (1 + phi)) < 2.0


def test_stuck_chains_give_large_rhat_and_a_warning_naming_the_quantity():
    g = _gen(2)
    stuck = torch.arange(C, dtype=torch.float64)[:, None] * 3.0 + 0.1 * torch.randn(C, N, generator=g,
                                                                                     dtype=torch.float64)
    post = Posterior({"w": stuck[..., None]}, {"energy": torch.randn(C, N, generator=g, dtype=torch.float64)},
                     {"task": "regression"})
    with pytest.warns(ConvergenceWarning) as record:
        table = summary(post)
    assert table.loc["w[0]", "r_hat"] > 1.1
    assert table.loc["energy", "r_hat"] < 1.01
    rhat_msgs = [str(w.message) for w in record if "R-hat" in str(w.message)]
    assert len(rhat_msgs) == 1
    assert "w[0]" in rhat_msgs[0] and "energy" not in rhat_msgs[0]


def test_single_chain_warns_that_rhat_needs_chains():
    post = Posterior({"w": torch.randn(1, 500, 1, generator=_gen(3))}, {}, {"task": "regression"})
    with pytest.warns(ConvergenceWarning, match="at least 2 chains"):
        table = summary(post)
    assert math.isnan(table.loc["w[0]", "r_hat"])


def test_diverged_chains_are_excluded_with_a_warning_unless_included():
    post = _iid_posterior(4)
    post.draws["w"][2, 500:] = math.nan
    post.sample_stats["energy"][2, 500:] = math.nan
    post.diverged = torch.tensor([False, False, True, False])
    post.divergence_step = torch.tensor([-1, -1, 1500, -1])
    with pytest.warns(UserWarning, match=r"chains \[2\] diverged"):
        table = summary(post)
    assert table.attrs["excluded_chains"] == [2] and table.attrs["chains"] == [0, 1, 3]
    assert np.isfinite(table["r_hat"]).all() and (table["r_hat"] < 1.01).all()
    with pytest.warns(ConvergenceWarning) as record:
        kept = summary(post, include_diverged=True)
    assert any("R-hat" in str(w.message) and "energy" in str(w.message) for w in record)
    assert not np.isfinite(kept.loc["energy", "r_hat"])


# ------------------------------------------------------------------------------ projections
def test_random_projections_are_unit_directions():
    # draws ~ N(0, I_D): <u, w> ~ N(0, ||u||^2) = N(0, 1) for unit u. The sample variance of C N i.i.d.
    # draws has sd sqrt(2 / (C N)) = 0.022; 5 sd tolerance. Unnormalised directions would give variance ~ D.
    d = 300
    g = _gen(5)
    post = Posterior({"a": torch.randn(C, N, d - 100, generator=g, dtype=torch.float64),
                      "b": torch.randn(C, N, 10, 10, generator=g, dtype=torch.float64)}, {}, {})
    proj = random_projections(post, 6, seed=1)
    assert proj.shape == (C, N, 6)
    var = proj.reshape(-1, 6).var(0)
    assert ((var - 1).abs() < 5 * math.sqrt(2 / (C * N))).all(), var
    assert torch.equal(proj, random_projections(post, 6, seed=1))
    assert not torch.allclose(proj, random_projections(post, 6, seed=2))
    # linear in the weights: doubling every weight doubles every projection
    doubled = Posterior({k: 2 * v for k, v in post.draws.items()}, {}, {})
    torch.testing.assert_close(random_projections(doubled, 6, seed=1), 2 * proj)


def test_summary_uses_projections_for_large_models_and_weights_for_small():
    post = _iid_posterior(6, d=40)
    table = summary(post, num_projections=5, max_weights=32)
    assert [i for i in table.index if i.startswith("proj")] == [f"proj[{j}]" for j in range(5)]
    assert not any(i.startswith("w[") for i in table.index)
    assert set(table.loc[[f"proj[{j}]" for j in range(5)], "kind"]) == {"projection"}
    small = summary(post, max_weights=40)
    assert len([i for i in small.index if i.startswith("w[")]) == 40


# ---------------------------------------------------------------------------- log-likelihood
def _classifier_posterior(seed: int = 0) -> tuple[Posterior, torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    model = nn.Linear(3, 4)
    draws = {"weight": torch.randn(2, 6, 4, 3, generator=g), "bias": torch.randn(2, 6, 4, generator=g)}
    stats = {"energy": torch.randn(2, 6, generator=g), "loss": torch.rand(2, 6, generator=g),
             "step_size": torch.full((2, 6), 1e-3, dtype=torch.float64),
             "diverging": torch.zeros(2, 6, dtype=torch.bool), "iiw": torch.rand(2, 6, generator=g).double()}
    post = Posterior(draws, stats, {"task": "classification", "beta": 0.1, "noise_std": None}, model=model)
    x = torch.randn(10, 3, generator=g)
    y = torch.randint(0, 4, (10,), generator=g)
    return post, x, y


def test_log_likelihood_classification_is_log_softmax_at_label():
    post, x, y = _classifier_posterior()
    ll = log_likelihood(post, x, y, chunk_size=5)  # chunking across the chain boundary
    assert ll.shape == (2, 6, 10)
    for c in range(2):
        for d in range(6):
            out = functional_call(post.model, {k: v[c, d] for k, v in post.draws.items()}, (x,))
            torch.testing.assert_close(ll[c, d], -F.cross_entropy(out, y, reduction="none"))


def test_log_likelihood_regression_is_gaussian_density_and_needs_noise_std():
    g = _gen(1)
    model = nn.Linear(2, 1)
    post = Posterior({"weight": torch.randn(2, 5, 1, 2, generator=g),
                      "bias": torch.randn(2, 5, 1, generator=g)},
                     {}, {"task": "regression", "noise_std": 0.7}, model=model)
    x, y = torch.randn(8, 2, generator=g), torch.randn(8, 1, generator=g)
    ll = log_likelihood(post, x, y)
    f = torch.einsum("cdij,nj->cdni", post.draws["weight"], x) + post.draws["bias"][:, :, None, :]
    expected = (-(y - f).square() / (2 * 0.49) - math.log(0.7) - 0.5 * math.log(2 * math.pi)).squeeze(-1)
    torch.testing.assert_close(ll, expected)
    post.metadata["noise_std"] = None
    with pytest.raises(ValueError, match="noise_std"):
        log_likelihood(post, x, y)


# ----------------------------------------------------------------------------------- export
def test_to_arviz_groups_dims_coords():
    post, x, y = _classifier_posterior()
    idata = to_arviz(post, data=(x, y))
    assert set(compat.group_names(idata)) == {"posterior", "sample_stats", "log_likelihood",
                                               "posterior_predictive", "observed_data"}
    posterior = compat.get_group(idata, "posterior")
    assert posterior["weight"].dims == ("chain", "draw", "weight_dim_0", "weight_dim_1")
    assert posterior["bias"].dims == ("chain", "draw", "bias_dim_0")
    assert list(posterior.coords["chain"].values) == [0, 1]
    assert list(posterior.coords["weight_dim_1"].values) == [0, 1, 2]
    np.testing.assert_array_equal(posterior["weight"].values, post.draws["weight"].numpy())
    stats = compat.get_group(idata, "sample_stats")
    assert {"energy", "loss", "step_size", "diverging", "iiw"} <= set(stats.data_vars)
    assert stats["diverging"].dtype == bool
    ll = compat.get_group(idata, "log_likelihood")["y"]
    assert ll.dims == ("chain", "draw", "obs") and ll.shape == (2, 6, 10)
    np.testing.assert_allclose(ll.values, log_likelihood(post, x, y).numpy(), rtol=1e-6)
    pp = compat.get_group(idata, "posterior_predictive")["y"]
    assert pp.dims == ("chain", "draw", "obs") and set(np.unique(pp.values)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(compat.get_group(idata, "observed_data")["y"].values, y.numpy())
    assert posterior.attrs["task"] == "classification" and posterior.attrs["beta"] == 0.1


def test_to_arviz_subset_and_projections_and_bad_params():
    post, x, y = _classifier_posterior()
    sub = compat.get_group(to_arviz(post, params=["bias"]), "posterior")
    assert list(sub.data_vars) == ["bias"]
    proj = compat.get_group(to_arviz(post, params="projections", num_projections=3, seed=7), "posterior")
    assert proj["projection"].dims == ("chain", "draw", "direction")
    np.testing.assert_allclose(proj["projection"].values, random_projections(post, 3, seed=7).numpy())
    with pytest.raises(ValueError, match="params"):
        to_arviz(post, params="everything")
    with pytest.raises(ValueError, match="params: unknown"):
        to_arviz(post, params=["nope"])
    with pytest.raises(TypeError, match="data"):
        to_arviz(post, data=x)


def test_to_arviz_drops_diverged_chains_and_keeps_their_indices():
    post, _, _ = _classifier_posterior()
    post.diverged = torch.tensor([True, False])
    with pytest.warns(UserWarning, match=r"chains \[0\] diverged"):
        idata = to_arviz(post)
    assert list(compat.get_group(idata, "posterior").coords["chain"].values) == [1]


def test_arviz_functions_run_on_export_and_netcdf_round_trips(tmp_path):
    g = _gen(8)
    model = nn.Linear(2, 1)
    post = Posterior({"weight": 0.1 * torch.randn(2, 50, 1, 2, generator=g),
                      "bias": 0.1 * torch.randn(2, 50, 1, generator=g)},
                     {"energy": torch.randn(2, 50, generator=g),
                      "diverging": torch.zeros(2, 50, dtype=torch.bool)},
                     {"task": "regression", "noise_std": 1.0, "schedule": {"kind": "constant"}}, model=model)
    x, y = torch.randn(30, 2, generator=g), torch.randn(30, 1, generator=g)
    idata = post.to_arviz(data=(x, y))
    table = az.summary(idata, var_names=["weight", "bias"])
    assert len(table) == 3 and {"r_hat", "ess_bulk"} <= set(table.columns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pareto-k advice on a 100-draw toy
        loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo)
    path = compat.to_netcdf(idata, tmp_path / "post.nc")
    back = compat.from_netcdf(path)
    assert set(compat.group_names(back)) == set(compat.group_names(idata))
    for group in compat.group_names(idata):
        a, b = compat.get_group(idata, group), compat.get_group(back, group)
        for var in a.data_vars:
            np.testing.assert_array_equal(a[var].values, b[var].values)
            assert a[var].dims == b[var].dims
    assert compat.get_group(back, "posterior").attrs["schedule"] == '{"kind": "constant"}'


def test_summary_log_lik_and_probe_predictions():
    post, x, y = _classifier_posterior()
    table = summary(post, data=(x, y), probe_x=x[:3], warn=False)
    assert {"log_lik", "pred[0]", "pred[1]", "pred[2]", "iiw"} <= set(table.index)
    assert table.loc["log_lik", "mean"] == pytest.approx(float(log_likelihood(post, x, y).sum(-1).mean()),
                                                         rel=1e-6)
    probs = torch.softmax(torch.einsum("cdkj,nj->cdnk", post.draws["weight"], x[:3])
                          + post.draws["bias"][:, :, None, :], -1)
    top = probs.mean((0, 1)).argmax(-1)
    expected = probs[..., torch.arange(3), top].mean((0, 1))
    np.testing.assert_allclose(table.loc[["pred[0]", "pred[1]", "pred[2]"], "mean"], expected.numpy(),
                               rtol=1e-5)


def test_summary_rejects_bad_input():
    post = _iid_posterior()
    with pytest.raises(ValueError, match="rhat_threshold"):
        summary(post, rhat_threshold=0)
    with pytest.raises(ValueError, match="num_projections"):
        summary(post, max_weights=1, num_projections=0)
    with pytest.raises(ValueError, match="no model"):
        summary(post, probe_x=torch.zeros(2, 3))
    short = Posterior({"w": torch.zeros(2, 3, 1)}, {}, {})
    with pytest.raises(ValueError, match="at least 4 draws"):
        summary(short)


# ------------------------------------------------------------------------------ end to end
def test_end_to_end_sample_summary_and_loo():
    g = _gen(9)
    x = torch.randn(64, 2, generator=g)
    y = x @ torch.tensor([[1.0], [-0.5]]) + 0.5 * torch.randn(64, 1, generator=g)
    torch.manual_seed(0)
    post = pb.sample(nn.Linear(2, 1), pb.GaussianLoss(0.5), (x, y), beta=1 / 64, step_size=2e-3,
                     num_chains=4, num_warmup=200, num_draws=300, seed=0)
    table = summary(post, data=(x, y), probe_x=x[:2], warn=False)
    assert {"energy", "loss", "log_lik", "pred[0]", "pred[1]", "weight[0,0]", "weight[0,1]", "bias[0]"} \
        <= set(table.index)
    assert np.isfinite(table[["r_hat", "ess_bulk", "ess_tail", "mcse_mean"]].to_numpy()).all()
    idata = post.to_arviz(data=(x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert np.isfinite(az.loo(idata).elpd_loo)
        assert np.isfinite(az.waic(idata).elpd_waic)


def _linear_posterior(model: nn.Module, task: str = "classification") -> Posterior:
    g = _gen(5)
    draws = {"weight": torch.randn(2, 6, 2, 3, generator=g), "bias": torch.randn(2, 6, 2, generator=g)}
    return Posterior(draws, {"energy": torch.randn(2, 6, generator=g)}, {"task": task}, model=model)


def test_log_likelihood_is_the_same_for_every_chunk_size_and_label_layout():
    post = _linear_posterior(nn.Linear(3, 2))
    x, y = torch.randn(7, 3, generator=_gen(6)), torch.randint(0, 2, (7,), generator=_gen(7))
    ref = log_likelihood(post, x, y, chunk_size=64)
    torch.testing.assert_close(log_likelihood(post, x, y, chunk_size=1), ref)
    torch.testing.assert_close(log_likelihood(post, x, y, chunk_size=5), ref)
    # integral float labels and a (n, 1) column are the same labels
    torch.testing.assert_close(log_likelihood(post, x, y.double()[:, None]), ref)
    logits = torch.einsum("cdkj,nj->cdnk", post.draws["weight"], x) + post.draws["bias"][:, :, None, :]
    expected = torch.log_softmax(logits, -1).gather(-1, y.expand(2, 6, 7)[..., None])[..., 0]
    torch.testing.assert_close(ref, expected)


def test_inputs_the_model_cannot_consume_raise_value_error_from_the_model_error():
    post = _linear_posterior(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="data: the model cannot be evaluated") as info:
        log_likelihood(post, torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ValueError, match="probe_x: the model cannot be evaluated"):
        summary(post, probe_x=torch.randint(0, 3, (2, 3)), warn=False)
    with pytest.raises(ValueError, match="probe_x: x contains NaN"):
        summary(post, probe_x=torch.full((2, 3), math.nan), warn=False)
    with pytest.raises(ValueError, match="model: 'weight' has shape"):
        summary(_linear_posterior(nn.Linear(4, 2)), data=(torch.randn(4, 4), torch.zeros(4)), warn=False)
    with pytest.raises(ValueError, match="chunk_size"):
        log_likelihood(post, torch.randn(4, 3), torch.zeros(4), chunk_size=2.5)


@pytest.mark.parametrize("loss", ["bce_with_logits", "heteroscedastic_gaussian"])
def test_probe_predictions_follow_the_likelihood(loss):
    # pred[i] is P(y = 1) = sigmoid(f) for binary cross-entropy (a softmax over one logit would be 1 for
    # every draw), and the mean mu (first half of the output) for the heteroscedastic Gaussian
    from pib_bayes.diagnostics import scalar_quantities

    torch.manual_seed(0)
    net = nn.Linear(2, 1 if loss == "bce_with_logits" else 2)
    draws = {n: p.detach() + 0.3 * torch.randn(2, 5, *p.shape) for n, p in net.named_parameters()}
    post = Posterior.from_draws(net, draws, loss=loss)
    probe = torch.randn(3, 2)
    values, kinds, _ = scalar_quantities(post, probe_x=probe)
    out = torch.stack([torch.stack([functional_call(net, {k: v[c, d] for k, v in draws.items()}, (probe,))
                                    for d in range(5)]) for c in range(2)])  # (chain, draw, 3, out)
    want = torch.sigmoid(out[..., 0]) if loss == "bce_with_logits" else out[..., 0]
    for i in range(3):
        assert kinds[f"pred[{i}]"] == "prediction"
        np.testing.assert_allclose(values[f"pred[{i}]"], want[:, :, i].numpy(), rtol=1e-5, atol=1e-6)
