"""Read MNIST-style IDX files (``*-idx3-ubyte[.gz]`` images, ``*-idx1-ubyte[.gz]`` labels).

The IDX format (LeCun et al.): a big-endian header ``0x00 0x00 <type> <ndim>`` followed by ``ndim``
big-endian uint32 sizes, then the raw values. MNIST uses type ``0x08`` (unsigned byte), images have
3 dimensions (count, rows, cols), labels 1 (count): magic numbers 2051 and 2049. Files may be
gzip-compressed (detected from the content, not the name). Nothing is downloaded here.

>>> import gzip, os, struct, tempfile, numpy as np
>>> d = tempfile.mkdtemp()
>>> with gzip.open(os.path.join(d, "t10k-images-idx3-ubyte.gz"), "wb") as f:
...     _ = f.write(struct.pack(">IIII", 2051, 2, 28, 28) + bytes(2 * 784))
>>> with gzip.open(os.path.join(d, "t10k-labels-idx1-ubyte.gz"), "wb") as f:
...     _ = f.write(struct.pack(">II", 2049, 2) + bytes([3, 7]))
>>> x, y = load_mnist(d)
>>> tuple(x.shape), y.tolist()
((2, 784), [3, 7])
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._validate import is_int

__all__ = ["load_mnist", "read_idx", "write_idx", "find_idx_pair", "IDXError", "IMAGES_MAGIC", "LABELS_MAGIC"]

IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

# mean and standard deviation of MNIST training pixels in [0, 1] (the usual normalisation)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class IDXError(ValueError):
    """A file that is not a valid IDX file of the expected kind."""


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    try:
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as err:  # truncated gzip stream, bad CRC, ...
        raise IDXError(f"{path}: cannot decompress ({err}); the file is truncated or corrupt, "
                       "download it again") from None


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (gzip or plain) into a numpy array with the header's shape.

    Raises :class:`IDXError` on a wrong magic number (also when it differs from ``expected_magic``),
    a header whose sizes do not match the amount of data, or a truncated/corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no IDX file at {str(path)!r}")
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise IDXError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    magic = struct.unpack(">I", raw[:4])[0]
    if zero != 0 or type_code not in _DTYPES or ndim < 1:
        raise IDXError(f"{path}: bad magic number 0x{magic:08x}; not an IDX file "
                       "(expected 0x00000803 for images or 0x00000801 for labels)")
    if expected_magic is not None and magic != expected_magic:
        raise IDXError(f"{path}: magic number {magic} (0x{magic:08x}), expected {expected_magic} "
                       f"(0x{expected_magic:08x}); images and labels swapped or wrong file?")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXError(f"{path}: truncated header ({len(raw)} bytes, needs {header})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_DTYPES[type_code])
    need = int(np.prod(shape)) * dtype.itemsize
    have = len(raw) - header
    if have != need:
        raise IDXError(f"{path}: header says shape {shape} ({need} data bytes) but the file holds {have}; "
                       "the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def find_idx_pair(directory: str | os.PathLike, split: str = "auto") -> tuple[Path, Path]:
    """The (images, labels) files of ``split`` ('train', 't10k' or 'auto') in ``directory``.

    Accepts the standard names with ``-`` or ``.`` before ``idx`` and with or without ``.gz``.
    'auto' takes 'train' when present, else 't10k'.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"data: no directory {str(directory)!r} "
                                "(expected a folder holding MNIST IDX files)")
    if split not in ("auto", "train", "t10k"):
        raise ValueError(f"split: expected 'auto', 'train' or 't10k', got {split!r}")

    def find(prefix: str, kind: str) -> Path | None:
        for sep in ("-", "."):
            for ext in (".gz", ""):
                p = directory / f"{prefix}-{kind}{sep}{'idx3' if kind == 'images' else 'idx1'}-ubyte{ext}"
                if p.is_file():
                    return p
        return None

    for prefix in (("train", "t10k") if split == "auto" else (split,)):
        images, labels = find(prefix, "images"), find(prefix, "labels")
        if images is not None and labels is not None:
            return images, labels
    listing = sorted(p.name for p in directory.iterdir())[:10]
    raise FileNotFoundError(
        f"data: {str(directory)!r} holds no MNIST IDX pair for split {split!r} (looked for e.g. "
        f"'t10k-images-idx3-ubyte.gz' and 't10k-labels-idx1-ubyte.gz'); it contains {listing}")


def load_mnist(path: str | os.PathLike, split: str = "auto", *, limit: int | None = None,
               normalize: bool = True, flatten: bool = True) -> tuple[Tensor, Tensor]:
    """Load MNIST (or any IDX image/label pair) from a directory.

    Args:
        path: a directory holding ``{train,t10k}-images-idx3-ubyte[.gz]`` and the matching
            ``-labels-idx1-ubyte[.gz]`` file.
        split: 'train', 't10k', or 'auto' (train if present, else t10k).
        limit: keep only the first ``limit`` examples.
        normalize: pixels scaled to [0, 1] then standardised with the usual MNIST mean/std
            (0.1307, 0.3081); ``False`` gives [0, 1].
        flatten: images as (N, rows*cols) instead of (N, 1, rows, cols).

    Returns:
        ``x`` float32 and ``y`` int64 tensors.
    """
    images_path, labels_path = find_idx_pair(path, split)
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise IDXError(f"{images_path.name} holds {images.shape[0]} images but {labels_path.name} "
                       f"{labels.shape[0]} labels; they must match")
    if limit is not None:
        if not is_int(limit) or limit < 1:
            raise ValueError(f"limit: must be an int >= 1 or None, got {limit!r}")
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    if normalize:
        x = (x - MNIST_MEAN) / MNIST_STD
    x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write a uint8 array as an IDX file (gzip when ``path`` ends in .gz); used for tests and examples."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    path = Path(path)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    compress = path.suffix == ".gz" if compress is None else compress
    tmp = path.with_name(path.name + ".tmp")
    with (gzip.open(tmp, "wb") if compress else open(tmp, "wb")) as f:
        f.write(data)
    os.replace(tmp, path)
