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

Before the clock, each case saves and loads a tiny file the same way (its code paged in, first-call
set-up done), on both sides, and a save case deletes the file of the previous round (both sides then
write a new file; on this VM, writing 229 MiB into the page cache costs 0.04 s to 0.5 s of CPU from
one call to the next, depending on the pages the kernel hands out, so medians of interleaved rounds).

Rows: save vs torch.save and load vs torch.load (CPU time ratio torch / ours of the medians, and of
the fastest rounds, the noise being additive; target >= 1.0); the
transient memory of save and of load against one chunk (pib_bayes.store.CHUNK_BYTES) + 10%
(ratio = 1.1 chunk / transient, target >= 1.0); the bytes a checkpoint writes (its new segment plus
its payload, measured on the files) in a run of 4000 draws vs one of 1000 (800 vs 200 with
``--quick``), checkpoints every 50 steps (ratio = short-run mean / long-run mean: 1 when a
checkpoint costs what it adds; a checkpoint rewriting every draw so far would give about 0.25); the
peak memory of ``sample`` above the resident set before it, in memory vs ``store=``, on 100,100
weights x 2000 draws (764 MiB; 200 draws with ``--quick``), a fresh process each; for the streamed
run also the peak before the Posterior it returns is built (``Posterior.load(store, lazy=True)``).

``--phases``: only where a full load's CPU time goes (:func:`phase_rows`). ``--distributed``: only
the peak memory per rank of ``sample_distributed`` in memory vs ``store=`` (:func:`distributed_rows`).

    flock /tmp/pib_heavy.lock python benchmarks/bench_io.py [--quick] [--phases] [--distributed] [--out F]
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


def _tiny_save(post, path: str) -> str:
    post.save(path + ".tiny.nc")
    return path + ".tiny.nc"


def _tiny_torch(d, path: str) -> str:
    import torch

    torch.save(d, path + ".tiny.pt")
    return path + ".tiny.pt"


def one(case: str, path: str, weights: int, draws: int) -> dict:
    import h5netcdf  # noqa: F401 - imported before the clock starts, as torch is (pib_bayes.store imports
    import h5py  # noqa: F401 - them on first use)
    import torch

    import pib_bayes
    import pib_bayes.store  # noqa: F401

    torch.set_num_threads(1)
    # one call on a tiny file first, on both sides: the code it runs is paged in (resident memory that
    # is not the call's transient memory) and first-call set-up is not timed
    tiny = {"w": torch.randn(1, 2, 3)}
    pib_bayes.Posterior.load(_tiny_save(pib_bayes.Posterior(tiny, {}, {"task": "regression"}), path))
    torch.load(_tiny_torch(tiny, path), weights_only=True)
    result_bytes = 0
    if case in ("save", "torch_save"):
        d = _draws(weights, draws)
        post = pib_bayes.Posterior(d, {}, {"task": "regression"})
        if os.path.exists(path):  # both sides write a new file (torch.save would truncate the old one in
            os.unlink(path)  # place, Posterior.save renames a new one over it: unlike page-cache costs)
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


