"""The PIB authors' IIW estimator (SPEC §3d; Wang et al. 2022, code ``MLP.compute_information_bp_fast``).

K minibatches of b examples are drawn with replacement (each index uniform on 1..n), the network in
train mode; the gradients of the mean loss are SUMMED over the K batches and scaled by 1/N_b with
N_b = ceil(n / b) (not 1/K), and for each weight tensor l (a parameter whose name contains
``"weight"``: their rule, biases excluded)

    g_l = (1/N_b) Σ_k ∇_{w_l} mean-loss(batch k),     IIW_l = ((w_l − w0_l) · g_l)².

``num_batches="all"`` is their ``compute_information_bp_fast_all_sample``: the N_b consecutive batches
``x[k b:(k+1) b]`` instead of K random ones. It is the square of a (scaled) full-data mean gradient's
projection on Δθ, not a per-example Fisher quadratic form; :func:`~pib_bayes.iiw.fisher` with
``method="paper"`` returns it, :func:`pib_bayes.train_pib` uses its gradients for the penalty.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._validate import is_int

__all__ = ["is_weight", "check_paper_batches", "paper_gradients", "paper_iiw"]


def is_weight(name: str) -> bool:
    """The authors' rule for the tensors that carry IIW: ``"weight" in name`` (biases excluded)."""
    return "weight" in name


def check_paper_batches(num_batches: int | str, batch_size: int) -> None:
    """Validate ``num_batches`` (an int >= 1 or ``"all"``) and ``batch_size`` (an int >= 1)."""
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size: must be an int >= 1 (the authors use 1000), got {batch_size!r}")
    if num_batches == "all":
        return
    if not is_int(num_batches) or num_batches < 1:
        raise ValueError(f"num_batches: must be an int >= 1 (the authors use 10) or 'all' (every one of the "
                         f"ceil(n / batch_size) consecutive batches), got {num_batches!r}")


def paper_gradients(
    model: nn.Module,
    loss_fn,
    x: Tensor,
    y: Tensor,
    names: Sequence[str],
    *,
    params: Mapping[str, Tensor] | None = None,
    fixed: Mapping[str, Tensor] | None = None,
    batch_size: int = 1000,
    num_batches: int | str = 10,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """``g_l = (1/N_b) Σ_k ∇_{w_l} mean-loss(batch k)`` for each name in ``names`` (detached).

    ``loss_fn`` returns one loss per example (``reduction="none"``); the batch loss is their mean. The
    model runs in train mode (as the authors' code), its own mode restored afterwards; buffers are
    copies, so BatchNorm running statistics are not changed. Random batches take
    ``torch.randint(n, (batch_size,), generator=generator)``, one call per batch; a
    ``torch.Generator`` rather than a ``seed``, since a training loop calls this every step and the
    batches must continue one stream (:mod:`pib_bayes.pib_train` passes its own).
    """
    check_paper_batches(num_batches, batch_size)
    n = x.shape[0]
    if n == 0:
        raise ValueError("data: is empty")
    n_b = math.ceil(n / batch_size)
    base = dict(params) if params is not None else {k: p.detach() for k, p in model.named_parameters()}
    fixed = dict(fixed) if fixed is not None else {k: b for k, b in model.named_buffers()}
    if num_batches == "all":
        index_batches = [slice(k * batch_size, (k + 1) * batch_size) for k in range(n_b)]
    else:
        index_batches = [torch.randint(n, (batch_size,), generator=generator) for _ in range(num_batches)]
    sums = {k: torch.zeros_like(base[k]) for k in names}
    was_training = model.training
    model.train()
    try:
        for idx in index_batches:
            p = {k: (v.detach().clone().requires_grad_(True) if k in sums else v.detach())
                 for k, v in base.items()}
            state = {k: b.clone() for k, b in fixed.items()}
            with torch.enable_grad():
                losses = loss_fn(functional_call(model, {**state, **p}, (x[idx],)), y[idx])
                grads = torch.autograd.grad(losses.mean(), [p[k] for k in names], allow_unused=True)
            for k, g in zip(names, grads, strict=True):
                if g is not None:
                    sums[k] += g
    finally:
        model.train(was_training)
    return {k: v / n_b for k, v in sums.items()}


def paper_iiw(delta: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> dict[str, float]:
    """``IIW_l = ((w_l − w0_l) · g_l)²`` per weight tensor (float64 dot product)."""
    return {k: float((delta[k].double() * g.double()).sum().square()) for k, g in grads.items()}
