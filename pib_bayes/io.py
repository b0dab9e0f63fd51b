"""Versioned, checksummed, atomically written files (posteriors, checkpoints).

Layout of a file::

    b"PIBBAYES\\n"                               magic
    {"kind": ..., "format_version": ..., "sha256": ..., "size": ...}\\n   one JSON line
    payload                                      torch.save bytes of a dict of tensors,
                                                 lists, numbers and strings

The payload is loaded with ``torch.load(weights_only=True)``: no pickled code runs. A file is
written to a temporary name in the same directory, flushed, fsynced, then renamed over the target,
so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["FormatError", "atomic_write_bytes", "save_payload", "load_payload"]

MAGIC = b"PIBBAYES\n"


class FormatError(ValueError):
    """A file that is not ours, is truncated or corrupt, or has an incompatible format version."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a process killed mid-write (SIGKILL cannot be caught) leaves its temporary file: sweep it now
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_payload(path: str | os.PathLike, kind: str, format_version: int, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = {"kind": kind, "format_version": format_version, "sha256": hashlib.sha256(body).hexdigest(),
              "size": len(body)}
    atomic_write_bytes(path, MAGIC + json.dumps(header).encode() + b"\n" + body)


def load_payload(path: str | os.PathLike, kind: str, supported_versions: tuple[int, ...]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no file at {str(path)!r}")
    raw = path.read_bytes()
    if not raw.startswith(MAGIC):
        raise FormatError(f"{path}: not a pib_bayes file (bad magic bytes)")
    nl = raw.find(b"\n", len(MAGIC))
    if nl < 0:
        raise FormatError(f"{path}: truncated header")
    try:
        header = json.loads(raw[len(MAGIC):nl])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FormatError(f"{path}: corrupt header") from None
    if not isinstance(header, dict) or json.dumps(header).encode() != raw[len(MAGIC):nl]:
        raise FormatError(f"{path}: corrupt header")  # the header is written canonically: any edit shows
    if header.get("kind") != kind:
        raise FormatError(f"{path}: holds a {header.get('kind')!r}, expected a {kind!r}")
    if header.get("format_version") not in supported_versions:
        raise FormatError(f"{path}: format version {header.get('format_version')} is not supported "
                          f"(this pib_bayes reads {supported_versions}); re-create it with a matching "
                          "version")
    body = raw[nl + 1:]
    if len(body) != header.get("size") or hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise FormatError(f"{path}: checksum mismatch: the file is truncated or corrupt")
    try:
        return torch.load(io.BytesIO(body), weights_only=True)
    except Exception as err:  # pragma: no cover - the checksum catches corruption first
        raise FormatError(f"{path}: cannot decode payload ({err})") from None
