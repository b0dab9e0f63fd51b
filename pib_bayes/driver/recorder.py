"""The step loop of a chain group and the buffers its kept draws and statistics go to."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._threads import warn_if_oversubscribed
from ..data import TensorBatcher
from ..samplers.core import KernelState, step_count
from ..samplers.schedules import Schedule
from .chains import (
    _Group,
    _Sampler,
)
from .stream import _Segments


def _stat_value(key: str, value: object) -> float:
    """A stat function's result as a float; a string, a vector or None is an error naming it."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"stat_fns: {key!r} must return a scalar, got a tensor of shape "
                             f"{tuple(value.shape)}")
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iuf":
        return float(value)
    raise TypeError(f"stat_fns: {key!r} must return a number or a 1-element tensor, got "
                    f"{type(value).__name__} {value!r:.60}")



@dataclass
class _Buffers:
    """Everything the run has produced so far, shared by the chain groups.

    In memory (``window == 0``), ``draws`` holds every draw, (chain, draw, *shape). Streamed
    (``window > 0``, ``sample(store=...)``), it holds the current group's last ``window`` draws,
    (group chain, row, *shape), row ``k - base`` for draw k; a full window is appended to
    ``segments`` before its first row is reused. With ``segments`` (a store or a checkpoint),
    :meth:`flush` appends the draws kept since the last flush (and their statistics) as one
    segment. Statistics stay in memory whole (a few floats per draw)."""

    draws: dict[str, Tensor]
    stats: dict[str, Tensor]
    diverged: Tensor
    divergence_step: Tensor
    segments: _Segments | None = None
    window: int = 0
    base: int = 0  # streamed: the draw held in row 0
    flushed: int = 0  # the current group's draws [0, flushed) are in segments
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # (chain, draw, *shape) of the run

    def stat(self, name: str) -> Tensor:
        if name not in self.stats:
            self.stats[name] = torch.full(self.stats["energy"].shape, math.nan, dtype=torch.float64)
        return self.stats[name]

    def begin(self, group: _Group, kept: int) -> None:
        """A group starts (or resumes) with ``kept`` draws already in segments."""
        self.base = self.flushed = kept
        if self.window:
            dtype = next(iter(self.draws.values())).dtype
            self.draws = {n: torch.full((len(group.chains), self.window, *s[2:]), math.nan, dtype=dtype)
                          for n, s in self.shapes.items()}

    def slot(self, group: _Group, idx: Tensor | slice, k: int) -> tuple[Tensor | slice, int]:
        """Where draw ``k`` of ``group`` goes in ``draws``: (chain index, row)."""
        if not self.window:
            return idx, k
        if k - self.base >= self.window:
            self.flush(group, k)
        return slice(None), k - self.base

    def flush(self, group: _Group, kept: int) -> None:
        """Append ``group``'s draws [flushed, kept) and their statistics as one segment."""
        if self.segments is None or kept <= self.flushed:
            return
        k0 = self.flushed
        if self.window:
            draws = {n: v[:, k0 - self.base:kept - self.base] for n, v in self.draws.items()}
        else:
            draws = {n: v[:, k0:kept][group.chains] for n, v in self.draws.items()}
        stats = {n: v[:, k0:kept][group.chains] for n, v in self.stats.items() if n != "diverging"}
        self.segments.write(group.chains, k0, kept, draws, stats)
        self.flushed = kept
        if self.window:
            self.base = kept


@dataclass
class _Cursor:
    """Where a chain group is: its sampler state, whose step count is the group's one step counter t
    (:func:`~pib_bayes.samplers.core.step_count`; :meth:`_Sampler.move` advances it), the draws
    kept, the live chains."""

    state: KernelState  # the group's kernel state (group.state)
    kept: int
    alive: Tensor
    limit: Tensor | None = None  # per chain, the |U| above which the chain has diverged

    @property
    def t(self) -> int:
        """The global step (warm-up included) the group takes next."""
        return step_count(self.state)


def _collected_before(schedule: Schedule, num_warmup: int, t: int) -> int:
    """How many of the steps [num_warmup, t) the schedule collects: derived from t (a resumed group
    thins where the uninterrupted one does), never counted apart from it."""
    if type(schedule).collect is Schedule.collect:  # every step after warm-up is collected
        return max(t - num_warmup, 0)
    return sum(bool(schedule.collect(s)) for s in range(num_warmup, t))



def _total_steps(schedule: Schedule, num_warmup: int, num_draws: int, thin: int) -> int | None:
    """Steps a chain takes to keep ``num_draws`` draws (None if not found within 10^7 steps).

    After warm-up, every ``thin``-th *collected* step is kept and the loop ends after the step of the
    last draw: the ``((num_draws - 1) * thin + 1)``-th collected step.
    """
    needed = (num_draws - 1) * thin + 1
    if type(schedule).collect is Schedule.collect:  # every step after warm-up is collected
        return num_warmup + needed
    t, counted = num_warmup, 0
    while counted < needed and t < num_warmup + 10**7:  # e.g. a cyclical schedule: part of each cycle
        counted += bool(schedule.collect(t))
        t += 1
    return t if counted == needed else None


