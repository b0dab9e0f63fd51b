"""SGLD, pSGLD and SGHMC kernels (SPEC §2), all built on :func:`~pib_bayes.samplers.core.langevin_move_`.

Each ``build_*`` returns a :class:`~pib_bayes.samplers.core.Kernel`; cyclical SGLD is SGLD with
a :class:`~pib_bayes.samplers.schedules.Cyclical` schedule (the schedule switches the noise off in
the exploration phase and says which steps may be kept).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .core import GaussianNoise, Kernel, Workspace, flat_view, flat_zeros_like, langevin_move_, reduce_sum
from .step_size import PSGLD_RULE, SGHMC_RULE, SGLD_RULE

__all__ = ["build_sgld", "build_psgld", "build_sghmc", "build_kernel", "KERNELS"]


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
    Langevin chain; the state starts at V = 0, i.e. G = 1/eps, unless set.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: the RMSprop decay must lie in [0, 1], got {alpha}")
    if not eps > 0:
        raise ValueError(f"eps: must be > 0, got {eps}")

    workspace = Workspace()  # per built kernel: one chain group / optimizer group at a time

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
        # one scratch buffer reused across steps (fresh 1-MB tensors per step cost page faults)
        (denom,), (flat_m,) = workspace.get(v, 1)
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


KERNELS = {"sgld": build_sgld, "psgld": build_psgld, "sghmc": build_sghmc, "csgld": build_sgld}


def build_kernel(sampler: str | Kernel, **settings) -> Kernel:
    """A kernel by name (``"sgld"``, ``"psgld"``, ``"sghmc"``, ``"csgld"``) or a built :class:`Kernel`."""
    if isinstance(sampler, Kernel):
        if settings:
            raise ValueError("sampler_kwargs: pass settings to the build_* function of a pre-built kernel")
        return sampler
    key = str(sampler).lower()
    if key not in KERNELS:
        raise ValueError(f"sampler: unknown sampler {sampler!r}; choose one of {sorted(KERNELS)}")
    try:
        return KERNELS[key](**settings)
    except TypeError as err:
        raise ValueError(f"sampler_kwargs: {err}") from None


