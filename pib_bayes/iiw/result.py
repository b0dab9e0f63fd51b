"""The one result type shared by every IIW estimator (SPEC §3: per-group values, total, method, settings)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["IIWResult"]


@dataclass(frozen=True)
class IIWResult:
    """An estimate of the information in the weights, I(w; S).

    Attributes:
        per_group: group name (a layer by default) -> value in ``units``.
        total: the estimate for all groups together, in ``units``. For block-separable
            estimators (Fisher, ``structure="diag"``/``"block"``) it is the sum of ``per_group``;
            for joint structures (``"full"``, ``"lowrank"``) it is the joint value and
            ``per_group`` holds the marginal value of each group (``settings["total_rule"]`` says which).
        method: ``"fisher-jvp"``, ``"fisher-minibatch"``, ``"fisher-paper"``, ``"kl"`` or ``"channel"``.
        units: ``"nats"``, or ``"raw"`` for the paper's unscaled quadratic form Δθᵀ F Δθ.
        settings: every choice that produced the number (structure, shrinkage, draw counts, ...).
        raw_per_group, raw_total: Fisher only: the paper's raw scale Δθᵀ F Δθ (Wang et al. 2022),
            whatever ``units`` is.

    >>> r = IIWResult({"fc1": 0.5, "fc2": 0.25}, 0.75, "kl", "nats", {"structure": "diag"})
    >>> r.total, r["fc2"]
    (0.75, 0.25)
    """

    per_group: dict[str, float]
    total: float
    method: str
    units: str
    settings: dict[str, Any] = field(default_factory=dict)
    raw_per_group: dict[str, float] | None = None
    raw_total: float | None = None

    def __getitem__(self, group: str) -> float:
        try:
            return self.per_group[group]
        except KeyError:
            raise KeyError(f"group: {group!r} is not in this result; groups are "
                           f"{list(self.per_group)}") from None

    @property
    def groups(self) -> list[str]:
        return list(self.per_group)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (settings values that are not JSON are stringified)."""
        return json.loads(json.dumps({
            "per_group": self.per_group, "total": self.total, "method": self.method, "units": self.units,
            "settings": self.settings, "raw_per_group": self.raw_per_group, "raw_total": self.raw_total,
        }, default=str))

    def __repr__(self) -> str:
        groups = ", ".join(f"{k}={v:.4g}" for k, v in self.per_group.items())
        raw = f", raw_total={self.raw_total:.4g}" if self.raw_total is not None else ""
        return f"IIWResult({self.method}: total={self.total:.4g} {self.units}{raw}; {groups})"