def _run_group(runner: _Sampler, group: _Group, names: list[str], keep_names: list[str], num_warmup: int,
               num_draws: int, thin: int, out: _Buffers, progress: bool, cur: _Cursor | None = None,
               checkpoint: Callable[[_Group, _Cursor], None] | None = None, checkpoint_every: int = 0,
               divergence_threshold: float = math.inf) -> None:
    """Advance one chain group until it holds ``num_draws`` draws (or every chain diverged).

    A draw is the weights w_t *before* step t, stored with U(w_t); ``checkpoint`` is called with the
    group's complete state at the start of every ``checkpoint_every``-th step, so a resumed run
    repeats exactly the steps an uninterrupted one takes.

    A chain diverges at the first step t whose energy U(w_t) is non-finite or exceeds
    ``divergence_threshold`` x its reference scale ``max(|U(w_0)|, D)`` (initial energy, floored at
    the number D of sampled coordinates); from then on its weights are NaN and
    ``sample_stats["diverging"]`` is true at every draw of that chain from the divergence on.
    """
    schedule = runner.schedule
    # the group's chains are consecutive (all chains, or one): basic indexing, no index_put per draw
    contiguous = group.chains == list(range(group.chains[0], group.chains[0] + len(group.chains)))
    idx: Tensor | slice = (slice(group.chains[0], group.chains[0] + len(group.chains)) if contiguous
                           else torch.tensor(group.chains))
    keep_pos = [names.index(n) for n in keep_names]
    resumed_at = cur.t if cur is not None else -1
    if cur is None:
        cur = _Cursor(group.state, 0, torch.ones(len(group.chains), dtype=torch.bool))
    floor = float(sum(p[0].numel() for p in group.params))
    desc = f"chain {group.chains[0]}" if len(group.chains) == 1 else f"{len(group.chains)} chains"
    warn_if_oversubscribed()
    # the bar counts every step, warm-up included, so its ETA holds from the start; it stays on screen
    phase = lambda t: f"{desc} {'warm-up' if t < num_warmup else 'sampling'}"  # noqa: E731
    bar = tqdm(total=_total_steps(schedule, num_warmup, num_draws, thin), initial=cur.t, desc=phase(cur.t),
               unit="step", disable=not progress, leave=True)
    plain_collect = type(schedule).collect is Schedule.collect
    single = len(group.chains) == 1 and group.params[0].device.type == "cpu"
    try:
        with runner.bound(group):
            _steps(runner, group, names, keep_names, keep_pos, num_warmup, num_draws, thin, out, cur, idx,
                   resumed_at, checkpoint, checkpoint_every, divergence_threshold, floor,
                   bar if progress else None, phase,
                   plain_collect, single)
    finally:
        bar.close()
        if group.prefetcher is not None:
            group.prefetcher.close()  # the draw made ahead for a step that will not run is dropped


@dataclass
class _NumpyViews:
    """A one-chain CPU group's recorded tensors as numpy arrays sharing their memory."""

    draws: list[tuple[np.ndarray, np.ndarray]]  # (out.draws[name], the kept parameter's weights)
    energy: np.ndarray
    loss: np.ndarray
    step_size: np.ndarray


def _numpy_views(out: _Buffers, group: _Group, keep_names: list[str],
                 keep_pos: list[int]) -> _NumpyViews | None:
    """The views for the one-chain step loop, or None where a tensor has no numpy view (a dtype numpy
    lacks, e.g. bfloat16, or one that is not a plain CPU tensor): then the tensor writes are used."""
    tensors = [out.stats["energy"], out.stats["loss"], out.stats["step_size"]]
    tensors += [out.draws[n] for n in keep_names] + [group.params[pos] for pos in keep_pos]
    if any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or t.is_conj()
           or t.is_neg() or t.layout != torch.strided for t in tensors):
        return None
    arrays = [t.detach().numpy() for t in tensors]
    m = len(keep_names)
    return _NumpyViews(list(zip(arrays[3:3 + m], arrays[3 + m:], strict=True)), *arrays[:3])


