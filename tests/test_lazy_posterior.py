"""A lazily read Posterior (#18): iter_draws, and predict / summary / to_arviz / IIW chunk by chunk.

``CountingDraws`` is a stand-in for :class:`pib_bayes.store.LazyDraws` that implements exactly the
lazy protocol (``shape``, ``dtype``, ``read``, ``__getitem__``), hands out fresh copies (as a file
read does) and records every read, so a test can assert that no consumer ever reads a whole
variable and that no single read exceeds one chunk.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor, nn

import pib_bayes.diagnostics as diag
import pib_bayes.posterior as posterior_mod
from pib_bayes import GaussianPrior, Posterior
from pib_bayes.iiw import samples as iiw
from pib_bayes.posterior import is_lazy_draws


class CountingDraws(Mapping):
    """The lazy draws protocol over in-memory tensors, counting what is read."""

    def __init__(self, draws: dict[str, Tensor], max_draws_per_read: int | None = None) -> None:
        self._draws = draws
        self.max_draws_per_read = max_draws_per_read
        self.whole_reads: list[str] = []
        self.reads: list[tuple[str, object, slice]] = []
        self.elements_read = 0

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._draws[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._draws[name].dtype

    def read(self, name: str, chains: slice | list[int], draws: slice) -> Tensor:
        assert isinstance(chains, (slice, list)) and isinstance(draws, slice)
        n = draws.stop - draws.start
        if self.max_draws_per_read is not None:
            assert n <= self.max_draws_per_read, f"read of {n} draws of {name!r} at once"
        self.reads.append((name, chains, draws))
        out = self._draws[name][chains, draws].clone()
        self.elements_read += out.numel()
        return out

    def __getitem__(self, name: str) -> Tensor:
        self.whole_reads.append(name)
        return self._draws[name].clone()

    def __iter__(self) -> Iterator[str]:
        return iter(self._draws)

    def __len__(self) -> int:
        return len(self._draws)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp_posterior(lazy: bool, *, chains: int = 3, draws: int = 40, seed: int = 0, limit: int | None = None,
                   task: str = "classification"):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4 if task == "classification" else 1))
    g = _gen(seed)
    tensors = {n: p.detach() + 0.3 * torch.randn(chains, draws, *p.shape, generator=g)
               for n, p in net.named_parameters()}
    stats = {"energy": torch.randn(chains, draws, generator=g, dtype=torch.float64),
             "loss": torch.rand(chains, draws, generator=g, dtype=torch.float64)}
    meta = {"task": task, "noise_std": 0.5 if task == "regression" else None}
    source = CountingDraws(tensors, limit) if lazy else tensors
    return Posterior(source, stats, meta, model=net), source, net


def _pair(**kw):
    eager, _, net = _mlp_posterior(False, **kw)
    lazy, counter, _ = _mlp_posterior(True, **kw)
    return eager, lazy, counter, net


# ------------------------------------------------------------------------------------ Posterior
def test_lazy_posterior_is_built_without_reading_a_draw():
    post, counter, _ = _mlp_posterior(True)
    assert is_lazy_draws(counter) and post.lazy
    assert (post.num_chains, post.num_draws, post.num_params) == (3, 40, 3 * 8 + 8 + 8 * 4 + 4)
    assert post.param_shapes == {"0.weight": (8, 3), "0.bias": (8,), "2.weight": (4, 8), "2.bias": (4,)}
    post.check_model(post.model)
    repr(post)
    assert counter.reads == [] and counter.whole_reads == []


def test_iter_draws_yields_the_same_chunks_for_tensors_and_lazy_draws():
    eager, lazy, counter, _ = _pair()
    for kw in ({}, {"draw_chunk": 7}, {"chains": [2, 0], "draw_chunk": 16}, {"chains": slice(1, 3)},
               {"names": ["2.bias"], "draws": slice(5, 33), "draw_chunk": 10}):
        a, b = list(eager.iter_draws(**kw)), list(lazy.iter_draws(**kw))
        assert len(a) == len(b) >= 1
        for (ca, sa, ba), (cb, sb, bb) in zip(a, b, strict=True):
            assert ca == cb and sa == sb and list(ba) == list(bb)
            for k in ba:
                assert torch.equal(ba[k], bb[k])
                assert torch.equal(ba[k], eager.draws[k][ca][:, sa])
    chunks = list(eager.iter_draws(draw_chunk=7))
    assert [s.start for _, s, _ in chunks] == list(range(0, 40, 7)) and chunks[-1][1].stop == 40
    assert counter.whole_reads == []


def test_iter_draws_default_chunk_follows_the_byte_budget(monkeypatch):
    _, lazy, counter, _ = _pair()
    per_draw = 3 * lazy.num_params * 4  # three chains of float32
    monkeypatch.setattr(posterior_mod, "DRAW_CHUNK_BYTES", 5 * per_draw)
    assert [s.stop - s.start for _, s, _ in lazy.iter_draws()] == [5] * 8
    monkeypatch.setattr(posterior_mod, "DRAW_CHUNK_BYTES", 1)
    assert len(list(lazy.iter_draws())) == 40  # never below one draw


def test_iter_draws_rejects_bad_arguments():
    post, _, _ = _mlp_posterior(True)
    for kw, match in (({"names": ["nope"]}, "names: unknown"),
                      ({"names": "0.bias"}, r"names: .*\['0.bias'\]"), ({"chains": [3]}, "chains:"),
                      ({"chains": []}, "chains:"), ({"chains": [True]}, "chains:"),
                      ({"draws": slice(0, 10, 2)}, "draws: expected a slice"), ({"draws": 3}, "draws:"),
                      ({"draw_chunk": 0}, "draw_chunk:"), ({"draw_chunk": 2.5}, "draw_chunk:")):
        with pytest.raises(ValueError, match=match):
            list(post.iter_draws(**kw))


def test_a_read_of_the_wrong_shape_is_one_clear_error():
    class Broken(CountingDraws):
        def read(self, name, chains, draws):
            return super().read(name, chains, slice(draws.start, draws.start + 1))

    post = Posterior(Broken({"w": torch.zeros(2, 6, 3)}), {}, {})
    with pytest.raises(ValueError, match=r"draws: read\('w', \.\.\.\) returned \(2, 1, 3\), expected "
                                         r".*\(2, 4, 3\)"):
        list(post.iter_draws(draw_chunk=4))


def test_nan_in_an_unflagged_lazy_chain_is_caught_as_read_and_check_finite_flags_it():
    w = torch.randn(3, 10, 2, generator=_gen(1))
    w[1, 7, 0] = math.nan
    post = Posterior(CountingDraws({"w": w}), {}, {})  # no scan at construction: nothing read
    assert post.good_chains == [0, 1, 2]
    with pytest.raises(ValueError, match=r"draws: chain 1 holds NaN/Inf in 'w' at draws 5:10"):
        list(post.iter_draws(draw_chunk=5))
    with pytest.warns(UserWarning, match=r"chains \[1\] hold NaN/Inf"):
        assert post.check_finite(draw_chunk=4) == [1]
    assert post.good_chains == [0, 2] and post.check_finite() == []
    assert len(list(post.iter_draws(chains=post.good_chains))) == 1  # the flagged chain is skipped


# ------------------------------------------------------------------------------------ predict
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_lazy_predict_is_bit_equal_to_eager_and_never_reads_a_whole_variable(task, monkeypatch):
    eager, lazy, counter, _ = _pair(task=task, limit=16)
    # the automatic chunk is capped at DRAW_CHUNK_BYTES of draws: here 16 draws
    monkeypatch.setattr(posterior_mod, "DRAW_CHUNK_BYTES", 16 * 4 * lazy.num_params)
    x = torch.randn(9, 3, generator=_gen(2))
    for kw in ({}, {"chunk_size": 16}, {"chunk_size": 7}):  # 7 straddles the chain boundaries
        a, b = eager.predict(x, **kw), lazy.predict(x, **kw)
        assert torch.equal(a.per_draw, b.per_draw) and torch.equal(a.mean, b.mean)
        assert lazy.last_engine == eager.last_engine == "batched"
    assert counter.whole_reads == [] and counter.reads


@pytest.mark.parametrize("engine", ["loop", "vmap"])
def test_lazy_outputs_match_eager_for_the_loop_and_vmap_engines(engine):
    eager, lazy, counter, _ = _pair(limit=5)
    x = torch.randn(4, 3, generator=_gen(3))
    a = eager.outputs(x, engine=engine, chunk_size=5)
    b = lazy.outputs(x, engine=engine, chunk_size=5)
    assert torch.equal(a, b) and a.shape == (120, 4, 4)
    assert counter.whole_reads == []


def test_lazy_predict_leaves_out_diverged_chains_like_eager():
    eager, lazy, counter, _ = _pair()
    for post in (eager, lazy):
        post.diverged = torch.tensor([False, True, False])
    x = torch.randn(5, 3, generator=_gen(4))
    with pytest.warns(UserWarning, match=r"chains \[1\] diverged"):
        a = eager.predict(x)
    with pytest.warns(UserWarning, match=r"chains \[1\] diverged"):
        b = lazy.predict(x)
    assert torch.equal(a.per_draw, b.per_draw) and a.per_draw.shape[0] == 80
    assert all(1 not in (c if isinstance(c, list) else range(3)[c]) for _, c, _ in counter.reads)


# ------------------------------------------------------------------------------------ diagnostics
def test_lazy_summary_equals_eager_summary_and_reads_by_chunks(monkeypatch):
    monkeypatch.setattr(posterior_mod, "DRAW_CHUNK_BYTES", 4096)  # many chunks per variable
    eager, lazy, counter, _ = _pair(limit=16, draws=60)
    counter.max_draws_per_read = 16
    g = _gen(5)
    data = (torch.randn(12, 3, generator=g), torch.randint(0, 4, (12,), generator=g))
    probe = torch.randn(2, 3, generator=g)
    for kw in ({"data": data, "probe_x": probe}, {"max_weights": 100},
               {"var_names": ["0.bias", "2.weight[3,1]"]}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", diag.ConvergenceWarning)
            a, b = diag.summary(eager, **kw), diag.summary(lazy, **kw)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert counter.whole_reads == [] and max(r[2].stop - r[2].start for r in counter.reads) <= 16


def test_summary_var_names_select_weights_and_blocks_give_the_same_table(monkeypatch):
    post, counter, _ = _mlp_posterior(True, draws=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", diag.ConvergenceWarning)
        whole = diag.summary(post, var_names=["0.weight", "2.bias[2]"])
        monkeypatch.setattr(diag, "WEIGHT_BLOCK_BYTES", 8 * 3 * 50 * 5)  # blocks of 5 coordinates
        counter.reads.clear()
        blocks = diag.summary(post, var_names=["0.weight", "2.bias[2]"])
    pd.testing.assert_frame_equal(whole, blocks, check_exact=True)
    weights = [i for i in whole.index if whole.loc[i, "kind"] == "weight"]
    assert weights == [f"0.weight[{i},{j}]" for i in range(8) for j in range(3)] + ["2.bias[2]"]
    assert not any(i.startswith("proj") for i in whole.index)
    # the weight rows are ArviZ's own diagnostics of those coordinates
    w = post.draws._draws["0.weight"][:, :, 5, 1].double().numpy()
    assert whole.loc["0.weight[5,1]", "mean"] == pytest.approx(w.mean(), rel=1e-12)
    assert whole.loc["0.weight[5,1]", "r_hat"] == pytest.approx(float(diag.compat.diagnose(
        diag._as_dataset({"v": w}, [0, 1, 2]))["r_hat"]["v"]), rel=1e-12)
    # 25 coordinates in blocks of 5: five passes (one chunk each) over 0.weight, one over 2.bias (in the
    # last block only), none over the parameters not selected
    assert [r[0] for r in counter.reads] == ["0.weight"] * 4 + ["0.weight", "2.bias"]
    assert counter.whole_reads == []
    for bad, match in ((["nope"], "not a parameter"), (["0.bias[8]"], "outside the shape"),
                       (["0.bias[a]"], "integers"), ("0.bias", "non-empty list"), ([], "non-empty list")):
        with pytest.raises(ValueError, match=f"var_names: .*{match}"):
            diag.summary(post, var_names=bad)


def test_random_projections_stream_and_equal_the_one_shot_matmul():
    eager, lazy, counter, _ = _pair(draws=30)
    a = diag.random_projections(eager, 5, seed=3)
    b = diag.random_projections(lazy, 5, seed=3)
    assert torch.equal(a, b)
    # the unchunked formula: same directions, one matmul over all draws (summation order differs)
    gen = torch.Generator().manual_seed(3)
    acc, sq = 0, 0
    for v in eager.draws.values():
        gdir = torch.randn(v[0, 0].numel(), 5, generator=gen, dtype=torch.float64)
        acc = acc + v.reshape(3, 30, -1).double() @ gdir
        sq = sq + gdir.square().sum(0)
    torch.testing.assert_close(b, acc / sq.sqrt(), rtol=1e-12, atol=1e-12)
    assert counter.whole_reads == []


def test_to_arviz_on_a_lazy_posterior_reads_by_chunks_or_names_the_size(monkeypatch):
    eager, lazy, counter, _ = _pair()
    a, b = diag.to_arviz(eager), diag.to_arviz(lazy)
    for k in eager.param_names:
        np.testing.assert_array_equal(a.posterior[k].values, b.posterior[k].values)
    np.testing.assert_array_equal(diag.to_arviz(eager, params="projections").posterior["projection"].values,
                                  diag.to_arviz(lazy, params="projections").posterior["projection"].values)
    assert counter.whole_reads == []
    monkeypatch.setattr(diag, "LAZY_EXPORT_BYTES", 4000)
    with pytest.raises(ValueError, match=r"params: exporting 0.weight, 0.bias, 2.weight, 2.bias from a "
                                         r"lazily read posterior would hold 31.9 KiB of draws in memory "
                                         r"\(limit 3.9 KiB\); .*params='projections'"):
        diag.to_arviz(lazy)
    small = diag.to_arviz(lazy, params=["2.bias"])  # 3 x 40 x 4 floats: under the limit
    assert dict(small.posterior["2.bias"].sizes) == {"chain": 3, "draw": 40, "2.bias_dim_0": 4}
    data = (torch.randn(6, 3, generator=_gen(6)), torch.randint(0, 4, (6,), generator=_gen(6)))
    loglik = [diag.to_arviz(p, params=["2.bias"], data=data).log_likelihood["y"].values
              for p in (eager, lazy)]
    np.testing.assert_array_equal(*loglik)
    assert counter.whole_reads == []


# ------------------------------------------------------------------------------------ IIW
def _iiw_pair(seed=0, chains=3, draws=80, trend=False):
    g = _gen(seed)
    tensors = {"a": 0.5 * torch.randn(chains, draws, 3, generator=g, dtype=torch.float64),
               "b": 0.2 * torch.randn(chains, draws, 2, 2, generator=g, dtype=torch.float64)}
    if trend:  # chunk means that differ: a merge that drops the between-chunk term is visibly wrong
        tensors["a"] = tensors["a"] + torch.linspace(0, 3, draws, dtype=torch.float64)[None, :, None]
    counter = CountingDraws(tensors, max_draws_per_read=None)
    return Posterior(dict(tensors), {}, {}), Posterior(counter, {}, {}), counter, tensors


@pytest.mark.parametrize("structure", ["diag", "full", "block", "lowrank"])
def test_lazy_kl_equals_eager_kl_without_whole_reads(structure, monkeypatch):
    monkeypatch.setattr(posterior_mod, "DRAW_CHUNK_BYTES", 1024)  # chunks of 9 draws x 3 chains
    eager, lazy, counter, _ = _iiw_pair()
    prior = GaussianPrior(std=1.0)
    groups = {"first": ["a"], "second": ["b"]}
    a = iiw.kl(eager, prior, structure=structure, groups=groups)
    b = iiw.kl(lazy, prior, structure=structure, groups=groups)
    assert a.total == b.total and a.per_group == b.per_group
    assert counter.whole_reads == [] and max(r[2].stop - r[2].start for r in counter.reads) < 80


def test_streamed_diag_moments_equal_the_two_pass_formula_and_would_catch_a_wrong_merge(monkeypatch):
    monkeypatch.setattr(posterior_mod, "DRAW_CHUNK_BYTES", 512)  # 4 draws x 3 chains x 7 coords per chunk
    _, lazy, _, tensors = _iiw_pair(trend=True)
    names = ["a", "b"]
    x = torch.cat([tensors[n].reshape(3, 80, -1) for n in names], 2).reshape(-1, 7)
    chains, mean, m2 = iiw._moments(lazy, names, "posterior")
    grand, total = iiw._pool(mean, m2, 80)
    # float64 sums in another order: equal to ~1e-15 relative; 1e-12 leaves room, a wrong merge is off by O(1)
    torch.testing.assert_close(grand, x.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(total / (240 - 1), x.var(0), rtol=1e-12, atol=0)
    # the twin: summing the chunk M2s without the between-chunk term misses the trend's variance
    naive = sum(((c - c.mean(1, keepdim=True)).square().sum((0, 1)))
                for c in torch.cat([tensors[n].reshape(3, 80, -1) for n in names], 2).split(4, dim=1))
    assert not torch.allclose(naive / (240 - 1), x.var(0), rtol=1e-12, atol=0)
    # the KL of the diagonal fit from those moments equals the closed form on torch's own variance
    prior = GaussianPrior(std=1.0)
    res = iiw.kl(lazy, prior, groups={"all": names})
    var = x.var(0)
    exact = 0.5 * float((var + x.mean(0).square() - 1 - var.log()).sum())
    assert res.total == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_lazy_channel_equals_eager_channel_without_whole_reads(structure, monkeypatch):
    monkeypatch.setattr(posterior_mod, "DRAW_CHUNK_BYTES", 1024)
    monkeypatch.setattr(iiw, "_BLOCK_BYTES", 8 * 3 * 80 * 3)  # ESS in blocks of 3 coordinates
    pairs = [_iiw_pair(seed=s) for s in range(4)]
    a = iiw.channel([p[0] for p in pairs], structure=structure)
    b = iiw.channel([p[1] for p in pairs], structure=structure)
    assert a.total == pytest.approx(b.total, rel=1e-12, abs=1e-15)
    assert a.per_group == pytest.approx(b.per_group, rel=1e-12, abs=1e-15)
    assert a.settings["mean_ess"] == pytest.approx(b.settings["mean_ess"], rel=1e-12)
    assert all(p[2].whole_reads == [] for p in pairs)


# ------------------------------------------------------------------------------------ the real store
def test_a_store_loaded_lazily_gives_the_eager_results_without_whole_reads(tmp_path, monkeypatch):
    """Posterior.load(lazy=True) (pib_bayes.store.LazyDraws): predict, summary, to_arviz and the KL are
    those of the eagerly loaded file, and no consumer reads a whole variable (``draws[name]`` raises)."""
    from pib_bayes.store import LazyDraws

    eager_mem, _, net = _mlp_posterior(False, draws=30)
    path = tmp_path / "post.nc"
    eager_mem.save(path)
    eager = Posterior.load(path, model=net)
    lazy = Posterior.load(path, model=net, lazy=True)
    assert isinstance(lazy.draws, LazyDraws) and lazy.lazy

    def no_whole_read(self, name):
        raise AssertionError(f"whole read of {name!r}")

    monkeypatch.setattr(LazyDraws, "__getitem__", no_whole_read)
    with pytest.raises(AssertionError, match="whole read"):  # the guard bites: flat() reads every variable
        lazy.flat()
    monkeypatch.setattr(posterior_mod, "DRAW_CHUNK_BYTES", 8 * 4 * lazy.num_params)  # chunks of 8 draws
    g = _gen(7)
    x, y = torch.randn(10, 3, generator=g), torch.randint(0, 4, (10,), generator=g)
    assert torch.equal(eager.predict(x).per_draw, lazy.predict(x).per_draw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", diag.ConvergenceWarning)
        for kw in ({"data": (x, y), "probe_x": x[:2]}, {"var_names": ["2.bias"]}):
            pd.testing.assert_frame_equal(diag.summary(eager, **kw), diag.summary(lazy, **kw),
                                          check_exact=True)
    np.testing.assert_array_equal(diag.to_arviz(eager, params=["0.bias"]).posterior["0.bias"].values,
                                  diag.to_arviz(lazy, params=["0.bias"]).posterior["0.bias"].values)
    prior = GaussianPrior(std=1.0)
    for structure in ("diag", "full"):
        a, b = (iiw.kl(p, prior, structure=structure) for p in (eager, lazy))
        assert a.total == b.total and a.per_group == b.per_group
