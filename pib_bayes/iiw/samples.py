"""IIW from posterior draws (SPEC §3b, §3c): the KL upper bound and the between/within channel estimator.

Both fit a Gaussian to the draws with a chosen covariance structure:

- ``"diag"``: per-coordinate variances (any size of net);
- ``"full"``: the sample covariance (small D), Ledoit-Wolf shrunk when there are no more draws than
  dimensions (or always, with ``shrinkage="ledoit-wolf"``);
- ``"lowrank"``: rank-k principal directions plus a diagonal, ``Σ = U Uᵀ + diag(ψ)`` with ``diag(Σ)``
  equal to the sample variances;
- ``"block"``: a full (shrunk where needed) covariance per group, independent across groups.

Ledoit-Wolf is written here from its closed form (Ledoit & Wolf 2004, "A well-conditioned estimator
for large-dimensional covariance matrices", J. Multivariate Anal. 88, the same formula as
scikit-learn's ``ledoit_wolf_shrinkage``) to avoid a scikit-learn dependency.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal, Normal

from .._validate import check_bool, check_memory, check_posterior, is_int, is_real
from ..posterior import Posterior
from ..prior import FlatPrior, GaussianPrior, Prior, check_prior_fits
from ._groups import resolve_groups
from .result import IIWResult

__all__ = ["kl", "channel", "ledoit_wolf", "STRUCTURES"]

STRUCTURES = ("diag", "full", "lowrank", "block")

_BLOCK_BYTES = 256 * 2**20  # largest float64 block of whole chains gathered for the per-coordinate ESS


# --------------------------------------------------------------------------- covariance fits
def ledoit_wolf(x: Tensor) -> tuple[Tensor, float]:
    """Ledoit-Wolf shrunk covariance of centred data ``x`` (M, d): ``(1-a) S + a (tr S / d) I``.

    ``S = xᵀx / M``; the intensity ``a`` in [0, 1] is the closed-form estimate of Ledoit & Wolf
    (2004) of the MSE-optimal shrinkage toward the scaled identity. Returns ``(Σ, a)``.

    >>> x = torch.randn(5, 20, dtype=torch.float64)  # fewer draws than dimensions
    >>> cov, a = ledoit_wolf(x - x.mean(0))
    >>> bool(torch.linalg.eigvalsh(cov).min() > 0), 0.0 <= a <= 1.0
    (True, True)
    """
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor (M, d) of centred draws, got "
                        f"{type(x).__name__} {tuple(x.shape) if isinstance(x, Tensor) else ''}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"x: needs at least 2 rows (draws) and 1 column, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x: contains NaN or Inf values")
    m, d = x.shape
    s = x.T @ x / m
    mu = torch.trace(s) / d
    x2 = x.square()
    beta_ = ((x2.T @ x2).sum() / m - s.square().sum()) / (d * m)
    delta = (s.square().sum() - 2 * mu * torch.trace(s) + d * mu**2) / d
    beta_ = torch.minimum(beta_, delta)
    a = 0.0 if float(delta) == 0.0 else float(beta_ / delta)
    a = min(max(a, 0.0), 1.0)
    return (1 - a) * s + a * mu * torch.eye(d, dtype=x.dtype), a


def _check_shrinkage(shrinkage: object) -> None:
    if shrinkage in (None, "auto", "ledoit-wolf"):
        return
    if not is_real(shrinkage) or not 0 <= shrinkage <= 1:
        raise ValueError(f"shrinkage: expected 'auto', 'ledoit-wolf', None or a float in [0, 1], got "
                         f"{shrinkage!r}")


def _check_rank(rank: object) -> None:
    if rank is None:
        return
    if not is_int(rank) or rank < 1:
        raise ValueError(f"rank: the low-rank structure needs an int >= 1 (or None for min(20, draws - 2)), "
                         f"got {rank!r}")


def _check_num_mc(num_mc: object) -> None:
    if not is_int(num_mc) or num_mc < 2:
        raise ValueError(f"num_mc: the Monte-Carlo cross-entropy needs an int >= 2 draws of q (e.g. the "
                         f"default 4096), got {num_mc!r}")


def _full_cov(xc: Tensor, dof: int, shrinkage: object) -> tuple[Tensor, float | None]:
    """Covariance of centred rows ``xc`` (dof = rows minus fitted means); shrunk as asked."""
    d = xc.shape[1]
    use_lw = shrinkage == "ledoit-wolf" or (shrinkage == "auto" and dof <= d)
    if use_lw:
        cov, a = ledoit_wolf(xc)
        return cov * (xc.shape[0] / dof), a  # LW uses 1/M; rescale to the unbiased normalisation
    s = xc.T @ xc / dof
    if isinstance(shrinkage, (int, float)) and not isinstance(shrinkage, bool):
        a = float(shrinkage)
        return (1 - a) * s + a * torch.trace(s) / d * torch.eye(d, dtype=s.dtype), a
    return s, None


class _Gauss:
    """A fitted covariance of one structure, restricted to index sets on demand."""

    def __init__(self, xc: Tensor | None, dof: int, structure: str, groups: dict[str, Tensor],
                 shrinkage: object, rank: int | None, var: Tensor | None = None) -> None:
        """``xc``: the centred rows (M, d); for ``"diag"`` the per-coordinate ``var`` alone suffices
        (streamed moments, xc=None)."""
        self.structure, self.groups = structure, groups
        if var is None:
            assert xc is not None
            var = xc.square().sum(0) / dof
        self.var = var
        if bool((self.var <= 0).any()):
            raise ValueError("draws: some coordinates never move (zero variance), so the Gaussian fit is "
                             "singular; leave frozen parameters out (keep=) or use more chains")
        self.shrinkage: dict[str, float | None] = {}
        self.floored = 0
        if structure != "diag":
            assert xc is not None
        if structure == "full":
            self.cov, self.shrinkage["all"] = _full_cov(xc, dof, shrinkage)
        elif structure == "block":
            self.blocks = {}
            for g, idx in groups.items():
                self.blocks[g], self.shrinkage[g] = _full_cov(xc[:, idx], dof, shrinkage)
        elif structure == "lowrank":
            m = xc.shape[0]
            k = min(int(rank) if rank is not None else 20, max(m - 2, 0), xc.shape[1])
            if k < 1:
                raise ValueError("rank: the low-rank structure needs at least 3 draws")
            _, s, vh = torch.linalg.svd(xc, full_matrices=False)
            self.factor = vh[:k].T * (s[:k] / math.sqrt(dof))
            psi = self.var - self.factor.square().sum(1)
            floor = 1e-6 * self.var.clamp_min(torch.finfo(xc.dtype).tiny)
            self.floored = int((psi < floor).sum())
            self.psi = torch.maximum(psi, floor)
            self.rank = k

    def logdet(self, idx: Tensor | None, group: str | None = None) -> Tensor:
        if self.structure == "diag":
            v = self.var if idx is None else self.var[idx]
            return v.log().sum()
        if self.structure == "block":
            if group is not None:
                return torch.linalg.slogdet(self.blocks[group])[1]
            return sum(torch.linalg.slogdet(b)[1] for b in self.blocks.values())
        if self.structure == "full":
            c = self.cov if idx is None else self.cov[idx][:, idx]
            sign, ld = torch.linalg.slogdet(c)
            if float(sign) <= 0:
                raise ValueError("structure: the full sample covariance is singular; use "
                                 "shrinkage='ledoit-wolf', "
                                 "structure='lowrank' or more draws")
            return ld
        u, psi = (self.factor, self.psi) if idx is None else (self.factor[idx], self.psi[idx])
        dist = LowRankMultivariateNormal(torch.zeros_like(psi), u, psi)
        d = psi.shape[0]
        return 2 * dist.entropy() - d * (1 + math.log(2 * math.pi))

    def diag(self, idx: Tensor | None) -> Tensor:
        if self.structure == "lowrank":
            v = self.psi + self.factor.square().sum(1)
        elif self.structure == "full":
            v = torch.diagonal(self.cov)
        elif self.structure == "block":
            v = self.var.clone()
            for g, i in self.groups.items():
                v[i] = torch.diagonal(self.blocks[g])
        else:
            v = self.var
        return v if idx is None else v[idx]

    def sampler(self, mean: Tensor, idx: Tensor | None, group: str | None):
        """A torch distribution of the fitted Gaussian (restricted to ``idx``) for Monte-Carlo integrals."""
        m = mean if idx is None else mean[idx]
        if self.structure == "diag":
            return Normal(m, self.diag(idx).sqrt())
        if self.structure == "full":
            return MultivariateNormal(m, covariance_matrix=self.cov if idx is None else self.cov[idx][:, idx])
        if self.structure == "lowrank":
            u, psi = (self.factor, self.psi) if idx is None else (self.factor[idx], self.psi[idx])
            return LowRankMultivariateNormal(m, u, psi)
        if group is not None:
            return MultivariateNormal(m, covariance_matrix=self.blocks[group])
        return _BlockSampler({g: MultivariateNormal(mean[i], covariance_matrix=self.blocks[g])
                              for g, i in self.groups.items()}, self.groups, mean.shape[0])


class _BlockSampler:
    def __init__(self, dists: dict, groups: dict[str, Tensor], d: int) -> None:
        self.dists, self.groups, self.d = dists, groups, d

    def sample(self, shape: torch.Size) -> Tensor:
        out = torch.empty(*shape, self.d, dtype=next(iter(self.dists.values())).loc.dtype)
        for g, dist in self.dists.items():
            out[..., self.groups[g]] = dist.sample(shape)
        return out


# --------------------------------------------------------------------------- draws
def _check_structure(structure: str) -> None:
    if structure not in STRUCTURES:
        raise ValueError(f"structure: expected one of {STRUCTURES}, got {structure!r}")


def _layout(post: Posterior, groups: Mapping[str, Sequence[str]] | None):
    """Names measured, flat index per group, and per-name slices of the flat vector."""
    grouped = resolve_groups(post.param_names, groups)
    names = [n for n in post.param_names if any(n in g for g in grouped.values())]
    slices, start = {}, 0
    shapes = post.param_shapes
    for n in names:
        size = math.prod(shapes[n])
        slices[n] = slice(start, start + size)
        start += size
    index = {g: torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in members])
             for g, members in grouped.items()}
    return names, index, slices


def _good_chains(post: Posterior, what: str, stacklevel: int = 4) -> list[int]:
    """The non-diverged chains (a warning names the others), with at least 2 draws in total."""
    check_posterior(what, post)
    chains = post.good_chains
    if len(chains) < post.num_chains:
        warnings.warn(f"{what}: chains {sorted(set(range(post.num_chains)) - set(chains))} diverged and are "
                      "left out", stacklevel=stacklevel)
    if not chains:
        raise ValueError(f"{what}: every chain diverged (or holds NaN/Inf draws); nothing to estimate from")
    if len(chains) * post.num_draws < 2:
        raise ValueError(f"{what}: needs at least 2 draws in total, got {len(chains) * post.num_draws}; "
                         "sample more draws (num_draws) or chains")
    return chains


def _chunks_of(post: Posterior, names: list[str], chains: list[int], what: str,
               columns: Tensor | None = None):
    """(draw slice, (C, d, k) float64) chunks of the flattened draws of ``names`` (the flat ``columns``
    only, when given), read through :meth:`~pib_bayes.Posterior.iter_draws`, checked finite."""
    c = len(chains)
    sizes = [math.prod(post.param_shapes[n]) for n in names]
    for _, sl, block in post.iter_draws(names, chains=chains):
        x = torch.empty(c, sl.stop - sl.start, sum(sizes), dtype=torch.float64)  # no float32 concatenation
        start = 0
        for n, size in zip(names, sizes, strict=True):
            x[:, :, start:start + size] = block[n].reshape(c, sl.stop - sl.start, -1)
            start += size
        del block
        x = x if columns is None else x[:, :, columns]
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{what}: draws contain NaN/Inf; drop those chains or resample")
        yield sl, x


def _chains_of(post: Posterior, names: list[str], what: str, columns: Tensor | None = None,
               chains: list[int] | None = None) -> Tensor:
    """(C, N, d) float64 draws of the non-diverged chains (the flat ``columns`` only, when given),
    validated; filled a chunk at a time (the structures that need every draw at once)."""
    chains = _good_chains(post, what) if chains is None else chains
    shapes = post.param_shapes
    d = sum(math.prod(shapes[n]) for n in names) if columns is None else len(columns)
    check_memory(what, 8.0 * len(chains) * post.num_draws * d,
                 f"the {len(chains)} x {post.num_draws} draws of {d} coordinates in float64",
                 "use structure='diag' (streamed moments), fewer groups or fewer draws")
    x = torch.empty(len(chains), post.num_draws, d, dtype=torch.float64)
    for sl, chunk in _chunks_of(post, names, chains, what, columns):
        x[:, sl] = chunk
    return x


def _moments(post: Posterior, names: list[str], what: str) -> tuple[list[int], Tensor, Tensor]:
    """Per chain: the mean (C, d) and the sum of squared deviations M2 (C, d) of the flattened draws of
    the non-diverged chains, in one streamed pass (Chan, Golub & LeVeque 1979 pairwise update,
    chunk by chunk: mean += delta n_b / n, M2 += M2_b + delta^2 n_a n_b / n, delta = mean_b - mean_a).
    Returns ``(chains, mean, m2)``."""
    chains = _good_chains(post, what)
    mean = m2 = None
    count = 0
    for sl, x in _chunks_of(post, names, chains, what):
        nb = sl.stop - sl.start
        mb = x.mean(1)
        m2b = (x - mb[:, None]).square_().sum(1)
        if mean is None or m2 is None:
            mean, m2 = mb, m2b
        else:
            delta = mb - mean
            total = count + nb
            mean = mean + delta * (nb / total)
            m2 = m2 + m2b + delta.square() * (count * nb / total)
        count += nb
    assert mean is not None and m2 is not None
    return chains, mean, m2


def _pool(mean: Tensor, m2: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Mean and M2 over all rows from C equal-sized per-chain ``(mean, m2)`` of n rows each."""
    grand = mean.mean(0)
    return grand, m2.sum(0) + n * (mean - grand).square().sum(0)


