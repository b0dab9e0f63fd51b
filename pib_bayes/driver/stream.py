"""Draws on disk while a run goes: segment files appended as draws are kept, consolidated at the end.

A *segment* holds rows ``[k0, k1)`` of the kept draws (and their sample statistics) of one chain
group: a small posterior file of :mod:`pib_bayes.store` (kind ``segment``, every chunk with its
XXH3-64 digest), written atomically (a unique temporary name, fsync, rename) into the directory
``.NAME.segments`` beside the checkpoint (or, without one, beside the store). A segment is
written when the in-memory window of a streamed run is full and at every checkpoint; a checkpoint
records the draws it commits per chain group, written after their segments, so a kill at any
moment leaves either a segment that no checkpoint commits (deleted on resume, and written again,
identically, by the resumed run) or a committed one. HDF5 files are never appended to in place:
a kill during an in-place HDF5 metadata write can leave a file that HDF5 cannot open.
"""

from __future__ import annotations

import math
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import FormatError
from ..store import CHUNK_BYTES, LazyDraws, _storage, read_store, write_store

SEGMENT_VERSION = 1
_CACHE = 4  # segment files held open while consolidating (about 1.3 MiB of HDF5 caches each)


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
            info = self.info(f.name) if f.name.startswith("seg-") and f.name.endswith(".nc") else None
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
        name = f"seg-{chains[0]:06d}-{len(chains):06d}-{k0:010d}-{k1:010d}.nc"
        write_store(self.dir / name, "segment", SEGMENT_VERSION, {"posterior": draws, "sample_stats": stats},
                    {"chains": chains, "k0": k0, "k1": k1})
        self.written.append(name)
        self.kept[chains[0]] = k1
        return name

    def info(self, name: str) -> tuple[list[int], int, int] | None:
        """(chains, k0, k1) of a segment's file name; None for another name."""
        parts = name[len("seg-"):-len(".nc")].split("-") if name.startswith("seg-") else []
        try:
            first, n, k0, k1 = (int(p) for p in parts)
        except ValueError:
            return None
        return list(range(first, first + n)), k0, k1

    def read(self, name: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        groups, meta = read_store(self.dir / name, "segment", (SEGMENT_VERSION,))
        info = self.info(name)
        assert info is not None
        chains, k0, k1 = info
        if meta != {"chains": chains, "k0": k0, "k1": k1}:
            raise FormatError(f"{self.dir / name}: the segment's rows do not match its name")
        return dict(groups["posterior"]), dict(groups["sample_stats"])

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _SegmentSource:
    """One posterior variable of the consolidated store, read chunk by chunk from the segments
    (:class:`pib_bayes.store.BlockSource`); rows no segment holds (a diverged chain's draws after
    it stopped) are NaN, as in an in-memory run."""

    def __init__(self, segments: _Segments, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                 index: dict[int, list[tuple[int, int, str, int]]],
                 cache: OrderedDict[str, LazyDraws]) -> None:
        self.segments, self.name, self.shape, self.dtype = segments, name, shape, dtype
        self.index, self.cache = index, cache

    def _open(self, seg: str) -> LazyDraws:
        lazy = self.cache.pop(seg, None)
        if lazy is None:
            lazy = LazyDraws(self.segments.dir / seg, kind="segment", supported_versions=(SEGMENT_VERSION,))
            if len(self.cache) >= _CACHE:
                self.cache.popitem(last=False)[1].close()
        self.cache[seg] = lazy
        return lazy

    def block(self, region: tuple[slice, ...]) -> Tensor:
        out = torch.full([r.stop - r.start for r in region], math.nan, dtype=self.dtype)
        view = _storage(out)  # the segments' chunks are read straight into it
        d0, d1 = region[1].start, region[1].stop
        for c in range(region[0].start, region[0].stop):
            for k0, k1, seg, pos in self.index.get(c, []):
                lo, hi = max(d0, k0), min(d1, k1)
                if lo >= hi:
                    continue
                lazy = self._open(seg)
                ds, attrs, var = lazy._get(self.name)
                if var is None or lazy.shape(self.name)[2:] != self.shape[2:]:
                    raise FormatError(f"{lazy.path}: variable {self.name!r} has another shape than the run's")
                if lazy.dtype(self.name) != self.dtype:
                    raise FormatError(f"{lazy.path}: variable {self.name!r} has another dtype than the run's")
                c0 = c - region[0].start
                var.read((slice(pos, pos + 1), slice(lo - k0, hi - k0), *region[2:]),
                         into=view[c0:c0 + 1, lo - d0:hi - d0])
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
    cache: OrderedDict[str, LazyDraws] = OrderedDict()
    try:
        draws = {n: _SegmentSource(segments, n, shape, dtype, index, cache) for n, shape in shapes.items()}
        write_store(store, kind, format_version, {"posterior": draws, "sample_stats": stats, "fixed": fixed,
                                                  "divergences": divergences}, metadata)
    finally:
        for lazy in cache.values():
            lazy.close()
