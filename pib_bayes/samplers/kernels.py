"""SGLD, pSGLD, SGHMC and SGNHT kernels (SPEC §2), all on :func:`~pib_bayes.samplers.core.langevin_move_`.

Each ``build_*`` returns a :class:`~pib_bayes.samplers.core.Kernel`; cyclical SGLD is SGLD with
a :class:`~pib_bayes.samplers.schedules.Cyclical` schedule (the schedule switches the noise off in
the exploration phase and says which steps may be kept).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .core import GaussianNoise, Kernel, flat_view, flat_zeros_like, langevin_move_, reduce_sum, scratch_of
from .schedules import SHORTHANDS
from .step_size import PSGLD_RULE, SGHMC_RULE, SGLD_RULE, SGNHT_RULE

__all__ = ["build_sgld", "build_psgld", "build_sghmc", "build_sgnht", "build_kernel", "KERNELS"]


def build_sgld() -> Kernel:
    """Stochastic-gradient Langevin dynamics (Welling & Teh 2011).

        w <- w - h * grad U_B(w) + sqrt(2 h) * xi,    xi ~ N(0, I)

    >>> import torch
    >>> k = build_sgld()
    >>> w, g = [torch.zeros(3)], [torch.ones(3)]
    >>> _ = k.step(w, g, k.init(w), 0.1, noise=None)  # noise=None: a plain gradient step
    >>> w[0]
    tensor([-0.1000, -0.1000, -0.1000])
    """

    def init(params: list[Tensor]) -> dict[str, list[Tensor]]:
        return {}

    def step(params, grads, state, step_size, noise: GaussianNoise | None, noise_scale=1.0,
             batch_ndim=0, with_stats=False):
        langevin_move_(params, grads, step_size, noise, 1.0, noise_scale)
        return {}

    return Kernel("sgld", (), init, step, {}, curvature_rule=SGLD_RULE)


def build_psgld(alpha: float = 0.99, eps: float = 1e-5) -> Kernel:
    """Preconditioned SGLD with an RMSprop preconditioner (Li et al. 2016).

        V <- alpha V + (1 - alpha) g ⊙ g,     G = 1 / (eps + sqrt(V))
        w <- w - h G ⊙ g + sqrt(2 h G) ⊙ xi

    The correction term ``h Gamma(w)`` (derivative of G) is dropped, as in the paper's
    practical algorithm: its bias vanishes as the preconditioner settles. ``alpha = 1`` freezes
    V at its current value (set ``state["square_avg"]``), giving an exact preconditioned
    Langevin chain; the state starts at V = 0, i.e. G = 1/eps, unless set. The scratch buffer for
    M = eps + sqrt(V) lives in the state (``state["scratch"]``, made on the first step, never
    checkpointed), so one kernel steps any number of states, of any shapes.

    >>> import torch
    >>> k = build_psgld(alpha=0.5, eps=1e-8)
    >>> small, large = [torch.zeros(2)], [torch.zeros(3, 4)]
    >>> s_small, s_large = k.init(small), k.init(large)  # one kernel, two states of different shapes
    >>> _ = k.step(small, [torch.ones(2)], s_small, 0.1, noise=None)
    >>> _ = k.step(large, [torch.ones(3, 4)], s_large, 0.1, noise=None)
    >>> small[0]  # V = 0.5, w = -h g / sqrt(V)
    tensor([-0.1414, -0.1414])
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: the RMSprop decay must lie in [0, 1], got {alpha}")
    if not eps > 0:
        raise ValueError(f"eps: must be > 0, got {eps}")

    def init(params: list[Tensor]) -> dict[str, list[Tensor]]:
        # one flat buffer (views per parameter): state-only updates run as single ops
        return {"square_avg": flat_zeros_like(params)}

    def step(params, grads, state, step_size, noise, noise_scale=1.0, batch_ndim=0, with_stats=False):
        v = state["square_avg"]
        flat_v = flat_view(v)
        if alpha < 1.0:
            if flat_v is not None:
                flat_v.mul_(alpha)
            else:
                torch._foreach_mul_(v, alpha)
            torch._foreach_addcmul_(v, grads, grads, value=1.0 - alpha)
        # one scratch buffer per state, reused across steps (fresh 1-MB tensors per step cost page faults)
        (denom,), (flat_m,) = scratch_of(state).get(v, 1)
        if flat_v is not None and flat_m is not None:
            torch.sqrt(flat_v, out=flat_m)
            flat_m.add_(eps)
        else:
            for out, v_ in zip(denom, v, strict=True):
                torch.sqrt(v_, out=out)
            torch._foreach_add_(denom, eps)
        stats = {}
        if with_stats:
            n = sum(p[0].numel() if batch_ndim else p.numel() for p in params)
            stats["precond_mean"] = reduce_sum(torch._foreach_reciprocal(denom), batch_ndim) / n
        # G = 1/M with M = eps + sqrt(V): the move divides by M (drift) and scales xi by rsqrt(M),
        # fewer passes over the weights than forming G, G*g and sqrt(2hG); rsqrt(M) overwrites M
        # once the drift has used it (one buffer fewer in cache)
        langevin_move_(params, grads, step_size, noise, noise_scale=noise_scale, workspace=denom,
                       divide_by=denom)
        return stats

    return Kernel("psgld", ("square_avg",), init, step, {"alpha": alpha, "eps": eps},
                  curvature_rule=PSGLD_RULE)


