"""Fuzz of the CLI's TOML run files (issue 19): every bad config exits 2 with one message naming
the config key; never an "internal error" traceback (exit 1), never a run that goes ahead.

Cases: hypothesis draws a key of :data:`pib_bayes.config.SCHEMA` and a value that is wrong by
construction for its kind (a wrong type, a number below the minimum, an unknown choice, NaN/Inf),
or an unknown key or section; plus hand-listed cases from issue 19 (sizes far beyond memory,
distributed without torchrun, an output directory that cannot be created, a diverging
pretraining, ...). ``cli.main`` runs in process.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import string
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pib_bayes.cli import EXIT_USAGE, main
from pib_bayes.config import SCHEMA

BASE: dict[str, dict[str, Any]] = {
    "model": {"hidden": [4]},
    "data": {"source": "spirals", "n": 60},
    "posterior": {"temperature": 1.0},
    "run": {"num_chains": 2, "num_warmup": 3, "num_draws": 3, "batch_size": 16, "checkpoint_every": 0},
}




def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # ASCII-only strings below: JSON escapes are TOML escapes
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def _toml(raw: dict[str, Any]) -> str:
    lines = []
    for section, body in raw.items():
        if not isinstance(body, dict):
            lines.append(f"{section} = {_toml_value(body)}")
    for section, body in raw.items():
        if isinstance(body, dict):
            lines.append(f"[{section}]")
            lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def _merge(edit: dict[str, Any]) -> dict[str, Any]:
    raw = {k: dict(v) for k, v in BASE.items()}
    for section, body in edit.items():
        if isinstance(body, dict) and isinstance(raw.get(section), dict):
            raw[section].update(body)
        else:
            raw[section] = body
    return raw


def _run(text: str, extra: tuple[str, ...] = (), output: str | None = None,
         command: str = "sample") -> tuple[int, dict, str]:
    """``pib-bayes sample`` (or ``command``) in process: (exit code, the --json object, stderr)."""
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "run.toml"
        cfg.write_text(text)
        out, err = io.StringIO(), io.StringIO()
        args = [command, "--config", str(cfg), "--output", output or str(Path(d) / "out"), "--quiet",
                "--json", *extra]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args)
        made = (Path(d) / "out").exists()
    assert not made or code == 0, "a failed run left its output directory"
    try:
        result = json.loads(out.getvalue())
    except json.JSONDecodeError:
        result = {"raw": out.getvalue()}
    return code, result, err.getvalue()


def _check(code: int, result: dict, err: str, key: str) -> None:
    assert "Traceback" not in err and code != 1, f"internal error for {key}:\n{err[-3000:]}"
    assert code == EXIT_USAGE, (key, code, result)
    assert result.get("key") == key and result["error"].startswith(key), (key, result)


# ------------------------------------------------------------------------- generated cases
TEXT = st.text(string.ascii_letters + string.digits + "_-. ", max_size=12)
WRONG_TYPE = {
    "int": st.one_of(st.floats(allow_nan=False, allow_infinity=False), TEXT, st.booleans(),
                     st.lists(st.integers(0, 9), max_size=2)),
    "float": st.one_of(TEXT, st.booleans(), st.lists(st.floats(0, 1), max_size=2),
                       st.just(math.nan), st.just(math.inf), st.just(-math.inf)),
    "bool": st.one_of(st.integers(), TEXT, st.floats(allow_nan=False)),
    "str": st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(TEXT, max_size=2)),
    "str_or_int": st.one_of(st.floats(allow_nan=False), st.booleans(), st.lists(st.integers(), max_size=2)),
    "int_list": st.one_of(st.integers(), TEXT,
                          st.lists(st.integers(max_value=0), min_size=1, max_size=3),
                          st.lists(st.one_of(TEXT, st.floats(allow_nan=False)), min_size=1, max_size=3)),
    "table": st.one_of(st.integers(), TEXT, st.lists(st.integers(), max_size=2)),
}
FIELDS = [(s, k, f) for s, fields in SCHEMA.items() for k, f in fields.items()]


@st.composite
def bad_value(draw) -> tuple[str, dict[str, Any]]:
    """(the key at fault, the config edit) with a value that is wrong by construction."""
    section, key, field = draw(st.sampled_from(FIELDS))
    options = [WRONG_TYPE[field.kind]]
    if field.minimum is not None and field.kind == "int":
        options.append(st.integers(max_value=int(field.minimum) - 1, min_value=-10**6))
    if field.minimum is not None and field.kind == "float":
        top = field.minimum - 1e-9 if not field.exclusive_min else field.minimum
        options.append(st.floats(min_value=-1e30, max_value=top, allow_nan=False))
    if field.choices is not None:
        options.append(TEXT.filter(lambda v: v.lower() not in field.choices))
    value = draw(st.one_of(*options))
    return f"{section}.{key}", {section: {key: value}}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=bad_value())
def test_a_wrong_value_exits_2_naming_its_key(bad):
    key, edit = bad
    _check(*_run(_toml(_merge(edit))), key)


IDENT = st.text(string.ascii_lowercase + "_", min_size=1, max_size=10)


@settings(max_examples=15, deadline=None)
@given(section=st.sampled_from(list(SCHEMA)), name=IDENT)
def test_an_unknown_key_exits_2_naming_it(section, name):
    if name in SCHEMA[section]:
        name = name + "_x"
    _check(*_run(_toml(_merge({section: {name: 1}}))), f"{section}.{name}")


@settings(max_examples=5, deadline=None)
@given(name=IDENT.filter(lambda n: n not in SCHEMA))
def test_an_unknown_section_exits_2_naming_it(name):
    _check(*_run(_toml(_merge({name: {"a": 1}}))), name)


# ------------------------------------------------------------------------- hand-listed cases
DEFAULT_SIZES = {"run": {"num_chains": 4, "num_draws": 200}}  # the defaults, as in the issue's reports
HAND: list[tuple[str, dict[str, Any], str]] = [
    # sizes far beyond memory: refused before allocating, naming the key
    ("hidden-1e8", {**DEFAULT_SIZES, "model": {"hidden": [100000000]}}, "run.num_draws"),
    ("hidden-1e12", {"model": {"hidden": [10**12]}}, "model.hidden"),
    ("hidden-deep-wide", {"model": {"hidden": [10**6, 10**6, 10**6]}}, "model.hidden"),
    ("chains-1e8", {"run": {"num_chains": 100000000}}, "run.num_chains"),
    ("chains-1e8-float", {"run": {"num_chains": 1e8}}, "run.num_chains"),
    ("draws-1e10", {"run": {"num_draws": 10**10}}, "run.num_draws"),
    ("draws-1e10-float", {"run": {"num_draws": 1e10}}, "run.num_draws"),
    ("data-n-1e12", {"data": {"n": 10**12}}, "data.n"),
    ("builtin-factory-huge", {"model": {"hidden": [4], "factory": "pib_bayes.config:build_mlp",
                                        "kwargs": {"hidden": [10**12]}}}, "model.hidden"),
    # distributed without torchrun (crashed inside its own error path before)
    ("distributed-data", {"run": {"distributed": "data"}}, "run.distributed"),
    ("distributed-chains", {"run": {"distributed": "chains"}}, "run.distributed"),
    # a pretraining that diverges is blamed on pretraining, not on the sampler
    ("pretrain-lr-1e30", {"pretrain": {"steps": 20, "lr": 1e30}}, "pretrain.lr"),
    # values that pass the type check but not the run
    ("test-fraction-leaves-one", {"data": {"test_fraction": 0.99}}, "data.test_fraction"),
    ("test-fraction-one", {"data": {"test_fraction": 1.0}}, "data.test_fraction"),
    ("limit-one", {"data": {"limit": 1}}, "data.test_fraction"),
    ("source-missing-file", {"data": {"source": "no/such/file.npz"}}, "data.source"),
    ("source-unsupported", {"data": {"source": "run.toml"}}, "data.source"),
    ("beta-and-temperature", {"posterior": {"beta": 0.1, "temperature": 1.0}}, "posterior.beta"),
    ("gaussian-on-labels", {"posterior": {"loss": "gaussian"}}, "posterior.loss"),
    ("cross-entropy-on-regression",
     {"data": {"source": "regression"}, "posterior": {"loss": "cross_entropy"}}, "posterior.loss"),
    ("csgld-constant", {"sampler": {"name": "csgld", "schedule": "constant"}}, "sampler.schedule"),
    ("gamma-above-one", {"sampler": {"gamma": 1.5}}, "sampler.gamma"),
    ("exploration-one", {"sampler": {"exploration_fraction": 1.0}}, "sampler.exploration_fraction"),
    ("min-step-above-step",
     {"sampler": {"schedule": "cosine", "min_step_size": 1.0}}, "sampler.min_step_size"),
    ("sghmc-friction-negative",
     {"sampler": {"name": "sghmc", "kwargs": {"friction": -1.0}}}, "sampler.kwargs"),
    ("sgld-unknown-kwarg", {"sampler": {"kwargs": {"friction": 0.1}}}, "sampler.kwargs.friction"),
    ("factory-no-colon", {"model": {"factory": "nocolon"}}, "model.factory"),
    ("factory-missing-module", {"model": {"factory": "no_such_module_h19a:make"}}, "model.factory"),
    ("factory-missing-attr", {"model": {"factory": "math:no_such"}}, "model.factory"),
    ("factory-not-callable", {"model": {"factory": "math:pi"}}, "model.factory"),
    ("factory-not-a-module", {"model": {"factory": "builtins:dict", "kwargs": {"a": 1}}}, "model.factory"),
    ("factory-bad-kwargs", {"model": {"factory": "pib_bayes.config:build_mlp", "kwargs": {"depth": 2}}},
     "model.kwargs"),
    ("kwargs-without-factory", {"model": {"kwargs": {"width": 3}}}, "model.kwargs"),
    ("section-not-table", {"run": 3}, "run"),
    ("source-missing", {"data": {"source": None}}, "data.source"),
    ("hidden-negative", {"model": {"hidden": [8, -1]}}, "model.hidden"),
    ("activation-unknown", {"model": {"activation": "swish"}}, "model.activation"),
    ("checkpoint-negative", {"run": {"checkpoint_every": -5}}, "run.checkpoint_every"),
]


@pytest.mark.parametrize("name, edit, key", HAND, ids=[h[0] for h in HAND])
def test_issue_cases_exit_2_naming_the_key(name, edit, key):
    raw = _merge(edit)
    if raw["data"].get("source") is None:
        del raw["data"]["source"]
    _check(*_run(_toml(raw)), key)


IIW_CASES = [
    ({"iiw": {"epochs": 0}}, "iiw.epochs"),
    ({"iiw": {"optimizer": "rmsprop"}}, "iiw.optimizer"),
    ({"iiw": {"lr": -1.0}}, "iiw.lr"),
    ({"iiw": {"batch_size": 0}}, "iiw.batch_size"),
    ({"iiw": {"fisher_examples": "many"}}, "iiw.fisher_examples"),
    ({"iiw": {"momentum": math.nan}}, "iiw.momentum"),
    ({"model": {"hidden": [10**12]}}, "model.hidden"),
    ({"data": {"n": 10**12}}, "data.n"),
]


@pytest.mark.parametrize("edit, key", IIW_CASES, ids=[k for _, k in IIW_CASES])
def test_iiw_configs_exit_2_naming_the_key(edit, key):
    _check(*_run(_toml(_merge(edit)), command="iiw"), key)


def test_resume_without_checkpoints_names_the_key():
    _check(*_run(_toml(_merge({})), extra=("--resume",)), "run.checkpoint_every")


def test_an_output_directory_below_a_file_names_the_key(tmp_path):
    (tmp_path / "file").write_text("x")
    _check(*_run(_toml(_merge({})), output=str(tmp_path / "file" / "run")), "output.dir")


@pytest.mark.parametrize("text, key", [
    ("[run\nchains = 2\n", "<toml>"),
    ("", "data.source"),
    ("\x00\x01", "<toml>"),
])
def test_unreadable_toml_exits_2(text, key):
    _check(*_run(text), key)


def test_the_base_config_is_valid(tmp_path):
    """The fuzz edits one key of a config that runs: without an edit it exits 0."""
    code, result, err = _run(_toml(_merge({})), output=str(tmp_path / "ok"))
    assert code == 0, err