def phases_one(case: str, path: str) -> dict:
    """Where a full load's CPU time goes, in a fresh process (as :func:`one`). ``ours``: the steps of
    ``pib_bayes.store._Chunked.read_all`` on the file's one posterior variable, timed apart: the
    populated allocation of the result, the raw chunk reads into it, the XXH3-64 digest of each chunk
    and its NaN/Inf test (the last two while the chunk is in cache, as the load does them; a
    format-4 file records its non-finite chains, so its load makes no NaN/Inf test: 0 here).
    ``torch_pages``: paging in a fresh result from torch's allocator (a write to every 4 KiB page),
    the part of torch.load that is not its copy from the page cache."""
    import h5py
    import numpy as np
    import torch
    import xxhash

    from pib_bayes import store

    torch.set_num_threads(1)
    if case == "torch_pages":
        n = os.path.getsize(path)
        c0 = time.process_time()
        a = torch.empty(n, dtype=torch.uint8).numpy()
        a[::4096] = 1
        return {"case": case, "pages_s": time.process_time() - c0}
    with h5py.File(path, "r") as f:
        ds = f["posterior/w"]
        digests = ds.attrs[store.DIGEST_ATTR]
        scan = store.NONFINITE_ATTR not in ds.attrs  # format 3: the load tests every chunk itself
        offs = list(store._grid(ds.shape, ds.chunks))
        t = {"alloc_s": 0.0, "read_s": 0.0, "hash_s": 0.0, "scan_s": 0.0}
        c0 = time.process_time()
        out = store._empty(ds.shape, ds.dtype)
        c1 = time.process_time()
        t["alloc_s"] = c1 - c0
        for i, off in enumerate(offs):
            dest = out[store._region(ds.shape, ds.chunks, off)].reshape(-1)
            a = time.process_time()
            ds.id.read_direct_chunk(off, out=dest.view(np.uint8))
            b = time.process_time()
            ok = xxhash.xxh3_64_hexdigest(dest) == digests[16 * i:16 * i + 16]
            c = time.process_time()
            ok = ok and (not scan or store._finite(dest))
            d = time.process_time()
            t["read_s"] += b - a
            t["hash_s"] += c - b
            t["scan_s"] += d - c
            if not ok:
                raise RuntimeError("a chunk failed its check")
    return {"case": case, **t}


def phase_rows(repeats: int = 3) -> list[dict]:
    """Medians of ``repeats`` interleaved fresh-process rounds of :func:`phases_one` (both cases)
    and of full loads on both sides, on the 229 MiB file of :func:`run`."""
    weights, draws = 1_000_000, 60
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    res: dict[str, list[dict]] = {c: [] for c in ("ours", "torch_pages", "load", "torch_load")}
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = os.path.join(tmp, "p.nc"), os.path.join(tmp, "p.pt")
        _spawn("save", ours, weights, draws)
        _spawn("torch_save", theirs, weights, draws)
        for _ in range(repeats):
            for case, path in (("ours", ours), ("torch_pages", theirs)):
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--phase", case, path],
                                     check=True, capture_output=True, text=True, env=env).stdout
                res[case].append(json.loads(out.strip().splitlines()[-1]))
            res["load"].append(_spawn("load", ours, weights, draws))
            res["torch_load"].append(_spawn("torch_load", theirs, weights, draws))

    def med(case: str, key: str) -> float:
        return statistics.median(r[key] for r in res[case])

    return [{"name": f"io Posterior.load phases, {weights:,} weights x {draws} draws (229 MiB)",
             "load_cpu_s": med("load", "cpu_s"), "torch_load_cpu_s": med("torch_load", "cpu_s"),
             "torch_pages_s": med("torch_pages", "pages_s"),
             **{k: med("ours", k) for k in ("alloc_s", "read_s", "hash_s", "scan_s")}, "runs": res}]


def _dist_rank(rank: int, port: int, store: str | None, draws: int, out: str) -> None:
    """One rank of :func:`distributed_rows`: ``sample_distributed`` of a 1000 -> 100 linear layer,
    one chain a rank, in memory or to ``store``; writes its peak resident set above the one before."""
    import datetime

    import torch
    import torch.distributed as dist
    from torch import nn

    from pib_bayes.distributed import sample_distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=300))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1000, generator=g), torch.randn(32, 100, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(1000, 100)
    kw = dict(beta=1 / 32, step_size=1e-6, num_chains=2, num_warmup=0, num_draws=draws, seed=0)
    sample_distributed(nn.Linear(3, 1), "gaussian", (torch.randn(8, 3), torch.randn(8, 1)),
                       **dict(kw, num_draws=2), store=None if store is None else store + ".tiny.nc")
    _reset_peak()
    before, c0 = _rss(), time.process_time()
    post = sample_distributed(model, "gaussian", (x, y), store=store, **kw)
    cpu, peak = time.process_time() - c0, _peak()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"peak_above_bytes": peak - before, "cpu_s": cpu,
                   "draw_bytes": 2 * draws * 100_100 * 4 if post is not None else None}, fh)
    dist.destroy_process_group()


