"""Choosing a subnetwork: which parameters of a model are sampled (``sample(..., params=...)``)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import Tensor, nn

__all__ = ["select_params"]

Selection = str | nn.Module | Tensor | Iterable[str | nn.Module | Tensor]


def select_params(model: nn.Module, params: Selection) -> list[str]:
    """The names (in the model's parameter order) of the parameters ``params`` selects.

    ``params`` is one entry or a list of them; an entry is a parameter name (``"head.weight"``),
    a glob pattern over names (``"head.*"``, ``"*.bias"``; :mod:`fnmatch` rules), a submodule of
    ``model`` (all its parameters) or a parameter of ``model`` itself. Shared (tied) parameters
    are matched by identity, under the name ``model.named_parameters()`` gives them. Every entry
    must select something, and the selection must not be empty.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    >>> select_params(net, net[2]), select_params(net, "*.bias")
    (['2.weight', '2.bias'], ['0.bias', '2.bias'])
    """
    named = list(model.named_parameters())
    all_names = [n for n, _ in named]
    by_id = {id(p): n for n, p in named}
    entries = [params] if isinstance(params, (str, nn.Module, Tensor)) else params
    try:
        entries = list(entries)
    except TypeError:
        raise TypeError(f"params: expected names, glob patterns, submodules or parameters of the model "
                        f"(or a list of them), got {type(params).__name__}") from None
    if not entries:
        raise ValueError("params: the selection is empty; name at least one parameter, pattern or submodule "
                         "(or leave params=None to sample every trainable parameter)")
    chosen: set[str] = set()
    for entry in entries:
        if isinstance(entry, str):
            hits = [n for n in all_names if n == entry or fnmatch.fnmatchcase(n, entry)]
            if not hits:
                raise ValueError(f"params: {entry!r} matches no parameter of the model; its parameters are "
                                 f"{all_names}")
        elif isinstance(entry, nn.Module):
            if not any(m is entry for m in model.modules()):
                raise ValueError(f"params: the module {type(entry).__name__} is not a submodule of the model "
                                 "(pass a module taken from inside it, e.g. model.head)")
            hits = [by_id[id(p)] for p in entry.parameters()]
            if not hits:
                raise ValueError(f"params: the submodule {type(entry).__name__} has no parameters")
        elif isinstance(entry, Tensor):
            if id(entry) not in by_id:
                raise ValueError(f"params: a tensor of shape {tuple(entry.shape)} is not a parameter of the "
                                 "model")
            hits = [by_id[id(entry)]]
        else:
            raise TypeError(f"params: entries must be names, glob patterns, submodules or parameters, got "
                            f"{type(entry).__name__}")
        chosen.update(hits)
    return [n for n in all_names if n in chosen]
