"""Posterior predictive over 100 draws: ``Posterior.predict`` (vmap of functional_call over chunks of
draws) vs the plain loop ``for draw: model.load_state_dict(draw); softmax(model(x))``.

Both compute the (100, B, 10) per-draw probabilities and their mean for the same inputs; the
benchmark checks they agree (to float rounding) before timing. Models: MLP 784-256-256-10 and
MLP 20-64-64-10, each at B = 256 inputs (compute-bound: 100 forward passes' flops dominate both
ways) and B = 16 inputs (overhead-bound: where batching the draws can pay); draws stored as a
Posterior of 1 chain x 100 draws. Timing is interleaved (see bench_steps.py): median over rounds
of the CPU time per full prediction, one torch thread by default. Ratio = time(loop) /
time(predict), target >= 5.

    python benchmarks/bench_predict.py [--quick] [--case mlp784|mlp20|mlp784_x16|mlp20_x16] [--out rows.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_steps import CLOCKS, interleaved, mlp  # noqa: E402

from pib_bayes import Posterior  # noqa: E402

# name -> (layer sizes, number of inputs x)
CASES = {"mlp784": ((784, 256, 256, 10), 256), "mlp20": ((20, 64, 64, 10), 256),
         "mlp784_x16": ((784, 256, 256, 10), 16), "mlp20_x16": ((20, 64, 64, 10), 16)}
TARGET = 5.0


def candidates(sizes: tuple[int, ...], num_draws: int = 100, batch: int = 256, seed: int = 0):
    torch.manual_seed(seed)
    model = mlp(sizes)
    x = torch.randn(batch, sizes[0])
    draws = {n: p.detach() + 0.05 * torch.randn(1, num_draws, *p.shape) for n, p in model.named_parameters()}
    post = Posterior(draws, {}, {"task": "classification"}, model=model)

    def vmapped() -> torch.Tensor:
        return post.predict(x).per_draw

    @torch.no_grad()
    def loop() -> torch.Tensor:
        outs = []
        for m in range(num_draws):
            model.load_state_dict({n: v[0, m] for n, v in draws.items()})
            outs.append(torch.softmax(model(x), dim=-1))
        return torch.stack(outs)

    torch.testing.assert_close(vmapped(), loop(), rtol=1e-5, atol=1e-6)
    return {"loop": loop, "predict": vmapped}


def run(quick: bool = False, case: str | None = None, clock: str = "cpu") -> list[dict]:
    rows = []
    for c in [case] if case else list(CASES):
        sizes, batch = CASES[c]
        rounds = 5 if quick else 15
        t = interleaved(candidates(sizes, batch=batch), 1, rounds, clock, warmup=1)
        rows.append({"name": f"predict 100 draws {'-'.join(map(str, sizes))} x{batch}: predict vs loop",
                     "baseline": "loop", "value": "predict", "baseline_s": t["loop"], "value_s": t["predict"],
                     "ratio": t["loop"] / t["predict"], "target": TARGET, "case": c, "clock": clock,
                     "threads": torch.get_num_threads(), "rounds": rounds})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", choices=list(CASES))
    ap.add_argument("--clock", choices=list(CLOCKS), default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.quick, args.case, args.clock)
    for r in rows:
        print(f"{r['name']:60s} {r['baseline_s'] * 1e3:8.2f} ms -> {r['value_s'] * 1e3:8.2f} ms  "
              f"ratio {r['ratio']:.2f}  (target >= {r['target']})", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