def build_sghmc(friction: float = 0.1) -> Kernel:
    """Stochastic-gradient HMC in momentum form (Chen et al. 2014, eq. 15), noise estimate dropped.

        v <- (1 - alpha) v - eta * grad U_B(w) + sqrt(2 alpha eta) * xi
        w <- w + v

    ``eta`` is the step size ("learning rate") and ``alpha = friction``. The reported kinetic
    energy is ``sum v^2 / (2 eta)`` (momentum ``r = v / sqrt(eta)`` at unit mass), whose mean at
    stationarity is about D/2. The exact stationary covariance of this linear recursion on a
    Gaussian target is derived with the discrete Lyapunov equation in the tests.
    """
    if not 0.0 < friction <= 1.0:
        raise ValueError(f"friction: must lie in (0, 1], got {friction}")

    def init(params: list[Tensor]) -> dict[str, list[Tensor]]:
        return {"momentum": flat_zeros_like(params)}

    def step(params, grads, state, step_size, noise, noise_scale=1.0, batch_ndim=0, with_stats=False):
        v = state["momentum"]
        flat_v = flat_view(v)
        if flat_v is not None:
            flat_v.mul_(1.0 - friction)
        else:
            torch._foreach_mul_(v, 1.0 - friction)
        langevin_move_(v, grads, step_size, noise, friction, noise_scale)
        torch._foreach_add_(params, v)
        if not with_stats:
            return {}
        sq = torch._foreach_mul(v, v)
        return {"kinetic_energy": reduce_sum(sq, batch_ndim) / (2.0 * step_size)}

    return Kernel("sghmc", ("momentum",), init, step, {"friction": friction}, curvature_rule=SGHMC_RULE)


