"""sample(store=...): draws streamed to disk, appending checkpoints, crash safety of both."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from crash_helpers import Crash, crashing_stat, kill_after_ready, start_run_child
from torch import nn

import pib_bayes as pb
from pib_bayes.driver import checkpoint as ckpt_mod
from pib_bayes.driver.stream import _Segments, segments_dir
from pib_bayes.io import LockedError, exclusive_lock
from pib_bayes.store import LazyDraws


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 256 bytes: the 2-8-3 MLP's 59 float32 weights (236 bytes a draw) give a window of one
    draw (a segment per kept draw), its 8-weight bias 8 draws a chunk."""
    monkeypatch.setattr("pib_bayes.store.CHUNK_BYTES", 256)
    monkeypatch.setattr("pib_bayes.driver.stream.CHUNK_BYTES", 256)


def _run(ckpt=None, store=None, crash_after=None, method="sequential", resume=False, threshold=1e4,
         num_draws=25, every=4):
    torch.manual_seed(0)
    x, y = pb.data.make_classification_data(n=128, num_classes=3, seed=2)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    return pb.sample(model, "cross_entropy", (x, y), beta=1 / 128, step_size=1e-3, sampler="psgld",
                     num_chains=3, num_warmup=20, num_draws=num_draws, thin=3, batch_size=16, seed=3,
                     chain_method=method, stat_fns={"w0": crashing_stat(crash_after)}, checkpoint=ckpt,
                     checkpoint_every=every, resume=resume, store=store, divergence_threshold=threshold)


def _same(a, b):
    assert list(a.draws) == list(b.draws) and list(a.sample_stats) == list(b.sample_stats)
    for k in a.draws:
        assert torch.equal(a.draws[k].nan_to_num(7.5), b.draws[k].nan_to_num(7.5)), k
        assert torch.equal(a.draws[k].isnan(), b.draws[k].isnan()), k
    for k in a.sample_stats:
        assert torch.equal(a.sample_stats[k].nan_to_num(7.5), b.sample_stats[k].nan_to_num(7.5)), k
    assert torch.equal(a.diverged, b.diverged) and torch.equal(a.divergence_step, b.divergence_step)


@pytest.mark.parametrize("method", ["sequential", "vectorized"])
@pytest.mark.parametrize("threshold", [1e4, 1.02])  # 1.02: chains diverge part-way (NaN rows after)
def test_a_streamed_run_gives_the_draws_of_an_in_memory_one(tmp_path, small_chunks, method, threshold):
    ref = _run(method=method, threshold=threshold)
    if threshold < 2:
        assert 0 < int(ref.diverged.sum()) and bool(ref.draws["0.weight"].isnan().any())
    store = tmp_path / "post.nc"
    streamed = _run(store=store, method=method, threshold=threshold)
    assert isinstance(streamed.draws, LazyDraws)  # read from the store on demand
    _same(ref, streamed)
    _same(ref, pb.Posterior.load(store))  # a valid Posterior file, eagerly read too
    assert not segments_dir(store).exists()  # consolidated, the segments removed
    import arviz as az

    idata = az.from_netcdf(store)
    assert np.array_equal(idata.posterior["2.weight"].values, ref.draws["2.weight"].numpy(), equal_nan=True)


def test_a_streamed_run_holds_one_chunk_of_draws_not_the_run(monkeypatch, tmp_path):
    """The memory check before the run counts the draws held: all of them in memory, one chunk's worth
    (here 10 draws of 100,100 float32 weights) when streamed."""
    monkeypatch.setattr("pib_bayes._validate.available_memory", lambda: 70 * 2**20)
    x, y = torch.randn(32, 1000, generator=torch.Generator().manual_seed(0)), torch.randn(32, 100)

    def run(store):
        return pb.sample(nn.Linear(1000, 100), "gaussian", (x, y), beta=1 / 32, step_size=1e-6,
                         num_warmup=0, num_draws=200, seed=0, store=store)

    with pytest.raises(ValueError, match=r"num_draws: storing 1 chain\(s\) x 200 draws"):
        run(None)
    post = run(tmp_path / "big.nc")
    assert isinstance(post.draws, LazyDraws) and post.draws.shape("weight") == (1, 200, 100, 1000)


@pytest.mark.parametrize("method", ["sequential", "vectorized"])
@pytest.mark.parametrize("crash_after", [1, 30, 52])
def test_a_crashed_streamed_run_resumes_bit_identically(tmp_path, small_chunks, method, crash_after):
    ref = _run(method=method)
    ckpt, store = tmp_path / "c.ckpt", tmp_path / "post.nc"
    with pytest.raises(Crash):
        _run(ckpt, store, crash_after=crash_after, method=method)
    assert not store.exists()  # readers never see a partial store
    _same(ref, _run(ckpt, store, method=method, resume=True))
    assert not segments_dir(ckpt).exists()
    # a finished streamed run is handed back from the store without sampling again
    _same(ref, _run(ckpt, store, method=method, resume=True, crash_after=0))


