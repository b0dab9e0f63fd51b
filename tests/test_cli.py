"""The pib-bayes command line: every subcommand end to end on tiny settings, config checks, exit codes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pib_bayes import Posterior, cli
from pib_bayes.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, iiw_peak, main
from pib_bayes.config import ConfigError, build_model, load_data, validate_config
from pib_bayes.mnist import write_idx

TINY = """
[model]
hidden = [8]
activation = "tanh"
[data]
source = "{source}"
n = 150
test_fraction = 0.2
[pretrain]
steps = 30
[posterior]
temperature = 1.0
[sampler]
step_size = 2e-4
[run]
num_chains = 2
num_warmup = 10
num_draws = 8
thin = 1
batch_size = 32
"""




def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pib_bayes", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def _write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# ------------------------------------------------------------------------- end to end (subprocess)
def test_sample_diagnose_predict_end_to_end(tmp_path, capsys):
    _write(tmp_path, TINY.format(source="spirals"))
    r = _cli("sample", "--config", "run.toml", "--output", "runs/a", "--json", cwd=tmp_path)
    assert r.returncode == EXIT_OK, r.stderr
    out = json.loads(r.stdout)
    run = tmp_path / "runs" / "a"
    assert sorted(p.name for p in run.iterdir()) == [
        "config.json",
        "config.toml",
        "posterior.pt",
        "summary.json",
    ]
    assert out["chains"] == 2 and out["draws_per_chain"] == 8 and out["data"]["n_train"] == 120
    assert out["beta"] == pytest.approx(1 / 120)
    assert 0 <= out["posterior_predictive"]["test"]["accuracy"] <= 1
    assert not list((tmp_path / "runs").glob(".*partial*"))  # no staging directory left behind
    cfg = json.loads((run / "config.json").read_text())
    model = build_model(cfg["model"], 2, 3)
    post = Posterior.load(run / "posterior.pt", model=model)
    assert post.num_chains == 2 and post.num_draws == 8 and post.metadata["beta"] == pytest.approx(1 / 120)

    r = _cli("diagnose", "runs/a", "--json", cwd=tmp_path)
    assert r.returncode == EXIT_OK, r.stderr
    diag = json.loads(r.stdout)
    assert {"energy", "loss", "log_lik"} <= set(diag["table"])
    # the generalization report: measured train/held-out gap next to each bound (issue 11)
    bounds = diag["bounds"]
    assert bounds is not None and bounds["n"] == 120
    assert "kl-inverse" in json.dumps(bounds) and "vacuous" in json.dumps(bounds)
    assert all(np.isfinite(v["ess_bulk"]) for v in diag["table"].values())
    for name in ("diagnostics.csv", "diagnostics.json", "trace.png", "rank.png", "energy.png"):
        assert (run / name).stat().st_size > 0, name
    assert (run / "trace.png").read_bytes()[:4] == b"\x89PNG"
    # --strict turns "not converged" (8 draws cannot reach ESS 200) into exit code 4
    assert main(["diagnose", str(run), "--strict", "--no-plots", "--quiet"]) == 4
    r = _cli("predict", "runs/a", "--json", "--output", "pred.csv", cwd=tmp_path)
    assert r.returncode == EXIT_OK, r.stderr
    pred = json.loads(r.stdout)
    assert pred["n"] == 30 and pred["metrics"]["accuracy"] == pytest.approx(
        out["posterior_predictive"]["test"]["accuracy"]
    )
    rows = list(csv.DictReader((tmp_path / "pred.csv").open()))
    assert len(rows) == 30
    probs = np.array([[float(r[f"p{k}"]) for k in range(3)] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    ent = np.array([float(r["entropy"]) for r in rows])
    split = np.array([float(r["aleatoric"]) + float(r["epistemic_mi"]) for r in rows])
    np.testing.assert_allclose(ent, split, atol=1e-5)

    # an existing run directory is refused, naming the key and the fix
    assert (
        main(["sample", "--config", str(tmp_path / "run.toml"), "--output", str(run), "--quiet"])
        == EXIT_USAGE
    )
    err = capsys.readouterr().err
    assert "output.dir" in err and "--overwrite" in err


def test_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    _write(tmp_path, TINY.format(source="spirals").replace("step_size", "stepsize"))
    r = _cli("sample", "--config", "run.toml", "--output", "o", cwd=tmp_path)
    assert r.returncode == EXIT_USAGE
    assert "sampler.stepsize" in r.stderr and "step_size" in r.stderr
    _write(tmp_path, TINY.format(source="spirals").replace("num_chains = 2", 'num_chains = "two"'))
    capsys.readouterr()
    assert (
        main(["sample", "--config", str(tmp_path / "run.toml"), "--output", str(tmp_path / "o"), "--json"])
        == 2
    )
    err = json.loads(capsys.readouterr().out)
    assert err["key"] == "run.num_chains" and err["exit_code"] == EXIT_USAGE
    assert "num_chains = 4" in err["error"]
    assert not (tmp_path / "o").exists()


def test_demo_quick_json(tmp_path):
    r = _cli("demo", "--quick", "--json", cwd=tmp_path)
    assert r.returncode == EXIT_OK, r.stderr
    res = json.loads(r.stdout)
    assert res["chains"] == 4 and 0 <= res["posterior_predictive"]["accuracy"] <= 1


def test_iiw_subcommand(tmp_path):
    _write(tmp_path, TINY.format(source="spirals") + "\n[iiw]\nepochs = 4\nlr = 0.1\nbatch_size = 32\n")
    r = _cli("iiw", "--config", "run.toml", "--output", "iiwrun", "--json", cwd=tmp_path)
    assert r.returncode == EXIT_OK, r.stderr
    res = json.loads(r.stdout)
    rows = list(csv.DictReader((tmp_path / "iiwrun" / "iiw.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4]
    assert float(rows[0]["iiw"]) == pytest.approx(0.0, abs=1e-12)  # Δθ = 0 before training
    assert float(rows[-1]["iiw"]) > 0
    assert (tmp_path / "iiwrun" / "iiw.png").read_bytes()[:4] == b"\x89PNG"
    assert 0 <= res["peak"]["index"] <= 4


# ----------------------------------------------------------------------------- in-process checks
def _cfg(**sections):
    raw = {"data": {"source": "spirals", "n": 100}, "output": {"dir": "x"}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return raw


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"sampelr": {}}, "sampelr"),
        ({"run": {"num_draws": 0}}, "run.num_draws"),
        ({"run": {"num_chains": 1.5}}, "run.num_chains"),
        ({"posterior": {"beta": -1.0}}, "posterior.beta"),
        ({"posterior": {"beta": 0.1, "temperature": 1.0}}, "posterior.beta"),
        ({"sampler": {"name": "nuts"}}, "sampler.name"),
        ({"sampler": {"name": "csgld", "schedule": "constant"}}, "sampler.schedule"),
        ({"model": {"activation": "swish"}}, "model.activation"),
        ({"model": {"hidden": [16, 0]}}, "model.hidden"),
        ({"model": {"factory": "nocolon"}}, "model.factory"),
        ({"data": {"test_fraction": 1.0}}, "data.test_fraction"),
        ({"output": {"overwrite": "yes"}}, "output.overwrite"),
        ({"sampler": {"name": "sghmc", "kwargs": {"frict": 0.1}}}, "sampler.kwargs.frict"),
        ({"sampler": {"name": "sghmc", "kwargs": {"friction": 2.0}}}, "sampler.kwargs"),
    ],
)
def test_validation_names_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        validate_config(_cfg(**raw))
    assert err.value.key == key and str(err.value).startswith(key)


def test_missing_source_and_defaults():
    with pytest.raises(ConfigError, match="data.source: is required"):
        validate_config({"run": {"num_chains": 2}})
    cfg = validate_config(_cfg(sampler={"name": "csgld"}))
    assert cfg["sampler"]["schedule"] == "cyclical" and cfg["run"]["num_chains"] == 4
    assert cfg["posterior"]["beta"] is None and cfg["posterior"]["temperature"] is None


def test_data_sources_npz_csv_idx(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = load_data(
        validate_config(_cfg(data={"source": str(tmp_path / "d.npz"), "test_fraction": 0.25}))["data"]
    )
    assert d.task == "classification" and d.input_dim == 3 and d.output_dim == 2 and len(d.y_test) == 10
    # the split is a permutation of the file's rows
    got = torch.cat([d.x_train, d.x_test]).numpy()
    np.testing.assert_allclose(np.sort(got[:, 0]), np.sort(x[:, 0]))

    with open(tmp_path / "r.csv", "w") as f:
        f.write("a,target,b\n")
        for i in range(30):
            f.write(f"{i / 10},{0.5 * i + 0.25},{-i}\n")
    cfg = validate_config(
        _cfg(data={"source": str(tmp_path / "r.csv"), "target": "target", "standardize": True})
    )
    d = load_data(cfg["data"])
    assert d.task == "regression" and d.input_dim == 2 and d.y_train.shape[1] == 1
    assert abs(float(d.x_train.mean())) < 1e-5
    with pytest.raises(ConfigError, match="data.target"):
        load_data(validate_config(_cfg(data={"source": str(tmp_path / "r.csv"), "target": "nope"}))["data"])

    idx = tmp_path / "mnist"
    idx.mkdir()
    write_idx(idx / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (20, 28, 28)))
    write_idx(idx / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    d = load_data(validate_config(_cfg(data={"source": str(idx), "test_fraction": 0.5}))["data"])
    assert d.input_dim == 784 and d.output_dim == 10 and len(d.y_train) == 10


def test_factory_model_gets_data_dimensions(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        textwrap.dedent("""
        from torch import nn
        def make(input_dim, output_dim, width=5):
            return nn.Sequential(nn.Linear(input_dim, width), nn.ReLU(), nn.Linear(width, output_dim))
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = validate_config(_cfg(model={"factory": "mynets:make", "kwargs": {"width": 7}}))
    model = build_model(cfg["model"], 2, 3)
    assert model[0].in_features == 2 and model[0].out_features == 7 and model[2].out_features == 3
    with pytest.raises(ConfigError, match="model.factory"):
        build_model(validate_config(_cfg(model={"factory": "mynets:nothing"}))["model"], 2, 3)
    with pytest.raises(ConfigError, match="model.kwargs"):
        build_model(
            validate_config(_cfg(model={"factory": "mynets:make", "kwargs": {"depth": 2}}))["model"], 2, 3
        )


