"""Run configuration for the command line: schema, validation, and building model and data from it.

A run is described by a TOML file (read with :mod:`tomllib`) with these sections; every key is
optional except where marked, and an unknown key is an error (with the closest valid key suggested):

.. code-block:: toml

    [model]                     # an MLP ...
    hidden = [64, 64]           # hidden layer widths ([] = a linear model)
    activation = "tanh"         # linear | tanh | relu | sigmoid | gelu
    # factory = "mypkg.nets:make_net"   # ... or any nn.Module from an import path
    # [model.kwargs]                    # keyword arguments of the factory

    [data]
    source = "spirals"          # REQUIRED: spirals | regression | an MNIST IDX directory | x.npz | x.csv
    n = 1000                    # examples generated (spirals, regression)
    test_fraction = 0.2         # held-out share, split with `seed`
    limit = 0                   # keep the first `limit` examples (0 = all)
    task = "auto"               # auto | classification | regression
    target = -1                 # csv: label column (index or header name); npz: see x_key/y_key
    standardize = false         # z-score the features with the training split's mean/std

    [pretrain]                  # optional point estimate the chains start from
    steps = 0                   # Adam steps on the training split (0 = start at the initialisation)
    lr = 0.01
    batch_size = 128

    [prior]                     # the Gaussian prior N(theta_0, sigma_0^2 I): GaussianPrior.from_module
    std = 1.0                   # sigma_0
    mean = "init"               # theta_0: init (the random initialisation, before any pretraining) | zeros

    [posterior]
    beta = 0.001                # PIB trade-off; give beta OR temperature (beta = T/n);
    temperature = 1.0           #   default temperature = 1, i.e. beta = 1/n, the Bayesian posterior
    loss = "auto"               # auto | cross_entropy | gaussian
    noise_std = 1.0             # s of the Gaussian loss (regression)

    [sampler]
    name = "sgld"               # sgld | psgld | sghmc | csgld | sgnht
    step_size = 1e-4            # h (SGLD/pSGLD/SGNHT), learning rate eta (SGHMC), h_0 (schedules)
    schedule = "constant"       # constant | polynomial | cosine | cyclical
    gamma = 0.55                # polynomial: h_t = step_size * (b + t)^-gamma * b^gamma  (h_0 = step_size)
    b = 1.0
    min_step_size = 0.0         # cosine
    cycle_length = 200          # cyclical (csgld)
    exploration_fraction = 0.5
    # [sampler.kwargs]          # passed to the kernel builder, e.g. friction = 0.1 (sghmc)

    [run]
    num_chains = 4              # the names of pib_bayes.sample's arguments
    num_warmup = 1000
    num_draws = 200
    thin = 1
    batch_size = 128            # 0 = full batch
    seed = 0
    chain_method = "auto"       # auto | vectorized | sequential

    [output]
    dir = "runs/example"        # REQUIRED (or --output on the command line)
    overwrite = false

Every validation error is a :class:`ConfigError` whose message starts with the dotted key.

Renamed keys (:data:`RENAMED_KEYS`) still load, with a ``FutureWarning`` naming the new key:
``run.chains`` -> ``run.num_chains``, ``run.warmup`` -> ``run.num_warmup``, ``run.draws`` ->
``run.num_draws``, ``posterior.prior_std`` -> ``prior.std``, ``posterior.prior_mean`` -> ``prior.mean``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

# available_memory: one estimate of free memory for the API and the CLI
from ._rng import seeded_global_rng
from ._validate import available_memory, is_int, is_real, warn_renamed
from .samplers.kernels import KERNELS
from .samplers.schedules import SHORTHANDS, Constant, Cosine, Cyclical, PolynomialDecay, Schedule

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "ConfigError",
    "load_config",
    "validate_config",
    "build_model",
    "load_data",
    "Dataset",
    "ACTIVATIONS",
    "BUILTIN_DATA",
    "SCHEMA",
    "BUILTIN_FACTORIES",
    "check_memory",
    "available_memory",
    "mlp_num_params",
    "RENAMED_KEYS",
]


class ConfigError(ValueError):
    """An invalid run configuration; ``key`` is the dotted config key at fault."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    "linear": None,
    "identity": None,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}
