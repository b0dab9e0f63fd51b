"""Validation audit of every public entry point (issue 9, item 3).

Each case calls one entry point with one bad argument and expects exactly one clear error: a
``ValueError``/``TypeError``/``KeyError`` (``FormatError`` is a ``ValueError``) whose message names the
argument. ``CASES`` passed when the audit was written. ``BUGS`` are the entry points the audit found giving
a confusing error (a raw torch ``RuntimeError``, an ``IndexError``/``AttributeError`` from deep inside, a
message that does not name the argument) or silently accepting bad input (NaN results, truncated values);
the reason says where and what. Fixed ones run as regression tests; those in ``STILL_OPEN`` stay strict
xfails, so a fix turns them into a failure until they leave that set.
"""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pib_bayes as pb
from pib_bayes import Energy, GaussianLoss, GaussianPrior, Posterior, Prediction, iiw, sample
from pib_bayes import bounds as B
from pib_bayes import diagnostics as D
from pib_bayes import uncertainty as U
from pib_bayes.config import ConfigError, validate_config
from pib_bayes.io import FormatError, save_payload
from pib_bayes.optim import PSGLD, SGHMC, SGLD
from pib_bayes.posterior import LEGACY_FORMAT_VERSION
from pib_bayes.samplers import schedules as S

NAN, INF = math.nan, math.inf
ANY = (ValueError, TypeError, KeyError)  # what a fixed entry point may raise

# --------------------------------------------------------------------------------- fixtures
_g = torch.Generator().manual_seed(0)
X = torch.randn(16, 3, generator=_g)
Y_CLS = torch.randint(0, 2, (16,), generator=_g)
Y_REG = torch.randn(16, 2, generator=_g)
X_NAN = X.clone()
X_NAN[0, 0] = NAN
P3 = torch.softmax(torch.randn(4, 6, 3, generator=_g), -1)
Y6 = torch.randint(0, 3, (6,), generator=_g)
F = torch.randn(5, 4, generator=_g)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def post(
    model: nn.Module | None = None,
    task: str = "classification",
    num_draws: int = 6,
    weight: torch.Tensor | None = None,
) -> Posterior:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, num_draws, 2, 3, generator=g) if weight is None else weight
    return Posterior(
        {"weight": w, "bias": torch.randn(2, num_draws, 2, generator=g)},
        {"energy": torch.randn(2, num_draws, generator=g)},
        {"task": task},
        model=model,
    )


def run(*args, **kw):
    """pib_bayes.sample with a tiny run; validation happens before any step."""
    kw.setdefault("beta", 0.1)
    kw.setdefault("num_warmup", 1)
    kw.setdefault("num_draws", 1)
    if not args:
        args = (net(), "cross_entropy", (X, Y_CLS))
    return sample(*args, **kw)


def theta0() -> dict:
    return {k: v.clone() for k, v in net().state_dict().items()}


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, NAN)


def laplace_prior():
    return pb.DistributionPrior(torch.distributions.Laplace(0.0, 1.0))


def params() -> list:
    return list(nn.Linear(2, 1).parameters())


def raw_units():
    return iiw.IIWResult({}, 1.0, "fisher-jvp", "raw")


def loader():
    return DataLoader(TensorDataset(X, Y_CLS), batch_size=4)


def names(arg: str, message: str) -> bool:
    """True when ``arg`` appears in ``message`` as a name (not inside a longer word)."""
    return re.search(rf"(?<![\w.]){re.escape(arg)}(?!\w)", message) is not None


