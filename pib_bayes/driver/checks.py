"""Input checks of :func:`pib_bayes.sample` made before any chain runs."""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .._validate import PrecisionWarning, check_memory, format_bytes, itemsize
from ..energy import Energy, loss_likelihood
from ..prior import GaussianPrior, Prior
from ..samplers.schedules import Schedule
from .chains import StatFn, _generator, _sampling_mode


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: must be an int >= {minimum}, got {value!r}")
    return int(value)



def _check_model_storage(model: nn.Module) -> None:
    """A module whose tensors have no storage (the meta device) cannot be sampled."""
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise ValueError(f"model: {n!r} is on the meta device (no values); materialise the module first, "
                             "e.g. model.to_empty(device='cpu') and load its weights")


def _check_threshold(value: object) -> float:
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or math.isnan(float(value)) or not float(value) > 1:
        raise ValueError(f"divergence_threshold: expected a number > 1 (a ratio to the initial energy) or "
                         f"None to flag only non-finite energies, got {value!r}")
    return float(value)


def _check_chain_ids(chain_ids: object, total: int) -> None:
    if isinstance(chain_ids, (str, bytes)) or not isinstance(chain_ids, (Sequence, np.ndarray, range)):
        raise TypeError(f"chain_ids: expected a sequence of chain indices, got {type(chain_ids).__name__}")
    bad = [c for c in chain_ids if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer))]
    if bad:
        raise TypeError(f"chain_ids: chain indices must be ints, got {bad[:3]!r}")
    ids = [int(c) for c in chain_ids]
    if not ids or len(set(ids)) != len(ids) or not all(0 <= c < total for c in ids):
        raise ValueError(f"chain_ids: must be distinct indices in [0, {total}), got {chain_ids!r}")


def _check_run_memory(named: list[tuple[str, Tensor]], keep_names: list[str], num_chains: int,
                      num_draws: int) -> None:
    """Refuse, before allocating, a run whose buffers would not fit in the available memory.

    Estimate: the stored draws C x N x D_kept plus the per-draw statistics C x N x (2 values + a float64
    step size + a bool), and about 6 copies of the C x D chain state (initial weights, chain weights,
    gradients, sampler state, noise, the vectorization probe)."""
    item = itemsize(named[0][1].dtype)
    d = sum(p.numel() for _, p in named)
    d_kept = sum(p.numel() for n, p in named if n in keep_names)
    draws = float(num_chains) * num_draws * (d_kept * item + 2 * item + 9)
    state = 6.0 * num_chains * d * item
    if draws >= state:
        check_memory("num_draws", draws + state,
                     f"storing {num_chains} chain(s) x {num_draws} draws of {d_kept:,} kept weights",
                     "store fewer draws (num_draws, thin), fewer parameters (keep=[...]) or fewer chains "
                     "per call (chain_ids)")
    else:
        check_memory("num_chains", draws + state, f"the state of {num_chains} chain(s) of {d:,} weights",
                     "run fewer chains per call (chain_ids, or sequential calls)")


def _stored_bytes(shape: tuple[int, ...], item: int, lead: int) -> int:
    """Bytes of one variable in a posterior file: its chunks, stored whole (an edge chunk padded)."""
    from ..store import _chunks

    if not math.prod(shape):
        return 0
    chunk = _chunks(shape, item, lead)
    return math.prod(math.ceil(a / c) for a, c in zip(shape, chunk, strict=True)) * math.prod(chunk) * item


def _dir_bytes(path: str) -> int:
    """Bytes of the files directly in ``path`` (0 if it does not exist)."""
    try:
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file(follow_symlinks=False))
    except OSError:
        return 0


def _existing_folder(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):  # missing folders are created when the run writes (check_path)
        folder = os.path.dirname(folder)
    return folder


# sample_distributed on dst: the store it writes after sampling from every rank's draws (its path and
# number of chains), which the disk check of dst's own sample() call counts too
_GATHERED_STORE: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "pib_bayes_gathered_store", default=None)


@contextlib.contextmanager
def gathered_store(path: str, num_chains: int) -> Iterator[None]:
    """Within the block, :func:`sample`'s disk check also counts a store of ``num_chains`` chains at
    ``path`` (the one :func:`~pib_bayes.distributed.sample_distributed` gathers on ``dst``)."""
    token = _GATHERED_STORE.set((path, num_chains))
    try:
        yield
    finally:
        _GATHERED_STORE.reset(token)


