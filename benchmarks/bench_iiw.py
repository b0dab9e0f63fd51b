"""Fisher IIW estimators at the same n on an MLP: forward-mode JVP vs a per-example-gradient loop vs the
paper's minibatch method.

Candidates (cross-entropy, MLP 100-256-256-10, n examples, Δθ = a random perturbation of the weights):

* ``jvp``            :func:`pib_bayes.iiw.fisher` as users call it (``method="jvp"``, ``engine="auto"``,
                     which is ``"layerwise"`` here): per-layer Δθᵀ F Δθ over all n examples from one
                     forward and one backward pass to the layer outputs (chunks of 1024);
* ``jvp_forward``    the same estimator with ``engine="jvp"``: ``torch.func.jvp`` vmapped over the layers;
* ``loop``           the brute-force reference: one backward per example, then (∇l_iᵀ Δθ)² per layer
                     (``pib_bayes.iiw.fisher.per_example_gradient_quadratic``, once per layer group);
* ``minibatch``      ``method="minibatch"``: the paper's 10 minibatch gradients of 1000 examples
                     (uses 10 000 examples, not necessarily all n, and is on a 1/m scale);
* ``jvp_total``      ``engine="jvp"`` with one group (all weights): the total Δθᵀ F Δθ only, one tangent;
* ``jvp_1000``       the per-layer JVP estimator on a random subset of 1000 examples.

Time is process CPU time with one torch thread by default (the machine is shared; ``--threads``
changes it), median over ``--repeats`` interleaved calls (the loop, being slow, runs ``--loop-repeats``
times). The spread of each estimator is the coefficient of variation (sd/mean) of its total over
the repeated calls with different seeds (random minibatches / subsets; the full-data JVP is
deterministic). Ratios are ``time(candidate) / time(jvp)``.

Also timed (``regularizer_rows`` in the JSON): one PIB-regularised training step,
``zero_grad; (cross_entropy + IIWRegularizer(x, y)).backward()``, on MLP 784-256-256-10 (batch
128) and MLP 20-64-64-10 (batch 64), with the regulariser's layerwise engine (the default) and
with forward-mode JVP, against the unregularised step; CPU time, interleaved blocks, medians.

    python benchmarks/bench_iiw.py [--n 10000] [--repeats 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time

import torch
from torch import nn

from pib_bayes.iiw import fisher
from pib_bayes.iiw.fisher import per_example_gradient_quadratic


def _setup(n: int, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(100, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    x = torch.randn(n, 100)
    y = torch.randint(0, 10, (n,))
    theta_0 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, x, y, theta_0


def _loop(model, x, y, theta_0) -> float:
    loss = nn.CrossEntropyLoss(reduction="none")
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        groups.setdefault(name.rsplit(".", 1)[0], []).append(name)
    total = 0.0
    for members in groups.values():
        delta = {n: p.detach() - theta_0[n] for n, p in model.named_parameters() if n in members}
        total += per_example_gradient_quadratic(model, loss, (x, y), delta)
    return total


def _regularized_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, reg) -> None:
    net.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(net(x), y)
    (loss if reg is None else loss + reg(x, y)).backward()


def regularizer_rows(rounds: int = 11) -> list[dict]:
    """Training-step time with ``IIWRegularizer`` by engine, and without it."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_steps import interleaved, mlp

    from pib_bayes.iiw import IIWRegularizer

    rows = []
    for sizes, batch in (((784, 256, 256, 10), 128), ((20, 64, 64, 10), 64)):
        torch.manual_seed(0)
        net = mlp(sizes)
        x, y = torch.randn(batch, sizes[0]), torch.randint(0, sizes[-1], (batch,))
        theta_0 = {k: v.clone() for k, v in net.state_dict().items()}
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))

        regs = {e: IIWRegularizer(net, "cross_entropy", theta_0, beta=0.1, engine=e)
                for e in ("layerwise", "jvp")}
        cands = {name: functools.partial(_regularized_step, net, x, y, regs.get(name))
                 for name in ("plain", "layerwise", "jvp")}
        t = interleaved(cands, 5, rounds)
        label = f"IIWRegularizer step MLP {'-'.join(map(str, sizes))} b{batch}"
        rows.append({"name": f"{label}: layerwise vs jvp", "baseline": "jvp", "value": "layerwise",
                     "baseline_s": t["jvp"], "value_s": t["layerwise"], "ratio": t["jvp"] / t["layerwise"],
                     "target": None})
        rows.append({"name": f"{label}: regularised (layerwise) vs plain step", "baseline": "plain",
                     "value": "layerwise", "baseline_s": t["plain"], "value_s": t["layerwise"],
                     "ratio": t["plain"] / t["layerwise"], "target": None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=str, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, x, y, theta_0 = _setup(args.n)

    def jvp(seed):
        return fisher(model, "cross_entropy", (x, y), theta_0).raw_total

    def minibatch(seed):
        return fisher(model, "cross_entropy", (x, y), theta_0, method="minibatch", num_batches=10,
                      batch_size=1000, seed=seed).raw_total

    everything = {"all": [n for n, _ in model.named_parameters()]}

    def jvp_forward(seed):
        return fisher(model, "cross_entropy", (x, y), theta_0, engine="jvp").raw_total

    def jvp_total(seed):
        return fisher(model, "cross_entropy", (x, y), theta_0, groups=everything, engine="jvp").raw_total

    def jvp_1000(seed):
        idx = torch.randperm(args.n, generator=torch.Generator().manual_seed(seed))[:1000]
        return fisher(model, "cross_entropy", (x[idx], y[idx]), theta_0).raw_total

    def loop(seed):
        return _loop(model, x, y, theta_0)

    cands = {"jvp": jvp, "jvp_forward": jvp_forward, "jvp_total": jvp_total, "minibatch": minibatch,
             "jvp_1000": jvp_1000, "loop": loop}
    times: dict[str, list[float]] = {k: [] for k in cands}
    values: dict[str, list[float]] = {k: [] for k in cands}
    for r in range(args.repeats):
        order = list(cands)[r % len(cands):] + list(cands)[:r % len(cands)]
        for name in order:
            if name == "loop" and r >= args.loop_repeats:
                continue
            t0 = time.process_time()
            values[name].append(cands[name](r))
            times[name].append(time.process_time() - t0)
    base = statistics.median(times["jvp"])
    rows = []
    for name in cands:
        v = values[name]
        mean = statistics.fmean(v)
        cv = statistics.stdev(v) / abs(mean) if len(v) > 1 and mean else 0.0
        used = {"minibatch": 10000, "jvp_1000": 1000}.get(name, args.n)
        med = statistics.median(times[name])
        rows.append({"estimator": name, "examples_used": used, "cpu_s": med, "ratio_to_jvp": med / base,
                     "mean_raw_total": mean, "cv": cv, "calls": len(v)})
    by = {r["estimator"]: r for r in rows}
    agree = abs(by["jvp"]["mean_raw_total"] - by["loop"]["mean_raw_total"]) / by["loop"]["mean_raw_total"]
    print(f"MLP 100-256-256-10, n={args.n}, threads={args.threads}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print("| estimator | examples | CPU s/call | time / jvp | mean ΔθᵀFΔθ | spread (sd/mean) | calls |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['estimator']} | {r['examples_used']} | {r['cpu_s']:.3f} | {r['ratio_to_jvp']:.2f} | "
              f"{r['mean_raw_total']:.4g} | {r['cv']:.3f} | {r['calls']} |")
    print(f"jvp vs loop relative difference: {agree:.2e}; loop/jvp time {by['loop']['ratio_to_jvp']:.1f}x; "
          f"minibatch/jvp {by['minibatch']['ratio_to_jvp']:.2f}x; minibatch/jvp_total "
          f"{by['minibatch']['cpu_s'] / by['jvp_total']['cpu_s']:.2f}x")
    reg_rows = regularizer_rows(5 if args.repeats < 5 else 11)
    for r in reg_rows:
        print(f"{r['name']}: {r['baseline_s'] * 1e3:.2f} ms -> {r['value_s'] * 1e3:.2f} ms, "
              f"ratio {r['ratio']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"n": args.n, "threads": args.threads, "torch": torch.__version__, "rows": rows,
                       "jvp_loop_rel_diff": agree, "regularizer_rows": reg_rows}, f, indent=2)


if __name__ == "__main__":
    main()
