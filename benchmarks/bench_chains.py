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
    python benchmarks/bench_chains.py --components                       # + where the time goes

``run(quick)`` returns the rows for ``benchmarks/run.py``: {name, baseline, value, ratio, target}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import pib_bayes
from pib_bayes.batched import batched_forward
from pib_bayes.prior import GaussianPrior
from pib_bayes.samplers import GaussianNoise, build_sgld

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


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def components(sizes: tuple[int, ...] = (784, 256, 10), batch: int = 128, repeats: int = 15) -> list[dict]:
    """Time the parts of one step, 8 chains batched vs 8 chains one by one (ms per step, medians).

    Parts: the model's forward + backward (``batched_forward`` vs ``functional_call`` per chain),
    the prior's log-density + gradient (``GaussianPrior.log_prob(batch_ndim=1)`` vs per chain,
    by autograd, and ``log_prob_and_grad``, the closed form the sampler uses),
    the SGLD update with its noise, and, for reference, a hand-written Gaussian log-density
    ``-sum (w - m)^2 / (2 s^2) + const`` (what the prior computes, with fewer temporaries).
    """
    torch.manual_seed(0)
    model = _mlp(sizes)
    prior = GaussianPrior.from_module(model, 1.0)
    fast = batched_forward(model)
    assert fast is not None
    stacked = {n: p.detach().unsqueeze(0).repeat(NUM_CHAINS, *[1] * p.dim()).requires_grad_()
               for n, p in model.named_parameters()}
    single = [{n: v[k].detach().clone().requires_grad_() for n, v in stacked.items()}
              for k in range(NUM_CHAINS)]
    x = torch.randn(NUM_CHAINS, batch, sizes[0])
    y = torch.randint(0, sizes[-1], (NUM_CHAINS, batch))

    def grad(value: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
        torch.autograd.grad(value.sum(), list(params.values()))

    def lean_logp(params: dict[str, torch.Tensor], batch_ndim: int) -> torch.Tensor:
        total: torch.Tensor | float = 0.0
        for n, w in params.items():
            s = float(prior.std_of(n))
            d = w - prior.mean[n]
            size = w[0].numel() if batch_ndim else w.numel()
            total = total + (-0.5 / s**2) * (d * d).sum(dim=tuple(range(batch_ndim, w.dim()))) \
                - size * (math.log(s) + 0.5 * math.log(2 * math.pi))
        return torch.as_tensor(total)

    def model_b() -> None:
        out = fast(stacked, x, True)
        grad(F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(NUM_CHAINS, -1).mean(1),
             stacked)

    def model_s() -> None:
        for k, p in enumerate(single):
            grad(F.cross_entropy(functional_call(model, p, (x[k],)), y[k]), p)

    kernel = build_sgld()
    pb = [v.detach().clone() for v in stacked.values()]
    gb = [torch.randn_like(t) for t in pb]
    nb = GaussianNoise([torch.Generator().manual_seed(k) for k in range(NUM_CHAINS)], batched=True)
    ps = [[t[k:k + 1].clone() for t in pb] for k in range(NUM_CHAINS)]
    gs = [[t[k:k + 1] for t in gb] for k in range(NUM_CHAINS)]
    ns = [GaussianNoise([torch.Generator().manual_seed(k)], batched=True) for k in range(NUM_CHAINS)]

    def step_b() -> None:
        kernel.step(pb, gb, {}, 1e-8, nb, batch_ndim=1)

    def step_s() -> None:
        for k in range(NUM_CHAINS):
            kernel.step(ps[k], gs[k], {}, 1e-8, ns[k], batch_ndim=1)

    parts = {
        "model forward+backward": (model_s, model_b),
        "GaussianPrior log_prob+grad": (lambda: [grad(-prior.log_prob(p), p) for p in single],
                                        lambda: grad(-prior.log_prob(stacked, batch_ndim=1), stacked)),
        # what sample() runs: the same numbers in closed form, no autograd graph
        "GaussianPrior log_prob_and_grad": (lambda: [prior.log_prob_and_grad(p) for p in single],
                                            lambda: prior.log_prob_and_grad(stacked, batch_ndim=1)),
        "SGLD update + noise": (step_s, step_b),
        "hand-written Gaussian logp+grad": (lambda: [grad(-lean_logp(p, 0), p) for p in single],
                                            lambda: grad(-lean_logp(stacked, 1), stacked)),
    }
    rows = []
    for name, (seq_fn, bat_fn) in parts.items():
        seq_ms, bat_ms = _median_ms(seq_fn, repeats), _median_ms(bat_fn, repeats)
        rows.append({"part": name, "sequential_ms": seq_ms, "batched_ms": bat_ms,
                     "time_ratio": bat_ms / seq_ms})
    return rows


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
    parser.add_argument("--components", action="store_true",
                        help="also time the parts of one 784-256-10 step, batched vs sequential")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "loadavg_before": os.getloadavg(), "python": sys.version.split()[0], "machine": platform.machine(),
           "quick": args.quick, "num_chains": NUM_CHAINS,
           "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
    rows = run(quick=args.quick)
    parts = components(repeats=5 if args.quick else 15) if args.components else []
    env["loadavg_after"] = os.getloadavg()
    print(_table(rows))
    if parts:
        print("\n| part of one MLP 784-256-10 step (ms) | 8 sequential | 8 batched | time ratio |")
        print("|---|---:|---:|---:|")
        for r in parts:
            print(f"| {r['part']} | {r['sequential_ms']:.1f} | {r['batched_ms']:.1f} "
                  f"| {r['time_ratio']:.2f} |")
    print(f"\ntorch {env['torch']}, {env['threads']} intra-op thread(s), {env['cpus']} CPUs, "
          f"load average before/after {env['loadavg_before'][0]:.1f}/{env['loadavg_after'][0]:.1f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"rows": rows, "components": parts, "env": env}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