BUILTIN_DATA = ("spirals", "regression")
SAMPLERS = (*KERNELS, *SHORTHANDS)  # the kernels, and the names that stand for a kernel on a schedule
#: the config's schedule names and the schedules they build (pib_bayes.cli makes them)
SCHEDULE_CLASSES: dict[str, type[Schedule]] = {
    "constant": Constant, "polynomial": PolynomialDecay, "cosine": Cosine, "cyclical": Cyclical,
}
SCHEDULES = tuple(SCHEDULE_CLASSES)


@dataclass(frozen=True)
class Field:
    kind: str  # int, float, bool, str, str_or_int, int_list, table
    default: Any = None
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    exclusive_min: bool = False
    example: str = ""


SCHEMA: dict[str, dict[str, Field]] = {
    "model": {
        "hidden": Field("int_list", [64, 64], example="hidden = [64, 64]"),
        "activation": Field("str", "tanh", choices=tuple(ACTIVATIONS), example='activation = "tanh"'),
        "factory": Field("str", None, example='factory = "mypkg.nets:make_net"'),
        "kwargs": Field("table", {}, example="[model.kwargs]\nwidth = 32"),
    },
    "data": {
        "source": Field("str", None, example='source = "spirals"'),
        "n": Field("int", 1000, minimum=4, example="n = 1000"),
        "test_fraction": Field("float", 0.2, minimum=0.0, example="test_fraction = 0.2"),
        "limit": Field("int", 0, minimum=0, example="limit = 5000"),
        "task": Field(
            "str", "auto", choices=("auto", "classification", "regression"), example='task = "auto"'
        ),
        "target": Field("str_or_int", -1, example='target = "label"'),
        "x_key": Field("str", "x", example='x_key = "x"'),
        "y_key": Field("str", "y", example='y_key = "y"'),
        "split": Field("str", "auto", choices=("auto", "train", "t10k"), example='split = "t10k"'),
        "standardize": Field("bool", False, example="standardize = true"),
        "seed": Field("int", 0, minimum=0, example="seed = 0"),
        "noise": Field("float", None, minimum=0.0, example="noise = 0.25"),
    },
    "pretrain": {
        "steps": Field("int", 0, minimum=0, example="steps = 500"),
        "lr": Field("float", 0.01, minimum=0.0, exclusive_min=True, example="lr = 0.01"),
        "batch_size": Field("int", 128, minimum=0, example="batch_size = 128"),
    },
    "prior": {
        "std": Field("float", 1.0, minimum=0.0, exclusive_min=True, example="std = 1.0"),
        "mean": Field("str", "init", choices=("init", "zeros"), example='mean = "init"'),
    },
    "posterior": {
        "beta": Field("float", None, minimum=0.0, exclusive_min=True, example="beta = 0.001"),
        "temperature": Field("float", None, minimum=0.0, exclusive_min=True, example="temperature = 1.0"),
        "loss": Field(
            "str", "auto", choices=("auto", "cross_entropy", "gaussian"), example='loss = "gaussian"'
        ),
        "noise_std": Field("float", 1.0, minimum=0.0, exclusive_min=True, example="noise_std = 0.3"),
    },
    "sampler": {
        "name": Field("str", "sgld", choices=SAMPLERS, example='name = "sgld"'),
        "step_size": Field("float", 1e-4, minimum=0.0, exclusive_min=True, example="step_size = 1e-4"),
        "schedule": Field("str", "constant", choices=SCHEDULES, example='schedule = "constant"'),
        "gamma": Field("float", 0.55, minimum=0.0, example="gamma = 0.55"),
        "b": Field("float", 1.0, minimum=0.0, exclusive_min=True, example="b = 1.0"),
        "min_step_size": Field("float", 0.0, minimum=0.0, example="min_step_size = 0.0"),
        "cycle_length": Field("int", 200, minimum=2, example="cycle_length = 200"),
        "exploration_fraction": Field("float", 0.5, minimum=0.0, example="exploration_fraction = 0.5"),
        "kwargs": Field("table", {}, example="[sampler.kwargs]\nfriction = 0.1"),
    },
    "run": {
        "num_chains": Field("int", 4, minimum=1, example="num_chains = 4"),
        "num_warmup": Field("int", 1000, minimum=0, example="num_warmup = 1000"),
        "num_draws": Field("int", 200, minimum=1, example="num_draws = 200"),
        "thin": Field("int", 1, minimum=1, example="thin = 1"),
        "batch_size": Field("int", 128, minimum=0, example="batch_size = 128"),
        "seed": Field("int", 0, minimum=0, example="seed = 0"),
        "chain_method": Field(
            "str", "auto", choices=("auto", "vectorized", "sequential"), example='chain_method = "auto"'
        ),
        # under torchrun: "chains" splits the chains over the ranks, "data" shards the data (one
        # all-reduce of gradients per step); "none" with WORLD_SIZE > 1 means "chains"
        # steps between checkpoints of a sample run (0: none); `pib-bayes sample --resume` continues
        "checkpoint_every": Field("int", 500, minimum=0, example="checkpoint_every = 500"),
        "distributed": Field(
            "str", "none", choices=("none", "chains", "data"), example='distributed = "chains"'
        ),
    },
    "output": {
        "dir": Field("str", None, example='dir = "runs/example"'),
        "overwrite": Field("bool", False, example="overwrite = true"),
    },
    "iiw": {
        "epochs": Field("int", 20, minimum=1, example="epochs = 20"),
        "lr": Field("float", 0.05, minimum=0.0, exclusive_min=True, example="lr = 0.05"),
        "momentum": Field("float", 0.0, minimum=0.0, example="momentum = 0.9"),
        "batch_size": Field("int", 128, minimum=1, example="batch_size = 128"),
        "optimizer": Field("str", "sgd", choices=("sgd", "adam"), example='optimizer = "sgd"'),
        "fisher_examples": Field("int", 1000, minimum=1, example="fisher_examples = 1000"),
    },
}

