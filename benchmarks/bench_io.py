"""Posterior files: ``Posterior.save``/``Posterior.load`` (netCDF4/HDF5) vs ``torch.save``/``torch.load``.

Draws of 1,000,000 float32 weights x 60 draws (one chain: 240 MB = 229 MiB). Each case runs in a
fresh subprocess (``MALLOC_MMAP_THRESHOLD_=131072``, one thread) that times one call with
``time.process_time`` (CPU) and ``time.perf_counter`` (wall), with h5py and h5netcdf imported
before the clock starts (as torch is), and reports its transient memory:
the peak resident set during the call (``VmHWM``, reset just before it through
``/proc/self/clear_refs``; it sees HDF5's C allocations that tracemalloc does not) minus the
resident set just before the call, minus the result's bytes for a load. The
cases are interleaved (save, torch.save, load, torch.load, then again), ``--repeats`` rounds
(3; 1 with ``--quick``, which also uses 100,000 weights); medians count.

Rows: save vs torch.save and load vs torch.load (CPU time ratio torch / ours, target >= 1.0); the
transient memory of save and of load against one chunk (pib_bayes.store.CHUNK_BYTES) + 10%
(ratio = 1.1 chunk / transient, target >= 1.0).

    flock /tmp/pib_heavy.lock python benchmarks/bench_io.py [--quick] [--out rows.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not in /proc/self/status")


def _reset_peak() -> None:
    """Reset the process's peak resident set (VmHWM) to its current one (Linux ``clear_refs`` 5), so
    that the peak read after the call is the call's own, not that of making its input."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def _draws(weights: int, draws: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(1, draws, weights, generator=g)}


def one(case: str, path: str, weights: int, draws: int) -> dict:
    import h5netcdf  # noqa: F401 - imported before the clock starts, as torch is (pib_bayes.store imports
    import h5py  # noqa: F401 - them on first use)
    import torch

    import pib_bayes
    import pib_bayes.store  # noqa: F401

    torch.set_num_threads(1)
    result_bytes = 0
    if case in ("save", "torch_save"):
        d = _draws(weights, draws)
        post = pib_bayes.Posterior(d, {}, {"task": "regression"})
        _reset_peak()
        before, c0, w0 = _rss(), time.process_time(), time.perf_counter()
        if case == "save":
            post.save(path)
        else:
            torch.save({"draws": d}, path)
    else:
        _reset_peak()
        before, c0, w0 = _rss(), time.process_time(), time.perf_counter()
        if case == "load":
            got = pib_bayes.Posterior.load(path).draws["w"]
        else:
            got = torch.load(path, weights_only=True)["draws"]["w"]
        result_bytes = got.nbytes
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    peak = _peak()
    return {"case": case, "cpu_s": cpu, "wall_s": wall, "transient_bytes": peak - before - result_bytes}


def _spawn(case: str, path: str, weights: int, draws: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", case, path, str(weights),
                          str(draws)], check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(quick: bool = False, repeats: int | None = None) -> list[dict]:
    from pib_bayes.store import CHUNK_BYTES

    weights, draws = (100_000, 60) if quick else (1_000_000, 60)
    repeats = repeats or (1 if quick else 3)
    res: dict[str, list[dict]] = {c: [] for c in ("save", "torch_save", "load", "torch_load")}
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = os.path.join(tmp, "p.nc"), os.path.join(tmp, "p.pt")
        for _ in range(repeats):
            res["save"].append(_spawn("save", ours, weights, draws))
            res["torch_save"].append(_spawn("torch_save", theirs, weights, draws))
            res["load"].append(_spawn("load", ours, weights, draws))
            res["torch_load"].append(_spawn("torch_load", theirs, weights, draws))
        sizes = {"nc": os.path.getsize(ours), "pt": os.path.getsize(theirs)}

    def med(case: str, key: str) -> float:
        return statistics.median(r[key] for r in res[case])

    mib = weights * draws * 4 / 2**20
    rows = []
    for ours_c, theirs_c, label in (("save", "torch_save", "save"), ("load", "torch_load", "load")):
        rows.append({
            "name": f"io Posterior.{label} vs torch.{label}, {weights:,} weights x {draws} draws "
                    f"({mib:.0f} MiB)",
            "baseline": f"torch.{label}", "value": f"Posterior.{label}",
            "baseline_cpu_s": med(theirs_c, "cpu_s"), "value_cpu_s": med(ours_c, "cpu_s"),
            "baseline_wall_s": med(theirs_c, "wall_s"), "value_wall_s": med(ours_c, "wall_s"),
            "ratio": med(theirs_c, "cpu_s") / med(ours_c, "cpu_s"), "target": 1.0,
            "runs": res[ours_c] + res[theirs_c], "file_bytes": sizes})
    for case in ("save", "load"):
        transient = max(med(case, "transient_bytes"), 1.0)
        rows.append({
            "name": f"io Posterior.{case} transient memory vs one chunk + 10% ({mib:.0f} MiB of draws)",
            "baseline": "transient", "value": "1.1 x chunk", "baseline_bytes": transient,
            "value_bytes": 1.1 * CHUNK_BYTES, "ratio": 1.1 * CHUNK_BYTES / transient, "target": 1.0,
            "torch_transient_bytes": med(f"torch_{case}", "transient_bytes")})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--out")
    ap.add_argument("--one", nargs=4, metavar=("CASE", "PATH", "WEIGHTS", "DRAWS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        case, path, weights, draws = args.one
        print(json.dumps(one(case, path, int(weights), int(draws))))
        return 0
    rows = run(args.quick, args.repeats)
    for r in rows:
        if "value_cpu_s" in r:
            print(f"{r['name']:80s} cpu {r['baseline_cpu_s']:.3f} s -> {r['value_cpu_s']:.3f} s, wall "
                  f"{r['baseline_wall_s']:.3f} s -> {r['value_wall_s']:.3f} s  ratio {r['ratio']:.3f} "
                  f"(target >= {r['target']})", flush=True)
        else:
            print(f"{r['name']:80s} transient {r['baseline_bytes'] / 2**20:.1f} MiB (torch "
                  f"{r['torch_transient_bytes'] / 2**20:.1f} MiB), 1.1 chunk "
                  f"{r['value_bytes'] / 2**20:.1f} MiB "
                  f" ratio {r['ratio']:.3f} (target >= {r['target']})", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
