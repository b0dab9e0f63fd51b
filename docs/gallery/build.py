"""Build the gallery: run short examples and write their figures next to this file.

    python docs/gallery/build.py            # about a minute of CPU; .ci/run runs it before mkdocs build

Every figure comes from pib_bayes itself (pib_bayes.plots where a plot function exists) on data the
package generates, so nothing is downloaded. The PNGs are committed (the docs build without running
this) and CI rebuilds them, so a change that breaks an example breaks CI. docs/gallery.md shows them.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["savefig.dpi"] = 72  # small files: the PNGs are committed

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

import pib_bayes as pb  # noqa: E402
from pib_bayes.iiw import IIWTracker, kl  # noqa: E402
from pib_bayes.plots import plot_rank, plot_regression_band, plot_reliability, plot_trace  # noqa: E402
from pib_bayes.uncertainty import classification_uncertainty, regression_uncertainty  # noqa: E402

OUT = Path(__file__).resolve().parent
DPI = 72


def mlp(d_in: int, d_out: int, hidden: int = 32) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, d_out))


def pretrain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss, steps: int, lr: float = 1e-2) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()


def classification() -> None:
    """Four SGLD chains on spirals: trace and rank plots of the scalar summaries, reliability diagram."""
    x, y = pb.data.make_classification_data(n=1400, num_classes=3, noise=0.6, seed=0)
    x_tr, y_tr, x_te, y_te = x[:400], y[:400], x[400:], y[400:]
    torch.manual_seed(0)
    model = mlp(2, 3)
    pretrain(model, x_tr, y_tr, F.cross_entropy, 800)
    post = pb.sample(model, "cross_entropy", (x_tr, y_tr), beta=1 / len(y_tr), prior=1.0, step_size=2e-4,
                     num_chains=4, num_warmup=1000, num_draws=200, thin=5, batch_size=100, seed=0)
    plot_trace(post, OUT / "trace.png", data=(x_te[:200], y_te[:200]), probe_x=x_te[:1], num_projections=2)
    plot_rank(post, OUT / "rank.png", data=(x_te[:200], y_te[:200]), probe_x=x_te[:1], num_projections=2)
    u = classification_uncertainty(post.predict(x_te), y_te)
    plot_reliability(u, OUT / "reliability.png")
    print(f"  classification: test accuracy {u.accuracy:.3f}, NLL {u.nll:.3f}, ECE {u.ece:.3f}")


def regression() -> None:
    """Predictive band of a Bayesian MLP on 1-d data with a gap: wider where there are no data."""
    x, y = pb.data.make_regression_data(n=160, noise_std=0.3, seed=0)
    keep = (x[:, 0] < -0.6) | (x[:, 0] > 0.4)  # a gap in the inputs
    x, y = x[keep], y[keep]
    torch.manual_seed(0)
    model = mlp(1, 1)
    loss = pb.GaussianLoss(0.3)
    pretrain(model, x, y, F.mse_loss, 800)
    post = pb.sample(model, loss, (x, y), beta=1 / len(y), prior=1.0, step_size=3e-5, num_chains=4,
                     num_warmup=1000, num_draws=100, thin=10, seed=0)
    grid = torch.linspace(float(x.min()) - 0.5, float(x.max()) + 0.5, 200).unsqueeze(1)
    u = regression_uncertainty(post.predict(grid), level=0.9)
    plot_regression_band(grid, u, OUT / "band.png")
    on_train = regression_uncertainty(post.predict(x), y, level=0.9)
    print(f"  regression: 90% interval coverage on the training points {on_train.coverage:.3f}")


def iiw_curve() -> None:
    """IIW of an MLP tracked during Adam training: it rises while fitting, then falls (compression)."""
    x, y = pb.data.make_classification_data(n=600, num_classes=3, noise=0.5, seed=1)
    torch.manual_seed(1)
    model = mlp(2, 3, hidden=64)
    tracker = IIWTracker(model, "cross_entropy", (x[:300], y[:300]), every=10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    tracker.attach(opt)
    for _ in range(1500):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    steps, total = tracker.curve()
    pk = tracker.peak(window=9)
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    ax.plot(steps, total, lw=1, label="IIW (Fisher, all layers)")
    for g, vals in tracker.curves().items():
        if g != "total":
            ax.plot(steps, vals, lw=0.8, alpha=0.7, label=f"layer {g}")
    ax.axvline(pk.step, color="k", ls="--", lw=1, label=f"peak at step {pk.step:.0f}")
    ax.set_xlabel("Adam step")
    ax.set_ylabel(r"$\Delta\theta^\top F \Delta\theta$")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(OUT / "iiw_curve.png", dpi=DPI)
    print(f"  IIW: peak at step {pk.step:.0f}, relative fall after it {pk.relative_fall:.2f}")


def frontier() -> None:
    """The PIB trade-off: test accuracy, generalization gap and IIW (KL bound) across beta."""
    x, y = pb.data.make_classification_data(n=1200, num_classes=3, noise=0.6, seed=2)
    x_tr, y_tr, x_te, y_te = x[:200], y[:200], x[200:], y[200:]
    temps = [0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
    rows = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        init = mlp(2, 3, hidden=16)
        start = mlp(2, 3, hidden=16)
        start.load_state_dict(init.state_dict())
        pretrain(start, x_tr, y_tr, F.cross_entropy, 500)
        for t in temps:
            model = mlp(2, 3, hidden=16)
            model.load_state_dict(start.state_dict())
            prior = pb.GaussianPrior.from_module(init, std=1.0)  # fixed before training, as for bounds
            beta = t / len(y_tr)
            post = pb.sample(model, "cross_entropy", (x_tr, y_tr), beta=beta, prior=prior,
                             step_size=2e-4 * t ** 0.5, num_chains=2, num_warmup=600, num_draws=40, thin=5,
                             batch_size=100, seed=seed)
            acc = {}
            for split, (xs, ys) in {"train": (x_tr, y_tr), "test": (x_te, y_te)}.items():
                acc[split] = float((post.predict(xs).mean.argmax(-1) == ys).double().mean())
            info = kl(post, prior).total
            rows.append((t, seed, acc["test"], acc["train"] - acc["test"], info))
    fig = Figure(figsize=(10, 3.2))
    axes = fig.subplots(1, 3)
    for ax, col, label in zip(axes, (2, 3, 4), ("test accuracy", "gap (train - test accuracy)",
                                                "IIW bound: KL(q||p), nats")):
        for seed in (0, 1):
            pts = [(r[0], r[col]) for r in rows if r[1] == seed]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, label=f"seed {seed}")
        ax.set_xscale("log")
        ax.set_xlabel(r"temperature $T = n\beta$")
        ax.set_title(label, fontsize="medium")
    if rows and all(r[4] > 0 for r in rows):
        axes[2].set_yscale("log")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(OUT / "frontier.png", dpi=DPI)
    for r in rows:
        print(f"  frontier: T={r[0]:<5g} seed {r[1]}: test acc {r[2]:.3f}, gap {r[3]:+.3f}, KL {r[4]:.1f}")


def main() -> int:
    torch.set_num_threads(1)
    t_all = time.process_time()
    for job in (classification, regression, iiw_curve, frontier):
        t0 = time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            job()
        print(f"{job.__name__}: {time.process_time() - t0:.1f} s CPU")
    print(f"gallery: {time.process_time() - t_all:.1f} s CPU, figures in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
