"""Optimizer-step throughput: the Langevin samplers vs ``torch.optim.SGD`` and vs the noise floor.

One *step* is a full training iteration ``zero_grad(set_to_none=True); loss(model(x), y).backward();
opt.step()`` on a fixed minibatch. Compared, on MLP 784-256-256-10 (batch 128) and MLP 20-64-64-10
(batch 64), cross-entropy loss:

* ``sgd``    ``torch.optim.SGD`` (default foreach path);
* ``floor``  the SGD step followed by one ``torch.randn(D, generator=g, out=buf)`` (one Gaussian
  draw per weight into a preallocated buffer): the least a Langevin step can cost;
* ``sgld``, ``psgld``, ``sghmc``  :mod:`pib_bayes.optim` (exact Gaussian noise, the default);
* ``sgnht``  :class:`pib_bayes.optim.SGNHT` (momentum + thermostat), reported against ``sgld``;
* ``sgld_rademacher`` ...  the same optimizers with the opt-in ``noise="rademacher"`` source.

Timing is interleaved: each round runs a block of steps of every candidate, in a rotated order,
and each figure is the median over rounds of the per-step time. The clock is the process CPU time
(``time.process_time``) with one torch thread by default: the benchmark machine is shared, and CPU
time is what one core spends on a step whoever else is running (``--clock wall`` and
``--threads 2`` measure wall time with two intra-op threads instead). Ratios are throughput ratios
``time(baseline) / time(candidate)`` (>= target is good).

Also here, :func:`noise_law`: the opt-in Rademacher noise against the exact Gaussian oracle of
SPEC §2 (stationary variance ``s^2 / (1 - h/(2 s^2))`` of unadjusted Langevin on U = x^2/(2 s^2))
with 10^5 independent coordinates, the exact Gaussian noise run alongside.

``--case prefetch``: the optimizers with ``prefetch_noise=True`` (the next step's noise drawn on a
worker thread during the forward and backward pass) against the floor by wall clock, see
:func:`run_prefetch`.

    python benchmarks/bench_steps.py [--quick] [--case mlp784|mlp20|noise|prefetch] [--out rows.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from pib_bayes.optim import PSGLD, SGHMC, SGLD

try:
    from pib_bayes.optim import SGNHT
except ImportError:  # an older pib_bayes (before SGNHT)
    SGNHT = None

CASES = {"mlp784": ((784, 256, 256, 10), 128), "mlp20": ((20, 64, 64, 10), 64)}
# throughput vs the floor (SGD + one Gaussian draw per weight), from the issue
TARGETS = {"sgld": 0.9, "psgld": 0.8, "sghmc": 0.8}

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def interleaved(cands: dict[str, Callable[[], None]], block: int, rounds: int, clock: str = "cpu",
                warmup: int = 2) -> dict[str, float]:
    """Median over ``rounds`` of the per-call time of each candidate, run in blocks of ``block``
    calls, ABAB... with the order rotated every round (so none always runs first)."""
    tick = CLOCKS[clock]
    names = list(cands)
    for name in names:
        for _ in range(warmup * block):
            cands[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = cands[name]
            t0 = tick()
            for _ in range(block):
                fn()
            times[name].append((tick() - t0) / block)
    return {n: statistics.median(v) for n, v in times.items()}


def step_candidates(sizes: tuple[int, ...], batch: int, noises: tuple[str, ...] = ("rademacher",),
                    seed: int = 0, prefetch: bool = False) -> dict[str, Callable[[], None]]:
    """One closure per candidate, each with its own copy of the model and its own optimizer."""
    torch.manual_seed(seed)
    base = mlp(sizes)
    x = torch.randn(batch, sizes[0])
    y = torch.randint(0, sizes[-1], (batch,))
    loss_fn = nn.CrossEntropyLoss()
    d = sum(p.numel() for p in base.parameters())

    def make(opt_factory: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
             extra: Callable[[], object] | None = None) -> Callable[[], None]:
        model = copy.deepcopy(base)
        opt = opt_factory(list(model.parameters()))

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            if extra is not None:
                extra()

        return step

    gen = torch.Generator().manual_seed(seed + 1)
    buf = torch.empty(d)
    # tiny step sizes: the weights hardly move, so every candidate times the same computation
    cands = {
        "sgd": make(lambda p: torch.optim.SGD(p, lr=1e-6)),
        "sgd_again": make(lambda p: torch.optim.SGD(p, lr=1e-6)),  # A/A pair: the noise level
        "floor": make(lambda p: torch.optim.SGD(p, lr=1e-6),
                      lambda: torch.randn(d, generator=gen, out=buf)),
        "sgld": make(lambda p: SGLD(p, lr=1e-8, generator=torch.Generator().manual_seed(seed + 2))),
        "psgld": make(lambda p: PSGLD(p, lr=1e-10, generator=torch.Generator().manual_seed(seed + 3))),
        "sghmc": make(lambda p: SGHMC(p, lr=1e-8, generator=torch.Generator().manual_seed(seed + 4))),
    }
    if SGNHT is not None:
        cands["sgnht"] = make(lambda p: SGNHT(p, lr=1e-8, generator=torch.Generator().manual_seed(seed + 8)))
    if prefetch:  # the same optimizers drawing the next step's noise on a worker thread
        cands["sgld_prefetch"] = make(lambda p: SGLD(
            p, lr=1e-8, prefetch_noise=True, generator=torch.Generator().manual_seed(seed + 2)))
        cands["psgld_prefetch"] = make(lambda p: PSGLD(
            p, lr=1e-10, prefetch_noise=True, generator=torch.Generator().manual_seed(seed + 3)))
        cands["sghmc_prefetch"] = make(lambda p: SGHMC(
            p, lr=1e-8, prefetch_noise=True, generator=torch.Generator().manual_seed(seed + 4)))
    for noise in noises:
        cands[f"sgld_{noise}"] = make(lambda p, n=noise: SGLD(
            p, lr=1e-8, noise=n, generator=torch.Generator().manual_seed(seed + 5)))
        cands[f"psgld_{noise}"] = make(lambda p, n=noise: PSGLD(
            p, lr=1e-10, noise=n, generator=torch.Generator().manual_seed(seed + 6)))
        cands[f"sghmc_{noise}"] = make(lambda p, n=noise: SGHMC(
            p, lr=1e-8, noise=n, generator=torch.Generator().manual_seed(seed + 7)))
    return cands


def _noise_supported() -> tuple[str, ...]:
    try:
        SGLD([torch.zeros(1, requires_grad=True)], lr=1.0, noise="rademacher")
    except TypeError:  # an older pib_bayes (before the opt-in noise): Gaussian only
        return ()
    return ("rademacher",)


def run_case(case: str, quick: bool = False, clock: str = "cpu") -> list[dict]:
    sizes, batch = CASES[case]
    block = 5 if case == "mlp784" else 20
    rounds = 7 if quick else 31
    cands = step_candidates(sizes, batch, _noise_supported())
    t = interleaved(cands, block, rounds, clock)
    label = f"{'-'.join(map(str, sizes))} b{batch}"
    common = {"case": case, "clock": clock, "threads": torch.get_num_threads(), "rounds": rounds,
              "block": block}
    rows = []

    def row(name: str, base: str, cand: str, target: float | None) -> None:
        rows.append({"name": f"steps {label}: {name}", "baseline": base, "value": cand,
                     "baseline_s": t[base], "value_s": t[cand], "ratio": t[base] / t[cand],
                     "target": target, **common})

    row("sgd vs sgd (A/A: timing noise)", "sgd", "sgd_again", None)
    row("floor vs sgd", "sgd", "floor", None)
    for s in ("sgld", "psgld", "sghmc"):
        row(f"{s} vs floor", "floor", s, TARGETS[s])
    for s in ("sgld", "psgld", "sghmc"):
        row(f"{s} vs sgd", "sgd", s, None)
    if "sgnht" in t:
        row("sgnht vs floor", "floor", "sgnht", None)
        row("sgnht vs sgld", "sgld", "sgnht", None)
    for s in ("sgld", "psgld", "sghmc"):
        if f"{s}_rademacher" in t:
            row(f"{s} (noise=rademacher) vs floor", "floor", f"{s}_rademacher", TARGETS[s])
            row(f"{s} (noise=rademacher) vs sgd", "sgd", f"{s}_rademacher", None)
    return rows


def sample_candidates(sizes: tuple[int, ...], batch: int, steps: int, n: int = 2048,
                      seed: int = 0) -> dict[str, Callable[[], object]]:
    """``pib_bayes.sample`` (SGLD, one chain, ``steps`` steps on ``n`` random examples) without and
    with ``prefetch_noise``."""
    import functools

    import pib_bayes

    torch.manual_seed(seed)
    model = mlp(sizes)
    x, y = torch.randn(n, sizes[0]), torch.randint(0, sizes[-1], (n,))
    run = functools.partial(pib_bayes.sample, model, "cross_entropy", (x, y), beta=1 / n, step_size=1e-6,
                            num_warmup=0, num_draws=steps, batch_size=batch, keep=["0.bias"])
    return {"sample": functools.partial(run, prefetch_noise=False),
            "sample_prefetch": functools.partial(run, prefetch_noise=True)}


def run_prefetch(quick: bool = False) -> list[dict]:
    """``prefetch_noise=True`` against the floor, by **wall clock** (one torch thread): the worker
    thread's draw costs CPU time either way; what it can save is elapsed time, on the core the
    forward and backward pass leave free."""
    rows = []
    for case, (sizes, batch) in CASES.items():
        block = 5 if case == "mlp784" else 20
        rounds = 7 if quick else 31
        cands = step_candidates(sizes, batch, (), prefetch=True)
        cands.pop("sgd_again")
        t = interleaved(cands, block, rounds, "wall")
        label = f"{'-'.join(map(str, sizes))} b{batch}"
        common = {"case": f"{case}_prefetch", "clock": "wall", "threads": torch.get_num_threads(),
                  "rounds": rounds, "block": block}
        # no targets: an opt-in measured by another clock (the targets apply to the default rows)
        variants = (("", ""), (" (prefetch_noise)", "_prefetch"))
        for name, base, cand in [("floor vs sgd", "sgd", "floor")] + [
                (f"{s}{tag} vs {base}", base, f"{s}{suffix}") for s in ("sgld", "psgld", "sghmc")
                for base in ("floor", "sgd") for tag, suffix in variants]:
            rows.append({"name": f"steps {label}, wall clock: {name}", "baseline": base, "value": cand,
                         "baseline_s": t[base], "value_s": t[cand], "ratio": t[base] / t[cand],
                         "target": None, **common})
        # the driver: a whole pib_bayes.sample() call per candidate (SGLD, one chain)
        steps = 50 if case == "mlp784" else 200
        t = interleaved(sample_candidates(sizes, batch, steps), 1, 5 if quick else 11, "wall", warmup=1)
        rows.append({"name": f"sample() 1 chain {label}, wall clock: prefetch_noise vs synchronous",
                     "baseline": "sample", "value": "sample_prefetch", "baseline_s": t["sample"] / steps,
                     "value_s": t["sample_prefetch"] / steps, "ratio": t["sample"] / t["sample_prefetch"],
                     "target": None, **common})
    return rows


def noise_law(quick: bool = False, s: float = 1.0, h: float = 0.1, seed: int = 0) -> list[dict]:
    """Unadjusted Langevin on U = x^2/(2 s^2), 10^5 independent coordinates, float64: stationary
    variance and excess kurtosis with the exact Gaussian noise and with the opt-in Rademacher noise.

    Oracle (SPEC §2): variance s^2/(1 - h/(2 s^2)) and, for Gaussian noise, excess kurtosis 0. The
    linear recursion x' = a x + sqrt(2h) xi (a = 1 - h/s^2) has that variance for *any* unit-variance
    noise; its stationary excess kurtosis is kappa4(xi) (1 - a^2)/(1 + a^2), i.e. 0 for Gaussian and
    -2 (1 - a^2)/(1 + a^2) for Rademacher noise (kappa4 = -2): the law the opt-in noise changes.
    Standard errors come from the block means of 100 blocks of coordinates over the kept steps
    (coordinates are independent; steps within a block are correlated, so each block's time-average
    is one of 100 i.i.d. estimates).
    """
    from pib_bayes.samplers.core import make_noise

    n, blocks = 100_000, 100
    a = 1.0 - h / s**2
    burn = int(20 / (h / s**2))
    steps = 200 if quick else 1000
    exact_var = s**2 / (1.0 - h / (2.0 * s**2))
    rows = []
    for kind in ("gaussian", "rademacher"):
        noise = make_noise(kind, torch.Generator().manual_seed(seed))
        x = [torch.zeros(n, dtype=torch.float64)]
        m2 = torch.zeros(blocks, dtype=torch.float64)
        m4 = torch.zeros(blocks, dtype=torch.float64)
        for t in range(burn + steps):
            from pib_bayes.samplers import langevin_move_

            langevin_move_(x, [x[0] / s**2], h, noise)
            if t >= burn:
                v = x[0].view(blocks, -1)
                m2 += (v * v).mean(1)
                m4 += (v**4).mean(1)
        m2 /= steps
        m4 /= steps
        var, var_se = float(m2.mean()), float(m2.std() / math.sqrt(blocks))
        kurt_blocks = m4 / m2**2 - 3.0
        kurt, kurt_se = float(kurt_blocks.mean()), float(kurt_blocks.std() / math.sqrt(blocks))
        exact_kurt = 0.0 if kind == "gaussian" else -2.0 * (1 - a * a) / (1 + a * a)
        rows.append({
            "name": f"noise law ({kind}, h={h}, s={s}): variance / oracle", "noise": kind,
            "variance": var, "variance_se": var_se, "variance_oracle": exact_var,
            "ratio": var / exact_var, "ratio_se": var_se / exact_var,
            "variance_z": (var - exact_var) / var_se,
            "excess_kurtosis": kurt, "excess_kurtosis_se": kurt_se,
            "excess_kurtosis_theory": exact_kurt, "baseline": "oracle", "value": kind, "target": None,
        })
    return rows


def run(quick: bool = False, case: str | None = None, clock: str = "cpu") -> list[dict]:
    rows: list[dict] = []
    for c in ([case] if case else [*CASES, "noise", "prefetch"]):
        if c == "noise":
            if _noise_supported():
                rows += noise_law(quick)
        elif c == "prefetch":
            rows += run_prefetch(quick)
        else:
            rows += run_case(c, quick, clock)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    ap.add_argument("--case", choices=[*CASES, "noise", "prefetch"],
                    help="one comparison only (default: all)")
    ap.add_argument("--clock", choices=list(CLOCKS), default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.quick, args.case, args.clock)
    for r in rows:
        extra = f"  (target >= {r['target']})" if r.get("target") else ""
        if "value_s" in r:
            print(f"{r['name']:60s} {r['baseline_s'] * 1e6:9.1f} us -> {r['value_s'] * 1e6:9.1f} us"
                  f"  ratio {r['ratio']:.3f}{extra}", flush=True)
        else:
            print(f"{r['name']:60s} ratio {r['ratio']:.4f} ± {r['ratio_se']:.4f}  excess kurtosis "
                  f"{r['excess_kurtosis']:+.4f} ± {r['excess_kurtosis_se']:.4f} "
                  f"(theory {r['excess_kurtosis_theory']:+.4f})", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
