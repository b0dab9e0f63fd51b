"""The optimizer form (:mod:`pib_bayes.optim`) keeps torch.optim's contract.

The optimizers skip torch.optim's per-call profiler wrapper when nothing needs it (no step hooks,
no profiler recording; docs/performance.md); these tests pin that hooks, the profiler's ranges,
LR schedulers and ``state_dict`` behave exactly as for a torch optimizer, and that the light and
the hooked paths take the same step.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from pib_bayes.optim import PSGLD, SGHMC, SGLD, SGNHT, ScheduleLR
from pib_bayes.samplers import Cyclical, PolynomialDecay

OPTIMIZERS = [(SGLD, {}), (PSGLD, {"alpha": 0.9}), (SGHMC, {"friction": 0.2}), (SGNHT, {"diffusion": 0.5})]


def _problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), torch.randn(16, 4), torch.randn(16, 2)


def _train(opt_cls, kwargs, steps: int, hook: bool) -> list[torch.Tensor]:
    model, x, y = _problem()
    opt = opt_cls(model.parameters(), lr=1e-3, generator=torch.Generator().manual_seed(3), **kwargs)
    if hook:
        opt.register_step_pre_hook(lambda *a: None)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("opt_cls,kwargs", OPTIMIZERS)
def test_light_and_hooked_paths_take_identical_steps(opt_cls, kwargs):
    light, hooked = _train(opt_cls, kwargs, 5, hook=False), _train(opt_cls, kwargs, 5, hook=True)
    start = [p.detach() for p in _problem()[0].parameters()]
    assert not torch.equal(light[0], start[0])  # the weights did move
    assert all(torch.equal(a, b) for a, b in zip(light, hooked, strict=True))


def test_step_hooks_run_in_torch_order_and_pre_hook_can_replace_arguments():
    model, x, y = _problem()
    opt = SGLD(model.parameters(), lr=1e-3, generator=torch.Generator().manual_seed(0))
    calls: list[str] = []
    closure_calls: list[int] = []

    def closure():
        closure_calls.append(1)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    h1 = opt.register_step_pre_hook(lambda o, args, kw: calls.append("pre") or ((o, closure), {}))
    h2 = opt.register_step_post_hook(lambda o, args, kw: calls.append("post"))
    h3 = register_optimizer_step_pre_hook(lambda o, args, kw: calls.append("global pre"))
    h4 = register_optimizer_step_post_hook(lambda o, args, kw: calls.append("global post"))
    try:
        loss = opt.step()  # no closure given: the pre-hook supplies it
    finally:
        for h in (h1, h2, h3, h4):
            h.remove()
    assert calls == ["global pre", "pre", "post", "global post"]
    assert closure_calls == [1] and torch.is_tensor(loss)
    calls.clear()
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()  # hooks removed: none runs
    assert calls == []


def test_profiler_sees_step_and_zero_grad_ranges():
    model, x, y = _problem()
    opt = PSGLD(model.parameters(), lr=1e-3, generator=torch.Generator().manual_seed(0))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    names = {e.key for e in prof.key_averages()}
    assert "Optimizer.step#PSGLD.step" in names and "Optimizer.zero_grad#PSGLD.zero_grad" in names


def test_zero_grad_sets_none_by_default_and_zeros_on_request():
    model, x, y = _problem()
    opt = SGLD(model.parameters(), lr=1e-3)
    nn.functional.mse_loss(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads, strict=True))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_torch_lr_scheduler_drives_lr_without_order_warning():
    model, x, y = _problem()
    opt = SGHMC(model.parameters(), lr=0.1)
    sched = StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it thinks optimizer.step() was skipped
        for _ in range(5):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025])


def test_schedule_lr_sets_lr_and_noise_scale_from_a_cyclical_schedule():
    model, x, y = _problem()
    schedule = Cyclical(0.1, cycle_length=4, exploration_fraction=0.5)
    opt = SGLD(model.parameters(), lr=0.1)
    sched = ScheduleLR(opt, schedule)
    for t in range(8):
        group = opt.param_groups[0]
        assert group["lr"] == pytest.approx(schedule.step_size(t))
        assert group["noise_scale"] == schedule.noise_scale(t)
        assert sched.collecting == schedule.collect(t)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()


def test_schedule_lr_get_lr_has_no_side_effect():
    # get_lr only reports h_t; the noise scale is set by step() (it was written by get_lr before)
    model, x, y = _problem()
    schedule = Cyclical(0.1, cycle_length=4, exploration_fraction=0.5)
    opt = SGLD(model.parameters(), lr=0.1)
    sched = ScheduleLR(opt, schedule)
    assert opt.param_groups[0]["noise_scale"] == 0.0  # t = 0: exploration phase, set at construction
    opt.param_groups[0]["noise_scale"] = 0.25
    assert sched.get_lr() == [schedule.step_size(0)]
    assert opt.param_groups[0]["noise_scale"] == 0.25  # untouched by get_lr
    for _ in range(2):  # t = 2: sampling phase
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["noise_scale"] == 1.0


@pytest.mark.parametrize("opt_cls,kwargs", OPTIMIZERS)
def test_state_dict_round_trip_resumes_the_same_trajectory(opt_cls, kwargs):
    """Kernel state and the noise generator's state are saved: a resumed run equals the uninterrupted one."""
    model, x, y = _problem()
    opt = opt_cls(model.parameters(), lr=1e-3, generator=torch.Generator().manual_seed(7), **kwargs)

    def run(o, m, steps):
        for _ in range(steps):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()

    run(opt, model, 3)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # as in torch.optim, state_dict() holds live tensors
    run(opt, model, 4)
    straight = [p.detach().clone() for p in model.parameters()]

    resumed_model, _, _ = _problem(seed=1)  # different weights and generator: all must come from the save
    resumed_model.load_state_dict(saved_model)
    other_gen = torch.Generator().manual_seed(99)
    resumed = opt_cls(resumed_model.parameters(), lr=1e-3, generator=other_gen, **kwargs)
    resumed.load_state_dict(saved_opt)
    run(resumed, resumed_model, 4)
    assert all(torch.equal(a, b.detach()) for a, b in zip(straight, resumed_model.parameters(), strict=True))


