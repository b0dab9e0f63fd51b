"""Cost of last-layer Bayesian sampling (``sample(..., params=model[-1])``) against sampling every weight,
and against sampling the head alone on precomputed features (the same posterior for a fixed body).

MLP 2-256-256-3 on 2000 spiral points, 4 chains, 400 SGLD steps (300 warm-up, 100 draws), batch 128.
Process CPU time (one torch thread), the three variants interleaved in each of ``--rounds`` rounds;
the medians and their ratios to the full run are printed (docs/howto/last_layer.md).

    python benchmarks/bench_last_layer.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import pib_bayes as pb


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = pb.data.make_classification_data(n=2000, num_classes=3)
    kw = dict(beta=1 / len(y), step_size=1e-4, num_chains=4, num_warmup=300, num_draws=100, batch_size=128,
              seed=0)
    times: dict[str, list[float]] = {"every weight": [], "last layer (params=)": [], "head on features": []}
    for _ in range(args.rounds):
        for name in times:
            model = _net()
            t = time.process_time()
            if name == "every weight":
                pb.sample(model, "cross_entropy", (x, y), **kw)
            elif name == "last layer (params=)":
                pb.sample(model, "cross_entropy", (x, y), params=model[-1], **kw)
            else:
                with torch.no_grad():
                    phi = model[:-1](x)
                pb.sample(model[-1], "cross_entropy", (phi, y), **kw)
            times[name].append(time.process_time() - t)
    full = statistics.median(times["every weight"])
    for name, ts in times.items():
        med = statistics.median(ts)
        rounds = [round(t, 3) for t in ts]
        print(f"{name:24s} median {med:.3f} s CPU  ({med / full:.2f}x the full run)  rounds {rounds}")


if __name__ == "__main__":
    main()
