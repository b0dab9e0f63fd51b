"""Peak memory of ``pib_bayes.sample`` for a ~1M-parameter model: grows with kept draws, not with steps.

Model MLP 784-1024-192-10 (1,002,570 float32 weights), 512 examples, batch 128, one SGLD chain.
Each configuration runs in a fresh subprocess: it runs a 100-step ``sample()`` first (so lazily
loaded code and the allocator's heap are already there), resets the kernel's peak-RSS counter
(``echo 5 > /proc/self/clear_refs``), then runs ``sample()`` and reports ``VmHWM`` (peak resident
set) minus the resident set just before the call. The subprocesses run with
``MALLOC_MMAP_THRESHOLD_=131072`` so that freed tensors leave the resident set (peak RSS = peak
live memory).

Each configuration runs 3 times (1 with ``--quick``), each in a fresh process; the median counts.

Issue 17's row (``--vs-sgd``): at ~10M weights (MLP 1000-3000-2300-10, 9.9M float32 weights, batch 128
of 512 examples), the peak growth of a 20-step one-chain ``sample()`` (Gaussian prior sigma_0 = 1
at the initial weights, ``keep`` one bias) against 20 steps of ``torch.optim.SGD`` on the same energy
with a naive autograd prior ``sum_j ||w_j - w0_j||^2 / 2`` (``w0`` cloned inside the measured part, as
sample() makes its prior mean): ratio sgd / sample, target >= 1 / 1.5.

Rows:
* steps: peak with 10 kept draws after 10 steps vs after 10 x ``thin`` steps (thinning), ratio
  peak(few steps) / peak(many steps), target >= 0.95 (flat in steps);
* bytes per stored draw: the slope of the peak between 10 and 40 kept draws (thin 1), compared
  with the bytes a draw must hold (4 D for the weights + 17 for energy, loss, step size and the
  divergence flag): ratio needed / measured, target >= 0.9.

    python benchmarks/bench_memory.py [--quick] [--out rows.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

SIZES = (784, 1024, 192, 10)
WARM_STEPS = 100
STAT_BYTES = 4 + 4 + 8 + 1  # energy, loss (float32), step_size (float64), diverging (bool)


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def one(num_draws: int, thin: int, warmup: int) -> dict:
    """In this process: peak RSS growth of one sample() call."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_steps import mlp

    import pib_bayes

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = mlp(SIZES)
    x, y = torch.randn(512, SIZES[0]), torch.randint(0, SIZES[-1], (512,))
    kw = {"beta": 1 / 512, "prior": 1.0, "step_size": 1e-7, "batch_size": 128, "seed": 0}
    # warm-up: glibc's heap settles after some tens of steps (its peak rises to a plateau, ~25 MiB
    # above the first steps' here, then stays); without this the first configuration looks cheaper
    pib_bayes.sample(model, "cross_entropy", (x, y), num_warmup=WARM_STEPS, num_draws=2, thin=1, **kw)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status("VmRSS")
    post = pib_bayes.sample(model, "cross_entropy", (x, y), num_warmup=warmup, num_draws=num_draws, thin=thin,
                            **kw)
    peak = _status("VmHWM")
    d = sum(p.numel() for p in model.parameters())
    stored = sum(v.nbytes for v in post.draws.values()) + sum(v.nbytes for v in post.sample_stats.values())
    return {"num_draws": num_draws, "thin": thin, "warmup": warmup, "steps": warmup + num_draws * thin,
            "params": d, "peak_growth_bytes": peak - before, "stored_bytes": stored}


BIG = (1000, 3000, 2300, 10)


def one_vs_sgd(which: str) -> dict:
    """In this process: peak RSS growth of 20 steps of ``which`` ("sample" or "sgd") at ~10M weights."""
    import torch
    from torch import nn

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_steps import mlp

    import pib_bayes

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = mlp(BIG)
    x, y = torch.randn(512, BIG[0]), torch.randint(0, BIG[-1], (512,))
    last_bias = [n for n, _ in model.named_parameters()][-1]

    def run_sample(steps: int) -> None:
        pib_bayes.sample(model, "cross_entropy", (x, y), beta=1 / 512, prior=1.0, step_size=1e-9,
                         batch_size=128, num_warmup=steps // 2, num_draws=steps - steps // 2,
                         keep=[last_bias], seed=0)

    def run_sgd(steps: int) -> None:
        params = list(model.parameters())
        w0 = [p.detach().clone() for p in params]
        opt = torch.optim.SGD(params, lr=1e-12)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(0, 512, (128,), generator=g)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx]) * 512
            prior = sum(((w - m) ** 2).sum() for w, m in zip(params, w0)) / 2
            (loss + prior).backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    run = run_sample if which == "sample" else run_sgd
    run(4)  # lazily loaded code and the allocator's heap
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status("VmRSS")
    run(20)
    peak = _status("VmHWM")
    return {"which": which, "params": sum(p.numel() for p in model.parameters()),
            "peak_growth_bytes": peak - before}