# ---- prefetch_noise: the next step's noise drawn on a worker thread ------------------------------

def _two_group_run(opt_cls, kwargs, prefetch: bool, noise: str, steps: int = 12) -> list[torch.Tensor]:
    """Two param groups; at steps 4-5 the last layer gets no gradient (the set of drawn tensors
    changes) and at steps 7-8 the first group's noise scale is 0 (no draw for it): every change of
    layout the prefetcher must rewind for."""
    model, x, y = _problem()
    first, last = model[0], model[2]
    opt = opt_cls([{"params": first.parameters()}, {"params": last.parameters(), "lr": 2e-3}], lr=1e-3,
                  generator=torch.Generator().manual_seed(5), noise=noise, prefetch_noise=prefetch, **kwargs)
    for t in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if t in (4, 5):
            for p in last.parameters():
                p.grad = None
        opt.param_groups[0]["noise_scale"] = 0.0 if t in (7, 8) else 1.0
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("opt_cls,kwargs", OPTIMIZERS)
def test_prefetched_noise_gives_the_synchronous_trajectory(opt_cls, kwargs, noise):
    sync = _two_group_run(opt_cls, kwargs, prefetch=False, noise=noise)
    ahead = _two_group_run(opt_cls, kwargs, prefetch=True, noise=noise)
    assert all(torch.equal(a, b) for a, b in zip(sync, ahead, strict=True))


def test_prefetch_check_catches_a_prefetcher_that_does_not_rewind(monkeypatch):
    """The trajectory comparison has power: a prefetcher that keeps the prefetched numbers after a
    change of layout (no rewind of the generator) gives another trajectory."""
    from pib_bayes.samplers import core

    def no_rewind(self, keys=None):
        if self._pending is None:
            return False
        future, pending_keys, _ = self._pending
        self._pending = None
        future.result()
        return pending_keys == keys

    sync = _two_group_run(SGLD, {}, prefetch=False, noise="gaussian")
    monkeypatch.setattr(core.NoisePrefetcher, "_settle", no_rewind)
    broken = _two_group_run(SGLD, {}, prefetch=True, noise="gaussian")
    assert not all(torch.equal(a, b) for a, b in zip(sync, broken, strict=True))