def _prior_vectors(prior: GaussianPrior, post: Posterior, names: list[str]) -> tuple[Tensor, Tensor]:
    mus, sds = [], []
    for n in names:
        shape = post.param_shapes[n]
        m = prior.mean.get(n)
        if m is not None and tuple(m.shape) != tuple(shape):
            raise ValueError(f"prior: the mean of {n!r} has shape {tuple(m.shape)} but the draws have "
                             f"{tuple(shape)}; build the prior from the sampled module "
                             f"(GaussianPrior.from_module)")
        s = torch.as_tensor(prior.std_of(n), dtype=torch.float64)
        if s.dim() and tuple(s.shape) != tuple(shape):
            raise ValueError(f"prior: the std of {n!r} has shape {tuple(s.shape)} but the draws have "
                             f"{tuple(shape)}")
        centre = torch.zeros(shape, dtype=torch.float64) if m is None else m.to(torch.float64)
        if not bool(torch.isfinite(centre).all()):
            raise ValueError(f"prior: the mean of {n!r} contains NaN/Inf; pass a finite prior mean (e.g. the "
                             "initial weights, or GaussianPrior.from_module on a finite module)")
        if not bool((torch.isfinite(s) & (s > 0)).all()):
            raise ValueError(f"prior: the std of {n!r} must be finite and > 0")
        mus.append(centre.reshape(-1))
        sds.append(s.expand(shape).reshape(-1))
    return torch.cat(mus), torch.cat(sds)