def _check_run_disk(store: str | None, checkpoint: str | None, named: list[tuple[str, Tensor]],
                    keep_names: list[str], num_chains: int, num_draws: int, num_stats: int,
                    fixed_bytes: int) -> None:
    """Refuse, before sampling, a run whose files would not fit on their disks
    (``shutil.disk_usage(folder).free``, per file system).

    A run with ``store=`` or ``checkpoint=`` writes every kept draw to disk as segment files in
    ``.NAME.segments/`` (beside the checkpoint, else the store): C x N x (D_kept + the statistics)
    values. With ``store=`` the store is then written from them, chunk by chunk, while they still
    exist: the same draws again, each variable in whole chunks (an edge chunk padded), plus the
    fixed tensors. With ``checkpoint=`` each checkpoint also replaces a payload of about four copies
    of the C x D chain state (old and new file both exist for a moment). The segments already in
    the folder (a resumed run keeps them, a fresh one deletes them) count as space available. On
    ``sample_distributed``'s ``dst`` (:func:`gathered_store`) the gathered store counts too."""
    if store is None and checkpoint is None:
        return
    item = itemsize(named[0][1].dtype)
    d = sum(p.numel() for _, p in named)
    kept = [(num_chains, num_draws, *p.shape) for n, p in named if n in keep_names]
    stat_items = [item, item, 8, 1] + [8] * num_stats  # energy, loss, step_size, diverging, stat_fns
    per_draw = sum(math.prod(s[2:]) for s in kept) * item + sum(stat_items)
    from .stream import segments_dir

    segs = os.fspath(segments_dir(checkpoint if checkpoint is not None else store))
    needs: list[tuple[str, str, int]] = [  # (file system's folder, what, bytes)
        (_existing_folder(segs), f"its draws as segments in {segs!r}",
         max(0, num_chains * num_draws * per_draw - _dir_bytes(segs)))]

    def store_bytes(chains: int) -> int:
        return (sum(_stored_bytes((chains, *s[1:]), item, 1) for s in kept)
                + sum(_stored_bytes((chains, num_draws), i, 1) for i in stat_items)
                + fixed_bytes + 2**20)  # + HDF5 structure and the trailer (about 32 B a chunk)

    if store is not None:
        needs.append((_existing_folder(store), f"the store {store!r}", store_bytes(num_chains)))
    gathered = _GATHERED_STORE.get()
    if gathered is not None:
        needs.append((_existing_folder(gathered[0]), f"the store {gathered[0]!r} gathered from every rank",
                      store_bytes(gathered[1])))
    if checkpoint is not None:
        needs.append((_existing_folder(checkpoint), f"the checkpoint {checkpoint!r}",
                      2 * 4 * num_chains * d * item))
    by_disk: dict[int, list[tuple[str, str, int]]] = {}
    for folder, what, n in needs:
        by_disk.setdefault(os.stat(folder).st_dev, []).append((folder, what, n))
    name = "store" if store is not None else "checkpoint"
    for parts in by_disk.values():
        total = sum(n for _, _, n in parts)
        free = shutil.disk_usage(parts[0][0]).free
        if total > free:
            what = " and ".join(f"{w} ({format_bytes(n)})" for _, w, n in parts)
            raise ValueError(
                f"{name}: the run would write about {format_bytes(total)} ({total:,} bytes) to the disk of "
                f"{parts[0][0]!r} ({what}) but only {format_bytes(free)} ({free:,} bytes) is free there; "
                f"free space, put {name}= on a larger disk, or store fewer draws (num_draws, thin), fewer "
                "parameters (keep=[...]) or fewer chains per call (chain_ids)")


_LOW_PRECISION = {torch.float16: 10, torch.bfloat16: 7}  # explicit mantissa bits


def _warn_low_precision(named: list[tuple[str, Tensor]], schedule: Schedule) -> None:
    low = sorted({str(p.dtype) for _, p in named if p.dtype in _LOW_PRECISION})
    if not low:
        return
    h = float(schedule.step_size(0))
    ws = [p.detach().reshape(-1) for _, p in named if p.dtype in _LOW_PRECISION]
    w = torch.cat([v.float() for v in ws])
    dtype = ws[0].dtype
    # a change of one noise standard deviation sqrt(2h) that leaves the stored number as it was
    stuck = float(((w + math.sqrt(2 * h)).to(dtype).float() == w).double().mean()) if w.numel() else 0.0
    warnings.warn(
        f"model: its weights are {', '.join(low)}: a Langevin update of size h*grad U + sqrt(2h)*xi "
        f"smaller than half the spacing of {dtype} numbers at w (|w| * 2^-{_LOW_PRECISION[dtype] + 1}) "
        f"rounds away, so those coordinates never move; at step size h={h:g}, a change of one noise "
        f"standard deviation sqrt(2h) leaves {100 * stuck:.0f}% of the initial weights unchanged. "
        "Sample in float32 or float64 (model.float() / model.double()).", PrecisionWarning, stacklevel=3)


