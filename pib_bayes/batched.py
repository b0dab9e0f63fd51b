"""Fast batched forward passes over a chain dimension for common layer stacks.

``batched_forward(model)`` returns ``None`` when no fast path applies, or a function
``f(params, x, stacked) -> out`` with ``params`` name -> (K, *shape) and ``x`` either (K, B, ...)
(``stacked=True``, one minibatch per chain) or (B, ...) shared by all chains, returning (K, B, ...).
The driver then uses it instead of ``torch.func.vmap`` for vectorized chains.

The fast path covers ``nn.Sequential`` stacks (nested ``nn.Sequential`` are flattened) of
``nn.Linear`` and elementwise activations (ReLU, Tanh, Sigmoid, GELU, Identity, LeakyReLU, ELU,
SiLU, Softplus), optionally starting with ``nn.Flatten()``. Each linear layer of the K chains is
one batched matrix product over the chain dimension,

    h_k <- b_k + h_k W_k^T = (b_k + W_k h_k^T)^T   for k = 1..K   (one ``torch.baddbmm`` call),

instead of K small products (sequential chains) or ``vmap``'s per-operator batching rules. On small
layers, where per-operator overhead dominates, this is several times faster than either; see
``docs/samplers.md`` and ``benchmarks/bench_chains.py`` for the measured numbers. Everything is
an ordinary differentiable torch op, so ``torch.autograd.grad`` through the output gives each
chain's own gradient.

Anything else (other layer types, custom ``forward`` methods, forward hooks, buffers, frozen
parameters) gives ``None`` and the driver falls back to ``vmap``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_mod

__all__ = ["batched_forward"]

BatchedForward = Callable[[dict[str, Tensor], Tensor, bool], Tensor]
_Act = Callable[[Tensor], Tensor]


def _activation(layer: nn.Module) -> _Act | None:
    """The elementwise function a supported activation module computes, or None."""
    kind = type(layer)
    if kind is nn.Identity:
        return lambda h: h
    if kind is nn.ReLU:
        return F.relu
    if kind is nn.Tanh:
        return torch.tanh
    if kind is nn.Sigmoid:
        return torch.sigmoid
    if kind is nn.SiLU:
        return F.silu
    if kind is nn.GELU:
        approximate = layer.approximate  # type: ignore[union-attr]
        return lambda h: F.gelu(h, approximate=approximate)
    if kind is nn.LeakyReLU:
        slope = layer.negative_slope  # type: ignore[union-attr]
        return lambda h: F.leaky_relu(h, slope)
    if kind is nn.ELU:
        alpha = layer.alpha  # type: ignore[union-attr]
        return lambda h: F.elu(h, alpha)
    if kind is nn.Softplus:
        beta, threshold = layer.beta, layer.threshold  # type: ignore[union-attr]
        return lambda h: F.softplus(h, beta, threshold)
    return None


def _leaves(seq: nn.Sequential, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """(name prefix, layer) of a Sequential, nested Sequentials flattened in order."""
    for name, child in seq.named_children():
        if type(child) is nn.Sequential:
            yield from _leaves(child, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}.", child


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None)
                or getattr(m, "_backward_pre_hooks", None))


def _global_hooks() -> bool:
    return bool(getattr(_module_mod, "_global_forward_hooks", None)
                or getattr(_module_mod, "_global_forward_pre_hooks", None))


def batched_forward(model: nn.Module) -> BatchedForward | None:
    """A batched-matmul forward over the chain dimension for an MLP, or ``None`` (use ``vmap``).

    Supported: ``nn.Sequential`` (nested ones flattened) of ``nn.Linear`` and the elementwise
    activations ReLU, Tanh, Sigmoid, GELU, Identity, LeakyReLU, ELU, SiLU, Softplus, with an
    optional leading ``nn.Flatten()``; every parameter trainable and no buffers (the driver passes
    only the sampled parameters). For chain k the output is exactly ``functional_call(model,
    params_k, x_k)``: each linear layer computes ``h <- b_k + h W_k^T`` for all K chains with one
    ``torch.baddbmm``.

    Args:
        model: the module to be sampled.

    Returns:
        ``f(params, x, stacked)`` with ``params`` name -> (K, *shape) and ``x`` of shape
        (K, B, ...) if ``stacked`` else (B, ...) (shared by all chains); the result is (K, B, ...).
        ``None`` when the model is not such a stack.

    >>> import torch
    >>> from torch import nn
    >>> from torch.func import functional_call
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> f = batched_forward(net)
    >>> params = {n: torch.stack([p.detach(), p.detach() + 1]) for n, p in net.named_parameters()}
    >>> x = torch.randn(5, 3)
    >>> out = f(params, x, False)
    >>> out.shape
    torch.Size([2, 5, 2])
    >>> torch.allclose(out[1], functional_call(net, {n: p[1] for n, p in params.items()}, (x,)), atol=1e-6)
    True
    >>> batched_forward(nn.Conv2d(1, 1, 3)) is None
    True
    """
    if type(model) is not nn.Sequential or _global_hooks():
        return None
    if any(True for _ in model.buffers()) or any(not p.requires_grad for p in model.parameters()):
        return None
    if any(_has_hooks(m) for m in model.modules()):
        return None

    # ops: ("linear", weight name, bias name or None) | ("act", fn) | ("flatten", None)
    ops: list[tuple] = []
    covered: set[str] = set()
    for i, (prefix, layer) in enumerate(_leaves(model, "")):
        if type(layer) is nn.Linear:
            w, b = prefix + "weight", (prefix + "bias" if layer.bias is not None else None)
            ops.append(("linear", w, b))
            covered.update(n for n in (w, b) if n is not None)
        elif type(layer) is nn.Flatten:
            if i != 0 or layer.start_dim != 1 or layer.end_dim != -1:
                return None
            ops.append(("flatten", None))
        else:
            fn = _activation(layer)
            if fn is None:
                return None
            ops.append(("act", fn))
    names = {n for n, _ in model.named_parameters()}
    if names != covered or not any(op[0] == "linear" for op in ops):
        return None

    def forward(params: dict[str, Tensor], x: Tensor, stacked: bool) -> Tensor:
        k = params[next(op[1] for op in ops if op[0] == "linear")].shape[0]
        if not stacked:  # shared input: a broadcast view, no copy
            x = x.unsqueeze(0).expand(k, *x.shape)
        h = x
        for op in ops:
            if op[0] == "linear":
                weight = params[op[1]]
                lead = h.shape[1:-1]
                flat = h.dim() != 3  # (K, B, in) goes straight in; other shapes via (K, B*, in)
                h3 = h.reshape(k, -1, h.shape[-1]) if flat else h
                # (W h^T)^T rather than h W^T: the gradient bmm(grad, h) then comes out as a
                # contiguous (K, out, in) tensor, like the weight, so the sampler's update reads
                # it with unit stride (h W^T would give a transposed, strided weight gradient)
                ht = h3.transpose(1, 2)  # (K, in, B*)
                if op[2] is not None:
                    z = torch.baddbmm(params[op[2]].unsqueeze(2), weight, ht)  # (K, out, B*)
                else:
                    z = torch.bmm(weight, ht)
                h3 = z.transpose(1, 2)
                h = h3.reshape(k, *lead, weight.shape[1]) if flat else h3
            elif op[0] == "flatten":
                h = h.flatten(2)
            else:
                h = op[1](h)
        return h

    return forward
