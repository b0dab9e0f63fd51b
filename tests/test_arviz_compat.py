"""pib_bayes._arviz_compat on whichever ArviZ is installed (0.x: InferenceData, 1.x: DataTree).

The module is loaded from its file, not through ``pib_bayes`` (whose ``__init__`` imports torch),
so this file also runs in an environment with ArviZ 1.x and no torch:

    /tmp/az1/bin/python -m pytest -q -p no:cacheprovider tests/test_arviz_compat.py
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

_spec = importlib.util.spec_from_file_location(
    "pib_bayes_arviz_compat", Path(__file__).resolve().parents[1] / "pib_bayes" / "_arviz_compat.py")
compat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compat)

CHAINS = [0, 2, 5, 7]  # kept chain indices as diagnostics passes them (diverged chains left out)
DRAWS = 500
N = len(CHAINS) * DRAWS


def _scalar_dataset(values: dict[str, np.ndarray], chains=CHAINS) -> xr.Dataset:
    """As diagnostics._as_dataset: one (chain, draw) variable per scalar quantity."""
    n = next(iter(values.values())).shape[1]
    return xr.Dataset({k: (("chain", "draw"), v) for k, v in values.items()},
                      coords={"chain": list(chains), "draw": np.arange(n)})


def _groups(seed: int = 0, draws: int = 50) -> dict[str, xr.Dataset]:
    """Groups shaped as diagnostics.to_arviz builds them: ``y`` has different dims per group."""
    rng = np.random.default_rng(seed)
    c, n_obs, k = len(CHAINS), 6, 2
    base = {"chain": CHAINS, "draw": np.arange(draws)}
    attrs = {"task": "regression", "excluded_chains": "[1, 3, 4, 6]"}
    groups = {
        "posterior": xr.Dataset({"w": (("chain", "draw", "w_dim_0"), rng.standard_normal((c, draws, 3))),
                                 "b": (("chain", "draw"), rng.standard_normal((c, draws)))},
                                coords={**base, "w_dim_0": np.arange(3)}),
        "sample_stats": xr.Dataset({"energy": (("chain", "draw"), rng.standard_normal((c, draws))),
                                    "diverging": (("chain", "draw"), np.zeros((c, draws), dtype=bool))},
                                   coords=base),
        "log_likelihood": xr.Dataset({"y": (("chain", "draw", "obs"), -rng.random((c, draws, n_obs)))},
                                     coords={**base, "obs": np.arange(n_obs)}),
        "posterior_predictive": xr.Dataset(
            {"y": (("chain", "draw", "obs", "y_dim_0"), rng.standard_normal((c, draws, n_obs, k)))},
            coords={**base, "obs": np.arange(n_obs), "y_dim_0": np.arange(k)}),
        "observed_data": xr.Dataset({"y": (("obs", "y_dim_0"), rng.standard_normal((n_obs, k)))},
                                    coords={"obs": np.arange(n_obs), "y_dim_0": np.arange(k)}),
    }
    for ds in groups.values():
        ds.attrs.update(attrs)
    return groups


def _assert_same_groups(data, groups: dict[str, xr.Dataset]) -> None:
    assert sorted(compat.group_names(data)) == sorted(groups)
    for name, expected in groups.items():
        got = compat.get_group(data, name)
        assert isinstance(got, xr.Dataset)
        xr.testing.assert_equal(got, expected)  # values, dims and coords
        assert {k: got.attrs[k] for k in expected.attrs} == expected.attrs


def test_version_gate_matches_installed_arviz():
    import arviz

    assert str(compat.ARVIZ_VERSION) == arviz.__version__.split("+")[0]
    assert compat.ARVIZ_1 == (int(arviz.__version__.split(".")[0]) >= 1)


def test_from_datasets_group_names_get_group():
    groups = _groups()
    data = compat.from_datasets({**groups, "prior": None, "warmup_sample_stats": xr.Dataset()})
    _assert_same_groups(data, groups)  # None and empty groups are dropped
    assert dict(compat.get_group(data, "posterior")["w"].sizes) == {"chain": 4, "draw": 50, "w_dim_0": 3}
    assert compat.get_group(data, "posterior")["w"].coords["chain"].values.tolist() == CHAINS


@pytest.mark.parametrize("source", [{}, 5])
def test_get_group_errors_are_the_ones_plots_catches(source):
    with pytest.raises((KeyError, AttributeError, TypeError)):
        compat.get_group(source, "posterior")


def test_get_group_missing_group_raises():
    data = compat.from_datasets({"posterior": _groups()["posterior"]})
    with pytest.raises((KeyError, AttributeError, TypeError)):
        compat.get_group(data, "log_likelihood")


def test_netcdf_round_trip(tmp_path):
    groups = _groups()
    path = tmp_path / "post.nc"
    assert compat.to_netcdf(compat.from_datasets(groups), path) == str(path)
    assert path.stat().st_size > 0
    _assert_same_groups(compat.from_netcdf(path), groups)


def test_diagnose_iid_chains():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 4, DRAWS))
    diag = compat.diagnose(_scalar_dataset({"a": a, "b": 3.0 + 2.0 * b}))
    assert set(diag) == {"r_hat", "ess_bulk", "ess_tail", "mcse_mean", "mcse_sd"}
    for stat in diag.values():
        assert isinstance(stat, xr.Dataset) and set(stat.data_vars) == {"a", "b"}
        assert all(stat[v].shape == () for v in stat.data_vars)  # one value per variable
    # Tolerances. Split R-hat of iid draws is sqrt(1 - 1/n + X/n) with n = 250 draws per split chain and
    # X ~ chi2_7/7, so R-hat - 1 ~ (X - 1)/500: |R-hat - 1| < 0.01 needs X > 6 (p ~ 1e-6). Over 200
    # seeds R-hat lay in [0.9987, 1.0063] on ArviZ 0.23 and 1.3. ESS of iid draws estimates N = 2000;
    # over those seeds bulk ESS lay in [0.79 N, 1.10 N] and tail ESS in [0.71 N, 1.06 N], so [0.5 N, 1.5 N]
    # is far from flaky yet rejects per-chain ESS (N / 4) or an ESS that ignores pooling. MCSE of the
    # mean ~ sd / sqrt(N) and of the sd ~ sd / sqrt(2 N) for normal draws (observed ratios 0.90-1.15);
    # the band [0.8, 1.25] rejects a missing or doubled sqrt(2) or a mis-scaled sd.
    for v, sd in (("a", 1.0), ("b", 2.0)):
        assert 0.99 < float(diag["r_hat"][v]) < 1.01
        for kind in ("ess_bulk", "ess_tail"):
            assert 0.5 * N < float(diag[kind][v]) < 1.5 * N, (kind, v)
        assert 0.8 < float(diag["mcse_mean"][v]) / (sd / math.sqrt(N)) < 1.25
        assert 0.8 < float(diag["mcse_sd"][v]) / (sd / math.sqrt(2 * N)) < 1.25


def test_diagnose_shifted_chain_and_single_chain():
    rng = np.random.default_rng(1)
    stuck = rng.standard_normal((4, DRAWS))
    stuck[2] += 5.0
    diag = compat.diagnose(_scalar_dataset({"mixed": rng.standard_normal((4, DRAWS)), "stuck": stuck}))
    # one chain 5 sd away: between-chain variance of the chain means ~ 25 * 3/16 against within-chain 1,
    # so R-hat ~ sqrt(1 + 4.7) ~ 2.4; 1.5 is far above the 1.01 / 1.1 alarm thresholds
    assert float(diag["r_hat"]["stuck"]) > 1.5
    assert float(diag["r_hat"]["mixed"]) < 1.01  # per variable, not pooled over variables
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        one = compat.diagnose(_scalar_dataset({"a": rng.standard_normal((1, DRAWS))}, chains=[3]))
    assert math.isnan(float(one["r_hat"]["a"]))  # diagnostics.summary reports this case itself
    assert float(one["ess_bulk"]["a"]) > 0


def _assert_image(path, returned) -> None:
    assert returned == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("plot", ["plot_trace", "plot_rank"])
def test_plots_write_png_without_pyplot_state(tmp_path, plot):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    rng = np.random.default_rng(2)
    scalars = compat.from_datasets({"posterior": _scalar_dataset(
        {"energy": rng.standard_normal((4, 100)), "proj[0]": rng.standard_normal((4, 100))})})
    _assert_image(tmp_path / "scalars.png", getattr(compat, plot)(scalars, str(tmp_path / "scalars.png")))
    # ArviZ data as to_arviz exports it: a vector parameter (one panel per element) among other groups
    full = compat.from_datasets(_groups())
    for names, name in ((None, "all.png"), (["w"], "w.png")):
        _assert_image(tmp_path / name, getattr(compat, plot)(full, str(tmp_path / name), names))
    assert set(plt.get_fignums()) == before  # figures are closed or never registered with pyplot
