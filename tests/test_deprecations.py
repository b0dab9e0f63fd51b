"""Deprecated names (issue 17, docs/api.md "Deprecated names"): each old argument name still works for one
release, warns with a FutureWarning naming the new name, and gives the same result as the new name.
The renamed config keys are tested in tests/test_config.py and tests/test_cli.py."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import pib_bayes as pb
from pib_bayes import diagnostics as D
from pib_bayes._validate import REMOVED_IN, renamed_args, warn_renamed


# --------------------------------------------------------------------------------------- the helper
def test_renamed_args_warns_naming_the_new_name_and_passes_the_value():
    @renamed_args(old="new")
    def f(new: int, other: int = 0) -> int:
        """Doc."""
        return 10 * new + other

    with pytest.warns(FutureWarning, match=rf"^f\(\): the argument 'old' is deprecated, use 'new' "
                                           rf"\(the old name goes in {REMOVED_IN}\)$"):
        assert f(old=3, other=1) == 31
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name and positional calls never warn
        assert f(3, other=1) == f(new=3, other=1) == 31
    assert list(inspect.signature(f).parameters) == ["new", "other"] and f.__doc__ == "Doc."
    with pytest.raises(TypeError, match=r"^new: given twice, as 'new' and as its deprecated name 'old'"):
        f(old=1, new=2)


def test_the_warning_points_at_the_caller():
    @renamed_args(old="new")
    def f(new: int) -> int:
        return new

    with pytest.warns(FutureWarning) as caught:
        f(old=1)
    assert caught[0].filename == __file__


def test_warn_renamed_for_config_keys():
    message = r"^the config key 'run\.draws' is deprecated, use 'run\.num_draws'"
    with pytest.warns(FutureWarning, match=message):
        warn_renamed("run.draws", "run.num_draws", what="the config key")


# ------------------------------------------------------------------- diagnostics: post= -> posterior=
def _posterior() -> pb.Posterior:
    torch.manual_seed(0)
    net = nn.Linear(2, 1)
    g = torch.Generator().manual_seed(1)
    draws = {n: p.detach() + 0.1 * torch.randn(2, 8, *p.shape, generator=g)
             for n, p in net.named_parameters()}
    stats = {"energy": torch.randn(2, 8, generator=g)}
    return pb.Posterior(draws, stats, {"task": "regression", "noise_std": 1.0}, model=net)


X = torch.linspace(-1, 1, 10).reshape(5, 2)
Y = X.sum(1, keepdim=True)

CALLS = {
    "log_likelihood": lambda kw: D.log_likelihood(x=X, y=Y, **kw),
    "random_projections": lambda kw: D.random_projections(num_projections=3, **kw),
    "scalar_quantities": lambda kw: D.scalar_quantities(data=(X, Y), **kw)[0],
    "summary": lambda kw: D.summary(warn=False, **kw),
    "to_arviz": lambda kw: D.to_arviz(data=(X, Y), **kw).posterior["weight"].values,
    "ksd": lambda kw: D.ksd(energy=pb.Energy(kw_model(kw), pb.GaussianLoss(1.0), prior=1.0, beta=0.2),
                            data=(X, Y), **kw),
}


def kw_model(kw: dict) -> nn.Module:
    return next(iter(kw.values())).model


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, pd.DataFrame):
        return a.equals(b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    return bool(np.array_equal(a, b))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_post_is_a_deprecated_name_of_posterior(name):
    assert list(inspect.signature(getattr(D, name)).parameters)[0] == "posterior"
    new = CALLS[name]({"posterior": _posterior()})
    message = rf"{name}\(\): the argument 'post' is deprecated, use 'posterior'"
    with pytest.warns(FutureWarning, match=message):
        old = CALLS[name]({"post": _posterior()})
    assert _same(old, new)
    # "would catch the bug": a different posterior gives a different result, so _same can fail
    other = _posterior()
    for v in other.draws.values():
        v += 1.0
    assert not _same(CALLS[name]({"posterior": other}), new)


def test_a_wrong_posterior_is_named_posterior():
    with pytest.raises(TypeError, match=r"^posterior: expected a pib_bayes.Posterior"):
        D.summary("not a posterior")
    with pytest.raises(TypeError, match=r"^posterior: expected a pib_bayes.Posterior"):
        D.random_projections(3, 2)


# ------------------------------------------- pyro and plots: post= -> posterior=, NUTS' Pyro-style names
def test_to_predictive_samples_and_plot_energy_take_posterior(tmp_path):
    from pib_bayes import plots
    from pib_bayes.pyro import to_predictive_samples

    for fn in (to_predictive_samples, plots.plot_energy):
        assert list(inspect.signature(fn).parameters)[0] == "posterior"
    new = to_predictive_samples(posterior=_posterior())
    with pytest.warns(FutureWarning, match=r"to_predictive_samples\(\): the argument 'post' is deprecated"):
        old = to_predictive_samples(post=_posterior())
    assert _same(old, new)
    other = _posterior()
    for v in other.draws.values():
        v += 1.0
    assert not _same(to_predictive_samples(posterior=other), new)  # _same can fail
    with pytest.warns(FutureWarning, match=r"plot_energy\(\): the argument 'post' is deprecated"):
        assert plots.plot_energy(post=_posterior(), path=tmp_path / "e.png").endswith("e.png")


def test_nuts_reference_num_samples_and_warmup_steps_are_deprecated_names():
    import pyro
    import pyro.distributions as dist

    from pib_bayes.pyro import nuts_reference

    def model():
        pyro.sample("w", dist.Normal(0.0, 1.0))

    new = nuts_reference(model, num_draws=6, num_warmup=4, seed=1)
    with pytest.warns(FutureWarning, match=r"nuts_reference\(\): the argument 'num_samples' is deprecated, "
                                           r"use 'num_draws'"):
        with pytest.warns(FutureWarning, match="'warmup_steps' is deprecated, use 'num_warmup'"):
            old = nuts_reference(model, num_samples=6, warmup_steps=4, seed=1)
    assert torch.equal(old.draws["w"], new.draws["w"]) and old.metadata["num_warmup"] == 4
    other = nuts_reference(model, num_draws=6, num_warmup=4, seed=2)
    assert not torch.equal(other.draws["w"], new.draws["w"])  # the comparison can fail
