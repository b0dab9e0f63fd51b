"""Draws on disk while a run goes: segment files appended as draws are kept, consolidated at the end.

A *segment* holds rows ``[k0, k1)`` of the kept draws (and their sample statistics) of one chain
group, written atomically (a unique temporary name, fsync, rename) into the directory
``.NAME.segments`` beside the checkpoint (or, without one, beside the store). A segment is
written when the in-memory window of a streamed run is full and at every checkpoint; a checkpoint
records the draws it commits per chain group, written after their segments, so a kill at any
moment leaves either a segment that no checkpoint commits (deleted on resume, and written again,
identically, by the resumed run) or a committed one. HDF5 files are never appended to in place:
a kill during an in-place HDF5 metadata write can leave a file that HDF5 cannot open.

Segment layout (version 1), raw so that writing one costs about one ``write`` of its bytes::

    b"PIBBAYES-SEGMENT\n"
    {"chains", "k0", "k1", "vars": [{"group", "name", "dtype", "shape", "offset", "xxh3"}, ...]}\n
    blake2b hex digest of that JSON line\n
    data: each variable's C-order bytes (chain, row, *shape), at its offset from the data start

``xxh3`` holds one XXH3-64 digest (16 hex digits) per chain of the variable (its rows are
contiguous), checked when that chain's rows are read. Only raw numbers and JSON are read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from torch import Tensor

from ..io import FormatError, atomic_path
from ..store import CHUNK_BYTES, write_store

SEGMENT_VERSION = 1
SEGMENT_MAGIC = b"PIBBAYES-SEGMENT\n"
_CACHE = 2  # segment files whose last chain read is kept while consolidating
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32,
                                                       torch.float64, torch.int64, torch.int32, torch.bool)}


def segments_dir(path: str | os.PathLike) -> Path:
    """The segment directory of a checkpoint or store path: ``.NAME.segments`` beside it."""
    path = Path(path)
    return path.parent / f".{path.name}.segments"


def window_rows(draw_bytes: int, num_draws: int) -> int:
    """Draws per chain a streamed run holds in memory: one chunk's worth (at least one draw)."""
    return max(1, min(num_draws, CHUNK_BYTES // max(1, draw_bytes)))


class _Segments:
    """The segments of one run, in the order written (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.written: list[str] = []
        self.kept: dict[int, int] = {}  # first chain of a group -> draws of it in segments

    def start(self, committed: dict[int, int] | None = None) -> None:
        """Keep the segments a checkpoint commits, ``committed`` = first chain of a group -> the
        draws of that group committed (the segments tiling ``[0, draws)``), and delete every other
        file in the directory: a fresh run passes None. The caller holds the run's lock."""
        committed = committed or {}
        self.dir.mkdir(parents=True, exist_ok=True)
        keep: dict[int, list[tuple[int, int, str]]] = {}
        for f in sorted(self.dir.iterdir()):
            info = self.info(f.name)
            if info is not None and info[2] <= committed.get(info[0][0], 0):
                keep.setdefault(info[0][0], []).append((info[1], info[2], f.name))
            elif f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()
        self.written = []
        for first, kept in committed.items():
            end = 0
            for k0, k1, name in sorted(keep.get(first, [])):
                if k0 != end:
                    break
                end = k1
                self.written.append(name)
            if end != kept:
                raise FormatError(f"{self.dir}: the checkpoint commits draws [0, {kept}) of the chains from "
                                  f"{first} on but the segments hold [0, {end}) (a segment is missing or "
                                  "overlaps); resume=False to start over")
        self.kept = dict(committed)

    def write(self, chains: list[int], k0: int, k1: int, draws: dict[str, Tensor],
              stats: dict[str, Tensor]) -> str:
        name = f"seg-{chains[0]:06d}-{len(chains):06d}-{k0:010d}-{k1:010d}.seg"
        items = ([("posterior", n, t) for n, t in draws.items()]
                 + [("sample_stats", n, t) for n, t in stats.items()])
        blobs, entries, offset = [], [], 0
        for group, n, t in items:
            t = t.detach().cpu().contiguous()
            if t.dtype not in _DTYPES.values() or tuple(t.shape[:2]) != (len(chains), k1 - k0):
                raise ValueError(f"segment {group}/{n}: dtype {t.dtype} or shape {tuple(t.shape)} "
                                 "not storable")
            raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, dtype=np.uint8)
            per = raw.size // len(chains)
            entries.append({"group": group, "name": n, "dtype": str(t.dtype).removeprefix("torch."),
                            "shape": list(t.shape), "offset": offset,
                            "xxh3": "".join(xxhash.xxh3_64_hexdigest(raw[i * per:(i + 1) * per])
                                            for i in range(len(chains)))})
            blobs.append(raw)
            offset += raw.size
        header = json.dumps({"chains": chains, "k0": k0, "k1": k1, "vars": entries}, sort_keys=True).encode()
        with atomic_path(self.dir / name) as tmp, open(tmp, "wb") as fh:
            fh.write(SEGMENT_MAGIC + header + b"\n" + hashlib.blake2b(header).hexdigest().encode() + b"\n")
            for raw in blobs:
                fh.write(raw.data)
        self.written.append(name)
        self.kept[chains[0]] = k1
        return name

    def info(self, name: str) -> tuple[list[int], int, int] | None:
        """(chains, k0, k1) of a segment's file name; None for another name."""
        ours = name.startswith("seg-") and name.endswith(".seg")
        parts = name[len("seg-"):-len(".seg")].split("-") if ours else []
        try:
            first, n, k0, k1 = (int(p) for p in parts)
        except ValueError:
            return None
        return list(range(first, first + n)), k0, k1

    def read(self, name: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Every variable of a segment: (draws, stats), each checked."""
        seg = _SegmentFile(self.dir / name)
        out: tuple[dict[str, Tensor], dict[str, Tensor]] = ({}, {})
        for group, n in seg.vars:
            t = torch.stack([seg.piece(group, n, i) for i in range(len(seg.chains))])
            out[0 if group == "posterior" else 1][n] = t
        return out

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _SegmentFile:
    """One segment file, its header checked when opened, each chain's rows when read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as fh:
                head = fh.read(len(SEGMENT_MAGIC))
                line, digest = fh.readline(2**24).rstrip(b"\n"), fh.readline(200).rstrip(b"\n")
                self.data_start = fh.tell()
            size = os.path.getsize(path)
            if head != SEGMENT_MAGIC or hashlib.blake2b(line).hexdigest().encode() != digest:
                raise ValueError("bad magic bytes or header digest")
            info = json.loads(line)
            self.chains, self.k0, self.k1 = list(info["chains"]), int(info["k0"]), int(info["k1"])
            expected = path.name == (f"seg-{self.chains[0]:06d}-{len(self.chains):06d}-{self.k0:010d}-"
                                     f"{self.k1:010d}.seg")
            self.vars: dict[tuple[str, str], dict[str, Any]] = {}
            end = 0
            for e in info["vars"]:
                dtype = _DTYPES[e["dtype"]]
                e["torch_dtype"] = dtype
                e["nbytes"] = math.prod(e["shape"]) * torch.empty((), dtype=dtype).element_size()
                if e["offset"] != end or tuple(e["shape"][:2]) != (len(self.chains), self.k1 - self.k0):
                    raise ValueError("variable layout")
                end += e["nbytes"]
                self.vars[(e["group"], e["name"])] = e
            if not expected or self.data_start + end != size:
                raise ValueError(f"{size} bytes, the header says {self.data_start + end}, or another name")
        except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError) as err:
            raise FormatError(f"{path}: corrupt segment ({err})") from None
        self.cached: tuple[tuple[str, str, int], Tensor] | None = None

    def piece(self, group: str, name: str, pos: int) -> Tensor:
        """The rows of chain ``pos`` (its position in the segment) of one variable: (rows, *shape)."""
        key = (group, name, pos)
        if self.cached is not None and self.cached[0] == key:
            return self.cached[1]
        e = self.vars.get((group, name))
        if e is None:
            raise FormatError(f"{self.path}: the segment has no variable {group}/{name}")
        per = e["nbytes"] // len(self.chains)
        out = torch.empty((per,), dtype=torch.uint8)
        with open(self.path, "rb") as fh:
            fh.seek(self.data_start + e["offset"] + pos * per)
            if fh.readinto(out.numpy()) != per:
                raise FormatError(f"{self.path}: truncated segment")
        if xxhash.xxh3_64_hexdigest(out.numpy()) != e["xxh3"][16 * pos:16 * pos + 16]:
            raise FormatError(f"{self.path}: variable {group}/{name}, chain {self.chains[pos]}: XXH3-64 "
                              "digest mismatch (the segment is corrupt)")
        t = out.view(e["torch_dtype"]).reshape(e["shape"][1:])
        self.cached = (key, t)
        return t


class _SegmentSource:
    """One posterior variable of the consolidated store, read chunk by chunk from the segments
    (:class:`pib_bayes.store.BlockSource`); rows no segment holds (a diverged chain's draws after
    it stopped) are NaN, as in an in-memory run."""

    def __init__(self, segments: _Segments, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                 index: dict[int, list[tuple[int, int, str, int]]],
                 cache: OrderedDict[str, _SegmentFile]) -> None:
        self.segments, self.name, self.shape, self.dtype = segments, name, shape, dtype
        self.index, self.cache = index, cache

    def _open(self, seg: str) -> _SegmentFile:
        f = self.cache.pop(seg, None)
        if f is None:
            f = _SegmentFile(self.segments.dir / seg)
            if len(self.cache) >= _CACHE:
                self.cache.popitem(last=False)
        self.cache[seg] = f
        return f

    def block(self, region: tuple[slice, ...]) -> Tensor:
        out = torch.full([r.stop - r.start for r in region], math.nan, dtype=self.dtype)
        d0, d1 = region[1].start, region[1].stop
        for c in range(region[0].start, region[0].stop):
            for k0, k1, seg, pos in self.index.get(c, []):
                lo, hi = max(d0, k0), min(d1, k1)
                if lo >= hi:
                    continue
                piece = self._open(seg).piece("posterior", self.name, pos)
                if tuple(piece.shape[1:]) != self.shape[2:] or piece.dtype != self.dtype:
                    raise FormatError(f"{self.segments.dir / seg}: variable {self.name!r} has another shape "
                                      "or dtype than the run's")
                out[c - region[0].start, lo - d0:hi - d0] = piece[(slice(lo - k0, hi - k0), *region[2:])]
        return out


def consolidate(segments: _Segments, store: str | os.PathLike, kind: str, format_version: int,
                shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, stats: dict[str, Tensor],
                fixed: dict[str, Tensor], divergences: dict[str, Tensor], metadata: dict[str, Any]) -> None:
    """Write the store (atomically, chunk by chunk: memory of one chunk) from the segments."""
    index: dict[int, list[tuple[int, int, str, int]]] = {}
    for seg in segments.written:
        info = segments.info(seg)
        assert info is not None
        chains, k0, k1 = info
        for pos, c in enumerate(chains):
            index.setdefault(c, []).append((k0, k1, seg, pos))
    cache: OrderedDict[str, _SegmentFile] = OrderedDict()
    draws = {n: _SegmentSource(segments, n, shape, dtype, index, cache) for n, shape in shapes.items()}
    write_store(store, kind, format_version, {"posterior": draws, "sample_stats": stats, "fixed": fixed,
                                              "divergences": divergences}, metadata)
