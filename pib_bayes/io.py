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

import contextlib
import fcntl
import functools
import glob
import hashlib
import inspect
import io
import json
import os
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from ._validate import check_path, is_int

__all__ = ["FormatError", "LockedError", "atomic_write_bytes", "exclusive_lock", "save_payload",
           "load_payload", "writer_tag", "is_stale"]

MAGIC = b"PIBBAYES\n"
MAX_HEADER = 4096  # bytes of the JSON header line (ours are about 150)


class FormatError(ValueError):
    """A file that is not ours, is truncated or corrupt, or has an incompatible format version."""


class LockedError(ValueError):
    """Another writer holds the path: a second process (or thread) writing the same checkpoint or
    posterior file is refused at once instead of interleaving with the first."""


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of ``path``: ``.NAME.lock`` in the same directory."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, argname: str = "path") -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``.NAME.lock`` next to ``path`` for the block.

    Fails fast: if another open file (another process, or another thread of this one) holds it,
    :class:`LockedError` names the path and the holder (its ``host.pid``, written in the lock
    file). The operating system drops the lock when its holder exits, killed or not, so a crash
    never leaves ``path`` locked (only an unlocked ``.NAME.lock``, reused by the next writer); a
    holder removes the lock file while still holding it, and a writer that locked a file of that
    name which has meanwhile been removed retries, so two writers never hold two files of one
    name. Readers take no lock: they see whole files only, because every write goes to a
    temporary name renamed over ``path``.

    >>> import tempfile, os
    >>> target = os.path.join(tempfile.mkdtemp(), "post.nc")
    >>> with exclusive_lock(target):
    ...     try:
    ...         with exclusive_lock(target):
    ...             pass
    ...     except LockedError as err:
    ...         print(str(err).split(" is ")[1].split(" (")[0])
    being written by another writer
    """
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            except OSError:  # pragma: no cover
                holder = "unknown"
            os.close(fd)
            raise LockedError(f"{argname}: {str(path)!r} is being written by another writer (process "
                              f"{holder} holds {str(lock)!r}); wait for it to finish, or write to another "
                              "path") from None
        try:  # the file locked must still be the one of that name (a releasing holder unlinks it)
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, writer_tag().encode() + b"\n", 0)
        yield
    finally:
        try:
            os.unlink(lock)  # still holding it: a writer waiting on this name locks a fresh file
        finally:
            os.close(fd)  # closing the descriptor releases the lock


_F = TypeVar("_F", bound=Callable[..., Any])


def holds_lock(*argnames: str) -> Callable[[_F], _F]:
    """Decorator: the call holds :func:`exclusive_lock` on each of its arguments ``argnames`` that
    is not None (in that order); two of them naming one file is a ``ValueError``."""
    def wrap(fn: _F) -> _F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs).arguments
            # a bad path gets its clear error (naming argname) before any lock file is made beside it
            paths = {a: check_path(a, bound[a]) for a in argnames if bound.get(a) is not None}
            seen: dict[str, str] = {}
            for a, p in paths.items():
                key = os.path.abspath(p)
                if key in seen:
                    raise ValueError(f"{a}: must be another file than {seen[key]} (both are {str(p)!r})")
                seen[key] = a
            with contextlib.ExitStack() as stack:
                for a, p in paths.items():
                    stack.enter_context(exclusive_lock(p, a))
                return fn(*args, **kwargs)
        return locked  # type: ignore[return-value]
    return wrap


def _host() -> str:
    return "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:40] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process, or nonsense
        return pid > 0
    return True


STALE_UNKNOWN_S = 3600.0  # a temporary file whose writer cannot be identified is stale after an hour


def writer_tag() -> str:
    """``host.pid`` of this process, part of every temporary name, so that a later process can
    tell a file left by a dead writer (removed) from one being written right now (kept)."""
    return f"{_host()}.{os.getpid()}"


def is_stale(tag: str, path: str | os.PathLike) -> bool:
    """Whether the temporary ``path`` tagged ``host.pid`` (see :func:`writer_tag`) was left by a
    writer that is gone: a dead process of this host; on another host (a shared file system),
    or when the tag cannot be parsed, a file untouched for :data:`STALE_UNKNOWN_S` seconds."""
    host, _, pid = tag.rpartition(".")
    if host == _host() and pid.isdigit():
        return not _pid_alive(int(pid))
    try:
        return time.time() - os.stat(path, follow_symlinks=False).st_mtime > STALE_UNKNOWN_S
    except OSError:
        return False


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (os.umask can only be
    read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_plain_mode(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Give ``tmp`` (made private, 0600/0700, by mkstemp/mkdtemp) the mode ``target`` has, or else
    the one a plain ``open``/``mkdir`` would give it (0666/0777 less the umask), before it is
    renamed to ``target``: a file written into a shared folder stays readable by the others."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = (0o777 if os.path.isdir(tmp) else 0o666) & ~_umask()
    os.chmod(tmp, mode)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path to write ``path``'s new content to; on leaving the block it is fsynced and
    renamed over ``path`` (on an exception it is removed).

    The temporary name ``.NAME.HOST.PID.RANDOM.tmp`` is unique; temporary files of ``path`` left
    by dead writers (a SIGKILL cannot be caught) are removed, those of live writers never, so
    several processes may write the same path at once (the last rename wins; the file is always
    one writer's whole content).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    for stale in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        middle = stale.name[len(prefix):-len(".tmp")]
        tag = middle.rpartition(".")[0]  # HOST.PID (RANDOM from mkstemp has no dot)
        if is_stale(tag, stale):
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{writer_tag()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        give_plain_mode(tmp, path)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + fsync + rename; see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


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
    nl = raw.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER + 1)
    if nl < 0:
        raise FormatError(f"{path}: truncated or oversized header (a header is one JSON line of at most "
                          f"{MAX_HEADER} bytes)")
    try:
        header = json.loads(raw[len(MAGIC):nl])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: deep nesting
        raise FormatError(f"{path}: corrupt header") from None
    if not isinstance(header, dict) or json.dumps(header).encode() != raw[len(MAGIC):nl]:
        raise FormatError(f"{path}: corrupt header")  # the header is written canonically: any edit shows
    if header.get("kind") != kind:
        raise FormatError(f"{path}: holds a {header.get('kind')!r}, expected a {kind!r}")
    version = header.get("format_version")
    if not is_int(version):
        raise FormatError(f"{path}: format_version must be an int, got {version!r} "
                          f"({type(version).__name__}); the header is corrupt or not written by pib_bayes")
    if version not in supported_versions:
        raise FormatError(f"{path}: format version {version} is not supported "
                          f"(this pib_bayes reads {supported_versions}); re-create it with a matching "
                          "version")
    size, digest = header.get("size"), header.get("sha256")
    if not is_int(size) or not isinstance(digest, str):
        raise FormatError(f"{path}: corrupt header (size must be an int and sha256 a string)")
    body = raw[nl + 1:]
    if len(body) != size or hashlib.sha256(body).hexdigest() != digest:
        raise FormatError(f"{path}: checksum mismatch: the file is truncated or corrupt")
    try:
        return torch.load(io.BytesIO(body), weights_only=True)
    except Exception as err:  # pragma: no cover - the checksum catches corruption first
        raise FormatError(f"{path}: cannot decode payload ({err})") from None
