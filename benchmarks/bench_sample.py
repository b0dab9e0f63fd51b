"""End-to-end throughput of the two documented ways to sample, against minimal hand-written loops.

Issue 17's targets (ratios are throughput ratios ``time(baseline) / time(candidate)``, >= target is good):

* ``sample() 1 chain vs hand-written SGLD loop`` (target 0.9): one ``pib_bayes.sample`` call (SGLD, one
  chain, Gaussian prior sigma_0 = 1 centred at the initial weights, ``beta = 1/n``, minibatches of
  ``batch`` out of n = 2048 random examples, half the steps warm-up, half kept with ``keep=["0.bias"]``),
  per step, against :func:`hand_loop`: the least code that runs the same chain (per-epoch
  ``torch.randperm`` minibatches, the prior gradient ``(w - w0) / sigma^2`` added to the likelihood's,
  one ``torch.randn`` per step into a flat buffer, ``w <- w - h grad U + sqrt(2 h) xi``).
* ``optim.SGLD + Energy.of_module vs torch SGD + naive prior`` (target 0.9): one training iteration on a
  fixed minibatch, ``zero_grad(); energy.of_module(x, y).backward(); opt.step()`` against
  ``zero_grad(); (loss/beta + sum_j ||w_j - w0_j||^2 / (2 s^2)).backward(); torch.optim.SGD.step()``;
  also against that step plus one ``torch.randn`` per weight (the floor: what any exact Langevin step
  adds to SGD), no target.

On MLP 20-64-64-10 (batch 64) and MLP 784-256-256-10 (batch 128), cross-entropy. Timing is process CPU
time with one torch thread, interleaved rounds in a rotated order, each figure the median over rounds
(see :func:`bench_steps.interleaved`); a ``sample()`` call's setup (energy, prior, buffers) is part of
its time, spread over its steps.

    flock /tmp/pib_heavy.lock python benchmarks/bench_sample.py [--quick] [--case mlp20|mlp784]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_steps import CASES, interleaved, mlp  # noqa: E402

import pib_bayes  # noqa: E402
from pib_bayes import Energy  # noqa: E402
from pib_bayes.optim import SGLD  # noqa: E402

TARGET = 0.9
N = 2048


def hand_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int, h: float,
              beta: float, sigma: float, seed: int) -> None:
    """The minimal SGLD chain: per-epoch permutation minibatches, closed-form Gaussian prior gradient,
    one ``torch.randn`` per step."""
    params = [p for p in model.parameters()]
    w0 = [p.detach().clone() for p in params]
    d = sum(p.numel() for p in params)
    buf = torch.empty(d)
    views, off = [], 0
    for p in params:
        views.append(buf[off:off + p.numel()].view(p.shape))
        off += p.numel()
    noise_gen, data_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    n, pos, perm = x.shape[0], x.shape[0], torch.empty(0, dtype=torch.long)
    inv_var, amp = 1.0 / sigma**2, math.sqrt(2 * h)
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=data_gen), 0
        idx = perm[pos:pos + batch]
        pos += batch
        for p in params:
            p.grad = None
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        (loss / beta).backward()
        torch.randn(d, generator=noise_gen, out=buf)
        with torch.no_grad():
            for p, m, z in zip(params, w0, views):
                p.grad.add_(p - m, alpha=inv_var)
                p.add_(p.grad, alpha=-h).add_(z, alpha=amp)


def sample_candidates(sizes: tuple[int, ...], batch: int, steps: int, seed: int = 0) -> dict[str, Callable]:
    torch.manual_seed(seed)
    base = mlp(sizes)
    x, y = torch.randn(N, sizes[0]), torch.randint(0, sizes[-1], (N,))
    h = 1e-6

    def run_sample() -> None:
        pib_bayes.sample(base, "cross_entropy", (x, y), beta=1 / N, prior=1.0, step_size=h,
                         num_warmup=steps // 2, num_draws=steps - steps // 2, batch_size=batch,
                         keep=["0.bias"], seed=seed)

    def run_loop() -> None:
        hand_loop(copy.deepcopy(base), x, y, batch, steps, h, 1 / N, 1.0, seed)

    return {"hand_loop": run_loop, "sample": run_sample}


def optimizer_candidates(sizes: tuple[int, ...], batch: int, seed: int = 0) -> dict[str, Callable]:
    torch.manual_seed(seed)
    base = mlp(sizes)
    x, y = torch.randn(batch, sizes[0]), torch.randint(0, sizes[-1], (batch,))
    beta, sigma = 1 / N, 1.0

    def torch_sgd(noise: bool = False) -> Callable[[], None]:
        model = copy.deepcopy(base)
        params = list(model.parameters())
        w0 = [p.detach().clone() for p in params]
        opt = torch.optim.SGD(params, lr=1e-10)
        d = sum(p.numel() for p in params)
        buf, gen = torch.empty(d), torch.Generator().manual_seed(seed + 2)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y) / beta
            prior = sum(((w - m) ** 2).sum() for w, m in zip(params, w0)) / (2 * sigma**2)
            (loss + prior).backward()
            opt.step()
            if noise:  # the floor: the least a Langevin step adds, one Gaussian draw per weight
                torch.randn(d, generator=gen, out=buf)

        return step

    def pib_sgld() -> Callable[[], None]:
        model = copy.deepcopy(base)
        energy = Energy(model, "cross_entropy", prior=sigma, beta=beta)
        opt = SGLD(model.parameters(), lr=1e-10, generator=torch.Generator().manual_seed(seed + 1))

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            energy.of_module(x, y).backward()
            opt.step()

        return step

    return {"sgd_naive_prior": torch_sgd(), "floor_naive_prior": torch_sgd(noise=True),
            "sgld_energy": pib_sgld()}


def run_case(case: str, quick: bool = False) -> list[dict]:
    sizes, batch = CASES[case]
    label = f"{'-'.join(map(str, sizes))} b{batch}"
    rows = []
    steps = 100 if case == "mlp784" else 400
    rounds = 5 if quick else 15
    t = interleaved(sample_candidates(sizes, batch, steps), 1, rounds, "cpu", warmup=1)
    common = {"case": case, "clock": "cpu", "threads": torch.get_num_threads(), "rounds": rounds}
    rows.append({"name": f"sample() 1 chain {label}: vs hand-written SGLD loop", "baseline": "hand_loop",
                 "value": "sample", "baseline_s": t["hand_loop"] / steps, "value_s": t["sample"] / steps,
                 "ratio": t["hand_loop"] / t["sample"], "target": TARGET, "steps": steps, **common})
    block = 5 if case == "mlp784" else 20
    t = interleaved(optimizer_candidates(sizes, batch), block, 7 if quick else 31, "cpu")
    rows.append({"name": f"optim.SGLD + Energy.of_module {label}: vs torch SGD + naive prior",
                 "baseline": "sgd_naive_prior", "value": "sgld_energy", "baseline_s": t["sgd_naive_prior"],
                 "value_s": t["sgld_energy"], "ratio": t["sgd_naive_prior"] / t["sgld_energy"],
                 "target": TARGET, "block": block, **common})
    rows.append({"name": f"optim.SGLD + Energy.of_module {label}: vs floor (SGD + naive prior + randn)",
                 "baseline": "floor_naive_prior", "value": "sgld_energy",
                 "baseline_s": t["floor_naive_prior"], "value_s": t["sgld_energy"],
                 "ratio": t["floor_naive_prior"] / t["sgld_energy"],
                 "target": None, "block": block, **common})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    ap.add_argument("--case", choices=list(CASES), help="one model only (default: both)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for case in [args.case] if args.case else ["mlp20", "mlp784"]:
        rows += run_case(case, args.quick)
    for r in rows:
        print(f"{r['name']:70s} {r['baseline_s'] * 1e6:9.1f} us -> {r['value_s'] * 1e6:9.1f} us"
              f"  ratio {r['ratio']:.3f}" + (f"  (target >= {r['target']})" if r["target"] else ""),
              flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
