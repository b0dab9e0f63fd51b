"""The one place that knows which ArviZ is installed (gated on ``arviz.__version__``).

ArviZ 0.x builds an ``InferenceData`` (``az.from_dict(posterior=..., sample_stats=...)``) and
plots with ``az.plot_trace``/``az.plot_rank`` returning matplotlib axes; ArviZ 1.x builds an
``xarray.DataTree`` (``az.from_dict({"posterior": {...}, ...})``) and plots through arviz-plots,
returning a ``PlotCollection``. Everything else in pib_bayes goes through the functions here.
Tested against the 0.x series (what installs in CI) and against arviz 1.3.0 (arviz-base 1.3.1,
arviz-stats 1.3.3, arviz-plots 1.3.2, xarray 2026.9, Python 3.12, h5netcdf with h5py, no torch) by
running tests/test_arviz_compat.py, which loads this file without importing pib_bayes (so a Python
3.12 venv with ``pip install arviz matplotlib h5netcdf h5py pytest`` and no torch runs it):
``python -m pytest -q tests/test_arviz_compat.py``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import arviz as az
import numpy as np
import xarray as xr
from packaging.version import Version

__all__ = ["ARVIZ_VERSION", "ARVIZ_1", "from_datasets", "group_names", "get_group", "to_netcdf",
           "from_netcdf", "diagnose", "plot_trace", "plot_rank"]

ARVIZ_VERSION = Version(az.__version__)
ARVIZ_1 = ARVIZ_VERSION >= Version("1.0.0")


def from_datasets(groups: Mapping[str, xr.Dataset]) -> Any:
    """InferenceData (0.x) or DataTree (1.x) holding the given ``{group name: Dataset}``.

    The datasets are built by the caller with explicit dims and coords, so the same variable
    name (``y``) may have different dims in different groups (log-likelihood vs. predictive).
    """
    groups = {g: ds for g, ds in groups.items() if ds is not None and len(ds.data_vars)}
    if ARVIZ_1:  # pragma: no cover - exercised only where arviz>=1 installs
        return xr.DataTree.from_dict(dict(groups))
    return az.InferenceData(**groups)


def group_names(data: Any) -> list[str]:
    """Names of the groups present (``posterior``, ``sample_stats``, ...)."""
    if ARVIZ_1:  # pragma: no cover
        return list(data.children)
    return list(data.groups())


def get_group(data: Any, name: str) -> xr.Dataset:
    """One group as an ``xarray.Dataset``."""
    if ARVIZ_1:  # pragma: no cover
        return data[name].to_dataset()
    return data[name]


def to_netcdf(data: Any, path: str | os.PathLike) -> str:
    """Write InferenceData/DataTree to a netCDF file (h5netcdf engine) and return the path."""
    data.to_netcdf(os.fspath(path), engine="h5netcdf")  # same method name on InferenceData and DataTree
    return os.fspath(path)


def from_netcdf(path: str | os.PathLike) -> Any:
    """Read what :func:`to_netcdf` wrote."""
    if ARVIZ_1:  # pragma: no cover
        with xr.open_datatree(os.fspath(path), engine="h5netcdf") as tree:  # load, then close the file
            return tree.load()
    return az.from_netcdf(os.fspath(path))


def diagnose(dataset: xr.Dataset) -> dict[str, xr.Dataset]:
    """ArviZ diagnostics of every variable of a ``(chain, draw)`` dataset.

    Returns ``r_hat`` (rank-normalised split R-hat), ``ess_bulk``, ``ess_tail``, ``mcse_mean``,
    ``mcse_sd`` (Vehtari et al. 2021), each a dataset with one value per variable.
    """
    return {
        "r_hat": az.rhat(dataset, method="rank"),
        "ess_bulk": az.ess(dataset, method="bulk"),
        "ess_tail": az.ess(dataset, method="tail"),
        "mcse_mean": az.mcse(dataset, method="mean"),
        "mcse_sd": az.mcse(dataset, method="sd"),
    }


def _save_collection(pc: Any, path: str) -> None:  # pragma: no cover - arviz>=1 only
    if not hasattr(pc, "savefig"):
        raise RuntimeError(f"arviz {ARVIZ_VERSION}: the PlotCollection has no savefig; "
                           "pib_bayes._arviz_compat needs updating for this ArviZ release")
    pc.savefig(path)
    import matplotlib.pyplot as plt  # arviz-plots draws on pyplot figures: close it, keep no pyplot state

    plt.close(pc.get_viz("figure"))


def _var_names(data: Any, var_names: Sequence[str] | None) -> list[str]:
    return list(var_names) if var_names is not None else list(get_group(data, "posterior").data_vars)


@contextlib.contextmanager
def _quiet_arviz_plotting() -> Iterator[None]:
    # arviz 0.x calls a matplotlib helper deprecated in matplotlib 3.11, once per artist: not ours to fix
    from matplotlib import MatplotlibDeprecationWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=MatplotlibDeprecationWarning, module=r"arviz\.")
        yield


def _num_panels(data: Any, names: Sequence[str]) -> int:
    """One panel per scalar: a variable with extra dims gets one per element (compact=False)."""
    post = get_group(data, "posterior")
    return sum(int(np.prod([post[n].sizes[d] for d in post[n].dims if d not in ("chain", "draw")]))
               for n in names)


def _figure(rows: int, cols: int, width: float, height_per_row: float) -> tuple[Any, np.ndarray]:
    # a bare Figure (Agg canvas on savefig): no pyplot state, nothing ever shown
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, max(2.0, height_per_row * rows)))
    return fig, np.asarray(fig.subplots(rows, cols, squeeze=False))


def plot_trace(data: Any, path: str, var_names: Sequence[str] | None = None) -> str:
    """ArviZ trace plot (marginal density + trace per chain, one row per variable) written to ``path``."""
    names = _var_names(data, var_names)
    if ARVIZ_1:  # pragma: no cover
        _save_collection(az.plot_trace_dist(data, var_names=names, compact=False, kind="kde",
                                              backend="matplotlib"), path)
        return path
    fig, axes = _figure(_num_panels(data, names), 2, 10.0, 2.0)
    with _quiet_arviz_plotting():
        az.plot_trace(data, var_names=names, compact=False, axes=axes, show=False)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_rank(data: Any, path: str, var_names: Sequence[str] | None = None) -> str:
    """ArviZ rank plot written to ``path`` (Vehtari et al. 2021).

    One panel per variable: on 0.x a rank histogram per chain, on 1.x the fractional-rank
    Delta-ECDF per chain with its simultaneous envelope (both flat when chains mix).
    """
    names = _var_names(data, var_names)
    if ARVIZ_1:  # pragma: no cover
        _save_collection(az.plot_rank(data, var_names=names, backend="matplotlib"), path)
        return path
    fig, axes = _figure(_num_panels(data, names), 1, 6.0, 2.0)
    with _quiet_arviz_plotting():
        az.plot_rank(data, var_names=names, ax=axes.ravel(), show=False)
    fig.tight_layout()
    fig.savefig(path)
    return path