def distributed_rows(draws: int = 1000) -> list[dict]:
    """Peak memory of ``sample_distributed`` on 2 gloo ranks (1 chain each, 100,100 weights), the
    Posterior gathered in memory on rank 0 vs ``store=`` (rank 0 writes the one file chunk by
    chunk); a fresh pair of processes per case."""
    import socket

    import torch.multiprocessing as mp

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("memory", "store"):
            out = os.path.join(tmp, case)
            os.mkdir(out)
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            store = os.path.join(tmp, "post.nc") if case == "store" else None
            mp.start_processes(_dist_rank, args=(port, store, draws, out), nprocs=2, start_method="spawn")
            res[case] = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
    return [{"name": f"io sample_distributed(store=) peak memory per rank vs in memory, 2 ranks x 1 chain x "
                     f"100,100 weights x {draws} draws ({res['memory'][0]['draw_bytes'] / 2**20:.0f} MiB "
                     "of draws)",
             "baseline": "in memory", "value": "store=",
             "baseline_peak_bytes": [r["peak_above_bytes"] for r in res["memory"]],
             "value_peak_bytes": [r["peak_above_bytes"] for r in res["store"]],
             "baseline_cpu_s": [r["cpu_s"] for r in res["memory"]],
             "value_cpu_s": [r["cpu_s"] for r in res["store"]],
             "ratio": res["memory"][0]["peak_above_bytes"] / res["store"][0]["peak_above_bytes"],
             "target": None}]


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
            "ratio_of_minima": min(r["cpu_s"] for r in res[theirs_c]) / min(r["cpu_s"] for r in res[ours_c]),
            "runs": res[ours_c] + res[theirs_c], "file_bytes": sizes})
    for case in ("save", "load"):
        transient = max(med(case, "transient_bytes"), 1.0)
        rows.append({
            "name": f"io Posterior.{case} transient memory vs one chunk + 10% ({mib:.0f} MiB of draws)",
            "baseline": "transient", "value": "1.1 x chunk", "baseline_bytes": transient,
            "value_bytes": 1.1 * CHUNK_BYTES, "ratio": 1.1 * CHUNK_BYTES / transient, "target": 1.0,
            "torch_transient_bytes": med(f"torch_{case}", "transient_bytes")})
    return rows


def checkpoint_bytes(num_draws: int, every: int = 50) -> list[int]:
    """Bytes each checkpoint of ``sample(checkpoint=...)`` writes (its new segment plus its payload),
    on a 20-200-5 MLP (5,205 weights), 2 vectorized chains, SGLD, no warm-up."""
    import torch
    from torch import nn

    import pib_bayes as pb
    from pib_bayes.driver import checkpoint as ckpt_mod

    torch.set_num_threads(1)
    sizes: list[int] = []
    real = ckpt_mod._Checkpointer.write

    def write(self, *args, **kwargs):
        before = set(self.out.segments.written)
        real(self, *args, **kwargs)
        sizes.append(os.path.getsize(self.path) + sum(
            os.path.getsize(self.out.segments.dir / n) for n in self.out.segments.written if n not in before))

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 20, generator=g), torch.randn(256, 5, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 200), nn.Tanh(), nn.Linear(200, 5))
    ckpt_mod._Checkpointer.write = write
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pb.sample(model, "gaussian", (x, y), beta=1 / 256, step_size=1e-5, num_chains=2, num_warmup=0,
                      num_draws=num_draws, batch_size=32, seed=0, checkpoint=os.path.join(tmp, "c.ckpt"),
                      checkpoint_every=every)
    finally:
        ckpt_mod._Checkpointer.write = real
    return sizes


