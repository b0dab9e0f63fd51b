"""The model zoo (tests/zoo.py) through the library vs the plain torch code a user would otherwise write.

Per zoo model (tiny sizes, cross-entropy, N = 256 examples, minibatch 32):

* ``sample``  ``pib_bayes.sample`` with one chain, ``steps`` Langevin steps per call (SGLD, Gaussian prior,
  end to end: setup, probe, minibatching, recording), against the same number of plain training steps
  ``zero_grad(); cross_entropy(model(x_b), y_b).backward(); torch.optim.SGD.step()`` on the same
  per-epoch permuted minibatches (model in ``train()`` mode, as a training loop has it). Ratio =
  time(SGD) / time(sample) per step: the throughput of sampling relative to plain training (its
  inverse is the cost of a sampling step in training steps). No target: reported for the docs table.
* ``predict``  ``Posterior.predict`` over 40 draws on 256 inputs (after one untimed call, in which the
  engine is chosen and remembered), against the plain loop ``for draw: softmax(functional_call(model,
  draw, x))`` stacked; both checked to agree first. Ratio = time(loop) / time(predict); targets: >= 1 on
  every model, >= 2 on the MLPs (issue 16).

Also recorded per model: the chain method ``sample`` picks for 2 chains, the predict engine
(:attr:`~pib_bayes.Posterior.last_engine`) and the Fisher IIW engine (``settings["engine"]``).
Interleaved timing (bench_steps.interleaved), process CPU time, one torch thread.

    python benchmarks/bench_zoo.py [--quick] [--only mlp,lstm] [--out rows.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.func import functional_call

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from bench_steps import interleaved  # noqa: E402
from zoo import ZOO, ZooEntry  # noqa: E402

import pib_bayes as pb  # noqa: E402
from pib_bayes import Posterior, iiw  # noqa: E402

N, BATCH, DRAWS, INPUTS = 256, 32, 40, 256
MLP_TARGET = {"mlp": 2.0, "buffers": 2.0}  # small MLPs (the buffers model is an MLP behind a standardisation)


def sample_candidates(entry: ZooEntry, steps: int) -> dict:
    x, y = entry.make_data(N)
    model = entry.make_model()

    def sample() -> None:
        pb.sample(model, entry.loss, (x, y), beta=1.0 / N, prior=1.0, step_size=1e-5, num_chains=1,
                  num_warmup=steps - 1, num_draws=1, batch_size=BATCH, seed=0)

    net = entry.make_model().train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def sgd() -> None:
        done = 0
        while done < steps:
            perm = torch.randperm(N, generator=gen)
            for start in range(0, N - BATCH + 1, BATCH):
                if done == steps:
                    break
                idx = perm[start:start + BATCH]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
                done += 1

    return {"sgd": sgd, "sample": sample}


def predict_candidates(entry: ZooEntry) -> tuple[dict, Posterior]:
    model = entry.make_model().eval()
    x, _ = entry.make_data(INPUTS, seed=1)
    g = torch.Generator().manual_seed(0)
    draws = {n: p.detach() + 0.05 * torch.randn(1, DRAWS, *p.shape, generator=g)
             for n, p in model.named_parameters()}
    fixed = {n: b.detach().clone() for n, b in model.named_buffers()}
    post = Posterior(draws, {}, {"task": "classification"}, fixed=fixed, model=model)
    flat = {k: v[0] for k, v in draws.items()}

    @torch.no_grad()
    def loop() -> torch.Tensor:
        outs = []
        for i in range(DRAWS):
            outs.append(torch.softmax(functional_call(model, {**fixed, **{k: v[i] for k, v in flat.items()}},
                                                      (x,)), -1))
        return torch.stack(outs)

    def predict() -> torch.Tensor:
        return post.predict(x).per_draw

    # agreement first (and the engine is chosen here, once)
    torch.testing.assert_close(predict(), loop(), rtol=1e-4, atol=1e-5)
    return {"loop": loop, "predict": predict}, post


def engines(entry: ZooEntry) -> dict:
    x, y = entry.make_data(64)
    model = entry.make_model()
    two = pb.sample(model, entry.loss, (x, y), beta=1.0 / 64, prior=1.0, step_size=1e-5, num_chains=2,
                    num_warmup=1, num_draws=1, batch_size=BATCH, seed=0)
    theta_0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    at = {k: v[0, 0] for k, v in two.draws.items()}
    fisher = iiw.fisher(model, entry.loss, (x, y), theta_0, params=at)
    return {"chain_method": two.metadata["chain_method"], "fisher_engine": fisher.settings["engine"]}


def run(quick: bool = False, only: set[str] | None = None) -> list[dict]:
    torch.set_num_threads(1)
    steps, rounds = (20, 2) if quick else (100, 7)
    rows = []
    # the SGD step and the predict loop are written for cross-entropy: the classification entries
    for entry in (e for e in ZOO if e.loss == "cross_entropy"):
        if only and entry.name not in only:
            continue
        info = engines(entry)
        t = interleaved(sample_candidates(entry, steps), block=1, rounds=rounds, warmup=1)
        rows.append({"name": f"zoo {entry.name}: sample() step vs torch SGD step", "baseline": "sgd",
                     "value": "sample", "ratio": t["sgd"] / t["sample"], "target": None,
                     "sgd_ms": 1e3 * t["sgd"] / steps, "sample_ms": 1e3 * t["sample"] / steps, **info})
        cands, post = predict_candidates(entry)
        t = interleaved(cands, block=1, rounds=rounds + 2, warmup=1)
        rows.append({"name": f"zoo {entry.name}: predict vs loop ({post.last_engine})", "baseline": "loop",
                     "value": "predict", "ratio": t["loop"] / t["predict"],
                     "target": MLP_TARGET.get(entry.name, 1.0), "loop_ms": 1e3 * t["loop"],
                     "predict_ms": 1e3 * t["predict"], "predict_engine": post.last_engine,
                     "predict_engine_reason": post.last_engine_reason, **info})
        cost = rows[-2]["sample_ms"] / rows[-2]["sgd_ms"]
        print(f"{entry.name:16s} chains={info['chain_method']:10s} predict={post.last_engine:8s} "
              f"fisher={info['fisher_engine']:9s} sample/sgd cost {cost:5.2f}x "
              f"predict/loop {rows[-1]['ratio']:5.2f}x ({post.last_engine_reason})", file=sys.stderr,
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", help="comma-separated zoo names")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = run(args.quick, set(args.only.split(",")) if args.only else None)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    else:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
