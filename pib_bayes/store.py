"""Posterior files: netCDF4/HDF5 written through h5netcdf, read by xarray and ArviZ directly.

Layout (format version 2)::

    /                      attrs: pib_bayes (JSON: kind, format_version, metadata, variable order),
                                  pib_bayes_blake2b (hex digest of that JSON)
    /posterior             one variable per parameter, dims (chain, draw, <param>_dim_0, ...)
    /sample_stats          one variable per statistic, dims (chain, draw)
    /fixed                 buffers and frozen parameters, dims (<name>_dim_0, ...)
    /divergences           diverged (chain), divergence_step (chain)

Every non-empty variable is chunked (at most :data:`CHUNK_BYTES` a chunk) with HDF5's fletcher32
checksum filter; the file is written with ``libver="latest"``, whose superblock and object headers
(dimensions, dtypes, attributes) carry their own checksums, and the JSON root attribute carries a
blake2b digest. A flipped byte therefore raises one :class:`~pib_bayes.io.FormatError` naming the
file and, in a data chunk, the variable and the chunk. Only plain numeric arrays and JSON strings
are read: nothing is unpickled.

Dtypes are kept exactly: float16/32/64 and integers natively; bool as int8 with the attribute
``dtype = "bool"`` (the convention xarray decodes back to bool); bfloat16, which has no netCDF type,
as its uint16 bit patterns with the attribute ``pib_bayes_dtype = "bfloat16"``. A 0-d tensor is
stored with one dimension of size 1 and ``pib_bayes_scalar = 1``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._validate import is_int
from .io import FormatError, atomic_path

__all__ = ["CHUNK_BYTES", "UB_MAGIC", "write_store", "read_store"]

CHUNK_BYTES = 4 * 2**20  # the largest chunk written (bytes); a chunk is the unit of integrity checks
GROUPS = ("posterior", "sample_stats", "fixed", "divergences")
_NATIVE = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
           torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64,
           torch.uint8: np.uint8}
_FROM_NUMPY = {np.dtype(v): k for k, v in _NATIVE.items()}


def _chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunk shape: ``shape`` with its leading dimensions halved until a chunk is <= CHUNK_BYTES."""
    chunk = list(shape)
    i = 0
    while math.prod(chunk) * itemsize > CHUNK_BYTES and i < len(chunk):
        if chunk[i] > 1:
            chunk[i] = (chunk[i] + 1) // 2
        else:
            i += 1
    return tuple(chunk)


def _encode(where: str, t: Tensor) -> tuple[np.ndarray, dict[str, Any]]:
    if not isinstance(t, Tensor):
        raise TypeError(f"{where}: expected a tensor, got {type(t).__name__}")
    t = t.detach().cpu().contiguous()
    attrs: dict[str, Any] = {}
    if t.dim() == 0:
        t, attrs["pib_bayes_scalar"] = t.reshape(1), 1
    if t.dtype == torch.bfloat16:
        attrs["pib_bayes_dtype"] = "bfloat16"
        return t.view(torch.int16).numpy().view(np.uint16), attrs
    if t.dtype == torch.bool:
        attrs["dtype"] = "bool"
        return t.view(torch.int8).numpy(), attrs
    if t.dtype not in _NATIVE:
        raise ValueError(f"{where}: dtype {t.dtype} cannot be stored (netCDF holds float16/32/64, bfloat16, "
                         "bool, int8-64 and uint8); cast it to one of those first")
    return t.numpy(), attrs


def write_store(path: str | os.PathLike, kind: str, format_version: int,
                groups: Mapping[str, Mapping[str, Tensor]], metadata: Mapping[str, Any]) -> None:
    """Write ``groups`` (group -> name -> tensor; posterior/sample_stats tensors lead with
    (chain, draw)) and JSON ``metadata`` to ``path`` atomically (see :func:`read_store`)."""
    import h5netcdf

    order = {g: list(groups.get(g, {})) for g in GROUPS}
    header = json.dumps({"kind": kind, "format_version": format_version, "order": order,
                         "metadata": metadata}, default=str)
    shapes = [(tuple(t.shape) or (1,), t.element_size()) for grp in groups.values() for t in grp.values()
              if isinstance(t, Tensor) and t.numel()]
    n_chunks = sum(math.prod(math.ceil(a / c) for a, c in zip(shape, _chunks(shape, size), strict=True))
                   for shape, size in shapes)
    userblock = 512
    while userblock < 256 + 32 * n_chunks:
        userblock *= 2
    with atomic_path(path) as tmp:
        with h5netcdf.File(tmp, "w", libver="latest", track_order=True, userblock_size=userblock) as f:
            f.attrs["pib_bayes"] = header
            f.attrs["pib_bayes_blake2b"] = hashlib.blake2b(header.encode()).hexdigest()
            for gname in GROUPS:
                grp = f.create_group(gname)
                if gname == "posterior":
                    grp.attrs["inference_library"] = "pib_bayes"
                    grp.attrs["inference_library_version"] = str(metadata.get("version", ""))
                for name, t in groups.get(gname, {}).items():
                    where = f"{gname}[{name!r}]"
                    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
                        raise ValueError(f"{where}: a stored name must be a non-empty string without '/' "
                                         "and not starting with '.'")
                    arr, attrs = _encode(where, t)
                    if gname in ("posterior", "sample_stats"):
                        lead = ["chain", "draw"]
                    elif gname == "divergences":
                        lead = ["chain"]
                    else:
                        lead = []
                    dims = lead + [f"{name}_dim_{i}" for i in range(arr.ndim - len(lead))]
                    for d, size in zip(dims, arr.shape, strict=True):
                        if d not in grp.dimensions:
                            grp.dimensions[d] = size
                        elif grp.dimensions[d].size != size:
                            raise ValueError(f"{where}: dimension {d!r} has size {grp.dimensions[d].size} "
                                             f"elsewhere in the group, {size} here")
                    kw: dict[str, Any] = ({"chunks": _chunks(arr.shape, arr.itemsize), "fletcher32": True}
                                          if arr.size else {})
                    var = grp.create_variable(name, tuple(dims), dtype=arr.dtype, **kw)
                    if arr.size:
                        var[...] = arr
                    for k, v in attrs.items():
                        var.attrs[k] = v
        _seal(tmp, userblock)