def _steps(runner: _Sampler, group: _Group, names: list[str], keep_names: list[str], keep_pos: list[int],
           num_warmup: int, num_draws: int, thin: int, out: _Buffers, cur: _Cursor, idx: Tensor | slice,
           resumed_at: int, checkpoint: Callable[[_Group, _Cursor], None] | None, checkpoint_every: int,
           divergence_threshold: float, floor: float, bar: Any, phase: Callable[[int], str],
           plain_collect: bool, single: bool) -> None:
    """The step loop of :func:`_run_group`. With one chain on the CPU (``single``) the divergence test
    and the recorded scalars use Python floats (the same comparisons on the same values)."""
    schedule = runner.schedule
    limit_f: float | None = None  # single: the limit as a Python float (no tensor ops per step)
    u_f = loss_f = math.nan
    out.begin(group, cur.kept)
    # single: numpy views of the recorded tensors (the same memory): a per-draw write is a numpy
    # store of the same value instead of a tensor __setitem__ (a few microseconds each)
    views = _numpy_views(out, group, keep_names, keep_pos) if single else None
    # single with tensor data: the bound module's value_and_grad on the batcher's next minibatch, called
    # here instead of through runner.gradients (two calls and two reshapes fewer per step)
    direct = group.direct if single and isinstance(group.batcher, TensorBatcher) else None
    next_one = group.batcher.next_one if direct is not None else None
    alive = bool(cur.alive[0]) if single else True  # single: the chain's flag as a Python bool
    collected = _collected_before(schedule, num_warmup, cur.t)  # collected steps so far (thinning)
    while cur.kept < num_draws and (alive if single else bool(cur.alive.any())):
        t = cur.t
        if checkpoint is not None and checkpoint_every and t % checkpoint_every == 0 and t != resumed_at:
            checkpoint(group, cur)
        if group.centre is not None:
            group.centre.before_step(group, t)
        if runner.noise_report is not None and t == runner.noise_report.at:
            runner.noise_report.after_warmup(group)
        first = cur.limit is None and math.isfinite(divergence_threshold)
        if direct is not None and group.estimator is None and not first:
            # runner.gradients' numbers, U and the loss as Python floats
            u_f, loss_f, grads = direct._value_and_grad_floats(*next_one())
            u = None
        else:
            u, loss, grads = runner.gradients(group)
            if single:
                u_f, loss_f = u.item(), loss.item()  # exact: a float32/float64 value is a Python float
        if first:
            assert u is not None
            # threshold x the energy scale a relative explosion is measured against (a NaN U(w_0)
            # gives a NaN limit: every comparison fails, the chain is flagged at once, as it must be)
            scale = torch.clamp(u.detach().double().abs().reshape(-1), min=floor)
            # below the dtype's largest value, so that |U| = inf never passes
            cur.limit = (divergence_threshold * scale).clamp(max=torch.finfo(u.dtype).max).to(u.dtype)
        if single:
            if limit_f is None and cur.limit is not None:
                limit_f = cur.limit.item()
            # a non-finite gradient shows up as a non-finite energy one step later; |U| <= limit is
            # false for NaN and +-inf as well
            diverges = not (abs(u_f) <= limit_f if limit_f is not None else math.isfinite(u_f))
            newly = cur.alive if diverges else None
        else:
            assert u is not None
            ok = u.abs() <= cur.limit if cur.limit is not None else torch.isfinite(u)
            newly = cur.alive & ~ok
            diverges = bool(newly.any())
        if diverges:
            assert newly is not None
            newly = newly.clone()
            for j in torch.nonzero(newly).flatten().tolist():
                out.diverged[group.chains[j]] = True
                out.divergence_step[group.chains[j]] = t
                out.stats["diverging"][group.chains[j], cur.kept:] = True  # every draw from here on
            cur.alive &= ~newly
            alive = bool(cur.alive[0]) if single else True
            with torch.no_grad():  # from here on a diverged chain holds NaN: never averaged in
                for p in group.params:
                    p[newly] = math.nan
        record = t >= num_warmup and (plain_collect or schedule.collect(t))
        if record:
            record = collected % thin == 0
            collected += 1
        if record and views is not None and not runner.stat_fns:
            k = cur.kept
            di, row = out.slot(group, idx, k)
            for dst, src in views.draws:
                dst[di, row] = src
            views.energy[idx, k] = u_f
            views.loss[idx, k] = loss_f
            views.step_size[idx, k] = schedule.step_size(t)
            cur.kept += 1
        elif record:
            k = cur.kept
            di, row = out.slot(group, idx, k)
            with torch.no_grad():
                for n, pos in zip(keep_names, keep_pos):
                    out.draws[n][di, row] = group.params[pos].detach()
                if single:  # the same values, stored without tensor conversions
                    out.stats["energy"][idx, k] = u_f
                    out.stats["loss"][idx, k] = loss_f
                else:
                    assert u is not None
                    out.stats["energy"][idx, k] = u.to(out.stats["energy"].dtype)
                    out.stats["loss"][idx, k] = loss.to(out.stats["loss"].dtype)
                out.stats["step_size"][idx, k] = schedule.step_size(t)
                for name, fn in runner.stat_fns.items():
                    vals = [_stat_value(name, fn({n: p[j].detach() for n, p in zip(names, group.params)}))
                            if bool(cur.alive[j]) else math.nan for j in range(len(group.chains))]
                    out.stat(name)[idx, k] = torch.tensor(vals, dtype=torch.float64)
            cur.kept += 1
        step_stats = runner.move(group, grads, record)  # step t, then the group's count is t + 1
        if record:
            for name, val in step_stats.items():
                out.stat(name)[idx, cur.kept - 1] = val.double()
        if bar is not None:  # None without progress: a disabled bar still costs a call per step
            bar.update(1)
            if cur.t == num_warmup:
                bar.set_description(phase(cur.t), refresh=False)
    out.flush(group, cur.kept)  # the group is done: its last draws go to the segments
