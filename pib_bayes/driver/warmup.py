"""Warm-up stages of :func:`pib_bayes.sample`: automatic step size, the minibatch-noise report, the
control-variate centre."""

from __future__ import annotations

import json
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


AUTO_SAMPLER = "sghmc"  # what sampler="auto" runs (docs/samplers.md, "Which kernel: sampler='auto'")


def _resolve_sampler(sampler: str | Kernel,
                     auto: AutoStep | None) -> tuple[str | Kernel, dict[str, Any] | None]:
    """``sampler="auto"``: the kernel is chosen with its settings, so it needs ``step_size="auto"``;
    it is SGHMC (eta and friction from lambda_max). On a well-conditioned Gaussian posterior with
    8 x 1000 draws no constant SGLD step meets both the 0.1-sd mean and the 10% sd criterion with
    high probability (the best, h lambda_max ~ 0.2, does on 5 of 5 seeds with probability ~0.6;
    ``benchmarks/bench_tuning.py --arithmetic``): SGLD's AR(1) trades the bias (1 - a/2)^(-1/2) - 1
    against the autocorrelation time (2 - a)/a through one number a = h lambda, SGHMC's momentum
    decorrelates at the same bias. Any other value passes through unchanged."""
    if not (isinstance(sampler, str) and sampler.lower() == "auto"):
        return sampler, None
    if auto is None:
        raise ValueError("sampler: 'auto' chooses the kernel together with its step size; pass "
                         "step_size='auto' (or a pib_bayes.samplers.step_size.AutoStep) with it, or name a "
                         "sampler ('sgld', 'psgld', 'sghmc', 'sgnht', 'csgld')")
    return AUTO_SAMPLER, {"requested": "auto", "chosen": AUTO_SAMPLER,
                          "reason": "momentum mixes faster than SGLD at the same variance bias "
                                    "(docs/samplers.md)"}


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
    if auto.adapt:  # AutoStep(adapt=True): the same estimate again, on the same examples, mid-warm-up
        keep = dict(kernel.settings)  # the kernel's settings stay (SGHMC's friction, SGNHT's A)

        def reestimate(at: dict[str, Tensor], where_now: str) -> dict[str, Any]:
            with _sampling_mode(energy.model, False):
                return run_auto_step(energy, at, x, y, rule, auto, keep, batch_size=b, n=n, fixed=fixed,
                                     precond_eps=float(kernel.settings.get("eps", 1e-5)),
                                     seed=_auto_seed(seed) + 2, where=where_now)

        info["reestimate"] = reestimate
    return kernel, Constant(info["step_size"]), info


class _AdaptedStep(Schedule):
    """AutoStep(adapt=True)'s schedule: ``h`` before step ``at``, the re-estimated ``adapted`` from then
    on (set by :class:`_AutoAdapter` when the first chain group reaches step ``at``)."""

    def __init__(self, step_size: float, at: int) -> None:
        self.h, self.at = float(step_size), int(at)
        self.adapted: float | None = None

    def step_size(self, t: int) -> float:
        return self.adapted if self.adapted is not None and t >= self.at else self.h

    def to_dict(self) -> dict:
        return {"type": "AdaptedConstant", "h": self.h, "at": self.at, "adapted": self.adapted}


