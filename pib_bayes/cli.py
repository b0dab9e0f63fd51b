"""Command line ``pib-bayes``: ``demo``, ``sample``, ``diagnose``, ``iiw``, ``predict``.

Exit codes (also in docs/cli.md):

* 0: success;
* 1: unexpected internal error (a bug: the traceback is printed);
* 2: bad usage or input: a config key, a missing file, a run directory that exists, data that
  cannot be read; the message names the argument or ``section.key`` and the fix;
* 3: the run finished but produced no usable result (every chain diverged), or a distributed
  run stopped because a rank failed, died or timed out (``PIB_DIST_TIMEOUT`` seconds, default 300);
* 4: ``diagnose --strict`` found a quantity with R-hat or ESS outside the limits.

With ``--json`` the command prints exactly one JSON object on stdout (errors too:
``{"error": ..., "key": ..., "exit_code": ...}``); progress bars (tqdm, on stderr) are off with
``--quiet`` or ``--json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "main",
    "build_parser",
    "run_sample",
    "run_iiw",
    "iiw_peak",
    "fisher_iiw",
    "EXIT_OK",
    "EXIT_INTERNAL",
    "EXIT_USAGE",
    "EXIT_FAILED",
    "EXIT_DIAGNOSTICS",
]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_FAILED, EXIT_DIAGNOSTICS = 0, 1, 2, 3, 4

RUN_FILES = {
    "posterior.pt": "the draws (Posterior.save format, see pib_bayes.io)",
    "config.json": "the validated config with every default filled in, plus the resolved data dimensions",
    "config.toml": "the TOML file as given",
    "summary.json": "what the run did: data, beta, timings, divergences, train/test metrics",
}


class UsageError(Exception):
    """Bad input from the user; ``key`` names the argument or config key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


