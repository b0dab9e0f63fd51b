"""The :class:`Posterior`: draws of the sampled weights, their statistics and metadata.

Draws are kept per parameter name with shape ``(chain, draw, *param_shape)``, exactly the
``chain``/``draw`` layout ArviZ expects (SPEC §4). Per-draw sample statistics (energy, minibatch
loss, step size, divergence flag, sampler-specific ones) have shape ``(chain, draw)``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ._validate import check_bool, check_memory
from .batched import batched_forward
from .io import FormatError, load_payload, save_payload

__all__ = ["Posterior", "Prediction", "FORMAT_VERSION"]

FORMAT_VERSION = 1


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


@dataclass
class Prediction:
    """Posterior-predictive summaries over M draws.

    Classification: ``mean`` = (1/M) sum_m softmax(f(x; w_m)) with shape (B, K), ``per_draw`` the
    (M, B, K) probabilities. Regression: ``mean`` = (1/M) sum_m f(x; w_m), ``per_draw`` the
    (M, B, ...) outputs, ``epistemic_variance`` their variance over draws, ``aleatoric_variance``
    the observation noise s^2 (when the loss was :class:`~pib_bayes.GaussianLoss`) and
    ``variance`` their sum.
    """

    task: str
    mean: Tensor
    per_draw: Tensor
    epistemic_variance: Tensor | None = None
    aleatoric_variance: Tensor | None = None

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
        draws: name -> tensor (chain, draw, *param_shape).
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
    """

    draws: dict[str, Tensor]
    sample_stats: dict[str, Tensor]
    metadata: dict[str, Any]
    fixed: dict[str, Tensor] = field(default_factory=dict)
    diverged: Tensor | None = None
    divergence_step: Tensor | None = None
    model: nn.Module | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.draws, Mapping):
            raise TypeError("draws: expected a mapping name -> tensor (chain, draw, *shape)")
        if not self.draws:
            raise ValueError("draws: a Posterior needs at least one parameter")
        for name, v in self.draws.items():
            if not isinstance(v, Tensor) or v.dim() < 2:
                raise ValueError(f"draws: {name!r} must be a tensor with (chain, draw, ...) dimensions")
        shapes = {tuple(v.shape[:2]) for v in self.draws.values()}
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
        if self.diverged is None:
            self.diverged = torch.zeros(c, dtype=torch.bool)
        if self.divergence_step is None:
            self.divergence_step = torch.full((c,), -1, dtype=torch.long)
        for name, v in (("diverged", self.diverged), ("divergence_step", self.divergence_step)):
            if not isinstance(v, Tensor) or tuple(v.shape) != (c,):
                raise ValueError(f"{name}: must be a tensor with one entry per chain ({c})")
        # a chain holding NaN/Inf draws is diverged whether or not it was flagged: predictions and
        # diagnostics must not average it in silently
        broken = torch.zeros(c, dtype=torch.bool)
        for v in self.draws.values():
            if not (v.is_floating_point() or v.is_complex()):
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
    def num_chains(self) -> int:
        return next(iter(self.draws.values())).shape[0]

    @property
    def num_draws(self) -> int:
        return next(iter(self.draws.values())).shape[1]

    @property
    def param_names(self) -> list[str]:
        return list(self.draws)

    @property
    def num_params(self) -> int:
        return sum(v[0, 0].numel() for v in self.draws.values())

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
        unknown = [n for n in names if n not in self.draws]
        if unknown:
            raise KeyError(f"names: unknown parameters {unknown}; available: {self.param_names}")
        c, n = self.num_chains, self.num_draws
        return torch.cat([self.draws[k].reshape(c, n, -1) for k in names], dim=2)

    def draws_for_prediction(self, include_diverged: bool = False) -> dict[str, Tensor]:
        """name -> (M, *shape), M = kept chains x draws (chain-major)."""
        chains = self.kept_chains(include_diverged)
        if len(chains) == self.num_chains:  # every chain kept: a view, no copy of the draws
            return {k: v.reshape(-1, *v.shape[2:]) for k, v in self.draws.items()}
        return {k: v[chains].reshape(-1, *v.shape[2:]) for k, v in self.draws.items()}

    # ------------------------------------------------------------- predict
    @torch.no_grad()
    def predict(self, x: Tensor, *, chunk_size: int | None = None, include_diverged: bool = False,
                model: nn.Module | None = None) -> Prediction:
        """Posterior predictive at inputs ``x`` over every kept draw.

        Runs ``chunk_size`` draws at a time through one batched forward pass (batched matmuls for
        an MLP, else ``torch.func.functional_call`` vmapped over the draws), so memory is bounded
        by ``chunk_size * len(x) * widest layer``. ``None`` (default): 64 draws, fewer for an MLP
        whose activations would pass ~1 MB per layer (larger ones are fresh pages on every call,
        and stream through memory instead of cache; 1.7x the loop on MLP 20-64-64-10 at 256
        inputs with 64 draws per chunk, 2.7x with 16). Chains flagged as diverged are
        left out (with a warning) unless ``include_diverged``; a chain whose draws contain NaN/Inf
        is flagged as diverged when the Posterior is built. An empty ``x`` (no rows) is a
        ``ValueError``, as are predictions whose (draws x inputs x outputs) buffer would exceed the
        available memory (checked before it is allocated).

        Classification: p(y|x,S) ≈ (1/M) sum_m softmax(f(x; w_m)) (SPEC §4). Parameters without
        draws (a run with ``keep=``) take the module's current values, with a warning.
        """
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        model = model or self.model
        if model is None:
            raise ValueError("model: this Posterior has no model attached; pass model= or "
                             "Posterior.load(..., model=)")
        if model is not self.model:
            self.check_model(model)  # a mismatched module would silently use its own weights
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"x: holds no inputs (shape {tuple(x.shape)}); pass at least one row "
                             "(predictions over an empty batch are not defined)")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError("x: contains NaN or Inf values")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size: must be an int >= 1 or None (automatic), got {chunk_size!r}")
        draws = self.draws_for_prediction(include_diverged)
        m = next(iter(draws.values())).shape[0]
        fixed = self.fixed
        was_training = model.training
        model.eval()
        try:
            # an MLP runs as one batched matmul per layer over the draws (pib_bayes.batched);
            # anything else through vmap(functional_call)
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            missing = sorted(trainable - set(draws) - set(fixed))
            if missing:
                warnings.warn(f"predict: no draws of {missing} (sampled with keep=?); the module's current "
                              "values are used for them", stacklevel=2)
            all_params = {n for n, _ in model.named_parameters()} == set(draws)
            fast = batched_forward(model) if all_params and not fixed else None

            batched = (partial(fast, x=x, stacked=False) if fast is not None
                       else vmap(lambda q: functional_call(model, {**fixed, **q}, (x,))))
            if chunk_size is None:
                chunk_size = _auto_chunk(draws, x) if fast is not None else 64

            per_draw: Tensor | None = None
            for start in range(0, m, chunk_size):
                chunk = {k: v[start:start + chunk_size] for k, v in draws.items()}
                try:
                    out = batched(chunk)
                except (RuntimeError, IndexError) as err:
                    if start:
                        raise
                    raise ValueError(f"x: the model cannot consume x of shape {tuple(x.shape)} and dtype "
                                     f"{x.dtype} ({type(err).__name__}: {err})") from err
                if per_draw is None:  # one output buffer: no concatenation copy at the end
                    check_memory("x", float(m) * out[0].numel() * out.element_size() * 2,
                                 f"the predictions of {m} draws at {x.shape[0]} inputs (output "
                                 f"{tuple(out.shape[1:])} per draw, plus their mean and variance)",
                                 "predict on fewer inputs at a time (split x)")
                    per_draw = out.new_empty((m, *out.shape[1:]))
                dest = per_draw[start:start + out.shape[0]]
                if self.task == "classification":
                    _softmax_into(out, dest)
                else:
                    dest.copy_(out)
        finally:
            model.train(was_training)
        assert per_draw is not None
        mean = per_draw.mean(0)
        if self.task == "classification":
            return Prediction("classification", mean, per_draw)
        var = per_draw.var(0, unbiased=False)
        noise_std = self.metadata.get("noise_std")
        aleatoric = torch.full_like(var, float(noise_std) ** 2) if noise_std is not None else None
        return Prediction("regression", mean, per_draw, var, aleatoric)

    @property
    def task(self) -> str:
        return self.metadata.get("task", "regression")

    # -------------------------------------------------------------- arviz
    def to_arviz(self, *args: Any, **kwargs: Any):
        """ArviZ export; see :func:`pib_bayes.diagnostics.to_arviz`."""
        from .diagnostics import to_arviz

        return to_arviz(self, *args, **kwargs)

    # ------------------------------------------------------------ save/load
    def save(self, path: str | os.PathLike) -> None:
        """Write the posterior to ``path`` (format described in :mod:`pib_bayes.io`), atomically.

        Saved: draws, sample statistics, fixed tensors, divergence flags, metadata (as JSON).
        Not saved: the model itself (pass it to :meth:`load`).
        """
        payload = {
            "draws": {k: v.contiguous() for k, v in self.draws.items()},
            "sample_stats": {k: v.contiguous() for k, v in self.sample_stats.items()},
            "fixed": {k: v.contiguous() for k, v in self.fixed.items()},
            "diverged": self.diverged,
            "divergence_step": self.divergence_step,
            "metadata_json": json.dumps(self.metadata, default=str),
        }
        save_payload(path, "posterior", FORMAT_VERSION, payload)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> Posterior:
        """Read a file written by :meth:`save`.

        A corrupt, truncated or foreign file, or another format version, raises ``FormatError``."""
        payload = load_payload(path, "posterior", (FORMAT_VERSION,))
        try:
            post = cls(
                draws=dict(payload["draws"]),
                sample_stats=dict(payload["sample_stats"]),
                metadata=json.loads(payload["metadata_json"]),
                fixed=dict(payload["fixed"]),
                diverged=payload["diverged"],
                divergence_step=payload["divergence_step"],
                model=model,
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            raise FormatError(f"{path}: incomplete posterior payload ({err})") from None
        if model is not None:
            post.check_model(model)
        return post

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless every draw matches a parameter of ``model`` in shape."""
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        for name, v in self.draws.items():
            if name not in shapes:
                raise ValueError(f"model: has no parameter {name!r} that the posterior holds")
            if tuple(v.shape[2:]) != shapes[name]:
                raise ValueError(f"model: {name!r} has shape {shapes[name]}, the draws {tuple(v.shape[2:])}")

    def __repr__(self) -> str:
        assert self.diverged is not None
        return (f"Posterior(chains={self.num_chains}, draws={self.num_draws}, params={self.num_params:,} in "
                f"{len(self.draws)} tensors, diverged={int(self.diverged.sum())}, "
                f"beta={self.metadata.get('beta')}, sampler={self.metadata.get('sampler')!r})")


