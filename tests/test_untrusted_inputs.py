"""Issue 19: nothing read from a data file runs code; recorded paths stay inside the run directory;
file headers, data files and run directories fail with one clear error; atomic writes are safe
under concurrency."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from pib_bayes.cli import EXIT_OK, EXIT_USAGE, main

TINY = """
[model]
hidden = [4]
[data]
source = "{source}"
n = 60
[posterior]
temperature = 1.0
[run]
chains = 2
warmup = 5
draws = 4
batch_size = 16
checkpoint_every = 0
"""


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run directory of built-in data, sampled in process."""
    root = tmp_path_factory.mktemp("run")
    (root / "run.toml").write_text(TINY.format(source="spirals"))
    code = main(["sample", "--config", str(root / "run.toml"), "--output", str(root / "r"), "--quiet"])
    assert code == EXIT_OK
    return root / "r"


def _copy_run(run: Path, dest: Path, **edit) -> Path:
    """A copy of ``run`` whose config.json has the dotted keys in ``edit`` replaced."""
    import shutil

    shutil.copytree(run, dest)
    cfg = json.loads((dest / "config.json").read_text())
    for dotted, value in edit.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


# ------------------------------------------------------------------------- code from a run directory
@pytest.mark.parametrize("command", ["predict", "diagnose"])
def test_a_recorded_factory_never_runs_without_trust_code(run, tmp_path, monkeypatch, capsys, command):
    """The exploit of issue 19: config.json names os:system with a shell command as kwargs."""
    marker = tmp_path / "MARKER"
    evil = _copy_run(run, tmp_path / "evil", model__factory="os:system",
                     model__kwargs={"command": f"touch {marker}"})
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = main([command, str(evil), "--quiet", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == EXIT_USAGE and out["key"] == "model.factory", out
    assert "--trust-code" in out["error"] and "os:system" in out["error"]
    assert not marker.exists()