def _seal(tmp: str, userblock: int) -> None:
    """Write the userblock: the file's size, the byte ranges of its data chunks (checked by their
    own fletcher32 sums) and a blake2b digest of every other byte (the HDF5 structure), so that a
    damaged structure is refused before HDF5 parses it."""
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
        digest = _structure_digest(fh, userblock, size, chunks)
        block = _userblock_bytes({"userblock": userblock, "size": size, "structure_blake2b": digest,
                                  "chunks": chunks})
        if len(block) > userblock:  # pragma: no cover - sized from the chunk count above
            raise RuntimeError("pib_bayes.store: userblock too small")
        fh.seek(0)
        fh.write(block.ljust(userblock, b"\0"))


UB_MAGIC = b"PIBBAYES-NETCDF\n"


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


def _check_structure(path: Path, size: int) -> None:
    """Refuse a file whose HDF5 structure (everything but the data chunks) is not byte-exact."""
    with open(path, "rb") as fh:
        head = fh.read(65536)
        if not head.startswith(UB_MAGIC):
            raise FormatError(f"{path}: not a pib_bayes file (bad magic bytes)")
        nl = head.find(b"\n", len(UB_MAGIC))
        try:
            info = json.loads(head[len(UB_MAGIC):nl]) if nl > 0 else None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            info = None
        ok = (isinstance(info, dict) and isinstance(info.get("userblock"), int)
              and isinstance(info.get("size"), int))
        chunks = info.get("chunks") if ok else None
        ok = ok and isinstance(chunks, list) and all(
            isinstance(c, list) and len(c) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in c) for c in chunks)
        if not ok or head[:info["userblock"]] != _userblock_bytes(info).ljust(info["userblock"], b"\0"):
            raise FormatError(f"{path}: corrupt header (the userblock is damaged)")
        if info["size"] != size:
            raise FormatError(f"{path}: size mismatch: the file has {size} bytes, its header says "
                              f"{info['size']} (truncated, or bytes appended): the file is corrupt")
        pos = info["userblock"]
        for off, n in chunks:
            if off < pos or n < 0 or off + n > size:
                raise FormatError(f"{path}: corrupt header (chunk ranges)")
            pos = off + n
        if _structure_digest(fh, info["userblock"], size, chunks) != info.get("structure_blake2b"):
            raise FormatError(f"{path}: checksum mismatch in the HDF5 structure (dimensions, attributes, "
                              "indices): the file is corrupt")


def _read_dataset(path: Path, gname: str, name: str, ds: Any) -> np.ndarray:
    """The whole dataset; a checksum failure names the first corrupt chunk."""
    if ds.dtype.kind not in "fiub" or ds.dtype.itemsize > 8:
        raise FormatError(f"{path}: variable {gname}/{name} has dtype {ds.dtype}, not a plain numeric "
                          "array (not written by pib_bayes)")
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


def read_store(path: str | os.PathLike, kind: str, supported_versions: tuple[int, ...]
               ) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """``(groups, metadata)`` of a file written by :func:`write_store`; any corruption (a
    checksum, a truncation, bytes appended, a foreign file) raises one :class:`FormatError`."""
    import h5py

    path = Path(path)
    _check_structure(path, path.stat().st_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f = h5py.File(path, "r")
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else repr(err)
        raise FormatError(f"{path}: corrupt HDF5 file ({first})") from None
    try:
        with f:
            try:
                header_text, digest = f.attrs["pib_bayes"], f.attrs["pib_bayes_blake2b"]
            except Exception:
                raise FormatError(f"{path}: not a pib_bayes file (no pib_bayes attributes) "
                                  "or corrupt") from None
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
            groups: dict[str, dict[str, Tensor]] = {}
            for gname in GROUPS:
                names = header["order"].get(gname, [])
                grp = f.get(gname)
                if not isinstance(names, list) or not isinstance(grp, h5py.Group):
                    raise FormatError(f"{path}: group {gname!r} is missing or corrupt")
                groups[gname] = {}
                for name in names:
                    ds = grp.get(name) if isinstance(name, str) else None
                    if not isinstance(ds, h5py.Dataset):
                        raise FormatError(f"{path}: variable {gname}/{name} is missing")
                    arr = _read_dataset(path, gname, name, ds)
                    groups[gname][name] = _decode(path, gname, name, arr, dict(ds.attrs))
            metadata = header.get("metadata")
            if not isinstance(metadata, dict):
                raise FormatError(f"{path}: corrupt header (metadata must be a JSON object)")
            return groups, metadata
    except FormatError:
        raise
    except Exception as err:  # anything else HDF5 reports on a damaged file
        first = str(err).splitlines()[0] if str(err) else ""
        raise FormatError(f"{path}: corrupt HDF5 file ({type(err).__name__}: {first})") from None