# --------------------------------------------------------------------------- KL
def kl(
    posterior: Posterior,
    prior: Prior,
    *,
    structure: str = "diag",
    groups: Mapping[str, Sequence[str]] | None = None,
    shrinkage: str | float | None = "auto",
    rank: int | None = None,
    num_mc: int = 4096,
    seed: int = 0,
) -> IIWResult:
    """KL(N(μ̂, Σ̂) ‖ p): the Gaussian fitted to the posterior draws against the prior (SPEC §3b).

    ``μ̂``/``Σ̂`` are the mean and covariance (of the chosen ``structure``) of all draws of the
    non-diverged chains. For a Gaussian prior ``N(θ₀, diag(σ₀²))`` the KL is closed form,

        KL = ½ [ Σ_j Σ̂_jj/σ₀ⱼ² + Σ_j (μ̂_j − θ₀ⱼ)²/σ₀ⱼ² − d + Σ_j log σ₀ⱼ² − log det Σ̂ ];

    for any other prior with ``log_prob`` it is ``−H(q) − E_q[log p(w)]`` with the cross-entropy
    from ``num_mc`` draws of q (its Monte-Carlo s.e. is in ``settings["mc_se"]``). Since
    I(w;S) = E_S KL(q(w|S) ‖ q(w)) ≤ E_S KL(q(w|S) ‖ p) for any fixed p (Xu & Raginsky 2017;
    Wang et al. 2022, PIB), the result is an upper bound on IIW in expectation over S.

    ``per_group`` holds each group's marginal KL. With ``"diag"``/``"block"`` the total is their
    sum; with ``"full"``/``"lowrank"`` the total is the joint KL, which for a prior independent
    across groups exceeds the sum by the total correlation of q.

    Args:
        posterior: draws from :func:`pib_bayes.sample` (diverged chains are left out).
        prior: the prior p (e.g. the one used for sampling); a :class:`~pib_bayes.GaussianPrior`
            gives the closed form.
        structure: ``"diag"``, ``"full"``, ``"lowrank"`` or ``"block"`` (module docstring).
        groups: ``{group: [parameter names]}``; default one group per layer. Parameters left out
            are not measured.
        shrinkage: ``"auto"`` (Ledoit-Wolf when draws <= dimensions), ``"ledoit-wolf"``, None or
            a fixed intensity in [0, 1]; for ``"full"``/``"block"``.
        rank: rank k of ``"lowrank"``, an int >= 1 (default min(20, draws − 2); capped there).
        num_mc, seed: Monte-Carlo cross-entropy for non-Gaussian priors (``num_mc`` >= 2 draws of q).

    Returns:
        :class:`IIWResult` in nats, ``method="kl"``.

    Memory: the draws are read chunk by chunk (:meth:`~pib_bayes.Posterior.iter_draws`), so a
    lazily read posterior larger than RAM works; ``"diag"`` streams the per-coordinate moments in
    one pass (memory O(chains x D)), the other structures fill the (draws, D) float64 matrix they
    need a chunk at a time.

    >>> import torch
    >>> from pib_bayes import Posterior, GaussianPrior
    >>> g = torch.Generator().manual_seed(0)
    >>> post = Posterior({"w": 0.5 * torch.randn(4, 2000, 3, generator=g, dtype=torch.float64)}, {}, {})
    >>> round(kl(post, GaussianPrior(std=1.0)).total, 1)  # exact: 3/2 (1/4 - 1 + log 4) = 0.95
    0.9
    """
    check_posterior("posterior", posterior)
    _check_structure(structure)
    _check_shrinkage(shrinkage)
    _check_rank(rank)
    _check_num_mc(num_mc)
    if isinstance(prior, FlatPrior):
        raise ValueError("prior: the KL to an improper flat prior is infinite; pass a proper prior")
    if not isinstance(prior, Prior):
        raise TypeError(f"prior: expected a pib_bayes Prior (e.g. GaussianPrior), got {type(prior).__name__}")
    check_prior_fits(prior, posterior.param_shapes)
    names, index, slices = _layout(posterior, groups)
    if structure == "diag":  # one streamed pass: per-coordinate mean and variance, memory O(d)
        used, chain_mean, chain_m2 = _moments(posterior, names, "posterior")
        m = len(used) * posterior.num_draws
        mean, m2 = _pool(chain_mean, chain_m2, posterior.num_draws)
        d = mean.shape[0]
        fit = _Gauss(None, m - 1, structure, index, shrinkage, rank, var=m2 / (m - 1))
    else:  # the covariance structures need the (M, d) draws at once (filled chunk by chunk)
        x = _chains_of(posterior, names, "posterior")
        x = x.reshape(-1, x.shape[2])
        m, d = x.shape
        mean = x.mean(0)
        fit = _Gauss(x - mean, m - 1, structure, index, shrinkage, rank)

    def gaussian_kl(idx: Tensor | None, group: str | None, mu0: Tensor, sd0: Tensor) -> float:
        mu_i = mean if idx is None else mean[idx]
        var0 = sd0.square() if idx is None else sd0[idx].square()
        m0 = mu0 if idx is None else mu0[idx]
        k = var0.shape[0]
        val = 0.5 * ((fit.diag(idx) / var0).sum() + ((mu_i - m0).square() / var0).sum() - k
                     + var0.log().sum() - fit.logdet(idx, group))
        return float(val)

    settings: dict[str, Any] = {"structure": structure, "num_draws": m, "dimension": d,
                                "chains_used": posterior.good_chains, "estimate": "upper bound on I(w;S)"}
    gen = torch.Generator().manual_seed(seed)
    mc_se: dict[str, float] = {}

    def mc_kl(idx: Tensor | None, group: str | None, members: list[str]) -> float:
        dist = fit.sampler(mean, idx, group)
        # torch distributions draw from the global RNG: seed it inside a fork so the caller's state is kept
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
            w = dist.sample(torch.Size([num_mc]))
        params, start = {}, 0
        for n in members:
            size = slices[n].stop - slices[n].start
            params[n] = w[:, start:start + size].reshape(num_mc, *posterior.param_shapes[n]).to(
                posterior._dtype(n))
            start += size
        lp = prior.log_prob(params, batch_ndim=1).to(torch.float64)
        k = w.shape[1]
        entropy = 0.5 * fit.logdet(idx, group) + 0.5 * k * (1 + math.log(2 * math.pi))
        mc_se[group or "total"] = float(lp.std() / math.sqrt(num_mc))
        return float(-entropy - lp.mean())

    per_group: dict[str, float] = {}
    if isinstance(prior, GaussianPrior):
        mu0, sd0 = _prior_vectors(prior, posterior, names)
        for g, idx in index.items():
            per_group[g] = gaussian_kl(idx, g, mu0, sd0)
        joint = structure in ("full", "lowrank")
        total = gaussian_kl(None, None, mu0, sd0) if joint else sum(per_group.values())
        settings["cross_entropy"] = "closed form (Gaussian prior)"
    else:
        grouped = resolve_groups(posterior.param_names, groups)
        for g, idx in index.items():
            per_group[g] = mc_kl(idx, g, grouped[g])
        total = mc_kl(None, None, names) if structure in ("full", "lowrank") else sum(per_group.values())
        settings.update(cross_entropy=f"Monte Carlo ({num_mc} draws of q)", mc_se=mc_se)
    settings["total_rule"] = "joint" if structure in ("full", "lowrank") else "sum of groups"
    _describe_fit(settings, fit, shrinkage)
    return IIWResult(per_group, float(total), "kl", "nats", settings)