#: Deprecated config keys -> their new ``(section, key)``; they load with a ``FutureWarning`` until 0.3.
RENAMED_KEYS: dict[tuple[str, str], tuple[str, str]] = {
    ("run", "chains"): ("run", "num_chains"),
    ("run", "warmup"): ("run", "num_warmup"),
    ("run", "draws"): ("run", "num_draws"),
    ("posterior", "prior_std"): ("prior", "std"),
    ("posterior", "prior_mean"): ("prior", "mean"),
}

_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "str_or_int": "a string or an integer",
    "int_list": "a list of integers",
    "table": "a table",
}


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}? " if close else ""


def _check_value(key: str, field: Field, value: Any) -> Any:
    bad = ConfigError(
        key,
        f"must be {_TYPE_WORDS[field.kind]}, got {value!r} ({type(value).__name__}); "
        f"write e.g. {field.example}",
    )
    if field.kind == "int":
        if not is_int(value):
            raise bad
    elif field.kind == "float":
        if not is_real(value):
            raise bad
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(key, f"must be finite, got {value!r}; write e.g. {field.example}")
    elif field.kind == "bool":
        if not isinstance(value, bool):
            raise bad
    elif field.kind == "str":
        if not isinstance(value, str):
            raise bad
        if field.choices is not None and value.lower() not in field.choices:
            raise ConfigError(
                key,
                f"unknown value {value!r}; {_suggest(value.lower(), list(field.choices))}"
                f"choose one of {list(field.choices)}",
            )
        if field.choices is not None:
            value = value.lower()
    elif field.kind == "str_or_int":
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise bad
    elif field.kind == "int_list":
        if not isinstance(value, list) or any(
            not is_int(v) or v < 1 for v in value
        ):
            raise ConfigError(
                key,
                f"must be a list of positive integers (layer widths), got {value!r}; "
                f"write e.g. {field.example}",
            )
    elif field.kind == "table":
        if not isinstance(value, dict):
            raise bad
    if field.minimum is not None and field.kind in ("int", "float"):
        if value < field.minimum or (field.exclusive_min and value == field.minimum):
            op = ">" if field.exclusive_min else ">="
            raise ConfigError(
                key, f"must be {op} {field.minimum:g}, got {value!r}; write e.g. {field.example}"
            )
    return value