def test_regression_run_and_features_only_predict(tmp_path, capsys):
    cfg = TINY.format(source="regression").replace("[posterior]", "[posterior]\nnoise_std = 0.3")
    _write(tmp_path, cfg)
    out = tmp_path / "reg"
    assert (
        main(["sample", "--config", str(tmp_path / "run.toml"), "--output", str(out), "--quiet"]) == EXIT_OK
    )
    np.savetxt(tmp_path / "grid.csv", np.linspace(-2, 2, 11)[:, None], delimiter=",")
    capsys.readouterr()
    assert main(["predict", str(out), "--input", str(tmp_path / "grid.csv"), "--json"]) == EXIT_OK
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 11 and "metrics" not in res
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    lo, mean, hi = (np.array([float(r[k]) for r in rows]) for k in ("lower_90", "mean", "upper_90"))
    assert np.all(lo < mean) and np.all(mean < hi)
    # the Gaussian loss's noise is part of the predictive variance: sd >= noise_std
    assert np.all(np.array([float(r["sd"]) for r in rows]) >= 0.3 - 1e-6)


def test_a_config_with_the_old_key_names_runs_with_warnings_and_the_same_draws(tmp_path):
    """run.chains/warmup/draws and posterior.prior_std/prior_mean are deprecated names of
    run.num_chains/num_warmup/num_draws and prior.std/mean (issue 17): same run, one FutureWarning per
    old key."""
    new = TINY.format(source="spirals").replace("[posterior]",
                                                "[prior]\nstd = 0.5\nmean = \"zeros\"\n[posterior]")
    old = (TINY.format(source="spirals").replace("num_chains = 2", "chains = 2")
           .replace("num_warmup = 10", "warmup = 10")
           .replace("num_draws = 8", "draws = 8")
           .replace("[posterior]", "[posterior]\nprior_std = 0.5\nprior_mean = \"zeros\""))
    draws = {}
    for name, text in (("new", new), ("old", old)):
        _write(tmp_path, text, f"{name}.toml")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = main(["sample", "--config", str(tmp_path / f"{name}.toml"), "--output",
                         str(tmp_path / name), "--quiet"])
        assert code == EXIT_OK
        renamed = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)
                   and "is deprecated" in str(w.message)]
        assert len(renamed) == (5 if name == "old" else 0), renamed
        draws[name] = Posterior.load(tmp_path / name / "posterior.pt").draws
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["prior"] == {"std": 0.5, "mean": "zeros"} and cfg["run"]["num_draws"] == 8
    assert draws["old"].keys() == draws["new"].keys()
    for k in draws["new"]:
        assert torch.equal(draws["old"][k], draws["new"][k])
    # "would catch the bug": an old key that was ignored (prior std 1, mean init) changes the draws
    _write(tmp_path, TINY.format(source="spirals"), "default.toml")
    assert main(["sample", "--config", str(tmp_path / "default.toml"), "--output", str(tmp_path / "default"),
                 "--quiet"]) == EXIT_OK
    other = Posterior.load(tmp_path / "default" / "posterior.pt").draws
    assert any(not torch.equal(other[k], draws["new"][k]) for k in other)