def _describe_fit(settings: dict, fit: _Gauss, shrinkage: object) -> None:
    if fit.structure in ("full", "block"):
        method = ("ledoit-wolf" if shrinkage in ("auto", "ledoit-wolf") else "fixed" if shrinkage is not None
                  else "none")
        settings["shrinkage"] = {"rule": shrinkage, "method": method, "intensity": fit.shrinkage}
    if fit.structure == "lowrank":
        settings.update(rank=fit.rank, floored_diagonal=fit.floored)


# --------------------------------------------------------------------------- channel
def _ess_per_coordinate(chains: list[Tensor]) -> list[Tensor]:
    """ArviZ ESS for the mean (``method="mean"``) of every coordinate of every resample (resamples of "
                                             "equal layout in one call)."""
    import arviz as az

    out: list[Tensor | None] = [None] * len(chains)
    by_shape: dict[tuple, list[int]] = {}
    for b, c in enumerate(chains):
        by_shape.setdefault(tuple(c.shape), []).append(b)
    for shape, members in by_shape.items():
        if shape[1] < 4:
            raise ValueError(f"posteriors: the Monte-Carlo correction needs >= 4 draws per chain, got "
                             f"{shape[1]}; "
                             "sample more draws or pass mc_correction=False")
        stacked = torch.cat([chains[b] for b in members], dim=2).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ess = az.ess(az.convert_to_dataset({"w": stacked}), method="mean")["w"].values
        ess = torch.as_tensor(np.asarray(ess, dtype=np.float64)).reshape(len(members), shape[2])
        for j, b in enumerate(members):
            out[b] = ess[j]
    return out  # type: ignore[return-value]


