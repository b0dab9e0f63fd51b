"""The pre-registered reproduction configs (examples/configs/*.toml, issue #20 item 4): each parses, fixes
the 7k/1k/2k train/prior/test split of the MNIST t10k file, lists its seeds (>= 5 per IIW sweep, >= 10 paired
seeds for PIB vs SGD), its two kinds of arm and the statistics to report."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.toml"))
EXPECTED = {"iiw_activations", "iiw_depth", "iiw_generalization", "iiw_label_noise", "pib_vs_sgd",
            "beta_frontier"}


def test_every_reproduction_has_a_config():
    assert {p.stem for p in CONFIGS} == EXPECTED


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_complete(path):
    cfg = tomllib.loads(path.read_text())
    assert cfg["name"] == path.stem
    assert (Path(__file__).resolve().parents[1] / cfg["script"]).is_file()
    seeds = cfg["seeds"]
    assert len(set(seeds)) == len(seeds) and all(isinstance(s, int) for s in seeds)
    assert len(seeds) >= (10 if cfg["name"] == "pib_vs_sgd" else 5)
    assert {k: cfg["data"][k] for k in ("file", "train", "prior", "test")} == {
        "file": "t10k", "train": 7000, "prior": 1000, "test": 2000}
    assert cfg["data"]["split_seed"] == 20261201  # one fixed split for every reproduction
    assert len(cfg["arms"]) >= 2
    stats = cfg["statistics"]
    assert "minimal_detectable_effect" in stats
    assert any(k in stats for k in ("across_seeds", "tests"))
