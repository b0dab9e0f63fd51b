"""Fast batched forward passes over a chain dimension for common layer stacks.

``batched_forward(model)`` returns ``None`` when no fast path applies, or a function
``f(params, x, stacked) -> out`` with ``params`` name -> (K, *shape) and ``x`` either (K, B, ...)
(``stacked=True``) or (B, ...) shared by all chains, returning (K, B, ...). The driver then uses
it instead of ``torch.func.vmap`` for vectorized chains.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

__all__ = ["batched_forward"]

BatchedForward = Callable[[dict[str, Tensor], Tensor, bool], Tensor]


def batched_forward(model: nn.Module) -> BatchedForward | None:
    """No fast path yet: the driver falls back to ``vmap``."""
    return None