def validate_config(raw: Mapping[str, Any], output_dir: str | None = None) -> dict[str, dict[str, Any]]:
    """Check a parsed TOML mapping against :data:`SCHEMA` and fill in defaults.

    Returns a nested dict with every section and key. Raises :class:`ConfigError` naming the
    first offending key (unknown sections/keys get a "did you mean" suggestion).
    ``output_dir`` (from the command line) overrides ``output.dir``.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError("<config>", "must be a TOML table")
    for section, value in raw.items():
        if section not in SCHEMA:
            raise ConfigError(
                section,
                f"unknown section; {_suggest(section, list(SCHEMA))}valid sections are {list(SCHEMA)}",
            )
        if not isinstance(value, Mapping):
            raise ConfigError(section, f"must be a table ([{section}]), got {value!r}")
    raw = _renamed_keys(raw)
    cfg: dict[str, dict[str, Any]] = {}
    for section, fields in SCHEMA.items():
        given = dict(raw.get(section, {}))
        for key in given:
            if key not in fields:
                raise ConfigError(
                    f"{section}.{key}",
                    f"unknown key; {_suggest(key, list(fields))}valid keys of [{section}] are {list(fields)}",
                )
        out = {}
        for key, field in fields.items():
            if key in given:
                out[key] = _check_value(f"{section}.{key}", field, given[key])
            else:
                out[key] = field.default.copy() if isinstance(field.default, (list, dict)) else field.default
        cfg[section] = out

    if output_dir is not None:
        cfg["output"]["dir"] = str(output_dir)
    if cfg["data"]["source"] is None:
        raise ConfigError(
            "data.source",
            'is required; write e.g. source = "spirals" (or "regression", '
            "an MNIST IDX directory, a .npz or a .csv file)",
        )
    if cfg["data"]["test_fraction"] >= 1:
        raise ConfigError(
            "data.test_fraction",
            f"must be < 1, got {cfg['data']['test_fraction']}; write e.g. test_fraction = 0.2",
        )
    post = cfg["posterior"]
    if post["beta"] is not None and post["temperature"] is not None:
        raise ConfigError(
            "posterior.beta", "give either beta or temperature (beta = temperature / n), not both"
        )
    if not 0 <= cfg["sampler"]["exploration_fraction"] < 1:
        raise ConfigError(
            "sampler.exploration_fraction", "must lie in [0, 1); write e.g. exploration_fraction = 0.5"
        )
    if cfg["sampler"]["gamma"] > 1:
        raise ConfigError(
            "sampler.gamma",
            "must lie in [0, 1] (0.5 < gamma <= 1 satisfies Robbins-Monro); write e.g. gamma = 0.55",
        )
    s = cfg["sampler"]
    if s["name"] in SHORTHANDS:  # e.g. 'csgld': SGLD on the schedule samplers.schedules names for it
        needed = next(k for k, c in SCHEDULE_CLASSES.items() if c is SHORTHANDS[s["name"]][1])
        if s["schedule"] != needed:
            if "schedule" in raw.get("sampler", {}):
                raise ConfigError("sampler.schedule", f'name = "{s["name"]}" needs schedule = "{needed}"')
            s["schedule"] = needed
    _check_sampler_kwargs(s["name"], s["kwargs"])
    if s["schedule"] == "cosine" and s["min_step_size"] > s["step_size"]:
        raise ConfigError("sampler.min_step_size", "must not exceed sampler.step_size")
    m = cfg["model"]
    if m["factory"] is not None and ":" not in m["factory"]:
        raise ConfigError("model.factory", f"must look like 'module.path:function', got {m['factory']!r}")
    if m["factory"] is None and m["kwargs"]:
        raise ConfigError(
            "model.kwargs", "only applies with model.factory; for an MLP use hidden and activation"
        )
    return cfg


def _renamed_keys(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``raw`` with every key of :data:`RENAMED_KEYS` moved to its new name (one ``FutureWarning``
    each); an old key given together with its new name is a :class:`ConfigError`."""
    out = {section: dict(value) for section, value in raw.items()}
    for (section, key), (new_section, new_key) in RENAMED_KEYS.items():
        if key not in out.get(section, {}):
            continue
        old, new = f"{section}.{key}", f"{new_section}.{new_key}"
        if new_key in out.get(new_section, {}):
            raise ConfigError(old, f"is the deprecated name of {new}, which is also given; keep only {new}")
        warn_renamed(old, new, what="the config key", stacklevel=4)
        out.setdefault(new_section, {})[new_key] = out[section].pop(key)
    return out


