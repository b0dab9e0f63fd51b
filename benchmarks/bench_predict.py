"""Posterior predictive over 100 draws: ``Posterior.predict`` (vmap of functional_call over chunks of
draws) vs the plain loop ``for draw: model.load_state_dict(draw); softmax(model(x))``.

Both compute the (100, B, 10) per-draw probabilities and their mean for the same inputs; the
benchmark checks they agree (to float rounding) before timing. Models: MLP 784-256-256-10 and
MLP 20-64-64-10, each at B = 256 inputs (compute-bound: 100 forward passes' flops dominate both
ways) and B = 16 inputs (overhead-bound: where batching the draws can pay); draws stored as a
Posterior of 1 chain x 100 draws. Timing is interleaved (see bench_steps.py): median over rounds
of the CPU time per full prediction, one torch thread by default. Ratio = time(loop) /
time(predict), target >= 5.

Also timed, as a bound: the *matmul floor*, the layers' matrix products alone for all 100 draws
(no bias, activation or softmax; weights already stacked in GEMM layout and output buffers
allocated outside the clock), the fastest of six schedules (4, 16 or 100 draws per call; the
first layer as one ``bmm`` or as one GEMM over the draws). An implementation of the same float32
arithmetic can hardly cost less, so ``time(loop) / time(floor)`` is about the most any predict can
gain over the loop here: where it is below 5, the target cannot be met on this machine, and
``time(floor) / time(predict)`` says how close predict comes to the floor.

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
FLOOR_CHUNKS = (4, 16, 100)  # draws per matmul-floor call: the fastest schedule is the floor


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
    weights = [draws[n][0].contiguous() for n, p in model.named_parameters() if p.dim() == 2]
    floors = {f"floor_{layout}_{chunk}": _matmul_floor(x, weights, chunk, layout == "gemm")
              for layout in ("bmm", "gemm") for chunk in FLOOR_CHUNKS}
    return {"loop": loop, "predict": vmapped, **floors}


def _matmul_floor(x: torch.Tensor, weights: list[torch.Tensor], chunk: int, gemm_first: bool):
    """The layers' products alone for every draw, ``chunk`` draws at a time, into buffers allocated
    once (no page faults), the first layer as one bmm or as one GEMM over the chunk's draws."""
    num_draws, batch = weights[0].shape[0], x.shape[0]
    outs = [torch.empty(chunk, batch, w.shape[1]) for w in weights]
    flat_out = torch.empty(batch, chunk * weights[0].shape[1])

    def run() -> None:
        for start in range(0, num_draws, chunk):
            ws = [w[start:start + chunk] for w in weights]
            k = ws[0].shape[0]
            if gemm_first:
                torch.mm(x, ws[0].reshape(-1, x.shape[1]).T, out=flat_out[:, : k * ws[0].shape[1]])
                h = flat_out[:, : k * ws[0].shape[1]].view(batch, k, -1).transpose(0, 1)
            else:
                h = torch.bmm(x.unsqueeze(0).expand(k, *x.shape), ws[0].transpose(1, 2), out=outs[0][:k])
            for w, out in zip(ws[1:], outs[1:], strict=True):
                h = torch.bmm(h, w.transpose(1, 2), out=out[:k])

    return run


def run(quick: bool = False, case: str | None = None, clock: str = "cpu") -> list[dict]:
    rows = []
    for c in [case] if case else list(CASES):
        sizes, batch = CASES[c]
        rounds = 5 if quick else 15
        t = interleaved(candidates(sizes, batch=batch), 1, rounds, clock, warmup=1)
        t["floor"] = min(t.pop(name) for name in [n for n in t if n.startswith("floor_")])
        label = f"predict 100 draws {'-'.join(map(str, sizes))} x{batch}"
        common = {"case": c, "clock": clock, "threads": torch.get_num_threads(), "rounds": rounds}
        for name, base, cand, target in [("predict vs loop", "loop", "predict", TARGET),
                                         ("matmul floor vs loop (the most any predict can gain)", "loop",
                                          "floor", None),
                                         ("predict vs matmul floor", "floor", "predict", None)]:
            rows.append({"name": f"{label}: {name}", "baseline": base, "value": cand, "baseline_s": t[base],
                         "value_s": t[cand], "ratio": t[base] / t[cand], "target": target, **common})
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
        target = f"  (target >= {r['target']})" if r["target"] else ""
        print(f"{r['name']:90s} {r['baseline_s'] * 1e3:8.2f} ms -> {r['value_s'] * 1e3:8.2f} ms  "
              f"ratio {r['ratio']:.2f}{target}", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
