"""Shared pieces of the paper reproductions (SPEC §5): data, MLPs, training while tracking IIW, outputs.

Every example trains MLPs on MNIST (the 10k t10k set by default, given by ``--data``), records the
Fisher IIW Δθᵀ F Δθ (SPEC §3a, the paper's raw scale, Δθ = θ_t - θ_0 with θ_0 the initialisation)
after every epoch with :func:`pib_bayes.iiw.fisher`, and writes a CSV, a PNG and a JSON summary.
``--smoke`` shrinks everything to seconds (what CI runs); flags scale the defaults up.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pib_bayes.cli import iiw_peak
from pib_bayes.config import build_mlp
from pib_bayes.mnist import IDXError, load_mnist

DEFAULT_DATA = "../shared/data/mnist"


def base_parser(
    description: str, *, n_train: int, n_test: int, epochs: int, lr: float = 0.01
) -> argparse.ArgumentParser:
    """Arguments shared by every example (each adds its own sweep flags)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", default=DEFAULT_DATA, help="directory with MNIST IDX files (t10k-* or train-*)")
    p.add_argument("--out", default=None, help="output directory (default examples/output/<script>)")
    p.add_argument("--n-train", type=int, default=n_train, help="training examples drawn from the IDX set")
    p.add_argument("--n-test", type=int, default=n_test, help="held-out examples (disjoint from training)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--lr", type=float, default=lr, help="SGD learning rate")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--fisher-n", type=int, default=1000, help="training examples in the Fisher estimate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds): what CI runs")
    return p


def setup(args: argparse.Namespace, name: str) -> Path:
    """Apply --threads and --smoke (which shrinks the sizes) and create the output directory."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.n_train = min(args.n_train, 200)
        args.n_test = min(args.n_test, 100)
        args.epochs = min(args.epochs, 3)
        args.fisher_n = min(args.fisher_n, 100)
        args.batch_size = min(args.batch_size, 50)
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "output" / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def usage_error(message: str) -> None:
    """Print ``error: message`` on stderr and exit with status 2 (bad usage), like the CLI."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_split(path: str, n_train: int, n_test: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Disjoint random train/test subsets of the IDX set at ``path``."""
    try:
        x, y = load_mnist(path)
    except (FileNotFoundError, IDXError) as err:
        usage_error(f"--data: {err}")
    if n_train + n_test > len(y):
        usage_error(f"--n-train + --n-test = {n_train + n_test} exceeds the {len(y)} examples in {path}; "
                    "lower them")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    return x[tr], y[tr], x[te], y[te]


def load_config(path: str) -> dict[str, Any]:
    """A pre-registered reproduction config (``examples/configs/*.toml``); a usage error if unreadable."""
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as err:
        usage_error(f"--config: cannot read {path}: {err}")
    raise AssertionError  # unreachable: usage_error exits


def fixed_split(path: str, data: dict[str, Any], smoke: bool = False) -> dict[str, tuple[torch.Tensor, ...]]:
    """The config's fixed train / prior / test split of the IDX set at ``path``: one permutation seeded
    with ``data["split_seed"]``, the first ``train`` images, the next ``prior``, then ``test``; the same
    for every seed. ``smoke`` keeps the proportions on at most 300 images (the CI set)."""
    try:
        x, y = load_mnist(path)
    except (FileNotFoundError, IDXError) as err:
        usage_error(f"--data: {err}")
    sizes = [int(data[k]) for k in ("train", "prior", "test")]
    if smoke:
        scale = min(1.0, 300 / sum(sizes), len(y) / sum(sizes))
        sizes = [max(10, int(s * scale)) for s in sizes]
    if sum(sizes) > len(y):
        usage_error(f"--config: the split {sizes} needs {sum(sizes)} images, {path} has {len(y)}")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(int(data["split_seed"])))
    a, b = sizes[0], sizes[0] + sizes[1]
    parts = {"train": perm[:a], "prior": perm[a:b], "test": perm[b:b + sizes[2]]}
    return {k: (x[i], y[i]) for k, i in parts.items()}


def provenance(config_path: str | None) -> dict[str, Any]:
    """Where a result came from: the git commit of the checkout (and whether it had uncommitted changes),
    the SHA-256 of the config file, and the process CPU seconds so far (``time.process_time``)."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*a: str) -> str:
        try:
            done = subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return ""
        return done.stdout.strip()

    digest = hashlib.sha256(Path(config_path).read_bytes()).hexdigest() if config_path else None
    return {"git_commit": git("rev-parse", "HEAD") or None,
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "config": config_path, "config_sha256": digest,
            "cpu_seconds": round(time.process_time(), 1), "torch_threads": torch.get_num_threads()}


def sign_test(successes: int, n: int) -> float:
    """Exact two-sided sign test: P(a Binomial(n, 1/2) count at least as far from n/2 as ``successes``)."""
    from scipy.stats import binomtest

    return float(binomtest(int(successes), int(n), 0.5).pvalue) if n else float("nan")


def mlp(
    hidden: Sequence[int], activation: str, seed: int, input_dim: int = 784, output_dim: int = 10
) -> nn.Module:
    """A seeded MLP (``pib_bayes.config.build_mlp``, the same builder as the CLI)."""
    torch.manual_seed(seed)
    return build_mlp(input_dim, output_dim, list(hidden), activation)


def fisher_iiw(model: nn.Module, x: torch.Tensor, y: torch.Tensor, theta_0: dict[str, torch.Tensor]) -> dict:
    """Fisher IIW on the paper's raw scale, per layer and in total (:func:`pib_bayes.iiw.fisher`, JVP)."""
    from pib_bayes.cli import fisher_iiw as lib_fisher

    return lib_fisher(model, "cross_entropy", (x, y), theta_0)


