"""The numbers quoted in docs/diagnostics.md and docs/bounds.md for issue 19 (numerics), printed.

    python benchmarks/issue19_numerics.py

1. h = 1 on a 2-16-2 MLP: the energies, the initial-energy and warm-up-median references, and the
   divergence flags of both chain methods under the default divergence_threshold.
2. float16/bfloat16: the PrecisionWarning's share of weights a noise-sized change leaves unchanged.
3. kl_inverse(0.2, 1e-15) against the textbook kl in the same bisection.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import pib_bayes as pb
from pib_bayes import bounds as B


def mlp(width: int, classes: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, classes)).to(dtype)


def main() -> None:
    x, y = pb.data.make_classification_data(n=200, num_classes=2, seed=0)
    post = pb.sample(mlp(16, 2), "cross_entropy", (x, y), beta=1 / 200, step_size=1.0, num_warmup=0,
                     num_draws=200, divergence_threshold=None, seed=0)
    e = post.sample_stats["energy"][0].double()
    print("h=1 energies, steps 0-7:", " ".join(f"{v:.2g}" for v in e[:8].tolist()))
    med = float(e[:100].median())
    print(f"U(w_0) = {float(e[0]):.3g}; median of steps 0-99 = {med:.3g}; max of steps 100-199 = "
          f"{float(e[100:].max()):.3g} = {float(e[100:].max()) / med:.3g} x median = "
          f"{float(e[100:].max() / e[0]):.3g} x U(w_0)")
    for method in ("vectorized", "sequential"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = pb.sample(mlp(16, 2), "cross_entropy", (x, y), beta=1 / 200, step_size=1.0, num_chains=2,
                          num_warmup=10, num_draws=30, chain_method=method, seed=0)
        print(f"{method}: diverged {q.diverged.tolist()} at steps {q.divergence_step.tolist()}, "
              f"diverging draws per chain {q.sample_stats['diverging'].sum(1).tolist()}")

    x3, y3 = pb.data.make_classification_data(n=256, num_classes=3, seed=0)
    for dtype in (torch.bfloat16, torch.float16):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            pb.sample(mlp(32, 3, dtype), "cross_entropy", (x3.to(dtype), y3), beta=1 / 256, step_size=1e-6,
                      num_warmup=0, num_draws=2, seed=0)
        msg = next(str(w.message) for w in rec if issubclass(w.category, pb.PrecisionWarning))
        print(f"{dtype}: ...{msg[msg.index('at step size'):msg.index('Sample in')]}")

    lo, hi = 0.2, 1.0
    while hi - lo > 1e-12:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if float(B.binary_kl(0.2, mid)) > 1e-15 else (mid, hi)
    print(f"kl_inverse(0.2, 1e-15) = {B.kl_inverse(0.2, 1e-15):.12f}; textbook kl in the same bisection: "
          f"{hi:.12f}")


if __name__ == "__main__":
    main()
