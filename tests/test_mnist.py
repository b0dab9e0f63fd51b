"""The IDX loader on small IDX files written here (gzip and plain), and its errors."""

import gzip
import struct

import numpy as np
import pytest
import torch

from pib_bayes.mnist import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    MNIST_MEAN,
    MNIST_STD,
    IDXError,
    load_mnist,
    read_idx,
    write_idx,
)


def _write_pair(d, n=7, prefix="t10k", gz=True, rows=28, cols=28, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    ext = ".gz" if gz else ""
    write_idx(d / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(d / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_roundtrip_values_and_header(tmp_path, gz):
    images, labels = _write_pair(tmp_path, gz=gz)
    # header written by hand-readable struct: magic numbers are the MNIST ones
    raw = (gzip.open if gz else open)(next(tmp_path.glob("*images*")), "rb").read()
    assert struct.unpack(">IIII", raw[:16]) == (IMAGES_MAGIC, 7, 28, 28)
    x, y = load_mnist(tmp_path, normalize=False)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert tuple(x.shape) == (7, 784)
    np.testing.assert_array_equal(y.numpy(), labels)
    np.testing.assert_allclose(x.numpy(), images.reshape(7, -1) / 255.0, rtol=0, atol=1e-7)
    xn, _ = load_mnist(tmp_path, normalize=True, flatten=False)
    assert tuple(xn.shape) == (7, 1, 28, 28)
    expected = (images.reshape(7, -1) / 255.0 - MNIST_MEAN) / MNIST_STD
    np.testing.assert_allclose(xn.numpy().reshape(7, -1), expected, rtol=1e-6, atol=1e-6)


def test_split_choice_and_limit(tmp_path):
    _write_pair(tmp_path, n=5, prefix="t10k", seed=1)
    _, train_labels = _write_pair(tmp_path, n=9, prefix="train", seed=2)
    x, y = load_mnist(tmp_path)  # auto prefers train
    assert len(y) == 9 and np.array_equal(y.numpy(), train_labels)
    x, y = load_mnist(tmp_path, split="t10k", limit=3)
    assert len(x) == 3 and len(y) == 3
    with pytest.raises(ValueError, match="limit"):
        load_mnist(tmp_path, limit=0)
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, split="test")


def test_swapped_magic_is_named(tmp_path):
    _write_pair(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    a, b = labels.read_bytes(), images.read_bytes()
    labels.write_bytes(b)
    images.write_bytes(a)
    with pytest.raises(IDXError, match="magic number 2049.*expected 2051"):
        load_mnist(tmp_path)


def test_not_idx_truncated_and_mismatch(tmp_path):
    p = tmp_path / "junk-idx1-ubyte"
    p.write_bytes(b"hello world, not idx")
    with pytest.raises(IDXError, match="bad magic number"):
        read_idx(p)
    images, _ = _write_pair(tmp_path, gz=False)
    img = tmp_path / "t10k-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-100])
    with pytest.raises(IDXError, match="truncated"):
        read_idx(img, IMAGES_MAGIC)
    # counts that disagree between images and labels
    write_idx(img, images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(6, np.uint8))
    with pytest.raises(IDXError, match="7 images but .* 6 labels"):
        load_mnist(tmp_path)


def test_corrupt_gzip_and_missing(tmp_path):
    _write_pair(tmp_path)
    img = tmp_path / "t10k-images-idx3-ubyte.gz"
    img.write_bytes(img.read_bytes()[:200])
    with pytest.raises(IDXError, match="truncated or corrupt"):
        load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="no MNIST IDX pair"):
        load_mnist(_empty(tmp_path))
    with pytest.raises(FileNotFoundError, match="no directory"):
        load_mnist(tmp_path / "missing")


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_labels_magic_constant():
    assert LABELS_MAGIC == 0x801 and IMAGES_MAGIC == 0x803