def _check_sampler_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """Build the kernel once so that unknown or out-of-range [sampler.kwargs] fail before any work."""
    from .samplers import build_kernel

    name = SHORTHANDS[name][0] if name in SHORTHANDS else name  # 'csgld': the SGLD kernel's settings
    valid = list(inspect.signature(KERNELS[name]).parameters)
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        hint = _suggest(unknown[0], valid) if valid else ""
        raise ConfigError(
            f"sampler.kwargs.{unknown[0]}",
            f"unknown setting for sampler {name!r}; {hint}its settings are {valid or 'none'}",
        )
    try:
        build_kernel(name, **dict(kwargs))
    except (TypeError, ValueError) as err:
        raise ConfigError("sampler.kwargs", f"{err}") from None


def load_config(path: str | os.PathLike, output_dir: str | None = None) -> dict[str, dict[str, Any]]:
    """Read and validate a TOML run file (see the module docstring for the schema)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"no file at {str(path)!r}; pass the path of a TOML run file")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("<toml>", f"{path} is not valid TOML ({err})") from None
    return validate_config(raw, output_dir)


# ------------------------------------------------------------------------------------------- model
def build_mlp(input_dim: int, output_dim: int, hidden: list[int], activation: str = "tanh") -> nn.Sequential:
    """``Linear -> act -> ... -> Linear`` with the given hidden widths (``[]``: one linear layer).

    Also the built-in factory ``"pib_bayes.config:build_mlp"`` (a run directory may name it
    without ``--trust-code``). A size that cannot fit in memory is refused before allocating.

    >>> build_mlp(2, 1, [], "linear")
    Sequential(
      (0): Linear(in_features=2, out_features=1, bias=True)
    )
    """
    if activation not in ACTIVATIONS:
        raise ConfigError(
            "model.activation", f"unknown value {activation!r}; choose one of {list(ACTIVATIONS)}"
        )
    if not isinstance(hidden, (list, tuple)) or any(
        not is_int(v) or v < 1 for v in hidden
    ):
        raise ConfigError("model.hidden", f"must be a list of positive integers, got {hidden!r}")
    check_memory(
        "model.hidden",
        4 * mlp_num_params(input_dim, output_dim, list(hidden)),
        "the MLP's weights",
        "use narrower layers",
    )
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    d = input_dim
    for width in hidden:
        layers.append(nn.Linear(d, width))
        if act is not None:
            layers.append(act())
        d = width
    layers.append(nn.Linear(d, output_dim))
    return nn.Sequential(*layers)


#: Factories that a run directory may name without ``--trust-code``: pib_bayes's own, taking only
#: numbers and strings (no import path, no callable) as keyword arguments.
BUILTIN_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "pib_bayes.config:build_mlp": build_mlp,
}


def _import_factory(spec: str, search_path: Sequence[str | os.PathLike] = ()) -> Callable[..., Any]:
    """The callable named by ``"module.path:attr"``; a module not importable as installed is looked
    for in the folders of ``search_path`` (the config file's folder), which are on ``sys.path``
    (after everything else, so they shadow nothing) only while importing."""
    if spec in BUILTIN_FACTORIES:
        return BUILTIN_FACTORIES[spec]
    module_name, _, attr = spec.partition(":")
    top = module_name.split(".")[0]
    extra = [
        str(Path(d).resolve())
        for d in search_path
        if (Path(d) / f"{top}.py").is_file() or (Path(d) / top / "__init__.py").is_file()
    ]
    added = [d for d in extra if d not in sys.path]
    sys.path.extend(added)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            "model.factory",
            f"cannot import module {module_name!r} ({err}); "
            "check the path and that the package is installed, on PYTHONPATH or next to the config file",
        ) from None
    finally:
        for d in added:
            if d in sys.path:
                sys.path.remove(d)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError("model.factory", f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError("model.factory", f"{spec!r} is not callable")
    return obj


def build_model(
    model_cfg: Mapping[str, Any],
    input_dim: int,
    output_dim: int,
    seed: int = 0,
    search_path: Sequence[str | os.PathLike] = (),
) -> nn.Module:
    """The module described by the ``[model]`` section, initialised from ``seed``.

    A factory is called with ``[model.kwargs]``; if its signature names ``input_dim`` or
    ``output_dim`` and the kwargs do not set them, the data's dimensions are passed. Its module
    is imported as installed, or else from the folders in ``search_path`` (the CLI passes the
    config file's folder, so a ``nets.py`` next to the config is found without ``PYTHONPATH``).
    A size of the MLP that cannot fit in memory is refused before allocating (``model.hidden``).

    This imports and calls code: only pass a config the user wrote or vouches for (the CLI refuses
    a factory recorded in a run directory unless ``--trust-code`` is given).

    The module is built with torch's global RNG seeded from ``seed`` (its initialisers draw from it);
    the caller's global RNG state is left as it was (``torch.random.fork_rng``).

    >>> build_model({"hidden": [3], "activation": "tanh"}, 2, 1)
    Sequential(
      (0): Linear(in_features=2, out_features=3, bias=True)
      (1): Tanh()
      (2): Linear(in_features=3, out_features=1, bias=True)
    )
    """
    with seeded_global_rng(seed):
        return _build_model(model_cfg, input_dim, output_dim, search_path)


def _build_model(model_cfg: Mapping[str, Any], input_dim: int, output_dim: int,
                 search_path: Sequence[str | os.PathLike]) -> nn.Module:
    if model_cfg.get("factory"):
        factory = _import_factory(model_cfg["factory"], search_path)
        kwargs = dict(model_cfg.get("kwargs") or {})
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        for name, value in (("input_dim", input_dim), ("output_dim", output_dim)):
            if name in params and name not in kwargs:
                kwargs[name] = value
        try:
            model = factory(**kwargs)
        except TypeError as err:
            raise ConfigError(
                "model.kwargs", f"the factory {model_cfg['factory']!r} rejected them ({err})"
            ) from None
        if not isinstance(model, nn.Module):
            raise ConfigError("model.factory", f"must return a torch.nn.Module, got {type(model).__name__}")
        return model
    return build_mlp(input_dim, output_dim, list(model_cfg["hidden"]), model_cfg["activation"])


def mlp_num_params(input_dim: int, output_dim: int, hidden: Sequence[int]) -> int:
    """Weights and biases of :func:`build_mlp`: sum over layers of (d_in + 1) d_out.

    >>> mlp_num_params(2, 3, [8])
    51
    """
    dims = [int(input_dim), *[int(h) for h in hidden], int(output_dim)]  # Python ints: no overflow
    return sum((a + 1) * b for a, b in zip(dims[:-1], dims[1:]))


def check_memory(key: str, nbytes: float, what: str, fix: str) -> None:
    """Refuse, before allocating, a size that cannot fit in the memory available (a
    :class:`ConfigError` naming ``key``, the estimate and ``fix``).

    >>> check_memory("run.num_draws", 1e3, "the draws", "lower run.num_draws")
    >>> try:
    ...     check_memory("run.num_draws", 1e30, "the draws", "lower run.num_draws")
    ... except ConfigError as err:
    ...     print(str(err)[:44])
    run.num_draws: the draws need about 1e+21 GB
    """
    avail = available_memory()
    if nbytes > avail:
        raise ConfigError(
            key, f"{what} need about {nbytes / 1e9:.3g} GB, more than the {avail / 1e9:.3g} GB of memory "
            f"available; {fix}"
        )


# -------------------------------------------------------------------------------------------- data
@dataclass
class Dataset:
    """A loaded data set split into train and test, with what the model needs to know."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    task: str
    input_dim: int
    output_dim: int
    description: str
    feature_mean: Tensor | None = None
    feature_std: Tensor | None = None

    def info(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "n_train": len(self.y_train),
            "n_test": len(self.y_test),
            "description": self.description,
        }


def read_npz(
    path: Path, x_key: str, y_key: str | None, key: str = "data.source"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Arrays ``x_key`` and ``y_key`` of a ``.npz`` file, read without pickle (an object array
    cannot run code, it is refused); ``y`` is None when ``y_key`` is None or absent and
    ``key == "--input"``. A file numpy cannot read is a :class:`ConfigError` naming it."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.keys())
            for k, name in ((x_key, "x_key"), (y_key, "y_key")):
                if k is not None and k not in keys and not (name == "y_key" and key == "--input"):
                    raise ConfigError(
                        key if key == "--input" else f"data.{name}",
                        f"{path} has no array {k!r}; its arrays are {keys}",
                    )
            out = []
            for k in (x_key, y_key):
                if k is None or k not in keys:
                    out.append(None)
                    continue
                try:
                    a = np.asarray(npz[k])
                except ValueError as err:  # an object array: numpy would need pickle
                    raise ConfigError(
                        key,
                        f"{path}: array {k!r} is an object array ({err}); pib-bayes never unpickles "
                        "data files: save numeric arrays (np.savez(path, x=x.astype(float), ...))",
                    ) from None
                if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
                    raise ConfigError(key, f"{path}: array {k!r} has dtype {a.dtype}; it must be numeric")
                out.append(a)
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(
            key, f"{path} cannot be read as a .npz file ({type(err).__name__}: {err})"
        ) from None
    return out[0], out[1]


def _csv_rows(path: Path, key: str = "data.source") -> list[list[str]]:
    """The rows of a text CSV file; a binary or non-UTF-8 file is a :class:`ConfigError` naming it."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.reader(f))
    except UnicodeDecodeError as err:
        raise ConfigError(
            key, f"{path} is not a UTF-8 text CSV file (byte {err.start}: {err.reason}); is it binary?"
        ) from None
    except csv.Error as err:
        raise ConfigError(key, f"{path} is not a readable CSV file ({err}); is it binary?") from None


def _csv_arrays(path: Path, target: str | int) -> tuple[np.ndarray, np.ndarray]:
    rows = _csv_rows(path)
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise ConfigError("data.source", f"{path} is empty")

    def numeric(row: list[str]) -> bool:
        try:
            [float(c) for c in row]
            return True
        except ValueError:
            return False

    header = None if numeric(rows[0]) else [c.strip() for c in rows[0]]
    body = rows[1:] if header is not None else rows
    width = len(rows[0])
    for i, r in enumerate(body):
        if len(r) != width:
            raise ConfigError(
                "data.source",
                f"{path}: row {i + 1 + (header is not None)} has {len(r)} columns, expected {width}",
            )
    try:
        arr = np.array([[float(c) for c in r] for r in body], dtype=np.float64)
    except ValueError as err:
        raise ConfigError(
            "data.source", f"{path}: non-numeric value ({err}); encode categories as numbers"
        ) from None
    if isinstance(target, str):
        if header is None or target not in header:
            raise ConfigError(
                "data.target",
                f"column {target!r} not found; the header is {header}; "
                "give a column name from the header or an integer index",
            )
        col = header.index(target)
    else:
        if not -width <= target < width:
            raise ConfigError("data.target", f"column index {target} out of range for {width} columns")
        col = target % width
    return np.delete(arr, col, axis=1), arr[:, col]


def _infer_task(y: np.ndarray | Tensor, declared: str) -> str:
    if declared != "auto":
        return declared
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.integer):
        return "classification"
    if np.all(np.isfinite(y)) and np.all(y == np.round(y)) and y.ndim == 1 and len(np.unique(y)) <= 100:
        return "classification"
    return "regression"


def resolve_source(data_cfg: Mapping[str, Any], base_dir: str | os.PathLike | None = None) -> str:
    """``data.source`` as a built-in name or an absolute path (relative paths: working directory
    first, then ``base_dir``), so that a run directory can find its data from anywhere."""
    source = data_cfg["source"]
    if source in BUILTIN_DATA:
        return source
    path = Path(source).expanduser()
    if not path.exists() and base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    return str(path.resolve()) if path.exists() else source


def load_arrays(
    data_cfg: Mapping[str, Any], base_dir: str | os.PathLike | None = None
) -> tuple[Tensor, Tensor, str]:
    """``(x, y, description)`` of the ``[data]`` source before the train/test split.

    Relative paths are resolved against ``base_dir`` (the config file's folder) when the file
    is not found relative to the working directory.
    """
    source = data_cfg["source"]
    seed = data_cfg["seed"]
    if source in BUILTIN_DATA:
        from .data import make_classification_data, make_regression_data

        n_total = data_cfg["n"]
        # generated in float64 (a few temporaries of n x 2), then the float32 tensors
        check_memory("data.n", 64 * n_total, f"{n_total:,} generated examples", "lower data.n")
        if source == "spirals":
            noise = 0.25 if data_cfg.get("noise") is None else data_cfg["noise"]
            x, y = make_classification_data(n=n_total, num_classes=3, noise=noise, seed=seed)
        else:
            noise = 0.3 if data_cfg.get("noise") is None else data_cfg["noise"]
            x, y = make_regression_data(n=n_total, noise_std=noise, seed=seed)
        return x, y, f"built-in {source} (n={n_total}, noise={noise})"
    path = Path(source).expanduser()
    if not path.exists() and base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    if not path.exists():
        raise ConfigError(
            "data.source",
            f"{source!r} is neither a built-in data set {list(BUILTIN_DATA)} nor an "
            "existing path (an MNIST IDX directory, a .npz or a .csv file)",
        )
    if path.is_dir():
        from .mnist import IDXError, load_mnist

        try:
            x, y = load_mnist(path, split=data_cfg["split"])
        except (IDXError, FileNotFoundError) as err:
            raise ConfigError("data.source", str(err)) from None
        return x, y, f"MNIST IDX {path} (split {data_cfg['split']})"
    suffix = path.suffix.lower()
    if suffix == ".npz":
        xa, ya = read_npz(path, data_cfg["x_key"], data_cfg["y_key"])
        desc = f"npz {path}"
    elif suffix == ".csv":
        xa, ya = _csv_arrays(path, data_cfg["target"])
        desc = f"csv {path}"
    else:
        raise ConfigError(
            "data.source",
            f"unsupported file type {suffix!r} ({path}); use a .npz, a .csv or an MNIST IDX directory",
        )
    if xa.ndim == 0 or ya.ndim == 0:
        raise ConfigError("data.source", f"{path}: x and y must be arrays with one row per example")
    if xa.ndim == 1:
        xa = xa[:, None]
    if len(xa) == 0:
        raise ConfigError("data.source", f"{path} holds no examples (0 rows)")
    if len(xa) != len(ya):
        raise ConfigError("data.source", f"{path}: x has {len(xa)} rows but y has {len(ya)}")
    if not np.issubdtype(xa.dtype, np.number) or not np.all(np.isfinite(xa)):
        raise ConfigError("data.source", f"{path}: x must be finite numbers (found NaN/Inf or non-numeric)")
    x = torch.as_tensor(np.asarray(xa, dtype=np.float32))
    task = _infer_task(ya, data_cfg["task"])
    if task == "classification":
        if not np.all(np.asarray(ya) == np.round(np.asarray(ya, dtype=np.float64))) or np.min(ya) < 0:
            raise ConfigError(
                "data.task",
                'classification needs integer labels 0..K-1; set task = "regression" for real-valued targets',
            )
        y = torch.as_tensor(np.asarray(ya, dtype=np.int64))
    else:
        yf = np.asarray(ya, dtype=np.float32)
        if not np.all(np.isfinite(yf)):
            raise ConfigError("data.source", f"{path}: y contains NaN/Inf")
        y = torch.as_tensor(yf if yf.ndim > 1 else yf[:, None])
    return x, y, desc


def load_data(data_cfg: Mapping[str, Any], base_dir: str | os.PathLike | None = None) -> Dataset:
    """Load the ``[data]`` source and split it into train/test with ``data.seed``."""
    x, y, desc = load_arrays(data_cfg, base_dir)
    if data_cfg["limit"]:
        x, y = x[: data_cfg["limit"]], y[: data_cfg["limit"]]
    task = _infer_task(y.numpy(), data_cfg["task"])
    if task == "classification" and y.is_floating_point():
        y = y.long().reshape(-1)
    if task == "regression" and not y.is_floating_point():
        y = y.float().reshape(len(y), -1)
    n = len(y)
    n_test = int(round(n * data_cfg["test_fraction"]))
    if n - n_test < 2:
        raise ConfigError("data.test_fraction", f"leaves {n - n_test} training examples of {n}; lower it")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(data_cfg["seed"]))
    tr, te = perm[n_test:], perm[:n_test]
    x_train, y_train, x_test, y_test = x[tr], y[tr], x[te], y[te]
    mean = std = None
    if data_cfg["standardize"]:
        mean = x_train.mean(0)
        std = x_train.std(0).clamp_min(1e-8)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    x_flat_dim = int(np.prod(x.shape[1:])) if x.dim() > 1 else 1
    if task == "classification":
        output_dim = int(y.max()) + 1
        if output_dim < 2:
            raise ConfigError("data.source", "classification data need at least 2 classes (labels 0..K-1)")
    else:
        output_dim = int(y.shape[1]) if y.dim() > 1 else 1
    return Dataset(x_train, y_train, x_test, y_test, task, x_flat_dim, output_dim, desc, mean, std)