def channel(
    posteriors: Sequence[Posterior],
    *,
    structure: str = "diag",
    groups: Mapping[str, Sequence[str]] | None = None,
    shrinkage: str | float | None = "auto",
    rank: int | None = None,
    mc_correction: bool = True,
) -> IIWResult:
    """Between/within channel estimate of I(w;S) from posteriors on B resamples of the data (SPEC §3c).

    With ``W`` the pooled within-chain covariance of all resamples (≈ Σ_S), ``m_b`` the posterior
    mean of resample b, ``B_raw`` the sample covariance of the ``m_b`` and the Monte-Carlo
    correction ``C = D^½ W D^½``, ``D = diag(mean_b 1/ESS_bj)`` (ArviZ ESS for the mean of coordinate j
    on resample b; the part of ``B_raw`` due to the sampling error of the means),

        IIW ≈ ½ log det(I + W⁻¹ B_c),   B_c = B_raw − C.

    This is the mutual information of the Gaussian channel S -> w with posterior covariance W and
    between-resample covariance B_c (oracle prior q(w) = E_S q(w|S)); exact for Bayesian linear
    regression. With bootstrap resamples B_c estimates the sampling variability of μ_S, with
    fresh data sets (known generator) it is the real one.

    Structures: ``"diag"`` uses diagonal W and B_c (½ Σ_j log(1 + B_c,jj / W_jj)); ``"full"`` the
    full matrices (W shrunk by Ledoit-Wolf when draws <= d); ``"block"`` full within groups and
    independent across; ``"lowrank"`` W = UUᵀ + diag(ψ) and B_c on the span of the B − 1 centred
    means (directions the resamples never moved contribute 0, the scalar correction is mean_j D_jj).
    ``per_group`` holds each group's marginal value, the total is their sum for ``"diag"``/``"block"``
    and the joint value otherwise.

    Clamping: after the correction B_c need not be positive semi-definite (where the between-resample
    spread is below the Monte-Carlo noise, e.g. with no signal at all), and a negative eigenvalue of
    W⁻¹B_c in (−1, 0) would make ½ log(1 + e) negative. B_c is therefore projected onto the PSD cone
    in the metric of W, ``B_c⁺ = W^½ [W^-½ B_c W^-½]₊ W^½`` (negative eigenvalues of W⁻¹B_c set to 0;
    for ``"diag"`` simply ``max(B_c,jj, 0)``), so every group's value and the total are >= 0. The
    number of eigenvalues set to 0 is in ``settings["clamped_eigenvalues"]``; many of them mean the
    resamples carry little information beyond the sampling noise (use more resamples or draws).

    Args:
        posteriors: one :class:`~pib_bayes.Posterior` per resample (at least 2; the same
            parameters in each). Resamples should be many more than the dimension for
            ``"full"``: the error of B_c falls like 1/sqrt(B).
        structure, groups, shrinkage, rank: as in :func:`kl`.
        mc_correction: subtract the Monte-Carlo error of the posterior means (recommended).

    Returns:
        :class:`IIWResult` in nats, ``method="channel"``.

    Memory: as :func:`kl`; with ``"diag"`` the per-coordinate ESS of the correction is computed
    in blocks of coordinates (one pass over a resample's draws per block).
    """
    _check_structure(structure)
    _check_shrinkage(shrinkage)
    _check_rank(rank)
    check_bool("mc_correction", mc_correction)
    if isinstance(posteriors, Posterior) or not isinstance(posteriors, Sequence):
        raise TypeError("posteriors: expected a list of Posterior objects, one per resample of the data")
    if len(posteriors) < 2:
        raise ValueError(f"posteriors: the channel estimator needs posteriors on >= 2 resamples of the data, "
                         f"got {len(posteriors)}; sample on bootstrap resamples or fresh data sets (tens to "
                         "hundreds)")
    first = posteriors[0]
    check_posterior("posteriors", first)
    for b, p in enumerate(posteriors):
        check_posterior(f"posteriors[{b}]", p)
        if p.param_shapes != first.param_shapes:
            raise ValueError(f"posteriors[{b}]: holds different parameters/shapes than posteriors[0]; every "
                             "resample must sample the same model")
    names, index, _ = _layout(first, groups)
    whats = [f"posteriors[{b}]" for b in range(len(posteriors))]
    if structure == "diag":  # streamed per-chain moments: memory O(B C d), not the draws
        moments = [_moments(p, names, w) for p, w in zip(posteriors, whats, strict=True)]
        used = [ch for ch, _, _ in moments]
        sizes = [(len(ch), p.num_draws) for ch, p in zip(used, posteriors, strict=True)]
        dof = sum(c * (n - 1) for c, n in sizes)
        if dof < 1:
            raise ValueError("posteriors: need at least 2 draws per chain to estimate the within-chain "
                             "covariance")
        # pooled within-chain deviations (each chain centred on its own mean): the sum of the M2s
        within_var = torch.stack([m2.sum(0) for _, _, m2 in moments]).sum(0) / dof
        means = torch.stack([mean.mean(0) for _, mean, _ in moments])
        d = means.shape[1]
        fit = _Gauss(None, dof, structure, index, shrinkage, rank, var=within_var)
    else:  # the covariance structures need every draw at once (filled chunk by chunk)
        used = [_good_chains(p, w, 3) for p, w in zip(posteriors, whats, strict=True)]
        chains = [_chains_of(p, names, w, chains=ch)
                  for p, w, ch in zip(posteriors, whats, used, strict=True)]
        d = chains[0].shape[2]
        sizes = [(c.shape[0], c.shape[1]) for c in chains]
        # pooled within-chain deviations (each chain centred on its own mean)
        within = torch.cat([(c - c.mean(1, keepdim=True)).reshape(-1, d) for c in chains])
        dof = sum(c.shape[0] * (c.shape[1] - 1) for c in chains)
        if dof < 1:
            raise ValueError("posteriors: need at least 2 draws per chain to estimate the within-chain "
                             "covariance")
        means = torch.stack([c.reshape(-1, d).mean(0) for c in chains])
        fit = _Gauss(within, dof, structure, index, shrinkage, rank)
    nres = means.shape[0]
    z = (means - means.mean(0)) / math.sqrt(nres - 1)      # B_raw = zᵀ z
    if mc_correction:
        if structure == "diag":  # ESS needs whole chains: coordinate blocks, one pass over the draws each
            ess = torch.empty(nres, d, dtype=torch.float64)
            per = max(1, _BLOCK_BYTES // (8 * sum(c * n for c, n in sizes)))
            for c0 in range(0, d, per):
                cols = torch.arange(c0, min(d, c0 + per))
                xs = [_chains_of(p, names, w, cols, ch)
                      for p, w, ch in zip(posteriors, whats, used, strict=True)]
                ess[:, cols] = torch.stack(_ess_per_coordinate(xs))
        else:
            ess = torch.stack(_ess_per_coordinate(chains))      # (B, d)
        inv_ess = (1.0 / ess).mean(0)
    else:
        ess, inv_ess = None, torch.zeros(d, dtype=torch.float64)
    clamped = {"count": 0}

    def half_logdet(eig: Tensor) -> float:
        # eig: eigenvalues of W⁻¹B_c. B_c is replaced by its PSD part in the metric of W (negative
        # eigenvalues set to 0: no more between-resample spread than Monte-Carlo noise), so IIW >= 0.
        clamped["count"] += int((eig < -1e-12).sum())
        return float(0.5 * torch.log1p(eig.clamp_min(0.0)).sum())

    def gen_eig(w: Tensor, bmat: Tensor) -> Tensor:
        lw = torch.linalg.cholesky(w)
        a = torch.linalg.solve_triangular(lw, bmat, upper=False)
        a = torch.linalg.solve_triangular(lw, a.T, upper=False)
        return torch.linalg.eigvalsh(0.5 * (a + a.T))

    def value(idx: Tensor | None, group: str | None) -> float:
        zi = z if idx is None else z[:, idx]
        ai = inv_ess if idx is None else inv_ess[idx]
        if fit.structure == "diag":
            w = fit.var if idx is None else fit.var[idx]
            bc = zi.square().sum(0) - ai * w
            return half_logdet(bc / w)
        if fit.structure == "lowrank":
            u, psi = (fit.factor, fit.psi) if idx is None else (fit.factor[idx], fit.psi[idx])
            # eigenvalues of W^{-1} zᵀz = those of z W^{-1} zᵀ (B x B); W^{-1} by Woodbury
            zp = zi / psi
            cap = torch.eye(u.shape[1], dtype=u.dtype) + u.T @ (u / psi[:, None])
            winv_zt = zp.T - (u / psi[:, None]) @ torch.linalg.solve(cap, u.T @ zp.T)
            k = zi @ winv_zt
            # the non-trivial ones: z has rank min(B - 1, d)
            eig = torch.linalg.eigvalsh(0.5 * (k + k.T))[-min(nres - 1, zi.shape[1]):]
            return half_logdet(eig - ai.mean())
        # "full" (any index set) or "block" (one group; the block total is the sum of the groups)
        if fit.structure == "full":
            w = fit.cov if idx is None else fit.cov[idx][:, idx]
        else:
            w = fit.blocks[group]
        sq = ai.sqrt()
        bc = zi.T @ zi - sq[:, None] * w * sq[None, :]
        return half_logdet(gen_eig(w, bc))

    per_group = {g: value(idx, g) for g, idx in index.items()}
    total = value(None, None) if structure in ("full", "lowrank") else sum(per_group.values())
    settings: dict[str, Any] = {
        "structure": structure, "num_resamples": nres, "dimension": d, "within_dof": dof,
        "draws_per_resample": [int(c * n) for c, n in sizes],
        "mc_correction": bool(mc_correction),
        "mean_ess": float(ess.mean()) if ess is not None else None,
        "total_rule": "joint" if structure in ("full", "lowrank") else "sum of groups",
        "clamped_eigenvalues": clamped["count"],
    }
    _describe_fit(settings, fit, shrinkage)
    return IIWResult(per_group, float(total), "channel", "nats", settings)
