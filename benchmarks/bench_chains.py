"""Benchmark: K batched chains vs K chains run one after another (issue 3).

For each MLP it times ``pib_bayes.sample(..., num_chains=8)`` three ways, in one process, interleaved:

* ``sequential``: ``chain_method="sequential"``, the 8 chains one after another;
* ``batched``: ``chain_method="vectorized"`` on an ``nn.Sequential``, which takes the batched-matmul
  fast path of :func:`pib_bayes.batched.batched_forward` (one ``torch.baddbmm`` per layer);
* ``vmap``: ``chain_method="vectorized"`` on the same layers wrapped in a custom module, which the
  fast path declines, so the driver's ``torch.func.vmap`` fallback runs.

Throughput is chain-steps per second (8 x steps / wall time of the whole ``sample`` call, SGLD,
minibatches drawn per chain). One warm-up call per method, then ``repeats`` interleaved rounds;
the table reports medians and the ratio of medians. Issue targets: MLP 20-64-64-10 (batch 64)
batched >= 3x sequential; MLP 784-256-10 (batch 128) batched >= 0.95x sequential.

    python benchmarks/bench_chains.py --out bench_chains.json            # full
    python benchmarks/bench_chains.py --quick                            # a few seconds
    python benchmarks/bench_chains.py --threads 1                        # torch intra-op threads

``run(quick)`` returns the rows for ``benchmarks/run.py``: {name, baseline, value, ratio, target}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

import pib_bayes
from pib_bayes.batched import batched_forward

NUM_CHAINS = 8

# name, layer sizes, batch size, steps per timed call (full), target ratio batched/sequential
CASES = [
    ("mlp_20-64-64-10_b64", (20, 64, 64, 10), 64, 300, 3.0),
    ("mlp_784-256-10_b128", (784, 256, 10), 128, 60, 0.95),
]


class _Opaque(nn.Module):
    """Wraps a module so that batched_forward declines it (the driver then uses vmap)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _time_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int,
                 method: str) -> float:
    start = time.perf_counter()
    post = pib_bayes.sample(model, "cross_entropy", (x, y), beta=1.0 / x.shape[0], prior=1.0, sampler="sgld",
                            step_size=1e-4, num_chains=NUM_CHAINS, num_warmup=steps - 1, num_draws=1,
                            batch_size=batch, seed=0, chain_method=method)
    elapsed = time.perf_counter() - start
    assert post.metadata["chain_method"] == method, post.metadata["chain_method_reason"]
    return NUM_CHAINS * steps / elapsed


def bench_case(sizes: tuple[int, ...], batch: int, steps: int, repeats: int) -> dict[str, list[float]]:
    """Chain-steps/s per method over ``repeats`` interleaved rounds (after one warm-up call each)."""
    torch.manual_seed(0)
    n = 4096
    x, y = torch.randn(n, sizes[0]), torch.randint(0, sizes[-1], (n,))
    seq_model = _mlp(sizes)
    assert batched_forward(seq_model) is not None
    vmap_model = _Opaque(_mlp(sizes))
    assert batched_forward(vmap_model) is None
    runs = {"sequential": (seq_model, "sequential"), "batched": (seq_model, "vectorized"),
            "vmap": (vmap_model, "vectorized")}
    for model, method in runs.values():  # warm-up
        _time_sample(model, x, y, batch, max(5, steps // 10), method)
    out: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, (model, method) in runs.items():
            out[key].append(_time_sample(model, x, y, batch, steps, method))
    return out


def run(quick: bool = False) -> list[dict]:
    """Rows {name, baseline, value, ratio, target} (chain-steps/s; ratio = value / baseline).

    Per MLP: ``batched`` (baddbmm fast path) and ``vmap`` (fallback) against ``sequential``;
    only the batched row carries the issue's target.
    """
    rows = []
    for name, sizes, batch, steps, target in CASES:
        res = bench_case(sizes, batch, max(10, steps // 5) if quick else steps, 2 if quick else 5)
        seq = statistics.median(res["sequential"])
        for key, tgt in (("batched", target), ("vmap", None)):
            val = statistics.median(res[key])
            rows.append({"name": f"chains8_{key}_vs_sequential_{name}", "baseline": seq, "value": val,
                         "ratio": val / seq, "target": tgt, "unit": "chain-steps/s",
                         "samples": {"sequential": res["sequential"], key: res[key]}})
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| case (chain-steps/s, median) | 8 sequential | 8 vectorized | ratio | target | ok |",
             "|---|---:|---:|---:|---:|:---:|"]
    for r in rows:
        tgt = "" if r["target"] is None else f"≥ {r['target']:.2f}×"
        ok = "" if r["target"] is None else ("yes" if r["ratio"] >= r["target"] else "**no**")
        lines.append(f"| {r['name']} | {r['baseline']:.0f} | {r['value']:.0f} | {r['ratio']:.2f}× | {tgt} "
                     f"| {ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the rows and the environment as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "loadavg_before": os.getloadavg(), "python": sys.version.split()[0], "machine": platform.machine(),
           "quick": args.quick, "num_chains": NUM_CHAINS}
    rows = run(quick=args.quick)
    env["loadavg_after"] = os.getloadavg()
    print(_table(rows))
    print(f"\ntorch {env['torch']}, {env['threads']} intra-op thread(s), {env['cpus']} CPUs, "
          f"load average before/after {env['loadavg_before'][0]:.1f}/{env['loadavg_after'][0]:.1f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"rows": rows, "env": env}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
