"""Data-dependent prior mean θ₀ fitted on a held-out split, never on S (SPEC §1; Wang et al. 2022).

PAC-Bayes bounds stay valid when the prior depends on data disjoint from the sample S the posterior
is trained on. :func:`split_for_prior` splits the data once; :func:`fit_prior_mean` trains a copy of
the model on the prior split only and returns its weights as a state dict, to be used as

    GaussianPrior.from_module(model, std, mean=theta_0)       # sampling prior
    fisher(model, loss_fn, S, theta_0) / IIWRegularizer(...)  # Δθ = θ_S − θ₀

The PIB authors' prior (SPEC §3d, their ``train_prior``) is the option ``**PAPER_PRIOR``: Adam (lr 1e-3,
weight decay 1e-5, batch 128) for 10 epochs on the held-out split gives θ₀, then the model itself is
re-initialised (:func:`paper_init_`: Linear weights N(0, 0.01²), biases 0), so Δθ ≠ 0 from the start.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import is_int, is_real
from ..data import as_tensors
from ..energy import resolve_loss

__all__ = ["split_for_prior", "fit_prior_mean", "paper_init_", "PAPER_PRIOR"]

#: The authors' prior recipe (``src/utils.py: train_prior``): ``fit_prior_mean(model, loss, prior_data,
#: **PAPER_PRIOR)``.
PAPER_PRIOR: dict[str, Any] = {"epochs": 10, "lr": 1e-3, "weight_decay": 1e-5, "batch_size": 128,
                               "optimizer": "adam", "reinit_std": 0.01}


def split_for_prior(data: Any, fraction: float = 0.2, seed: int = 0
                    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Random disjoint split ``(prior_data, sample_data)`` with ``fraction`` of the examples for the prior.

    >>> x, y = torch.randn(10, 2), torch.randn(10)
    >>> (xp, yp), (xs, ys) = split_for_prior((x, y), fraction=0.3)
    >>> len(xp), len(xs)
    (3, 7)
    """
    tensors = as_tensors(data)
    if tensors is None:
        raise TypeError("data: split_for_prior needs (x, y) tensors or a TensorDataset")
    return random_split(*tensors, fraction, seed, "fraction")


