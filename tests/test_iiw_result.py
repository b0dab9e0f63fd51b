"""pib_bayes.iiw.result: the one result type of every IIW estimator (per-group values, total, method,
units, settings)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pib_bayes.iiw import IIWResult, kl
from pib_bayes.iiw.result import IIWResult as FromModule


def _result(**kw) -> IIWResult:
    base = dict(per_group={"fc1": 0.5, "fc2": 0.25}, total=0.75, method="kl", units="nats",
                settings={"structure": "diag"})
    return IIWResult(**{**base, **kw})


def test_groups_and_lookup():
    r = _result()
    assert FromModule is IIWResult
    assert r.groups == ["fc1", "fc2"] and r["fc1"] == 0.5 and r["fc2"] == 0.25
    with pytest.raises(KeyError, match=r"group: 'fc3' is not in this result; groups are \['fc1', 'fc2'\]"):
        r["fc3"]


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _result().total = 1.0  # type: ignore[misc]


def test_to_dict_is_json_and_stringifies_what_json_cannot_hold():
    r = _result(settings={"structure": "diag", "device": torch.device("cpu"), "shape": (2, 3)},
                raw_per_group={"fc1": 1.0, "fc2": 0.5}, raw_total=1.5)
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["settings"] == {"structure": "diag", "device": "cpu", "shape": [2, 3]}
    assert (d["total"], d["method"], d["units"], d["raw_total"]) == (0.75, "kl", "nats", 1.5)
    assert d["per_group"] == r.per_group and d["raw_per_group"] == {"fc1": 1.0, "fc2": 0.5}


def test_repr_names_method_total_units_and_groups():
    assert repr(_result()) == "IIWResult(kl: total=0.75 nats; fc1=0.5, fc2=0.25)"
    assert repr(_result(raw_total=3.0)) == "IIWResult(kl: total=0.75 nats, raw_total=3; fc1=0.5, fc2=0.25)"


def test_an_estimator_returns_it_with_per_group_values_summing_to_the_total_for_diag():
    from pib_bayes import GaussianPrior, Posterior

    g = torch.Generator().manual_seed(0)
    post = Posterior({"a.weight": 0.5 * torch.randn(2, 400, 3, generator=g, dtype=torch.float64),
                      "b.weight": 0.5 * torch.randn(2, 400, 2, generator=g, dtype=torch.float64)}, {}, {})
    r = kl(post, GaussianPrior(std=1.0), structure="diag")
    assert isinstance(r, IIWResult) and r.method == "kl" and r.units == "nats"
    assert r.groups == ["a", "b"]
    assert r.total == pytest.approx(sum(r.per_group.values()), rel=1e-12)
