"""Issue 19: nothing read from a data file runs code; recorded paths stay inside the run directory;
file headers, data files and run directories fail with one clear error; atomic writes are safe
under concurrency."""

from __future__ import annotations

import json
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
num_chains = 2
num_warmup = 5
num_draws = 4
batch_size = 16
checkpoint_every = 0
"""




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


NETS = """
from torch import nn
CALLS = []
def make(input_dim, output_dim, width=3):
    CALLS.append(width)
    return nn.Sequential(nn.Linear(input_dim, width), nn.Tanh(), nn.Linear(width, output_dim))
"""


def test_a_factory_next_to_the_config_is_found_and_a_run_dir_needs_trust_code(tmp_path, monkeypatch, capsys):
    """model.factory resolves relative to the config file (no PYTHONPATH); predict of the run
    directory refuses it without --trust-code and uses it with the flag."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "h19a_nets.py").write_text(NETS)
    (proj / "run.toml").write_text(TINY.format(source="spirals").replace(
        "hidden = [4]", 'factory = "h19a_nets:make"\n[model.kwargs]\nwidth = 5'))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither the working directory nor PYTHONPATH holds h19a_nets
    monkeypatch.delitem(__import__("sys").modules, "h19a_nets", raising=False)
    out = tmp_path / "r"
    assert main(["sample", "--config", str(proj / "run.toml"), "--output", str(out), "--quiet"]) == EXIT_OK
    assert str(proj) not in __import__("sys").path  # the folder is searched only while importing
    capsys.readouterr()
    assert main(["predict", str(out), "--quiet", "--json"]) == EXIT_USAGE
    err = json.loads(capsys.readouterr().out)
    assert err["key"] == "model.factory" and "h19a_nets:make" in err["error"]
    assert main(["predict", str(out), "--quiet", "--json", "--trust-code"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["n"] == 12


def test_a_builtin_factory_needs_no_trust_code(tmp_path, capsys):
    (tmp_path / "run.toml").write_text(TINY.format(source="spirals").replace(
        "hidden = [4]", 'factory = "pib_bayes.config:build_mlp"\n[model.kwargs]\nhidden = [3]'))
    out = tmp_path / "r"
    code = main(["sample", "--config", str(tmp_path / "run.toml"), "--output", str(out), "--quiet"])
    assert code == EXIT_OK
    capsys.readouterr()
    assert main(["predict", str(out), "--quiet", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["n"] == 12


@pytest.mark.parametrize("source", ["/etc/passwd.csv", "../outside.npz", "link.npz"])
def test_recorded_paths_cannot_escape_the_run_directory(run, tmp_path, capsys, source):
    import numpy as np

    np.savez(tmp_path / "outside.npz", x=np.zeros((20, 2), np.float32), y=np.arange(20) % 3)
    evil = _copy_run(run, tmp_path / "evil", resolved__source=source, resolved__base_dir="/")
    (evil / "link.npz").symlink_to(tmp_path / "outside.npz")  # a symbolic link out is caught too
    capsys.readouterr()
    assert main(["predict", str(evil), "--quiet", "--json"]) == EXIT_USAGE
    err = json.loads(capsys.readouterr().out)
    assert err["key"] == "resolved.source" and "outside the run directory" in err["error"], err


def test_data_inside_the_run_directory_is_read_without_trust(run, tmp_path, capsys):
    import numpy as np

    x = np.random.default_rng(0).normal(size=(30, 2)).astype(np.float32)
    evil = _copy_run(run, tmp_path / "r", resolved__source="data/d.npz", data__source="data/d.npz")
    (evil / "data").mkdir()
    np.savez(evil / "data" / "d.npz", x=x, y=np.arange(30) % 3)
    capsys.readouterr()
    assert main(["predict", str(evil), "--quiet", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["input"] == "the run's held-out test split"


@pytest.mark.parametrize("edit, key", [
    ({"model__hidden": [10**12]}, "model.hidden"),
    ({"model__activation": "os.system"}, "model.activation"),
    ({"run__seed": "0; rm -rf"}, "run.seed"),
    ({"resolved__input_dim": -1}, "resolved.input_dim"),
    ({"resolved__task": "exec"}, "resolved.task"),
    ({"resolved__feature_mean": [1.0]}, "resolved.feature_mean"),
    ({"data__x_key": ["x"]}, "data.x_key"),
])
def test_a_tampered_config_json_is_one_clear_error(run, tmp_path, capsys, edit, key):
    evil = _copy_run(run, tmp_path / "evil", **edit)
    capsys.readouterr()
    assert main(["diagnose", str(evil), "--quiet", "--json", "--no-plots"]) == EXIT_USAGE
    err = json.loads(capsys.readouterr().out)
    assert err["key"] == key and "config.json" in err["error"], err


def test_a_config_json_that_is_not_json_or_deeply_nested(run, tmp_path, capsys):
    import shutil

    evil = tmp_path / "evil"
    shutil.copytree(run, evil)
    for text in ("[" * 100000, "\xff\xfe garbage", "[1, 2]"):
        (evil / "config.json").write_text(text, errors="surrogateescape")
        capsys.readouterr()
        assert main(["predict", str(evil), "--quiet", "--json"]) == EXIT_USAGE
        assert json.loads(capsys.readouterr().out)["key"] == "RUN_DIR"


# ------------------------------------------------------------------------- io: headers and atomic writes
def _pib(header: bytes, body: bytes = b"") -> bytes:
    from pib_bayes.io import MAGIC

    return MAGIC + header + b"\n" + body


@pytest.mark.parametrize("header, match", [
    (b"[" * 2000 + b"]" * 2000, "corrupt header"),
    (b"[" * 100000 + b"]" * 100000, "oversized header"),
    (b'{"kind": "posterior", "format_version": "1", "sha256": "00", "size": 0}', "format_version must be an"),
    (b'{"kind": "posterior", "format_version": true, "sha256": "0", "size": 0}', "format_version must be an"),
    (b'{"kind": "posterior", "format_version": 1, "sha256": "00", "size": "0"}', "size must be an int"),
])
def test_bad_headers_are_format_errors(tmp_path, header, match):
    import sys

    from pib_bayes import Posterior
    from pib_bayes.io import FormatError

    (tmp_path / "f.pt").write_bytes(_pib(header))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)  # a low limit: json would raise RecursionError on deep nesting
    try:
        with pytest.raises(FormatError, match=match):
            Posterior.load(tmp_path / "f.pt")
    finally:
        sys.setrecursionlimit(limit)


WRITER = """
import sys
from pib_bayes.io import atomic_write_bytes
path, tag = sys.argv[1], sys.argv[2].encode()
for i in range(300):
    atomic_write_bytes(path, tag * 20000 + str(i).encode())
print("done")
"""


def test_two_processes_writing_one_path_never_break_each_other(tmp_path):
    """Each writer only removes temporary files of dead writers: no FileNotFoundError on rename,
    and the file is always one writer's whole content."""
    import os
    import subprocess
    import sys

    target = tmp_path / "shared.bin"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), tag], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for tag in ("a", "b")]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip() == "done", err[-2000:]
    data = target.read_bytes()
    assert data[:20000] in (b"a" * 20000, b"b" * 20000) and data[20000:] == b"299"
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_dead_writers_temporary_file_is_swept_a_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    from pib_bayes.io import atomic_write_bytes, writer_tag

    host = writer_tag().rpartition(".")[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    gone = tmp_path / f".f.bin.{host}.{dead}.abc123.tmp"
    live = tmp_path / f".f.bin.{host}.{os.getppid()}.def456.tmp"  # our parent is alive
    other_host = tmp_path / ".f.bin.otherhost.1.ghi789.tmp"  # recent, on another host: kept
    for p in (gone, live, other_host):
        p.write_bytes(b"partial")
    atomic_write_bytes(tmp_path / "f.bin", b"whole")
    assert not gone.exists() and live.exists() and other_host.exists()
    assert (tmp_path / "f.bin").read_bytes() == b"whole"


# ------------------------------------------------------------------------- data files
def _bad_files(folder: Path) -> dict[str, Path]:
    import numpy as np

    files = {}
    files["binary.csv"] = folder / "binary.csv"
    files["binary.csv"].write_bytes(bytes(range(256)) * 8)
    files["nul.csv"] = folder / "nul.csv"
    files["nul.csv"].write_bytes(b"1,2,0\n3,\x00,1\n")
    files["object.npz"] = folder / "object.npz"
    np.savez(files["object.npz"], x=np.array([{"a": 1}, None] * 10, dtype=object), y=np.arange(20) % 2)
    files["strings.npz"] = folder / "strings.npz"
    np.savez(files["strings.npz"], x=np.array(["a"] * 20), y=np.arange(20) % 2)
    files["notzip.npz"] = folder / "notzip.npz"
    files["notzip.npz"].write_bytes(b"PK\x03\x04 not really a zip")
    files["empty.npz"] = folder / "empty.npz"
    np.savez(files["empty.npz"], x=np.zeros((0, 2)), y=np.zeros(0))
    files["scalar.npz"] = folder / "scalar.npz"
    np.savez(files["scalar.npz"], x=np.float64(1.0), y=np.float64(0.0))
    return files


@pytest.mark.parametrize("name", ["binary.csv", "nul.csv", "object.npz", "strings.npz", "notzip.npz",
                                  "empty.npz", "scalar.npz"])
def test_unreadable_data_files_are_one_clear_error_naming_the_file(tmp_path, capsys, name):
    path = _bad_files(tmp_path)[name]
    (tmp_path / "run.toml").write_text(TINY.format(source=str(path)))
    capsys.readouterr()
    code = main(["sample", "--config", str(tmp_path / "run.toml"), "--output", str(tmp_path / "o"),
                 "--quiet", "--json"])
    err = json.loads(capsys.readouterr().out)
    assert code == EXIT_USAGE and err["key"] == "data.source" and str(path) in err["error"], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["binary.csv", "nul.csv", "object.npz", "strings.npz", "notzip.npz"])
def test_unreadable_predict_inputs_are_one_clear_error_naming_the_file(run, tmp_path, capsys, name):
    path = _bad_files(tmp_path)[name]
    capsys.readouterr()
    code = main(["predict", str(run), "--input", str(path), "--quiet", "--json",
                 "--output", str(tmp_path / "p.csv")])
    err = json.loads(capsys.readouterr().out)
    assert code == EXIT_USAGE and err["key"] == "--input" and str(path) in err["error"], err


# ------------------------------------------------------------------------- run directories
def _dead_pid() -> str:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()


def test_stale_staging_directories_are_removed_live_ones_kept(tmp_path):
    import os

    from pib_bayes.cli import _StagedDir
    from pib_bayes.io import writer_tag

    host = writer_tag().rpartition(".")[0]
    dead = tmp_path / f".r.partial-{host}.{_dead_pid()}-abc"
    live = tmp_path / f".r.partial-{host}.{os.getppid()}-def"
    for d in (dead, live):
        d.mkdir()
        (d / "posterior.pt").write_bytes(b"half")
    with _StagedDir(tmp_path / "r", overwrite=False) as tmp:
        (tmp / "x").write_text("new")
    assert not dead.exists() and live.exists() and (tmp_path / "r" / "x").read_text() == "new"


def test_overwrite_never_loses_the_old_run(tmp_path, monkeypatch):
    import os

    from pib_bayes import cli
    from pib_bayes.io import writer_tag

    target = tmp_path / "r"
    target.mkdir()
    (target / "x").write_text("old")
    # the new run fails while being written: the old one is untouched
    with pytest.raises(RuntimeError), cli._StagedDir(target, overwrite=True) as tmp:
        (tmp / "x").write_text("new")
        raise RuntimeError("killed")
    assert (target / "x").read_text() == "old"
    # without an atomic swap, a failing second rename puts the old one back
    monkeypatch.setattr(cli, "_exchange", lambda a, b: False)
    real, calls = os.replace, []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError("disk gone")
        return real(a, b)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError), cli._StagedDir(target, overwrite=True) as tmp:
        (tmp / "x").write_text("new")
    monkeypatch.setattr(os, "replace", real)
    assert (target / "x").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    # a writer killed between the two renames left the old run aside: the next run restores it
    host = writer_tag().rpartition(".")[0]
    os.replace(target, tmp_path / f".r.old-{host}.{_dead_pid()}")
    cli._StagedDir(target, overwrite=True)._sweep()
    assert (target / "x").read_text() == "old"
    # and a successful overwrite (two renames, then the atomic swap) replaces it, leaving nothing else
    for content in ("new", "newer"):
        with cli._StagedDir(target, overwrite=True) as tmp:
            (tmp / "x").write_text(content)
        assert (target / "x").read_text() == content
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
        monkeypatch.undo()


def test_atomic_swap_is_used_on_linux(tmp_path):
    from pib_bayes.cli import _exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    (b / "f").write_text("b")
    assert _exchange(a, b) and (a / "f").read_text() == "b" and (b / "f").read_text() == "a"


@pytest.mark.parametrize("make", ["file", "readonly"])
def test_an_output_directory_that_cannot_be_created_exits_2(tmp_path, capsys, make):
    import os

    if make == "file":
        (tmp_path / "blocker").write_text("a file, not a folder")
        out = tmp_path / "blocker" / "run"
    else:
        if os.geteuid() == 0:
            out = Path("/proc/1/run")  # root may write anywhere but here
        else:
            (tmp_path / "ro").mkdir(mode=0o500)
            out = tmp_path / "ro" / "run"
    (tmp_path / "run.toml").write_text(TINY.format(source="spirals"))
    capsys.readouterr()
    code = main(["sample", "--config", str(tmp_path / "run.toml"), "--output", str(out), "--quiet", "--json"])
    err = json.loads(capsys.readouterr().out)
    assert code == EXIT_USAGE and err["key"] == "output.dir" and "cannot create" in err["error"], err


def test_run_files_linked_from_outside_are_not_followed(run, tmp_path, capsys):
    import shutil

    evil = tmp_path / "evil"
    shutil.copytree(run, evil)
    shutil.move(evil / "posterior.pt", tmp_path / "elsewhere.pt")
    (evil / "posterior.pt").symlink_to(tmp_path / "elsewhere.pt")
    capsys.readouterr()
    assert main(["predict", str(evil), "--quiet", "--json"]) == EXIT_USAGE
    err = json.loads(capsys.readouterr().out)
    assert err["key"] == "RUN_DIR" and "outside the run directory" in err["error"]
    assert main(["predict", str(evil), "--quiet", "--json", "--trust-code"]) == EXIT_OK


def test_a_posterior_whose_metadata_is_deeply_nested_is_a_format_error(tmp_path):
    import sys

    from pib_bayes import Posterior
    from pib_bayes.io import FormatError, save_payload

    payload = {"draws": {"w": torch.zeros(1, 2, 3)}, "sample_stats": {}, "fixed": {},
               "diverged": torch.zeros(1, dtype=torch.bool), "divergence_step": torch.full((1,), -1),
               "metadata_json": "[" * 100000 + "]" * 100000}
    save_payload(tmp_path / "p.pt", "posterior", 1, payload)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(500)
    try:
        with pytest.raises(FormatError, match="incomplete posterior payload"):
            Posterior.load(tmp_path / "p.pt")
    finally:
        sys.setrecursionlimit(limit)


# ------------------------------------------------------------------------- fuzz of config.json
def _bad_json_values():
    from hypothesis import strategies as st

    from pib_bayes.config import SCHEMA

    text = st.text("abcxyz_:./ ", max_size=8)
    wrong = {
        "int": st.one_of(st.floats(allow_nan=False).filter(lambda v: v != int(v) if abs(v) < 1e300 else True),
                         text, st.booleans(), st.lists(st.integers(0, 3), max_size=2)),
        "float": st.one_of(text, st.booleans(), st.lists(st.floats(0, 1), max_size=2)),
        "bool": st.one_of(st.integers(), text),
        "str": st.one_of(st.integers(), st.booleans(), st.lists(text, max_size=2),
                         st.dictionaries(text, text, max_size=1)),
        "str_or_int": st.one_of(st.floats(allow_nan=False), st.booleans(),
                                st.lists(st.integers(), max_size=2)),
        "int_list": st.one_of(st.integers(), text,
                              st.lists(st.integers(max_value=0), min_size=1, max_size=2)),
        "table": st.one_of(st.integers(), text, st.lists(st.integers(), max_size=2)),
    }
    fields = [(s, k, f) for s, fs in SCHEMA.items() for k, f in fs.items() if s != "output"]
    schema_cases = st.sampled_from(fields).flatmap(
        lambda skf: st.tuples(st.just(f"{skf[0]}.{skf[1]}"), wrong[skf[2].kind]))
    resolved = st.one_of(
        st.tuples(st.sampled_from(["resolved.input_dim", "resolved.output_dim"]),
                  st.one_of(st.integers(max_value=0), text, st.floats(), st.booleans())),
        st.tuples(st.just("resolved.task"), st.one_of(text, st.integers())),
        st.tuples(st.just("resolved.feature_mean"), st.one_of(st.lists(st.floats(0, 1), max_size=1), text)),
        st.tuples(st.just("resolved.source"), st.one_of(st.integers(), st.just(""), st.just("/etc/hosts.csv"),
                                                        st.just("../../x.npz"))),
    )
    return st.one_of(schema_cases, resolved)


def test_generated_bad_config_json_values_exit_2_and_run_nothing(run, tmp_path_factory):
    """Hypothesis: one field of a run directory's config.json replaced by a wrong value (always
    with a recorded factory of os:system next to it, which must never run)."""
    import contextlib
    import io
    import shutil

    from hypothesis import given, settings

    root = tmp_path_factory.mktemp("fuzzjson")
    marker = root / "MARKER"
    base = json.loads((run / "config.json").read_text())

    @settings(max_examples=60, deadline=None)
    @given(case=_bad_json_values())
    def check(case):
        key, value = case
        section, name = key.split(".", 1)
        cfg = json.loads(json.dumps(base))
        cfg[section][name] = value
        d = root / "r"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(run, d)
        (d / "config.json").write_text(json.dumps(cfg))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["predict", str(d), "--quiet", "--json", "--output", str(root / "p.csv")])
        assert "Traceback" not in err.getvalue() and code == EXIT_USAGE, (key, value, code, err.getvalue())
        got = json.loads(out.getvalue())
        assert got["key"] == key, (key, value, got)
        # and with the exploit recorded beside it: refused before anything runs
        cfg["model"].update(factory="os:system", kwargs={"command": f"touch {marker}"})
        (d / "config.json").write_text(json.dumps(cfg))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(["predict", str(d), "--quiet", "--json"]) == EXIT_USAGE
        assert not marker.exists()

    check()