def random_split(x: Tensor, y: Tensor, fraction: float, seed: int, arg: str
                 ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``fraction`` of the examples (at random, seeded) and the rest; ``arg`` names the fraction in errors.
    Shared by :func:`split_for_prior` and :func:`pib_bayes.bounds.split_data`."""
    if not is_real(fraction) or not 0 < fraction < 1:
        raise ValueError(f"{arg}: must be a float in (0, 1) (share of examples for the prior), got "
                         f"{fraction!r}")
    n = x.shape[0]
    k = int(round(fraction * n))
    if not 1 <= k <= n - 1:
        raise ValueError(f"{arg}: {fraction} of {n} examples leaves an empty split; use more data or "
                         "another fraction")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return (x[perm[:k]], y[perm[:k]]), (x[perm[k:]], y[perm[k:]])


def train_copy(model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
               batches: Iterable[Tensor | slice], *, lr: float, optimizer: str = "adam",
               weight_decay: float = 0.0) -> dict[str, Tensor]:
    """Train a copy of ``model`` on ``(x, y)``, one optimizer step per index batch of ``batches``
    (mean loss), and return its trainable weights; ``model`` is not changed. Shared by
    :func:`fit_prior_mean` (epochs of shuffled minibatches) and :func:`pib_bayes.bounds.fit_prior`
    (steps of random minibatches)."""
    net = copy.deepcopy(model)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = (torch.optim.Adam(params, lr=lr, weight_decay=weight_decay) if optimizer == "adam"
           else torch.optim.SGD(params, lr=lr, weight_decay=weight_decay))
    for i, idx in enumerate(batches):
        opt.zero_grad()
        if i == 0:  # the first batch tells whether the model and loss can take the data at all
            try:
                out = loss(net(x[idx]), y[idx])
            except (RuntimeError, IndexError, TypeError, ValueError) as err:
                raise ValueError(f"prior_data: the model and loss cannot be evaluated on x of shape "
                                 f"{tuple(x.shape)}, dtype {x.dtype} and y of shape {tuple(y.shape)}, dtype "
                                 f"{y.dtype} ({type(err).__name__}: {err}); x must have the model's input "
                                 "width and dtype, y the targets the loss expects") from err
        else:
            out = loss(net(x[idx]), y[idx])
        (out if out.dim() == 0 else out.mean()).backward()
        opt.step()
    return {name: p.detach().clone() for name, p in net.named_parameters() if p.requires_grad}


def fit_prior_mean(
    model: nn.Module,
    loss_fn: Any,
    prior_data: Any,
    *,
    epochs: int = 10,
    lr: float = 1e-2,
    batch_size: int = 128,
    optimizer: str = "adam",
    seed: int = 0,
    weight_decay: float = 0.0,
    reinit_std: float | None = None,
) -> dict[str, Tensor]:
    """Train a copy of ``model`` on ``prior_data`` (held out from S) and return its trainable weights.

    Minimises the mean per-example loss with Adam or SGD (``weight_decay``: torch's L2 term
    ``grad + weight_decay·w``) for ``epochs`` passes of shuffled minibatches, starting from the
    model's current weights. The result is a state dict ``name -> tensor`` for
    ``GaussianPrior.from_module(model, std, mean=...)`` and for ``theta_0`` of the IIW estimators.

    ``model`` itself is not changed, unless ``reinit_std`` is given: then, after the fit, it is
    re-initialised in place by :func:`paper_init_` (Linear weights N(0, reinit_std²), zero biases),
    the PIB authors' ``train_prior`` + ``_initialize_weights`` (SPEC §3d), so that training starts
    away from θ₀. ``fit_prior_mean(model, loss, prior_data, **PAPER_PRIOR)`` is their recipe: Adam,
    lr 1e-3, weight decay 1e-5, batch 128, 10 epochs, then N(0, 0.01²). Their loop also stops early
    when the accuracy on the prior split itself stalls for 3 epochs; that stop is not reproduced
    (the ``epochs`` are run).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0) and None
        >>> net = nn.Linear(2, 1)
        >>> x = torch.randn(200, 2); y = x @ torch.tensor([[1.0], [-2.0]])
        >>> prior_data, sample = split_for_prior((x, y), fraction=0.5)
        >>> theta_0 = fit_prior_mean(net, "gaussian", prior_data, epochs=200, lr=0.05)
        >>> [round(v, 1) for v in theta_0["weight"].flatten().tolist()]
        [1.0, -2.0]
        >>> theta_0 = fit_prior_mean(net, "gaussian", prior_data, **PAPER_PRIOR)  # the authors' prior
        >>> float(net.bias.abs().max()), float(net.weight.abs().max()) < 0.05   # net re-initialised
        (0.0, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    tensors = as_tensors(prior_data)
    if tensors is None:
        raise TypeError("prior_data: needs (x, y) tensors or a TensorDataset (the held-out split)")
    for label, v in (("epochs", epochs), ("batch_size", batch_size)):
        if not is_int(v) or v < 1:
            raise ValueError(f"{label}: must be an int >= 1, got {v!r}")
    if not is_real(lr) or not 0 < lr < float("inf"):
        raise ValueError(f"lr: the learning rate must be a finite float > 0, e.g. 1e-2, got {lr!r}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer: expected 'adam' or 'sgd', got {optimizer!r}")
    if not is_real(weight_decay) or not 0 <= weight_decay < float("inf"):
        raise ValueError(f"weight_decay: must be a finite float >= 0 (the authors' prior uses 1e-5), got "
                         f"{weight_decay!r}")
    if reinit_std is not None:
        _check_std(reinit_std)
    loss, _ = resolve_loss(loss_fn)
    x, y = tensors
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]

    def batches() -> Iterator[Tensor]:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                yield perm[start:start + batch_size]

    theta_0 = train_copy(model, loss, x, y, batches(), lr=lr, optimizer=optimizer, weight_decay=weight_decay)
    if reinit_std is not None:
        paper_init_(model, std=reinit_std, seed=seed)
    return theta_0


def _check_std(std: float) -> None:
    if not is_real(std) or not 0 < std < float("inf"):
        raise ValueError(f"reinit_std: must be a finite float > 0 (the authors use 0.01), got {std!r}")


def paper_init_(model: nn.Module, *, std: float = 0.01, seed: int = 0) -> nn.Module:
    """Re-initialise ``model`` in place as the PIB authors' ``_initialize_weights`` (src/models.py).

    ``nn.Linear``: weight ~ N(0, std²), bias 0; ``nn.Conv2d``: weight ~ N(0, 2 / (k_h k_w out_channels)),
    bias 0; ``nn.BatchNorm2d``: weight 1, bias 0; other modules are left as they are. The draws come from a
    ``torch.Generator`` seeded with ``seed`` (their code uses the global stream). Returns ``model``.

    >>> net = paper_init_(nn.Linear(100, 50), seed=0)
    >>> float(net.bias.abs().max()), round(float(net.weight.std()), 3)
    (0.0, 0.01)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _check_std(std)
    gen = torch.Generator().manual_seed(int(seed))

    def normal_(w: Tensor, sd: float) -> None:
        w.copy_(sd * torch.randn(w.shape, generator=gen, dtype=w.dtype).to(w.device))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                normal_(m.weight, (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, nn.Linear):
                normal_(m.weight, float(std))
                if m.bias is not None:
                    m.bias.zero_()
    return model