def cfg(sections: dict) -> dict:
    raw = {"data": {"source": "spirals"}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return validate_config(raw, output_dir="out")


def c(id_, fn, exc, arg):
    return pytest.param(fn, exc, arg, id=id_)


# --------------------------------------------------------------------- cases that pass today
CASES = [
    # ---- pib_bayes.sample
    c("sample-beta-zero", lambda: run(beta=0), ValueError, "beta"),
    c("sample-beta-negative", lambda: run(beta=-1.0), ValueError, "beta"),
    c("sample-beta-nan", lambda: run(beta=NAN), ValueError, "beta"),
    c("sample-beta-inf", lambda: run(beta=INF), ValueError, "beta"),
    c("sample-beta-str", lambda: run(beta="0.1"), ValueError, "beta"),
    c("sample-beta-bool", lambda: run(beta=True), ValueError, "beta"),
    c("sample-step-zero", lambda: run(step_size=0.0), ValueError, "step_size"),
    c("sample-step-negative", lambda: run(step_size=-1e-3), ValueError, "step_size"),
    c("sample-step-nan", lambda: run(step_size=NAN), ValueError, "step_size"),
    c("sample-step-inf", lambda: run(step_size=INF), ValueError, "step_size"),
    c("sample-step-str", lambda: run(step_size="1e-3"), ValueError, "step_size"),
    c("sample-x-nan", lambda: run(net(), "cross_entropy", (X_NAN, Y_CLS)), ValueError, "data"),
    c("sample-y-nan", lambda: run(net(), "gaussian", (X, nan_like(Y_REG))), ValueError, "data"),
    c("sample-x-inf", lambda: run(net(), "gaussian", (X * INF, Y_REG)), ValueError, "data"),
    c("sample-rows-mismatch", lambda: run(net(), "cross_entropy", (X, Y_CLS[:5])), ValueError, "data"),
    c("sample-data-empty", lambda: run(net(), "cross_entropy", (X[:0], Y_CLS[:0])), ValueError, "data"),
    c("sample-loader-nan",
      lambda: run(net(), "cross_entropy", DataLoader(TensorDataset(X_NAN, Y_CLS), batch_size=4)),
      ValueError, "data"),
    c("sample-data-tensor", lambda: run(net(), "cross_entropy", X), TypeError, "data"),
    c("sample-data-triple", lambda: run(net(), "cross_entropy", (X, Y_CLS, Y_CLS)), ValueError, "data"),
    c("sample-data-not-tensors", lambda: run(net(), "cross_entropy", (X.tolist(), Y_CLS)), TypeError, "data"),
    c(
        "sample-loader-batch-size",
        lambda: run(net(), "cross_entropy", loader(), batch_size=4),
        ValueError,
        "batch_size",
    ),
    c("sample-model-not-module", lambda: run(lambda z: z, "cross_entropy", (X, Y_CLS)), TypeError, "model"),
    c(
        "sample-model-frozen",
        lambda: run(net().requires_grad_(False), "cross_entropy", (X, Y_CLS)),
        ValueError,
        "model",
    ),
    c("sample-loss-unknown", lambda: run(net(), "xent", (X, Y_CLS)), ValueError, "loss_fn"),
    c("sample-loss-not-callable", lambda: run(net(), 3, (X, Y_CLS)), TypeError, "loss_fn"),
    c("sample-keep-unknown", lambda: run(keep=["nope"]), ValueError, "keep"),
    c("sample-sampler-unknown", lambda: run(sampler="hmc"), ValueError, "sampler"),
    c(
        "sample-sampler-kwargs-unknown",
        lambda: run(sampler="sghmc", sampler_kwargs={"frict": 0.1}),
        ValueError,
        "sampler_kwargs",
    ),
    c(
        "sample-sghmc-friction",
        lambda: run(sampler="sghmc", sampler_kwargs={"friction": 2.0}),
        ValueError,
        "friction",
    ),
    c("sample-psgld-alpha", lambda: run(sampler="psgld", sampler_kwargs={"alpha": NAN}), ValueError, "alpha"),
    c("sample-csgld-needs-cyclical", lambda: run(sampler="csgld", step_size=1e-3), ValueError, "step_size"),
    c("sample-num-chains-zero", lambda: run(num_chains=0), ValueError, "num_chains"),
    c("sample-num-chains-float", lambda: run(num_chains=2.0), ValueError, "num_chains"),
    c("sample-num-draws-zero", lambda: run(num_draws=0), ValueError, "num_draws"),
    c("sample-num-draws-float", lambda: run(num_draws=2.5), ValueError, "num_draws"),
    c("sample-num-warmup-negative", lambda: run(num_warmup=-1), ValueError, "num_warmup"),
    c("sample-thin-zero", lambda: run(thin=0), ValueError, "thin"),
    c("sample-batch-size-zero", lambda: run(batch_size=0), ValueError, "batch_size"),
    c("sample-batch-size-too-big", lambda: run(batch_size=17), ValueError, "batch_size"),
    c("sample-seed-negative", lambda: run(seed=-1), ValueError, "seed"),
    c("sample-seed-float", lambda: run(seed=1.5), ValueError, "seed"),
    c("sample-init-unknown-str", lambda: run(init="zeros"), ValueError, "init"),
    c(
        "sample-init-wrong-shape",
        lambda: run(init={"weight": torch.zeros(1, 3, 3), "bias": torch.zeros(1, 2)}),
        ValueError,
        "init",
    ),
    c("sample-init-missing", lambda: run(init={"weight": torch.zeros(1, 2, 3)}), ValueError, "init"),
    c(
        "sample-init-unknown-name",
        lambda: run(init={"weight": torch.zeros(1, 2, 3), "bias": torch.zeros(1, 2), "nope": torch.zeros(1)}),
        ValueError,
        "init",
    ),
    c(
        "sample-init-prior-not-gaussian",
        lambda: run(init="prior", prior=torch.distributions.Laplace(0.0, 1.0)),
        ValueError,
        "init",
    ),
    c("sample-chain-method", lambda: run(chain_method="parallel"), ValueError, "chain_method"),
    c("sample-chain-ids-out-of-range", lambda: run(num_chains=2, chain_ids=[2]), ValueError, "chain_ids"),
    c("sample-chain-ids-duplicate", lambda: run(num_chains=2, chain_ids=[1, 1]), ValueError, "chain_ids"),
    c("sample-prior-negative", lambda: run(prior=-1.0), ValueError, "prior"),
    c("sample-prior-nan", lambda: run(prior=NAN), ValueError, "prior"),
    c("sample-prior-bool", lambda: run(prior=True), TypeError, "prior"),
    c("sample-prior-str", lambda: run(prior="normal"), TypeError, "prior"),
    c(
        "sample-task-callable-loss",
        lambda: run(net(), nn.functional.mse_loss, (X, Y_REG), task="cls"),
        ValueError,
        "task",
    ),
    # ---- Energy, GaussianLoss, beta_from_temperature
    c("energy-beta-zero", lambda: Energy(net(), "gaussian", beta=0), ValueError, "beta"),
    c("energy-beta-inf", lambda: Energy(net(), "gaussian", beta=INF), ValueError, "beta"),
    c("energy-beta-nan", lambda: Energy(net(), "gaussian", beta=NAN), ValueError, "beta"),
    c("energy-beta-bool", lambda: Energy(net(), "gaussian", beta=True), ValueError, "beta"),
    c("energy-loss-unknown", lambda: Energy(net(), "foo", beta=1.0), ValueError, "loss_fn"),
    c("energy-loss-not-callable", lambda: Energy(net(), 3, beta=1.0), TypeError, "loss_fn"),
    c("energy-prior-str", lambda: Energy(net(), "gaussian", prior="normal", beta=1.0), TypeError, "prior"),
    c("energy-prior-zero", lambda: Energy(net(), "gaussian", prior=0.0, beta=1.0), ValueError, "prior"),
    c("energy-prior-inf", lambda: Energy(net(), "gaussian", prior=INF, beta=1.0), ValueError, "prior"),
    c(
        "energy-per-example-needs-vector",
        lambda: Energy(net(), nn.MSELoss(), beta=1.0).per_example_loss(torch.zeros(3, 2), torch.zeros(3, 2)),
        ValueError,
        "loss_fn",
    ),
    c("gaussian-loss-zero", lambda: GaussianLoss(0.0), ValueError, "noise_std"),
    c("gaussian-loss-nan", lambda: GaussianLoss(NAN), ValueError, "noise_std"),
    c("temperature-zero", lambda: pb.beta_from_temperature(0.0, 10), ValueError, "temperature"),
    c("temperature-n-zero", lambda: pb.beta_from_temperature(1.0, 0), ValueError, "n"),
    # ---- GaussianPrior
    c("prior-std-zero", lambda: GaussianPrior(std=0.0), ValueError, "std"),
    c("prior-std-nan", lambda: GaussianPrior(std=NAN), ValueError, "std"),
    c("prior-std-map-negative", lambda: GaussianPrior(std={"w": -1.0}), ValueError, "std"),
    c("prior-std-tensor-zero", lambda: GaussianPrior(std={"w": torch.tensor([1.0, 0.0])}), ValueError, "std"),
    c("prior-default-std-zero", lambda: GaussianPrior(std={"w": 1.0}, default_std=0.0), ValueError, "std"),
    c(
        "prior-from-module-mean-str",
        lambda: GaussianPrior.from_module(net(), mean="init2"),
        ValueError,
        "mean",
    ),
    c(
        "prior-from-module-mean-unknown",
        lambda: GaussianPrior.from_module(net(), mean={"nope": torch.zeros(1)}),
        ValueError,
        "mean",
    ),
    c(
        "prior-from-module-mean-shape",
        lambda: GaussianPrior.from_module(net(), mean={"weight": torch.zeros(3, 2)}),
        ValueError,
        "mean",
    ),
    c(
        "prior-from-module-std-unknown",
        lambda: GaussianPrior.from_module(net(), std={"nope": 1.0}),
        ValueError,
        "std",
    ),
    c("prior-from-module-std-zero", lambda: GaussianPrior.from_module(net(), std=0.0), ValueError, "std"),
    # ---- schedules
    c("constant-zero", lambda: S.Constant(0), ValueError, "step_size"),
    c("constant-nan", lambda: S.Constant(NAN), ValueError, "step_size"),
    c("constant-inf", lambda: S.Constant(INF), ValueError, "step_size"),
    c("constant-str", lambda: S.Constant("1"), ValueError, "step_size"),
    c("polynomial-a-zero", lambda: S.PolynomialDecay(0), ValueError, "a"),
    c("polynomial-b-negative", lambda: S.PolynomialDecay(1.0, b=-1.0), ValueError, "b"),
    c("polynomial-gamma-two", lambda: S.PolynomialDecay(1.0, gamma=2.0), ValueError, "gamma"),
    c("polynomial-gamma-nan", lambda: S.PolynomialDecay(1.0, gamma=NAN), ValueError, "gamma"),
    c("cosine-total-zero", lambda: S.Cosine(1.0, 0), ValueError, "total_steps"),
    c("cosine-min-above-h0", lambda: S.Cosine(1.0, 10, 2.0), ValueError, "min_step_size"),
    c("cosine-min-nan", lambda: S.Cosine(1.0, 10, NAN), ValueError, "min_step_size"),
    c("cosine-step-zero", lambda: S.Cosine(0.0, 10), ValueError, "step_size"),
    c("cyclical-length-one", lambda: S.Cyclical(1.0, 1), ValueError, "cycle_length"),
    c("cyclical-fraction-one", lambda: S.Cyclical(1.0, 4, 1.0), ValueError, "exploration_fraction"),
    c("cyclical-fraction-nan", lambda: S.Cyclical(1.0, 4, NAN), ValueError, "exploration_fraction"),
    c("cyclical-step-nan", lambda: S.Cyclical(NAN, 4), ValueError, "step_size"),
    c("as-schedule-str", lambda: S.as_schedule("x"), ValueError, "step_size"),
    c("as-schedule-negative", lambda: S.as_schedule(-1.0), ValueError, "step_size"),
    # ---- optimizers
    c("sgld-lr-zero", lambda: SGLD(params(), lr=0), ValueError, "lr"),
    c("sgld-lr-nan", lambda: SGLD(params(), lr=NAN), ValueError, "lr"),
    c("sgld-lr-str", lambda: SGLD(params(), lr="0.1"), ValueError, "lr"),
    c("sgld-noise-scale-negative", lambda: SGLD(params(), lr=0.1, noise_scale=-1), ValueError, "noise_scale"),
    c("sgld-noise-scale-nan", lambda: SGLD(params(), lr=0.1, noise_scale=NAN), ValueError, "noise_scale"),
    c("sgld-noise-kind", lambda: SGLD(params(), lr=0.1, noise="uniform"), ValueError, "noise"),
    c("psgld-alpha-two", lambda: PSGLD(params(), lr=0.1, alpha=2.0), ValueError, "alpha"),
    c("psgld-alpha-nan", lambda: PSGLD(params(), lr=0.1, alpha=NAN), ValueError, "alpha"),
    c("psgld-eps-zero", lambda: PSGLD(params(), lr=0.1, eps=0.0), ValueError, "eps"),
    c("psgld-eps-nan", lambda: PSGLD(params(), lr=0.1, eps=NAN), ValueError, "eps"),
    c("psgld-lr-negative", lambda: PSGLD(params(), lr=-0.1), ValueError, "lr"),
    c("sghmc-friction-zero", lambda: SGHMC(params(), lr=0.1, friction=0.0), ValueError, "friction"),
    c("sghmc-friction-two", lambda: SGHMC(params(), lr=0.1, friction=2.0), ValueError, "friction"),
    c("sghmc-friction-nan", lambda: SGHMC(params(), lr=0.1, friction=NAN), ValueError, "friction"),
    c("sghmc-lr-negative", lambda: SGHMC(params(), lr=-1.0), ValueError, "lr"),
    # ---- Posterior
    c("posterior-no-draws", lambda: Posterior({}, {}, {}), ValueError, "draws"),
    c(
        "posterior-leading-shapes",
        lambda: Posterior({"a": torch.zeros(2, 5, 3), "b": torch.zeros(2, 4)}, {}, {}),
        ValueError,
        "draws",
    ),
    c("predict-x-list", lambda: post(net()).predict(X.tolist()), TypeError, "x"),
    c("predict-chunk-zero", lambda: post(net()).predict(X, chunk_size=0), ValueError, "chunk_size"),
    c("predict-no-model", lambda: post().predict(X), ValueError, "model"),
    c("flat-unknown-name", lambda: post().flat(["nope"]), KeyError, "names"),
    c("check-model-shape", lambda: post().check_model(nn.Linear(4, 2)), ValueError, "model"),
    c("check-model-names", lambda: post().check_model(nn.Sequential(nn.Linear(3, 2))), ValueError, "model"),
    c(
        "kept-chains-all-diverged",
        lambda: Posterior(
            {"w": torch.zeros(2, 3, 1)}, {}, {}, diverged=torch.ones(2, dtype=torch.bool)
        ).kept_chains(),
        ValueError,
        "diverged",
    ),
    # ---- iiw.kl
    c("kl-structure", lambda: iiw.kl(post(), GaussianPrior(), structure="dense"), ValueError, "structure"),
    c("kl-prior-none", lambda: iiw.kl(post(), None), TypeError, "prior"),
    c("kl-prior-float", lambda: iiw.kl(post(), 1.0), TypeError, "prior"),
    c("kl-prior-flat", lambda: iiw.kl(post(), pb.FlatPrior()), ValueError, "prior"),
    c(
        "kl-prior-mean-shape",
        lambda: iiw.kl(post(), GaussianPrior(mean={"weight": torch.zeros(3, 2)})),
        ValueError,
        "prior",
    ),
    c(
        "kl-prior-std-shape",
        lambda: iiw.kl(post(), GaussianPrior(std={"weight": torch.ones(3, 2)})),
        ValueError,
        "prior",
    ),
    c(
        "kl-groups-unknown",
        lambda: iiw.kl(post(), GaussianPrior(), groups={"a": ["nope"]}),
        ValueError,
        "groups",
    ),
    c(
        "kl-groups-str-members",
        lambda: iiw.kl(post(), GaussianPrior(), groups={"a": "weight"}),
        TypeError,
        "groups",
    ),
    c(
        "kl-groups-duplicate",
        lambda: iiw.kl(post(), GaussianPrior(), groups={"a": ["weight"], "b": ["weight"]}),
        ValueError,
        "groups",
    ),
    c("kl-groups-empty", lambda: iiw.kl(post(), GaussianPrior(), groups={}), ValueError, "groups"),
    c(
        "kl-shrinkage",
        lambda: iiw.kl(post(), GaussianPrior(), structure="full", shrinkage=2.0),
        ValueError,
        "shrinkage",
    ),
    c(
        "kl-shrinkage-str",
        lambda: iiw.kl(post(), GaussianPrior(), structure="full", shrinkage="oas"),
        ValueError,
        "shrinkage",
    ),
    c(
        "kl-rank-zero",
        lambda: iiw.kl(post(), GaussianPrior(), structure="lowrank", rank=0),
        ValueError,
        "rank",
    ),
    c(
        "kl-draws-nan",
        lambda: iiw.kl(post(weight=torch.full((2, 6, 2, 3), NAN)), GaussianPrior()),
        ValueError,
        "draws",
    ),
    c(
        "kl-one-draw",
        lambda: iiw.kl(Posterior({"w": torch.randn(1, 1, 3)}, {}, {}), GaussianPrior()),
        ValueError,
        "draws",
    ),
    c(
        "kl-frozen-coordinates",
        lambda: iiw.kl(Posterior({"w": torch.zeros(2, 5, 3)}, {}, {}), GaussianPrior()),
        ValueError,
        "draws",
    ),
    # ---- iiw.channel
    c("channel-single-posterior", lambda: iiw.channel(post()), TypeError, "posteriors"),
    c("channel-one-resample", lambda: iiw.channel([post()]), ValueError, "posteriors"),
    c("channel-not-posterior", lambda: iiw.channel([post(), 3]), TypeError, "posteriors[1]"),
    c(
        "channel-layout-mismatch",
        lambda: iiw.channel([post(), Posterior({"w": torch.randn(2, 5, 3)}, {}, {})]),
        ValueError,
        "posteriors[1]",
    ),
    c("channel-structure", lambda: iiw.channel([post(), post()], structure="x"), ValueError, "structure"),
    c(
        "channel-nan",
        lambda: iiw.channel([post(), post(weight=torch.full((2, 6, 2, 3), NAN))]),
        ValueError,
        "posteriors[1]",
    ),
    c(
        "channel-few-draws",
        lambda: iiw.channel([post(num_draws=3), post(num_draws=3)]),
        ValueError,
        "posteriors",
    ),
    # ---- iiw.fisher
    c("fisher-model", lambda: iiw.fisher("net", "gaussian", (X, Y_REG), theta0()), TypeError, "model"),
    c("fisher-loss", lambda: iiw.fisher(net(), "xent", (X, Y_REG), theta0()), ValueError, "loss_fn"),
    c(
        "fisher-method",
        lambda: iiw.fisher(net(), "gaussian", (X, Y_REG), theta0(), method="exact"),
        ValueError,
        "method",
    ),
    c(
        "fisher-beta-zero",
        lambda: iiw.fisher(net(), "gaussian", (X, Y_REG), theta0(), beta=0),
        ValueError,
        "beta",
    ),
    c(
        "fisher-beta-nan",
        lambda: iiw.fisher(net(), "gaussian", (X, Y_REG), theta0(), beta=NAN),
        ValueError,
        "beta",
    ),
    c(
        "fisher-theta0-unknown",
        lambda: iiw.fisher(net(), "gaussian", (X, Y_REG), {**theta0(), "x": torch.ones(1)}),
        ValueError,
        "theta_0",
    ),
    c(
        "fisher-theta0-missing",
        lambda: iiw.fisher(net(), "gaussian", (X, Y_REG), {"weight": torch.zeros(2, 3)}),
        ValueError,
        "theta_0",
    ),
    c(
        "fisher-theta0-shape",
        lambda: iiw.fisher(
            net(), "gaussian", (X, Y_REG), {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)}
        ),
        ValueError,
        "theta_0",
    ),
    c("fisher-theta0-list", lambda: iiw.fisher(net(), "gaussian", (X, Y_REG), [1, 2]), TypeError, "theta_0"),
    c("fisher-x-nan", lambda: iiw.fisher(net(), "gaussian", (X_NAN, Y_REG), theta0()), ValueError, "data"),
    c(
        "fisher-rows-mismatch",
        lambda: iiw.fisher(net(), "gaussian", (X, Y_REG[:4]), theta0()),
        ValueError,
        "data",
    ),
    c("fisher-data-tensor", lambda: iiw.fisher(net(), "gaussian", X, theta0()), TypeError, "data"),
    c(
        "fisher-params-unknown",
        lambda: iiw.fisher(net(), "gaussian", (X, Y_REG), theta0(), params={"nope": torch.zeros(1)}),
        ValueError,
        "params",
    ),
    c(
        "fisher-params-shape",
        lambda: iiw.fisher(net(), "gaussian", (X, Y_REG), theta0(), params={"weight": torch.zeros(3, 2)}),
        ValueError,
        "params",
    ),
    c(
        "fisher-chunk-zero",
        lambda: iiw.fisher(net(), "gaussian", (X, Y_REG), theta0(), chunk_size=0),
        ValueError,
        "chunk_size",
    ),
    c(
        "fisher-groups-unknown",
        lambda: iiw.fisher(net(), "gaussian", (X, Y_REG), theta0(), groups={"a": ["n"]}),
        ValueError,
        "groups",
    ),
    c(
        "fisher-num-batches-zero",
        lambda: iiw.fisher(net(), "gaussian", (X, Y_REG), theta0(), method="minibatch", num_batches=0),
        ValueError,
        "num_batches",
    ),
    c(
        "fisher-minibatch-loader",
        lambda: iiw.fisher(net(), "cross_entropy", loader(), theta0(), method="minibatch"),
        ValueError,
        "data",
    ),
    c(
        "fisher-loss-not-per-example",
        lambda: iiw.fisher(net(), nn.MSELoss(), (X, Y_REG), theta0()),
        ValueError,
        "loss_fn",
    ),
    # ---- uncertainty
    c("entropy-list", lambda: U.predictive_entropy([[0.5, 0.5]]), TypeError, "pred"),
    c("entropy-1d", lambda: U.predictive_entropy(torch.tensor([0.5, 0.5])), ValueError, "pred"),
    c("entropy-4d", lambda: U.predictive_entropy(P3[None]), ValueError, "pred"),
    c("entropy-logits", lambda: U.predictive_entropy(torch.randn(4, 6, 3)), ValueError, "pred"),
    c("entropy-nan", lambda: U.expected_entropy(torch.where(P3 > 0.5, NAN, P3)), ValueError, "pred"),
    c("entropy-int", lambda: U.mutual_information(torch.ones(2, 1, dtype=torch.long)), TypeError, "pred"),
    c(
        "entropy-regression-prediction",
        lambda: U.mutual_information(Prediction("regression", F[0], F)),
        ValueError,
        "pred",
    ),
    c("ece-y-length", lambda: U.expected_calibration_error(P3, Y6[:3]), ValueError, "y"),
    c("ece-y-fractional", lambda: U.expected_calibration_error(P3, Y6.double() + 0.5), ValueError, "y"),
    c("ece-y-out-of-range", lambda: U.expected_calibration_error(P3, Y6 + 3), ValueError, "y"),
    c("ece-y-negative", lambda: U.expected_calibration_error(P3, Y6 - 3), ValueError, "y"),
    c("ece-y-nan", lambda: U.expected_calibration_error(P3, torch.full((6,), NAN)), ValueError, "y"),
    c("ece-y-list", lambda: U.expected_calibration_error(P3, [0] * 6), TypeError, "y"),
    c("ece-bins-zero", lambda: U.expected_calibration_error(P3, Y6, num_bins=0), ValueError, "num_bins"),
    c("ece-bins-float", lambda: U.expected_calibration_error(P3, Y6, num_bins=2.0), ValueError, "num_bins"),
    c("brier-y-out-of-range", lambda: U.brier_score(P3, Y6 + 3), ValueError, "y"),
    c(
        "classification-bins",
        lambda: U.classification_uncertainty(P3, Y6, num_bins=-1),
        ValueError,
        "num_bins",
    ),
    c("interval-level-zero", lambda: U.gaussian_interval(F[0], F[1].abs(), 0.0), ValueError, "level"),
    c("interval-level-nan", lambda: U.gaussian_interval(F[0], F[1].abs(), NAN), ValueError, "level"),
    c("interval-variance-negative", lambda: U.gaussian_interval(F[0], -F[1].abs()), ValueError, "variance"),
    c("credible-1d", lambda: U.credible_interval(F[0]), ValueError, "per_draw"),
    c("credible-noise-zero", lambda: U.credible_interval(F, noise_std=0.0), ValueError, "noise_std"),
    c("credible-level-one", lambda: U.credible_interval(F, level=1.0), ValueError, "level"),
    c("nll-variance-zero", lambda: U.gaussian_nll(F[0], F[1], torch.zeros(4)), ValueError, "variance"),
    c("regression-1d", lambda: U.regression_uncertainty(F[0]), ValueError, "pred"),
    c("regression-list", lambda: U.regression_uncertainty(F.tolist()), TypeError, "pred"),
    c(
        "regression-noise-negative",
        lambda: U.regression_uncertainty(F, noise_std=-1.0),
        ValueError,
        "noise_std",
    ),
    c("regression-noise-nan", lambda: U.regression_uncertainty(F, noise_std=NAN), ValueError, "noise_std"),
    c(
        "regression-noise-tensor-negative",
        lambda: U.regression_uncertainty(F, noise_std=torch.tensor(-1.0)),
        ValueError,
        "noise_std",
    ),
    c(
        "regression-y-size",
        lambda: U.regression_uncertainty(F, torch.zeros(3), noise_std=1.0),
        ValueError,
        "y",
    ),
    c("regression-level-one", lambda: U.regression_uncertainty(F, level=1.0), ValueError, "level"),
    c(
        "regression-classification-prediction",
        lambda: U.regression_uncertainty(Prediction("classification", P3.mean(0), P3)),
        ValueError,
        "pred",
    ),
    # ---- bounds
    c("kl-inverse-q-nan", lambda: B.kl_inverse(NAN, 0.1), ValueError, "q"),
    c("kl-inverse-q-above-one", lambda: B.kl_inverse(1.5, 0.1), ValueError, "q"),
    c("kl-inverse-q-tensor", lambda: B.kl_inverse(torch.tensor(0.1), 0.1), ValueError, "q"),
    c("kl-inverse-c-negative", lambda: B.kl_inverse(0.1, -1.0), ValueError, "c"),
    c("kl-inverse-c-nan", lambda: B.kl_inverse(0.1, NAN), ValueError, "c"),
    c("kl-inverse-tol-zero", lambda: B.kl_inverse(0.1, 0.1, tol=0.0), ValueError, "tol"),
    c("kl-inverse-tol-nan", lambda: B.kl_inverse(0.1, 0.1, tol=NAN), ValueError, "tol"),
    c("catoni-c-zero", lambda: B.catoni_bound(0.1, 1.0, 10, c=0.0), ValueError, "c"),
    c("catoni-c-empty", lambda: B.catoni_bound(0.1, 1.0, 10, c=[]), ValueError, "c"),
    c("catoni-c-bool", lambda: B.catoni_bound(0.1, 1.0, 10, c=True), ValueError, "c"),
    c("catoni-c-nan", lambda: B.catoni_bound(0.1, 1.0, 10, c=[1.0, NAN]), ValueError, "c"),
    c("mi-sigma-missing", lambda: B.mi_bound(1.0, 10), ValueError, "sigma"),
    c("mi-sigma-zero", lambda: B.mi_bound(1.0, 10, sigma=0.0), ValueError, "sigma"),
    c("mi-sigma-inf", lambda: B.mi_bound(1.0, 10, sigma=INF), ValueError, "sigma"),
    c("mi-info-nan", lambda: B.mi_bound(NAN, 10, sigma=1.0), ValueError, "info"),
    c("mi-info-negative", lambda: B.mi_bound(-1.0, 10, sigma=1.0), ValueError, "info"),
    c("mi-info-raw-units", lambda: B.mi_bound(raw_units(), 10, sigma=1.0), ValueError, "info"),
    c("mi-n-zero", lambda: B.mi_bound(1.0, 0, sigma=1.0), ValueError, "n"),
    c(
        "mi-empirical-outside-range",
        lambda: B.mi_bound(1.0, 10, empirical=2.0, loss_range=(0, 1)),
        ValueError,
        "empirical",
    ),
    c("bce-p-min-zero", lambda: B.bounded_cross_entropy(P3[0], Y6, p_min=0.0), ValueError, "p_min"),
    c("bce-p-min-nan", lambda: B.bounded_cross_entropy(P3[0], Y6, p_min=NAN), ValueError, "p_min"),
    c("split-fraction-zero", lambda: B.split_data((X, Y_CLS), 0.0), ValueError, "prior_fraction"),
    c("split-fraction-tiny", lambda: B.split_data((X, Y_CLS), 0.01), ValueError, "prior_fraction"),
    c("split-rows-mismatch", lambda: B.split_data((X, Y_CLS[:9])), ValueError, "data"),
    c("split-nan", lambda: B.split_data((X_NAN, Y_CLS)), ValueError, "data"),
    c("split-not-pair", lambda: B.split_data(X), TypeError, "data"),
    c(
        "fit-prior-steps-zero",
        lambda: B.fit_prior(net(), "cross_entropy", (X, Y_CLS), steps=0),
        ValueError,
        "steps",
    ),
    c(
        "fit-prior-lr-nan",
        lambda: B.fit_prior(net(), "cross_entropy", (X, Y_CLS), lr=NAN, steps=1),
        ValueError,
        "lr",
    ),
    c(
        "fit-prior-batch-zero",
        lambda: B.fit_prior(net(), "cross_entropy", (X, Y_CLS), batch_size=0, steps=1),
        ValueError,
        "batch_size",
    ),
    c(
        "fit-prior-std-zero",
        lambda: B.fit_prior(net(), "cross_entropy", (X, Y_CLS), std=0.0, steps=1),
        ValueError,
        "std",
    ),
    c(
        "fit-prior-data-nan",
        lambda: B.fit_prior(net(), "cross_entropy", (X_NAN, Y_CLS), steps=1),
        ValueError,
        "prior_data",
    ),
    c("report-not-posterior", lambda: B.report("p", (X, Y_CLS), prior=GaussianPrior()), TypeError,
      "posterior"),
    c("report-regression",
      lambda: B.report(post(net(), task="regression"), (X, Y_CLS), prior=GaussianPrior()),
      ValueError, "posterior"),
    c("report-no-model", lambda: B.report(post(), (X, Y_CLS), prior=GaussianPrior()), ValueError, "model"),
    c("report-train-not-pair", lambda: B.report(post(net()), X, prior=GaussianPrior()), TypeError, "train"),
    c("report-train-nan", lambda: B.report(post(net()), (X_NAN, Y_CLS), prior=GaussianPrior()), ValueError,
      "train"),
    c("report-train-rows", lambda: B.report(post(net()), (X, Y_CLS[:3]), prior=GaussianPrior()), ValueError,
      "train"),
    c("report-train-labels", lambda: B.report(post(net()), (X, Y_CLS + 5), prior=GaussianPrior()), ValueError,
      "train"),
    c("report-train-float-labels", lambda: B.report(post(net()), (X, Y_CLS.float()), prior=GaussianPrior()),
      ValueError, "train"),
    c("report-heldout-nan", lambda: B.report(post(net()), (X, Y_CLS), heldout=(X_NAN, Y_CLS),
                                             prior=GaussianPrior()), ValueError, "heldout"),
    c("report-kl-nan", lambda: B.report(post(net()), (X, Y_CLS), kl=NAN), ValueError, "kl"),
    c("report-iiw-str", lambda: B.report(post(net()), (X, Y_CLS), kl=1.0, iiw="a"), TypeError, "iiw"),
    c("report-delta-zero", lambda: B.report(post(net()), (X, Y_CLS), kl=1.0, delta=0.0), ValueError, "delta"),
    c("report-mc-delta-sum", lambda: B.report(post(net()), (X, Y_CLS), kl=1.0, mc_delta=0.99), ValueError,
      "mc_delta"),
    c("report-p-min", lambda: B.report(post(net()), (X, Y_CLS), kl=1.0, p_min=0.0), ValueError, "p_min"),
    c("report-structure", lambda: B.report(post(net()), (X, Y_CLS), prior=GaussianPrior(), structure="x"),
      ValueError, "structure"),
    c("report-chunk-zero", lambda: B.report(post(net()), (X, Y_CLS), kl=1.0, chunk_size=0), ValueError,
      "chunk_size"),
    c("report-prior-str", lambda: B.report(post(net()), (X, Y_CLS), prior="normal"), TypeError, "prior"),
    # ---- diagnostics
    c("summary-rhat-zero", lambda: D.summary(post(), rhat_threshold=0), ValueError, "rhat_threshold"),
    c("summary-rhat-nan", lambda: D.summary(post(), rhat_threshold=NAN), ValueError, "rhat_threshold"),
    c(
        "summary-min-ess-str",
        lambda: D.summary(post(), min_ess_per_chain="a"),
        ValueError,
        "min_ess_per_chain",
    ),
    c("summary-few-draws", lambda: D.summary(post(num_draws=3)), ValueError, "posterior"),
    c("summary-data-not-pair", lambda: D.summary(post(net()), data=X), TypeError, "data"),
    c("summary-data-rows", lambda: D.summary(post(net()), data=(X, Y_CLS[:3])), ValueError, "data"),
    c(
        "summary-projections-zero",
        lambda: D.summary(post(), num_projections=0, max_weights=1),
        ValueError,
        "num_projections",
    ),
    c(
        "summary-chunk-zero",
        lambda: D.summary(post(net()), data=(X, Y_CLS), chunk_size=0),
        ValueError,
        "chunk_size",
    ),
    c("summary-probe-list", lambda: D.summary(post(net()), probe_x=X.tolist()), TypeError, "x"),
    c("summary-no-model", lambda: D.summary(post(), data=(X, Y_CLS)), ValueError, "posterior"),
    c("to-arviz-params-unknown", lambda: D.to_arviz(post(), params=["nope"]), ValueError, "params"),
    c("to-arviz-params-str", lambda: D.to_arviz(post(), params="weight"), ValueError, "params"),
    c("to-arviz-data-not-pair", lambda: D.to_arviz(post(net()), data=X), TypeError, "data"),
    c(
        "to-arviz-projections-zero",
        lambda: D.to_arviz(post(), params="projections", num_projections=0),
        ValueError,
        "num_projections",
    ),
    c(
        "to-arviz-regression-no-noise",
        lambda: D.to_arviz(post(net(), task="regression"), data=(X, Y_REG)),
        ValueError,
        "noise_std",
    ),
    c("to-arviz-task", lambda: D.to_arviz(post(net(), task="clf"), data=(X, Y_CLS)), ValueError, "task"),
    c("log-likelihood-data-rows", lambda: D.log_likelihood(post(net()), X, Y_CLS[:3]), ValueError, "data"),
    # ---- run configuration (CLI): a ConfigError naming the dotted key
    c("config-unknown-section", lambda: cfg({"sampling": {}}), ConfigError, "sampling"),
    c("config-unknown-key", lambda: cfg({"sampler": {"step": 0.1}}), ConfigError, "sampler.step"),
    c("config-beta-nan", lambda: cfg({"posterior": {"beta": NAN}}), ConfigError, "posterior.beta"),
    c("config-beta-zero", lambda: cfg({"posterior": {"beta": 0.0}}), ConfigError, "posterior.beta"),
    c("config-beta-str", lambda: cfg({"posterior": {"beta": "0.1"}}), ConfigError, "posterior.beta"),
    c("config-beta-and-temperature", lambda: cfg({"posterior": {"beta": 0.1, "temperature": 1.0}}),
      ConfigError, "posterior.beta"),
    c("config-step-nan", lambda: cfg({"sampler": {"step_size": NAN}}), ConfigError, "sampler.step_size"),
    c("config-step-zero", lambda: cfg({"sampler": {"step_size": 0.0}}), ConfigError, "sampler.step_size"),
    c("config-chains-bool", lambda: cfg({"run": {"num_chains": True}}), ConfigError, "run.num_chains"),
    c("config-chains-float", lambda: cfg({"run": {"num_chains": 2.0}}), ConfigError, "run.num_chains"),
    c("config-sampler-name", lambda: cfg({"sampler": {"name": "hmc"}}), ConfigError, "sampler.name"),
    c("config-section-not-table", lambda: cfg({"run": 3}), ConfigError, "run"),
    c("config-sampler-kwargs-unknown", lambda: cfg({"sampler": {"name": "sghmc", "kwargs": {"frict": 0.1}}}),
      ConfigError, "sampler.kwargs.frict"),
    c("config-source-missing", lambda: validate_config({"data": {}}, output_dir="out"), ConfigError,
      "data.source"),
]


