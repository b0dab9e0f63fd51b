"""The newcomer paths of issue #22: progress over every step, --data, --plots, printed numbers that
never contradict their thresholds, thread caps, and the hint against exporting a large net to ArviZ."""

from __future__ import annotations

import json
import re
import textwrap
import warnings

import numpy as np
import pytest
import torch

import pib_bayes.driver.recorder as driver
from pib_bayes import Posterior, _threads, sample
from pib_bayes.bounds import Bound, BoundsReport
from pib_bayes.cli import EXIT_OK, EXIT_USAGE, main
from pib_bayes.diagnostics import format_above, to_arviz
from pib_bayes.samplers.schedules import Cyclical

TINY = """
[model]
hidden = [8]
activation = "tanh"
[data]
source = "spirals"
n = 150
test_fraction = 0.2
[pretrain]
steps = 30
[sampler]
step_size = 2e-4
[run]
num_chains = 2
num_warmup = 10
num_draws = 8
thin = 1
batch_size = 32
"""




# ------------------------------------------------------------------------------- progress bar
class _Bar:
    """Records what the driver does with its tqdm bar."""

    made: list[_Bar] = []

    def __init__(self, total=None, initial=0, desc="", **kwargs):
        self.total, self.n, self.descs = total, initial, [desc]
        _Bar.made.append(self)

    def update(self, k=1):
        self.n += k

    def set_description(self, desc, refresh=True):
        self.descs.append(desc)

    def close(self):
        pass


@pytest.mark.parametrize("schedule", [1e-3, Cyclical(1e-3, cycle_length=10, exploration_fraction=0.5)],
                         ids=["constant", "cyclical"])
def test_progress_counts_warmup_and_sampling_steps(monkeypatch, schedule):
    _Bar.made = []
    monkeypatch.setattr(driver, "tqdm", _Bar)
    steps = []
    x, y = torch.randn(32, 2), torch.randn(32, 1)
    model = torch.nn.Linear(2, 1)
    sampler = "csgld" if isinstance(schedule, Cyclical) else "sgld"
    sample(model, "gaussian", (x, y), beta=1 / 32, sampler=sampler, step_size=schedule, num_chains=2,
           num_warmup=15, num_draws=6, thin=2, progress=True,
           stat_fns={"t": lambda p: steps.append(1) or 0.0})
    (bar,) = _Bar.made
    assert len(steps) == 2 * 6  # every kept draw of both chains
    # the bar ends exactly at its total: its ETA was right through warm-up and sampling
    assert bar.total is not None and bar.n == bar.total > 15
    assert bar.descs == ["2 chains warm-up", "2 chains sampling"]
    # would catch the old bar, which counted kept draws only
    assert bar.total != 6


# ------------------------------------------------------------------------------ --data, --plots
def test_sample_data_flag_overrides_the_config_and_plots_are_written(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 3)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    (tmp_path / "run.toml").write_text(textwrap.dedent(TINY))
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--config", "run.toml", "--output", "a", "--data", "mine.npz", "--plots",
                 "--json"]) == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert out["data"]["n_train"] + out["data"]["n_test"] == 90 and "mine.npz" in out["data"]["description"]
    assert out["plots"] == ["trace.png", "rank.png", "energy.png"]
    assert all((tmp_path / "a" / name).stat().st_size > 1000 for name in out["plots"])
    # without the flags: the config's spirals (150 examples), no plots
    assert main(["sample", "--config", "run.toml", "--output", "b", "--json"]) == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert out["data"]["n_train"] + out["data"]["n_test"] == 150 and "plots" not in out
    assert not (tmp_path / "b" / "trace.png").exists()


def test_data_flag_names_itself_when_the_path_is_missing(tmp_path, monkeypatch, capsys):
    (tmp_path / "run.toml").write_text(textwrap.dedent(TINY))
    monkeypatch.chdir(tmp_path)
    code = main(["sample", "--config", "run.toml", "--output", "a", "--data", "nope.npz", "--json"])
    assert code == EXIT_USAGE
    err = json.loads(capsys.readouterr().out)
    assert err["key"] == "--data" and "nope.npz" in err["error"]
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------ numbers against thresholds
@pytest.mark.parametrize("value", [1.0101, 1.01001, 1.010000001, 1.2, 1.0099, 1.01, 0.999])
def test_rhat_never_prints_as_the_threshold_when_above(value):
    shown = format_above(value, 1.01)
    assert (float(shown) > 1.01) == (value > 1.01), shown
    assert len(shown.split(".")[1]) >= 3


def test_rhat_printed_at_three_decimals_would_contradict():  # the bug format_above fixes
    assert float(f"{1.0104:.3f}") <= 1.01 < 1.0104