@pytest.mark.parametrize("first,second", [(None, "post.nc"), ("post.nc", None)])
def test_a_checkpoint_resumes_with_or_without_store(tmp_path, small_chunks, first, second):
    """The segments are the same either way: a run checkpointed in memory resumes streamed and back."""
    ref = _run()
    ckpt = tmp_path / "c.ckpt"
    with pytest.raises(Crash):
        _run(ckpt, first and tmp_path / first, crash_after=30)
    _same(ref, _run(ckpt, second and tmp_path / second, resume=True))


def _bytes_per_checkpoint(tmp_path, num_draws):
    """Bytes each checkpoint writes: its new segment plus its payload."""
    sizes = []
    real = ckpt_mod._Checkpointer.write

    def write(self, *args, **kwargs):
        before = set(self.out.segments.written)
        real(self, *args, **kwargs)
        new = [n for n in self.out.segments.written if n not in before]
        sizes.append(os.path.getsize(self.path)
                     + sum(os.path.getsize(self.out.segments.dir / n) for n in new))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpt_mod._Checkpointer, "write", write)
        _run(tmp_path / f"c{num_draws}.ckpt", method="vectorized", num_draws=num_draws, every=12)
    return sizes


def test_checkpoint_io_is_proportional_to_the_new_draws(tmp_path):
    """Every 12 steps (4 kept draws) a checkpoint writes the same bytes in a run of 40 draws and in one
    of 160; a checkpoint that rewrote every draw so far would write about 4x more at the end of the
    long run than of the short one."""
    short, long = (_bytes_per_checkpoint(tmp_path, n) for n in (40, 160))
    steady_short, steady_long = short[3:-2], long[3:-2]  # past warm-up, before the final writes
    assert max(steady_long) <= 1.02 * min(steady_short) and min(steady_long) >= 0.98 * max(steady_short)
    assert sum(long) <= 4.5 * sum(short)  # linear in the run length, not quadratic


def test_two_writers_on_one_store_get_one_clear_refusal(tmp_path):
    store = tmp_path / "post.nc"
    with exclusive_lock(store, "store"):
        with pytest.raises(LockedError, match=r"store: .*post\.nc.*being written by another writer"):
            _run(store=store)
    assert not store.exists()
    with pytest.raises(ValueError, match="store: must be another file than checkpoint"):
        _run(tmp_path / "x", tmp_path / "x")


def _child(tmp_path, out, store=None, ckpt=None):
    # 4 KiB chunks: a segment every 10 draws
    return start_run_child(tmp_path, out, store=store, ckpt=ckpt, chunk_bytes=4096)


def test_sigkill_at_random_moments_of_a_streamed_run_then_resume_is_bit_identical(tmp_path):
    ref = _child(tmp_path, tmp_path / "ref.nc")
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    ckpt, store = tmp_path / "run.ckpt", tmp_path / "post.nc"
    rng = np.random.default_rng(1)  # kill times: a fixed, unexamined stream, not a tuned seed
    kills = 0
    for _ in range(5):
        proc = _child(tmp_path, tmp_path / "resumed.nc", store, ckpt)
        kills += kill_after_ready(proc, float(rng.uniform(0.2, 2.0)))
        if ckpt.exists():  # whatever moment the kill hit, the checkpoint and the segments it lists are whole
            pb.io.load_payload(ckpt, "checkpoint", (ckpt_mod.CHECKPOINT_VERSION,))
            segments = _Segments(segments_dir(ckpt))
            for seg in sorted(segments_dir(ckpt).glob("seg-*.seg")):  # committed or not: each one whole
                segments.read(seg.name)
    assert kills >= 1
    final = _child(tmp_path, tmp_path / "resumed.nc", store, ckpt)
    assert final.wait(timeout=300) == 0, final.stderr.read()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    a, b = pb.Posterior.load(tmp_path / "ref.nc"), pb.Posterior.load(store)
    _same(a, b)  # no draw lost or duplicated: every draw of every chain equal to the uninterrupted run's
    for k in a.sample_stats:
        assert not a.sample_stats[k].isnan().any(), k


@pytest.mark.parametrize("where", ["data", "header"])
def test_a_damaged_segment_is_a_format_error_naming_it(tmp_path, small_chunks, where):
    ckpt = tmp_path / "c.ckpt"
    with pytest.raises(Crash):
        _run(ckpt, crash_after=30)
    seg = sorted(segments_dir(ckpt).glob("seg-*.seg"))[0]
    raw = bytearray(seg.read_bytes())
    raw[-3 if where == "data" else 30] ^= 0x04
    seg.write_bytes(bytes(raw))
    with pytest.raises(pb.io.FormatError,
                       match=rf"{seg.name}: (variable .* digest mismatch|corrupt segment)"):
        _run(ckpt, resume=True)


