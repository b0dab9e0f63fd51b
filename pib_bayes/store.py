"""Posterior files: netCDF4/HDF5 written through h5netcdf, read by xarray and ArviZ directly.

Layout (format version 4)::

    /                      attrs: pib_bayes (JSON: kind, format_version, metadata, variable order),
                                  pib_bayes_blake2b (hex digest of that JSON)
    /posterior             one variable per parameter, dims (chain, draw, <param>_dim_0, ...)
    /sample_stats          one variable per statistic, dims (chain, draw)
    /fixed                 buffers and frozen parameters, dims (<name>_dim_0, ...)
    /divergences           diverged (chain), divergence_step (chain)

Every non-empty variable is chunked in contiguous slabs of its C-order array (at most
:data:`CHUNK_BYTES` a chunk, or one element if larger; a posterior or
sample_stats chunk holds one chain: ``(1, d, *param_shape)``, or a part of one draw of a larger
parameter), written and read whole with HDF5's direct chunk I/O (no filter), and its
XXH3-64 digest (``xxhash``) is kept in the variable's attribute ``pib_bayes_xxh3`` (16 hex
digits a chunk, chunks in C order of the chunk grid). The file is written with
``libver="latest"`` and starts with HDF5's own signature, so that xarray and ArviZ recognise it
without being told the engine. After the HDF5 bytes comes a trailer: one JSON line with the size
of the HDF5 part, the byte ranges of the data chunks and a blake2b digest of every other byte
(superblock, object headers, dimensions, attributes, the digests themselves, chunk indices), then
its length in 16 hex digits and :data:`TRAILER_MAGIC`; it is checked before HDF5 parses the file
(HDF5 ignores bytes past the end of its own data). A flipped byte therefore raises one
:class:`~pib_bayes.io.FormatError` naming the file and, in a data chunk, the variable and the
chunk. Only plain numeric arrays and JSON strings are read: nothing is unpickled.
Version-3 files (the same layout with that information in an HDF5 userblock before the HDF5
bytes: xarray could not guess their engine) and version-2 files (chunks checked by HDF5's
fletcher32 filter instead) still load.

Dtypes are kept exactly: float16/32/64 and integers natively; bool as int8 with the attribute
``dtype = "bool"`` (the convention xarray decodes back to bool); bfloat16, which has no netCDF type,
as its uint16 bit patterns with the attribute ``pib_bayes_dtype = "bfloat16"``. A 0-d tensor is
stored with one dimension of size 1 and ``pib_bayes_scalar = 1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import xxhash
from torch import Tensor

from ._validate import is_int
from .io import FormatError, atomic_path

__all__ = ["CHUNK_BYTES", "TRAILER_MAGIC", "UB_MAGIC", "LazyDraws", "write_store", "read_store"]

CHUNK_BYTES = 4 * 2**20  # the largest chunk written (bytes); a chunk is the unit of integrity checks
GROUPS = ("posterior", "sample_stats", "fixed", "divergences")
_POPULATE_BYTES = 2**20  # results this large are allocated populated (see _empty)
DIGEST_ATTR = "pib_bayes_xxh3"  # per variable: the XXH3-64 digests of its chunks, 16 hex digits each
# per float posterior variable (format 4): JSON list of the chains holding a NaN or infinite draw, found
# by the writer chunk by chunk (a reader trusts it: the chunks it describes are checked by their digests)
NONFINITE_ATTR = "pib_bayes_nonfinite_chains"
_NATIVE = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
           torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64,
           torch.uint8: np.uint8}
_FROM_NUMPY = {np.dtype(v): k for k, v in _NATIVE.items()}


def _chunks(shape: tuple[int, ...], itemsize: int, lead: int = 0) -> tuple[int, ...]:
    """Chunk shape: a contiguous slab of the C-order array, ``(1, ..., 1, m, *shape[i+1:])`` with the
    most trailing dimensions that fit in CHUNK_BYTES (m >= 1 rows of dimension i); the first
    ``lead`` dimensions (the chain of posterior/sample_stats) are always 1."""
    chunk = [1] * len(shape)
    budget, prod = max(1, CHUNK_BYTES // itemsize), 1
    for i in range(len(shape) - 1, lead - 1, -1):
        if shape[i] * prod <= budget:
            chunk[i] = shape[i]
            prod *= shape[i]
        else:
            chunk[i] = max(1, budget // prod)
            break
    return tuple(chunk)


def _is_slab(shape: tuple[int, ...], chunk: tuple[int, ...], lead: int) -> bool:
    """Whether ``chunk`` has the form :func:`_chunks` writes (whatever CHUNK_BYTES was)."""
    if len(chunk) != len(shape) or any(c < 1 for c in chunk) or any(c != 1 for c in chunk[:lead]):
        return False
    i = next((j for j, c in enumerate(chunk) if c != 1), len(chunk))
    return all(c == a for c, a in zip(chunk[i + 1:], shape[i + 1:], strict=True)) and (
        i == len(chunk) or chunk[i] <= shape[i])


def _lead(gname: str) -> int:
    return 1 if gname in ("posterior", "sample_stats") else 0


def _grid(shape: tuple[int, ...], chunk: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """Chunk offsets in C order of the chunk grid."""
    for g in np.ndindex(*(math.ceil(a / c) for a, c in zip(shape, chunk, strict=True))):
        yield tuple(int(i) * c for i, c in zip(g, chunk, strict=True))


def _region(shape: tuple[int, ...], chunk: tuple[int, ...], off: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(o, min(o + c, a)) for o, c, a in zip(off, chunk, shape, strict=True))


def _storage(t: Tensor) -> np.ndarray:
    """The numpy view of ``t``'s bits as stored (bfloat16 as uint16, bool as int8); no copy."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.bool:
        return t.view(torch.int8).numpy()
    return t.numpy()