@pytest.mark.parametrize("opt_cls,kwargs", OPTIMIZERS)
def test_prefetch_state_dict_resume_and_copies_continue_the_same_stream(opt_cls, kwargs):
    """While a prefetch is pending, state_dict saves the generator state of the synchronous sampler;
    a resumed optimizer (prefetching or not), a deepcopy and a pickled copy all continue exactly
    the uninterrupted trajectory."""
    import pickle

    model, x, y = _problem()

    def run(o, m, steps):
        for _ in range(steps):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()

    gen = torch.Generator().manual_seed(7)
    opt = opt_cls(model.parameters(), lr=1e-3, generator=gen, prefetch_noise=True, **kwargs)
    run(opt, model, 3)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())
    pickled = pickle.dumps(opt)
    opt._prefetcher._pending[0].result()  # let the worker finish drawing the next step's noise
    ahead = opt.generator.get_state()
    run(opt, model, 4)
    straight = [p.detach().clone() for p in model.parameters()]

    for prefetch in (True, False):
        resumed_model, _, _ = _problem(seed=1)
        resumed_model.load_state_dict(saved_model)
        resumed = opt_cls(resumed_model.parameters(), lr=1e-3, generator=torch.Generator().manual_seed(99),
                          prefetch_noise=prefetch, **kwargs)
        run(resumed, resumed_model, 1)  # a pending prefetch from another stream must be dropped on load
        resumed_model.load_state_dict(saved_model)
        resumed.load_state_dict(copy.deepcopy(saved_opt))
        run(resumed, resumed_model, 4)
        resumed_params = [p.detach() for p in resumed_model.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed_params, strict=True))

    # pickled with a prefetch pending: the copy holds the synchronous sampler's generator state
    copied = pickle.loads(pickled)
    assert copied.prefetch_noise and copied.noise == opt.noise
    assert torch.equal(copied.state_dict()["generator_state"], saved_opt["generator_state"])
    assert not torch.equal(saved_opt["generator_state"], ahead)


def test_optimizer_survives_deepcopy_and_pickle():
    """torch.optim pickles only defaults, state and param_groups: the noise source, generator state
    and caches must come back too (a deepcopied optimizer used to fail on its first step)."""
    import pickle

    for make in (lambda p: PSGLD(p, lr=1e-3, generator=torch.Generator().manual_seed(0)),
                 lambda p: SGHMC(p, lr=1e-3, noise="rademacher", generator=torch.Generator().manual_seed(0))):
        model, x, y = _problem()
        opt = make(model.parameters())
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
            assert clone.noise == opt.noise
            assert torch.equal(clone.generator.get_state(), opt.generator.get_state())
            for p in clone.param_groups[0]["params"]:
                p.grad = torch.ones_like(p)
            clone.step()  # runs


def test_psgld_groups_share_one_kernel_and_keep_their_own_scratch():
    """Groups with equal settings share one kernel (it keeps no buffers); each group's scratch lives
    with its state. The two-group trajectory is bit for bit that of one kernel stepping the two
    states by hand, with the groups' noise drawn in order from the one generator."""
    from pib_bayes.samplers.core import SCRATCH, GaussianNoise
    from pib_bayes.samplers.kernels import build_psgld

    a, b = torch.zeros(3, 2, requires_grad=True), torch.zeros(7, requires_grad=True)
    c = torch.zeros(5, requires_grad=True)
    opt = PSGLD([{"params": [a]}, {"params": [b]}, {"params": [c], "alpha": 0.5}], lr=1e-2, alpha=0.9,
                generator=torch.Generator().manual_seed(4))
    ref = [t.detach().clone() for t in (a, b, c)]
    kernels = {0.9: build_psgld(alpha=0.9), 0.5: build_psgld(alpha=0.5)}
    states = [kernels[al].init([t]) for t, al in zip(ref, (0.9, 0.9, 0.5), strict=True)]
    gen = torch.Generator().manual_seed(4)
    noises = [GaussianNoise(gen) for _ in ref]
    for t in range(5):
        for p in (a, b, c):
            p.grad = torch.cos(p.detach() + t)
        opt.step()
        for r, st, al, nz in zip(ref, states, (0.9, 0.9, 0.5), noises, strict=True):
            kernels[al].step([r], [torch.cos(r + t)], st, 1e-2, nz, 1.0)
    for p, r in zip((a, b, c), ref, strict=True):
        assert torch.equal(p.detach(), r)
    assert len(opt._kernels) == 2  # one per setting of (alpha, eps), not one per group
    assert len({id(w) for w in opt._scratch.values()}) == 3  # one scratch per group
    assert all(SCRATCH not in st for st in opt.state_dict()["state"].values())  # never saved


