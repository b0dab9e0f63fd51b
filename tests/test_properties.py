"""Hypothesis property tests (issue 9): invariants of the IIW estimators, the uncertainty and bound
functions, and the integrity of saved posteriors (round-trips, corruption, foreign/old files).

Tolerances: quantities computed in float64 are compared to 1e-9 relative (rounding of sums taken in
another order), never widened to make a case pass.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from pib_bayes import GaussianPrior, Posterior, iiw
from pib_bayes import bounds as B
from pib_bayes import uncertainty as U
from pib_bayes.io import MAGIC, FormatError, save_payload
from pib_bayes.posterior import LEGACY_FORMAT_VERSION as FORMAT_VERSION  # the legacy reader's tests

FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(max_examples=60, deadline=None)
REL = 1e-9


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=REL)


# ------------------------------------------------------------------------------- random posteriors
@st.composite
def gaussian_posteriors(draw):
    """A Posterior of random Gaussian draws (1-3 parameters of small random shapes) and a GaussianPrior
    with random per-parameter std and (sometimes) a non-zero mean."""
    num_params = draw(st.integers(1, 3))
    shapes = [tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))) for _ in range(num_params)]
    chains = draw(st.integers(1, 3))
    ndraws = draw(st.integers(4, 30))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    draws, stds, means = {}, {}, {}
    for i, shape in enumerate(shapes):
        name = f"layer{i}.weight"
        scale = draw(st.floats(0.05, 3.0))
        loc = draw(st.floats(-2.0, 2.0))
        draws[name] = loc + scale * torch.randn(chains, ndraws, *shape, generator=g, dtype=torch.float64)
        stds[name] = draw(st.floats(0.2, 5.0))
        if draw(st.booleans()):
            means[name] = torch.randn(shape, generator=g, dtype=torch.float64)
    return Posterior(draws, {}, {}), GaussianPrior(std=stds, mean=means)


def permuted(post: Posterior, order: list[int]) -> Posterior:
    names = post.param_names
    return Posterior({names[i]: post.draws[names[i]] for i in order}, {}, {})


@FAST
@given(gaussian_posteriors(), st.sampled_from(iiw.STRUCTURES), st.randoms(use_true_random=False))
def test_kl_nonnegative_and_invariant_to_parameter_order(case, structure, rnd):
    post, prior = case
    order = list(range(len(post.param_names)))
    rnd.shuffle(order)
    r = iiw.kl(post, prior, structure=structure)
    r_perm = iiw.kl(permuted(post, order), prior, structure=structure)
    # KL between two Gaussians (the fit is positive definite for every structure) is >= 0
    assert r.total >= 0.0
    assert all(v >= 0.0 for v in r.per_group.values())
    assert math.isfinite(r.total)
    assert close(r.total, r_perm.total)
    assert set(r.per_group) == set(r_perm.per_group)
    for g in r.per_group:
        assert close(r.per_group[g], r_perm.per_group[g])


@FAST
@given(gaussian_posteriors(), st.sampled_from(["diag", "full"]))
def test_kl_total_of_separable_structures_is_sum_of_groups(case, structure):
    post, prior = case
    r = iiw.kl(post, prior, structure=structure)
    if structure == "diag":
        assert close(r.total, sum(r.per_group.values()))
    else:  # joint KL >= sum of marginals for a prior independent across groups (total correlation >= 0)
        assert r.total >= sum(r.per_group.values()) - REL * max(1.0, abs(r.total))


@st.composite
def resampled_posteriors(draw):
    """2-5 posteriors (one per resample) on the same parameter layout, with random mean shifts."""
    nres = draw(st.integers(2, 5))
    dim = draw(st.integers(1, 4))
    chains = draw(st.integers(1, 3))
    ndraws = draw(st.integers(4, 25))
    seed = draw(st.integers(0, 2**31 - 1))
    shift = draw(st.floats(0.0, 3.0))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(nres):
        mu = shift * torch.randn(dim, generator=g, dtype=torch.float64)
        a = mu + torch.randn(chains, ndraws, dim, generator=g, dtype=torch.float64)
        b = torch.randn(chains, ndraws, 2, generator=g, dtype=torch.float64)
        out.append(Posterior({"a.w": a, "b.w": b}, {}, {}))
    return out


@FAST
@given(resampled_posteriors(), st.sampled_from(iiw.STRUCTURES))
def test_channel_without_mc_correction_is_nonnegative_and_order_invariant(posts, structure):
    r = iiw.channel(posts, structure=structure, mc_correction=False)
    swapped = [Posterior({"b.w": p.draws["b.w"], "a.w": p.draws["a.w"]}, {}, {}) for p in posts]
    r2 = iiw.channel(swapped, structure=structure, mc_correction=False)
    assert r.total >= 0.0 and all(v >= 0.0 for v in r.per_group.values())
    assert close(r.total, r2.total)
    for g in r.per_group:
        assert close(r.per_group[g], r2.per_group[g])


def test_channel_default_is_nonnegative_without_signal():
    # regression: the Monte-Carlo corrected between-covariance is clamped to be PSD
    g = torch.Generator().manual_seed(18)
    posts = [Posterior({"w": torch.randn(2, 20, 3, generator=g, dtype=torch.float64)}, {}, {})
             for _ in range(4)]
    r = iiw.channel(posts, structure="diag")
    assert r.total >= 0.0


# ------------------------------------------------------------------------------------- fisher
class _MLP(nn.Module):
    """The same two-layer MLP, with its layers registered in either order (so named_parameters differ)."""

    def __init__(self, reverse: bool, hidden: int) -> None:
        super().__init__()
        if reverse:
            self.fc2 = nn.Linear(hidden, 2)
            self.fc1 = nn.Linear(3, hidden)
        else:
            self.fc1 = nn.Linear(3, hidden)
            self.fc2 = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@FAST
@given(seed=st.integers(0, 2**31 - 1), hidden=st.integers(1, 6), n=st.integers(1, 40),
       loss=st.sampled_from(["gaussian", "cross_entropy"]), beta=st.none() | st.floats(1e-3, 10.0),
       reverse_groups=st.booleans(), method=st.sampled_from(["jvp", "minibatch"]))
def test_fisher_nonnegative_and_invariant_to_parameter_and_group_order(seed, hidden, n, loss, beta,
                                                                       reverse_groups, method):
    g = torch.Generator().manual_seed(seed)
    a, b = _MLP(False, hidden).double(), _MLP(True, hidden).double()
    theta0 = {}
    with torch.no_grad():
        for name, p in a.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
            theta0[name] = p + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        b.load_state_dict(a.state_dict())
    assert list(dict(a.named_parameters())) != list(dict(b.named_parameters()))
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = (torch.randint(0, 2, (n,), generator=g) if loss == "cross_entropy"
         else torch.randn(n, 2, generator=g, dtype=torch.float64))
    groups = {"first": ["fc1.weight", "fc1.bias"], "second": ["fc2.weight", "fc2.bias"]}
    groups_rev = {"second": ["fc2.bias", "fc2.weight"], "first": ["fc1.bias", "fc1.weight"]}
    kw = {"beta": beta, "method": method, "batch_size": 5, "num_batches": 3}
    r = iiw.fisher(a, loss, (x, y), theta0, groups=groups, chunk_size=7, **kw)
    r2 = iiw.fisher(b, loss, (x, y), theta0, groups=groups_rev if reverse_groups else groups, **kw)
    r_default = iiw.fisher(b, loss, (x, y), theta0, **kw)
    assert r.total >= 0.0 and all(v >= 0.0 for v in r.per_group.values())
    assert r.settings["joint_raw"] >= 0.0 and r.raw_total >= 0.0
    assert close(r.total, r2.total)
    for grp in groups:
        assert close(r.per_group[grp], r2.per_group[grp])
    # default grouping (one group per layer) gives the same values under the layer names
    assert close(r_default.per_group["fc1"], r.per_group["first"])
    assert close(r_default.per_group["fc2"], r.per_group["second"])


# ------------------------------------------------------------------------------ classification
@st.composite
def probabilities(draw):
    """(M, B, K) float64 rows on the simplex, including exact zeros and one-hot rows."""
    m, b, k = draw(st.integers(1, 6)), draw(st.integers(1, 12)), draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    temp = draw(st.floats(0.05, 20.0))
    p = torch.softmax(torch.randn(m, b, k, generator=g, dtype=torch.float64) / temp, -1)
    kind = draw(st.sampled_from(["soft", "zeros", "onehot"]))
    if kind == "zeros":
        p = p * (torch.rand(m, b, k, generator=g, dtype=torch.float64) > 0.4)
        p[..., 0] += 1e-3  # keep every row non-empty
        p = p / p.sum(-1, keepdim=True)
    elif kind == "onehot":
        p = nn.functional.one_hot(torch.randint(0, k, (m, b), generator=g), k).double()
    y = torch.randint(0, k, (b,), generator=g)
    return p, y


@QUICK
@given(probabilities())
def test_entropy_split_identity_and_signs(case):
    p, _ = case
    total, aleatoric, epistemic = U.predictive_entropy(p), U.expected_entropy(p), U.mutual_information(p)
    k = p.shape[-1]
    assert bool((total >= 0).all()) and bool((aleatoric >= 0).all()) and bool((epistemic >= 0).all())
    assert bool((total <= math.log(k) + 1e-12).all())
    # the information about y in the draw index is at most the entropy of the index, log M
    assert bool((epistemic <= math.log(p.shape[0]) + 1e-12).all())
    torch.testing.assert_close(total, aleatoric + epistemic, rtol=0, atol=1e-12)
    u = U.classification_uncertainty(p)
    torch.testing.assert_close(u.predictive_entropy, u.expected_entropy + u.mutual_information, rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(u.mutual_information, epistemic, rtol=0, atol=0)


@QUICK
@given(probabilities(), st.integers(1, 30))
def test_ece_and_brier_ranges(case, num_bins):
    p, y = case
    ece, rel = U.expected_calibration_error(p, y, num_bins=num_bins)
    assert 0.0 <= ece <= 1.0
    assert int(rel.count.sum()) == y.shape[0]
    # ECE is the count-weighted mean of |acc - conf| over the non-empty bins
    ok = rel.count > 0
    w = rel.count[ok].double() / y.shape[0]
    assert close(ece, float((w * (rel.accuracy[ok] - rel.confidence[ok]).abs()).sum()))
    assert 0.0 <= U.brier_score(p, y) <= 2.0
    u = U.classification_uncertainty(p, y, num_bins=num_bins)
    assert 0.0 <= u.accuracy <= 1.0 and u.nll >= 0.0 and close(u.ece, ece)


@QUICK
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 30), b=st.integers(1, 5),
       spread=st.floats(1e-3, 10.0), noise=st.none() | st.floats(1e-2, 10.0), level=st.floats(0.05, 0.99))
def test_credible_interval_hits_its_quantiles(seed, m, b, spread, noise, level):
    f = spread * torch.randn(m, b, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lo, hi = U.credible_interval(f, level, noise)
    assert bool((lo <= hi).all())
    if noise is None:
        assert bool((lo >= f.amin(0)).all()) and bool((hi <= f.amax(0)).all())
        return
    # the mixture CDF at the ends is (1 -+ level)/2, to the documented tolerance
    comp = torch.distributions.Normal(f, noise)
    cdf = lambda x: comp.cdf(x.expand_as(f)).mean(0)  # noqa: E731
    torch.testing.assert_close(cdf(lo), torch.full_like(lo, 0.5 - level / 2), rtol=0, atol=1e-9)
    torch.testing.assert_close(cdf(hi), torch.full_like(hi, 0.5 + level / 2), rtol=0, atol=1e-9)
    r = U.regression_uncertainty(f, torch.zeros(b, dtype=torch.float64), noise_std=noise, level=level)
    assert 0.0 <= r.coverage <= 1.0 and 0.0 <= r.gaussian_coverage <= 1.0
    torch.testing.assert_close(r.variance, r.epistemic_variance + noise**2, rtol=1e-12, atol=0)


# -------------------------------------------------------------------------------------- bounds
risk = st.floats(0.0, 1.0)
kl_nats = st.floats(0.0, 1e4)
n_examples = st.integers(1, 10**7)
deltas = st.floats(1e-6, 0.5)


@QUICK
@given(risk, kl_nats, n_examples, deltas)
def test_kl_inverse_bound_between_empirical_and_one(emp, kl, n, delta):
    b = B.kl_inverse_bound(emp, kl, n, delta)
    assert emp <= b.value <= 1.0
    # never looser than McAllester (Pinsker), up to the bisection tolerance
    assert b.value <= B.mcallester_bound(emp, kl, n, delta).value + b.details["tol"]
    # the returned value is feasible from above: kl(emp || value) >= budget unless it is 1
    if b.value < 1.0:
        assert B.binary_kl(emp, b.value) >= b.details["kl_budget"] - 1e-9
    c = B.catoni_bound(emp, kl, n, delta)
    assert c.empirical <= c.value + 1e-12 and c.value <= 1.0


@QUICK
@given(st.floats(-5.0, 5.0), st.floats(0.01, 10.0), st.floats(0.0, 1.0), kl_nats, n_examples, deltas)
def test_kl_inverse_bound_on_any_loss_range(a, width, frac, kl, n, delta):
    lo, hi = a, a + width
    emp = lo + frac * width
    assume(lo <= emp <= hi)
    b = B.kl_inverse_bound(emp, kl, n, delta, loss_range=(lo, hi))
    assert b.empirical - 1e-12 <= b.value <= hi + 1e-12
    assert b.trivial == hi


@QUICK
@given(risk, st.floats(0.0, 50.0))
def test_kl_inverse_is_monotone_in_budget(q, c):
    p1, p2 = B.kl_inverse(q, c), B.kl_inverse(q, c * 2 + 1e-3)
    assert q <= p1 <= p2 <= 1.0


# ------------------------------------------------------------------------------ save/load
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@st.composite
def posteriors(draw):
    chains, ndraws = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    names = draw(st.lists(st.from_regex(r"[a-z]{1,4}(\.[a-z0-9]{1,3}){0,2}", fullmatch=True), min_size=1,
                          max_size=3, unique=True))
    draws = {}
    for n in names:
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        draws[n] = torch.randn(chains, ndraws, *shape, generator=g).to(dtype)
    if draw(st.booleans()):  # a diverged chain holds NaN draws
        first = names[0]
        draws[first][0] = math.nan if dtype.is_floating_point else 0
    stats = {"energy": torch.randn(chains, ndraws, generator=g, dtype=torch.float64),
             "diverging": torch.rand(chains, ndraws, generator=g) > 0.5}
    fixed = {"bn.running_mean": torch.randn(3, generator=g).to(dtype),
             "bn.num_batches_tracked": torch.tensor(7)} if draw(st.booleans()) else {}
    diverged = torch.rand(chains, generator=g) > 0.5
    step = torch.where(diverged, torch.randint(0, 100, (chains,), generator=g), -1)
    metadata = draw(st.dictionaries(st.text(max_size=6), json_values, max_size=5))
    metadata["task"] = draw(st.sampled_from(["classification", "regression"]))
    return Posterior(draws, stats, metadata, fixed, diverged, step)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True)


def assert_same_posterior(a: Posterior, b: Posterior) -> None:
    assert_same_tensors(a.draws, b.draws)
    assert_same_tensors(a.sample_stats, b.sample_stats)
    assert_same_tensors(a.fixed, b.fixed)
    assert torch.equal(a.diverged, b.diverged) and torch.equal(a.divergence_step, b.divergence_step)
    assert b.metadata == json.loads(json.dumps(a.metadata))


@FAST
@given(posteriors())
def test_posterior_save_load_round_trip(tmp_path_factory, post):
    path = tmp_path_factory.mktemp("rt") / "post.pib"
    post.save(path)
    back = Posterior.load(path)
    assert_same_posterior(post, back)
    assert back.metadata == post.metadata  # JSON-valued metadata come back exactly
    # saving what was loaded gives the same bytes (deterministic format)
    path2 = path.with_name("again.pib")
    back.save(path2)
    assert path2.read_bytes() == path.read_bytes()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary left


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    draws = {"fc.weight": torch.randn(2, 3, 4, 2, generator=g), "fc.bias": torch.randn(2, 3, 4, generator=g)}
    post = Posterior(draws, {"energy": torch.randn(2, 3, generator=g)}, {"task": "regression", "beta": 0.1})
    path = tmp_path_factory.mktemp("fuzz") / "post.pib"
    save_payload(path, "posterior", FORMAT_VERSION, _payload(post))  # the legacy (PIBBAYES) format's reader
    return post, path.read_bytes(), path.parent


def _header_span(raw: bytes) -> tuple[int, int]:
    return len(MAGIC), raw.index(b"\n", len(MAGIC))


def _load_bytes(folder, data: bytes, name: str = "x.pib"):
    path = folder / name
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy format loads with one
        return Posterior.load(path)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_flipped_bytes_are_detected_never_partial(saved, data):
    post, raw, folder = saved
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), min_size=1,
                               max_size=4))
    bad = bytearray(raw)
    for pos, mask in flips:
        bad[pos] ^= mask
    assume(bytes(bad) != raw)
    h0, h1 = _header_span(raw)
    outside_header = any(pos < h0 or pos >= h1 for pos, _ in flips if bad[pos] != raw[pos])
    try:
        back = _load_bytes(folder, bytes(bad))
    except FormatError as err:
        assert str(folder / "x.pib") in str(err)
        return
    # only a change confined to the JSON header that leaves it equivalent can load, and then to the
    # complete, unchanged posterior
    assert not outside_header
    assert_same_posterior(post, back)


@QUICK
@given(data=st.data())
def test_truncation_anywhere_is_detected(saved, data):
    _, raw, folder = saved
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(FormatError):
        _load_bytes(folder, raw[:cut])


def test_appended_bytes_are_detected(saved):
    _, raw, folder = saved
    with pytest.raises(FormatError, match="checksum"):
        _load_bytes(folder, raw + b"\0")


def test_header_whitespace_change_is_detected(saved):
    # regression: the header line must be canonical JSON, so an equivalent rewrite is corruption too
    _, raw, folder = saved
    h0, h1 = _header_span(raw)
    pos = raw.index(b" ", h0, h1)
    bad = raw[:pos] + b"\t" + raw[pos + 1:]
    with pytest.raises(FormatError):
        _load_bytes(folder, bad)


def _payload(post: Posterior) -> dict:
    return {"draws": dict(post.draws), "sample_stats": dict(post.sample_stats), "fixed": {},
            "diverged": post.diverged, "divergence_step": post.divergence_step,
            "metadata_json": json.dumps(post.metadata)}


@settings(max_examples=20, deadline=None)
@given(version=st.integers(-5, 50).filter(lambda v: v != FORMAT_VERSION))
def test_unsupported_format_version_is_a_clear_format_error(saved, version):
    post, _, folder = saved
    path = folder / f"v{version}.pib"
    save_payload(path, "posterior", version, _payload(post))
    with pytest.raises(FormatError, match=rf"format version {version} is not supported") as info, \
            pytest.warns(DeprecationWarning):
        Posterior.load(path)
    assert str(FORMAT_VERSION) in str(info.value)


@pytest.mark.parametrize("kind", ["checkpoint", "Posterior", "", "posterior "])
def test_foreign_kind_is_a_clear_format_error(saved, kind):
    post, _, folder = saved
    path = folder / "foreign.pib"
    save_payload(path, kind, FORMAT_VERSION, _payload(post))
    with pytest.raises(FormatError, match=r"expected a 'posterior'"):
        Posterior.load(path)


@pytest.mark.parametrize("missing", ["draws", "sample_stats", "fixed", "diverged", "divergence_step",
                                     "metadata_json"])
def test_incomplete_payload_is_a_format_error(saved, missing):
    post, _, folder = saved
    payload = _payload(post)
    del payload[missing]
    path = folder / "incomplete.pib"
    save_payload(path, "posterior", FORMAT_VERSION, payload)
    with pytest.raises(FormatError, match="incomplete posterior payload"):
        Posterior.load(path)


def test_non_pib_files_are_format_errors(saved):
    post, raw, folder = saved
    torch.save(_payload(post), folder / "plain.pt")
    with pytest.raises(FormatError, match="not a pib_bayes file"):
        Posterior.load(folder / "plain.pt")
    with pytest.raises(FormatError, match="not a pib_bayes file"):
        _load_bytes(folder, b"")
    h0, h1 = _header_span(raw)
    with pytest.raises(FormatError, match="corrupt header"):
        _load_bytes(folder, raw[:h0] + b"[1, 2" + raw[h1:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray warning on the good file
        assert_same_posterior(post, _load_bytes(folder, raw))


# ------------------------------------------------------------------- io: any payload, any kind
def _tensor(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _rng_state(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed).get_state()


payload_leaves = (st.integers(-2**62, 2**62) | st.floats(allow_nan=False) | st.text(max_size=6)
                  | st.booleans() | st.none()
                  | st.builds(_tensor, st.integers(0, 4), st.integers(0, 2**31 - 1))
                  | st.builds(_rng_state, st.integers(0, 2**31 - 1)))
payloads = st.dictionaries(
    st.text(min_size=1, max_size=6),
    st.recursive(payload_leaves,
                 lambda inner: (st.lists(inner, max_size=3)
                                | st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                 max_leaves=6),
    max_size=4)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@settings(max_examples=30, deadline=None)
@given(payload=payloads, kind=st.sampled_from(["checkpoint", "posterior", "x"]), version=st.integers(1, 3),
       data=st.data())
def test_payload_round_trip_and_corruption(tmp_path_factory, payload, kind, version, data):
    from pib_bayes.io import load_payload

    path = tmp_path_factory.mktemp("io") / "f.bin"
    save_payload(path, kind, version, payload)
    assert _same(payload, load_payload(path, kind, (version,)))
    raw = path.read_bytes()
    h0, h1 = _header_span(raw)
    pos = data.draw(st.integers(h1 + 1, len(raw) - 1)) if len(raw) > h1 + 1 else h1
    bad = bytearray(raw)
    bad[pos] ^= data.draw(st.integers(1, 255))
    path.write_bytes(bytes(bad))
    with pytest.raises(FormatError):
        load_payload(path, kind, (version,))
    path.write_bytes(raw)
    with pytest.raises(FormatError, match="expected a 'other'"):
        load_payload(path, "other", (version,))
    with pytest.raises(FormatError, match="not supported"):
        load_payload(path, kind, (version + 1,))


def test_sampled_posterior_round_trip_predicts_the_same(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[1].eval()
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    from pib_bayes import sample

    post = sample(model, "cross_entropy", (x, y), beta=1 / 32, step_size=1e-3, num_chains=2, num_warmup=2,
                  num_draws=3, seed=0)
    post.save(tmp_path / "p.pib")
    back = Posterior.load(tmp_path / "p.pib", model=model)
    assert_same_posterior(post, back)
    assert set(back.fixed) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    torch.testing.assert_close(back.predict(x).per_draw, post.predict(x).per_draw, rtol=0, atol=0)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    from pib_bayes import sample

    folder = tmp_path_factory.mktemp("ckpt")
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(20, 2, generator=g), torch.randn(20, 1, generator=g)

    def run(**kw):
        torch.manual_seed(0)
        return sample(nn.Linear(2, 1), "gaussian", (x, y), beta=0.1, step_size=1e-3, num_chains=2,
                      num_warmup=3, num_draws=4, checkpoint=folder / "c.ckpt", checkpoint_every=2, seed=1,
                      **kw)

    reference = run()
    return run, reference, (folder / "c.ckpt").read_bytes(), folder / "c.ckpt"


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_corrupt_checkpoint_resume_is_detected_never_partial(checkpointed, data):
    run, reference, raw, path = checkpointed
    if data.draw(st.booleans()):
        bad = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:
        b = bytearray(raw)
        b[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        bad = bytes(b)
    path.write_bytes(bad)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resumed = run(resume=True)
    except FormatError:
        assert path.read_bytes() == bad  # the evidence is left as it was, not overwritten
        return
    assert_same_tensors(reference.draws, resumed.draws)
    assert_same_tensors(reference.sample_stats, resumed.sample_stats)


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(saved, tmp_path, monkeypatch):
    post, raw, _ = saved
    path = tmp_path / "p.pib"
    path.write_bytes(raw)

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr("pib_bayes.io.os.fsync", boom)
    other = Posterior({"w": torch.zeros(1, 1, 2)}, {}, {"task": "regression"})
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    assert path.read_bytes() == raw
    assert [p.name for p in tmp_path.iterdir()] == ["p.pib"]
    assert_same_posterior(post, Posterior.load(path))