# --------------------------------------------------------------------------------- file helpers
def _atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 ``text`` to ``path`` with :func:`pib_bayes.io.atomic_write_bytes` (temporary files
    left by killed writers are swept, those of live ones kept)."""
    from .io import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


def _atomic_savefig(fig: Any, path: Path) -> None:
    from .io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    _atomic_write_text(path, buf.getvalue())


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


def _dumps(obj: Any) -> str:
    def clean(v: Any) -> Any:  # JSON has no NaN: write null
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(json.loads(json.dumps(obj, default=_json_default))), indent=2)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


class _StagedDir:
    """Build a directory under a temporary name next to ``target`` and move it into place on success.

    The staging name ``.NAME.partial-HOST.PID-RANDOM`` carries its writer, so a later run removes
    the ones whose writer is gone (killed) and never one still being written. ``overwrite``
    swaps the new directory with the old one (atomically on Linux, else by two renames with the
    old one put back if the second fails) and only then deletes the old one; an old directory
    left aside by a writer killed between the renames (``.NAME.old-HOST.PID``) is put back.
    """

    def __init__(self, target: Path, overwrite: bool) -> None:
        self.target = target
        self.overwrite = overwrite

    def _sweep(self) -> None:
        from .io import is_stale

        prefix = f".{self.target.name}."
        for kind in ("partial-", "old-"):
            for p in self.target.parent.glob(glob.escape(prefix + kind) + "*"):
                rest = p.name[len(prefix + kind):]
                tag = rest.rpartition("-")[0] if kind == "partial-" else rest
                if not is_stale(tag, p):
                    continue
                if kind == "old-" and not self.target.exists():
                    os.replace(p, self.target)  # an --overwrite cut short: the old run comes back
                else:
                    shutil.rmtree(p, ignore_errors=True)

    def __enter__(self) -> Path:
        from .io import give_plain_mode, writer_tag

        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self._sweep()
            self.tmp = Path(tempfile.mkdtemp(dir=self.target.parent,
                                             prefix=f".{self.target.name}.partial-{writer_tag()}-"))
            give_plain_mode(self.tmp, self.target)
        except OSError as err:
            raise UsageError("output.dir", f"cannot create {self.target} ({err.strerror or err}); choose "
                             "a directory you can write to") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        from .io import writer_tag

        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if not self.target.exists():
            os.replace(self.tmp, self.target)
            return
        if not self.overwrite:  # checked before the run too; someone created it meanwhile
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise UsageError("output.dir", f"{self.target} appeared while running; nothing overwritten")
        if _exchange(self.tmp, self.target):  # the new run in place, the old one under the staging name
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = self.target.with_name(f".{self.target.name}.old-{writer_tag()}")
        os.replace(self.target, old)
        try:
            os.replace(self.tmp, self.target)
        except BaseException:
            os.replace(old, self.target)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)


def _check_output_dir(cfg: dict, command: str) -> Path:
    out = cfg["output"]["dir"]
    if not out:
        raise UsageError(
            "output.dir",
            f'is required for `{command}`: set [output] dir = "runs/name" in the config or pass --output DIR',
        )
    path = Path(out)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "is not a directory" if not parent.is_dir() else "is not writable"
        raise UsageError("output.dir", f"cannot create {path}: {parent} {why}; choose a directory you can "
                         "write to")
    if path.exists() and not cfg["output"]["overwrite"]:
        raise UsageError(
            "output.dir",
            f"{path} already exists; pass --overwrite (or set [output] overwrite = "
            "true) to replace it, or choose another directory",
        )
    if path.exists() and not path.is_dir():
        raise UsageError("output.dir", f"{path} exists and is not a directory")
    return path


def _emit(args: argparse.Namespace, result: dict, text: str) -> None:
    print(_dumps(result) if args.json else text)


# ---------------------------------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_demo, run_demo

    result = run_demo(quick=args.quick, seed=args.seed, progress=not args.quiet and not args.json)
    print(_dumps(result) if args.json else format_demo(result))
    return EXIT_OK


# ------------------------------------------------------------------------------------- helpers
def _loss_for(cfg: dict, task: str) -> Any:
    from .energy import GaussianLoss

    loss = cfg["posterior"]["loss"]
    if loss == "auto":
        loss = "cross_entropy" if task == "classification" else "gaussian"
    if loss == "gaussian":
        if task == "classification":
            raise UsageError(
                "posterior.loss",
                'is "gaussian" but the data are class labels; use "cross_entropy" '
                'or set data.task = "regression"',
            )
        return GaussianLoss(cfg["posterior"]["noise_std"])
    if task == "regression":
        raise UsageError(
            "posterior.loss", 'is "cross_entropy" but the targets are real-valued; use "gaussian"'
        )
    return "cross_entropy"


def _schedule_for(cfg: dict, total_steps: int) -> Any:
    from .samplers import Constant, Cosine, Cyclical, PolynomialDecay

    s = cfg["sampler"]
    h = s["step_size"]
    if s["schedule"] == "constant":
        return Constant(h)
    if s["schedule"] == "polynomial":
        # h_t = a (b + t)^-gamma with a chosen so that h_0 = step_size
        return PolynomialDecay(a=h * s["b"] ** s["gamma"], b=s["b"], gamma=s["gamma"])
    if s["schedule"] == "cosine":
        return Cosine(h, total_steps=max(total_steps, 1), min_step_size=s["min_step_size"])
    return Cyclical(h, cycle_length=s["cycle_length"], exploration_fraction=s["exploration_fraction"])


def _beta_for(cfg: dict, n_train: int) -> tuple[float, str]:
    post = cfg["posterior"]
    if post["beta"] is not None:
        return float(post["beta"]), "beta"
    temperature = 1.0 if post["temperature"] is None else float(post["temperature"])
    return temperature / n_train, f"temperature={temperature:g} / n={n_train}"


def _batch(cfg_value: int, n: int) -> int | None:
    return None if cfg_value == 0 or cfg_value >= n else cfg_value


def _pretrain(model: Any, loss_fn: Any, data: Any, cfg: dict, seed: int, progress: bool) -> dict:
    import torch
    from tqdm.auto import tqdm

    steps = cfg["pretrain"]["steps"]
    if steps == 0:
        return {"steps": 0}
    from .energy import resolve_loss

    fn, _ = resolve_loss(loss_fn, data.task)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["pretrain"]["lr"])
    n = len(data.y_train)
    bs = _batch(cfg["pretrain"]["batch_size"], n) or n
    gen = torch.Generator().manual_seed(seed + 1)
    perm, pos = torch.randperm(n, generator=gen), 0
    start_loss = _train_loss(model, fn, data)
    model.train()
    for _ in tqdm(range(steps), desc="pretrain (Adam)", disable=not progress, leave=False):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + bs]
        pos += bs
        opt.zero_grad()
        fn(model(data.x_train[idx]), data.y_train[idx]).mean().backward()
        opt.step()
    model.eval()
    _check_pretrained(model, steps, cfg["pretrain"]["lr"], start_loss, _train_loss(model, fn, data))
    with torch.no_grad():
        point = _point_metrics(model, data)
    return {"steps": steps, "lr": cfg["pretrain"]["lr"], **point}


def _train_loss(model: Any, fn: Any, data: Any) -> float:
    import torch

    was = model.training
    model.eval()
    with torch.no_grad():
        value = float(fn(model(data.x_train), data.y_train).mean())
    model.train(was)
    return value


def _point_metrics(model: Any, data: Any) -> dict:
    import torch

    out = {}
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        if len(y) == 0:
            continue
        with torch.no_grad():
            f = model(x)
        if data.task == "classification":
            out[f"{split}_accuracy"] = float((f.argmax(-1) == y).double().mean())
            out[f"{split}_nll"] = float(torch.nn.functional.cross_entropy(f, y))
        else:
            out[f"{split}_rmse"] = float((f - y).square().mean().sqrt())
    return out


def _predictive_metrics(pred: Any, y: Any, task: str, level: float = 0.9) -> dict:
    """Scores of a posterior-predictive :class:`~pib_bayes.Prediction` (from :mod:`pib_bayes.uncertainty`).

    Classification: accuracy, NLL, Brier, ECE (15 equal-width bins). Regression: RMSE of the
    predictive mean, Gaussian and mixture NLL, empirical coverage of the central ``level`` interval.
    """
    from .uncertainty import classification_uncertainty, regression_uncertainty

    if task == "classification":
        u = classification_uncertainty(pred, y)
        return {"accuracy": u.accuracy, "nll": u.nll, "brier": u.brier, "ece": u.ece}
    r = regression_uncertainty(pred, y.reshape(pred.mean.shape), level=level)
    rmse = float((r.mean.double() - y.double().reshape(r.mean.shape)).square().mean().sqrt())
    return {
        "rmse": rmse,
        "nll_gaussian": r.nll_gaussian,
        "nll_mixture": r.nll_mixture,
        f"coverage_{int(round(100 * level))}": r.coverage,
    }


def _resolve_config(args: argparse.Namespace) -> tuple[dict, Path]:
    from .config import load_config

    cfg = load_config(args.config, getattr(args, "output", None))
    if getattr(args, "overwrite", False):
        cfg["output"]["overwrite"] = True
    if getattr(args, "data", None) is not None:
        cfg["data"]["source"] = _data_override(args.data)
    return cfg, Path(args.config).resolve().parent


def _check_run_memory(cfg: dict, num_weights: int, element_size: int = 4) -> None:
    """Refuse a run whose draws and chain states cannot fit in memory, before sampling.

    Estimate (bytes): K (T (32 + D e) + 6 D e + 2048) for K chains, T kept draws, D weights of e
    bytes: the draws, the per-draw statistics, about six copies of the weights per chain while
    stepping (weights, gradients, noise, kernel state, batched views) and per-chain bookkeeping
    (generators, batchers).
    """
    from .config import check_memory

    d, e = int(num_weights), int(element_size)
    k, t = cfg["run"]["num_chains"], cfg["run"]["num_draws"]
    key = "run.num_chains" if k > t else "run.num_draws"
    check_memory(key, k * (t * (32 + d * e) + 6 * d * e + 2048),
                 f"{k:,} chains x {t:,} draws of {d:,} weights",
                 "lower run.num_chains or run.num_draws (raise run.thin to keep fewer draws of a long run)")


def _check_pretrained(model: Any, steps: int, lr: float, start: float, end: float) -> None:
    """A pretraining that diverged is the pretraining's fault, not the sampler's: non-finite
    weights or training loss, or a training loss 100 times its starting value (a working Adam
    does not raise it so; a too-large ``lr`` does, e.g. 1e30: 1.1 -> 3.9e30)."""
    import torch

    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters()) and math.isfinite(end)
    if not finite or end > 100 * max(start, 1e-3):
        raise UsageError(
            "pretrain.lr",
            f"pretraining diverged: after {steps} Adam steps at lr = {lr:g} the training loss is "
            f"{end:.4g} (it started at {start:.4g}); lower pretrain.lr (e.g. lr = 0.01) or set "
            "pretrain.steps = 0",
        )


def _data_override(source: str) -> str:
    """``--data``: a built-in name as is, a path resolved against the working directory."""
    from .config import BUILTIN_DATA

    if source in BUILTIN_DATA:
        return source
    path = Path(source).expanduser()
    if not path.exists():
        raise UsageError("--data", f"no file or directory {source!r}; pass a built-in data set "
                         f"{sorted(BUILTIN_DATA)}, an IDX directory, a .npz or a .csv")
    return str(path.resolve())


# -------------------------------------------------------------------------------------- sample
def run_sample(
    cfg: dict, base_dir: Path, progress: bool, config_text: str | None = None, resume: bool = False
) -> tuple[dict, Path]:
    """Everything ``pib-bayes sample`` does; returns (summary dict, run directory).

    Sampling checkpoints to ``RUN_DIR.checkpoint`` (beside the run directory, which is only written
    whole at the end) every ``run.checkpoint_every`` steps; ``resume=True`` continues from it and
    gives the draws an uninterrupted run would. The checkpoint is removed once the run is written.
    """
    import torch

    from .config import ConfigError, build_model, check_memory, load_data, mlp_num_params, resolve_source
    from .driver import sample
    from .prior import GaussianPrior

    out_dir = _check_output_dir(cfg, "sample")
    t0 = time.perf_counter()
    data = load_data(cfg["data"], base_dir)
    run = cfg["run"]
    if cfg["model"]["factory"] is None:  # the MLP's size is known before building it
        d = mlp_num_params(data.input_dim, data.output_dim, cfg["model"]["hidden"])
        check_memory("model.hidden", 4 * d, f"the MLP's {d:,} weights", "use narrower layers")
        _check_run_memory(cfg, d)
    model = build_model(cfg["model"], data.input_dim, data.output_dim, seed=run["seed"],
                        search_path=[base_dir])
    if data.x_train.dim() > 2 and cfg["model"]["factory"] is None:
        data.x_train, data.x_test = data.x_train.flatten(1), data.x_test.flatten(1)
    loss_fn = _loss_for(cfg, data.task)
    trainable = [p for p in model.parameters() if p.requires_grad]
    _check_run_memory(cfg, sum(p.numel() for p in trainable), max((p.element_size() for p in trainable),
                                                                  default=4))
    # the prior is centred on the random initialisation (or 0), fixed BEFORE any pretraining on S
    prior = GaussianPrior.from_module(
        model, std=cfg["prior"]["std"], mean=cfg["prior"]["mean"]
    )
    pre = _pretrain(model, loss_fn, data, cfg, run["seed"], progress)
    n = len(data.y_train)
    beta, beta_from = _beta_for(cfg, n)
    total_steps = run["num_warmup"] + run["num_draws"] * run["thin"]
    schedule = _schedule_for(cfg, total_steps)
    t1 = time.perf_counter()
    sample_kwargs = dict(
        beta=beta,
        prior=prior,
        sampler=cfg["sampler"]["name"],
        step_size=schedule,
        num_chains=run["num_chains"],
        num_warmup=run["num_warmup"],
        num_draws=run["num_draws"],
        thin=run["thin"],
        batch_size=_batch(run["batch_size"], n),
        seed=run["seed"],
        progress=progress,
        chain_method=run["chain_method"],
        task=data.task,
        sampler_kwargs=cfg["sampler"]["kwargs"],
    )
    from .driver.checkpoint import remove_checkpoint

    checkpoint = Path(str(out_dir) + ".checkpoint")
    if run["checkpoint_every"]:
        sample_kwargs.update(checkpoint=checkpoint, checkpoint_every=run["checkpoint_every"], resume=resume)
    elif resume:
        raise ConfigError("run.checkpoint_every", "is 0, so there is no checkpoint to --resume from; set "
                          "checkpoint_every = 500 (the default) for runs you may want to resume")
    mode = run["distributed"]
    if mode == "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        mode = "chains"  # launched by torchrun: share the chains out by default
    if mode == "none":
        post = sample(model, loss_fn, (data.x_train, data.y_train), **sample_kwargs)
    else:
        post = _sample_on_ranks(mode, model, loss_fn, (data.x_train, data.y_train), sample_kwargs)
        if post is None:  # not rank 0: rank 0 gathers the draws and writes the run directory
            return {"rank": _rank(), "run_dir": str(out_dir)}, out_dir
    t_sample = time.perf_counter() - t1
    diverged = [int(c) for c in torch.nonzero(post.diverged).flatten().tolist()]
    metrics: dict[str, Any] = {}
    if len(diverged) < post.num_chains:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metrics["train"] = _predictive_metrics(post.predict(data.x_train), data.y_train, data.task)
            if len(data.y_test):
                metrics["test"] = _predictive_metrics(post.predict(data.x_test), data.y_test, data.task)
    summary = {
        "run_dir": str(out_dir),
        "data": data.info(),
        "beta": beta,
        "beta_from": beta_from,
        "model": repr(model).splitlines()[0] + ("..." if len(repr(model).splitlines()) > 1 else ""),
        "num_params": post.num_params,
        "sampler": cfg["sampler"]["name"],
        "schedule": repr(schedule),
        "chains": post.num_chains,
        "draws_per_chain": post.num_draws,
        "chain_method": post.metadata.get("chain_method"),
        "distributed": post.metadata.get("distributed"),
        "diverged_chains": diverged,
        "divergence_steps": [int(post.divergence_step[c]) for c in diverged],
        "mean_energy_per_chain": [float(v) for v in post.sample_stats["energy"].nanmean(1).tolist()],
        "pretrain": pre,
        "posterior_predictive": metrics,
        "seconds": {"total": round(time.perf_counter() - t0, 2), "sampling": round(t_sample, 2)},
        "files": dict(RUN_FILES),
    }
    resolved = dict(cfg)
    resolved["resolved"] = {
        **data.info(),
        "beta": beta,
        "feature_mean": data.feature_mean.tolist() if data.feature_mean is not None else None,
        "feature_std": data.feature_std.tolist() if data.feature_std is not None else None,
        "base_dir": str(base_dir),
        "source": resolve_source(cfg["data"], base_dir),
    }
    with _StagedDir(out_dir, cfg["output"]["overwrite"]) as tmp:
        post.save(tmp / "posterior.pt")
        _atomic_write_text(tmp / "config.json", _dumps(resolved))
        if config_text is not None:
            _atomic_write_text(tmp / "config.toml", config_text)
        _atomic_write_text(tmp / "summary.json", _dumps(summary))
    remove_checkpoint(checkpoint)  # the run directory now holds everything
    return summary, out_dir


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _sample_on_ranks(mode: str, model: Any, loss_fn: Any, train: tuple, kwargs: dict) -> Any:
    """``pib_bayes.distributed.sample_distributed`` under torchrun (gloo on CPU, nccl on GPU)."""
    import torch
    import torch.distributed as dist

    from .config import ConfigError
    from .distributed import sample_distributed, shard, start_process_group

    owned = not dist.is_initialized()
    if owned:
        if "RANK" not in os.environ:
            raise ConfigError("run.distributed", "needs a torchrun launch (torchrun --nproc_per_node=N "
                              "-m pib_bayes sample ...); use distributed = \"none\" for one process")
        start_process_group("nccl" if torch.cuda.is_available() else "gloo")  # PIB_DIST_TIMEOUT bounds it
    data = train if mode == "chains" else shard(train)
    try:
        return sample_distributed(model, loss_fn, data, mode=mode, **kwargs)
    finally:
        if owned:  # a group left open aborts at interpreter exit ("terminate called ...")
            dist.destroy_process_group()


def _format_sample(s: dict) -> str:
    lines = [
        f"run written to {s['run_dir']}",
        f"  data: {s['data']['description']}: {s['data']['task']}, n_train={s['data']['n_train']}, "
        f"n_test={s['data']['n_test']}",
        f"  beta = {s['beta']:.4g} ({s['beta_from']}); {s['num_params']:,} weights",
        f"  {s['chains']} {s['sampler']} chains x {s['draws_per_chain']} draws ({s['chain_method']}), "
        f"schedule {s['schedule']}",
        f"  diverged chains: {s['diverged_chains'] or 'none'}; sampling took {s['seconds']['sampling']} s",
    ]
    for split, m in s["posterior_predictive"].items():
        shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())
        lines.append(f"  posterior predictive, {split}: {shown}")
    if s.get("plots"):
        lines.append(f"  plots: {', '.join(s['plots'])} in {s['run_dir']}")
    lines.append("  next: pib-bayes diagnose " + s["run_dir"])
    return "\n".join(lines)


def _sample_plots(run_dir: str) -> list[str]:
    """``sample --plots``: trace.png, rank.png and energy.png of the run just written (as ``diagnose``)."""
    # this process wrote the run from the user's own config: its factory and data are the user's input
    _, post, data = _load_run(run_dir, trust_code=True)
    opts = argparse.Namespace(projections=4, seed=0)
    return _diagnostic_plots(post, Path(run_dir), data, opts)


def _cmd_sample(args: argparse.Namespace) -> int:
    cfg, base = _resolve_config(args)
    text = Path(args.config).read_text()
    summary, _ = run_sample(cfg, base, progress=not args.quiet and not args.json, config_text=text,
                            resume=args.resume)
    if "rank" in summary:  # a non-zero torchrun rank: rank 0 reports
        return EXIT_OK
    if args.plots and len(summary["diverged_chains"]) < summary["chains"]:
        summary["plots"] = _sample_plots(summary["run_dir"])
    _emit(args, summary, _format_sample(summary))
    if len(summary["diverged_chains"]) == summary["chains"]:
        print("error: every chain diverged; lower sampler.step_size or check the data", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# ------------------------------------------------------------------------------------ run dirs
def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _read_run_config(path: Path, trust_code: bool) -> dict:
    """The validated config.json of a run directory: a run directory is data, so (unless
    ``trust_code``) it may name no model factory but a built-in one, and no file outside itself."""
    from ._validate import is_int
    from .config import BUILTIN_DATA, BUILTIN_FACTORIES, ConfigError, validate_config

    where = path / "config.json"
    try:
        cfg = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise UsageError("RUN_DIR", f"{where} is not valid JSON ({type(err).__name__}); is it a run "
                         "directory of `pib-bayes sample`?") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("resolved"), dict):
        raise UsageError("RUN_DIR", f"{where} has no 'resolved' table; is it a run directory of "
                         "`pib-bayes sample`?")
    res = cfg.pop("resolved")
    # JSON null is a default left unset (TOML has no null): validate what was set
    raw = {sec: ({k: v for k, v in val.items() if v is not None} if isinstance(val, dict) else val)
           for sec, val in cfg.items()}
    try:
        cfg = validate_config(raw)
    except ConfigError as err:
        raise UsageError(err.key, f"{where}: {str(err).split(': ', 1)[1]}") from None

    def bad(key: str, want: str) -> UsageError:
        return UsageError(f"resolved.{key}", f"{where}: must be {want}, got {res.get(key)!r}")

    for key in ("input_dim", "output_dim"):
        v = res.get(key)
        if not is_int(v) or v < 1:
            raise bad(key, "an integer >= 1")
    if res.get("task") not in ("classification", "regression"):
        raise bad("task", '"classification" or "regression"')
    for key in ("feature_mean", "feature_std"):
        v = res.get(key)
        if v is not None and (not isinstance(v, list) or len(v) != res["input_dim"] or not all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in v)):
            raise bad(key, f"null or a list of {res['input_dim']} finite numbers")
    if (res.get("feature_mean") is None) != (res.get("feature_std") is None):
        raise bad("feature_std", "given exactly when feature_mean is")
    factory = cfg["model"]["factory"]
    if factory is not None and factory not in BUILTIN_FACTORIES and not trust_code:
        raise UsageError(
            "model.factory",
            f"{where} names the model factory {factory!r}; a run directory is data, and pib-bayes "
            "does not import or call code named by one. If you trust whoever wrote this run "
            "directory, pass --trust-code (the factory's module must be importable); built-in "
            f"factories need no flag: {sorted(BUILTIN_FACTORIES)}",
        )
    root = path.resolve()
    source = res.get("source", cfg["data"]["source"])
    if not isinstance(source, str) or not source:
        raise bad("source", "a built-in data set name or a path")
    base_dir = res.get("base_dir")
    if base_dir is not None and not isinstance(base_dir, str):
        raise bad("base_dir", "a path")
    if source not in BUILTIN_DATA and not trust_code:
        src = Path(source)
        src = src if src.is_absolute() else root / src
        if not _inside(src, root):
            raise UsageError(
                "resolved.source",
                f"{where} reads its data from {source!r}, outside the run directory; a run "
                "directory cannot make pib-bayes read files elsewhere. If the run is yours (or you "
                "trust its author) pass --trust-code, or copy the data into the run directory and "
                "record it there (a path relative to the run directory)",
            )
        source, base_dir = str(src.resolve()), str(root)
    search = [d for d in (base_dir, str(root)) if d is not None] if trust_code else []
    cfg["resolved"] = {**res, "source": source, "base_dir": base_dir}
    cfg["_search_path"] = search
    return cfg


def _load_run(run_dir: str, trust_code: bool = False) -> tuple[dict, Any, Any]:
    """(config, Posterior with its model, Dataset) of a run directory written by ``sample``.

    Without ``trust_code`` the run directory can name no code to import (only a built-in model
    factory) and no data file outside itself; see docs/security.md.
    """
    from .config import ConfigError, build_model, load_data
    from .io import FormatError
    from .posterior import Posterior

    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(
            "RUN_DIR", f"no directory {run_dir!r}; pass a directory written by `pib-bayes sample`"
        )
    for name in ("config.json", "posterior.pt"):
        if not (path / name).is_file():
            raise UsageError(
                "RUN_DIR", f"{run_dir} has no {name}; is it a run directory of `pib-bayes sample`?"
            )
        if not trust_code and not _inside(path / name, path):
            raise UsageError("RUN_DIR", f"{path / name} is a link to a file outside the run directory; "
                             "pass --trust-code to follow it, or copy the file in")
    cfg = _read_run_config(path, trust_code)
    res = cfg["resolved"]
    try:
        model = build_model(cfg["model"], res["input_dim"], res["output_dim"], seed=cfg["run"]["seed"],
                            search_path=cfg["_search_path"])
    except ConfigError as err:
        raise UsageError(err.key, f"{path / 'config.json'}: {str(err).split(': ', 1)[1]}") from None
    try:
        post = Posterior.load(path / "posterior.pt", model=model)
    except FormatError as err:
        raise UsageError("RUN_DIR", f"{err}") from None
    data_cfg = {**cfg["data"], "source": res["source"]}
    data = load_data(data_cfg, res["base_dir"])  # standardised again (same split) when configured
    if data.x_train.dim() > 2 and cfg["model"]["factory"] is None:
        data.x_train, data.x_test = data.x_train.flatten(1), data.x_test.flatten(1)
    return cfg, post, data


# ------------------------------------------------------------------------------------ diagnose
def _cmd_diagnose(args: argparse.Namespace) -> int:
    import numpy as np

    from .diagnostics import ConvergenceWarning, format_above, summary

    cfg, post, data = _load_run(args.run_dir, args.trust_code)
    run_dir = Path(args.run_dir)
    eval_x, eval_y = (data.x_test, data.y_test) if len(data.y_test) else (data.x_train, data.y_train)
    n_eval = min(len(eval_y), args.max_examples)
    probe = eval_x[: args.probes] if args.probes else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = summary(
            post,
            data=(eval_x[:n_eval], eval_y[:n_eval]),
            probe_x=probe,
            num_projections=args.projections,
            seed=args.seed,
        )
    conv = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    other = [str(w.message) for w in caught if not issubclass(w.category, ConvergenceWarning)]
    rows = [
        [name, *[row[c] for c in ("mean", "sd", "mcse_mean", "ess_bulk", "ess_tail", "r_hat")], row["kind"]]
        for name, row in table.iterrows()
    ]
    header = ["quantity", "mean", "sd", "mcse_mean", "ess_bulk", "ess_tail", "r_hat", "kind"]
    _write_csv(run_dir / "diagnostics.csv", header, rows)
    rhat_ok = bool((table["r_hat"] <= table.attrs["rhat_threshold"]).all())
    ess_ok = bool((table["ess_bulk"] >= table.attrs["min_ess"]).all())
    plots: list[str] = []
    if not args.no_plots:
        plots = _diagnostic_plots(post, run_dir, data, args)
    bounds_report = None
    if not args.no_bounds and post.task == "classification" and len(data.y_test):
        bounds_report = _bounds_report(cfg, post, data, args.delta)
    result = {
        "run_dir": str(run_dir),
        "chains_used": table.attrs["chains"],
        "excluded_chains": table.attrs["excluded_chains"],
        "log_lik_on": f"{'test' if len(data.y_test) else 'train'} split, first {n_eval} examples",
        "rhat_ok": rhat_ok,
        "ess_ok": ess_ok,
        "warnings": conv,
        "other_warnings": other,
        "table": {
            name: {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()}
            for name, row in table.iterrows()
        },
        "files": ["diagnostics.csv", "diagnostics.json", *plots],
        "bounds": bounds_report.to_dict() if bounds_report is not None else None,
    }
    _atomic_write_text(run_dir / "diagnostics.json", _dumps(result))
    lines = [
        f"diagnostics of {run_dir} (chains {table.attrs['chains']}; log_lik on {result['log_lik_on']})",
        "",
        f"  {'quantity':<14} {'mean':>11} {'sd':>10} {'mcse':>9} {'ess_bulk':>9} {'ess_tail':>9} "
        f"{'r_hat':>7}",
    ]
    for name, row in table.iterrows():
        lines.append(
            f"  {name:<14} {row['mean']:11.4g} {row['sd']:10.4g} {row['mcse_mean']:9.3g} "
            f"{row['ess_bulk']:9.1f} {row['ess_tail']:9.1f} "
            f"{format_above(row['r_hat'], table.attrs['rhat_threshold']):>7}"
        )
    lines += [
        "",
        f"  R-hat <= {table.attrs['rhat_threshold']}: {'yes' if rhat_ok else 'NO'};  "
        f"bulk ESS >= {table.attrs['min_ess']:.0f}: {'yes' if ess_ok else 'NO'}",
    ]
    lines += [f"  warning: {w}" for w in conv]
    if bounds_report is not None:
        lines += ["", "generalization (train vs held-out) and bounds:", str(bounds_report)]
    lines.append(f"  wrote: {', '.join(result['files'])} in {run_dir}")
    _emit(args, result, "\n".join(lines))
    if args.strict and not (rhat_ok and ess_ok):
        return EXIT_DIAGNOSTICS
    return EXIT_OK


def _bounds_report(cfg: dict, post: Any, data: Any, delta: float) -> Any:
    """:func:`pib_bayes.bounds.report` for a run: the prior is the run's own (centred on the seeded
    initialisation or 0, fixed before any training on S), rebuilt from the config."""
    from .bounds import report
    from .config import build_model
    from .prior import GaussianPrior

    res = cfg["resolved"]
    init = build_model(cfg["model"], res["input_dim"], res["output_dim"], seed=cfg["run"]["seed"],
                       search_path=cfg.get("_search_path", ()))
    prior = GaussianPrior.from_module(init, std=cfg["prior"]["std"], mean=cfg["prior"]["mean"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return report(post, (data.x_train, data.y_train), (data.x_test, data.y_test), prior=prior,
                      delta=delta)


def _diagnostic_plots(post: Any, run_dir: Path, data: Any, args: argparse.Namespace) -> list[str]:
    """trace.png, rank.png (ArviZ, via :mod:`pib_bayes.plots`) and energy.png of a run."""
    from .io import give_plain_mode
    from .plots import plot_energy, plot_rank, plot_trace

    probe = data.x_test[:2] if len(data.y_test) else None
    jobs = [
        (
            "trace.png",
            lambda p: plot_trace(
                post, p, probe_x=probe, num_projections=min(args.projections, 4), seed=args.seed
            ),
        ),
        (
            "rank.png",
            lambda p: plot_rank(
                post, p, probe_x=probe, num_projections=min(args.projections, 4), seed=args.seed
            ),
        ),
        ("energy.png", lambda p: plot_energy(post, p)),
    ]
    written = []
    for name, job in jobs:
        fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{name}.", suffix=".png")
        os.close(fd)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                job(tmp)
            give_plain_mode(tmp, run_dir / name)
            os.replace(tmp, run_dir / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        written.append(name)
    return written


# ------------------------------------------------------------------------------------- predict
def _load_inputs(source: str, cfg: dict) -> tuple[Any, Any | None, str]:
    """(x, y or None, description) from --input: a built-in name, an IDX dir, a .npz or a .csv."""
    import numpy
    import torch

    from .config import ConfigError, _csv_rows, load_arrays, read_npz

    res = cfg["resolved"]
    path = Path(source)
    if path.suffix.lower() == ".csv" and path.is_file():
        try:
            rows = _csv_rows(path, "--input")
            header = bool(rows) and not _numeric_row(rows[0])
            body = [r for r in rows[header:] if r and any(c.strip() for c in r)]
            if body and all(len(r) == res["input_dim"] for r in body) and all(map(_numeric_row, body)):
                x = torch.tensor([[float(c) for c in r] for r in body], dtype=torch.float32)
                if not bool(torch.isfinite(x).all()):
                    raise UsageError("--input", f"{path}: the features contain NaN/Inf")
                return x, None, f"csv {path} (features only)"
        except ConfigError as err:
            raise UsageError("--input", str(err).split(": ", 1)[1]) from None
    if path.suffix.lower() == ".npz" and path.is_file():
        try:
            xa, ya = read_npz(path, cfg["data"]["x_key"], cfg["data"]["y_key"], key="--input")
        except ConfigError as err:
            raise UsageError("--input", str(err).split(": ", 1)[1]) from None
        if ya is None:
            x = torch.tensor(numpy.asarray(xa, dtype=numpy.float32))
            if x.dim() == 0 or len(x) == 0 or not bool(torch.isfinite(x).all()):
                raise UsageError("--input", f"{path}: array {cfg['data']['x_key']!r} must be finite "
                                 "numbers, one row per example")
            return x, None, f"npz {path} (no labels)"
    data_cfg = {**cfg["data"], "source": source}
    try:
        x, y, desc = load_arrays(data_cfg, None)
    except ConfigError as err:
        raise UsageError("--input", str(err).split(": ", 1)[1]) from None
    if res["task"] == "classification":
        y = y.long().reshape(-1)
    return x, y, desc


def _numeric_row(row: list[str]) -> bool:
    try:
        [float(c) for c in row]
        return True
    except ValueError:
        return False


def _cmd_predict(args: argparse.Namespace) -> int:
    import torch

    cfg, post, data = _load_run(args.run_dir, args.trust_code)
    res = cfg["resolved"]
    if args.input is None:
        x, y, desc = data.x_test, data.y_test, "the run's held-out test split"
        if len(y) == 0:
            raise UsageError("--input", "the run has no test split (data.test_fraction = 0); pass --input")
    else:
        x, y, desc = _load_inputs(args.input, cfg)
        if res.get("feature_mean") is not None:
            x = (x - torch.tensor(res["feature_mean"])) / torch.tensor(res["feature_std"])
        if x.dim() > 2 and cfg["model"]["factory"] is None:
            x = x.flatten(1)
        if cfg["model"]["factory"] is None and x.shape[1] != res["input_dim"]:
            raise UsageError(
                "--input", f"has {x.shape[1]} features, the model was sampled with {res['input_dim']}"
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = post.predict(x)
    out_path = Path(args.output) if args.output else Path(args.run_dir) / "predictions.csv"
    if out_path.parent and not out_path.parent.exists():
        raise UsageError("--output", f"folder {out_path.parent} does not exist")
    if res["task"] == "classification":
        from .uncertainty import classification_uncertainty

        u = classification_uncertainty(pred)
        p = u.mean_probs.double()
        header = [
            "index",
            "predicted",
            "confidence",
            "entropy",
            "aleatoric",
            "epistemic_mi",
            *[f"p{k}" for k in range(p.shape[1])],
        ] + (["label"] if y is not None else [])
        rows = [
            [
                i,
                int(p[i].argmax()),
                f"{float(p[i].max()):.6g}",
                f"{float(u.predictive_entropy[i]):.6g}",
                f"{float(u.expected_entropy[i]):.6g}",
                f"{float(u.mutual_information[i]):.6g}",
                *[f"{v:.6g}" for v in p[i].tolist()],
            ]
            + ([int(y[i])] if y is not None else [])
            for i in range(len(p))
        ]
    else:
        from .uncertainty import regression_uncertainty

        r = regression_uncertainty(pred, level=args.level)
        cols = {
            "mean": r.mean,
            "sd": r.variance.sqrt(),
            "lower": r.lower,
            "upper": r.upper,
            "epistemic_var": r.epistemic_variance,
        }
        flat = {k: v.double().reshape(len(x), -1)[:, 0] for k, v in cols.items()}
        pct = int(round(100 * args.level))
        header = ["index", "mean", "sd", f"lower_{pct}", f"upper_{pct}", "epistemic_var"] + (
            ["target"] if y is not None else []
        )
        rows = [
            [i, *[f"{float(flat[k][i]):.6g}" for k in cols]]
            + ([float(y.reshape(len(x), -1)[i, 0])] if y is not None else [])
            for i in range(len(x))
        ]
    _write_csv(out_path, header, rows)
    result: dict[str, Any] = {
        "run_dir": str(args.run_dir),
        "input": desc,
        "n": len(x),
        "task": res["task"],
        "draws_used": int(pred.per_draw.shape[0]),
        "output": str(out_path),
    }
    if y is not None:
        result["metrics"] = _predictive_metrics(pred, y, res["task"], args.level)
    text = [f"predicted {len(x)} examples ({desc}) with {result['draws_used']} posterior draws -> {out_path}"]
    if "metrics" in result:
        text.append("  " + ", ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items()))
    _emit(args, result, "\n".join(text))
    return EXIT_OK


# ----------------------------------------------------------------------------------------- iiw
def fisher_iiw(model: Any, loss_fn: Any, data: tuple[Any, Any], theta_0: dict) -> dict:
    """The paper's Fisher IIW ``Δθᵀ F Δθ`` per layer and in total, from :func:`pib_bayes.iiw.fisher`.

    Returns a dict with ``total``, ``per_group``, ``method`` and ``units``: the paper's raw scale
    (``raw_total`` of the result) when the estimator reports it, else the result's own units.
    """
    try:
        from .iiw import fisher

        if not callable(fisher):  # the submodule, with a package that does not re-export the function
            fisher = fisher.fisher
    except (ImportError, AttributeError):
        raise UsageError(
            "iiw",
            "pib_bayes.iiw.fisher is not available in this installation; update pib_bayes "
            "(the Fisher estimator of SPEC §3a is needed to track IIW)",
        ) from None
    r = fisher(model, loss_fn, data, theta_0)
    if r.raw_total is not None and r.raw_per_group is not None:
        return {
            "total": float(r.raw_total),
            "per_group": {k: float(v) for k, v in r.raw_per_group.items()},
            "method": r.method,
            "units": "raw (paper's Δθᵀ F Δθ)",
        }
    return {
        "total": float(r.total),
        "per_group": {k: float(v) for k, v in r.per_group.items()},
        "method": r.method,
        "units": r.units,
    }


def iiw_peak(curve: Sequence[float], smooth: int = 5, steps: Sequence[float] | None = None) -> dict:
    """Locate the fitting -> compression transition of an IIW curve with :func:`pib_bayes.iiw.peak`.

    The curve is smoothed with a centred moving average of ``smooth`` points; the peak is the
    maximum of the smoothed curve. Returned keys: ``index`` and ``epoch`` (``steps[index]``, by
    default the index) of the peak, ``value`` (the raw curve there), ``smoothed_peak``,
    ``final`` (the last raw value), ``relative_fall`` = (smoothed peak - last smoothed value) /
    smoothed peak (the share of the peak still lost at the end, what the reproductions check),
    ``fall_to_min`` (the same to the lowest smoothed value after the peak) and ``interior``
    (false when the maximum is the last point: still fitting).

    >>> p = iiw_peak([0, 1, 2, 4, 3, 1, 1], smooth=3)
    >>> p["index"], round(p["relative_fall"], 4), p["interior"]
    (3, 0.6667, True)
    """
    import numpy as np

    from .iiw import peak

    values = [float(v) for v in curve]
    xs = [float(i) for i in range(len(values))] if steps is None else [float(t) for t in steps]
    if len(values) < 2 or not all(np.isfinite(values)):
        raise ValueError("curve: needs at least 2 finite values (no NaN/Inf)")
    if len(xs) != len(values):
        raise ValueError(f"steps: need one step per value, got {len(xs)} and {len(values)}")
    p = peak(xs, values, window=smooth)
    index = int(np.argmin(np.abs(np.asarray(xs) - p.step)))
    return {"index": index, "epoch": xs[index], "value": values[index], "smoothed_peak": p.value,
            "final": values[-1], "relative_fall": p.final_relative_fall, "fall_to_min": p.relative_fall,
            "interior": bool(p.interior), "smooth": smooth}


def run_iiw(cfg: dict, base_dir: Path, progress: bool) -> tuple[dict, Path]:
    """Train with SGD/Adam and record the Fisher IIW after every epoch (what ``pib-bayes iiw`` does)."""
    import torch
    from tqdm.auto import tqdm

    from ._rng import seeded_global_rng
    from .config import build_model, load_data

    out_dir = _check_output_dir(cfg, "iiw")
    t0 = time.perf_counter()
    data = load_data(cfg["data"], base_dir)
    run, icfg = cfg["run"], cfg["iiw"]
    model = build_model(cfg["model"], data.input_dim, data.output_dim, seed=run["seed"],
                        search_path=[base_dir])
    if data.x_train.dim() > 2 and cfg["model"]["factory"] is None:
        data.x_train, data.x_test = data.x_train.flatten(1), data.x_test.flatten(1)
    loss_fn = _loss_for(cfg, data.task)
    from .energy import resolve_loss

    fn, _ = resolve_loss(loss_fn, data.task)
    theta_0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    if icfg["optimizer"] == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=icfg["lr"], momentum=icfg["momentum"])
    else:
        opt = torch.optim.Adam(model.parameters(), lr=icfg["lr"])
    n = len(data.y_train)
    bs = min(icfg["batch_size"], n)
    gen = torch.Generator().manual_seed(run["seed"] + 7)
    m = min(icfg["fisher_examples"], n)
    fisher_x, fisher_y = data.x_train[:m], data.y_train[:m]
    rows = []
    # dropout (a factory's model in training mode) draws from torch's global RNG: seeded from run.seed
    # for the epochs, the caller's global state left as it was
    with seeded_global_rng(run["seed"]):
        for epoch in tqdm(range(icfg["epochs"] + 1), desc="epochs", disable=not progress, leave=False):
            if epoch > 0:
                model.train()
                perm = torch.randperm(n, generator=gen)
                for start in range(0, n - bs + 1, bs):
                    idx = perm[start : start + bs]
                    opt.zero_grad()
                    fn(model(data.x_train[idx]), data.y_train[idx]).mean().backward()
                    opt.step()
            model.eval()
            est = fisher_iiw(model, loss_fn, (fisher_x, fisher_y), theta_0)
            point = _point_metrics(model, data)
            rows.append(
                {
                    "epoch": epoch,
                    "iiw": est["total"],
                    **{f"iiw[{k}]": v for k, v in est["per_group"].items()},
                    **point,
                }
            )
    curve = [r["iiw"] for r in rows]
    peak = iiw_peak(curve)
    result = {
        "run_dir": str(out_dir),
        "data": data.info(),
        "optimizer": icfg["optimizer"],
        "lr": icfg["lr"],
        "epochs": icfg["epochs"],
        "fisher_examples": m,
        "iiw_method": est["method"],
        "iiw_units": est["units"],
        "peak": peak,
        "final": rows[-1],
        "seconds": round(time.perf_counter() - t0, 2),
        "files": ["iiw.csv", "iiw.png", "iiw.json", "config.json"],
    }
    with _StagedDir(out_dir, cfg["output"]["overwrite"]) as tmp:
        header = list(rows[0])
        _write_csv(tmp / "iiw.csv", header, [[r.get(h) for h in header] for r in rows])
        _plot_iiw_curve(tmp / "iiw.png", rows, peak)
        _atomic_write_text(tmp / "config.json", _dumps(cfg))
        _atomic_write_text(tmp / "iiw.json", _dumps({**result, "curve": rows}))
    return result, out_dir


def _plot_iiw_curve(path: Path, rows: list[dict], peak: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["epoch"] for r in rows], [r["iiw"] for r in rows], "o-", ms=3, label="IIW (Fisher)")
    if peak.get("index") is not None:
        ax.axvline(
            rows[peak["index"]]["epoch"],
            color="C3",
            ls="--",
            lw=1,
            label=f"peak (epoch {rows[peak['index']]['epoch']}, fall {100 * peak['relative_fall']:.0f}%)",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("IIW")
    ax.legend(fontsize=8)
    _atomic_savefig(fig, path)
    plt.close(fig)


def _cmd_iiw(args: argparse.Namespace) -> int:
    cfg, base = _resolve_config(args)
    if args.epochs is not None:
        cfg["iiw"]["epochs"] = args.epochs
    result, _ = run_iiw(cfg, base, progress=not args.quiet and not args.json)
    pk = result["peak"]
    text = [
        f"IIW curve written to {result['run_dir']} ({result['epochs']} epochs, {result['optimizer']}, "
        f"lr={result['lr']}, Fisher on {result['fisher_examples']} examples, {result['iiw_units']})",
        f"  peak at epoch {pk['epoch']:g} (IIW {pk['value']:.4g}); after it IIW falls "
        f"{100 * pk['relative_fall']:.1f}% (to {pk['final']:.4g})",
        "  final: "
        + ", ".join(
            f"{k}={v:.4g}" for k, v in result["final"].items() if k != "epoch" and not k.startswith("iiw[")
        ),
    ]
    _emit(args, result, "\n".join(text))
    return EXIT_OK


# -------------------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object (machine-readable) instead of text"
    )


def _trust(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="trust RUN_DIR: import the model factory its config.json names and read data files "
        "outside it (only for run directories you wrote or whose author you trust)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``pib-bayes`` argument parser (subcommands demo, sample, diagnose, iiw, predict)."""
    parser = argparse.ArgumentParser(
        prog="pib-bayes",
        description="Sample PIB Gibbs posteriors of torch models.",
        epilog="exit codes: 0 ok, 1 internal error, 2 bad input/config, "
        "3 every chain diverged, 4 diagnose --strict failed",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="sample a small MLP posterior on embedded data and compare predictors")
    demo.add_argument("--quick", action="store_true", help="tiny settings (seconds)")
    demo.add_argument("--seed", type=int, default=0)
    _common(demo)
    demo.set_defaults(func=_cmd_demo)

    s = sub.add_parser("sample", help="sample a posterior from a TOML run config into a run directory")
    s.add_argument("--config", required=True, help="TOML run file (see docs/cli.md)")
    s.add_argument("--output", help="run directory (overrides [output] dir)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    s.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from RUN_DIR.checkpoint (same config)")
    s.add_argument("--data", metavar="PATH",
                   help="data source (overrides [data] source): a built-in name, IDX dir, .npz or .csv")
    s.add_argument("--plots", action="store_true", help="also write trace.png, rank.png, energy.png")
    _common(s)
    s.set_defaults(func=_cmd_sample)

    d = sub.add_parser("diagnose", help="R-hat/ESS/MCSE table (ArviZ) and trace/rank plots of a run")
    d.add_argument("run_dir", metavar="RUN_DIR")
    d.add_argument("--projections", type=int, default=4, help="random projections of the weights to diagnose")
    d.add_argument("--probes", type=int, default=2, help="held-out inputs whose predictions are diagnosed")
    d.add_argument("--max-examples", type=int, default=1000, help="examples in the log-likelihood quantity")
    d.add_argument("--seed", type=int, default=0, help="seed of the random projections")
    d.add_argument("--no-plots", action="store_true", help="skip trace.png, rank.png, energy.png")
    d.add_argument("--strict", action="store_true", help="exit 4 when R-hat or ESS is outside the limits")
    d.add_argument("--delta", type=float, default=0.05, help="confidence of the PAC-Bayes bounds (1 - delta)")
    d.add_argument("--no-bounds", action="store_true", help="skip the generalization-bound report")
    _trust(d)
    _common(d)
    d.set_defaults(func=_cmd_diagnose)

    i = sub.add_parser(
        "iiw", help="train (SGD/Adam) while tracking the Fisher IIW; plot the curve and its peak"
    )
    i.add_argument("--config", required=True, help="TOML file: [model], [data], [iiw], [output]")
    i.add_argument("--output", help="output directory (overrides [output] dir)")
    i.add_argument("--overwrite", action="store_true")
    i.add_argument("--epochs", type=int, help="overrides [iiw] epochs")
    i.add_argument("--data", metavar="PATH",
                   help="data source (overrides [data] source): a built-in name, IDX dir, .npz or .csv")
    _common(i)
    i.set_defaults(func=_cmd_iiw)

    p = sub.add_parser("predict", help="posterior-predictive probabilities/intervals of a run on new inputs")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "--input", help="a built-in name, an IDX directory, .npz or .csv (default: the run's test split)"
    )
    p.add_argument("--output", help="CSV to write (default RUN_DIR/predictions.csv)")
    p.add_argument("--level", type=float, default=0.9, help="central credible level of regression intervals")
    _trust(p)
    _common(p)
    p.set_defaults(func=_cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pib-bayes``; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    from ._threads import cap_threads
    from .config import ConfigError
    from .distributed import DistributedSamplingError

    cap_threads()  # no more torch threads than usable cores: idle threads spin (docs/quickstart.md)

    def fail(key: str, message: str, code: int) -> int:
        if getattr(args, "json", False):
            print(_dumps({"error": message, "key": key, "exit_code": code}))
        print(f"error: {message}", file=sys.stderr)
        return code

    try:
        return int(args.func(args))
    except (ConfigError, UsageError) as err:
        return fail(err.key, str(err), EXIT_USAGE)
    except (FileNotFoundError, ValueError) as err:  # validation errors of the library name their argument
        return fail(str(err).split(":", 1)[0], str(err), EXIT_USAGE)
    except DistributedSamplingError as err:  # a peer died, timed out or failed: named in the message
        return fail("<distributed>", str(err), EXIT_FAILED)
    except KeyboardInterrupt:
        return fail("<interrupt>", "interrupted; nothing half-written was left in the output directory", 130)
    except Exception as err:  # a bug: show everything
        traceback.print_exc()
        return fail("<internal>", f"internal error {type(err).__name__}: {err}", EXIT_INTERNAL)


if __name__ == "__main__":
    sys.exit(main())
