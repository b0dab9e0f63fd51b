"""Out of core (#18): a posterior larger than RAM summarised and predicted chunk by chunk.

Full size: MLP 784-1024-192-10 (1,002,570 float32 weights), 4 chains x 1,000 draws = 4,000 draws,
16.0 GB of draws on disk, on a 24 GB machine; target: peak RSS <= 4 GB in every phase.
``--quick``: MLP 784-128-10 (101,770 weights), 4 chains x 100 draws (163 MB).

Phases, each in a fresh subprocess that reports its own peak resident set (``ru_maxrss``), process
CPU time (one torch thread) and wall time:

* ``write`` with ``--writer stand-in`` (default): the draws are streamed to an HDF5 file (group
  ``posterior``, one chunked dataset per parameter, dims (chain, draw, *shape), chunks of one draw
  of one chain), a block of draws at a time: an AR(1) walk (rho 0.9, scale 0.01) around the
  initial weights per chain, plus per-draw ``energy``/``loss`` statistics; the later phases read it
  through :class:`H5Draws`. With ``--writer sample``: ``pib_bayes.sample(..., store=path)`` (SGLD
  on the 256 rows below, 10 warm-up steps, then the draws streamed to the store; needs #18's write
  side, ``sample(store=)`` and ``Posterior.load(lazy=True)``), read back with
  ``Posterior.load(path, lazy=True)``.
* ``summary``: :func:`pib_bayes.diagnostics.summary` with ``data=`` (256 rows: ``log_lik``),
  ``probe_x=`` (4 inputs: ``pred[i]``) and the 8 default random projections, on a
  :class:`~pib_bayes.Posterior` whose draws are read lazily from the file.
* ``predict``: :meth:`~pib_bayes.Posterior.predict` at 256 inputs over all 4,000 draws, checked
  bit-equal against an in-memory Posterior of the first 8 draws of chain 0.
* ``iiw``: :func:`pib_bayes.iiw.samples.kl` with ``structure="diag"`` (streamed per-coordinate
  moments) against the N(0, 1) prior.

The file is deleted at the end (``--keep`` keeps it). Heavy: run it under the lock,

    flock /tmp/pib_heavy.lock python benchmarks/bench_out_of_core.py [--quick] [--writer stand-in|sample]
        [--dir /tmp] [--out rows.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

FULL = {"sizes": (784, 1024, 192, 10), "chains": 4, "draws": 1000}
QUICK = {"sizes": (784, 128, 10), "chains": 4, "draws": 100}
LIMIT_BYTES = 4 * 10**9  # the target: 4 GB peak RSS
ROWS, PROBES = 256, 4


class H5Draws(Mapping):
    """The lazy draws protocol (``shape``, ``dtype``, ``read``, ``__getitem__``) over the group
    ``posterior`` of an HDF5 file: each ``read`` is one h5py hyperslab read of those chains and
    draws; nothing is cached."""

    def __init__(self, path: str) -> None:
        import h5py

        self._file = h5py.File(path, "r")
        self._group = self._file["posterior"]
        self._names = list(json.loads(self._group.attrs["order"]))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._group[name].shape)

    def dtype(self, name: str) -> Any:
        import torch

        return {"float32": torch.float32, "float64": torch.float64}[str(self._group[name].dtype)]

    def read(self, name: str, chains: slice | list[int], draws: slice) -> Any:
        import numpy as np
        import torch

        ds = self._group[name]
        if isinstance(chains, slice):
            return torch.from_numpy(ds[chains, draws])
        return torch.from_numpy(np.stack([ds[c, draws] for c in chains]))

    def __getitem__(self, name: str) -> Any:
        import torch

        return torch.from_numpy(self._group[name][...])

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _model(sizes: tuple[int, ...]):
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_steps import mlp

    torch.manual_seed(0)
    return mlp(sizes)


def _data(sizes: tuple[int, ...]):
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, sizes[0], generator=g)
    return x, torch.randint(0, sizes[-1], (ROWS,), generator=g)


def phase_write(path: str, cfg: dict, writer: str) -> dict:
    import h5py
    import numpy as np
    import torch

    model = _model(cfg["sizes"])
    c, n = cfg["chains"], cfg["draws"]
    if writer == "sample":
        import pib_bayes

        x, y = _data(cfg["sizes"])
        os.remove(path)  # sample() creates the store itself
        pib_bayes.sample(model, "cross_entropy", (x, y), beta=1 / ROWS, prior=1.0, step_size=1e-6,
                         batch_size=64, num_chains=c, num_warmup=10, num_draws=n, seed=0, store=path)
        return {"file_bytes": os.path.getsize(path)}
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(2)
    rho, scale, block = 0.9, 0.01, 8
    state = {k: torch.randn(c, *p.shape, generator=gen) for k, p in params.items()}
    # every buffer allocated once: fresh 12-100 MB tensors per block, freed between h5py writes, left
    # glibc's heap fragmented (its dynamic mmap threshold) and the RSS grew to 9.4 GB over the 16 GB
    noise = {k: torch.empty(c, *p.shape) for k, p in params.items()}
    out = {k: torch.empty(c, block, *p.shape) for k, p in params.items()}
    written = 0
    with h5py.File(path, "w") as f:
        grp = f.create_group("posterior")
        grp.attrs["order"] = json.dumps(list(params))
        sets = {k: grp.create_dataset(k, (c, n, *p.shape), dtype="float32", chunks=(1, 1, *p.shape))
                for k, p in params.items()}
        stats = f.create_group("sample_stats")
        energy = np.empty((c, n))
        for d0 in range(0, n, block):
            d1 = min(n, d0 + block)
            for k, p in params.items():
                buf = out[k][:, :d1 - d0]
                for j in range(d1 - d0):
                    torch.randn(state[k].shape, generator=gen, out=noise[k])
                    state[k].mul_(rho).add_(noise[k], alpha=(1 - rho**2) ** 0.5)
                    torch.add(p.detach(), state[k], alpha=scale, out=buf[:, j])
                sets[k][:, d0:d1] = buf.numpy()
                written += buf.numel() * 4
            energy[:, d0:d1] = torch.randn(c, d1 - d0, generator=gen).double().numpy()
        stats.create_dataset("energy", data=energy)
        stats.create_dataset("loss", data=energy * 0.5 + 1.0)
    return {"bytes_written": written, "file_bytes": os.path.getsize(path)}


def _posterior(path: str, cfg: dict, writer: str):
    import h5py
    import torch

    from pib_bayes import Posterior

    model = _model(cfg["sizes"])
    if writer == "sample":
        return Posterior.load(path, model=model, lazy=True), model
    with h5py.File(path, "r") as f:
        stats = {k: torch.from_numpy(f["sample_stats"][k][...]) for k in ("energy", "loss")}
    meta = {"task": "classification", "likelihood": None, "noise_std": None}
    return Posterior(H5Draws(path), stats, meta, model=model), model


def phase_summary(path: str, cfg: dict, writer: str) -> dict:
    import warnings

    from pib_bayes import diagnostics

    post, _ = _posterior(path, cfg, writer)
    x, y = _data(cfg["sizes"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = diagnostics.summary(post, data=(x, y), probe_x=x[:PROBES])
    return {"rows": list(table.index), "max_r_hat": float(table["r_hat"].max()),
            "lazy": post.lazy, "draws": post.num_chains * post.num_draws, "weights": post.num_params}


def phase_predict(path: str, cfg: dict, writer: str) -> dict:
    import torch

    from pib_bayes import Posterior

    post, model = _posterior(path, cfg, writer)
    x, _ = _data(cfg["sizes"])
    pred = post.predict(x)
    first = {k: v for _, _, b in post.iter_draws(chains=[0], draws=slice(0, 8)) for k, v in b.items()}
    small = Posterior(first, {}, {"task": "classification"}, model=model).predict(x)
    return {"per_draw_shape": list(pred.per_draw.shape), "engine": post.last_engine,
            "first_8_draws_bit_equal": bool(torch.equal(pred.per_draw[:8], small.per_draw)),
            "mean_sums_to_one": bool(torch.allclose(pred.mean.sum(-1), torch.ones(ROWS)))}


def phase_iiw(path: str, cfg: dict, writer: str) -> dict:
    from pib_bayes import GaussianPrior
    from pib_bayes.iiw.samples import kl

    post, _ = _posterior(path, cfg, writer)
    res = kl(post, GaussianPrior(std=1.0), structure="diag")
    return {"kl_total_nats": res.total}


PHASES = {"write": phase_write, "summary": phase_summary, "predict": phase_predict, "iiw": phase_iiw}


def run_phase(name: str, path: str, quick: bool, writer: str) -> dict:
    import torch

    torch.set_num_threads(1)
    cfg = QUICK if quick else FULL
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # after importing torch
    t0, w0 = time.process_time(), time.perf_counter()
    extra = PHASES[name](path, cfg, writer)
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"phase": name, "peak_rss_bytes": peak, "rss_after_torch_import_bytes": base, "cpu_s": cpu,
            "wall_s": wall, **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100k weights x 400 draws instead of 1M x 4000")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the draws file is written")
    ap.add_argument("--keep", action="store_true", help="keep the draws file")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--writer", choices=("stand-in", "sample"), default="stand-in",
                    help="who writes the draws: the benchmark's chunked HDF5 writer, or sample(store=)")
    ap.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase, args.path, args.quick, args.writer)))
        return
    if args.writer == "sample":
        import inspect

        import pib_bayes

        if "store" not in inspect.signature(pib_bayes.sample).parameters:
            raise SystemExit("--writer sample: this pib_bayes has no sample(store=) (issue 18's streaming "
                             "write side); use --writer stand-in")
    cfg = QUICK if args.quick else FULL
    fd, path = tempfile.mkstemp(prefix="pib_out_of_core_", suffix=".h5", dir=args.dir)
    os.close(fd)
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        for name in PHASES:
            cmd = [sys.executable, os.path.abspath(__file__), "--phase", name, "--path", path,
                   "--writer", args.writer]
            proc = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True,
                                  env=env)
            if proc.returncode:
                raise SystemExit(f"phase {name} failed (exit status {proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["within_4GB"] = row["peak_rss_bytes"] <= LIMIT_BYTES
            rows.append(row)
            short = {k: v for k, v in row.items() if k not in ("rows",)}
            print(json.dumps(short), flush=True)
    finally:
        if not args.keep:  # the file, and what a writer left beside it (.NAME.lock, .NAME.segments/)
            import shutil

            folder, base = os.path.split(path)
            for entry in [base] + [e for e in os.listdir(folder) if e.startswith(f".{base}.")]:
                full = os.path.join(folder, entry)
                if os.path.isdir(full):
                    shutil.rmtree(full)
                elif os.path.exists(full):
                    os.remove(full)
    weights = sum(a * b + b for a, b in zip(cfg["sizes"][:-1], cfg["sizes"][1:], strict=True))
    print(f"{weights:,} weights x {cfg['chains'] * cfg['draws']:,} draws = "
          f"{weights * cfg['chains'] * cfg['draws'] * 4 / 1e9:.2f} GB of float32 draws; peak RSS per phase: "
          + ", ".join(f"{r['phase']} {r['peak_rss_bytes'] / 1e9:.2f} GB" for r in rows)
          + f"; all <= 4 GB: {all(r['within_4GB'] for r in rows)}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"config": cfg, "writer": args.writer, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