def test_a_run_directory_written_with_the_old_key_names_still_predicts_the_same(tmp_path, capsys):
    """The config.json of a run directory from before the renames loads with one FutureWarning per old
    key and gives the same predictions and bounds as the directory with the new names."""
    _write(tmp_path, TINY.format(source="spirals").replace("[posterior]", "[prior]\nstd = 0.5\n[posterior]"))
    new_dir, old_dir = tmp_path / "new", tmp_path / "old"
    assert main(["sample", "--config", str(tmp_path / "run.toml"), "--output", str(new_dir), "--quiet"]) == 0
    import shutil

    shutil.copytree(new_dir, old_dir)
    cfg = json.loads((old_dir / "config.json").read_text())
    run, prior = cfg["run"], cfg.pop("prior")
    for old, new in (("chains", "num_chains"), ("warmup", "num_warmup"), ("draws", "num_draws")):
        run[old] = run.pop(new)
    cfg["posterior"].update(prior_std=prior["std"], prior_mean=prior["mean"])
    (old_dir / "config.json").write_text(json.dumps(cfg))
    def diagnose(run_dir: Path) -> str:
        capsys.readouterr()
        assert main(["diagnose", str(run_dir), "--json", "--no-plots"]) == 0
        return capsys.readouterr().out.replace(str(run_dir), "RUN")

    results = {}
    for name, run_dir in (("new", new_dir), ("old", old_dir)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["predict", str(run_dir), "--json", "--output", str(tmp_path / f"{name}.csv")]) == 0
            report = diagnose(run_dir)
        renamed = [w for w in caught if issubclass(w.category, FutureWarning)
                   and "is deprecated" in str(w.message)]
        assert len(renamed) == (10 if name == "old" else 0)  # 5 old keys, read by predict and by diagnose
        results[name] = ((tmp_path / f"{name}.csv").read_text(), report)
    assert results["old"] == results["new"]
    # "would catch the bug": with the old prior_std dropped (std 1, the default) the bounds differ
    del cfg["posterior"]["prior_std"]
    (old_dir / "config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert diagnose(old_dir) != results["new"][1]


def test_failed_run_leaves_nothing_and_all_diverged_exits_3(tmp_path, capsys):
    _write(tmp_path, TINY.format(source="spirals") + "\n[sampler.kwargs]\nfriction = 0.5\n")
    out = tmp_path / "fail"
    # friction is not an SGLD setting: refused when the config is read, before anything is written
    assert (
        main(["sample", "--config", str(tmp_path / "run.toml"), "--output", str(out), "--quiet"])
        == EXIT_USAGE
    )
    assert "sampler.kwargs.friction" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".fail*"))
    _write(tmp_path, TINY.format(source="spirals").replace("step_size = 2e-4", "step_size = 1e6"))
    code = main(["sample", "--config", str(tmp_path / "run.toml"), "--output", str(out), "--quiet"])
    assert code == EXIT_FAILED
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged_chains"] == [0, 1]


