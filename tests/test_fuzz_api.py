"""Fuzz of the public Python API (issue 19, item 2).

Every case calls one entry point with ONE bad argument and expects exactly one exception of a library
error type (``ValueError``/``TypeError``/``KeyError``, ``FormatError`` being a ``ValueError``), raised
by pib_bayes itself (the innermost frame of the traceback lies in the package: no deep torch/numpy/
Python exception passed through), whose message names the argument. The cases are: a grid of wrong
types and out-of-range values per argument (``GRID``), the inputs the issue lists as silently wrong or
unclear (``LISTED``), and hypothesis strategies of wrong types/ranges (``test_hypothesis_*``). Fixtures
are tiny (a 3-2 linear model, 16 rows) and built once per module; nothing here runs more than a few
sampler steps.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pib_bayes as pb
from pib_bayes import GaussianPrior, Posterior, Prediction, iiw, sample
from pib_bayes import bounds as B
from pib_bayes import diagnostics as D
from pib_bayes import uncertainty as U

ERRORS = (ValueError, TypeError, KeyError)
NAN, INF = math.nan, math.inf
PKG = str(Path(pb.__file__).parent)

_g = torch.Generator().manual_seed(0)
X = torch.randn(16, 3, generator=_g)
Y = torch.randint(0, 2, (16,), generator=_g)
Y_REG = torch.randn(16, 2, generator=_g)
P3 = torch.softmax(torch.randn(4, 6, 3, generator=_g), -1)
Y6 = torch.randint(0, 3, (6,), generator=_g)
F = torch.randn(5, 4, generator=_g)  # regression draws (draws, points)
LO, HI = torch.zeros(4), torch.ones(4)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


MODEL = net()


def other_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def make_post(model: nn.Module | None = MODEL, num_draws: int = 6, task: str = "classification") -> Posterior:
    g = torch.Generator().manual_seed(1)
    return Posterior(
        {
            "weight": torch.randn(2, num_draws, 2, 3, generator=g),
            "bias": torch.randn(2, num_draws, 2, generator=g),
        },
        {"energy": torch.randn(2, num_draws, generator=g)},
        {"task": task},
        model=model,
    )


POST = make_post()
POSTS = [make_post(None, 8), make_post(None, 8)]
for _i, _p in enumerate(POSTS):
    _p.draws["weight"] = _p.draws["weight"] + _i
PRED = POST.predict(X[:4])


def run(**kw):
    """pib_bayes.sample on the tiny model; bad arguments fail before (or at) the first step."""
    args = {
        "model": net(),
        "loss_fn": "cross_entropy",
        "data": (X, Y),
        "beta": 0.1,
        "num_warmup": 1,
        "num_draws": 2,
    }
    args.update(kw)
    model, loss_fn, data = args.pop("model"), args.pop("loss_fn"), args.pop("data")
    return sample(model, loss_fn, data, **args)


def names(arg: str, message: str) -> bool:
    """True when ``arg`` appears in ``message`` as a name (not inside a longer word)."""
    return re.search(rf"(?<![\w.]){re.escape(arg)}(?!\w)", message) is not None


def check(fn, arg: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except ERRORS as err:
            message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
            assert names(arg, message), f"the message does not name {arg!r}: {type(err).__name__}: {err}"
            frame = err.__traceback__
            while frame.tb_next is not None:
                frame = frame.tb_next
            where = frame.tb_frame.f_code.co_filename
            assert where.startswith(PKG), f"raised outside pib_bayes ({where}): {type(err).__name__}: {err}"
            return
        except Exception as err:  # noqa: BLE001 - the point: anything else is a failure
            pytest.fail(f"{arg}: unclear {type(err).__name__}: {err}")
    pytest.fail(f"{arg}: accepted silently")


# ------------------------------------------------------------------------- value pools
NOT_INT = ["2", 1.5, True, NAN, [1], None, 2.0]
NOT_POS_INT = [0, -1, *NOT_INT]
NOT_NONNEG_INT = [-1, -5, *NOT_INT]
NOT_BOOL = ["yes", "no", "x", 1, 0, None, [True], 1.0]
NOT_POS_REAL = [0.0, -1.0, NAN, INF, -INF, "0.1", True, [0.1], None, 1j]
NOT_CHOICE = ["nope", "", 3, None, ["auto"], 1.5]
NOT_PROB01 = [-0.1, 1.5, NAN, INF, "0.5", True, None, [0.5]]


def _dir_path(tmp: Path) -> Path:
    return tmp


def _grid():
    cases = []

    def add(group: str, arg: str, values, call):
        for i, v in enumerate(values):
            cases.append(pytest.param(lambda v=v: call(v), arg, id=f"{group}-{arg}-{i}-{type(v).__name__}"))

    # ---- sample
    for arg in ("num_draws", "thin", "checkpoint_every", "num_chains"):
        values = NOT_POS_INT if arg != "checkpoint_every" else [0, -1, "2", 1.5, True]
        extra = {"checkpoint": "/tmp/pib_fuzz_never_written.ckpt"} if arg == "checkpoint_every" else {}
        add("sample", arg, values, lambda v, arg=arg, extra=extra: run(**{arg: v}, **extra))
    add("sample", "num_warmup", NOT_NONNEG_INT, lambda v: run(num_warmup=v))
    add("sample", "seed", [-1, "0", 1.5, True, None, [0]], lambda v: run(seed=v))
    add("sample", "batch_size", [0, -1, 1.5, "4", True, [4]], lambda v: run(batch_size=v))
    for arg in ("progress", "resume", "prefetch_noise"):
        add("sample", arg, NOT_BOOL, lambda v, arg=arg: run(**{arg: v}))
    add("sample", "beta", NOT_POS_REAL, lambda v: run(beta=v))
    add("sample", "step_size", NOT_POS_REAL, lambda v: run(step_size=v))
    add(
        "sample",
        "divergence_threshold",
        [1.0, 0.5, -1.0, NAN, "1e4", True, [1e4]],
        lambda v: run(divergence_threshold=v),
    )
    add("sample", "sampler", ["hmc", "", 3, ["sgld"], 1.5], lambda v: run(sampler=v))
    add("sample", "chain_method", NOT_CHOICE, lambda v: run(chain_method=v, num_chains=2))
    add("sample", "noise", NOT_CHOICE, lambda v: run(noise=v))
    add("sample", "task", ["clf", "", 3, ["regression"]], lambda v: run(task=v))
    add(
        "sample",
        "init",
        [
            "zeros",
            "",
            3,
            1.5,
            [1.0],
            {"nope": torch.zeros(1, 2, 3)},
            {"weight": torch.zeros(2, 3), "bias": torch.zeros(1, 2)},
            {"weight": torch.full((1, 2, 3), NAN), "bias": torch.zeros(1, 2)},
        ],
        lambda v: run(init=v),
    )
    add("sample", "keep", [[], "weight", ["nope"], [1], 5, ["weight", "nope"]], lambda v: run(keep=v))
    add(
        "sample",
        "chain_ids",
        [[0.7], [5], [], [0, 0], "0", [True], 3, [-1], [1.0]],
        lambda v: run(chain_ids=v, num_chains=2),
    )
    add(
        "sample",
        "stat_fns",
        [
            {"a": 1},
            {"a": lambda p: "s"},
            {"a": lambda p: torch.ones(3)},
            [lambda p: 1.0],
            {1: lambda p: 1.0},
            {"energy": lambda p: 1.0},
            {"a": lambda p: None},
            "x",
        ],
        lambda v: run(stat_fns=v),
    )
    add(
        "sample",
        "sampler_kwargs",
        [{"nope": 1}, "x", 3, [("friction", 0.1)]],
        lambda v: run(sampler="sghmc", sampler_kwargs=v),
    )
    add(
        "sample",
        "checkpoint",
        [123, b"x.ckpt", "", __file__ + "/x.ckpt", 1.5, ["a.ckpt"]],
        lambda v: run(checkpoint=v),
    )
    add("sample", "checkpoint", [None], lambda v: run(checkpoint=Path("/tmp")))
    add(
        "sample",
        "prior",
        [
            "x",
            -1.0,
            NAN,
            INF,
            True,
            object(),
            [1.0],
            0.0,
            torch.distributions.Normal(torch.zeros(4), 1.0),
            torch.distributions.Normal(torch.zeros(5, 2, 3), 1.0),
            GaussianPrior.from_module(other_net()),
            GaussianPrior(std=1.0, mean={"weight": torch.zeros(4, 4)}),
        ],
        lambda v: run(prior=v),
    )
    add(
        "sample",
        "loss_fn",
        [
            "nope",
            3,
            None,
            [1],
            lambda o, t: torch.zeros(len(t) - 1),
            lambda o, t: torch.zeros(len(t), 2),
            lambda o, t: 1.0,
        ],
        # a custom callable must say its task (else the task error comes first): the shape is what is tested
        lambda v: run(loss_fn=v, **({"task": "classification"} if callable(v) else {})),
    )
    add(
        "sample",
        "model",
        ["x", None, 3, lambda x: x, nn.Linear(3, 2, device="meta"), nn.ReLU()],
        lambda v: run(model=v),
    )
    add(
        "sample",
        "data",
        [
            "x",
            None,
            (X,),
            (X, Y[:3]),
            (X, Y, Y),
            3,
            (X[:0], Y[:0]),
            (X[:, :2], Y),
            (X, Y + 5),
            (X, Y.float()),
        ],
        lambda v: run(data=v),
    )
    # ---- Posterior.predict
    add(
        "predict",
        "x",
        [X[:0], "x", None, X[:, :2], torch.full((2, 3), NAN), X.numpy(), torch.zeros(())],
        lambda v: POST.predict(v),
    )
    add("predict", "chunk_size", [0, -1, 1.5, "2", True, [2]], lambda v: POST.predict(X, chunk_size=v))
    add("predict", "include_diverged", NOT_BOOL[:-2] + [1.0], lambda v: POST.predict(X, include_diverged=v))
    add("predict", "model", [other_net(), nn.Linear(4, 2), "x", 3], lambda v: POST.predict(X, model=v))
    # ---- iiw.fisher
    theta0 = {k: v.clone() for k, v in net().state_dict().items()}
    add(
        "fisher", "method", NOT_CHOICE, lambda v: iiw.fisher(net(), "cross_entropy", (X, Y), theta0, method=v)
    )
    add(
        "fisher", "engine", NOT_CHOICE, lambda v: iiw.fisher(net(), "cross_entropy", (X, Y), theta0, engine=v)
    )
    add(
        "fisher",
        "chunk_size",
        [0, -1, 1.5, "2", True],
        lambda v: iiw.fisher(net(), "cross_entropy", (X, Y), theta0, chunk_size=v),
    )
    add(
        "fisher",
        "beta",
        [0.0, -1.0, NAN, INF, "0.1", True],
        lambda v: iiw.fisher(net(), "cross_entropy", (X, Y), theta0, beta=v),
    )
    add(
        "fisher",
        "theta_0",
        [
            "x",
            3,
            {"weight": torch.zeros(2, 3)},
            {"nope": torch.zeros(1)},
            {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)},
            {"weight": torch.full((2, 3), NAN), "bias": torch.zeros(2)},
        ],
        lambda v: iiw.fisher(net(), "cross_entropy", (X, Y), v),
    )
    add("fisher", "model", ["x", None, 3], lambda v: iiw.fisher(v, "cross_entropy", (X, Y), theta0))
    add(
        "fisher",
        "loss_fn",
        ["nope", 3, lambda o, t: torch.zeros(len(t) - 1), lambda o, t: torch.zeros(())],
        lambda v: iiw.fisher(net(), v, (X, Y), theta0),
    )
    add(
        "fisher",
        "data",
        ["x", (X,), (X, Y[:3]), (X[:0], Y[:0]), (X[:, :2], Y)],
        lambda v: iiw.fisher(net(), "cross_entropy", v, theta0),
    )
    add(
        "fisher",
        "num_batches",
        [0, -1, 1.5, "2"],
        lambda v: iiw.fisher(net(), "cross_entropy", (X, Y), theta0, method="minibatch", num_batches=v),
    )
    add(
        "fisher",
        "batch_size",
        [0, -1, 1.5, "2"],
        lambda v: iiw.fisher(net(), "cross_entropy", (X, Y), theta0, method="minibatch", batch_size=v),
    )
    add(
        "fisher",
        "params",
        [{"nope": torch.zeros(1)}, {"weight": torch.zeros(3, 3)}],
        lambda v: iiw.fisher(net(), "cross_entropy", (X, Y), theta0, params=v),
    )
    # ---- iiw sample estimators
    add(
        "kl",
        "prior",
        [
            "x",
            1.0,
            None,
            pb.FlatPrior(),
            GaussianPrior.from_module(other_net()),
            GaussianPrior.from_module(other_net(), mean="zeros"),
            GaussianPrior(std=1.0, mean={"weight": torch.zeros(4, 4)}),
            pb.DistributionPrior(torch.distributions.Normal(torch.zeros(7), 1.0)),
        ],
        lambda v: iiw.kl(make_post(None, 8), v),
    )
    add("kl", "structure", NOT_CHOICE, lambda v: iiw.kl(make_post(None, 8), GaussianPrior(), structure=v))
    add(
        "kl",
        "shrinkage",
        [-0.1, 1.5, "x", NAN, True, [0.1]],
        lambda v: iiw.kl(make_post(None, 8), GaussianPrior(), structure="full", shrinkage=v),
    )
    add(
        "kl",
        "rank",
        [0, -1, 1.5, "2", True],
        lambda v: iiw.kl(make_post(None, 8), GaussianPrior(), structure="lowrank", rank=v),
    )
    add(
        "kl",
        "num_mc",
        [0, 1, -1, 1.5, "2", True],
        lambda v: iiw.kl(
            make_post(None, 8), pb.DistributionPrior(torch.distributions.Laplace(0.0, 1.0)), num_mc=v
        ),
    )
    add("kl", "posterior", ["x", None, 3, [POST]], lambda v: iiw.kl(v, GaussianPrior()))
    add(
        "kl",
        "groups",
        [{"g": ["nope"]}, "x", 3],
        lambda v: iiw.kl(make_post(None, 8), GaussianPrior(), groups=v),
    )
    add("channel", "posteriors", [[], [POSTS[0]], "x", 3, [POSTS[0], "x"], None], lambda v: iiw.channel(v))
    add("channel", "structure", NOT_CHOICE, lambda v: iiw.channel(POSTS, structure=v))
    add("channel", "mc_correction", ["yes", 1, None], lambda v: iiw.channel(POSTS, mc_correction=v))
    # ---- diagnostics.summary
    add(
        "summary", "chunk_size", [0, -1, 1.5, "2", True], lambda v: D.summary(POST, data=(X, Y), chunk_size=v)
    )
    add("summary", "include_diverged", NOT_BOOL, lambda v: D.summary(POST, include_diverged=v))
    add(
        "summary",
        "rhat_threshold",
        [0.0, -1.0, NAN, INF, "1.01", True],
        lambda v: D.summary(POST, rhat_threshold=v),
    )
    add(
        "summary",
        "min_ess_per_chain",
        [0.0, -1.0, NAN, "100", True],
        lambda v: D.summary(POST, min_ess_per_chain=v),
    )
    add("summary", "max_weights", [-1, 1.5, "2", True], lambda v: D.summary(POST, max_weights=v))
    add(
        "summary",
        "num_projections",
        [0, -1, 1.5, "2", True],
        lambda v: D.summary(POST, max_weights=0, num_projections=v),
    )
    add("summary", "warn", ["yes", 1, None], lambda v: D.summary(POST, warn=v))
    add(
        "summary",
        "data",
        ["x", (X,), (X, Y[:3]), (X[:, :2], Y), (X, Y + 5)],
        lambda v: D.summary(POST, data=v),
    )
    add("summary", "probe_x", ["x", X[:, :2], torch.full((2, 3), NAN)], lambda v: D.summary(POST, probe_x=v))
    add("summary", "posterior", ["x", None, 3, make_post(num_draws=2)], lambda v: D.summary(v))
    # ---- uncertainty
    add(
        "entropy",
        "pred",
        ["x", None, torch.ones(3), P3 * 2, P3.long(), torch.zeros(0, 6, 3)],
        lambda v: U.predictive_entropy(v),
    )
    add(
        "ece",
        "num_bins",
        [0, -1, 1.5, "10", True],
        lambda v: U.expected_calibration_error(P3, Y6, num_bins=v),
    )
    add("ece", "y", [Y6[:3], Y6 + 5, Y6.float() + 0.5, "x"], lambda v: U.expected_calibration_error(P3, v))
    add("brier", "y", [Y6[:3], Y6 - 1, "x"], lambda v: U.brier_score(P3, v))
    add("credible", "level", [0.0, 1.0, -0.5, 1.5, NAN, "0.9", True], lambda v: U.credible_interval(F, v))
    add(
        "credible",
        "max_iter",
        [0, -1, 1.5, "10", True],
        lambda v: U.credible_interval(F, 0.9, 1.0, max_iter=v),
    )
    add(
        "credible",
        "tol",
        [0.0, -1.0, NAN, INF, "1e-10", True],
        lambda v: U.credible_interval(F, 0.9, 1.0, tol=v),
    )
    add(
        "credible",
        "noise_std",
        [0.0, -1.0, NAN, "1", True, torch.ones(7)],
        lambda v: U.credible_interval(F, 0.9, v),
    )
    add(
        "credible",
        "per_draw",
        ["x", torch.ones(3), torch.zeros(0, 4), torch.full((3, 4), NAN)],
        lambda v: U.credible_interval(v, 0.9),
    )
    add(
        "coverage", "lower", [HI + 1, "x", torch.full((4,), NAN)], lambda v: U.coverage(torch.zeros(4), v, HI)
    )
    add("coverage", "upper", [LO - 1, torch.ones(5), "x"], lambda v: U.coverage(torch.zeros(4), LO, v))
    add("coverage", "y", [torch.zeros(5), "x", torch.full((4,), NAN)], lambda v: U.coverage(v, LO, HI))
    add(
        "gaussian_interval",
        "variance",
        [-torch.ones(4), torch.ones(5), "x"],
        lambda v: U.gaussian_interval(torch.zeros(4), v),
    )
    add(
        "gaussian_nll",
        "variance",
        [torch.zeros(4), -torch.ones(4)],
        lambda v: U.gaussian_nll(torch.zeros(4), torch.zeros(4), v),
    )
    add("regression_uncertainty", "pred", [PRED, "x", torch.ones(3)], lambda v: U.regression_uncertainty(v))
    # ---- bounds
    add("kl_inverse", "q", [-0.1, 1.5, NAN, "0.1", True, None], lambda v: B.kl_inverse(v, 0.1))
    add("kl_inverse", "c", [-0.1, NAN, "0.1", True, None], lambda v: B.kl_inverse(0.1, v))
    add("kl_inverse", "tol", [0.0, -1.0, 0.1, NAN, "1e-12", True], lambda v: B.kl_inverse(0.1, 0.1, v))
    for name, fn in (
        ("mcallester", B.mcallester_bound),
        ("catoni", B.catoni_bound),
        ("kl_inverse_bound", B.kl_inverse_bound),
    ):
        add(name, "n", [0, -1, 1.5, "100", True, None], lambda v, fn=fn: fn(0.1, 1.0, v))
        add(name, "delta", [0.0, 1.0, -0.1, 1.5, NAN, "0.05", True], lambda v, fn=fn: fn(0.1, 1.0, 100, v))
        add(name, "empirical", [-0.5, 1.5, NAN, "0.1", True, None], lambda v, fn=fn: fn(v, 1.0, 100))
        add(name, "kl", [-1.0, NAN, "1", True, None], lambda v, fn=fn: fn(0.1, v, 100))
        add(
            name,
            "loss_range",
            [(1.0, 0.0), (0.0,), "x", (0.0, INF), (NAN, 1.0)],
            lambda v, fn=fn: fn(0.1, 1.0, 100, 0.05, v),
        )
    add("catoni", "c", [0.0, -1.0, [], [1.0, -1.0], "x", NAN], lambda v: B.catoni_bound(0.1, 1.0, 100, c=v))
    add("mi_bound", "info", [-1.0, NAN, "x", None], lambda v: B.mi_bound(v, 100, loss_range=(0, 1)))
    add("mi_bound", "sigma", [0.0, -1.0, NAN, "1"], lambda v: B.mi_bound(1.0, 100, sigma=v))
    add("bounded_ce", "p_min", [0.0, -0.1, 1.0, NAN, "1e-4"], lambda v: B.bounded_cross_entropy(P3[0], Y6, v))
    add("bounded_ce", "y", [Y6[:3], Y6 + 5, "x"], lambda v: B.bounded_cross_entropy(P3[0], v))
    # ---- more estimators and scores
    add(
        "ledoit_wolf",
        "x",
        ["x", torch.ones(3), torch.zeros(1, 3), torch.full((4, 3), NAN)],
        lambda v: iiw.ledoit_wolf(v),
    )
    add("mutual_information", "pred", ["x", P3 * 3, -P3], lambda v: U.mutual_information(v))
    add("expected_entropy", "pred", ["x", None, P3[..., :0]], lambda v: U.expected_entropy(v))
    add(
        "classification_uncertainty",
        "num_bins",
        [0, 1.5, "x", True],
        lambda v: U.classification_uncertainty(P3, Y6, num_bins=v),
    )
    add(
        "classification_uncertainty",
        "y",
        [Y6[:2], Y6 + 9, "x"],
        lambda v: U.classification_uncertainty(P3, v),
    )
    add(
        "regression_uncertainty",
        "level",
        [0.0, 1.0, NAN, "0.9", True],
        lambda v: U.regression_uncertainty(F, level=v),
    )
    add(
        "regression_uncertainty",
        "noise_std",
        [0.0, -1.0, NAN, "1", True],
        lambda v: U.regression_uncertainty(F, noise_std=v),
    )
    add(
        "regression_uncertainty",
        "y",
        [torch.zeros(7), "x", torch.full((4,), NAN)],
        lambda v: U.regression_uncertainty(F, v),
    )
    add(
        "gaussian_nll", "y", [torch.zeros(7), "x"], lambda v: U.gaussian_nll(v, torch.zeros(4), torch.ones(4))
    )
    add(
        "split_data",
        "prior_fraction",
        [0.0, 1.0, -0.5, NAN, "0.5", True],
        lambda v: B.split_data((X, Y), prior_fraction=v),
    )
    add("split_data", "data", ["x", (X,), (X, Y[:3])], lambda v: B.split_data(v))
    add("report", "train", ["x", (X,), (X, Y[:3]), (X[:, :2], Y), (X, Y + 5)], lambda v: B.report(POST, v))
    add("report", "delta", [0.0, 1.0, NAN, "0.05"], lambda v: B.report(POST, (X, Y), delta=v))
    add("report", "p_min", [0.0, -1.0, 1.0, NAN], lambda v: B.report(POST, (X, Y), p_min=v))
    add("report", "include_diverged", ["yes", 1, None], lambda v: B.report(POST, (X, Y), include_diverged=v))
    add("report", "posterior", ["x", None, 3], lambda v: B.report(v, (X, Y)))
    add("check_model", "model", [other_net(), nn.Linear(4, 2)], lambda v: POST.check_model(v))
    add("flat", "names", [["nope"]], lambda v: POST.flat(v))
    add(
        "Posterior",
        "draws",
        [
            {},
            "x",
            {"w": torch.ones(3)},
            {"a": torch.ones(2, 3), "b": torch.ones(3, 3)},
            {"w": torch.ones(0, 3)},
        ],
        lambda v: Posterior(v, {}, {}),
    )
    add(
        "Posterior",
        "sample_stats",
        ["x", {"energy": torch.ones(5)}],
        lambda v: Posterior({"w": torch.ones(2, 3)}, v, {}),
    )
    add("Posterior", "metadata", ["x", 3, [1]], lambda v: Posterior({"w": torch.ones(2, 3)}, {}, v))
    add(
        "Posterior",
        "diverged",
        ["x", torch.zeros(5, dtype=torch.bool)],
        lambda v: Posterior({"w": torch.ones(2, 3)}, {}, {}, diverged=v),
    )
    return cases


GRID = _grid()


@pytest.mark.parametrize(("fn", "arg"), GRID)
def test_grid(fn, arg):
    check(fn, arg)


# ------------------------------------------------------------------ the listed cases
def _nan_chain_post() -> Posterior:
    g = torch.Generator().manual_seed(3)
    w = torch.full((2, 6, 2, 3), NAN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Posterior(
            {"weight": w, "bias": torch.randn(2, 6, 2, generator=g)},
            {"energy": torch.randn(2, 6)},
            {"task": "classification"},
            model=net(),
        )


LISTED = [
    pytest.param(
        lambda: iiw.kl(make_post(None, 8), GaussianPrior.from_module(other_net())),
        "prior",
        id="kl-prior-of-another-model",
    ),
    pytest.param(
        lambda: run(keep=[], num_draws=10**6, num_warmup=10**6), "keep", id="keep-empty-before-running"
    ),
    pytest.param(lambda: _nan_chain_post().predict(X), "diverged", id="all-nan-draws-predict"),
    pytest.param(lambda: D.summary(_nan_chain_post()), "diverged", id="all-nan-draws-summary"),
    pytest.param(
        lambda: run(loss_fn=lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction="none")[1:],
                    task="classification"),
        "loss_fn",
        id="loss-b-minus-1",
    ),
    pytest.param(
        lambda: iiw.fisher(
            net(),
            lambda o, t: torch.nn.functional.cross_entropy(o, t),
            (X, Y),
            {k: v.clone() for k, v in net().state_dict().items()},
        ),
        "loss_fn",
        id="loss-scalar-where-per-example-needed",
    ),
    pytest.param(lambda: run(chain_ids=[0.7], num_chains=2), "chain_ids", id="chain-ids-float"),
    pytest.param(
        lambda: run(resume="no", checkpoint="/tmp/pib_fuzz_never_written.ckpt"), "resume", id="resume-no"
    ),
    pytest.param(
        lambda: POST.predict(X, include_diverged="yes"), "include_diverged", id="include-diverged-yes"
    ),
    pytest.param(lambda: run(progress="x"), "progress", id="progress-x"),
    pytest.param(lambda: D.summary(POST, data=(X, Y), chunk_size=0), "chunk_size", id="summary-chunk-0"),
    pytest.param(lambda: U.credible_interval(F, 0.9, 1.0, max_iter=0), "max_iter", id="credible-max-iter-0"),
    pytest.param(lambda: U.credible_interval(F, 0.9, 1.0, tol=-1), "tol", id="credible-tol-minus-1"),
    pytest.param(lambda: U.coverage(torch.zeros(4), HI, LO), "lower", id="coverage-lower-above-upper"),
    pytest.param(lambda: POST.predict(X[:0]), "x", id="predict-empty"),
    pytest.param(lambda: run(stat_fns={"a": 3}), "stat_fns", id="stat-fns-not-callable"),
    pytest.param(lambda: run(stat_fns={"a": lambda p: "str"}), "stat_fns", id="stat-fns-string"),
    pytest.param(lambda: run(stat_fns={"a": lambda p: p["weight"]}), "stat_fns", id="stat-fns-vector"),
    pytest.param(lambda: run(checkpoint=Path(PKG)), "checkpoint", id="checkpoint-directory"),
    pytest.param(lambda: run(checkpoint=123), "checkpoint", id="checkpoint-int"),
    pytest.param(lambda: run(model=nn.Linear(3, 2, device="meta")), "model", id="model-meta"),
    pytest.param(
        lambda: run(prior=torch.distributions.Normal(torch.zeros(5, 2, 3), 1.0)),
        "prior",
        id="prior-distribution-wrong-shape",
    ),
    pytest.param(
        lambda: run(prior=torch.distributions.Normal(torch.zeros(4), 1.0)),
        "prior",
        id="prior-distribution-not-broadcastable",
    ),
    pytest.param(
        lambda: run(prior=GaussianPrior.from_module(other_net())), "prior", id="sample-prior-of-another-model"
    ),
]


@pytest.mark.parametrize(("fn", "arg"), LISTED)
def test_listed(fn, arg):
    check(fn, arg)


def test_stat_fns_error_names_the_key():
    with pytest.raises(TypeError, match=r"stat_fns: 'grad_norm'"):
        run(stat_fns={"grad_norm": lambda p: "big"})
    with pytest.raises(ValueError, match=r"stat_fns: 'w' must return a scalar"):
        run(stat_fns={"w": lambda p: p["weight"]})


def test_keep_empty_fails_before_any_step():
    calls = {"n": 0}

    def loss(o, t):
        calls["n"] += 1
        return torch.nn.functional.cross_entropy(o, t, reduction="none")

    with pytest.raises(ValueError, match="keep"):
        run(loss_fn=loss, keep=[])
    assert calls["n"] == 0


def test_scalar_loss_is_allowed_for_sampling_as_batch_mean():
    """A 0-d loss is documented as the batch mean (e.g. nn.CrossEntropyLoss()), so it stays allowed."""
    post = run(loss_fn=nn.CrossEntropyLoss())
    assert torch.isfinite(post.draws["weight"]).all()


def test_valid_calls_still_work():
    """The fuzz fixtures are valid apart from the one bad argument."""
    run()
    run(chain_ids=[1], num_chains=2, stat_fns={"s": lambda p: p["weight"].sum()}, keep=["bias"])
    POST.predict(X, chunk_size=3)
    iiw.kl(make_post(None, 8), GaussianPrior.from_module(net()))
    iiw.channel(POSTS)
    D.summary(POST, data=(X, Y), chunk_size=5, warn=False)
    U.coverage(torch.zeros(4), LO, HI)
    U.credible_interval(F, 0.9, 1.0, max_iter=5, tol=1e-8)


# ------------------------------------------------------------------ hypothesis: wrong types/ranges
not_an_int = st.one_of(
    st.text(max_size=3),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.complex_numbers(),
)
not_a_bool = st.one_of(st.integers(), st.text(max_size=3), st.floats(allow_nan=True), st.none())
not_positive = st.one_of(
    st.floats(max_value=0.0),
    st.just(NAN),
    st.just(INF),
    st.integers(max_value=0),
    st.text(max_size=3),
    st.booleans(),
    st.none(),
)
FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(
    v=st.one_of(not_an_int, st.integers(max_value=0)),
    arg=st.sampled_from(["num_draws", "thin", "num_chains"]),
)
def test_hypothesis_sample_counts(v, arg):
    check(lambda: run(**{arg: v}), arg)


@FAST
@given(v=not_a_bool, arg=st.sampled_from(["progress", "resume"]))
def test_hypothesis_sample_bools(v, arg):
    check(lambda: run(**{arg: v}), arg)


@FAST
@given(v=not_positive, arg=st.sampled_from(["beta", "step_size"]))
def test_hypothesis_sample_positive_reals(v, arg):
    check(lambda: run(**{arg: v}), arg)


@FAST
@given(
    v=st.lists(
        st.one_of(
            st.floats(allow_nan=True),
            st.text(max_size=2),
            st.integers(min_value=2),
            st.integers(max_value=-1),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_hypothesis_chain_ids(v):
    check(lambda: run(chain_ids=v, num_chains=2), "chain_ids")


@FAST
@given(v=st.one_of(not_an_int, st.integers(max_value=0)).filter(lambda v: v is not None))  # None: automatic
def test_hypothesis_predict_chunk_size(v):
    check(lambda: POST.predict(X, chunk_size=v), "chunk_size")


@FAST
@given(v=not_a_bool)
def test_hypothesis_include_diverged(v):
    check(lambda: POST.predict(X, include_diverged=v), "include_diverged")


@FAST
@given(v=st.one_of(not_an_int, st.integers(max_value=0)))
def test_hypothesis_summary_chunk_size(v):
    check(lambda: D.summary(POST, data=(X, Y), chunk_size=v), "chunk_size")


@FAST
@given(tol=not_positive)
def test_hypothesis_credible_tol(tol):
    check(lambda: U.credible_interval(F, 0.9, 1.0, tol=tol), "tol")


@FAST
@given(v=st.one_of(not_an_int, st.integers(max_value=0)))
def test_hypothesis_credible_max_iter(v):
    check(lambda: U.credible_interval(F, 0.9, 1.0, max_iter=v), "max_iter")


@FAST
@given(gap=st.floats(1e-6, 10.0), at=st.integers(0, 3))
def test_hypothesis_coverage_lower_above_upper(gap, at):
    lower = LO.clone()
    lower[at] = HI[at] + gap
    check(lambda: U.coverage(torch.zeros(4), lower, HI), "lower")


@FAST
@given(
    q=st.one_of(
        st.floats(max_value=-1e-9), st.floats(min_value=1.0 + 1e-9), st.just(NAN), st.text(max_size=2)
    )
)
def test_hypothesis_kl_inverse_q(q):
    check(lambda: B.kl_inverse(q, 0.1), "q")


@FAST
@given(c=st.one_of(st.floats(max_value=-1e-300), st.just(NAN), st.text(max_size=2), st.booleans()))
def test_hypothesis_kl_inverse_c(c):
    check(lambda: B.kl_inverse(0.1, c), "c")


@FAST
@given(delta=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(NAN)))
def test_hypothesis_bound_delta(delta):
    check(lambda: B.mcallester_bound(0.1, 1.0, 100, delta), "delta")


@FAST
@given(n=st.one_of(not_an_int, st.integers(max_value=0)))
def test_hypothesis_bound_n(n):
    check(lambda: B.catoni_bound(0.1, 1.0, n), "n")


@FAST
@given(v=st.one_of(not_an_int, st.integers(max_value=0)).filter(lambda v: v is not None))  # None: automatic
def test_hypothesis_fisher_chunk_size(v):
    theta0 = {k: t.clone() for k, t in net().state_dict().items()}
    check(lambda: iiw.fisher(net(), "cross_entropy", (X, Y), theta0, chunk_size=v), "chunk_size")


@FAST
@given(v=st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.text(max_size=2), st.booleans()))
def test_hypothesis_kl_rank(v):
    check(lambda: iiw.kl(make_post(None, 8), GaussianPrior(), structure="lowrank", rank=v), "rank")


@FAST
@given(v=st.one_of(st.floats(max_value=1.0), st.just(NAN), st.text(max_size=2), st.booleans()))
def test_hypothesis_divergence_threshold(v):
    check(lambda: run(divergence_threshold=v), "divergence_threshold")


def test_prediction_fixture_is_classification():
    assert isinstance(PRED, Prediction) and PRED.task == "classification"