class _OwnCounterLR(LRScheduler):
    """The would-catch twin: ScheduleLR as it was, evaluating the schedule at a step count of its own
    (torch's ``last_epoch``) instead of the optimizer's."""

    def __init__(self, optimizer, schedule):
        self.schedule = schedule
        super().__init__(optimizer)

    def get_lr(self):
        return [self.schedule.step_size(max(self.last_epoch, 0)) for _ in self.optimizer.param_groups]


def _lrs_after_restoring_the_optimizer(make_scheduler, scheduler_first: bool):
    """The lr of three steps after a restart at t = 3 that restores the optimizer's state_dict (not the
    scheduler's), against h_3, h_4, h_5; and the restored optimizer's step count after them."""
    schedule = PolynomialDecay(0.1, 1.0, 0.55)
    model, x, y = _problem()

    def step(opt, sched):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()

    opt = SGLD(model.parameters(), lr=0.1, generator=torch.Generator().manual_seed(0))
    sched = make_scheduler(opt, schedule)
    for _ in range(3):
        step(opt, sched)
    saved = copy.deepcopy(opt.state_dict())
    again = SGLD(model.parameters(), lr=0.1, generator=torch.Generator().manual_seed(5))
    if scheduler_first:  # torch's advice: build the scheduler, then load the optimizer's state
        resumed = make_scheduler(again, schedule)
        again.load_state_dict(saved)
    else:
        again.load_state_dict(saved)
        resumed = make_scheduler(again, schedule)
    seen = []
    for _ in range(3):
        seen.append(again.param_groups[0]["lr"])
        step(again, resumed)
    return seen, [schedule.step_size(t) for t in (3, 4, 5)], again.step_count, resumed


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_the_optimizer_step_count_is_the_one_counter_schedule_lr_reads(scheduler_first):
    """The schedule is evaluated at the optimizer's step count, which its state_dict round-trips: a
    ScheduleLR on a restored optimizer continues at t = 3 whether or not the scheduler's state was
    restored (and in either order of building it and loading the optimizer's state)."""
    seen, expected, count, sched = _lrs_after_restoring_the_optimizer(ScheduleLR, scheduler_first)
    assert seen == expected and count == 6 and sched.last_epoch == 6
    # the would-catch twin: a scheduler counting steps itself restarts its schedule after the restore
    twin_seen, _, _, _ = _lrs_after_restoring_the_optimizer(_OwnCounterLR, scheduler_first)
    assert twin_seen != expected


def test_step_count_round_trips_and_schedule_lr_reads_only_it():
    model, x, y = _problem()
    schedule = Cyclical(0.1, cycle_length=4, exploration_fraction=0.5)
    opt = SGLD(model.parameters(), lr=0.1, generator=torch.Generator().manual_seed(0))
    assert opt.step_count == 0
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert opt.step_count == opt.state_dict()["step_count"] == 5
    sched = ScheduleLR(opt, schedule)  # built on an optimizer at t = 5: starts there
    group = opt.param_groups[0]
    assert (group["lr"], group["noise_scale"], sched.collecting, sched.last_epoch) == (
        schedule.step_size(5), schedule.noise_scale(5), schedule.collect(5), 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates step(epoch)
        sched.step(1)  # an explicit epoch moves the one counter (the optimizer's), not a copy
    assert opt.step_count == 1 and group["lr"] == schedule.step_size(1) and sched.last_epoch == 1
    assert (group["noise_scale"], sched.collecting) == (0.0, False)  # t = 1: exploration phase
    old = {k: v for k, v in opt.state_dict().items() if k != "step_count"}  # saved before the count
    opt.load_state_dict(old)
    assert opt.step_count == 0
    with pytest.raises(ValueError, match=r"^state_dict: 'step_count'"):
        opt.load_state_dict({**old, "step_count": -1})
    with pytest.raises(ValueError, match=r"^last_epoch: 3, but the optimizer has taken 0 steps"):
        ScheduleLR(opt, schedule, last_epoch=3)
    with pytest.raises(ValueError, match=r"^step_count: "):
        opt.step_count = 1.5
    pickled = copy.deepcopy(opt)  # pickling keeps the count too
    opt.step_count = 7
    assert copy.deepcopy(opt).step_count == 7 and pickled.step_count == 0


def test_schedule_lr_on_another_torch_optimizer_counts_with_last_epoch():
    model, x, y = _problem()
    schedule = PolynomialDecay(0.1, 1.0, 0.55)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = ScheduleLR(opt, schedule)
    for t in range(3):
        assert opt.param_groups[0]["lr"] == schedule.step_size(t) and sched.last_epoch == t
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
