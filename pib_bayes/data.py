"""Data handling for the driver: validation, per-chain minibatching, embedded datasets.

Tensor data ``(x, y)`` are minibatched by the driver: each chain shuffles with its own generator,
one permutation per epoch, consecutive batches of ``batch_size`` (a last short batch is dropped so
every U_B is an unbiased mean over exactly ``batch_size`` examples). A ``DataLoader`` is iterated
cyclically as it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ._validate import check_tensors, is_int

__all__ = ["as_tensors", "check_tensors", "TensorBatcher", "LoaderBatcher", "make_classification_data",
           "make_regression_data"]


def as_tensors(data: object) -> tuple[Tensor, Tensor] | None:
    """``(x, y)`` from a tuple/list of two tensors or a TensorDataset (or a DataLoader over one
    without a custom sampler); ``None`` for other DataLoaders."""
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(f"data: expected (x, y), got a sequence of length {len(data)}")
        x, y = data
        check_tensors(x, y)
        return x, y
    if isinstance(data, TensorDataset):
        if len(data.tensors) != 2:
            raise ValueError(f"data: a TensorDataset of (x, y) is needed, got {len(data.tensors)} tensors")
        x, y = data.tensors
        check_tensors(x, y)
        return x, y
    if isinstance(data, DataLoader):
        return None
    raise TypeError(f"data: expected (x, y) tensors, a TensorDataset or a DataLoader, "
                    f"got {type(data).__name__}")


class TensorBatcher:
    """Per-chain minibatches of tensor data: an independent shuffle per chain and epoch."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int | None, generators: list[torch.Generator]):
        n = x.shape[0]
        if batch_size is None:
            batch_size = n
        if not is_int(batch_size) or not 1 <= batch_size <= n:
            raise ValueError(f"batch_size: must be an int in [1, {n}] (the number of examples), "
                             f"got {batch_size!r}")
        self.x, self.y, self.n, self.batch_size = x, y, n, batch_size
        self.full = batch_size == n
        self.generators = generators
        self.perms: list[Tensor] = [torch.empty(0, dtype=torch.long) for _ in generators]
        self.pos = [n] * len(generators)

    def _indices(self, k: int) -> Tensor:
        if self.pos[k] + self.batch_size > self.n:
            self.perms[k] = torch.randperm(self.n, generator=self.generators[k])
            self.pos[k] = 0
        idx = self.perms[k][self.pos[k]:self.pos[k] + self.batch_size]
        self.pos[k] += self.batch_size
        return idx

    def next(self) -> tuple[Tensor, Tensor, bool]:
        """``(x, y, stacked)``: stacked=True means a leading chain dimension."""
        if self.full:
            return self.x, self.y, False
        idx = torch.stack([self._indices(k) for k in range(len(self.generators))])
        return self.x[idx], self.y[idx], True

    def next_one(self) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of the one chain of a single-generator batcher, without the chain dimension: the
        same examples as :meth:`next` (which stacks them), one indexing op fewer per step."""
        if len(self.generators) != 1:
            raise ValueError(f"next_one: this batcher serves {len(self.generators)} chains; use next()")
        if self.full:
            return self.x, self.y
        idx = self._indices(0)
        return self.x[idx], self.y[idx]

    def state_dict(self) -> dict:
        return {"perms": [p.clone() for p in self.perms], "pos": list(self.pos),
                "generators": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict) -> None:
        self.perms = [p.clone() for p in state["perms"]]
        self.pos = list(state["pos"])
        for g, s in zip(self.generators, state["generators"]):
            g.set_state(s)


class LoaderBatcher:
    """Cycles through a DataLoader; every chain in a batched group sees the same batch."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self._it: Iterator | None = None
        self.batch_size = loader.batch_size
        try:
            self.n: int | None = len(loader.dataset)  # type: ignore[arg-type]
        except TypeError:
            self.n = None
        self.full = False

    def next(self) -> tuple[Tensor, Tensor, bool]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
                break
            except StopIteration:
                self._it = None
        else:
            raise ValueError("data: the DataLoader yields no batches (empty dataset)")
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("data: each DataLoader batch must be a pair (x, y)")
        x, y = batch
        check_tensors(x, y, "data batch")
        return x, y, False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def make_classification_data(n: int = 1000, num_classes: int = 3, dim: int = 2, noise: float = 0.25,
                             seed: int = 0) -> tuple[Tensor, Tensor]:
    """Interleaved noisy spirals: ``num_classes`` arms in 2-D (padded with noise dims up to ``dim``).

    Generated deterministically from ``seed`` (nothing is downloaded); the classes overlap, so a
    calibrated posterior predictive has something to be uncertain about.

    >>> x, y = make_classification_data(n=300, num_classes=3)
    >>> tuple(x.shape), int(y.max())
    ((300, 2), 2)
    """
    if n < num_classes or num_classes < 2 or dim < 2:
        raise ValueError("n >= num_classes >= 2 and dim >= 2 are needed")
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    r = rng.uniform(0.15, 1.0, n)
    theta = 2 * math.pi * y / num_classes + 3.0 * r + rng.normal(0, noise, n)
    pts = np.stack([r * np.cos(theta), r * np.sin(theta)], 1)
    if dim > 2:
        pts = np.concatenate([pts, rng.normal(0, 0.5, (n, dim - 2))], 1)
    perm = rng.permutation(n)
    return torch.tensor(pts[perm], dtype=torch.float32), torch.tensor(y[perm], dtype=torch.long)


def make_regression_data(n: int = 200, noise_std: float = 0.3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """1-D regression ``y = sin(3x) + x/2 + eps`` on x in [-2, -0.5] ∪ [0.5, 2] (a gap for epistemic
    uncertainty to show). Returns x (n, 1), y (n, 1).

    >>> x, y = make_regression_data(n=50)
    >>> tuple(x.shape), tuple(y.shape)
    ((50, 1), (50, 1))
    """
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.uniform(-2, -0.5, n - n // 2), rng.uniform(0.5, 2, n // 2)])
    y = np.sin(3 * x) + 0.5 * x + rng.normal(0, noise_std, n)
    return _column(x), _column(y)


def _column(a: np.ndarray) -> Tensor:
    return torch.tensor(a, dtype=torch.float32).unsqueeze(1)
