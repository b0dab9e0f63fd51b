"""The demo: sample a small MLP's PIB posterior on embedded (generated) data.

Trains the MLP with Adam to a point estimate, then runs SGLD chains from it on the Gibbs posterior
with beta = 1/n (the Bayesian posterior for the cross-entropy loss) and compares, on held-out
data, the posterior predictive with the single trained weights. Nothing is downloaded.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ._rng import seeded_global_rng
from .data import make_classification_data
from .driver import sample

__all__ = ["run_demo", "make_mlp"]


def make_mlp(dim_in: int, hidden: int, dim_out: int, depth: int = 2, activation: type[nn.Module] = nn.Tanh
             ) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = dim_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), activation()]
        d = hidden
    layers.append(nn.Linear(d, dim_out))
    return nn.Sequential(*layers)


def _metrics(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    nll = F.nll_loss(torch.log(probs.clamp_min(1e-12)), y).item()
    return {"accuracy": (probs.argmax(-1) == y).double().mean().item(), "nll": nll}


def run_demo(quick: bool = False, seed: int = 0, progress: bool = False) -> dict:
    """Run the demo; returns a dict of metrics (``quick`` shrinks it for smoke tests).

    ``seed`` seeds everything random (the data, the MLP's initial weights, the chains); the MLP is
    built and trained with torch's global RNG seeded from it inside ``torch.random.fork_rng``, so
    the caller's global RNG state is left as it was.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be an int >= 0, got {seed!r}")
    with seeded_global_rng(seed):
        return _run_demo(quick, seed, progress)


def _run_demo(quick: bool, seed: int, progress: bool) -> dict:
    t0 = time.perf_counter()
    n_train = 300 if quick else 400
    x, y = make_classification_data(n=n_train + 2000, num_classes=3, noise=0.6, seed=seed)
    x_tr, y_tr, x_te, y_te = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    model = make_mlp(2, 32, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200 if quick else 1500):  # long enough to overfit a little: the point of the demo
        opt.zero_grad()
        F.cross_entropy(model(x_tr), y_tr).backward()
        opt.step()
    with torch.no_grad():
        point = _metrics(torch.softmax(model(x_te), -1), y_te)
        point_train = _metrics(torch.softmax(model(x_tr), -1), y_tr)
    post = sample(model, "cross_entropy", (x_tr, y_tr), beta=1.0 / n_train, prior=1.0,
                  step_size=2e-4, num_chains=4, num_warmup=200 if quick else 2000,
                  num_draws=50 if quick else 200, thin=5 if quick else 20, batch_size=100, seed=seed,
                  progress=progress)
    pred = post.predict(x_te)
    bayes = _metrics(pred.mean, y_te)
    return {
        "n_train": n_train, "n_test": len(y_te), "beta": post.metadata["beta"], "chains": post.num_chains,
        "draws_per_chain": post.num_draws, "chain_method": post.metadata["chain_method"],
        "diverged_chains": int(post.diverged.sum()),
        "point_estimate": point, "point_estimate_train": point_train, "posterior_predictive": bayes,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def format_demo(result: dict) -> str:
    p, b = result["point_estimate"], result["posterior_predictive"]
    return "\n".join([
        f"pib_bayes demo: 3-class spirals, n_train={result['n_train']}, n_test={result['n_test']}, "
        f"beta=1/n={result['beta']:.2e}",
        f"  {result['chains']} SGLD chains x {result['draws_per_chain']} draws ({result['chain_method']}), "
        f"{result['diverged_chains']} diverged, {result['seconds']} s",
        "",
        "  | predictor                      | test accuracy | test NLL |",
        "  |--------------------------------|---------------|----------|",
        f"  | single trained weights (Adam)  | {p['accuracy']:13.3f} | {p['nll']:8.3f} |",
        f"  | PIB posterior predictive (SGLD)| {b['accuracy']:13.3f} | {b['nll']:8.3f} |",
    ])