def accuracy_and_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = model(x)
    return float((out.argmax(-1) == y).double().mean()), float(F.cross_entropy(out, y))


def train_tracking_iiw(
    model: nn.Module,
    x_tr: torch.Tensor,
    y_tr: torch.Tensor,
    x_te: torch.Tensor,
    y_te: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    fisher_n: int,
    seed: int,
    momentum: float = 0.0,
    label: str = "",
    evals_per_epoch: int = 1,
    only_final: bool = False,
) -> list[dict[str, Any]]:
    """Plain minibatch SGD, recording the Fisher IIW and the metrics as it goes.

    IIW is evaluated before the first step and then ``evals_per_epoch`` times per epoch (evenly
    spaced in steps; ``epoch`` is then fractional), or only at the end with ``only_final``.
    Returns one row per evaluation: epoch, iiw, iiw per layer, train/test accuracy and loss, gap
    (train accuracy - test accuracy) and loss_gap (test loss - train loss).
    """
    theta_0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed + 1)
    n = len(y_tr)
    bs = min(batch_size, n)
    steps_per_epoch = n // bs
    marks = {round(steps_per_epoch * (j + 1) / evals_per_epoch) for j in range(evals_per_epoch)}
    fx, fy = x_tr[:fisher_n], y_tr[:fisher_n]
    rows: list[dict[str, Any]] = []

    def record(epoch: float) -> None:
        model.eval()
        est = fisher_iiw(model, fx, fy, theta_0)
        tr_acc, tr_loss = accuracy_and_loss(model, x_tr, y_tr)
        te_acc, te_loss = accuracy_and_loss(model, x_te, y_te)
        if not math.isfinite(tr_loss):
            print(f"error: training diverged ({label}, epoch {epoch}); lower --lr", file=sys.stderr)
            raise SystemExit(3)
        rows.append(
            {
                "run": label,
                "epoch": round(epoch, 4),
                "iiw": est["total"],
                **{f"iiw[{k}]": v for k, v in est["per_group"].items()},
                "train_acc": tr_acc,
                "test_acc": te_acc,
                "train_loss": tr_loss,
                "test_loss": te_loss,
                "gap": tr_acc - te_acc,
                "loss_gap": te_loss - tr_loss,
                "iiw_method": est["method"],
            }
        )
        model.train()

    if not only_final:
        record(0.0)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for step in range(steps_per_epoch):
            idx = perm[step * bs : (step + 1) * bs]
            opt.zero_grad()
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
            if not only_final and step + 1 in marks:
                record(epoch + (step + 1) / steps_per_epoch)
    if only_final:
        record(float(epochs))
    model.eval()
    return rows


def train_final_and_peak(
    model: nn.Module,
    x_tr: torch.Tensor,
    y_tr: torch.Tensor,
    x_te: torch.Tensor,
    y_te: torch.Tensor,
    **kwargs: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train with :func:`train_tracking_iiw` (IIW every epoch) and return (final row, curve).

    The final row gains ``iiw_peak`` (the largest IIW seen during training) and ``iiw_peak_epoch``.
    """
    curve = train_tracking_iiw(model, x_tr, y_tr, x_te, y_te, **kwargs)
    top = max(curve, key=lambda r: r["iiw"])
    final = {**curve[-1], "iiw_peak": top["iiw"], "iiw_peak_epoch": top["epoch"]}
    return final, curve


def peak_of(rows: list[dict[str, Any]], smooth: int = 5) -> dict:
    """Peak of the rows' IIW curve over their epochs (:func:`pib_bayes.cli.iiw_peak`, i.e.
    :func:`pib_bayes.iiw.peak` with a ``smooth``-point moving average)."""
    return iiw_peak([r["iiw"] for r in rows], smooth=smooth, steps=[r["epoch"] for r in rows])


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """All rows (the union of their keys as columns), written atomically."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    _atomic_text(path, buf.getvalue())


def write_json(path: Path, obj: Any) -> None:
    _atomic_text(path, json.dumps(obj, indent=2, default=str))


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure atomically (temporary file + rename), then close it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.tight_layout()  # keeps the suptitle clear of the panel titles
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        pyplot().close(fig)  # pyplot keeps every figure alive until it is closed


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (scipy); NaN when either side is constant."""
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.t0, 1)


def verdict(ok: bool) -> str:
    return "REPRODUCED" if ok else "NOT REPRODUCED"
