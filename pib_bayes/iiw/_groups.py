"""Parameter groups for per-layer IIW: default = the module prefix of each parameter name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["layer_of", "resolve_groups"]


def layer_of(name: str) -> str:
    """``"features.0.weight" -> "features.0"``; a top-level parameter is its own group."""
    return name.rsplit(".", 1)[0] if "." in name else name


def resolve_groups(names: Sequence[str], groups: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """Group name -> parameter names, in the order of ``names`` within each group.

    ``groups=None`` groups by layer. A mapping ``{group: [parameter names]}`` may leave parameters
    out (they are then not measured); a name may appear in one group only.
    """
    names = list(names)
    if groups is None:
        out: dict[str, list[str]] = {}
        for n in names:
            out.setdefault(layer_of(n), []).append(n)
        return out
    if not isinstance(groups, Mapping):
        raise TypeError(f"groups: expected None or a mapping group -> list of parameter names, got "
                        f"{type(groups).__name__}")
    if not groups:
        raise ValueError("groups: is empty; pass None (one group per layer) or at least one group")
    seen: dict[str, str] = {}
    out = {}
    for g, members in groups.items():
        if isinstance(members, str):
            raise TypeError(f"groups: members of {g!r} must be a list of parameter names, got the string "
                            f"{members!r}; write [{members!r}]")
        members = list(members)
        unknown = [m for m in members if m not in names]
        if unknown:
            raise ValueError(f"groups: unknown parameter names {unknown} in group {g!r}; parameters are "
                             f"{names}")
        if not members:
            raise ValueError(f"groups: group {g!r} is empty")
        for m in members:
            if m in seen:
                raise ValueError(f"groups: parameter {m!r} is in both {seen[m]!r} and {g!r}; use each "
                                 f"name once")
            seen[m] = str(g)
        out[str(g)] = [n for n in names if n in members]
    return out