def test_a_crashed_run_without_checkpoint_leaves_no_store_and_the_next_starts_clean(tmp_path, small_chunks):
    ref = _run()
    store = tmp_path / "post.nc"
    with pytest.raises(Crash):
        _run(store=store, crash_after=30)
    assert not store.exists() and any(segments_dir(store).iterdir())  # only its uncommitted segments
    _same(ref, _run(store=store))  # a fresh run: the old segments are dropped, not mixed in
    assert not segments_dir(store).exists()


def _fake_disk(monkeypatch, free):
    """shutil.disk_usage reporting ``free`` bytes free on every disk."""
    import shutil

    usage = shutil._ntuple_diskusage(2**50, 2**50 - free, free)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)


def _needed(err: pytest.ExceptionInfo) -> int:
    import re

    return int(re.search(r"about [\d.]+ \w+ \(([\d,]+) bytes\)", str(err.value)).group(1).replace(",", ""))


@pytest.mark.parametrize("kind", ["store", "checkpoint"])
def test_a_run_whose_files_would_not_fit_on_the_disk_is_refused_before_sampling(monkeypatch, tmp_path, kind):
    store = tmp_path / "post.nc" if kind == "store" else None
    ckpt = tmp_path / "run.ckpt" if kind == "checkpoint" else None
    _fake_disk(monkeypatch, 0)
    with pytest.raises(ValueError, match=rf"^{kind}: the run would write about .* but only 0 B \(0 bytes\) "
                                         "is free there") as err:
        _run(store=store, ckpt=ckpt)
    needed = _needed(err)
    _fake_disk(monkeypatch, needed - 1)  # one byte short: still refused, and nothing was written
    with pytest.raises(ValueError, match=f"^{kind}: the run would write"):
        _run(store=store, ckpt=ckpt)
    assert sorted(os.listdir(tmp_path)) == []
    _fake_disk(monkeypatch, needed)  # the twin: exactly enough space passes and the run completes
    post = _run(store=store, ckpt=ckpt)
    assert post.num_draws == 25
    if kind == "store":  # the estimate covers the file the run wrote
        assert 0 < os.path.getsize(store) <= needed


def test_the_disk_check_counts_the_draws_and_the_segments_a_resume_keeps(monkeypatch, tmp_path):
    """The store's draws are counted twice (the segments exist while the store is written from
    them); segments already in the folder are space the run reuses."""
    _fake_disk(monkeypatch, 0)
    with pytest.raises(ValueError) as small:
        _run(store=tmp_path / "post.nc", num_draws=25)
    with pytest.raises(ValueError) as large:
        _run(store=tmp_path / "post.nc", num_draws=2025)
    # 3 chains x 2000 more draws of the 51 float32 weights (2*8 + 8 + 8*3 + 3) and the statistics
    # (energy, loss: float32; step_size, w0: float64; diverging: bool); no chunk is padded here
    draw_bytes = 3 * 2000 * (51 * 4 + 4 + 4 + 8 + 8 + 1)
    assert _needed(large) - _needed(small) == 2 * draw_bytes
    seg = segments_dir(tmp_path / "post.nc")
    seg.mkdir()
    (seg / "seg-000000-000003-0000000000-0000000010.seg").write_bytes(b"\0" * 10_000)
    with pytest.raises(ValueError) as resumed:
        _run(store=tmp_path / "post.nc", num_draws=25)
    assert _needed(resumed) == _needed(small) - 10_000


def test_the_disk_check_of_dst_counts_the_store_it_gathers_from_every_rank(monkeypatch, tmp_path):
    """sample_distributed's dst (driver.checks.gathered_store) streams its own chains and then writes
    the store of every rank's chains: its disk check counts that store too, and the estimate covers
    the file a run of all the chains writes. Twin: without the gathered store the need is smaller."""
    from pib_bayes.driver.checks import gathered_store

    def one_chain(**kw):
        torch.manual_seed(0)
        x, y = pb.data.make_classification_data(n=128, num_classes=3, seed=2)
        model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
        return pb.sample(model, "cross_entropy", (x, y), beta=1 / 128, step_size=1e-3, num_chains=3,
                         num_warmup=20, num_draws=25, batch_size=16, seed=3, **kw)

    _fake_disk(monkeypatch, 0)
    with pytest.raises(ValueError) as alone:
        one_chain(chain_ids=[0], store=tmp_path / "post.nc.rank0-of-3")
    with gathered_store(str(tmp_path / "post.nc"), 3), pytest.raises(
            ValueError, match=r"gathered from every rank") as gathering:
        one_chain(chain_ids=[0], store=tmp_path / "post.nc.rank0-of-3")
    assert "gathered" not in str(alone.value)
    extra = _needed(gathering) - _needed(alone)
    monkeypatch.undo()
    one_chain(store=tmp_path / "all.nc")  # the store of all 3 chains, as dst writes it
    assert 0 < os.path.getsize(tmp_path / "all.nc") <= extra
