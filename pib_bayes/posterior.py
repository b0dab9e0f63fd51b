"""The :class:`Posterior`: draws of the sampled weights, their statistics and metadata.

Draws are kept per parameter name with shape ``(chain, draw, *param_shape)``, exactly the
``chain``/``draw`` layout ArviZ expects (SPEC §4). Per-draw sample statistics (energy, minibatch
loss, step size, divergence flag, sampler-specific ones) have shape ``(chain, draw)``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ._validate import check_bool, check_count, check_memory, is_int, itemsize
from .batched import batched_forward
from .io import FormatError, exclusive_lock, load_payload

__all__ = [
    "Posterior", "Prediction", "DrawCollector", "heteroscedastic_prediction", "FORMAT_VERSION", "ENGINES",
    "DRAW_CHUNK_BYTES", "is_lazy_draws",
]

FORMAT_VERSION = 4  # netCDF4/HDF5 (pib_bayes.store), per-chunk XXH3-64 digests, a trailer
READABLE_VERSIONS = (4, 3, 2)  # 3: the structure record in a userblock; 2: fletcher32 chunks (read-only)
LEGACY_FORMAT_VERSION = 1  # the PIBBAYES torch payload: read-only

ENGINES = ("auto", "batched", "vmap", "loop")
"""How :meth:`Posterior.outputs` runs the model over the draws (see there)."""

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: only the CUDA name


DRAW_CHUNK_BYTES = 64 * 2**20
"""Default size of one chunk of :meth:`Posterior.iter_draws` (bytes over the requested variables and
chains; at least one draw)."""


def is_lazy_draws(draws: Any) -> bool:
    """Whether ``draws`` is a lazily read draws mapping (e.g. :class:`pib_bayes.store.LazyDraws`):
    a ``Mapping[str, Tensor]`` that also offers ``shape(name)`` (chain, draw, *param_shape),
    ``dtype(name)`` and ``read(name, chains, draws)`` -> the tensor of those chains (a slice or a
    list of ints) and that slice of draws. ``draws[name]`` reads the whole variable.

    >>> import torch
    >>> is_lazy_draws({"w": torch.zeros(2, 3)})
    False
    """
    return isinstance(draws, Mapping) and all(callable(getattr(draws, a, None))
                                              for a in ("shape", "dtype", "read"))


_ACTIVATION_BUDGET = 2**18  # elements of one layer's activations over a chunk of draws (1 MB float32)


def _auto_chunk(draws: Mapping[str, Tensor], x: Tensor, most: int = 64) -> int:
    """Draws per chunk for the batched MLP forward: at most ``most``, and few enough that one
    layer's activations (draws x inputs x width) stay within ``_ACTIVATION_BUDGET`` elements."""
    rows = x.shape[0] if x.dim() > 1 else 1
    width = max([x[0].numel() if x.dim() > 1 else x.numel()]
                + [v.shape[-2] for v in draws.values() if v.dim() == 3])  # (draw, out, in) weights
    return max(1, min(most, _ACTIVATION_BUDGET // max(1, rows * width)))


def _softmax_into(logits: Tensor, dest: Tensor) -> None:
    """``dest <- softmax(logits, dim=-1)``. Torch's CPU softmax over a contiguous last dim of fewer
    than 16 classes runs a scalar loop per row (about 20x slower than over a leading dim with a
    contiguous inner dim), so a few classes are reduced with the classes as the outer dim."""
    classes = logits.shape[-1]
    if logits.dim() < 2 or classes >= 16 or logits.device.type != "cpu":
        torch.softmax(logits, dim=-1, out=dest)
        return
    # (..., B, C) -> (..., C, B): free when the batched forward's output is already laid out so
    dest.copy_(torch.softmax(logits.transpose(-1, -2).contiguous(), dim=-2).transpose(-1, -2))


def _probs_shape(out_shape: torch.Size, likelihood: str | None) -> tuple[int, ...]:
    """Per-draw shape of the stored predictions for a model output of ``out_shape`` (per draw)."""
    if likelihood != "bernoulli":
        return tuple(out_shape)
    shape = tuple(out_shape[:-1]) if len(out_shape) > 1 and out_shape[-1] == 1 else tuple(out_shape)
    return (*shape, 2)


def _bernoulli_into(logits: Tensor, dest: Tensor) -> None:
    """``dest <- (1 - sigmoid(f), sigmoid(f))`` in a last dimension of 2 (a trailing output dim of 1
    dropped)."""
    p = torch.sigmoid(logits.reshape(dest.shape[:-1]))
    dest[..., 1] = p
    torch.sub(1, p, out=dest[..., 0])


def heteroscedastic_prediction(outputs: Tensor) -> Prediction:
    """The mixture predictive (1/M) sum_m N(mu_m, sigma_m^2) from raw outputs (M, B, ..., 2d).

    The last dimension holds the means (first d) and log-stds (last d) (SPEC §4,
    :class:`~pib_bayes.HeteroscedasticGaussianLoss`). Mean (1/M) sum_m mu_m, epistemic variance
    Var_m mu_m, aleatoric variance (1/M) sum_m sigma_m^2; a trailing d of 1 is dropped.

    >>> out = torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]]])  # two draws: mu 0 and 2, sigma 1
    >>> pred = heteroscedastic_prediction(out)
    >>> pred.mean, pred.variance
    (tensor([1.]), tensor([2.]))
    """
    from .energy import HeteroscedasticGaussianLoss

    mu, log_std = HeteroscedasticGaussianLoss.split(outputs)
    if mu.shape[-1] == 1 and mu.dim() > 2:
        mu, log_std = mu.squeeze(-1), log_std.squeeze(-1)
    std = log_std.exp()
    return Prediction("regression", mu.mean(0), mu, mu.var(0, unbiased=False), std.square().mean(0), std)


def _tensor_slots(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor] | None:
    """name -> the module's own parameter/buffer tensor for every name (a tied parameter is one tensor
    under its first name, as in the draws), or None when one is missing (then functional_call)."""
    own: dict[str, Tensor] = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    if any(n not in own for n in names):
        return None
    return {n: own[n] for n in names}


@dataclass
class Prediction:
    """Posterior-predictive summaries over M draws.

    Classification: ``mean`` = (1/M) sum_m softmax(f(x; w_m)) with shape (B, K), ``per_draw`` the
    (M, B, K) probabilities. Regression: ``mean`` = (1/M) sum_m f(x; w_m), ``per_draw`` the
    (M, B, ...) outputs, ``epistemic_variance`` their variance over draws, ``aleatoric_variance``
    the observation noise s^2 (when the loss was :class:`~pib_bayes.GaussianLoss`) and
    ``variance`` their sum. With :class:`~pib_bayes.BCEWithLogitsLoss` the per-draw
    probabilities are (1 - sigmoid(f), sigmoid(f)) in a last dimension of 2.

    Heteroscedastic regression (:class:`~pib_bayes.HeteroscedasticGaussianLoss`, SPEC §4): the
    predictive is the mixture (1/M) sum_m N(mu_m, sigma_m^2); ``per_draw`` holds the means mu_m,
    ``per_draw_noise_std`` the sigma_m (M, B, ...), ``mean`` = (1/M) sum_m mu_m,
    ``epistemic_variance`` = Var_m mu_m, ``aleatoric_variance`` = (1/M) sum_m sigma_m^2, so
    ``variance`` is the mixture's variance.
    """

    task: str
    mean: Tensor
    per_draw: Tensor
    epistemic_variance: Tensor | None = None
    aleatoric_variance: Tensor | None = None
    per_draw_noise_std: Tensor | None = None

    @property
    def variance(self) -> Tensor | None:
        if self.epistemic_variance is None:
            return None
        noise = self.aleatoric_variance if self.aleatoric_variance is not None else 0.0
        return self.epistemic_variance + noise


@dataclass
class Posterior:
    """Posterior draws of a torch model's weights.

    Attributes:
        draws: name -> tensor (chain, draw, *param_shape), or a lazily read mapping of the same
            (:func:`is_lazy_draws`, e.g. a store on disk larger than memory): then nothing is read
            until a consumer walks the draws with :meth:`iter_draws`, a chunk at a time.
        sample_stats: name -> tensor (chain, draw): ``energy`` (U_B at the kept step),
            ``loss`` (minibatch mean loss), ``step_size``, ``diverging`` (bool; true at every
            draw of a diverged chain from its divergence on, the draws that hold NaN), and
            sampler-specific statistics.
        metadata: beta, prior, sampler settings, seed, library version, chain method, ...
        fixed: name -> tensor of everything not sampled (buffers, frozen parameters), held at
            the values they had when sampling started.
        diverged: bool (chain,), true for chains stopped by a non-finite or exploding energy or
            weight (see :func:`~pib_bayes.sample`), and for any chain whose draws hold NaN/Inf
            (flagged at construction, with a warning).
        divergence_step: per chain, the global step at which it diverged, or -1.
        model: the module the draws belong to (needed by :meth:`predict`; not saved).
        task: ``"classification"`` or ``"regression"``; stored in ``metadata["task"]`` (given
            both, they must agree). A Posterior without a task still serves diagnostics;
            :meth:`predict` then asks for one.

    Built by :func:`~pib_bayes.sample`, by :meth:`from_draws` (draws from your own loop) or by
    :class:`~pib_bayes.DrawCollector`.
    """

    draws: dict[str, Tensor]
    sample_stats: dict[str, Tensor]
    metadata: dict[str, Any]
    fixed: dict[str, Tensor] = field(default_factory=dict)
    diverged: Tensor | None = None
    divergence_step: Tensor | None = None
    model: nn.Module | None = None
    task: str | None = None
    last_engine: str | None = field(default=None, init=False, repr=False, compare=False)
    last_engine_reason: str | None = field(default=None, init=False, repr=False, compare=False)
    _engine_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _lazy_cache: tuple = field(default=(None, False), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.draws, Mapping):
            raise TypeError("draws: expected a mapping name -> tensor (chain, draw, *shape)")
        if not self.draws:
            raise ValueError("draws: a Posterior needs at least one parameter")
        lazy = is_lazy_draws(self.draws)
        if lazy:  # shapes from the store's own description: nothing is read
            for name in self.draws:
                full = self.draws.shape(name)
                if not isinstance(full, tuple) or len(full) < 2:
                    raise ValueError(f"draws: {name!r} must have (chain, draw, ...) dimensions, its shape() "
                                     f"is {full!r}")
        else:
            for name, v in self.draws.items():
                if not isinstance(v, Tensor) or v.dim() < 2:
                    raise ValueError(f"draws: {name!r} must be a tensor with (chain, draw, ...) dimensions")
        shapes = {self._full_shape(name)[:2] for name in self.draws}
        if len(shapes) != 1:
            raise ValueError(f"draws: every parameter needs the same (chain, draw) leading shape, "
                             f"got {shapes}")
        c, n = next(iter(shapes))
        if c < 1 or n < 1:
            raise ValueError(f"draws: need at least one chain and one draw, got (chain, draw) = {(c, n)}")
        if not isinstance(self.sample_stats, Mapping):
            raise TypeError("sample_stats: expected a mapping name -> tensor (chain, draw)")
        for name, v in self.sample_stats.items():
            if not isinstance(v, Tensor) or tuple(v.shape[:2]) != (c, n):
                raise ValueError(f"sample_stats: {name!r} must be a tensor of shape (chain, draw) = {(c, n)}")
        if not isinstance(self.metadata, dict):
            raise TypeError(f"metadata: expected a dict, got {type(self.metadata).__name__}")
        stored = self.metadata.get("task")
        for name, value in (("task", self.task), ("metadata['task']", stored)):
            if value is not None and value not in ("classification", "regression"):
                raise ValueError(f"{name}: expected 'classification' or 'regression', got {value!r}")
        if self.task is not None and stored is not None and stored != self.task:
            raise ValueError(f"task: {self.task!r} contradicts metadata['task'] = {stored!r}")
        if self.task is None:
            self.task = stored
        elif stored is None:
            self.metadata["task"] = self.task
        if self.diverged is None:
            self.diverged = torch.zeros(c, dtype=torch.bool)
        if self.divergence_step is None:
            self.divergence_step = torch.full((c,), -1, dtype=torch.long)
        for name, v in (("diverged", self.diverged), ("divergence_step", self.divergence_step)):
            if not isinstance(v, Tensor) or tuple(v.shape) != (c,):
                raise ValueError(f"{name}: must be a tensor with one entry per chain ({c})")
        # a chain holding NaN/Inf draws is diverged whether or not it was flagged: predictions and
        # diagnostics must not average it in silently
        # lazy draws are checked chunk by chunk as iter_draws reads them (a scan here would read the
        # whole store on every load); check_finite() scans once and flags
        broken = torch.zeros(c, dtype=torch.bool)
        from .store import _ScannedDraws

        scanned = {}
        if isinstance(self.draws, _ScannedDraws):  # used once: a later Posterior of these draws scans
            scanned, self.draws.nonfinite = self.draws.nonfinite, {}
        for name, v in ([] if lazy else self.draws.items()):
            if name in scanned:  # read from a file and scanned chunk by chunk as it was read
                broken[sorted(scanned[name])] = True
                continue
            if not (v.is_floating_point() or v.is_complex()):
                continue
            if v.numel() and bool(torch.isfinite(v.sum())):  # a NaN or Inf anywhere makes the sum non-finite
                continue
            if v.numel() <= 2**24:
                broken |= ~torch.isfinite(v.reshape(c, -1)).all(1)
            else:  # one chain at a time: the boolean temporary stays small
                for ci in range(c):
                    broken[ci] |= not bool(torch.isfinite(v[ci]).all())
        unflagged = broken & ~self.diverged.bool()
        if bool(unflagged.any()):
            chains = torch.nonzero(unflagged).flatten().tolist()
            warnings.warn(f"draws: chains {chains} hold NaN/Inf draws but were not flagged as diverged; "
                          "they are flagged now (diverged=True, divergence_step=-1, unknown) and left out of "
                          "predictions and diagnostics unless include_diverged=True", stacklevel=3)
            self.diverged = self.diverged.bool() | unflagged

    # ----------------------------------------------------------------- shape
    @property
    def lazy(self) -> bool:
        """Whether the draws are read on demand (:func:`is_lazy_draws`) rather than held in memory."""
        source, flag = self._lazy_cache
        if source is not self.draws:  # hot path (every chunk): the check once per draws object
            flag = is_lazy_draws(self.draws)
            self._lazy_cache = (self.draws, flag)
        return flag

    def _full_shape(self, name: str) -> tuple[int, ...]:
        if self.lazy:
            return tuple(int(s) for s in self.draws.shape(name))
        return tuple(self.draws[name].shape)

    def _dtype(self, name: str) -> torch.dtype:
        return self.draws.dtype(name) if self.lazy else self.draws[name].dtype

    @property
    def num_chains(self) -> int:
        return self._full_shape(next(iter(self.draws)))[0]

    @property
    def num_draws(self) -> int:
        return self._full_shape(next(iter(self.draws)))[1]

    @property
    def param_names(self) -> list[str]:
        return list(self.draws)

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> the parameter's own shape (without chain and draw); reads no draws."""
        return {n: self._full_shape(n)[2:] for n in self.draws}

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes.values())

    @property
    def good_chains(self) -> list[int]:
        """Indices of the chains that did not diverge."""
        assert self.diverged is not None
        return [c for c in range(self.num_chains) if not bool(self.diverged[c])]

    def kept_chains(self, include_diverged: bool = False) -> list[int]:
        """Chains used for predictions and diagnostics: all, or (default) those that did not diverge,
        with a warning naming the diverged ones and their steps."""
        check_bool("include_diverged", include_diverged)
        chains = list(range(self.num_chains)) if include_diverged else self.good_chains
        if not include_diverged and len(chains) < self.num_chains:
            bad = [c for c in range(self.num_chains) if c not in chains]
            warnings.warn(f"chains {bad} diverged (steps {[int(self.divergence_step[c]) for c in bad]}) "
                          "and are left out; pass include_diverged=True to keep them", stacklevel=3)
        if not chains:
            raise ValueError("every chain diverged: reduce the step size or check the model and data")
        return chains

    def flat(self, names: Sequence[str] | None = None) -> Tensor:
        """All (or the named) parameters flattened: tensor (chain, draw, D) in parameter order."""
        names = list(names) if names is not None else self.param_names
        unknown = [n for n in names if n not in set(self.draws)]
        if unknown:
            raise KeyError(f"names: unknown parameters {unknown}; available: {self.param_names}")
        c, n = self.num_chains, self.num_draws
        return torch.cat([self.draws[k].reshape(c, n, -1) for k in names], dim=2)

    def draws_for_prediction(self, include_diverged: bool = False) -> dict[str, Tensor]:
        """name -> (M, *shape), M = kept chains x draws (chain-major). This holds every kept draw in
        memory (a lazily read posterior is read whole); :meth:`iter_draws` walks them by chunks."""
        chains = self.kept_chains(include_diverged)
        if len(chains) == self.num_chains:  # every chain kept: a view, no copy of the draws
            return {k: v.reshape(-1, *v.shape[2:]) for k, v in self.draws.items()}
        return {k: v[chains].reshape(-1, *v.shape[2:]) for k, v in self.draws.items()}

    # ----------------------------------------------------------- chunks
    def _chain_list(self, chains: Any) -> list[int]:
        c = self.num_chains
        if chains is None:
            return list(range(c))
        if isinstance(chains, slice):
            chains = list(range(c))[chains]
        if isinstance(chains, (str, bytes)) or not isinstance(chains, Sequence) or not chains or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < c for i in chains):
            raise ValueError(f"chains: expected a non-empty list of chain indices in [0, {c}) or a slice, "
                             f"got {chains!r}")
        return list(chains)

    def _read(self, name: str, chains: list[int], draws: slice) -> Tensor:
        """Draws ``draws`` of ``chains`` of one variable: (len(chains), d, *shape); a view of a plain
        tensor when the chains are a contiguous range."""
        c0, c1 = chains[0], chains[-1] + 1
        contiguous = len(chains) == c1 - c0 and chains == list(range(c0, c1))
        if not self.lazy:
            v = self.draws[name]
            return v[c0:c1, draws] if contiguous else v[:, draws][chains]
        t = self.draws.read(name, slice(c0, c1) if contiguous else list(chains), draws)
        want = (len(chains), draws.stop - draws.start, *self._full_shape(name)[2:])
        if not isinstance(t, Tensor) or tuple(t.shape) != want:
            raise ValueError(f"draws: read({name!r}, ...) returned "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}, expected "
                             f"a tensor of shape {want}")
        return t

    def iter_draws(self, names: Sequence[str] | None = None, *, chains: Sequence[int] | slice | None = None,
                   draws: slice | None = None, draw_chunk: int | None = None
                   ) -> Iterator[tuple[list[int], slice, dict[str, Tensor]]]:
        """Walk the draws chunk by chunk: yields ``(chains, draw_slice, {name: (c, d, *shape)})``.

        The one way consumers read the draws (:meth:`outputs`, :meth:`predict`,
        :func:`~pib_bayes.diagnostics.summary`, the IIW estimators of
        :mod:`pib_bayes.iiw.samples`): every chunk holds the draws ``draw_slice`` of the chains
        ``chains`` (all requested chains in each chunk, draws in increasing order), so memory is one
        chunk, never the run. Plain tensors are sliced (a view where the chains are contiguous);
        lazily read draws (:func:`is_lazy_draws`, e.g. a store opened by
        :class:`pib_bayes.store.LazyDraws`) are read with ``read(name, chains, draw_slice)``, and
        a chunk holding NaN/Inf in a chain not flagged as diverged raises ``ValueError`` (see
        :meth:`check_finite`).

        Args:
            names: variables to read (default: all).
            chains: chain indices (a list or a slice; default: all).
            draws: the range of draws (a slice with step 1; default: all).
            draw_chunk: draws per chunk; default: as many as keep one chunk within
                :data:`DRAW_CHUNK_BYTES` (at least one).

        >>> import torch
        >>> post = Posterior({"w": torch.arange(24.0).reshape(2, 6, 2)}, {}, {})
        >>> [(c, s.start, s.stop, tuple(b["w"].shape)) for c, s, b in post.iter_draws(draw_chunk=4)]
        [([0, 1], 0, 4, (2, 4, 2)), ([0, 1], 4, 6, (2, 2, 2))]
        """
        if isinstance(names, str):
            raise ValueError(f"names: expected a list of parameter names, got the string {names!r}; pass "
                             f"[{names!r}]")
        names = self.param_names if names is None else list(names)
        known = set(self.draws)  # iterating names: `in` on a Mapping would read the variable
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise ValueError(f"names: unknown parameters {unknown or names}; available: {self.param_names}")
        chain_list = self._chain_list(chains)
        n = self.num_draws
        if draws is None:
            draws = slice(0, n)
        if not isinstance(draws, slice) or draws.step not in (None, 1):
            raise ValueError(f"draws: expected a slice of draws with step 1, got {draws!r}")
        start, stop, _ = draws.indices(n)
        yield from self._walk(names, chain_list, start, stop, draw_chunk, check=self.lazy)

    def _walk(self, names: list[str], chains: list[int], start: int, stop: int, draw_chunk: int | None,
              check: bool) -> Iterator[tuple[list[int], slice, dict[str, Tensor]]]:
        if draw_chunk is None:
            per_draw = len(chains) * sum(math.prod(self._full_shape(k)[2:]) * itemsize(self._dtype(k))
                                         for k in names)
            draw_chunk = max(1, DRAW_CHUNK_BYTES // max(1, per_draw))
        if isinstance(draw_chunk, bool) or not isinstance(draw_chunk, int) or draw_chunk < 1:
            raise ValueError(f"draw_chunk: must be an int >= 1 or None (automatic), got {draw_chunk!r}")
        for d0 in range(start, stop, draw_chunk):
            sl = slice(d0, min(stop, d0 + draw_chunk))
            block = {k: self._read(k, chains, sl) for k in names}
            if check:
                self._check_chunk(block, chains, sl)
            yield chains, sl, block

    def _check_chunk(self, block: Mapping[str, Tensor], chains: list[int], sl: slice) -> None:
        assert self.diverged is not None
        for k, v in block.items():
            if not (v.is_floating_point() or v.is_complex()):
                continue
            for i, ci in enumerate(chains):
                if not bool(self.diverged[ci]) and not bool(torch.isfinite(v[i]).all()):
                    raise ValueError(f"draws: chain {ci} holds NaN/Inf in {k!r} at draws "
                                     f"{sl.start}:{sl.stop} but is not flagged as diverged; call "
                                     "post.check_finite() (one pass over the draws) to flag such chains, "
                                     "then retry")

    def check_finite(self, *, draw_chunk: int | None = None) -> list[int]:
        """Scan every draw once (chunk by chunk) and flag each chain holding NaN/Inf as diverged
        (with a warning), as the constructor does for draws held in memory; returns the chains
        flagged now. Needed only for lazily read draws whose store did not flag them.

        >>> import torch
        >>> w = torch.zeros(2, 3, 1)
        >>> w[1, 2] = float("nan")
        >>> import warnings
        >>> with warnings.catch_warnings(record=True):
        ...     post = Posterior({"w": w}, {}, {})
        >>> post.check_finite(), post.good_chains
        ([], [0])
        """
        assert self.diverged is not None
        broken = torch.zeros(self.num_chains, dtype=torch.bool)
        for chains, _, block in self._walk(self.param_names, list(range(self.num_chains)), 0, self.num_draws,
                                           draw_chunk, check=False):
            for v in block.values():
                if v.is_floating_point() or v.is_complex():
                    broken[chains] |= ~torch.isfinite(v.reshape(len(chains), -1)).all(1)
        new = broken & ~self.diverged.bool()
        if bool(new.any()):
            warnings.warn(f"draws: chains {torch.nonzero(new).flatten().tolist()} hold NaN/Inf draws; they "
                          "are flagged as diverged now (divergence_step=-1, unknown)", stacklevel=2)
            self.diverged = self.diverged.bool() | new
        return torch.nonzero(new).flatten().tolist()

    # ------------------------------------------------------------- outputs
    def _model_for(self, model: nn.Module | None) -> nn.Module:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        model = model or self.model
        if model is None:
            raise ValueError("model: this Posterior has no model attached; pass model= or "
                             "Posterior.load(..., model=)")
        if model is not self.model:
            self.check_model(model)  # a mismatched module would silently use its own weights
        return model

    @torch.no_grad()
    def outputs(self, x: Tensor, *, chunk_size: int | None = None, include_diverged: bool = False,
                model: nn.Module | None = None, engine: str = "auto") -> Tensor:
        """The raw model outputs f(x; w_m) for every kept draw w_m: a tensor (M, N, ...).

        M = kept chains x draws (chain-major, as :meth:`draws_for_prediction`); the model runs in
        ``eval()`` mode (dropout off, BatchNorm on its running statistics) and is handed back in the
        mode it came in. This is the one place the model runs over the draws: :meth:`predict`,
        :mod:`pib_bayes.diagnostics` (``log_lik``, ``pred[i]``, ``to_arviz``'s log-likelihood) and
        :mod:`pib_bayes.bounds` (through :meth:`predict`) all call it.

        The draws are read ``chunk_size`` at a time (:meth:`iter_draws`; never more than
        :data:`DRAW_CHUNK_BYTES` of draws per chunk, fewer draws when they are larger), so a lazily
        read posterior larger than memory is evaluated chunk by chunk: memory is one chunk of draws
        plus the (M, N, ...) outputs.

        Engines (``engine``): ``"batched"``, one batched matmul per layer over the draws
        (:func:`~pib_bayes.batched.batched_forward`; MLPs only); ``"vmap"``,
        ``torch.func.vmap`` of ``functional_call`` over ``chunk_size`` draws at a time;
        ``"loop"``, one forward pass per draw (runs any model that runs on x): the module's own
        parameter and buffer tensors are pointed at the draw's values (``Tensor.data``, no copy) for
        the call and given back their storage afterwards, which yields ``functional_call``'s outputs
        at less cost per call; do not run the same module from another thread meanwhile.
        ``"auto"`` (default): ``batched`` when it applies; otherwise, on CPU, the loop and vmap
        are each timed (process CPU time) twice on a few draws, interleaved (those outputs are
        kept), and the faster one runs the rest, a choice remembered per model and input shape
        (vmap wins on small inputs and small layers, the loop on convolutions over large
        batches); fewer than 6 draws take the loop, other devices vmap. An engine that raises on
        its first chunk (e.g. no batching rule for ``aten::lstm``) falls back to the loop. The
        engine used and why are in :attr:`last_engine` / :attr:`last_engine_reason`. Every engine
        gives the loop's outputs to float rounding.

        Chains flagged as diverged are left out (with a warning) unless ``include_diverged``.
        Parameters without draws (a run with ``keep=``) take the module's current values.

        Raises ``ValueError`` naming the model class, the failing op's error and x's shape and
        dtype when even the loop cannot run the model on ``x``.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> from pib_bayes import Posterior
            >>> class LastState(nn.Module):  # a GRU classifier: no vmap batching rule for aten::gru
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.rnn = nn.GRU(2, 3, batch_first=True)
            ...     def forward(self, x):
            ...         return self.rnn(x)[0][:, -1]
            >>> net = LastState()
            >>> draws = {n: p.detach() + 0.1 * torch.randn(2, 3, *p.shape) for n, p in net.named_parameters()}
            >>> post = Posterior(draws, {}, {"task": "regression"}, model=net)
            >>> post.outputs(torch.randn(5, 6, 2)).shape
            torch.Size([6, 5, 3])
            >>> post.last_engine
            'loop'
        """
        model = self._model_for(model)
        return self._run_over_draws(model, self.kept_chains(include_diverged), x, chunk_size, engine, "x")

    def _window(self, chains: list[int], start: int, stop: int) -> dict[str, Tensor]:
        """name -> (stop - start, *shape): draws [start, stop) of the chain-major sequence of the draws of
        ``chains``, read by :meth:`iter_draws`' chunk reader (one read per chain the window touches; a view of
        plain tensors within one chain)."""
        n, parts, pos, names = self.num_draws, [], start, self.param_names
        while pos < stop:
            ci, d0 = divmod(pos, n)
            d1 = min(n, d0 + stop - pos)
            _, _, block = next(self._walk(names, [chains[ci]], d0, d1, d1 - d0, check=self.lazy))
            parts.append({k: v.reshape(-1, *v.shape[2:]) for k, v in block.items()})
            pos += d1 - d0
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _run_over_draws(self, model: nn.Module, chains: Sequence[int], x: Tensor,
                        chunk_size: int | None, engine: str, name: str,
                        finish: Callable[[Tensor, Tensor], None] | None = None,
                        dest_shape: Callable[[torch.Size], tuple[int, ...]] | None = None) -> Tensor:
        """f(x; w_m) for the M draws of ``chains`` (chain-major) into one (M, N, ...) buffer, the draws
        read a chunk at a time through :meth:`iter_draws`; ``finish(out, dest)`` writes a chunk's outputs
        (default: a copy). ``name`` is the argument x came from, for the error messages."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"{name}: holds no inputs (shape {tuple(x.shape)}); pass at least one row "
                             "(predictions over an empty batch are not defined)")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: x contains NaN or Inf values")
        if chunk_size is not None and (not is_int(chunk_size) or chunk_size < 1):
            raise ValueError(f"chunk_size: must be an int >= 1 or None (automatic), got {chunk_size!r}")
        if engine not in ENGINES:
            raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
        finish = finish or (lambda out, dest: dest.copy_(out))
        chains = list(chains)
        m = len(chains) * self.num_draws
        shapes = self.param_shapes
        fixed = self.fixed
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(shapes) - set(fixed))
        if missing:
            warnings.warn(f"predict: no draws of {missing} (sampled with keep=?); the module's current "
                          "values are used for them", stacklevel=3)
        all_params = {n for n, _ in model.named_parameters()} == set(shapes)
        fast = batched_forward(model) if all_params and not fixed else None
        if engine == "batched" and fast is None:
            raise ValueError("engine: 'batched' needs an nn.Sequential MLP whose every parameter has draws "
                             "(pib_bayes.batched.batched_forward); use 'auto', 'vmap' or 'loop'")
        if chunk_size is None:
            meta = {k: torch.empty((1, *s), device="meta") for k, s in shapes.items()}
            chunk_size = _auto_chunk(meta, x) if fast is not None else 64
        # never more than one chunk of draws (DRAW_CHUNK_BYTES) in memory at once
        per_draw = sum(math.prod(s) * itemsize(self._dtype(k)) for k, s in shapes.items())
        chunk_size = min(chunk_size, max(1, DRAW_CHUNK_BYTES // max(1, per_draw)))
        per_draw: list[Tensor] = []  # one output buffer, made at the first output: no concatenation copy

        def write(start: int, out: Tensor) -> None:
            if not per_draw:
                shape = tuple(out.shape[1:]) if dest_shape is None else dest_shape(out.shape[1:])
                check_memory(name, float(m) * math.prod(shape) * out.element_size() * 2,
                             f"the outputs of {m} draws at {x.shape[0]} inputs ({shape} per draw, plus "
                             "their mean and variance)", "predict on fewer inputs at a time (split x)")
                per_draw.append(out.new_empty((m, *shape)))
            finish(out, per_draw[0][start:start + out.shape[0]])

        def chunk(start: int, stop: int) -> dict[str, Tensor]:
            return self._window(chains, start, stop)

        vmapped = vmap(lambda q: functional_call(model, {**fixed, **q}, (x,)))

        slots = _tensor_slots(model, [*shapes, *fixed])

        def run(kind: str, start: int, stop: int) -> None:
            if kind == "loop":  # a window of chunk_size draws at a time, one forward pass per draw
                for lo in range(start, stop, chunk_size):
                    loop(lo, min(stop, lo + chunk_size))
            elif kind == "batched":
                assert fast is not None
                write(start, fast(chunk(start, stop), x=x, stacked=False))
            else:
                with warnings.catch_warnings():  # vmap's per-sample fallback for an op: the timing decides
                    warnings.filterwarnings("ignore", message="There is a performance drop because")
                    write(start, vmapped(chunk(start, stop)))

        def loop(start: int, stop: int) -> None:
            draws = chunk(start, stop)
            if slots is None:
                for i in range(start, stop):
                    write(i, functional_call(model, {**fixed, **{k: v[i - start] for k, v in draws.items()}},
                                             (x,)).unsqueeze(0))
            else:
                assert slots is not None
                # the module's own tensors point at draw i's values (set_data, no copy), the plain forward
                # runs, and every tensor gets its own storage back: functional_call's outputs, without its
                # per-call reparametrisation (1.1-1.8x faster on the zoo models)
                own = {k: t.data for k, t in slots.items()}
                try:
                    for k, v in fixed.items():
                        slots[k].data = v
                    for i in range(start, stop):
                        for k, v in draws.items():
                            slots[k].data = v[i - start]
                        write(i, model(x).unsqueeze(0))
                finally:
                    for k, t in slots.items():
                        t.data = own[k]

        def try_run(kind: str, start: int, stop: int) -> str | None:
            """Run ``kind`` on draws [start, stop); the reason it cannot run, or None."""
            try:
                run(kind, start, stop)
            except _OOM:
                raise
            except Exception as err:  # noqa: BLE001 - no batching rule, data-dependent control flow, ...
                return f"{kind} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            return None

        key = (id(model), type(model).__name__, tuple(x.shape), x.dtype, str(x.device), chunk_size)
        modes = [(mod, mod.training) for mod in model.modules()]
        model.eval()
        try:
            done, kind, reason = 0, engine, "requested"
            if engine == "auto":
                if fast is not None:
                    kind, reason = "batched", "an MLP: one batched matmul per layer (pib_bayes.batched)"
                elif key in self._engine_cache:
                    kind, reason = self._engine_cache[key]
                elif m < 6:
                    kind, reason = "loop", "fewer than 6 draws"
                elif x.device.type != "cpu":
                    kind, reason = "vmap", f"on {x.device.type}: vmap (asynchronous kernels, not timed)"
                else:
                    # one draw through each engine untimed (first-call costs; the loop's also checks that
                    # the model runs on x at all), then each timed twice on k draws, interleaved, the
                    # faster of its two times kept (a preempted block does not decide)
                    k = max(1, min(chunk_size, 8, (m - 2) // 4))
                    self._loop_or_fail(model, x, name, lambda: run("loop", 0, 1))
                    failed = try_run("vmap", 1, 2)
                    done = 1 if failed else 2
                    t_loop = t_vmap = math.inf
                    for _ in range(2):
                        if failed:
                            break
                        t0 = time.process_time()
                        run("loop", done, done + k)
                        t_loop = min(t_loop, time.process_time() - t0)
                        t0 = time.process_time()
                        failed = try_run("vmap", done + k, done + 2 * k)
                        t_vmap = min(t_vmap, time.process_time() - t0)
                        done += k if failed else 2 * k
                    t_loop, t_vmap = max(t_loop, 1e-9), max(t_vmap, 1e-9)
                    if failed:
                        kind, reason = "loop", f"fallback ({failed})"
                    elif t_vmap < t_loop:
                        kind, reason = "vmap", f"timed: vmap {t_loop / t_vmap:.2f}x the loop on {k} draws"
                    else:
                        kind, reason = "loop", f"timed: the loop {t_vmap / t_loop:.2f}x vmap on {k} draws"
                    self._engine_cache[key] = (kind, reason)
            if kind != "loop" and done < m:
                stop = min(m, done + chunk_size)
                failed = try_run(kind, done, stop)
                if failed is not None:
                    if engine != "auto":
                        # x itself may be what is wrong: then say so (the loop cannot run it either)
                        self._loop_or_fail(model, x, name, lambda: run("loop", 0, 1))
                        raise ValueError(f"engine: {engine!r} cannot run the model "
                                         f"({type(model).__name__}) on x of shape {tuple(x.shape)} "
                                         f"({failed}); use engine='auto' or 'loop'")
                    kind, reason = "loop", f"fallback ({failed})"
                    self._engine_cache[key] = (kind, reason)
                else:
                    done = stop
            if kind == "loop" and done == 0 and m:
                self._loop_or_fail(model, x, name, lambda: run("loop", 0, 1))
                done = 1
            for start in range(done, m, chunk_size if kind != "loop" else m):
                run(kind, start, min(m, start + chunk_size) if kind != "loop" else m)
        finally:
            for mod, training in modes:  # every module back in its own mode
                mod.training = training
        self.last_engine, self.last_engine_reason = kind, reason
        assert per_draw
        return per_draw[0]

    @staticmethod
    def _loop_or_fail(model: nn.Module, x: Tensor, name: str, first: Callable[[], None]) -> None:
        """Run the loop's first draw; if the model cannot run on x even so, one error saying so."""
        try:
            first()
        except _OOM:
            raise
        except Exception as err:  # noqa: BLE001 - any failure of a plain forward pass
            msg = str(err).splitlines()[0] if str(err) else ""
            raise ValueError(f"{name}: the model cannot be evaluated on x of shape {tuple(x.shape)} and "
                             f"dtype {x.dtype}, not even one draw at a time ({type(model).__name__} raised "
                             f"{type(err).__name__}: {msg}); pass inputs of the shape and dtype the model "
                             "was sampled with") from err

    # ------------------------------------------------------------- predict
    @torch.no_grad()
    def predict(self, x: Tensor, *, chunk_size: int | None = None, include_diverged: bool = False,
                model: nn.Module | None = None, engine: str = "auto") -> Prediction:
        """Posterior predictive at inputs ``x`` over every kept draw.

        The model runs over the draws through :meth:`outputs` (engine choice, fallback and
        ``chunk_size`` described there; :attr:`last_engine` records the engine used). For an
        MLP, ``chunk_size=None`` (default) means 64 draws, fewer when the activations would pass
        ~1 MB per layer (larger ones are fresh pages on every call, and stream through memory
        instead of cache; 1.7x the loop on MLP 20-64-64-10 at 256 inputs with 64 draws per chunk,
        2.7x with 16). Chains flagged as diverged are left out (with a warning) unless
        ``include_diverged``.

        A chain whose draws contain NaN/Inf is flagged as diverged when the Posterior is built. An
        empty ``x`` (no rows) is a ``ValueError``, as are predictions whose (draws x inputs x
        outputs) buffer would exceed the available memory (checked before it is allocated).

        Classification: p(y|x,S) ≈ (1/M) sum_m softmax(f(x; w_m)) (SPEC §4). Parameters without
        draws (a run with ``keep=``) take the module's current values, with a warning.
        """
        if self.task is None:
            raise ValueError("task: this Posterior does not say whether it is classification or regression; "
                             "build it with task='classification' or task='regression' (predict would "
                             "otherwise have to guess whether to apply a softmax)")
        model = self._model_for(model)
        likelihood = self.metadata.get("likelihood")
        chains = self.kept_chains(include_diverged)
        finish = (_bernoulli_into if likelihood == "bernoulli"
                  else _softmax_into if self.task == "classification" else None)
        per_draw = self._run_over_draws(model, chains, x, chunk_size, engine, "x", finish,
                                        dest_shape=lambda shape: _probs_shape(shape, likelihood))
        mean = per_draw.mean(0)
        if self.task == "classification":
            return Prediction("classification", mean, per_draw)
        if likelihood == "heteroscedastic_gaussian":
            return heteroscedastic_prediction(per_draw)
        var = per_draw.var(0, unbiased=False)
        noise_std = self.metadata.get("noise_std")
        aleatoric = torch.full_like(var, float(noise_std) ** 2) if noise_std is not None else None
        return Prediction("regression", mean, per_draw, var, aleatoric)

    # ---------------------------------------------------------- own loop
    @classmethod
    def from_draws(cls, model: nn.Module, draws: Any, *, task: str | None = None, loss: Any = None,
                   params: Any = None, num_warmup: int = 0, thin: int = 1,
                   sample_stats: Mapping[str, Tensor] | None = None,
                   metadata: Mapping[str, Any] | None = None) -> Posterior:
        """A Posterior from weights your own loop produced (e.g. with :class:`~pib_bayes.optim.SGLD`).

        ``draws`` is one of: a mapping name -> tensor ``(chains, draws, *shape)`` or
        ``(draws, *shape)`` (one chain); a list of state dicts (one chain, in order); a list of
        such lists (one per chain, equally long). State-dict entries that are buffers are left
        out (the module's current buffers are used), as are parameters ``params`` does not select
        (:func:`~pib_bayes.subnet.select_params`; default: every parameter present). Parameters
        without draws are held at the module's current values. Per chain the first ``num_warmup``
        draws are dropped, then every ``thin``-th kept: draw k of the result is input draw
        ``num_warmup + k * thin``.

        The task is ``task``, or implied by ``loss`` (a built-in loss or string as in
        :func:`~pib_bayes.sample`; it also sets the observation noise of a
        :class:`~pib_bayes.GaussianLoss` and the predictive of a heteroscedastic or Bernoulli
        one); with neither, a ``ValueError`` asks for one. ``loss`` may also be the
        :class:`~pib_bayes.Energy` the loop used: its loss, task, beta and prior are recorded.
        ``sample_stats``: optional name -> ``(chains, draws)`` or ``(draws,)`` tensors, thinned
        alike.

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 1)
        >>> trail = [{k: v.detach().clone() + i for k, v in net.state_dict().items()} for i in range(10)]
        >>> post = Posterior.from_draws(net, trail, loss="gaussian", num_warmup=4, thin=2)
        >>> post.draws["weight"].shape, post.task
        (torch.Size([1, 3, 1, 2]), 'regression')
        """
        from .energy import Energy, loss_likelihood, require_task, resolve_loss

        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        check_count("num_warmup", num_warmup, 0)
        check_count("thin", thin, 1)
        loss_fn, energy = None, None
        if isinstance(loss, Energy):
            energy, loss = loss, loss.loss_fn
            if task is not None and energy.task is not None and task != energy.task:
                raise ValueError(f"task: {task!r} contradicts the energy's task {energy.task!r}")
            task = task or energy.task
        if loss is not None:
            loss_fn, task = resolve_loss(loss, task)
        if task is None:
            if loss is not None:
                require_task(task, loss_fn)
            raise ValueError("task: pass task='classification' or task='regression', or loss= a built-in "
                             "loss that implies it (e.g. 'cross_entropy', pib_bayes.GaussianLoss(noise_std))")
        require_task(task, loss_fn)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        buffers = {n for n, _ in model.named_buffers()}
        stacked = _stack_draws(draws, shapes, buffers)
        if params is not None:
            from .subnet import select_params

            chosen = select_params(model, params)
            missing = [n for n in chosen if n not in stacked]
            if missing:
                raise ValueError(f"params: {missing} are selected but have no draws")
            stacked = {n: stacked[n] for n in chosen}
        c, total = next(iter(stacked.values())).shape[:2]
        if num_warmup >= total:
            raise ValueError(f"num_warmup: {num_warmup} drops every one of the {total} draws per chain")
        keep = slice(num_warmup, None, thin)
        out = {n: v[:, keep].clone() for n, v in stacked.items()}
        stats = {}
        for name, v in (sample_stats or {}).items():
            if not isinstance(v, Tensor):
                raise TypeError(f"sample_stats: {name!r} must be a tensor, got {type(v).__name__}")
            v = v.unsqueeze(0) if v.dim() == 1 else v
            if tuple(v.shape[:2]) != (c, total):
                raise ValueError(f"sample_stats: {name!r} has shape {tuple(v.shape)}, the draws "
                                 f"(chains, draws) = {(c, total)}")
            stats[name] = v[:, keep].clone()
        fixed = {n: b.detach().clone() for n, b in model.named_buffers()}
        fixed.update({n: p.detach().clone() for n, p in model.named_parameters() if n not in out})
        meta: dict[str, Any] = {
            "library": "pib_bayes", "sampler": "own loop", "source": "Posterior.from_draws",
            "num_chains": int(c), "num_draws": int(out[next(iter(out))].shape[1]), "num_warmup": num_warmup,
            "thin": thin, "loss": None if loss_fn is None else repr(loss_fn),
            "likelihood": loss_likelihood(loss_fn), "noise_std": getattr(loss_fn, "noise_std", None),
            "sampled_params": list(out), "kept_params": list(out),
        }
        if energy is not None:
            meta.update(beta=energy.beta, prior=repr(energy.prior))
        meta.update(metadata or {})
        return cls(out, stats, meta, fixed, model=model, task=task)

    # -------------------------------------------------------------- arviz
    def to_arviz(self, *args: Any, **kwargs: Any):
        """ArviZ export; see :func:`pib_bayes.diagnostics.to_arviz`."""
        from .diagnostics import to_arviz

        return to_arviz(self, *args, **kwargs)

    # ------------------------------------------------------------ save/load
    def save(self, path: str | os.PathLike) -> None:
        """Write the posterior to ``path`` as a netCDF4/HDF5 file, atomically (layout, integrity
        checks and dtype rules in :mod:`pib_bayes.store`; docs/files.md).

        Saved: draws (group ``posterior``, dims chain, draw, ``<param>_dim_0``, ...), sample
        statistics (``sample_stats``), fixed tensors (``fixed``), divergence flags
        (``divergences``), metadata (JSON attribute). ArviZ and xarray open the file without
        pib_bayes: ``arviz.from_netcdf(path)``, ``xarray.open_dataset(path, group="posterior",
        engine="h5netcdf")``. Not saved: the model itself (pass it to :meth:`load`). The write holds
        :func:`~pib_bayes.io.exclusive_lock` on ``path``: a concurrent second writer gets
        :class:`~pib_bayes.io.LockedError`.

        >>> import tempfile, os, torch
        >>> post = Posterior({"w": torch.randn(2, 3, 4)}, {}, {"task": "regression"})
        >>> path = os.path.join(tempfile.mkdtemp(), "post.nc")
        >>> post.save(path)
        >>> torch.equal(Posterior.load(path).draws["w"], post.draws["w"])
        True
        """
        from .store import LazyDraws, write_store

        # a lazily loaded posterior is copied chunk by chunk, never a whole variable in memory
        draws = ({n: self.draws.source(n) for n in self.draws} if isinstance(self.draws, LazyDraws)
                 else dict(self.draws))
        groups = {
            "posterior": draws, "sample_stats": dict(self.sample_stats), "fixed": dict(self.fixed),
            "divergences": {"diverged": self.diverged, "divergence_step": self.divergence_step},
        }
        metadata = self.metadata if self.task is None else {**self.metadata, "task": self.task}
        metadata = json.loads(json.dumps(metadata, default=str))
        with exclusive_lock(path, "path"):
            write_store(path, "posterior", FORMAT_VERSION, groups, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None, *,
             lazy: bool = False) -> Posterior:
        """Read a file written by :meth:`save` (or streamed by ``sample(store=...)``).

        ``lazy=True``: ``draws`` is a :class:`~pib_bayes.store.LazyDraws` over the file, read chunk
        by chunk on demand (``draws.read(name, chains, draws)``), for posteriors larger than memory;
        sample statistics, fixed tensors and divergence flags are read at once (they are small).
        ``draws[name]`` gives the same tensor either way. (A file of format version 1 loads
        eagerly.)

        A corrupt (a flipped byte in any chunk or header), truncated or foreign file, or another
        format version, raises one ``FormatError`` naming the file (and, for a data chunk, the
        variable and the chunk). No pickle is involved: only numeric arrays and JSON are read.
        Files of the format before version 2 (starting ``PIBBAYES``) still load, read-only, with a
        ``DeprecationWarning``; :meth:`save` rewrites them in the current format."""
        from .io import MAGIC
        from .store import read_store

        path = os.fspath(path)
        lazy = check_bool("lazy", lazy)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no file at {path!r}")
        with open(path, "rb") as fh:
            legacy = fh.read(len(MAGIC)) == MAGIC
        if legacy:
            warnings.warn(f"{path}: a posterior file of the pib_bayes format version 1 (torch payload); "
                          "it is read-only and its support will be removed: load it and save() it again to "
                          "rewrite it as netCDF", DeprecationWarning, stacklevel=2)
            payload = load_payload(path, "posterior", (LEGACY_FORMAT_VERSION,))
            try:
                parts = {"draws": dict(payload["draws"]), "sample_stats": dict(payload["sample_stats"]),
                         "metadata": json.loads(payload["metadata_json"]), "fixed": dict(payload["fixed"]),
                         "diverged": payload["diverged"], "divergence_step": payload["divergence_step"]}
            except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as err:
                raise FormatError(f"{path}: incomplete posterior payload ({err})") from None
        else:
            groups, metadata = read_store(path, "posterior", READABLE_VERSIONS,
                                          lazy=("posterior",) if lazy else ())
            div = groups["divergences"]
            parts = {"draws": groups["posterior"], "sample_stats": groups["sample_stats"],
                     "metadata": metadata, "fixed": groups["fixed"], "diverged": div.get("diverged"),
                     "divergence_step": div.get("divergence_step")}
        try:
            post = cls(model=model, **parts)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as err:
            raise FormatError(f"{path}: incomplete posterior payload ({err})") from None
        if model is not None:
            post.check_model(model)
        return post

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless every draw matches a parameter of ``model`` in shape."""
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        for name, own in self.param_shapes.items():
            if name not in shapes:
                raise ValueError(f"model: has no parameter {name!r} that the posterior holds")
            if own != shapes[name]:
                raise ValueError(f"model: {name!r} has shape {shapes[name]}, the draws {own}")

    def __repr__(self) -> str:
        assert self.diverged is not None
        return (f"Posterior(chains={self.num_chains}, draws={self.num_draws}, params={self.num_params:,} in "
                f"{len(self.draws)} tensors, diverged={int(self.diverged.sum())}, "
                f"beta={self.metadata.get('beta')}, sampler={self.metadata.get('sampler')!r})")


def _stack_draws(draws: Any, shapes: Mapping[str, tuple[int, ...]], buffers: set[str]) -> dict[str, Tensor]:
    """name -> (chains, draws, *shape) from the forms :meth:`Posterior.from_draws` accepts."""
    if isinstance(draws, Mapping):
        out = {}
        for name, v in draws.items():
            if name in buffers:
                continue
            if name not in shapes:
                raise ValueError(f"draws: {name!r} is not a parameter of the model; its parameters are "
                                 f"{list(shapes)}")
            if not isinstance(v, Tensor):
                raise TypeError(f"draws: {name!r} must be a tensor, got {type(v).__name__}")
            if tuple(v.shape[1:]) == shapes[name]:
                v = v.unsqueeze(0)
            elif tuple(v.shape[2:]) != shapes[name]:
                raise ValueError(f"draws: {name!r} has shape {tuple(v.shape)}; expected (chains, draws, "
                                 f"*{shapes[name]}) or (draws, *{shapes[name]})")
            out[name] = v.detach()
        if not out:
            raise ValueError("draws: holds no parameter of the model")
        if len({tuple(v.shape[:2]) for v in out.values()}) != 1:
            raise ValueError("draws: every parameter needs the same number of chains and draws, got "
                             f"{ {n: tuple(v.shape[:2]) for n, v in out.items()} }")
        return out
    if not isinstance(draws, Sequence) or isinstance(draws, (str, bytes)) or not draws:
        raise TypeError("draws: expected a mapping name -> tensor, a non-empty list of state dicts (one "
                        f"chain) or a list of such lists (one per chain), got {type(draws).__name__}")
    chains = [draws] if isinstance(draws[0], Mapping) else list(draws)
    lengths = []
    for ci, chain in enumerate(chains):
        if (not isinstance(chain, Sequence) or isinstance(chain, (str, bytes)) or not chain
                or not all(isinstance(d, Mapping) for d in chain)):
            raise TypeError(f"draws: chain {ci} must be a non-empty list of state dicts (name -> tensor)")
        lengths.append(len(chain))
    if len(set(lengths)) != 1:
        raise ValueError(f"draws: the chains hold different numbers of draws {lengths}; pass equally many "
                         "per chain (trim the longer ones)")
    names = [n for n in chains[0][0] if n not in buffers]
    out = {}
    for name in names:
        if name not in shapes:
            raise ValueError(f"draws: {name!r} is not a parameter of the model; its parameters are "
                             f"{list(shapes)}")
        rows = []
        for ci, chain in enumerate(chains):
            try:
                tensors = [d[name] for d in chain]
            except KeyError:
                raise ValueError(f"draws: a state dict of chain {ci} lacks {name!r}; every draw needs the "
                                 "same entries") from None
            if len({t.data_ptr() for t in tensors}) < len(tensors) and len(tensors) > 1:
                raise ValueError(f"draws: several draws of chain {ci} share the memory of {name!r} "
                                 "(model.state_dict() returns the live weights, not a copy); store copies, "
                                 "{k: v.detach().clone() for k, v in model.state_dict().items()}, or use "
                                 "pib_bayes.DrawCollector")
            for t in tensors:
                if not isinstance(t, Tensor) or tuple(t.shape) != shapes[name]:
                    raise ValueError(f"draws: {name!r} must be tensors of shape {shapes[name]}, got "
                                     f"{tuple(getattr(t, 'shape', ()))}")
            rows.append(torch.stack([t.detach() for t in tensors]))
        out[name] = torch.stack(rows)
    if not out:
        raise ValueError("draws: the state dicts hold no parameter of the model")
    return out


class DrawCollector:
    """Collects draws from your own sampling loop, with warm-up and thinning per chain.

    Call :meth:`add` after each step (``chain=`` for several chains); it stores a copy of the
    selected parameters (default: the trainable ones) at calls ``num_warmup + k * thin``
    (k = 0, 1, ...) of that chain, then :meth:`posterior` builds the
    :class:`~pib_bayes.Posterior` through :meth:`Posterior.from_draws`.

    >>> import torch
    >>> from torch import nn
    >>> from pib_bayes import Energy
    >>> from pib_bayes.optim import SGLD
    >>> net = nn.Linear(2, 1)
    >>> energy = Energy(net, "gaussian", prior=1.0, beta=0.1)
    >>> opt = SGLD(net.parameters(), lr=1e-3, generator=torch.Generator().manual_seed(0))
    >>> x, y = torch.randn(16, 2), torch.randn(16, 1)
    >>> collector = DrawCollector(net, num_warmup=10, thin=2)
    >>> for _ in range(30):
    ...     opt.zero_grad()
    ...     energy.of_module(x, y).backward()
    ...     opt.step()
    ...     _ = collector.add(net)
    >>> post = collector.posterior(loss=energy.loss_fn)
    >>> post.num_draws, post.task
    (10, 'regression')
    """

    def __init__(self, model: nn.Module, *, params: Any = None, num_warmup: int = 0, thin: int = 1) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        check_count("num_warmup", num_warmup, 0)
        check_count("thin", thin, 1)
        if params is None:
            self.names = [n for n, p in model.named_parameters() if p.requires_grad]
            if not self.names:
                raise ValueError("model: has no trainable parameters to collect; pass params=")
        else:
            from .subnet import select_params

            self.names = select_params(model, params)
        self.model, self.num_warmup, self.thin = model, num_warmup, thin
        self._calls: dict[int, int] = {}
        self._draws: dict[int, list[dict[str, Tensor]]] = {}
        self._stats: dict[int, list[dict[str, float]]] = {}

    def add(self, model: nn.Module | None = None, *, chain: int = 0, **stats: float) -> bool:
        """Count one step of ``chain``; store the weights (and scalar ``stats``) if this step is kept.

        Returns whether it was stored."""
        model = self.model if model is None else model
        check_count("chain", chain, 0)
        calls = self._calls.get(chain, 0)
        self._calls[chain] = calls + 1
        if calls < self.num_warmup or (calls - self.num_warmup) % self.thin:
            return False
        current = dict(model.named_parameters())
        missing = [n for n in self.names if n not in current]
        if missing:
            raise ValueError(f"model: lacks the collected parameters {missing}")
        self._draws.setdefault(chain, []).append({n: current[n].detach().clone() for n in self.names})
        self._stats.setdefault(chain, []).append({k: float(v) for k, v in stats.items()})
        return True

    def posterior(self, *, task: str | None = None, loss: Any = None,
                  metadata: Mapping[str, Any] | None = None) -> Posterior:
        """The collected draws as a :class:`Posterior` (chains in increasing index order)."""
        if not self._draws:
            raise ValueError(f"collector: no draw stored yet ({sum(self._calls.values())} steps added, "
                             f"num_warmup={self.num_warmup})")
        chains = sorted(self._draws)
        if chains != list(range(len(chains))):
            raise ValueError(f"collector: chains {chains} hold draws; number the chains 0, 1, ... without "
                             "gaps")
        lengths = [len(self._draws[c]) for c in chains]
        n = min(lengths)
        if len(set(lengths)) != 1:
            raise ValueError(f"collector: the chains hold different numbers of draws {lengths}; run them "
                             "equally long")
        keys = sorted({k for c in chains for s in self._stats[c] for k in s})
        stats = {k: torch.tensor([[s.get(k, float("nan")) for s in self._stats[c][:n]] for c in chains],
                                 dtype=torch.float64) for k in keys}
        meta = {"num_warmup": self.num_warmup, "thin": self.thin, "source": "DrawCollector",
                **(metadata or {})}
        return Posterior.from_draws(self.model, [self._draws[c] for c in chains], task=task, loss=loss,
                                    sample_stats=stats, metadata=meta)