def build_sgnht(diffusion: float = 1.0, init_thermostat: float | None = None) -> Kernel:
    """Stochastic-gradient Nosé-Hoover thermostat (Ding et al. 2014, Algorithm 1), SPEC §2's Euler form.

        p  <- p - h * grad U_B(w) - h * xi * p + sqrt(2 A h) * eta,    eta ~ N(0, I)
        w  <- w + h * p
        xi <- xi + h * (p . p / D - 1)

    ``h`` is the step size, ``A = diffusion`` > 0 the injected diffusion, D the number of weights
    of one chain (every tensor of the step together), and the thermostat xi is one scalar per
    chain (shape ``params[0].shape[:batch_ndim]``), starting at ``init_thermostat`` (default A, as
    in the paper); the momentum p starts at 0. xi acts as an adaptive friction: it grows while the
    kinetic energy p.p/D is above 1 and shrinks while below, so at stationarity E[p.p/D] = 1
    exactly (the expectation of the xi update vanishes) whatever extra noise the minibatch
    gradient adds, and xi settles near A + B, B the (unknown) gradient-noise diffusion. That is
    its point over SGHMC, whose fixed friction must match the noise it is not told.

    ``h`` is a time step, not SGLD's step: the weights move by about h * p with |p| ~ 1 per
    weight. On a quadratic direction of curvature lambda, with xi at its stationary value x (it
    fluctuates by O(1/sqrt(D))), the recursion is linear and stable iff h^2 lambda + 2 h x < 4, and
    its stationary variances are Var(p) = 2 q / (h x (4 - 2 h x - h^2 lambda)) with
    q = 2 A h + h^2 (gradient-noise variance), and Var(w) = Var(p) (1 - h x / 2) / lambda: the
    thermostat holds Var(p) at 1 on average, so the relative variance bias is -h x / 2 + O(h^2)
    (derived and tested in tests/test_sgnht.py). The state is the momentum (one buffer shaped like
    the weights) and the thermostat; the reported statistics are ``kinetic_energy`` = p.p/2 (mean
    D/2 at stationarity, as SGHMC's) and ``thermostat`` = xi.

    Examples:
        >>> import torch
        >>> k = build_sgnht(diffusion=1.0)
        >>> w, g = [torch.zeros(4)], [torch.ones(4)]
        >>> state = k.init(w)  # momentum 0, xi = A = 1
        >>> stats = k.step(w, g, state, 0.1, noise=None, with_stats=True)  # noise=None: no eta term
        >>> state["momentum"][0], w[0]  # p = -h g, then w = h p
        (tensor([-0.1000, -0.1000, -0.1000, -0.1000]), tensor([-0.0100, -0.0100, -0.0100, -0.0100]))
        >>> stats["thermostat"]  # xi + h (p.p/D - 1) = 1 + 0.1 * (0.01 - 1)
        tensor(0.9010)
    """
    if isinstance(diffusion, bool) or not isinstance(diffusion, (int, float)) or not (
            math.isfinite(diffusion) and diffusion > 0):
        raise ValueError(f"diffusion: the SGNHT diffusion A must be a finite number > 0, got {diffusion!r}")
    if init_thermostat is None:
        init_thermostat = float(diffusion)
    xi0 = init_thermostat
    if isinstance(xi0, bool) or not isinstance(xi0, (int, float)) or not math.isfinite(xi0):
        raise ValueError(f"init_thermostat: must be a finite number (None: the diffusion A), got "
                         f"{init_thermostat!r}")
    diffusion, xi0 = float(diffusion), float(xi0)

    def init(params: list[Tensor], batch_ndim: int = 0) -> dict[str, list[Tensor]]:
        if not params:
            return {"momentum": [], "thermostat": []}
        first = params[0]
        xi = torch.full(first.shape[:batch_ndim], xi0, dtype=first.dtype, device=first.device)
        # one scalar per chain, shared by every tensor's entry (torch.optim keeps state per parameter)
        return {"momentum": flat_zeros_like(params), "thermostat": [xi] * len(params)}

    def step(params, grads, state, step_size, noise, noise_scale=1.0, batch_ndim=0, with_stats=False):
        p, thermostats = state["momentum"], state["thermostat"]
        xi = thermostats[0]
        h = float(step_size)
        flat_p = flat_view(p)
        shrink = 1.0 - h * xi  # per chain
        if batch_ndim == 0 and flat_p is not None:
            flat_p.mul_(shrink)
        else:
            torch._foreach_mul_(p, [shrink.view(*shrink.shape, *[1] * (t.dim() - batch_ndim)) for t in p])
        langevin_move_(p, grads, h, noise, diffusion, noise_scale)
        torch._foreach_add_(params, p, alpha=h)
        batch = xi.shape
        if batch_ndim == 0 and flat_p is not None:
            pp = torch.dot(flat_p, flat_p)
        else:
            pp = sum(torch.linalg.vecdot(t.reshape(*batch, -1), t.reshape(*batch, -1)) for t in p)
        d = sum(t.numel() for t in p) // max(xi.numel(), 1)
        xi.add_(pp, alpha=h / d).sub_(h)
        for other in thermostats[1:]:
            if other is not xi:  # e.g. after load_state_dict: keep every parameter's copy equal
                other.copy_(xi)
        if not with_stats:
            return {}
        return {"kinetic_energy": pp / 2.0, "thermostat": xi.clone()}

    return Kernel("sgnht", ("momentum", "thermostat"), init, step,
                  {"diffusion": diffusion, "init_thermostat": xi0}, curvature_rule=SGNHT_RULE)


KERNELS = {"sgld": build_sgld, "psgld": build_psgld, "sghmc": build_sghmc, "sgnht": build_sgnht}


def build_kernel(sampler: str | Kernel, **settings) -> Kernel:
    """A kernel by name (``"sgld"``, ``"psgld"``, ``"sghmc"``, ``"sgnht"``) or a built :class:`Kernel`.

    ``"csgld"`` is not a kernel but SGLD on a cyclical schedule: resolve it with
    :func:`~pib_bayes.samplers.schedules.expand_shorthand` first (``pib_bayes.sample`` does).
    """
    if isinstance(sampler, Kernel):
        if settings:
            raise ValueError("sampler_kwargs: pass settings to the build_* function of a pre-built kernel")
        return sampler
    key = str(sampler).lower()
    if key in SHORTHANDS:
        name, schedule = SHORTHANDS[key]
        raise ValueError(f"sampler: {sampler!r} is the kernel {name!r} on a {schedule.__name__} schedule, "
                         f"not a kernel; build {name!r} and pass the schedule as step_size")
    if key not in KERNELS:
        raise ValueError(f"sampler: unknown sampler {sampler!r}; choose one of {sorted(KERNELS)}")
    try:
        return KERNELS[key](**settings)
    except TypeError as err:
        raise ValueError(f"sampler_kwargs: {err}") from None