def _report(bounds):
    metrics = dict.fromkeys(("bma_error", "bma_nll", "gibbs_error", "gibbs_nll", "gibbs_bce"), 0.1)
    return BoundsReport(train=metrics, heldout=None, kl=3.0, kl_method="given", iiw=[],
                        bounds={"0-1 error": bounds}, delta=0.05, n=100, n_prior=None, p_min=1e-4, notes=[])


def test_bounds_table_vacuity_agrees_with_the_printed_value():
    bounds = [Bound("kl-inverse", 1 - 1e-9, 0.5, 1.0, 50.0, 100, 0.05, ""),
              Bound("catoni", 1.0, 0.5, 1.0, 50.0, 100, 0.05, ""),
              Bound("mcallester", 0.99996, 0.5, 1.0, 50.0, 100, 0.05, ""),
              Bound("mcallester", 0.61234, 0.5, 1.0, 5.0, 100, 0.05, "")]
    rows = [line for line in str(_report(bounds)).splitlines() if line.startswith("| 0-1 error")]
    assert len(rows) == 4
    for b, row in zip(bounds, rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        printed, trivial, flag = float(cells[3]), float(cells[4]), cells[6]
        assert (printed >= trivial) == b.vacuous == (flag == "**yes**"), row
    assert rows[0].split("|")[4].strip() != "1.0000"  # the old table printed 1.0000 ... "no" here
    assert "(VACUOUS)" in str(bounds[1]) and "(VACUOUS)" not in str(bounds[0])


# ------------------------------------------------------------------------------------- threads
def test_cap_threads_lowers_to_the_usable_cores(monkeypatch):
    monkeypatch.setattr(_threads, "available_cores", lambda: 1)
    torch.set_num_threads(2)
    assert _threads.cap_threads() == 1 == torch.get_num_threads()
    monkeypatch.setattr(_threads, "available_cores", lambda: 4)
    assert _threads.cap_threads() == 1  # never raises the count


def test_sampling_warns_once_when_threads_exceed_cores(monkeypatch):
    monkeypatch.setattr(_threads, "available_cores", lambda: 1)
    monkeypatch.setattr(_threads, "_warned", False)
    torch.set_num_threads(2)
    x, y = torch.randn(16, 2), torch.randn(16, 1)
    with pytest.warns(RuntimeWarning, match="torch uses 2 threads but this process may run on 1"):
        sample(torch.nn.Linear(2, 1), "gaussian", (x, y), beta=1 / 16, num_warmup=2, num_draws=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        sample(torch.nn.Linear(2, 1), "gaussian", (x, y), beta=1 / 16, num_warmup=2, num_draws=2)
    torch.set_num_threads(1)
    monkeypatch.setattr(_threads, "_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # threads <= cores: silent
        sample(torch.nn.Linear(2, 1), "gaussian", (x, y), beta=1 / 16, num_warmup=2, num_draws=2)


def test_importing_the_library_leaves_threads_alone():
    import subprocess
    import sys

    code = "import torch; n = torch.get_num_threads(); import pib_bayes; print(n == torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr


# --------------------------------------------------------------------------------- ArviZ export
def test_to_arviz_of_a_large_net_hints_at_projections():
    big = Posterior({"w": torch.zeros(2, 4, 10_001)}, {"energy": torch.zeros(2, 4)}, {"task": "regression"})
    with pytest.warns(UserWarning, match=re.escape("params='projections'")):
        to_arviz(big)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_arviz(big, params="projections", num_projections=2)
        small = Posterior({"w": torch.zeros(2, 4, 100)}, {"energy": torch.zeros(2, 4)},
                          {"task": "regression"})
        to_arviz(small)


# ------------------------------------------------------------------- predict without vmap (LSTM)
class _Recurrent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(1, 4, batch_first=True)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def test_predict_runs_draw_by_draw_when_vmap_cannot_batch_the_model():
    torch.manual_seed(0)
    model = _Recurrent()
    x, y = torch.randn(16, 5, 1), torch.randn(16, 1)
    post = sample(model, "gaussian", (x, y), beta=1 / 16, step_size=1e-5, num_chains=2, num_warmup=3,
                  num_draws=3, seed=0)
    assert post.metadata["chain_method"] == "sequential"
    pred = post.predict(x)
    assert pred.per_draw.shape == (6, 16, 1)
    # the same numbers as one explicit forward per draw
    from torch.func import functional_call
    for i, (c, d) in enumerate([(c, d) for c in range(2) for d in range(3)]):
        params = {k: v[c, d] for k, v in post.draws.items()}
        torch.testing.assert_close(pred.per_draw[i], functional_call(model, params, (x,)))
    with pytest.raises(ValueError, match="^x: the model cannot be evaluated"):
        post.predict(torch.randn(16, 5, 3))  # wrong feature size: still one clear error