def test_iiw_peak_definition():
    # smoothed (window 3, edges repeat the end values): .33 1 2.33 3 2.67 1.67 1
    p = iiw_peak([0.0, 1.0, 2.0, 4.0, 3.0, 1.0, 1.0], smooth=3)
    assert p["index"] == 3 and p["interior"] and p["value"] == 4.0
    assert p["relative_fall"] == pytest.approx((3 - 1) / 3) and p["smoothed_peak"] == pytest.approx(3.0)
    assert not iiw_peak([0, 1, 2, 3], smooth=1)["interior"]
    q = iiw_peak([0, 5, 1, 3], smooth=1, steps=[0.0, 0.5, 1.0, 1.5])
    assert q["epoch"] == 0.5 and q["fall_to_min"] == pytest.approx(0.8)
    assert q["relative_fall"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="curve"):
        iiw_peak([0.0, float("nan")])


def test_run_dir_finds_relative_data_from_another_directory(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    _write(tmp_path, TINY.format(source="d.npz"))
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--config", "run.toml", "--output", "r", "--quiet"]) == EXIT_OK
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    capsys.readouterr()
    # the data lie outside the run directory: read only when the user vouches for the run (issue 19)
    assert main(["predict", "../r", "--json", "--output", "p.csv"]) == EXIT_USAGE
    assert json.loads(capsys.readouterr().out)["key"] == "resolved.source"
    assert main(["predict", "../r", "--json", "--output", "p.csv", "--trust-code"]) == EXIT_OK
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 12 and 0 <= res["metrics"]["accuracy"] <= 1


def test_sample_under_torchrun_shares_the_chains_and_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m pib_bayes sample` gives the single-process run's draws."""
    import shutil

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cfg = tmp_path / "run.toml"
    text = textwrap.dedent("""
        [model]
        hidden = [8]
        [data]
        source = "spirals"
        n = 200
        [run]
        num_chains = 4
        num_warmup = 20
        num_draws = 10
        chain_method = "sequential"
        [output]
        dir = "OUT"
    """)
    cfg.write_text(text.replace("OUT", str(tmp_path / "single")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "pib_bayes", "sample", "--config", str(cfg), "--quiet"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    cfg.write_text(text.replace("OUT", str(tmp_path / "ranks")))
    ranks = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "pib_bayes", "sample",
                            "--config", str(cfg), "--quiet", "--json"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    summary = json.loads((tmp_path / "ranks" / "summary.json").read_text())
    assert summary["distributed"]["mode"] == "chains" and summary["chains"] == 4
    a = Posterior.load(tmp_path / "single" / "posterior.pt")
    b = Posterior.load(tmp_path / "ranks" / "posterior.pt")
    for k in a.draws:
        assert torch.equal(a.draws[k], b.draws[k]), k


def test_sample_killed_then_resumed_gives_the_uninterrupted_draws(tmp_path):
    import signal
    import time

    text = (TINY.format(source="spirals").replace("num_warmup = 10", "num_warmup = 4000")
            + "checkpoint_every = 50\n")
    _write(tmp_path, text)
    r = _cli("sample", "--config", "run.toml", "--output", "runs/ref", "--quiet", cwd=tmp_path)
    assert r.returncode == EXIT_OK, r.stderr
    assert not (tmp_path / "runs" / "ref.checkpoint").exists()  # removed once the run is written
    assert not (tmp_path / "runs" / ".ref.checkpoint.segments").exists()  # its draws' segments too
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    ckpt = tmp_path / "runs" / "b.checkpoint"
    proc = subprocess.Popen([sys.executable, "-m", "pib_bayes", "sample", "--config", "run.toml", "--output",
                             "runs/b", "--quiet"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert ckpt.exists(), "the run wrote no checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "runs" / "b").exists()  # nothing half-written in place of the run directory
    r = _cli("sample", "--config", "run.toml", "--output", "runs/b", "--quiet", "--resume", cwd=tmp_path)
    assert r.returncode == EXIT_OK, r.stderr
    a = Posterior.load(tmp_path / "runs" / "ref" / "posterior.pt")
    b = Posterior.load(tmp_path / "runs" / "b" / "posterior.pt")
    for k in a.draws:
        assert torch.equal(a.draws[k], b.draws[k]), k


def test_a_run_directory_and_its_files_get_the_modes_a_plain_mkdir_and_open_give(tmp_path):
    """The run directory is staged in a private mkdtemp folder (0700); what a colleague finds is
    0777/0666 less the umask (here 0o022: 0755 and 0644), not the private modes."""
    import stat as st

    old = os.umask(0o022)
    try:
        with cli._StagedDir(tmp_path / "run", overwrite=False) as d:
            (d / "x.txt").write_text("x")
            cli._atomic_write_text(d / "y.txt", "y")
    finally:
        os.umask(old)
    assert st.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o755
    assert st.S_IMODE(os.stat(tmp_path / "run" / "y.txt").st_mode) == 0o644