def stream_one(store: str | None, weights_out: int, draws: int) -> dict:
    """One run of ``sample`` (a 1000 x ``weights_out`` linear model, 1 chain, no warm-up), in memory or
    streamed to ``store``: its CPU time and its peak resident set above the one before the call."""
    import torch
    from torch import nn

    import pib_bayes as pb

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1000, generator=g), torch.randn(32, weights_out, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(1000, weights_out)
    pb.sample(nn.Linear(3, 1), "gaussian", (torch.randn(8, 3), torch.randn(8, 1)), beta=0.1, num_warmup=0,
              num_draws=2, seed=0, store=None if store is None else store + ".tiny.nc")  # warm-up
    sampled: dict[str, int] = {}
    real_load = pb.Posterior.load.__func__

    def load(cls, *args, **kwargs):  # the streamed run's end: its store written, the Posterior not built
        sampled["peak"] = _peak()
        return real_load(cls, *args, **kwargs)

    pb.Posterior.load = classmethod(load)
    _reset_peak()
    before, c0 = _rss(), time.process_time()
    post = pb.sample(model, "gaussian", (x, y), beta=1 / 32, step_size=1e-6, num_warmup=0, num_draws=draws,
                     seed=0, store=store)
    cpu, peak = time.process_time() - c0, _peak()
    return {"case": "store" if store else "memory", "cpu_s": cpu, "peak_above_bytes": peak - before,
            "sampling_peak_above_bytes": sampled.get("peak", peak) - before,
            "draw_bytes": draws * post.num_params * 4}


def stream_rows(quick: bool = False) -> list[dict]:
    weights_out, draws = (100, 200) if quick else (100, 2000)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("memory", "store"):
            store = os.path.join(tmp, "post.nc") if case == "store" else "-"
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--stream", store,
                                  str(weights_out), str(draws)], check=True, capture_output=True, text=True,
                                 env=env).stdout
            res[case] = json.loads(out.strip().splitlines()[-1])
    from pib_bayes.store import CHUNK_BYTES

    return [{"name": f"io sample(store=) peak memory vs in memory, {1000 * weights_out + weights_out:,} "
                     f"weights x {draws} draws ({res['memory']['draw_bytes'] / 2**20:.0f} MiB of draws)",
             "baseline": "in memory", "value": "store=",
             "baseline_peak_bytes": res["memory"]["peak_above_bytes"],
             "value_peak_bytes": res["store"]["peak_above_bytes"],
             "value_sampling_peak_bytes": res["store"]["sampling_peak_above_bytes"],
             "baseline_cpu_s": res["memory"]["cpu_s"], "value_cpu_s": res["store"]["cpu_s"],
             "draw_bytes": res["memory"]["draw_bytes"], "chunk_bytes": CHUNK_BYTES,
             "ratio": res["memory"]["peak_above_bytes"] / res["store"]["peak_above_bytes"], "target": None}]


