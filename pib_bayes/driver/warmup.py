"""Warm-up stages of :func:`pib_bayes.sample`: automatic step size, the minibatch-noise report, the
control-variate centre."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..energy import Energy
from ..gradients import ControlVariateGradient, full_data_gradient
from ..samplers.core import Kernel
from ..samplers.kernels import build_kernel
from ..samplers.schedules import Constant, Schedule
from ..samplers.step_size import NOISE_WARN_THRESHOLD, AutoStep, GradientNoiseWarning, run_auto_step
from .chains import (
    _generator,
    _Group,
    _Sampler,
    _sampling_mode,
)
from .checks import (
    _initial_params,
)


def _as_auto(step_size: object) -> AutoStep | None:
    if isinstance(step_size, AutoStep):
        return step_size
    if isinstance(step_size, str):
        if step_size.lower() != "auto":
            raise ValueError(f"step_size: expected a float, a Schedule or 'auto', got {step_size!r}")
        return AutoStep()
    return None


def _auto_seed(seed: int) -> int:
    """The curvature stage's own stream (its minibatches and start vector): no chain's streams move."""
    words = np.random.SeedSequence(int(seed), spawn_key=(2**31 - 21,)).generate_state(1, np.uint64)
    return int(words[0]) >> 1


def _auto_step_stage(auto: AutoStep, energy: Energy, kernel: Kernel, sampler: str | Kernel,
                     sampler_kwargs: Mapping[str, Any] | None, named: list[tuple[str, Tensor]],
                     init: str | Mapping[str, Tensor], init_params: dict[str, Tensor],
                     all_seeds: list[tuple[int, int, int]], fixed: dict[str, Tensor],
                     tensors: tuple[Tensor, Tensor] | None, data: Any, batch_size: int | None, seed: int,
                     names: list[str]) -> tuple[Kernel, Schedule, dict[str, Any]]:
    """step_size='auto': lambda_max at global chain 0's initial weights -> (kernel, Constant(h), info)."""
    rule = getattr(kernel, "curvature_rule", None)
    if rule is None:
        raise ValueError(f"step_size: 'auto' needs a kernel with a curvature_rule; {kernel.name!r} has none "
                         "(pass a float step_size)")
    if isinstance(init, str):  # the same weights whichever chains this call runs (chain_ids)
        start = _initial_params(named, init, 1, energy.prior, all_seeds[:1])
        where = "chain 0's initial weights"
    else:
        start, where = init_params, "the first given initial weights"
    params = {n: start[n][0] for n in names}
    gen = _generator(_auto_seed(seed))
    if tensors is not None:
        n = int(tensors[0].shape[0])
        b = n if batch_size is None else int(batch_size)
        idx = torch.randperm(n, generator=gen)[: min(n, auto.num_batches * b)]
        x, y = tensors[0][idx], tensors[1][idx]
    else:
        got, b = [], int(getattr(data, "batch_size", None) or 0)
        for i, batch in enumerate(data):
            got.append(batch)
            if i + 1 >= auto.num_batches:
                break
        if not got:
            raise ValueError("data: the DataLoader yields no batches (empty dataset)")
        x, y = torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])
        b = b or int(got[0][0].shape[0])
        try:
            n = len(data.dataset)
        except TypeError:
            n = None
    given = dict(sampler_kwargs or {}) if not isinstance(sampler, Kernel) else dict(kernel.settings)
    with _sampling_mode(energy.model, False):  # the eval-mode forward sampling uses; modes restored
        info = run_auto_step(energy, params, x, y, rule, auto, given, batch_size=b, n=n, fixed=fixed,
                             precond_eps=float(kernel.settings.get("eps", 1e-5)), seed=_auto_seed(seed) + 1,
                             where=where)
    if info["settings"] and any(kernel.settings.get(k) != v for k, v in info["settings"].items()):
        kernel = build_kernel(sampler, **{**dict(sampler_kwargs or {}), **info["settings"]})
    return kernel, Constant(info["step_size"]), info


def _check_loader_has_length(loader: Any) -> None:
    try:
        len(loader.dataset)
        ok = not isinstance(loader.dataset, torch.utils.data.IterableDataset)
    except (TypeError, AttributeError):
        ok = False
    if not ok:
        raise ValueError("gradient: 'cv' needs one full-data gradient at its centre, and this DataLoader "
                         "streams data without a length (an iterable dataset); pass (x, y) tensors or a "
                         "DataLoader over a map-style dataset, or use gradient='minibatch'")