def _check_stat_fns(stat_fns: object) -> dict[str, StatFn]:
    if stat_fns is None:
        return {}
    if not isinstance(stat_fns, Mapping):
        raise TypeError(f"stat_fns: expected a mapping name -> function(params) -> scalar, got "
                        f"{type(stat_fns).__name__}")
    for key, fn in stat_fns.items():
        if not isinstance(key, str):
            raise TypeError(f"stat_fns: keys must be str names, got {key!r}")
        if key in ("energy", "loss", "step_size", "diverging"):
            raise ValueError(f"stat_fns: {key!r} is a built-in statistic; give it another name")
        if not callable(fn):
            raise TypeError(f"stat_fns: {key!r} must be a callable params -> scalar, got {type(fn).__name__}")
    return dict(stat_fns)


def _check_model_takes_data(energy: Energy, params: dict[str, Tensor], fixed: dict[str, Tensor],
                            x: Tensor, y: Tensor) -> None:
    """Run the energy once on a slice of the data so a shape/dtype/label mistake is reported as such,
    not as a raw torch error from deep inside the first step."""
    head = slice(0, min(len(x), 256))
    try:
        # as when sampling: BatchNorm must not update its statistics here
        with _sampling_mode(energy.model, False), torch.no_grad():
            out = torch.func.functional_call(energy.model, {**fixed, **params}, (x[head],))
            losses = energy.loss_fn(out, y[head])
    except (RuntimeError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"data: the model and loss cannot consume the data ({type(err).__name__}: {err}); "
                         f"check x's shape {tuple(x.shape)} and dtype {x.dtype}, and y's shape "
                         f"{tuple(y.shape)} and dtype {y.dtype}") from err
    rows = len(x[head])
    if not isinstance(losses, Tensor) or (losses.dim() != 0 and tuple(losses.shape) != (rows,)):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"loss_fn: must return one loss per example, shape ({rows},) for {rows} examples "
                         f"(reduction='none'), or a 0-d batch mean; got {shape}")
    if loss_likelihood(energy.loss_fn) == "bernoulli":
        if bool((y < 0).any()) or bool((y > 1).any()):
            raise ValueError(f"data: binary cross-entropy needs targets in [0, 1] (labels 0/1), got values "
                             f"in [{float(y.min())}, {float(y.max())}]")
    elif energy.task == "classification" and out.dim() >= 2:
        if y.is_floating_point() and y.dim() == 1:
            raise ValueError("data: classification labels must be integers (torch.long), got floats")
        if not y.is_floating_point() and (bool((y < 0).any()) or bool((y >= out.shape[-1]).any())):
            raise ValueError(f"data: class labels must lie in [0, {out.shape[-1]}) for a model with "
                             f"{out.shape[-1]} outputs, got labels in [{int(y.min())}, {int(y.max())}]")


def _initial_params(named: list[tuple[str, Tensor]], init: str | Mapping[str, Tensor], num_chains: int,
                    prior: Prior, seeds: list[tuple[int, int, int]]) -> dict[str, Tensor]:
    if isinstance(init, str):
        if init == "model":
            return {n: p.detach().unsqueeze(0).repeat(num_chains, *[1] * p.dim()) for n, p in named}
        if init == "prior":
            if not isinstance(prior, GaussianPrior):
                raise ValueError("init: 'prior' needs a GaussianPrior; pass init as tensors instead")
            current = {n: p.detach() for n, p in named}
            per_chain = [prior.sample_like(current, _generator(seeds[c][2])) for c in range(num_chains)]
            return {n: torch.stack([d[n] for d in per_chain]) for n, _ in named}
        raise ValueError(f"init: expected 'model', 'prior' or a mapping of tensors, got {init!r}")
    if not isinstance(init, Mapping):
        raise TypeError(f"init: expected 'model', 'prior' or a mapping name -> tensor, got "
                        f"{type(init).__name__} {init!r}")
    out = {}
    for n, p in named:
        if n not in init:
            raise ValueError(f"init: missing parameter {n!r}")
        v = torch.as_tensor(init[n], dtype=p.dtype)
        if tuple(v.shape) != (num_chains, *p.shape):
            raise ValueError(f"init: {n!r} must have shape {(num_chains, *p.shape)}, got {tuple(v.shape)}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"init: {n!r} contains NaN or Inf values; start the chains at finite weights")
        out[n] = v.clone()
    extra = set(init) - {n for n, _ in named}
    if extra:
        raise ValueError(f"init: unknown parameter names {sorted(extra)}")
    return out
