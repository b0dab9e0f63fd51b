"""The one update core every Langevin sampler shares.

Each sampler is a :class:`Kernel`: a pair of small functions in the BlackJAX style,

    state = kernel.init(params)
    stats = kernel.step(params, grads, state, step_size, noise, noise_scale=1.0, batch_ndim=0)

operating in place on *lists* of tensors with ``torch._foreach_*`` ops (as torch.optim's
multi-tensor path does). Step size, minibatch and schedule all come from outside. The update
rules differ only in how they precondition the drift and scale the diffusion; the move itself,

    target <- target - h * drift + noise_scale * sqrt(2 h D) * xi,    xi ~ N(0, I),

is :func:`langevin_move_` for all of them, so the "noise uses the same h as the drift" rule
lives in one place.

``batch_ndim = 1`` means every tensor carries a leading chain dimension (batched chains);
statistics are then reduced per chain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Kernel", "GaussianNoise", "langevin_move_", "reduce_sum"]


class GaussianNoise:
    """Standard-normal noise for a list of tensors, from one flat buffer per step.

    One ``torch.randn`` call fills a single flat buffer that is then viewed as the parameter
    shapes: far fewer kernel launches than one draw per tensor, and the same numbers whatever the
    grouping of tensors, so an optimizer and the driver draw identical noise from one seed.

    With ``batched=True`` the tensors carry a leading chain dimension K and generator k fills row
    k, so chain k sees exactly the noise it would see running alone with its own generator.
    """

    def __init__(self, generators: torch.Generator | Sequence[torch.Generator], batched: bool = False) -> None:
        self.generators = [generators] if isinstance(generators, torch.Generator) else list(generators)
        self.batched = batched
        if not batched and len(self.generators) != 1:
            raise ValueError("generators: an unbatched noise source takes exactly one generator")
        self._buffer: Tensor | None = None
        self._views: list[Tensor] = []
        self._key: tuple = ()

    def _layout(self, like: Sequence[Tensor]) -> None:
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in like)
        if key == self._key:
            return
        dtype, device = like[0].dtype, like[0].device
        if self.batched:
            k = like[0].shape[0]
            if k != len(self.generators):
                raise ValueError(f"noise: {len(self.generators)} generators for {k} chains")
            sizes = [t[0].numel() for t in like]
            buf = torch.empty(k, sum(sizes), dtype=dtype, device=device)
            views, off = [], 0
            for t, n in zip(like, sizes):
                views.append(buf[:, off : off + n].view(t.shape))
                off += n
        else:
            sizes = [t.numel() for t in like]
            buf = torch.empty(sum(sizes), dtype=dtype, device=device)
            views = [v.view(t.shape) for v, t in zip(buf.split(sizes), like)]
        self._buffer, self._views, self._key = buf, views, key

    def draw(self, like: Sequence[Tensor]) -> list[Tensor]:
        """Fresh N(0, I) noise shaped like ``like`` (views into an internal buffer, valid until the next draw)."""
        self._layout(like)
        assert self._buffer is not None
        if self.batched:
            for k, gen in enumerate(self.generators):
                torch.randn(self._buffer.shape[1:], generator=gen, out=self._buffer[k])
        else:
            torch.randn(self._buffer.shape, generator=self.generators[0], out=self._buffer)
        return self._views


def langevin_move_(
    targets: list[Tensor],
    drifts: list[Tensor],
    step_size: float,
    noise: GaussianNoise | None,
    diffusion: float | list[Tensor] = 1.0,
    noise_scale: float = 1.0,
) -> None:
    """In place: ``target <- target - h * drift + noise_scale * sqrt(2 h D) * xi``.

    ``diffusion`` D is a scalar or a list of tensors (a diagonal preconditioner). With
    ``noise_scale == 0`` (or ``noise is None``) no noise is drawn: plain gradient descent.
    """
    torch._foreach_add_(targets, drifts, alpha=-step_size)
    if noise is None or noise_scale == 0.0:
        return
    xi = noise.draw(targets)
    if isinstance(diffusion, (int, float)):
        torch._foreach_add_(targets, xi, alpha=noise_scale * math.sqrt(2.0 * step_size * diffusion))
    else:
        std = torch._foreach_mul(diffusion, 2.0 * step_size)
        torch._foreach_sqrt_(std)
        if noise_scale != 1.0:
            torch._foreach_mul_(std, noise_scale)
        torch._foreach_addcmul_(targets, xi, std)


def reduce_sum(tensors: Sequence[Tensor], batch_ndim: int = 0) -> Tensor:
    """Sum of every element of every tensor, keeping the first ``batch_ndim`` dims."""
    parts = [t.sum(dim=tuple(range(batch_ndim, t.dim()))) if t.dim() > batch_ndim else t for t in tensors]
    return torch.stack(parts).sum(0)


@dataclass(frozen=True)
class Kernel:
    """A Langevin sampler as a pair of functions (BlackJAX style).

    Attributes:
        name: registry name ("sgld", "psgld", "sghmc").
        state_names: per-tensor state buffers the kernel keeps (e.g. ``("momentum",)``).
        init: ``init(params) -> {state_name: [tensor per param]}``.
        step: ``step(params, grads, state, step_size, noise, noise_scale=1.0, batch_ndim=0,
            with_stats=False) -> {stat_name: tensor}``; updates params and state in place.
        settings: the hyper-parameters it was built with (recorded in Posterior metadata).
    """

    name: str
    state_names: tuple[str, ...]
    init: Callable[[list[Tensor]], dict[str, list[Tensor]]]
    step: Callable[..., dict[str, Tensor]]
    settings: dict = field(default_factory=dict)