@pytest.mark.parametrize(("fn", "exc", "arg"), CASES)
def test_entry_point_rejects_bad_argument(fn, exc, arg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc) as info:
            fn()
    assert names(arg, str(info.value)), f"the message does not name {arg!r}: {info.value}"


# ------------------------------------------------------------------ posterior file validation
def _payload(p: Posterior) -> dict:
    return {
        "draws": dict(p.draws),
        "sample_stats": dict(p.sample_stats),
        "fixed": {},
        "diverged": p.diverged,
        "divergence_step": p.divergence_step,
        "metadata_json": json.dumps(p.metadata),
    }


def test_load_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        Posterior.load(tmp_path / "nope.pib")


def test_load_checks_the_model(tmp_path):
    post().save(tmp_path / "p.pib")
    with pytest.raises(ValueError, match="model"):
        Posterior.load(tmp_path / "p.pib", model=nn.Linear(4, 2))
    assert Posterior.load(tmp_path / "p.pib", model=net()).model is not None


@pytest.mark.parametrize(
    ("key", "value"), [("draws", {}), ("draws", [1, 2]), ("metadata_json", "{not json"), ("metadata_json", 3)]
)
def test_load_rejects_bad_payload_values(tmp_path, key, value):
    payload = _payload(post())
    payload[key] = value
    save_payload(tmp_path / "p.pib", "posterior", LEGACY_FORMAT_VERSION, payload)
    with pytest.raises(FormatError, match="incomplete posterior payload"):
        Posterior.load(tmp_path / "p.pib")


