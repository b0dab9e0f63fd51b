"""pib_bayes.config: the run-file schema, its validation, and the model and data built from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pib_bayes.config import (
    ConfigError,
    build_model,
    load_config,
    load_data,
    mlp_num_params,
    validate_config,
)


def _minimal(**data):
    return {"data": {"source": "spirals", **data}, "output": {"dir": "runs/x"}}


def test_defaults_fill_every_section():
    cfg = validate_config(_minimal())
    assert cfg["sampler"]["name"] == "sgld" and cfg["run"]["chains"] == 4
    assert cfg["model"]["hidden"] == [64, 64] and cfg["model"]["activation"] == "tanh"
    assert cfg["data"]["test_fraction"] == 0.2 and cfg["output"]["dir"] == "runs/x"
    assert validate_config(_minimal(), output_dir="elsewhere")["output"]["dir"] == "elsewhere"


def test_errors_name_the_dotted_key_and_suggest_the_closest():
    with pytest.raises(ConfigError, match="^samplr: unknown section; did you mean 'sampler'") as err:
        validate_config({**_minimal(), "samplr": {}})
    assert err.value.key == "samplr" and isinstance(err.value, ValueError)
    with pytest.raises(ConfigError, match=r"^run\.chians: .*did you mean 'chains'"):
        validate_config({**_minimal(), "run": {"chians": 2}})
    with pytest.raises(ConfigError, match=r"^run\.chains: "):
        validate_config({**_minimal(), "run": {"chains": 0}})
    with pytest.raises(ConfigError, match=r"^sampler\.name: "):
        validate_config({**_minimal(), "sampler": {"name": "hmc"}})
    with pytest.raises(ConfigError, match=r"^data\.source: "):
        validate_config({"data": {}, "output": {"dir": "d"}})
    with pytest.raises(ConfigError, match="^model: must be a table"):
        validate_config({**_minimal(), "model": 3})


def test_load_config_reads_toml_and_reports_bad_files(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\nsource = "regression"\n[output]\ndir = "out"\n[run]\nchains = 2\n')
    cfg = load_config(path)
    assert cfg["data"]["source"] == "regression" and cfg["run"]["chains"] == 2
    (tmp_path / "bad.toml").write_text("[data\n")
    with pytest.raises(ConfigError, match="^<toml>: "):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="^--config: no file"):
        load_config(tmp_path / "missing.toml")


def test_build_model_mlp_and_factory():
    net = build_model({"hidden": [5, 4], "activation": "relu"}, 3, 2, seed=1)
    assert [type(m) for m in net] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert sum(p.numel() for p in net.parameters()) == mlp_num_params(3, 2, [5, 4]) == 4 * 5 + 6 * 4 + 5 * 2
    again = build_model({"hidden": [5, 4], "activation": "relu"}, 3, 2, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), again.parameters()))  # seeded
    linear = build_model({"factory": "pib_bayes.config:build_mlp", "kwargs": {"hidden": []}}, 3, 2)
    assert isinstance(linear[0], nn.Linear) and linear[0].out_features == 2  # dims passed by name
    with pytest.raises(ConfigError, match=r"^model\.kwargs: "):
        build_model({"factory": "pib_bayes.config:build_mlp", "kwargs": {"nope": 1}}, 3, 2)


def test_load_data_splits_reproducibly_and_standardizes_on_the_training_split(tmp_path):
    cfg = validate_config(_minimal(n=200, test_fraction=0.25, standardize=True))["data"]
    a, b = load_data(cfg), load_data(cfg)
    assert len(a.y_train) == 150 and len(a.y_test) == 50 and a.task == "classification"
    assert torch.equal(a.x_test, b.x_test) and a.output_dim == 3 and a.input_dim == 2
    torch.testing.assert_close(a.x_train.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    np.savez(tmp_path / "d.npz", x=x, y=(x[:, 0] > 20).astype(np.int64))
    cfg = validate_config(_minimal(source=str(tmp_path / "d.npz"), test_fraction=0.5))["data"]
    ds = load_data(cfg)
    assert ds.task == "classification" and len(ds.y_train) == 10
    rows = {tuple(r.tolist()) for r in torch.cat([ds.x_train, ds.x_test])}
    assert rows == {tuple(r) for r in x.tolist()}  # a split: every example exactly once
    with pytest.raises(ConfigError, match=r"^data\.test_fraction: "):
        load_data(validate_config(_minimal(n=20, test_fraction=0.95))["data"])