def _spawn_vs_sgd(which: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one-vs-sgd", which], check=True,
                         capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_vs_sgd(quick: bool = False) -> list[dict]:
    repeats = 1 if quick else 3
    got = {}
    for which in ("sgd", "sample"):
        runs = sorted((_spawn_vs_sgd(which) for _ in range(repeats)), key=lambda r: r["peak_growth_bytes"])
        got[which] = {**runs[len(runs) // 2], "all_peak_growth_bytes": [r["peak_growth_bytes"] for r in runs]}
    d = got["sample"]["params"]
    return [{"name": f"memory sample() 1 chain vs torch SGD + naive prior, {d:,} params (20 steps)",
             "baseline": "sgd", "value": "sample", "baseline_bytes": got["sgd"]["peak_growth_bytes"],
             "value_bytes": got["sample"]["peak_growth_bytes"],
             "ratio": got["sgd"]["peak_growth_bytes"] / got["sample"]["peak_growth_bytes"],
             "target": round(1 / 1.5, 3), "weights_bytes": 4 * d,
             "copies": {k: v["peak_growth_bytes"] / (4 * d) for k, v in got.items()}, "runs": got}]


def _spawn(num_draws: int, thin: int, warmup: int) -> dict:
    # a fixed mmap threshold: every large tensor is its own mmap, returned to the OS when freed, so
    # the peak RSS is the peak of live memory (glibc's default moving threshold parks freed blocks
    # in the heap, which made the peak wander by +-15 MiB between identical runs)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", str(num_draws), str(thin),
                          str(warmup)], check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def _median_run(num_draws: int, thin: int, warmup: int, repeats: int) -> dict:
    """Median peak over ``repeats`` fresh processes."""
    runs = sorted((_spawn(num_draws, thin, warmup) for _ in range(repeats)),
                  key=lambda r: r["peak_growth_bytes"])
    return {**runs[len(runs) // 2], "all_peak_growth_bytes": [r["peak_growth_bytes"] for r in runs]}


def run(quick: bool = False) -> list[dict]:
    thin, repeats = (10, 1) if quick else (30, 3)
    short = _median_run(10, 1, 0, repeats)
    long = _median_run(10, thin, 0, repeats)
    many = _median_run(40, 1, 0, repeats)
    d = short["params"]
    need = 4 * d + STAT_BYTES
    grow = many["peak_growth_bytes"] - short["peak_growth_bytes"]
    slope = grow / (many["num_draws"] - short["num_draws"])
    return [
        {"name": f"memory sample() {d:,} params: 10 draws, {short['steps']} vs {long['steps']} steps "
                 f"(thin {thin})",
         "baseline": f"{long['steps']} steps", "value": f"{short['steps']} steps",
         "baseline_bytes": long["peak_growth_bytes"], "value_bytes": short["peak_growth_bytes"],
         "ratio": short["peak_growth_bytes"] / long["peak_growth_bytes"], "target": 0.95,
         "runs": [short, long]},
        {"name": f"memory sample() {d:,} params: bytes per stored draw (10 -> 40 draws)",
         "baseline": "measured slope", "value": "4 D + 17", "baseline_bytes": slope, "value_bytes": need,
         "ratio": need / slope, "target": 0.9, "runs": [short, many]},
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--one", nargs=3, type=int, metavar=("DRAWS", "THIN", "WARMUP"), help=argparse.SUPPRESS)
    ap.add_argument("--one-vs-sgd", choices=["sample", "sgd"], help=argparse.SUPPRESS)
    ap.add_argument("--vs-sgd", action="store_true", help="only issue 17's row: sample() vs torch SGD at 10M")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one)))
        return 0
    if args.one_vs_sgd:
        print(json.dumps(one_vs_sgd(args.one_vs_sgd)))
        return 0
    rows = run_vs_sgd(args.quick) if args.vs_sgd else run(args.quick) + run_vs_sgd(args.quick)
    for r in rows:
        print(f"{r['name']:72s} {r['baseline_bytes'] / 2**20:8.2f} MiB -> "
              f"{r['value_bytes'] / 2**20:8.2f} MiB "
              f" ratio {r['ratio']:.3f}  (target >= {r['target']})"
              + (f"  copies of the weights {r['copies']}" if "copies" in r else ""), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