def checkpoint_rows(quick: bool = False) -> list[dict]:
    short_n, long_n = (200, 800) if quick else (1000, 4000)
    short, long = checkpoint_bytes(short_n), checkpoint_bytes(long_n)
    # the checkpoints at steps 50, 100, ... (the first, at step 0, has no draws; the last two are the
    # end-of-group and finished ones)
    s_mean, l_mean = statistics.mean(short[1:-2]), statistics.mean(long[1:-2])
    return [{
        "name": f"io checkpoint bytes per checkpoint (every 50 steps), {long_n} vs {short_n} draws, "
                "5,205 weights x 2 chains",
        "baseline": f"{short_n} draws", "value": f"{long_n} draws",
        "baseline_bytes": s_mean, "value_bytes": l_mean, "ratio": s_mean / l_mean, "target": 0.95,
        "baseline_last_bytes": short[-3], "value_last_bytes": long[-3],
        "baseline_total_bytes": sum(short), "value_total_bytes": sum(long),
        "draw_bytes_per_checkpoint": 2 * 50 * 5205 * 4}]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--out")
    ap.add_argument("--one", nargs=4, metavar=("CASE", "PATH", "WEIGHTS", "DRAWS"), help=argparse.SUPPRESS)
    ap.add_argument("--stream", nargs=3, metavar=("STORE", "WEIGHTS_OUT", "DRAWS"), help=argparse.SUPPRESS)
    ap.add_argument("--phase", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--phases", action="store_true", help="only where a full load's time goes (fresh "
                    "processes, --repeats rounds, default 3)")
    ap.add_argument("--distributed", action="store_true", help="only the peak memory of "
                    "sample_distributed, in memory vs store= (2 gloo ranks)")
    args = ap.parse_args(argv)
    if args.distributed:
        for r in distributed_rows():
            mib = [f"{b / 2**20:.1f}" for b in r["baseline_peak_bytes"]]
            got = [f"{b / 2**20:.1f}" for b in r["value_peak_bytes"]]
            cpu = [f"{a:.2f} -> {b:.2f}" for a, b in zip(r["baseline_cpu_s"], r["value_cpu_s"], strict=True)]
            print(f"{r['name']}: peak above the start, ranks 0 / 1: {' / '.join(mib)} MiB -> "
                  f"{' / '.join(got)} MiB (cpu s {', '.join(cpu)})", flush=True)
            if args.out:
                with open(args.out, "w") as fh:
                    json.dump(r, fh, indent=1)
        return 0
    if args.phase:
        print(json.dumps(phases_one(*args.phase)))
        return 0
    if args.phases:
        phases = phase_rows(args.repeats or 3)
        for r in phases:
            print(f"{r['name']}: load {r['load_cpu_s']:.4f} s = populated allocation {r['alloc_s']:.4f} + "
                  f"chunk reads {r['read_s']:.4f} + XXH3-64 {r['hash_s']:.4f} + NaN/Inf test "
                  f"{r['scan_s']:.4f} "
                  f"+ the rest; torch.load {r['torch_load_cpu_s']:.4f} s, of which paging in its result "
                  f"{r['torch_pages_s']:.4f} (medians)", flush=True)
        if args.out:  # every row, once (not each row over the last)
            with open(args.out, "w") as fh:
                json.dump(phases, fh, indent=1)
        return 0
    if args.stream:
        store, weights_out, draws = args.stream
        print(json.dumps(stream_one(None if store == "-" else store, int(weights_out), int(draws))))
        return 0
    if args.one:
        case, path, weights, draws = args.one
        print(json.dumps(one(case, path, int(weights), int(draws))))
        return 0
    rows = run(args.quick, args.repeats) + checkpoint_rows(args.quick) + stream_rows(args.quick)
    for r in rows:
        if "value_peak_bytes" in r:
            print(f"{r['name']:80s} peak {r['baseline_peak_bytes'] / 2**20:.1f} MiB -> "
                  f"{r['value_peak_bytes'] / 2**20:.1f} MiB, before the returned Posterior is built "
                  f"{r['value_sampling_peak_bytes'] / 2**20:.1f} MiB (cpu {r['baseline_cpu_s']:.2f} s -> "
                  f"{r['value_cpu_s']:.2f} s; chunk {r['chunk_bytes'] / 2**20:.0f} MiB)", flush=True)
        elif "value_last_bytes" in r:
            print(f"{r['name']:80s} mean {r['baseline_bytes']:,.0f} B -> {r['value_bytes']:,.0f} B (last "
                  f"{r['baseline_last_bytes']:,} -> {r['value_last_bytes']:,}; new draws "
                  f"{r['draw_bytes_per_checkpoint']:,} B; run total {r['baseline_total_bytes']:,} -> "
                  f"{r['value_total_bytes']:,} B)  ratio {r['ratio']:.3f} (target >= {r['target']})",
                  flush=True)
        elif "value_cpu_s" in r:
            print(f"{r['name']:80s} cpu {r['baseline_cpu_s']:.3f} s -> {r['value_cpu_s']:.3f} s, wall "
                  f"{r['baseline_wall_s']:.3f} s -> {r['value_wall_s']:.3f} s  ratio {r['ratio']:.3f} "
                  f"(of the fastest rounds {r['ratio_of_minima']:.3f}; target >= {r['target']})", flush=True)
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
