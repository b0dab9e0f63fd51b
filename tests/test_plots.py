"""Tests for pib_bayes.plots: every plot is written to a file, nothing is left open or shown."""

from __future__ import annotations

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn

from pib_bayes import plots
from pib_bayes.diagnostics import to_arviz
from pib_bayes.posterior import Posterior
from pib_bayes.uncertainty import (
    classification_uncertainty,
    expected_calibration_error,
    regression_uncertainty,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(path) -> tuple[int, int]:
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.std() > 0  # not a blank canvas
    return img.shape[:2]


@pytest.fixture
def post() -> Posterior:
    g = torch.Generator().manual_seed(0)
    stats = {"energy": torch.randn(3, 40, generator=g), "loss": torch.rand(3, 40, generator=g),
             "iiw": torch.rand(3, 40, generator=g).double(),
             "iiw_layer0": torch.rand(3, 40, generator=g).double()}
    draws = {"weight": torch.randn(3, 40, 1, 2, generator=g), "bias": torch.randn(3, 40, 1, generator=g)}
    return Posterior(draws, stats, {"task": "regression", "noise_std": 0.5, "num_warmup": 100, "thin": 2},
                     model=nn.Linear(2, 1))


def test_trace_and_rank_plots_of_scalar_summaries(post, tmp_path):
    x, y = torch.randn(20, 2), torch.randn(20, 1)
    out = plots.plot_trace(post, tmp_path / "trace.png", data=(x, y), probe_x=x[:2])
    assert out == str(tmp_path / "trace.png")
    h_all, _ = _png(out)
    # one row per quantity: energy, loss, iiw, iiw_layer0, log_lik, pred[0], pred[1] and 3 weights
    h_two, _ = _png(plots.plot_trace(post, tmp_path / "t2.png", quantities=["energy", "log_lik"],
                                     data=(x, y)))
    assert h_all > 3 * h_two
    _png(plots.plot_rank(post, tmp_path / "rank.png", quantities=["energy", "weight[0,1]"]))
    _png(plots.plot_trace(post, tmp_path / "proj.png", quantities=["proj[0]"], max_weights=1))
    assert plt.get_fignums() == []  # nothing left open in pyplot


def test_trace_plot_of_arviz_data(post, tmp_path):
    idata = to_arviz(post)
    _png(plots.plot_trace(idata, tmp_path / "t.png", quantities=["bias"]))
    _png(plots.plot_rank(idata, tmp_path / "r.png"))
    with pytest.raises(ValueError, match="quantities: unknown"):
        plots.plot_rank(idata, tmp_path / "r.png", quantities=["nope"])


def test_energy_plot_has_a_panel_per_iiw_statistic(post, tmp_path):
    h_three, _ = _png(plots.plot_energy(post, tmp_path / "e.png"))
    for k in ("iiw", "iiw_layer0"):
        del post.sample_stats[k]
    h_one, _ = _png(plots.plot_energy(post, tmp_path / "e1.png"))
    assert h_three == pytest.approx(3 * h_one, rel=0.02)
    empty = Posterior({"w": torch.zeros(1, 4, 1)}, {"loss": torch.zeros(1, 4)}, {})
    with pytest.raises(ValueError, match="energy"):
        plots.plot_energy(empty, tmp_path / "none.png")


def test_reliability_and_regression_band(tmp_path):
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(5, 200, 3, generator=g), -1)
    y = torch.randint(0, 3, (200,), generator=g)
    _png(plots.plot_reliability(classification_uncertainty(probs, y), tmp_path / "rel.png"))
    _, rel = expected_calibration_error(probs, y, num_bins=5)
    _png(plots.plot_reliability(rel, tmp_path / "rel5.png"))
    with pytest.raises(ValueError, match="labels"):
        plots.plot_reliability(classification_uncertainty(probs), tmp_path / "x.png")
    x = torch.linspace(-2, 2, 30)
    f = x[None, :] * (1 + 0.1 * torch.randn(50, 1, generator=g))
    u = regression_uncertainty(f, 2 * x, noise_std=0.3)
    _png(plots.plot_regression_band(x, u, tmp_path / "band.png", y=2 * x))
    _png(plots.plot_regression_band(x, u, tmp_path / "band_g.png", kind="gaussian"))
    with pytest.raises(ValueError, match="kind"):
        plots.plot_regression_band(x, u, tmp_path / "b.png", kind="hdi")
    with pytest.raises(ValueError, match="x: needs one input"):
        plots.plot_regression_band(x[:5], u, tmp_path / "b.png")
    assert plt.get_fignums() == []


def test_bad_paths_and_sources(post, tmp_path):
    with pytest.raises(ValueError, match="path: directory"):
        plots.plot_energy(post, tmp_path / "missing" / "e.png")
    with pytest.raises(TypeError, match="source"):
        plots.plot_trace({"a": 1}, tmp_path / "t.png")