class _AutoAdapter:
    """AutoStep(adapt=True): at warm-up step ``at`` the first chain group to get there re-estimates
    lambda_max (pSGLD: and V = |diag H|) at its first finite chain's weights (the same chain whether
    the chains run vectorized or sequentially) and sets the schedule's new step;
    every group then resets its kernel state to what that step was chosen for (pSGLD: the RMSprop
    average to V; SGHMC: the momentum form v = sqrt(eta) p rescaled by sqrt(eta1 / eta0))."""

    def __init__(self, auto_info: dict[str, Any], schedule: _AdaptedStep, names: list[str], kernel: Kernel,
                 noise_report: _NoiseReport | None) -> None:
        self.reestimate, self.schedule, self.names = auto_info["reestimate"], schedule, names
        self.at, self.kernel_name, self.noise_report = schedule.at, kernel.name, noise_report
        self.result: dict[str, Any] | None = None
        self.kept: str | None = None  # why the initial step was kept (no finite weights, no curvature)
        self.estimated_at: tuple[dict[str, Tensor], str] | None = None  # the weights it ran at (checkpoints)

    def before_step(self, group: _Group, t: int) -> None:
        if t != self.at:
            return
        if self.result is None and self.kept is None:
            # the first chain whose weights are finite (a diverged chain holds NaN)
            finite = [j for j in range(len(group.chains))
                      if all(bool(torch.isfinite(p[j]).all()) for p in group.params)]
            if not finite:
                self.kept = f"no chain of the first group has finite weights at warm-up step {t}"
            else:
                j = finite[0]
                params = {n: p[j].detach().clone() for n, p in zip(self.names, group.params, strict=True)}
                where = f"chain {group.chains[j]}'s weights at warm-up step {t}"
                try:
                    self._estimate(params, where)
                except ValueError as err:  # flat or concave there: keep the initial step, say why
                    self.kept = str(err)
            if self.kept is not None:
                warnings.warn(f"step_size: AutoStep(adapt=True) kept the initial step: {self.kept}",
                              RuntimeWarning, stacklevel=2)
                return
        if self.result is None:
            return
        with torch.no_grad():
            if self.result.get("square_avg") is not None and "square_avg" in group.state:
                for buf, v in zip(group.state["square_avg"], self.result["square_avg"], strict=True):
                    buf.copy_(v.to(buf.dtype).expand_as(buf))
            if self.kernel_name == "sghmc" and "momentum" in group.state:
                torch._foreach_mul_(group.state["momentum"], self.momentum_ratio())

    def _estimate(self, params: dict[str, Tensor], where: str) -> None:
        self.result = self.reestimate(params, where)
        self.estimated_at = (params, where)
        self.schedule.adapted = float(self.result["step_size"])
        if self.noise_report is not None:  # the end-of-warm-up report is for the new step
            self.noise_report.report = self.result["report"]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the weights the step was re-estimated at (the estimate itself,
        closures included, is run again from them on resume: it is seeded, so it gives the same
        step), or why the initial step was kept."""
        params, where = self.estimated_at if self.estimated_at is not None else (None, None)
        return {"params": params, "where": where, "kept": self.kept, "adapted": self.schedule.adapted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept = state["kept"]
        if state["params"] is not None:
            self._estimate(dict(state["params"]), str(state["where"]))
            if self.schedule.adapted != state["adapted"]:
                raise RuntimeError(f"step_size: AutoStep(adapt=True)'s step re-estimated on resume is "
                                   f"{self.schedule.adapted!r}, the checkpoint's run had "
                                   f"{state['adapted']!r} (a different torch or thread count?): resume "
                                   "with resume=False")

    def momentum_ratio(self) -> float:
        """SGHMC: v = sqrt(eta) p, so p keeps its (thermal) scale when v is multiplied by sqrt(eta1/eta0)."""
        assert self.schedule.adapted is not None
        return (self.schedule.adapted / self.schedule.h) ** 0.5

    def summary(self) -> dict[str, Any]:
        if self.result is None:
            why = self.kept or f"every chain diverged before warm-up step {self.at}"
            return {"at_step": self.at, "kept_initial": why}
        r = self.result
        return {"at_step": self.at, "at": r["at"], "step_size": r["step_size"], "settings": r["settings"],
                "lambda_max": r["lambda_max"], "iterations": r["iterations"], "converged": r["converged"],
                "initial_step_size": self.schedule.h, "cpu_s": r["cpu_s"]}


class _WarmupHooks:
    """One chain group's per-step warm-up hooks behind the driver's ``group.centre`` slot: the
    AutoStep adapter, then gradient='cv''s centre finder (whose state and cost it passes through)."""

    def __init__(self, adapter: _AutoAdapter, centre: _CentreFinder | None) -> None:
        self.adapter, self.centre = adapter, centre

    @property
    def cpu_s(self) -> float:
        return self.centre.cpu_s if self.centre is not None else 0.0

    def before_step(self, group: _Group, t: int) -> None:
        self.adapter.before_step(group, t)
        if self.centre is not None:
            self.centre.before_step(group, t)

    def state_dict(self, group: _Group) -> dict[str, Any]:
        return self.centre.state_dict(group) if self.centre is not None else {}

    def load_state_dict(self, group: _Group, state: dict[str, Any]) -> None:
        if self.centre is not None:
            self.centre.load_state_dict(group, state)


def _make_adapter(auto: AutoStep | None, auto_info: dict[str, Any] | None, schedule: Schedule,
                  num_warmup: int, names: list[str], kernel: Kernel,
                  noise_report: _NoiseReport | None) -> tuple[Schedule, _AutoAdapter | None]:
    """AutoStep(adapt=True): the adapting schedule and its adapter; (schedule, None) otherwise."""
    if auto is None or not auto.adapt or auto_info is None:
        return schedule, None
    if num_warmup < 2:
        raise ValueError(f"step_size: AutoStep(adapt=True) re-estimates the step during warm-up and needs "
                         f"num_warmup >= 2, got num_warmup={num_warmup}")
    adapted = _AdaptedStep(auto_info["step_size"], max(1, int(auto.adapt_at * num_warmup)))
    return adapted, _AutoAdapter(auto_info, adapted, names, kernel, noise_report)


def _with_adapter(adapter: _AutoAdapter | None, centre: _CentreFinder | None) -> Any:
    return centre if adapter is None else _WarmupHooks(adapter, centre)


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

    def state_dict(self) -> dict[str, Any]:
        return {"result_json": json.dumps(self.result, default=float), "done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.result, self.done = json.loads(state["result_json"]), bool(state["done"])

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