def _full_data_chunks(tensors: tuple[Tensor, Tensor] | None, data: Any, batch_size: int | None):
    """One pass over the whole data: tensor slices (>= 256 examples each), or one DataLoader epoch."""
    if tensors is None:
        for batch in data:
            yield batch[0], batch[1]
        return
    x, y = tensors
    step = max(batch_size or x.shape[0], 256)
    for i in range(0, x.shape[0], step):
        yield x[i:i + step], y[i:i + step]


class _NoiseReport:
    """step_size='auto': the minibatch-noise report, first at the initial weights, then re-evaluated
    once at step num_warmup at the first chain's current weights (where the chains sample; with
    gradient='cv' for the control variate there), warning past NOISE_WARN_THRESHOLD."""

    def __init__(self, auto_info: dict[str, Any], num_warmup: int, names: list[str], gradient: str) -> None:
        self.report, self.names, self.at = auto_info["report"], names, num_warmup
        self.gradient = gradient
        self.result: dict[str, Any] = {**auto_info["gradient_noise"], "estimator": "minibatch"}
        self.done = False

    def after_warmup(self, group: _Group) -> None:
        if self.done:
            return
        self.done = True
        start = time.process_time()
        params = {n: p[0].detach() for n, p in zip(self.names, group.params, strict=True)}
        if not all(bool(torch.isfinite(p).all()) for p in params.values()):
            return
        est = group.estimator
        centre = ({n: c[0].detach() for n, c in zip(self.names, est.centre, strict=True)}
                  if isinstance(est, ControlVariateGradient) else None)
        got = self.report(params, centre)
        self.result = {**got, "at": f"chain {group.chains[0]}'s weights at step {self.at} (end of warm-up)",
                       "estimator": "control variate" if centre is not None else "minibatch",
                       "cpu_s": time.process_time() - start}
        worst = max(got["top_reshuffled"], got["mean_reshuffled"])
        if worst > NOISE_WARN_THRESHOLD:
            warnings.warn(GradientNoiseWarning(
                "step_size='auto': minibatch gradient noise is predicted to inflate the posterior variance "
                f"by {100 * got['top_reshuffled']:.1f}% along the stiffest direction "
                f"({100 * got['mean_reshuffled']:.1f}% on average) at batch_size={got['batch_size']}; use a "
                "larger batch, gradient='cv', or a smaller AutoStep(eps=...)"), stacklevel=4)


class _CentreFinder:
    """gradient='cv' for one chain group: sums each chain's weights over warm-up steps
    [num_warmup // 2, num_warmup), and at step num_warmup (before its gradient) takes their mean as
    the centre w_hat, forms the full-data gradient there and makes the control variate the group's
    estimator."""

    def __init__(self, runner: _Sampler, num_warmup: int, chunks: Callable[[], Any]) -> None:
        self.runner = runner
        self.start, self.stop = (num_warmup // 2, num_warmup) if num_warmup >= 2 else (0, 0)
        self.at = num_warmup if num_warmup >= 2 else 0
        self.chunks = chunks
        self.sums: list[Tensor] | None = None
        self.count = 0
        self.cpu_s = 0.0

    def before_step(self, group: _Group, t: int) -> None:
        if group.estimator is not None:
            return
        if self.start <= t < self.stop:
            with torch.no_grad():
                w = [p.detach() for p in group.params]
                self.sums = ([v.clone() for v in w] if self.sums is None
                             else [a + b for a, b in zip(self.sums, w, strict=True)])
            self.count += 1
        if t == self.at:
            centre = ([a / self.count for a in self.sums] if self.sums is not None and self.count
                      else [p.detach().clone() for p in group.params])
            self.activate(group, centre)

    def activate(self, group: _Group, centre: list[Tensor], centre_grad: list[Tensor] | None = None) -> None:
        runner = self.runner
        if centre_grad is None:
            start = time.process_time()
            leaves = [c.detach().clone().requires_grad_(True) for c in centre]
            centre_grad = full_data_gradient(runner.minibatch_gradient, leaves, group.vectorized,
                                             self.chunks())[2]
            self.cpu_s += time.process_time() - start
        group.estimator = ControlVariateGradient(runner.minibatch_gradient, centre, centre_grad)
        self.sums = None

    def state_dict(self, group: _Group) -> dict[str, Any]:
        est = group.estimator
        cv = est.state_dict() if isinstance(est, ControlVariateGradient) else None
        return {"sums": None if self.sums is None else [a.clone() for a in self.sums], "count": self.count,
                "cpu_s": self.cpu_s, "cv": cv}

    def load_state_dict(self, group: _Group, state: dict[str, Any]) -> None:
        self.sums = None if state["sums"] is None else [a.clone() for a in state["sums"]]
        self.count, self.cpu_s = int(state["count"]), float(state["cpu_s"])
        group.estimator = None
        if state["cv"] is not None:
            self.activate(group, state["cv"]["centre"], state["cv"]["centre_grad"])
