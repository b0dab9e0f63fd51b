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


def fixed_split(path: str, data: dict[str, Any], smoke: bool = False,
                normalize: bool = True) -> dict[str, tuple[torch.Tensor, ...]]:
    """The config's fixed train / prior / test split of the IDX set at ``path``: one permutation seeded
    with ``data["split_seed"]``, the first ``train`` images, the next ``prior``, then ``test``; the same
    for every seed. ``smoke`` keeps the proportions on at most 300 images (the CI set). ``normalize=False``
    gives pixels in [0, 1] instead of standardised ones (for :func:`authors_scaling`)."""
    try:
        x, y = load_mnist(path, normalize=normalize)
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
    the SHA-256 of the config file, of _common.py and of the script that runs, and the process CPU seconds
    so far (``time.process_time``)."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*a: str) -> str:
        try:
            done = subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return ""
        return done.stdout.strip()

    def sha(path: str | Path) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    digest = sha(config_path) if config_path else None
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else None
    code = {p.name: sha(p) for p in (Path(__file__), script) if p is not None and p.is_file()}
    return {"git_commit": git("rev-parse", "HEAD") or None,
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "code_sha256": code,  # the files that ran, whatever else the checkout held
            "config": config_path, "config_sha256": digest,
            "cpu_seconds": round(time.process_time(), 1), "torch_threads": torch.get_num_threads()}


def sign_test(successes: int, n: int) -> float:
    """Exact two-sided sign test: P(a Binomial(n, 1/2) count at least as far from n/2 as ``successes``)."""
    from scipy.stats import binomtest

    return float(binomtest(int(successes), int(n), 0.5).pvalue) if n else float("nan")


def seeds_sign_test(values: Sequence[float], direction: str) -> dict[str, Any]:
    """Across-seed sign test of per-seed statistics (e.g. Spearman ρ) for the predicted ``direction``
    (``"positive"`` or ``"negative"``): k = seeds strictly on the predicted side, out of all n seeds (a tie
    or an undefined NaN value counts against the claim), two-sided exact binomial p (scipy binomtest)."""
    if direction not in ("positive", "negative"):
        raise ValueError(f"direction: expected 'positive' or 'negative', got {direction!r}")
    vals = [float(v) for v in values]
    k = sum((v > 0) if direction == "positive" else (v < 0) for v in vals if math.isfinite(v))
    opposite = sum((v < 0) if direction == "positive" else (v > 0) for v in vals if math.isfinite(v))
    return {"n": len(vals), "k": int(k), "opposite": int(opposite),
            "undefined_or_tied": len(vals) - k - opposite, "p": sign_test(k, len(vals)),
            "values": vals, "direction": direction}