# ------------------------------------------------------------------ confusing or silent: bugs
STILL_OPEN: set[str] = set()  # every bug the audit found is fixed; add ids here for new findings


def bug(id_, fn, arg, reason):
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if id_ in STILL_OPEN else []
    return pytest.param(fn, arg, id=id_, marks=marks)


def _bad_payload_load(tmp: str, key: str, value) -> Posterior:
    payload = _payload(post())
    payload[key] = value
    save_payload(f"{tmp}/bad.pib", "posterior", LEGACY_FORMAT_VERSION, payload)
    return Posterior.load(f"{tmp}/bad.pib")


def _energy_unknown_param():
    e = Energy(net(), "gaussian", beta=1.0)
    return e.functional({"nope": torch.zeros(2)}, X, Y_REG)


def _group_lr_zero():
    return SGLD([{"params": params(), "lr": 0.0}], lr=0.1)


BUGS = [
    # ---- driver.py: data the model cannot consume surfaces as raw torch errors from the first energy
    bug(
        "sample-x-features",
        lambda: run(net(), "cross_entropy", (torch.randn(16, 4), Y_CLS)),
        "data",
        "driver.sample: x with the wrong number of features raises a raw RuntimeError (mat1 and mat2 shapes "
        "cannot be multiplied); evaluate the energy once on a first batch and re-raise as "
        "ValueError('data: ...')",
    ),
    bug(
        "sample-x-int-dtype",
        lambda: run(net(), "cross_entropy", (torch.randint(0, 3, (16, 3)), Y_CLS)),
        "data",
        "driver.sample: integer x raises RuntimeError (mat1 and mat2 must have the same dtype)",
    ),
    bug(
        "sample-x-float64-model-float32",
        lambda: run(net(), "cross_entropy", (X.double(), Y_CLS)),
        "data",
        "driver.sample: float64 x with a float32 model raises RuntimeError (dtype mismatch); cast or "
        "name 'data'",
    ),
    bug(
        "sample-ce-float-labels",
        lambda: run(net(), "cross_entropy", (X, Y_CLS.float())),
        "data",
        "driver.sample: float class labels with cross_entropy raise RuntimeError "
        "(expected target dtype Long)",
    ),
    bug(
        "sample-ce-label-out-of-range",
        lambda: run(net(), "cross_entropy", (X, Y_CLS + 5)),
        "data",
        "driver.sample: class labels >= number of outputs raise IndexError (Target 6 is out of bounds)",
    ),
    bug(
        "sample-regression-y-shape",
        lambda: run(net(), "gaussian", (X, torch.randn(16, 3))),
        "data",
        "energy.GaussianLoss.__call__: target.reshape(output.shape) raises RuntimeError for y of the wrong "
        "width; check y.numel() == output.numel() and raise ValueError naming y/data",
    ),
    bug(
        "sample-init-nan",
        lambda: run(init={"weight": torch.full((1, 2, 3), NAN), "bias": torch.zeros(1, 2)}),
        "init",
        "driver._initial_params: NaN/Inf initial weights are accepted; the chain is just flagged "
        "diverged at step 0 instead of ValueError('init: ... non-finite')",
    ),
    bug(
        "sample-task-with-string-loss",
        lambda: run(task="cls"),
        "task",
        "energy.resolve_loss: task is validated only for callable losses; with a string loss_fn "
        "task='cls' is accepted and stored (move the task check above the string branch)",
    ),
    # ---- energy.py / prior.py
    bug(
        "energy-model-not-module",
        lambda: Energy("net", "gaussian", beta=1.0),
        "model",
        "energy.Energy.__init__: a non-Module model raises AttributeError from as_prior "
        "('str' object has no attribute 'named_parameters')",
    ),
    bug(
        "energy-functional-unknown-param",
        _energy_unknown_param,
        "params",
        "energy.Energy.functional: unknown parameter names are silently ignored by functional_call "
        "(the model's own weights are used) and summed into the prior; raise KeyError naming params",
    ),
    bug(
        "gaussian-loss-inf",
        lambda: GaussianLoss(INF),
        "noise_std",
        "energy.GaussianLoss: noise_std=inf is accepted (every loss becomes 0); require a finite value",
    ),
    bug(
        "gaussian-loss-str",
        lambda: GaussianLoss("a"),
        "noise_std",
        "energy.GaussianLoss: noise_std='a' raises a bare TypeError from the comparison",
    ),
    bug(
        "prior-std-inf",
        lambda: GaussianPrior(std=INF),
        "std",
        "prior.GaussianPrior: std=inf is accepted (log p = -inf everywhere); require finite std",
    ),
    bug(
        "prior-std-str",
        lambda: GaussianPrior(std="a"),
        "std",
        "prior.GaussianPrior: std='a' raises ValueError('could not convert string to float') "
        "without naming std",
    ),
    bug(
        "prior-mean-not-tensor",
        lambda: GaussianPrior(mean={"w": [1.0]}),
        "mean",
        "prior.GaussianPrior: a non-tensor mean raises AttributeError "
        "('list' object has no attribute 'detach')",
    ),
    bug(
        "prior-mean-nan",
        lambda: GaussianPrior(mean={"w": torch.tensor([NAN])}),
        "mean",
        "prior.GaussianPrior: a NaN mean is accepted silently (every energy and KL becomes NaN)",
    ),
    bug(
        "prior-from-module-std-shape",
        lambda: GaussianPrior.from_module(net(), std={"weight": torch.ones(3, 2)}),
        "std",
        "prior.GaussianPrior.from_module: a per-weight std tensor of the wrong shape is accepted "
        "(mean shapes are checked, std shapes are not)",
    ),
    bug(
        "prior-from-module-not-module",
        lambda: GaussianPrior.from_module("net"),
        "module",
        "prior.GaussianPrior.from_module: a non-Module raises AttributeError",
    ),
    # ---- schedules.py
    bug(
        "cosine-total-fractional",
        lambda: S.Cosine(1.0, 2.5),
        "total_steps",
        "schedules.Cosine: total_steps=2.5 is truncated to 2 by int() instead of rejected",
    ),
    bug(
        "cosine-total-str",
        lambda: S.Cosine(1.0, "a"),
        "total_steps",
        "schedules.Cosine: total_steps='a' raises int()'s ValueError without naming total_steps",
    ),
    bug(
        "cyclical-length-fractional",
        lambda: S.Cyclical(1.0, 2.7),
        "cycle_length",
        "schedules.Cyclical: cycle_length=2.7 is truncated to 2 by int() instead of rejected",
    ),
    bug(
        "cyclical-length-none",
        lambda: S.Cyclical(1.0, None),
        "cycle_length",
        "schedules.Cyclical: cycle_length=None raises int()'s TypeError without naming cycle_length",
    ),
    bug(
        "polynomial-gamma-str",
        lambda: S.PolynomialDecay(1.0, gamma="a"),
        "gamma",
        "schedules.PolynomialDecay: gamma='a' raises a bare TypeError from the comparison",
    ),
    # ---- optim.py
    bug(
        "sgld-lr-inf",
        lambda: SGLD(params(), lr=INF),
        "lr",
        "optim._LangevinOptimizer: lr=inf is accepted (lr > 0 check without isfinite)",
    ),
    bug(
        "sgld-noise-scale-str",
        lambda: SGLD(params(), lr=0.1, noise_scale="a"),
        "noise_scale",
        "optim._LangevinOptimizer: noise_scale='a' raises a bare TypeError from the comparison",
    ),
    bug(
        "sgld-generator-not-generator",
        lambda: SGLD(params(), lr=0.1, generator=3),
        "generator",
        "optim._LangevinOptimizer: generator=3 is accepted and fails only at the first step",
    ),
    bug(
        "sgld-param-group-lr-zero",
        _group_lr_zero,
        "lr",
        "optim._LangevinOptimizer: per-group hyperparameters are not validated (lr=0 in a param group is "
        "accepted); validate in add_param_group",
    ),
    bug(
        "psgld-param-group-alpha",
        lambda: PSGLD([{"params": params(), "alpha": 5.0}], lr=0.1),
        "alpha",
        "optim.PSGLD: a param-group alpha=5 is accepted; only the default is validated",
    ),
    # ---- posterior.py
    bug(
        "posterior-draws-list",
        lambda: Posterior([torch.zeros(1, 1, 1)], {}, {}),
        "draws",
        "posterior.Posterior.__post_init__: draws as a list raises AttributeError ('list' has no 'values')",
    ),
    bug(
        "posterior-draws-not-tensor",
        lambda: Posterior({"w": [[1.0]]}, {}, {}),
        "draws",
        "posterior.Posterior.__post_init__: non-tensor draws raise AttributeError (no 'shape')",
    ),
    bug(
        "posterior-draws-1d",
        lambda: Posterior({"w": torch.zeros(3)}, {}, {}),
        "draws",
        "posterior.Posterior.__post_init__: draws without (chain, draw) dims are accepted and fail "
        "later (IndexError in num_params/repr); require v.dim() >= 2",
    ),
    bug(
        "posterior-zero-draws",
        lambda: Posterior({"w": torch.zeros(2, 0, 3)}, {}, {}),
        "draws",
        "posterior.Posterior: zero draws per chain are accepted; num_params/repr then raise IndexError",
    ),
    bug(
        "posterior-stats-shape",
        lambda: Posterior({"w": torch.zeros(2, 5, 3)}, {"energy": torch.zeros(3, 5)}, {}),
        "sample_stats",
        "posterior.Posterior.__post_init__: sample_stats with another (chain, draw) shape are "
        "accepted (to_arviz then silently drops them)",
    ),
    bug(
        "posterior-diverged-shape",
        lambda: Posterior({"w": torch.zeros(2, 5, 3)}, {}, {}, diverged=torch.zeros(3, dtype=torch.bool)),
        "diverged",
        "posterior.Posterior.__post_init__: diverged/divergence_step of the wrong length are accepted",
    ),
    bug(
        "posterior-metadata-none",
        lambda: Posterior({"w": torch.zeros(2, 5, 3)}, {}, None).task,
        "metadata",
        "posterior.Posterior: metadata=None is accepted and fails later with AttributeError",
    ),
    bug(
        "predict-x-features",
        lambda: post(net()).predict(torch.randn(4, 5)),
        "x",
        "posterior.Posterior.predict: x of the wrong width raises a raw RuntimeError from vmap/bmm",
    ),
    bug(
        "predict-x-int",
        lambda: post(net()).predict(torch.randint(0, 3, (4, 3))),
        "x",
        "posterior.Posterior.predict: integer x raises a raw RuntimeError (expected scalar type Long)",
    ),
    bug(
        "predict-x-nan",
        lambda: post(net()).predict(torch.full((4, 3), NAN)),
        "x",
        "posterior.Posterior.predict: NaN inputs are accepted and give NaN predictions silently",
    ),
    bug(
        "predict-chunk-float",
        lambda: post(net()).predict(X, chunk_size=2.5),
        "chunk_size",
        "posterior.Posterior.predict: chunk_size=2.5 raises range()'s TypeError without naming chunk_size",
    ),
    bug(
        "predict-model-other-names",
        lambda: post().predict(X, model=nn.Sequential(nn.Linear(3, 2))),
        "model",
        "posterior.Posterior.predict: a model whose parameter names differ from the draws ('0.weight' vs "
        "'weight') SILENTLY uses the model's own weights for every draw (functional_call ignores unknown "
        "keys); call self.check_model(model) in predict (and in diagnostics._outputs)",
    ),
    bug(
        "predict-model-other-shapes",
        lambda: post().predict(X, model=nn.Linear(4, 2)),
        "model",
        "posterior.Posterior.predict: a model with other parameter shapes is accepted "
        "(draws are swapped in); "
        "call check_model",
    ),
    bug(
        "load-payload-draws-not-tensors",
        lambda: _with_tmp(lambda t: _bad_payload_load(t, "draws", {"w": [1.0]})),
        "payload",
        "posterior.Posterior.load: a checksum-valid payload whose draws are not tensors raises "
        "AttributeError from __post_init__ instead of FormatError (load catches only Key/Type/ValueError)",
    ),
    bug(
        "load-payload-draws-0d",
        lambda: _with_tmp(lambda t: _bad_payload_load(t, "draws", {"w": torch.tensor(1.0)})),
        "payload",
        "posterior.Posterior.load: a 0-d draws tensor raises IndexError instead of FormatError",
    ),
    # ---- iiw
    bug(
        "kl-not-posterior",
        lambda: iiw.kl({"w": torch.zeros(2, 5, 3)}, GaussianPrior()),
        "posterior",
        "iiw.samples.kl: a non-Posterior raises AttributeError in _layout before _chains_of's type check; "
        "check isinstance(posterior, Posterior) first",
    ),
    bug(
        "kl-rank-float",
        lambda: iiw.kl(post(), GaussianPrior(), structure="lowrank", rank=2.5),
        "rank",
        "iiw.samples._Gauss: rank=2.5 raises a slicing TypeError; validate rank as an int >= 1",
    ),
    bug(
        "kl-num-mc-zero",
        lambda: iiw.kl(post(), laplace_prior(), num_mc=0),
        "num_mc",
        "iiw.samples.kl: num_mc=0 returns NaN silently for a non-Gaussian prior; require num_mc >= 2",
    ),
    bug(
        "kl-num-mc-negative",
        lambda: iiw.kl(post(), laplace_prior(), num_mc=-1),
        "num_mc",
        "iiw.samples.kl: num_mc=-1 raises a raw RuntimeError from dist.sample",
    ),
    bug(
        "kl-prior-mean-nan",
        lambda: iiw.kl(post(), GaussianPrior(mean={"weight": torch.full((2, 3), NAN)})),
        "mean",
        "iiw.samples._prior_vectors: a NaN prior mean gave a NaN KL silently (now refused when the prior "
        "is built)",
    ),
    bug(
        "fisher-theta0-nan",
        lambda: iiw.fisher(
            net(), "gaussian", (X, Y_REG), {"weight": torch.full((2, 3), NAN), "bias": torch.zeros(2)}
        ),
        "theta_0",
        "iiw.fisher.check_theta0: NaN theta_0 is accepted and the estimate is NaN silently",
    ),
    bug(
        "fisher-x-features",
        lambda: iiw.fisher(net(), "gaussian", (torch.randn(16, 5), Y_REG), theta0()),
        "data",
        "iiw.fisher: x of the wrong width raises a raw RuntimeError from the JVP",
    ),
    bug(
        "fisher-y-shape",
        lambda: iiw.fisher(net(), "gaussian", (X, torch.randn(16, 3)), theta0()),
        "data",
        "iiw.fisher / energy.GaussianLoss: y of the wrong width raises a raw RuntimeError (reshape)",
    ),
    bug(
        "fisher-ce-label-out-of-range",
        lambda: iiw.fisher(net(), "cross_entropy", (X, Y_CLS + 7), theta0()),
        "data",
        "iiw.fisher: class labels out of range raise IndexError (Target 8 is out of bounds)",
    ),
    # ---- uncertainty.py
    bug(
        "interval-variance-nan",
        lambda: U.gaussian_interval(F[0], torch.full((4,), NAN)),
        "variance",
        "uncertainty.gaussian_interval: NaN variance is accepted, the interval is NaN silently "
        "(the check is 'variance < 0', which NaN passes)",
    ),
    bug(
        "interval-mean-list",
        lambda: U.gaussian_interval([0.0], torch.ones(1)),
        "mean",
        "uncertainty.gaussian_interval: a list mean raises AttributeError (no 'dtype')",
    ),
    bug(
        "interval-shape-mismatch",
        lambda: U.gaussian_interval(torch.zeros(4), torch.ones(3)),
        "variance",
        "uncertainty.gaussian_interval: mean/variance of different shapes raise a raw RuntimeError",
    ),
    bug(
        "credible-noise-nan",
        lambda: U.credible_interval(F, noise_std=NAN),
        "noise_std",
        "uncertainty.credible_interval: noise_std=nan passes 's <= 0' and fails inside torch.distributions "
        "with a message that does not name noise_std",
    ),
    bug(
        "credible-noise-inf",
        lambda: U.credible_interval(F, noise_std=INF),
        "noise_std",
        "uncertainty.credible_interval: noise_std=inf fails inside torch.distributions (support error)",
    ),
    bug(
        "credible-noise-str",
        lambda: U.credible_interval(F, noise_std="a"),
        "noise_std",
        "uncertainty.credible_interval: noise_std='a' raises torch's TypeError (invalid data type 'str')",
    ),
    bug(
        "credible-noise-shape",
        lambda: U.credible_interval(F, noise_std=torch.ones(3)),
        "noise_std",
        "uncertainty.credible_interval: a per-point noise_std of the wrong length raises a raw RuntimeError",
    ),
    bug(
        "credible-draws-nan",
        lambda: U.credible_interval(torch.full((5, 4), NAN)),
        "per_draw",
        "uncertainty.credible_interval: NaN draws give NaN intervals silently (and with noise_std a "
        "torch.distributions error)",
    ),
    bug(
        "coverage-shape",
        lambda: U.coverage(torch.zeros(3), torch.zeros(4), torch.ones(4)),
        "y",
        "uncertainty.coverage: y with another number of values raises a raw RuntimeError (reshape)",
    ),
    bug(
        "coverage-nan",
        lambda: U.coverage(torch.full((4,), NAN), torch.zeros(4), torch.ones(4)),
        "y",
        "uncertainty.coverage: NaN targets count as 'not covered' silently (coverage 0.0)",
    ),
    bug(
        "nll-y-shape",
        lambda: U.gaussian_nll(torch.zeros(3), torch.zeros(4), torch.ones(4)),
        "y",
        "uncertainty.gaussian_nll: y of another size raises a raw RuntimeError (reshape)",
    ),
    bug(
        "nll-variance-nan",
        lambda: U.gaussian_nll(torch.zeros(4), torch.zeros(4), torch.full((4,), NAN)),
        "variance",
        "uncertainty.gaussian_nll: NaN variance passes 'variance <= 0' and fails in Normal with "
        "a message that does not name variance",
    ),
    bug(
        "regression-noise-tensor-nan",
        lambda: U.regression_uncertainty(F, noise_std=torch.tensor(NAN)),
        "noise_std",
        "uncertainty.regression_uncertainty: a NaN noise_std tensor is not checked (floats are) "
        "and fails in torch.distributions",
    ),
    bug(
        "regression-noise-str",
        lambda: U.regression_uncertainty(F, noise_std="a"),
        "noise_std",
        "uncertainty.regression_uncertainty: noise_std='a' raises a bare TypeError from the comparison",
    ),
    bug(
        "regression-y-nan",
        lambda: U.regression_uncertainty(F, torch.full((4,), NAN), noise_std=1.0),
        "y",
        "uncertainty.regression_uncertainty: NaN targets fail inside torch.distributions (support error) "
        "with a message that does not name y",
    ),
    bug(
        "regression-draws-nan",
        lambda: U.regression_uncertainty(torch.full((5, 4), NAN)),
        "pred",
        "uncertainty.regression_uncertainty: NaN draws are accepted and every output is NaN silently",
    ),
    bug(
        "ece-no-points",
        lambda: U.expected_calibration_error(torch.zeros(2, 0, 3), torch.zeros(0)),
        "pred",
        "uncertainty.expected_calibration_error: zero points give ECE = nan silently",
    ),
    # ---- bounds.py
    bug(
        "kl-inverse-tol-str",
        lambda: B.kl_inverse(0.1, 0.1, tol="a"),
        "tol",
        "bounds.kl_inverse: tol='a' raises a bare TypeError from the comparison",
    ),
    bug(
        "catoni-c-str",
        lambda: B.catoni_bound(0.1, 1.0, 10, c="a"),
        "c",
        "bounds.catoni_bound: c='a' is iterated as a sequence and float('a') raises ValueError without "
        "naming c",
    ),
    bug(
        "mi-empirical-nan",
        lambda: B.mi_bound(1.0, 10, sigma=1.0, empirical=NAN),
        "empirical",
        "bounds.mi_bound: without loss_range, empirical=nan is accepted and the bound is NaN silently",
    ),
    bug(
        "mi-empirical-inf",
        lambda: B.mi_bound(1.0, 10, sigma=1.0, empirical=INF),
        "empirical",
        "bounds.mi_bound: without loss_range, empirical=inf is accepted (bound = inf)",
    ),
    bug(
        "bce-label-out-of-range",
        lambda: B.bounded_cross_entropy(P3[0], Y6 + 5),
        "y",
        "bounds.bounded_cross_entropy: labels out of range raise a raw RuntimeError from gather",
    ),
    bug(
        "bce-label-count",
        lambda: B.bounded_cross_entropy(P3[0], Y6[:3]),
        "y",
        "bounds.bounded_cross_entropy: y of another length raises a raw RuntimeError from expand",
    ),
    bug(
        "bce-float-labels",
        lambda: B.bounded_cross_entropy(P3[0], Y6.float()),
        "y",
        "bounds.bounded_cross_entropy: float labels raise gather()'s RuntimeError",
    ),
    bug(
        "bce-probs-not-probabilities",
        lambda: B.bounded_cross_entropy(torch.randn(6, 3), Y6),
        "probs",
        "bounds.bounded_cross_entropy: logits/NaN instead of probabilities are accepted silently",
    ),
    bug(
        "fit-prior-lr-str",
        lambda: B.fit_prior(net(), "cross_entropy", (X, Y_CLS), lr="a", steps=1),
        "lr",
        "bounds.fit_prior: lr='a' raises a bare TypeError from the comparison",
    ),
    bug(
        "fit-prior-x-features",
        lambda: B.fit_prior(net(), "cross_entropy", (torch.randn(16, 4), Y_CLS), steps=1),
        "prior_data",
        "bounds.fit_prior: x of the wrong width raises a raw RuntimeError",
    ),
    bug(
        "report-mc-delta-nan",
        lambda: B.report(post(net()), (X, Y_CLS), kl=1.0, mc_delta=NAN),
        "mc_delta",
        "bounds.report: mc_delta is checked with _check_delta, so the message names 'delta' (the other "
        "argument) for mc_delta=nan or -1; pass the name through",
    ),
    bug(
        "report-n-prior-negative",
        lambda: B.report(post(net()), (X, Y_CLS), kl=1.0, n_prior=-1),
        "n_prior",
        "bounds.report: n_prior is checked with _check_n, so the message names 'n' instead of n_prior",
    ),
    bug(
        "report-train-features",
        lambda: B.report(post(net()), (torch.randn(16, 5), Y_CLS), kl=1.0),
        "train",
        "bounds.report/_evaluate: x of the wrong width raises a raw RuntimeError from the vmapped model",
    ),
    # ---- diagnostics.py
    bug(
        "summary-not-posterior",
        lambda: D.summary({"w": 1}),
        "posterior",
        "diagnostics.summary: a non-Posterior raises AttributeError (no 'num_draws')",
    ),
    bug(
        "to-arviz-not-posterior",
        lambda: D.to_arviz("post"),
        "posterior",
        "diagnostics.to_arviz: a non-Posterior raises AttributeError (no 'kept_chains')",
    ),
    bug(
        "summary-label-out-of-range",
        lambda: D.summary(post(net()), data=(X, Y_CLS + 5)),
        "data",
        "diagnostics._observation_dist/_targets: labels out of range fail in Categorical.log_prob with a "
        "support message that does not name data/y",
    ),
    bug(
        "summary-x-nan",
        lambda: D.summary(post(net()), data=(X_NAN, Y_CLS), warn=False),
        "data",
        "diagnostics._check_data: NaN x is not checked; Categorical(logits=nan) fails with a "
        "constraint message",
    ),
    bug(
        "summary-x-features",
        lambda: D.summary(post(net()), data=(torch.randn(16, 5), Y_CLS)),
        "data",
        "diagnostics._outputs: x of the wrong width raises a raw RuntimeError",
    ),
    bug(
        "summary-probe-features",
        lambda: D.summary(post(net()), probe_x=torch.randn(2, 5)),
        "probe_x",
        "diagnostics._outputs: probe_x of the wrong width raises a raw RuntimeError",
    ),
    bug(
        "summary-max-weights-negative",
        lambda: D.summary(post(), max_weights=-1),
        "max_weights",
        "diagnostics.summary: max_weights=-1 is accepted",
    ),
    bug(
        "log-likelihood-fractional-labels",
        lambda: D.log_likelihood(post(net()), X, Y_CLS.float() + 0.5),
        "y",
        "diagnostics._targets: fractional float labels are truncated by y.long() silently",
    ),
    bug(
        "log-likelihood-model-other-names",
        lambda: D.log_likelihood(post(nn.Sequential(nn.Linear(3, 2))), X, Y_CLS),
        "model",
        "diagnostics._outputs: a model whose parameter names differ from the draws SILENTLY evaluates the "
        "model's own weights for every draw (functional_call ignores unknown keys): the log-likelihood is "
        "the same for all draws; call post.check_model(model) first",
    ),
    bug(
        "to-arviz-label-out-of-range",
        lambda: D.to_arviz(post(net()), data=(X, Y_CLS + 5)),
        "data",
        "diagnostics.to_arviz: labels out of range fail in Categorical.log_prob without naming data/y",
    ),
]


def _with_tmp(fn):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return fn(tmp)


@pytest.mark.parametrize(("fn", "arg"), BUGS)
def test_confusing_or_silent_entry_point(fn, arg):
    """Desired behaviour: one ValueError/TypeError/KeyError whose message names ``arg``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ANY) as info:
            fn()
    assert names(arg, str(info.value)), f"the message does not name {arg!r}: {info.value}"


def test_sample_validates_before_touching_the_model():
    """A rejected call leaves the module's weights and mode as they were."""
    model = net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="beta"):
        run(model, "cross_entropy", (X, Y_CLS), beta=-1.0)
    with pytest.raises(ValueError, match="keep"):
        run(model, "cross_entropy", (X, Y_CLS), keep=["nope"])
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
