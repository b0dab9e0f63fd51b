"""Run every pib_bayes benchmark, one subprocess per comparison, and print a markdown table of ratios.

    python benchmarks/run.py [--quick] [--out results.json]
        [--only steps,sample,predict,memory,chains,iiw,zoo,tuning,io]

Comparisons (each in its own fresh Python process, so no allocator or thread-pool state leaks
from one into the next):

* ``steps``   benchmarks/bench_steps.py: SGLD / pSGLD / SGHMC optimizer steps vs ``torch.optim.SGD``
  and vs the floor (SGD + one ``torch.randn`` per weight), MLP 784-256-256-10 b128 and
  MLP 20-64-64-10 b64, one process each; plus the opt-in Rademacher noise against the exact
  Gaussian oracle of SPEC §2 (``noise``), and ``prefetch_noise=True`` against the floor by wall
  clock (``prefetch``).
* ``sample``  benchmarks/bench_sample.py: ``sample()`` with one chain vs a minimal hand-written SGLD loop
  with the same prior, and ``optim.SGLD`` + ``Energy.of_module`` vs torch SGD + a naive autograd prior,
  on both MLPs (issue 17).
* ``predict`` benchmarks/bench_predict.py: ``Posterior.predict`` over 100 draws vs a
  ``load_state_dict`` loop, one process per model.
* ``memory``  benchmarks/bench_memory.py: peak RSS of ``sample()`` for a 1M-weight model vs steps
  (thinning) and vs kept draws (one process per configuration).
* ``chains``  benchmarks/bench_chains.py (8 vectorized vs 8 sequential chains), when present.
* ``iiw``     benchmarks/bench_iiw.py (Fisher IIW: JVP vs per-example loop vs minibatch), when present.
* ``zoo``     benchmarks/bench_zoo.py: per model of tests/zoo.py, ``sample()`` step throughput vs a torch
  SGD training step, and ``Posterior.predict`` vs the plain loop of ``functional_call`` over the draws.
* ``tuning``  benchmarks/bench_tuning.py: "time to accuracy vs NUTS" (``step_size="auto"`` with SGLD,
  and ``sampler="auto"`` (SGHMC), vs Pyro NUTS 300 + 1000 on the Gaussian-linear posterior; met only
  when accurate on every seed and faster), plus ``sampler="auto", step_size="auto"`` on a small MLP
  and CNN (full batch, 4 chains; SGHMC's friction capped at critical damping of the prior-precision
  direction): one row each at 1000 + 1000 and at 1000 + 20000 steps, met when no chain diverged and
  the energy R-hat <= 1.05 (ratio 1.05 / R-hat).
* ``io``      benchmarks/bench_io.py: ``Posterior.save``/``load`` (netCDF4/HDF5) vs
  ``torch.save``/``torch.load`` on 1M weights x 60 draws, CPU time and transient memory
  (``ru_maxrss`` of a fresh process per case).

Ratios are throughput ratios, larger is better, each measured inside one process with
interleaved repeats (see each script). A row meets its target when ratio >= target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _script(name: str) -> str:
    return os.path.join(HERE, name)


def jobs(quick: bool) -> list[tuple[str, list[str], str]]:
    """(group, argv, kind) for every comparison; kind says how to read the JSON it writes."""
    q = ["--quick"] if quick else []
    out: list[tuple[str, list[str], str]] = []
    for case in ("mlp784", "mlp20", "noise", "prefetch"):
        out.append(("steps", [_script("bench_steps.py"), "--case", case, *q], "rows"))
    if os.path.exists(_script("bench_sample.py")):
        out.append(("sample", [_script("bench_sample.py"), *q], "rows"))
    for case in ("mlp784", "mlp20", "mlp784_x16", "mlp20_x16"):
        out.append(("predict", [_script("bench_predict.py"), "--case", case, *q], "rows"))
    out.append(("memory", [_script("bench_memory.py"), *q], "rows"))
    if os.path.exists(_script("bench_chains.py")):
        out.append(("chains", [_script("bench_chains.py"), *q], "chains"))
    if os.path.exists(_script("bench_zoo.py")):
        out.append(("zoo", [_script("bench_zoo.py"), *q], "rows"))
    if os.path.exists(_script("bench_iiw.py")):
        iiw = ["--n", "2000", "--repeats", "3"] if quick else []
        out.append(("iiw", [_script("bench_iiw.py"), *iiw], "iiw"))
    if os.path.exists(_script("bench_tuning.py")):
        out.append(("tuning", [_script("bench_tuning.py"), *q], "tuning"))
    if os.path.exists(_script("bench_io.py")):
        out.append(("io", [_script("bench_io.py"), *q], "rows"))
    return out


def _rows(kind: str, data) -> list[dict]:
    if kind == "rows":
        return list(data)
    if kind in ("chains", "tuning"):
        return list(data["rows"] if isinstance(data, dict) else data)
    # bench_iiw.py: {"rows": [{"estimator", "cpu_s", "ratio_to_jvp", ...}], ...}; ratio_to_jvp is
    # time(candidate) / time(jvp), i.e. how many times faster the JVP is
    rows = []
    for r in data.get("rows", []):
        est = r.get("estimator")
        if est is None or est == "jvp" or "ratio_to_jvp" not in r:
            continue
        rows.append({**r, "name": f"iiw: jvp vs {est} ({r.get('examples_used', '?')} examples)",
                     "baseline": est, "value": "jvp", "ratio": r["ratio_to_jvp"],
                     "target": {"loop": 10.0, "minibatch": 1.0}.get(est)})
    return rows + list(data.get("regularizer_rows", []))


def run_job(group: str, argv: list[str], kind: str) -> tuple[list[dict], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, *argv, "--out", path]
        shown = " ".join(["python", os.path.relpath(argv[0]), *argv[1:]])
        print(f"# {shown}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        info = {"group": group, "command": shown, "returncode": proc.returncode,
                "wall_s": time.perf_counter() - t0}
        if proc.returncode != 0 or not os.path.exists(path):
            info["error"] = (proc.stderr or proc.stdout)[-2000:]
            print(f"  FAILED ({proc.returncode}): {info['error'][-500:]}", file=sys.stderr, flush=True)
            return [], info
        with open(path) as fh:
            rows = _rows(kind, json.load(fh))
    for r in rows:
        r.setdefault("group", group)
        r["command"] = shown
    return rows, info


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(rows: list[dict]) -> str:
    lines = ["| benchmark | baseline | candidate | ratio | target | met |", "|---|---|---|---:|---:|:---:|"]
    for r in rows:
        target = r.get("target")
        ok = r["ratio"] >= target if target is not None else False
        ok = ok and r.get("accurate_every_seed", True)  # tuning rows: faster AND accurate on every seed
        met = "" if target is None else ("yes" if ok else "**no**")
        ratio = f"{r['ratio']:.4f} ± {r['ratio_se']:.4f}" if "ratio_se" in r else f"{r['ratio']:.3f}"
        lines.append(f"| {r['name']} | {_fmt(r.get('baseline'))} | {_fmt(r.get('value'))} | {ratio} | "
                     f"{'' if target is None else f'>= {target:g}'} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats: a smoke run, not a measurement")
    ap.add_argument("--out", help="write every row, the commands and the environment as JSON here")
    ap.add_argument("--only", help="comma-separated groups: steps,sample,predict,memory,chains,iiw,zoo,"
                                   "tuning,io")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    rows, runs = [], []
    for group, job_argv, kind in jobs(args.quick):
        if only and group not in only:
            continue
        got, info = run_job(group, job_argv, kind)
        rows += got
        runs.append(info)
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "cpus": os.cpu_count(), "load_average": os.getloadavg(), "quick": args.quick,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print(table(rows))
    failed = [r for r in runs if r["returncode"] != 0]
    if failed:
        print(f"\n{len(failed)} benchmark process(es) failed: {[r['command'] for r in failed]}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"rows": rows, "runs": runs, "env": env}, fh, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