def _attrs_for(where: str, dtype: torch.dtype, scalar: bool) -> tuple[np.dtype, dict[str, Any]]:
    attrs: dict[str, Any] = {"pib_bayes_scalar": 1} if scalar else {}
    if dtype == torch.bfloat16:
        attrs["pib_bayes_dtype"] = "bfloat16"
        return np.dtype(np.uint16), attrs
    if dtype == torch.bool:
        attrs["dtype"] = "bool"
        return np.dtype(np.int8), attrs
    if dtype not in _NATIVE:
        raise ValueError(f"{where}: dtype {dtype} cannot be stored (netCDF holds float16/32/64, bfloat16, "
                         "bool, int8-64 and uint8); cast it to one of those first")
    return np.dtype(_NATIVE[dtype]), attrs


class BlockSource(Protocol):
    """A variable written block by block (see :func:`write_store`): its shape, dtype, and
    ``block(region)``, the values of one chunk's region as a contiguous tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def block(self, region: tuple[slice, ...]) -> Tensor: ...


@dataclass
class _TensorSource:
    t: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.t.shape) or (1,)

    @property
    def dtype(self) -> torch.dtype:
        return self.t.dtype

    def block(self, region: tuple[slice, ...]) -> Tensor:
        return (self.t.reshape(1) if self.t.dim() == 0 else self.t)[region]


def _as_source(where: str, v: Any) -> tuple[BlockSource, bool]:
    if isinstance(v, Tensor):
        t = v.detach().cpu()
        return _TensorSource(t if t.is_contiguous() else t.contiguous()), t.dim() == 0
    if hasattr(v, "block") and hasattr(v, "shape") and hasattr(v, "dtype"):
        return v, False
    raise TypeError(f"{where}: expected a tensor, got {type(v).__name__}")


def _write_chunks(ds: Any, src: BlockSource, np_dtype: np.dtype, chunk: tuple[int, ...],
                  nonfinite: set[int] | None = None) -> str:
    """Write every chunk of ``src`` raw (HDF5 direct chunk I/O); the hex XXH3-64 digests, in order.
    With ``nonfinite`` (a float variable), the first index (the chain) of every chunk holding a NaN
    or an infinity is added to it, tested while the chunk is in cache."""
    full = math.prod(chunk)
    pad: np.ndarray | None = None
    digests = []
    for off in _grid(src.shape, chunk):
        block = src.block(_region(src.shape, chunk, off))
        if block.dtype != src.dtype:
            raise TypeError(f"block of dtype {block.dtype}, expected {src.dtype}")
        arr = _storage(block.contiguous())
        if arr.size != full:  # an edge chunk: HDF5 stores chunks whole, padded with zeros
            if pad is None:
                pad = np.zeros(full, dtype=np_dtype)
            pad[:arr.size] = arr.reshape(-1)
            pad[arr.size:] = 0
            arr = pad
        digests.append(xxhash.xxh3_64_hexdigest(arr))
        if nonfinite is not None and off[0] not in nonfinite and not _finite(arr.reshape(-1)):
            nonfinite.add(off[0])
        ds.id.write_direct_chunk(off, arr)
    return "".join(digests)


def write_store(path: str | os.PathLike, kind: str, format_version: int,
                groups: Mapping[str, Mapping[str, Tensor | BlockSource]],
                metadata: Mapping[str, Any], *, atomic: bool = True) -> None:
    """Write ``groups`` (group -> name -> tensor, or a :class:`BlockSource` filled chunk by chunk;
    posterior/sample_stats variables lead with (chain, draw)) and JSON ``metadata`` to ``path``
    atomically (see :func:`read_store`; ``atomic=False``: to ``path`` itself, a temporary file of
    the caller's :func:`~pib_bayes.io.atomic_path`). A tensor is written from its own memory, chunk
    by chunk: the transient memory is at most one chunk (an edge chunk's zero padding)."""
    import h5netcdf

    order = {g: list(groups.get(g, {})) for g in GROUPS}
    header = json.dumps({"kind": kind, "format_version": format_version, "order": order,
                         "metadata": metadata}, default=str)
    variables = []
    for gname in GROUPS:
        for name, v in groups.get(gname, {}).items():
            where = f"{gname}[{name!r}]"
            if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
                raise ValueError(f"{where}: a stored name must be a non-empty string without '/' "
                                 "and not starting with '.'")
            src, scalar = _as_source(where, v)
            np_dtype, attrs = _attrs_for(where, src.dtype, scalar)
            variables.append((gname, name, where, src, np_dtype, attrs))
    with atomic_path(path) if atomic else contextlib.nullcontext(os.fspath(path)) as tmp:
        with h5netcdf.File(tmp, "w", libver="latest", track_order=True) as f:
            f.attrs["pib_bayes"] = header
            f.attrs["pib_bayes_blake2b"] = hashlib.blake2b(header.encode()).hexdigest()
            grps = {}
            for gname in GROUPS:
                grps[gname] = grp = f.create_group(gname)
                if gname == "posterior":
                    grp.attrs["inference_library"] = "pib_bayes"
                    grp.attrs["inference_library_version"] = str(metadata.get("version", ""))
            for gname, name, where, src, np_dtype, attrs in variables:
                grp = grps[gname]
                lead = {"posterior": ["chain", "draw"], "sample_stats": ["chain", "draw"],
                        "divergences": ["chain"]}.get(gname, [])
                if len(src.shape) < len(lead):
                    raise ValueError(f"{where}: needs the leading dimensions {lead}, got shape {src.shape}")
                dims = lead + [f"{name}_dim_{i}" for i in range(len(src.shape) - len(lead))]
                for d, size in zip(dims, src.shape, strict=True):
                    if d not in grp.dimensions:
                        grp.dimensions[d] = size
                    elif grp.dimensions[d].size != size:
                        raise ValueError(f"{where}: dimension {d!r} has size {grp.dimensions[d].size} "
                                         f"elsewhere in the group, {size} here")
                size = math.prod(src.shape)
                chunk = _chunks(src.shape, np_dtype.itemsize, _lead(gname))
                var = grp.create_variable(name, tuple(dims), dtype=np_dtype,
                                          **({"chunks": chunk} if size else {}))
                for k, v in attrs.items():
                    var.attrs[k] = v
                if size:
                    try:
                        scan = set() if gname == "posterior" and np_dtype.kind == "f" else None
                        var.attrs[DIGEST_ATTR] = _write_chunks(var._h5ds, src, np_dtype, chunk, scan)
                        if scan is not None:
                            var.attrs[NONFINITE_ATTR] = json.dumps(sorted(scan))
                    except TypeError as err:
                        raise TypeError(f"{where}: {err}") from None
        _seal(tmp)


def _seal(tmp: str) -> None:
    """Append the trailer: the size of the HDF5 part, the byte ranges of its data chunks (checked by
    their own XXH3-64 digests) and a blake2b digest of every other byte (the HDF5 structure), so that
    a damaged structure is refused before HDF5 parses it."""
    import h5py

    chunks: list[list[int]] = []
    with h5py.File(tmp, "r") as f:
        def visit(_: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and obj.chunks is not None:
                for i in range(obj.id.get_num_chunks()):
                    info = obj.id.get_chunk_info(i)
                    chunks.append([int(info.byte_offset), int(info.size)])
        f.visititems(visit)
    chunks.sort()
    size = os.path.getsize(tmp)
    with open(tmp, "r+b") as fh:
        digest = _structure_digest(fh, 0, size, chunks)
        body = _trailer_json({"hdf5_size": size, "structure_blake2b": digest, "chunks": chunks})
        fh.seek(size)
        fh.write(body + f"{len(body):016x}".encode() + TRAILER_MAGIC)


TRAILER_MAGIC = b"PIBBAYES-NC4-END"  # the last 16 bytes of a format-4 file
_FOOTER = 16 + len(TRAILER_MAGIC)  # the trailer's length in hex digits, then the magic


def _trailer_json(info: dict[str, Any]) -> bytes:
    return json.dumps(info, sort_keys=True, separators=(",", ":")).encode()


UB_MAGIC = b"PIBBAYES-NETCDF\n"  # the first bytes of a format-3 file (read-only)


def _userblock_bytes(info: dict[str, Any]) -> bytes:
    return UB_MAGIC + json.dumps(info, sort_keys=True).encode() + b"\n"


def _structure_digest(fh: Any, start: int, size: int, chunks: list[list[int]]) -> str:
    h = hashlib.blake2b(digest_size=32)
    pos = start
    for off, n in [*chunks, [size, 0]]:
        fh.seek(pos)
        h.update(fh.read(off - pos))
        pos = off + n
    return h.hexdigest()


_MAX_USERBLOCK = 2**30  # a structure record longer than this is not one this library wrote


def _check_structure(path: Path, size: int) -> None:
    """Refuse a file whose HDF5 structure (everything but the data chunks) is not byte-exact."""
    with open(path, "rb") as fh:
        head = fh.read(len(UB_MAGIC))
        if head.startswith(UB_MAGIC):  # format 3 (and 2): the information in a userblock
            _check_userblock(path, fh, size)
            return
        if not head.startswith(HDF5_SIGNATURE):
            raise FormatError(f"{path}: not a pib_bayes file (bad magic bytes)")
        if size < len(HDF5_SIGNATURE) + _FOOTER:
            raise FormatError(f"{path}: truncated file (no pib_bayes trailer)")
        fh.seek(size - _FOOTER)
        footer = fh.read(_FOOTER)
        if footer[16:] != TRAILER_MAGIC:
            raise FormatError(f"{path}: no pib_bayes trailer at its end (truncated, or bytes appended, "
                              "or not a pib_bayes file): the file is corrupt")
        length_hex = footer[:16]
        if not all(c in b"0123456789abcdef" for c in length_hex) or int(length_hex, 16) > min(
                size - _FOOTER, _MAX_USERBLOCK):
            raise FormatError(f"{path}: corrupt trailer (its length)")
        n = int(length_hex, 16)
        fh.seek(size - _FOOTER - n)
        body = fh.read(n)
        try:
            info = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            info = None
        ok = (isinstance(info, dict) and is_int(info.get("hdf5_size"))
              and isinstance(info.get("structure_blake2b"), str) and _is_chunk_list(info.get("chunks")))
        if not ok or body != _trailer_json(info):
            raise FormatError(f"{path}: corrupt trailer (the pib_bayes structure record is damaged)")
        if info["hdf5_size"] + n + _FOOTER != size:
            raise FormatError(f"{path}: size mismatch: the file has {size} bytes, its trailer says "
                              f"{info['hdf5_size'] + n + _FOOTER} (truncated, or bytes inserted): the file "
                              "is corrupt")
        _check_digest(path, fh, 0, info["hdf5_size"], info["chunks"], info["structure_blake2b"])


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _is_chunk_list(chunks: Any) -> bool:
    """Whether a structure record's ``chunks`` is a list of ``[offset, size]`` integer pairs."""
    return isinstance(chunks, list) and all(
        isinstance(c, list) and len(c) == 2 and all(is_int(v) for v in c) for c in chunks)


def _check_digest(path: Path, fh: Any, start: int, end: int, chunks: list[list[int]], digest: Any) -> None:
    pos = start
    for off, n in chunks:
        if off < pos or n < 0 or off + n > end:
            raise FormatError(f"{path}: corrupt header (chunk ranges)")
        pos = off + n
    if _structure_digest(fh, start, end, chunks) != digest:
        raise FormatError(f"{path}: checksum mismatch in the HDF5 structure (dimensions, attributes, "
                          "indices): the file is corrupt")


def _check_userblock(path: Path, fh: Any, size: int) -> None:
    """The structure check of a format-3 file: its record is a JSON line in the HDF5 userblock."""
    fh.seek(0)
    head = fh.read(65536)
    nl = head.find(b"\n", len(UB_MAGIC))
    while nl < 0 and len(head) < min(size, _MAX_USERBLOCK):  # a store of many chunks: a longer header
        more = fh.read(len(head))
        if not more:
            break
        head += more
        nl = head.find(b"\n", len(UB_MAGIC))
    try:
        info = json.loads(head[len(UB_MAGIC):nl]) if nl > 0 else None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        info = None
    ok = (isinstance(info, dict) and isinstance(info.get("userblock"), int)
          and isinstance(info.get("size"), int) and _is_chunk_list(info.get("chunks")))
    if ok and len(head) < info["userblock"] <= min(size, _MAX_USERBLOCK):
        head += fh.read(info["userblock"] - len(head))
    if not ok or head[:info["userblock"]] != _userblock_bytes(info).ljust(info["userblock"], b"\0"):
        raise FormatError(f"{path}: corrupt header (the userblock is damaged)")
    if info["size"] != size:
        raise FormatError(f"{path}: size mismatch: the file has {size} bytes, its header says "
                          f"{info['size']} (truncated, or bytes appended): the file is corrupt")
    _check_digest(path, fh, info["userblock"], size, info["chunks"], info.get("structure_blake2b"))


def _read_dataset(path: Path, gname: str, name: str, ds: Any) -> np.ndarray:
    """The whole dataset (a version-2 file, chunks checked by HDF5's fletcher32 filter); a
    checksum failure names the first corrupt chunk."""
    _check_numeric(path, gname, name, ds)
    out = np.empty(ds.shape, dtype=ds.dtype)
    if out.size == 0:
        return out
    try:
        ds.read_direct(out)
    except Exception as err:  # h5py raises OSError for a failed filter (checksum) or corrupt chunk index
        bad = "a chunk"
        try:
            for sl in ds.iter_chunks():
                try:
                    ds[sl]
                except Exception:
                    bad = "the chunk at [" + ", ".join(f"{s.start}:{s.stop}" for s in sl) + "]"
                    break
        except Exception:  # the chunk index itself is unreadable
            pass
        raise FormatError(f"{path}: variable {gname}/{name}: {bad} is corrupt (checksum or layout check "
                          f"failed: {str(err).splitlines()[0]})") from None
    return out


def _check_numeric(path: Path, gname: str, name: str, ds: Any) -> None:
    if ds.dtype.kind not in "fiub" or ds.dtype.itemsize > 8:
        raise FormatError(f"{path}: variable {gname}/{name} has dtype {ds.dtype}, not a plain numeric "
                          "array (not written by pib_bayes)")


def _empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array; a large one (:data:`_POPULATE_BYTES` or more) in an anonymous
    ``mmap`` with ``MAP_POPULATE`` (Linux), whose pages the kernel maps in one call instead of one
    page fault each when first written: paging in a fresh result is most of a full load's time
    (229 MiB on this project's VM: 0.080 s of CPU page by page from torch's allocator, 0.074 s
    populated; ``benchmarks/bench_io.py --phases``). Not numpy's allocator: it asks for transparent
    huge pages (``madvise``), with which a full load took 0.035 s in 7 of 11 fresh-process rounds
    but 0.20 to 0.55 s in the other 4 on that VM (probably its memory balloon, which takes freed
    memory back from the guest)."""
    nbytes = math.prod(shape) * dtype.itemsize
    populate = getattr(mmap, "MAP_POPULATE", None)
    if nbytes >= _POPULATE_BYTES and populate is not None:
        try:
            buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
        except OSError:  # pragma: no cover - out of address space: let numpy report it
            pass
        else:
            return np.frombuffer(buf, dtype=dtype).reshape(shape)
    return np.empty(shape, dtype=dtype)


def _finite(a: np.ndarray) -> bool:
    """Whether every element of the float array ``a`` is finite: its sum is finite unless an element
    is NaN or infinite or the sum overflows (then the elements are checked)."""
    t = torch.from_numpy(a)
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _nonfinite_record(path: Path, gname: str, name: str, ds: Any,
                     attrs: Mapping[str, Any]) -> set[int] | None:
    """The chains the writer found holding a NaN/Inf draw of this variable (format 4), or None when
    the file has no record (format 3: the reader scans the chunks itself)."""
    raw = attrs.get(NONFINITE_ATTR)
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", errors="replace")
    try:
        chains = json.loads(raw) if isinstance(raw, str) else None
    except (json.JSONDecodeError, RecursionError):
        chains = None
    if not (isinstance(chains, list) and all(is_int(c) and 0 <= c < ds.shape[0] for c in chains)):
        raise FormatError(f"{path}: variable {gname}/{name}: corrupt attribute {NONFINITE_ATTR}")
    return set(chains)


class _ScannedDraws(dict):
    """The posterior group as :func:`read_store` read it: name -> tensor, with ``nonfinite``,
    name -> the chains holding a NaN or infinite draw (found chunk by chunk as they were read), so
    that :class:`~pib_bayes.Posterior` need not scan the draws again."""

    nonfinite: dict[str, set[int]]


class _Chunked:
    """One variable of a version-3 or later file: its chunks read raw, checked against their digests."""

    def __init__(self, path: Path, gname: str, name: str, ds: Any) -> None:
        _check_numeric(path, gname, name, ds)
        self.path, self.where, self.ds = path, f"{gname}/{name}", ds
        self.shape: tuple[int, ...] = tuple(int(a) for a in ds.shape)
        self.np_dtype = ds.dtype
        self.chunk: tuple[int, ...] | None = None
        self.digests: dict[tuple[int, ...], str] = {}
        if math.prod(self.shape) == 0:
            return
        chunk = ds.chunks
        raw = ds.attrs.get(DIGEST_ATTR)
        if isinstance(raw, bytes):
            raw = raw.decode("ascii", errors="replace")
        offsets = list(_grid(self.shape, chunk)) if chunk is not None else []
        if (chunk is None or not isinstance(raw, str) or len(raw) != 16 * len(offsets)
                or not _is_slab(self.shape, tuple(chunk), _lead(gname))):
            raise FormatError(f"{path}: variable {self.where}: missing or corrupt chunk layout or digests "
                              "(not written by pib_bayes)")
        self.chunk = tuple(int(c) for c in chunk)
        self.digests = {off: raw[16 * i:16 * i + 16] for i, off in enumerate(offsets)}
        self.nbytes = math.prod(self.chunk) * self.np_dtype.itemsize

    def _bad(self, off: tuple[int, ...], why: str) -> FormatError:
        assert self.chunk is not None
        where = ", ".join(f"{r.start}:{r.stop}" for r in _region(self.shape, self.chunk, off))
        return FormatError(f"{self.path}: variable {self.where}: the chunk at [{where}] is corrupt ({why})")

    def read_chunk(self, off: tuple[int, ...], dest: np.ndarray) -> None:
        """Read the raw chunk at ``off`` into ``dest`` (uint8, the chunk's bytes) and check it."""
        try:
            info = self.ds.id.get_chunk_info_by_coord(off)
            if info.size != self.nbytes or info.filter_mask != 0:
                raise self._bad(off, f"{info.size} bytes stored, {self.nbytes} expected")
            self.ds.id.read_direct_chunk(off, out=dest)
        except FormatError:
            raise
        except Exception as err:
            raise self._bad(off, f"unreadable: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
                            ) from None
        if xxhash.xxh3_64_hexdigest(dest) != self.digests[off]:
            raise self._bad(off, "XXH3-64 digest mismatch")

    def read_all(self, nonfinite: set[int] | None = None) -> np.ndarray:
        """The whole array, each chunk read straight into its place (an edge chunk through one
        chunk of scratch memory). With ``nonfinite`` (a float variable), each chunk is also checked
        for NaN/Inf while it is in cache, and the first index of a chunk holding one (the chain,
        for posterior variables) is added to ``nonfinite``."""
        out = _empty(self.shape, self.np_dtype)
        if self.chunk is None:
            return out
        scratch: np.ndarray | None = None
        for off in self.digests:
            region = _region(self.shape, self.chunk, off)
            dest = out[region]
            if dest.size * self.np_dtype.itemsize == self.nbytes:
                self.read_chunk(off, dest.reshape(-1).view(np.uint8))
            else:
                if scratch is None:
                    scratch = np.empty(self.nbytes, dtype=np.uint8)
                self.read_chunk(off, scratch)
                dest[...] = scratch.view(self.np_dtype)[:dest.size].reshape(dest.shape)
            if nonfinite is not None and off[0] not in nonfinite and not _finite(dest.reshape(-1)):
                nonfinite.add(off[0])
        return out

    def read(self, index: tuple[slice | np.ndarray, ...], into: np.ndarray | None = None) -> np.ndarray:
        """``array[index]`` (each entry a step-1 slice, or an integer array along the first
        dimension) reading only the chunks that intersect it (into ``into`` if given, an array of
        the selection's shape and dtype)."""
        lead = index[0]
        rows = (np.arange(*lead.indices(self.shape[0])) if isinstance(lead, slice) else np.asarray(lead))
        rest = [sl.indices(a)[:2] for sl, a in zip(index[1:], self.shape[1:], strict=False)]
        rest += [(0, a) for a in self.shape[1 + len(rest):]]
        shape = (len(rows), *(max(0, b - a) for a, b in rest))
        out = _empty(shape, self.np_dtype) if into is None else into
        if out.shape != shape or out.dtype != self.np_dtype:
            raise ValueError(f"into: expected an array of shape {shape} and dtype {self.np_dtype}")
        if out.size == 0 or self.chunk is None:
            return out
        scratch = np.empty(self.nbytes, dtype=np.uint8)
        view = scratch.view(self.np_dtype)
        for oi, r in enumerate(rows.tolist()):
            for off in self.digests:
                if not off[0] <= r < off[0] + self.chunk[0]:
                    continue
                region = _region(self.shape, self.chunk, off)
                lo = [max(a, reg.start) for (a, _), reg in zip(rest, region[1:], strict=True)]
                hi = [min(b, reg.stop) for (_, b), reg in zip(rest, region[1:], strict=True)]
                if any(x >= y for x, y in zip(lo, hi, strict=True)):
                    continue
                self.read_chunk(off, scratch)
                block = view[:math.prod(reg.stop - reg.start for reg in region)].reshape(
                    [reg.stop - reg.start for reg in region])
                src = (r - off[0], *(slice(x - reg.start, y - reg.start)
                                     for x, y, reg in zip(lo, hi, region[1:], strict=True)))
                dst = (oi, *(slice(x - a, y - a) for x, y, (a, _) in zip(lo, hi, rest, strict=True)))
                out[dst] = block[src]
        return out


def _decode(path: Path, gname: str, name: str, arr: np.ndarray, attrs: Mapping[str, Any]) -> Tensor:
    tag = attrs.get("pib_bayes_dtype")
    if tag == "bfloat16":
        if arr.dtype != np.uint16:
            raise FormatError(f"{path}: variable {gname}/{name}: bfloat16 bits must be uint16, "
                              f"got {arr.dtype}")
        t = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    elif attrs.get("dtype") == "bool":
        if arr.dtype != np.int8:
            raise FormatError(f"{path}: variable {gname}/{name}: bool must be stored as int8, "
                              f"got {arr.dtype}")
        t = torch.from_numpy(arr != 0)
    elif tag is not None or arr.dtype not in _FROM_NUMPY:
        raise FormatError(f"{path}: variable {gname}/{name}: unsupported dtype {arr.dtype} / {tag!r}")
    else:
        t = torch.from_numpy(arr)
    if attrs.get("pib_bayes_scalar") == 1:
        if t.shape != (1,):
            raise FormatError(f"{path}: variable {gname}/{name}: a stored scalar must have shape (1,)")
        t = t.reshape(())
    return t


def _open(path: Path, kind: str, supported_versions: tuple[int, ...]) -> tuple[Any, dict[str, Any], int]:
    """The open h5py file, its checked header and format version (the caller closes the file)."""
    import h5py

    _check_structure(path, path.stat().st_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f = h5py.File(path, "r")
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else repr(err)
        raise FormatError(f"{path}: corrupt HDF5 file ({first})") from None
    try:
        try:
            header_text, digest = f.attrs["pib_bayes"], f.attrs["pib_bayes_blake2b"]
        except Exception:
            raise FormatError(f"{path}: not a pib_bayes file (no pib_bayes attributes) or corrupt") from None
        if isinstance(header_text, bytes):
            header_text = header_text.decode("utf-8", errors="replace")
        if isinstance(digest, bytes):
            digest = digest.decode("ascii", errors="replace")
        if (not isinstance(header_text, str) or not isinstance(digest, str)
                or hashlib.blake2b(header_text.encode()).hexdigest() != digest):
            raise FormatError(f"{path}: checksum mismatch in the pib_bayes header attribute: the file is "
                              "corrupt")
        try:
            header = json.loads(header_text)
        except (json.JSONDecodeError, RecursionError):
            raise FormatError(f"{path}: corrupt header") from None
        if not isinstance(header, dict) or not isinstance(header.get("order"), dict):
            raise FormatError(f"{path}: corrupt header")
        if header.get("kind") != kind:
            raise FormatError(f"{path}: holds a {header.get('kind')!r}, expected a {kind!r}")
        version = header.get("format_version")
        if not is_int(version) or version not in supported_versions:
            raise FormatError(f"{path}: format version {version!r} is not supported (this pib_bayes "
                              f"reads {supported_versions}); re-create it with a matching version")
        if not isinstance(header.get("metadata"), dict):
            raise FormatError(f"{path}: corrupt header (metadata must be a JSON object)")
        return f, header, version
    except BaseException:
        f.close()
        raise


def _datasets(path: Path, f: Any, header: Mapping[str, Any], gname: str) -> Iterator[tuple[str, Any]]:
    import h5py

    names = header["order"].get(gname, [])
    grp = f.get(gname)
    if not isinstance(names, list) or not isinstance(grp, h5py.Group):
        raise FormatError(f"{path}: group {gname!r} is missing or corrupt")
    for name in names:
        ds = grp.get(name) if isinstance(name, str) else None
        if not isinstance(ds, h5py.Dataset):
            raise FormatError(f"{path}: variable {gname}/{name} is missing")
        yield name, ds


def _digested(kind: str, version: int) -> bool:
    """Whether chunks carry XXH3-64 digests (else HDF5's fletcher32: posterior files of version 2)."""
    return not (kind == "posterior" and version < 3)


def _hdf5_errors(path: Path, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except FormatError:
        raise
    except Exception as err:  # anything else HDF5 reports on a damaged file
        first = str(err).splitlines()[0] if str(err) else ""
        raise FormatError(f"{path}: corrupt HDF5 file ({type(err).__name__}: {first})") from None


def read_store(path: str | os.PathLike, kind: str, supported_versions: tuple[int, ...], *,
               lazy: Sequence[str] = ()) -> tuple[dict[str, Mapping[str, Tensor]], dict[str, Any]]:
    """``(groups, metadata)`` of a file written by :func:`write_store`; any corruption (a
    checksum, a truncation, bytes appended, a foreign file) raises one :class:`FormatError`.
    The groups named in ``lazy`` come back as :class:`LazyDraws` (read on demand)."""
    path = Path(path)
    f, header, version = _open(path, kind, supported_versions)

    def read() -> tuple[dict[str, Mapping[str, Tensor]], dict[str, Any]]:
        groups: dict[str, Mapping[str, Tensor]] = {}
        for gname in GROUPS:
            if gname in lazy:
                groups[gname] = LazyDraws(path, gname, kind=kind, supported_versions=supported_versions)
                continue
            digested = _digested(kind, version)
            out: dict[str, Tensor] = _ScannedDraws() if digested and gname == "posterior" else {}
            if isinstance(out, _ScannedDraws):
                out.nonfinite = {}
            for name, ds in _datasets(path, f, header, gname):
                attrs = dict(ds.attrs)
                if not digested:
                    arr = _read_dataset(path, gname, name, ds)
                elif (isinstance(out, _ScannedDraws) and ds.dtype.kind == "f"
                      and "pib_bayes_dtype" not in attrs):
                    recorded = _nonfinite_record(path, gname, name, ds, attrs)
                    out.nonfinite[name] = set() if recorded is None else recorded
                    arr = _Chunked(path, gname, name, ds).read_all(
                        out.nonfinite[name] if recorded is None else None)
                else:  # bfloat16 bits (uint16) are scanned by Posterior itself, integers need none
                    arr = _Chunked(path, gname, name, ds).read_all()
                out[name] = _decode(path, gname, name, arr, attrs)
            groups[gname] = out
        return groups, header["metadata"]

    with f:
        return _hdf5_errors(path, read)


class LazyDraws(Mapping[str, Tensor]):
    """A read-only mapping name -> tensor over one group (default ``posterior``) of a file written
    by :func:`write_store`, read on demand.

    :meth:`shape` and :meth:`dtype` come from the file's structure (no data read);
    :meth:`read` reads only the chunks a selection of chains and draws needs, each checked against
    its XXH3-64 digest (a damaged one raises :class:`~pib_bayes.io.FormatError` naming the file,
    the variable and the chunk); ``draws[name]`` reads the whole variable. The file stays open
    (read-only) until :meth:`close` or garbage collection; files are only ever replaced by a
    rename, so an open store keeps reading the content it was opened with.

    >>> import tempfile, os, torch
    >>> from pib_bayes import Posterior
    >>> path = os.path.join(tempfile.mkdtemp(), "post.nc")
    >>> Posterior({"w": torch.arange(24.).reshape(2, 3, 4)}, {}, {"task": "regression"}).save(path)
    >>> lazy = LazyDraws(path)
    >>> lazy.shape("w"), lazy.dtype("w")
    ((2, 3, 4), torch.float32)
    >>> lazy.read("w", chains=[1], draws=slice(1, 3))[0, :, 0]
    tensor([16., 20.])
    """

    def __init__(self, path: str | os.PathLike, group: str = "posterior", *, kind: str = "posterior",
                 supported_versions: tuple[int, ...] | None = None) -> None:
        if supported_versions is None:
            from .posterior import READABLE_VERSIONS as supported_versions
        self.path = Path(path)
        self._f, header, self.version = _open(self.path, kind, supported_versions)
        self.group = group
        try:
            self._vars: dict[str, tuple[Any, dict[str, Any], _Chunked | None]] = {}
            found = _hdf5_errors(self.path, lambda: list(_datasets(self.path, self._f, header, group)))
            for name, ds in found:
                attrs = dict(ds.attrs)
                if attrs.get("pib_bayes_scalar") == 1:
                    raise FormatError(f"{self.path}: variable {group}/{name}: a 0-d variable has no "
                                      "(chain, draw) dimensions")
                var = _Chunked(self.path, group, name, ds) if _digested(kind, self.version) else None
                self._vars[name] = (ds, attrs, var)
        except BaseException:
            self._f.close()
            raise

    @property
    def names(self) -> list[str]:
        """The variables, in file order."""
        return list(self._vars)

    def _get(self, name: str) -> tuple[Any, dict[str, Any], _Chunked | None]:
        try:
            return self._vars[name]
        except KeyError:
            raise KeyError(name) from None

    def shape(self, name: str) -> tuple[int, ...]:
        """``(chain, draw, *param_shape)`` of ``name``."""
        return tuple(int(a) for a in self._get(name)[0].shape)

    def dtype(self, name: str) -> torch.dtype:
        """The torch dtype ``name`` loads as."""
        ds, attrs, _ = self._get(name)
        if attrs.get("pib_bayes_dtype") == "bfloat16":
            return torch.bfloat16
        if attrs.get("dtype") == "bool":
            return torch.bool
        if ds.dtype not in _FROM_NUMPY:
            raise FormatError(f"{self.path}: variable {self.group}/{name}: unsupported dtype {ds.dtype}")
        return _FROM_NUMPY[ds.dtype]

    def read(self, name: str, chains: slice | Sequence[int] = slice(None),
             draws: slice = slice(None)) -> Tensor:
        """``draws[name][chains, draws]``: (chains selected, draws selected, *param_shape), reading and
        checking only the chunks that hold them. ``chains`` is a slice or a list of chain indices,
        ``draws`` a slice (any step)."""
        ds, attrs, var = self._get(name)
        shape = self.shape(name)
        if not isinstance(draws, slice):
            raise TypeError(f"draws: expected a slice, got {type(draws).__name__}")
        if not isinstance(chains, slice):
            chains = [int(c) for c in chains]
            bad = [c for c in chains if not 0 <= c < shape[0]]
            if bad:
                raise IndexError(f"chains: {bad} out of range for {shape[0]} chains")
        start, stop, step = draws.indices(shape[1])
        if step < 1:
            raise ValueError(f"draws: the slice step must be >= 1, got {step}")
        span = slice(start, max(start, stop))

        def get() -> np.ndarray:
            if var is not None:
                return var.read((chains if isinstance(chains, slice) else np.asarray(chains, dtype=np.int64),
                                 span))
            rows = (np.arange(*chains.indices(shape[0])) if isinstance(chains, slice) else np.asarray(chains))
            out = np.empty((len(rows), span.stop - span.start, *shape[2:]), dtype=ds.dtype)
            for i, r in enumerate(rows.tolist()):  # a version-2 file: HDF5's fletcher32 checks the chunks
                try:
                    out[i] = ds[r, span]
                except Exception as err:
                    raise FormatError(f"{self.path}: variable {self.group}/{name}: a chunk of chain {r} is "
                                      f"corrupt ({str(err).splitlines()[0]})") from None
            return out

        arr = _hdf5_errors(self.path, get)
        t = _decode(self.path, self.group, name, arr, attrs)
        return t if step == 1 else t[:, ::step]

    def source(self, name: str) -> BlockSource:
        """``name`` as a :class:`BlockSource`: :func:`write_store` copies it chunk by chunk (saving a
        lazily loaded posterior never holds a whole variable in memory)."""
        self._get(name)
        return _LazySource(self, name)

    def __getitem__(self, name: str) -> Tensor:
        ds, attrs, var = self._get(name)
        arr = _hdf5_errors(self.path, lambda: var.read_all() if var is not None
                           else _read_dataset(self.path, self.group, name, ds))
        return _decode(self.path, self.group, name, arr, attrs)

    def __iter__(self) -> Iterator[str]:
        return iter(self._vars)

    def __len__(self) -> int:
        return len(self._vars)

    def __contains__(self, name: object) -> bool:
        return name in self._vars

    def close(self) -> None:
        """Close the file."""
        self._f.close()

    def __repr__(self) -> str:
        return f"LazyDraws({str(self.path)!r}, {', '.join(f'{n}{self.shape(n)}' for n in self._vars)})"


@dataclass
class _LazySource:
    lazy: LazyDraws
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.lazy.shape(self.name)

    @property
    def dtype(self) -> torch.dtype:
        return self.lazy.dtype(self.name)

    def block(self, region: tuple[slice, ...]) -> Tensor:
        ds, attrs, var = self.lazy._get(self.name)
        if var is None:  # a version-2 file: whole rows of draws, then the region's part of them
            return self.lazy.read(self.name, region[0], region[1])[(slice(None), slice(None), *region[2:])]
        arr = _hdf5_errors(self.lazy.path, lambda: var.read(region))
        return _decode(self.lazy.path, self.lazy.group, self.name, arr, attrs)
