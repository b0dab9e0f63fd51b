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
    assert cfg["sampler"]["name"] == "sgld" and cfg["run"]["num_chains"] == 4
    assert cfg["model"]["hidden"] == [64, 64] and cfg["model"]["activation"] == "tanh"
    assert cfg["data"]["test_fraction"] == 0.2 and cfg["output"]["dir"] == "runs/x"
    assert validate_config(_minimal(), output_dir="elsewhere")["output"]["dir"] == "elsewhere"


def test_errors_name_the_dotted_key_and_suggest_the_closest():
    with pytest.raises(ConfigError, match="^samplr: unknown section; did you mean 'sampler'") as err:
        validate_config({**_minimal(), "samplr": {}})
    assert err.value.key == "samplr" and isinstance(err.value, ValueError)
    with pytest.raises(ConfigError, match=r"^run\.num_chians: .*did you mean 'num_chains'"):
        validate_config({**_minimal(), "run": {"num_chians": 2}})
    with pytest.raises(ConfigError, match=r"^run\.num_chains: "):
        validate_config({**_minimal(), "run": {"num_chains": 0}})
    with pytest.raises(ConfigError, match=r"^sampler\.name: "):
        validate_config({**_minimal(), "sampler": {"name": "hmc"}})
    with pytest.raises(ConfigError, match=r"^data\.source: "):
        validate_config({"data": {}, "output": {"dir": "d"}})
    with pytest.raises(ConfigError, match="^model: must be a table"):
        validate_config({**_minimal(), "model": 3})


def test_load_config_reads_toml_and_reports_bad_files(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\nsource = "regression"\n[output]\ndir = "out"\n[run]\nnum_chains = 2\n')
    cfg = load_config(path)
    assert cfg["data"]["source"] == "regression" and cfg["run"]["num_chains"] == 2
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


def _weights(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.mark.parametrize("model_cfg", [{"hidden": [5, 4], "activation": "relu"},
                                       {"factory": "pib_bayes.config:build_mlp", "kwargs": {"hidden": [3]}}])
def test_build_model_leaves_the_global_rng_alone_and_its_seed_decides(model_cfg):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    net = build_model(model_cfg, 3, 2, seed=1)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's global RNG is untouched
    expected = torch.randn(3)  # what the caller draws next: as if build_model had not run
    torch.manual_seed(123)
    assert torch.equal(torch.randn(3), expected)
    torch.randn(100)  # another global state: the same seed still gives the same weights
    assert torch.equal(_weights(build_model(model_cfg, 3, 2, seed=1)), _weights(net))
    # the would-catch twin: the seed is what decides (another seed, other weights)
    assert not torch.equal(_weights(build_model(model_cfg, 3, 2, seed=2)), _weights(net))


def test_build_model_gives_the_weights_torch_manual_seed_gave():
    # the weights are those of torch.manual_seed(seed) followed by the build (no stream changed)
    torch.manual_seed(5)
    ref = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    built = build_model({"hidden": [4], "activation": "tanh"}, 3, 2, seed=5)
    assert torch.equal(_weights(built), _weights(ref))


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


# --------------------------------------------------------------------------- renamed keys (issue 17)
OLD_KEYS = [  # (old section, old key, value, new section, new key)
    ("run", "chains", 3, "run", "num_chains"),
    ("run", "warmup", 7, "run", "num_warmup"),
    ("run", "draws", 9, "run", "num_draws"),
    ("posterior", "prior_std", 0.3, "prior", "std"),
    ("posterior", "prior_mean", "zeros", "prior", "mean"),
]


def test_the_renamed_keys_table_is_the_one_tested():
    from pib_bayes.config import RENAMED_KEYS, SCHEMA

    assert RENAMED_KEYS == {(s, k): (ns, nk) for s, k, _, ns, nk in OLD_KEYS}
    for (section, key), (new_section, new_key) in RENAMED_KEYS.items():
        assert key not in SCHEMA[section] and new_key in SCHEMA[new_section]


@pytest.mark.parametrize(("section", "key", "value", "new_section", "new_key"), OLD_KEYS)
def test_an_old_key_loads_with_a_warning_naming_the_new_key(section, key, value, new_section, new_key):
    new = validate_config({**_minimal(), new_section: {new_key: value}})
    message = rf"'{section}\.{key}' is deprecated, use '{new_section}\.{new_key}'"
    with pytest.warns(FutureWarning, match=message):
        old = validate_config({**_minimal(), section: {key: value}})
    assert old == new and new[new_section][new_key] == value
    # "would catch the bug": the default differs from the value, so an ignored old key would show
    assert validate_config(_minimal())[new_section][new_key] != value


def test_an_old_key_with_its_new_name_is_an_error():
    with pytest.raises(ConfigError, match=r"^run\.draws: is the deprecated name of run\.num_draws"):
        validate_config({**_minimal(), "run": {"draws": 3, "num_draws": 3}})
    with pytest.raises(ConfigError, match=r"^posterior\.prior_std: .*keep only prior\.std"):
        validate_config({**_minimal(), "posterior": {"prior_std": 1.0}, "prior": {"std": 2.0}})


def test_an_old_key_with_a_bad_value_names_the_new_key():
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match=r"^run\.num_draws: must be >= 1"):
        validate_config({**_minimal(), "run": {"draws": 0}})


def test_load_config_reads_a_file_with_the_old_keys(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text('[data]\nsource = "spirals"\n[posterior]\nprior_std = 0.5\n[run]\nwarmup = 3\ndraws = 4\n'
                    '[output]\ndir = "runs/x"\n')
    with pytest.warns(FutureWarning) as caught:
        cfg = load_config(path)
    assert len(caught) == 3  # one per old key
    assert (cfg["run"]["num_warmup"], cfg["run"]["num_draws"], cfg["prior"]["std"]) == (3, 4, 0.5)