def signed_rank_ci(d: Sequence[float], alpha: float = 0.05) -> tuple[float, float, float]:
    """Hodges-Lehmann estimate and the exact (1 - alpha) confidence interval of the pseudo-median of the
    paired differences ``d``: with the M = n(n+1)/2 sorted Walsh averages (d_i + d_j)/2, i <= j, the
    interval is [W_(c), W_(M+1-c)], c the largest integer with P(T <= c - 1) <= alpha/2 under the null
    law of the Wilcoxon signed-rank statistic T (exact, by counting subsets of the ranks 1..n;
    Hollander & Wolfe, Nonparametric Statistical Methods, §3.3). Returns (estimate, low, high)."""
    import numpy as np

    x = np.asarray(d, dtype=float)
    n = len(x)
    if n < 2:
        return float("nan"), float("nan"), float("nan")
    walsh = np.sort([(x[i] + x[j]) / 2 for i in range(n) for j in range(i, n)])
    counts = np.zeros(n * (n + 1) // 2 + 1)
    counts[0] = 1.0
    for r in range(1, n + 1):  # subsets of {1..n} by their rank sum
        counts[r:] = counts[r:] + counts[:-r].copy()
    cdf = np.cumsum(counts) / 2.0**n
    c = int(np.sum(cdf <= alpha / 2))  # P(T <= c - 1) <= alpha/2
    est = float(np.median(walsh))
    if c < 1:  # too few pairs for an exact interval at this level
        return est, float("-inf"), float("inf")
    return est, float(walsh[c - 1]), float(walsh[len(walsh) - c])


def min_detectable_effect(n_pairs: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference, in standard deviations of the paired differences, that a
    two-sided paired t-test on ``n_pairs`` pairs detects with probability ``power`` at level ``alpha``:
    δ solving P(|T'| > t_{1-alpha/2, n-1}) = power, T' ~ noncentral t(n - 1, δ √n)."""
    from scipy.optimize import brentq
    from scipy.stats import nct, t

    df = n_pairs - 1
    crit = t.ppf(1 - alpha / 2, df)

    def gap(delta: float) -> float:
        nc = delta * math.sqrt(n_pairs)
        return float(nct.sf(crit, df, nc) + nct.cdf(-crit, df, nc)) - power

    if n_pairs < 2:
        return float("nan")
    hi = 1.0
    while gap(hi) < 0:  # power rises with delta; bracket the root (nct is NaN far out, so step gently)
        hi *= 2
    if not math.isfinite(gap(hi)):  # too few pairs: scipy's noncentral t fails before power 0.8
        return float("nan")
    return float(brentq(gap, 1e-6, hi))


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values: with p_(1) <= ... <= p_(m),
    adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)) (Holm 1979)."""
    items = sorted(pvalues.items(), key=lambda kv: kv[1])
    m, out, running = len(items), {}, 0.0
    for j, (name, p) in enumerate(items):
        running = max(running, min(1.0, (m - j) * p))
        out[name] = running
    return out


def paired_comparison(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> dict[str, Any]:
    """Paired a - b over seeds: mean difference with the two-sided paired t-test (scipy ttest_rel) and its
    (1 - alpha) t interval; the Wilcoxon signed-rank test (scipy wilcoxon, two-sided; exact when there are
    no zero or tied differences) with the Hodges-Lehmann interval (:func:`signed_rank_ci`); the sd of the
    differences and the minimal detectable effect (power 0.8) in the same units."""
    import numpy as np
    from scipy.stats import ttest_rel, wilcoxon

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"a, b: need two equally long 1-d sequences (one value per seed), got {x.shape} and "
                         f"{y.shape}")
    d = x - y
    n = len(d)
    sd = float(np.std(d, ddof=1))
    if sd == 0:  # constant differences: the t statistic is undefined (0/0 or c/0)
        t_stat, t_p = float("nan"), (1.0 if d[0] == 0 else 0.0)
        ci_low = ci_high = float(d[0])
    else:
        res = ttest_rel(x, y)
        ci = res.confidence_interval(1 - alpha)
        t_stat, t_p, ci_low, ci_high = float(res.statistic), float(res.pvalue), float(ci.low), float(ci.high)
    if np.all(d == 0):
        w_p = 1.0
    else:
        w_p = float(wilcoxon(d, alternative="two-sided").pvalue)
    hl, lo, hi = signed_rank_ci(d, alpha)
    mde_sd = min_detectable_effect(n, alpha)
    return {"n": n, "mean_diff": float(d.mean()), "sd_diff": sd,
            "t": t_stat, "t_p": t_p, "t_ci": [ci_low, ci_high],
            "wilcoxon_p": w_p, "hodges_lehmann": hl, "wilcoxon_ci": [lo, hi],
            "mde_sd_units": mde_sd, "mde": mde_sd * sd, "differences": d.tolist()}


def scaled_split(path: str, data: dict[str, Any], scaling: str, smoke: bool = False
                 ) -> dict[str, tuple[torch.Tensor, ...]]:
    """:func:`fixed_split` with the inputs of an arm's ``scaling``: ``"once"`` = pixels / 255, standardised
    (:func:`pib_bayes.mnist.load_mnist`); ``"255_squared"`` = the authors' loader (SPEC §5): train and test
    pixels divided by 255 twice (in [0, 1/255]), the prior (their validation) split once (in [0, 1])."""
    if scaling == "once":
        return fixed_split(path, data, smoke)
    if scaling != "255_squared":
        usage_error(f"--config: unknown scaling {scaling!r} (expected 'once' or '255_squared')")
    split = fixed_split(path, data, smoke, normalize=False)
    return {k: ((x / 255.0 if k != "prior" else x), y) for k, (x, y) in split.items()}


def authors_mlp(hidden: Sequence[int], activation: str, seed: int) -> nn.Module:
    """The PIB authors' MNIST MLP (their ``src/models.py`` class, SPEC §5), seeded: ``hidden`` lists the
    hidden widths ("layers" = len(hidden) + 1 weight matrices). With one hidden layer: Linear, activation,
    Linear. With more: the first Linear has NO activation after it, every later hidden Linear has one."""
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "linear": nn.Identity}
    torch.manual_seed(seed)
    dims = [784, *hidden]
    layers: list[nn.Module] = []
    for i in range(len(hidden)):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if len(hidden) == 1 or i > 0:
            layers.append(acts[activation]())
    layers.append(nn.Linear(dims[-1], 10))
    return nn.Sequential(*layers)


def arm_theta0(arm: dict[str, Any], model: nn.Module, prior_data: tuple[torch.Tensor, ...], seed: int
               ) -> dict[str, torch.Tensor]:
    """θ₀ for an arm: ``prior = "paper"``: the authors' prior (``fit_prior_mean(**PAPER_PRIOR)`` on the
    prior split, then the model re-initialised N(0, 0.01²)); ``"held_out_mean"``: ``fit_prior_mean``
    (Adam lr 1e-3, 10 epochs) on the prior split, the model left as it is."""
    from pib_bayes.iiw import PAPER_PRIOR, fit_prior_mean

    if arm["prior"] == "paper":
        return fit_prior_mean(model, "cross_entropy", prior_data, seed=seed, **PAPER_PRIOR)
    if arm["prior"] == "held_out_mean":
        return fit_prior_mean(model, "cross_entropy", prior_data, epochs=10, lr=1e-3, seed=seed)
    usage_error(f"--config: unknown prior {arm['prior']!r} (expected 'paper' or 'held_out_mean')")
    raise AssertionError  # unreachable


def arm_iiw(arm: dict[str, Any], model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            theta_0: dict[str, torch.Tensor], seed: int, smoke: bool = False) -> float:
    """An arm's IIW (raw scale, summed over its tensors): ``iiw.method = "paper"``: the authors' estimator
    ``fisher(method="paper", batch_size, num_batches)`` (batches of at most 100 in smoke mode);
    ``"jvp"``: the per-example Fisher on the first ``examples`` training images (eval mode)."""
    from pib_bayes.iiw import fisher

    spec = dict(arm["iiw"])
    if spec["method"] == "paper":
        b = min(int(spec["batch_size"]), 100) if smoke else int(spec["batch_size"])
        return fisher(model, "cross_entropy", (x, y), theta_0, method="paper", batch_size=b,
                      num_batches=int(spec["num_batches"]), seed=seed).raw_total
    k = min(int(spec.get("examples", len(y))), len(y))
    was = model.training
    model.eval()
    try:
        return fisher(model, "cross_entropy", (x[:k], y[:k]), theta_0).raw_total
    finally:
        model.train(was)


def adam_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, epochs: int,
               batch_size: int, seed: int, every: int | None = None,
               on_record: Any = None, max_steps: int | None = None) -> int:
    """Adam on the mean cross-entropy: ``epochs`` passes of a fresh seeded shuffle (generator seeded
    ``seed + 1``) cut into batches of ``batch_size`` (the last one shorter), stopping after ``max_steps``
    steps if given; ``on_record(step, epoch)`` after step 0 (before training), then every ``every``
    steps, or at the end of every epoch when ``every`` is None. Returns the number of steps."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    step = 0
    if on_record is not None:
        on_record(0, 0.0)
    n = len(y)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        starts = range(0, n, batch_size)
        for j, start in enumerate(starts):
            idx = perm[start:start + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
            if on_record is not None and every is not None and step % every == 0:
                on_record(step, epoch + (j + 1) / len(starts))
            if max_steps is not None and step >= max_steps:
                break
        if on_record is not None and every is None:
            on_record(step, float(epoch + 1))
        if max_steps is not None and step >= max_steps:
            break
    model.eval()
    return step


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub/mkdocs markdown table (floats as given: format them before)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


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
