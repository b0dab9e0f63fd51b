"""pib_bayes.distributed: 2 gloo processes on loopback, started here with torch.multiprocessing (spawn).

Each test starts one 2-rank group that runs a scenario (below, ``_scenario_*``) and writes what it got
to a temporary directory; the test compares it with ``pib_bayes.sample`` run in this process. Every
start has a deadline: a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import time
import traceback

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pib_bayes import GaussianPrior, Posterior, sample
from pib_bayes.distributed import DistributedSamplingError, chain_shares, sample_distributed, shard

WORLD = 2
DEADLINE_S = 120.0




# ----------------------------------------------------------------------------- shared set-up
def _data(n: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-0.5], [0.25]], dtype=torch.float64) + 0.3 * torch.randn(
        n, 1, generator=g, dtype=torch.float64)
    return x, y


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()


CHAIN_ARGS = dict(beta=1 / 48, prior=GaussianPrior(std=1.0), step_size=1e-2, num_chains=5, num_warmup=20,
                  num_draws=15, thin=2, batch_size=8, seed=3)
DATA_N = 63  # shards of 32 and 31 examples: the size weighting matters
DATA_ARGS = dict(beta=1 / DATA_N, prior=GaussianPrior(std=1.0), step_size=5e-3, num_chains=2, num_warmup=30,
                 num_draws=20, seed=5)


class _FailingLoss:
    """Gaussian loss that fails on its ``fail_at``-th call: it raises (an error in user code on one
    rank), or with ``die=True`` the process exits at once (no exception, no clean-up)."""

    task = "regression"

    def __init__(self, fail_at: int, die: bool = False) -> None:
        self.calls, self.fail_at, self.die = 0, fail_at, die

    def __call__(self, out, y):
        self.calls += 1
        if self.calls >= self.fail_at:
            if self.die:
                os._exit(3)
            raise ValueError(f"boom at call {self.calls}")
        return (out - y.reshape(out.shape)).square().sum(1) / 2


class _MarkerLoss:
    """Gaussian loss, except for examples marked by y > 1e9, whose loss is exp(1000 f(x)): it
    overflows for a chain whose output there is positive, and is 0 for one whose output is negative."""

    task = "regression"

    def __call__(self, out, y):
        y = y.reshape(out.shape)
        marker = y[:, 0] > 1e9
        sq = (out - y).square().sum(1) / 2
        return torch.where(marker, torch.exp(1000 * torch.where(marker, out[:, 0], 0.0)), sq)


def _marked_data():
    x, y = _data(DATA_N)
    y = y.clone()
    y[32] = 1e10  # the first example of rank 1's shard
    return x, y


def _two_chain_init():
    """Chain 0 ends in bias -5 (output < 0), chain 1 in bias +5 (output > 0; tanh keeps |rest| < 3)."""
    params = dict(_model().named_parameters())
    init = {n: torch.stack([p.detach(), p.detach()]) for n, p in params.items()}
    init["2.bias"] = torch.tensor([[-5.0], [5.0]], dtype=torch.float64)
    return init


# ----------------------------------------------------------------------------- scenarios (in the ranks)
def _scenario_chains(rank: int, out: str) -> None:
    x, y = _data()
    seq = sample_distributed(_model(), "gaussian", (x, y), chain_method="sequential", **CHAIN_ARGS)
    if rank == 0:
        seq.save(os.path.join(out, "chains_seq.pt"))
    elif seq is not None:
        raise AssertionError("rank 1 got a Posterior with dst=0")
    vec = sample_distributed(_model(), "gaussian", (x, y), chain_method="vectorized", dst=None, **CHAIN_ARGS)
    vec.save(os.path.join(out, f"chains_vec.rank{rank}.pt"))


def _scenario_data(rank: int, out: str) -> None:
    x, y = shard(_data(DATA_N))
    for sampler in ("sgld", "psgld", "sghmc"):
        kw = dict(DATA_ARGS, sampler=sampler)
        if sampler == "psgld":
            kw["sampler_kwargs"] = {"alpha": 0.9}
        post = sample_distributed(_model(), "gaussian", (x, y), mode="data", dst=None, **kw)
        post.save(os.path.join(out, f"data_{sampler}.rank{rank}.pt"))
    vec = sample_distributed(_model(), "gaussian", (x, y), mode="data", dst=0, chain_method="vectorized",
                             **DATA_ARGS)
    if rank == 0:
        vec.save(os.path.join(out, "data_vectorized.rank0.pt"))
    # a DataLoader shard, one full-shard batch per step: the full-batch trajectory again
    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
    post = sample_distributed(_model(), "gaussian", loader, mode="data", dst=0, **DATA_ARGS)
    if rank == 0:
        post.save(os.path.join(out, "data_loader.rank0.pt"))
    mini = sample_distributed(_model(), "gaussian", (x, y), mode="data", dst=None, batch_size=8, **DATA_ARGS)
    mini.save(os.path.join(out, f"data_minibatch.rank{rank}.pt"))
    # one shard overflows the loss at the first step: only rank 1 sees a non-finite energy
    y_bad = y.clone()
    if rank == 1:
        y_bad[0] = 1e200
    # one chain of two overflows on rank 1 only: it dies on every rank, the other goes on
    one = sample_distributed(_model(), _MarkerLoss(), shard(_marked_data()), mode="data", dst=0,
                             chain_method="vectorized", init=_two_chain_init(),
                             **dict(DATA_ARGS, num_warmup=0))
    if rank == 0:
        one.save(os.path.join(out, "data_one_diverged.rank0.pt"))
    for method in ("sequential", "vectorized"):
        div = sample_distributed(_model(), "gaussian", (x, y_bad), mode="data", dst=None, chain_method=method,
                                 **dict(DATA_ARGS, num_warmup=0))
        div.save(os.path.join(out, f"data_diverged_{method}.rank{rank}.pt"))


def _scenario_fail_chains(rank: int, out: str) -> None:
    x, y = _data()
    loss = _FailingLoss(fail_at=5) if rank == 1 else _FailingLoss(fail_at=10**9)
    sample_distributed(_model(), loss, (x, y), **CHAIN_ARGS)


def _scenario_fail_data(rank: int, out: str) -> None:
    x, y = shard(_data(DATA_N))
    loss = _FailingLoss(fail_at=25) if rank == 1 else _FailingLoss(fail_at=10**9)
    kw = dict(DATA_ARGS, num_chains=1, checkpoint=os.path.join(out, "run.ckpt"), checkpoint_every=10)
    sample_distributed(_model(), loss, (x, y), mode="data", **kw)


def _scenario_resume_data(rank: int, out: str) -> None:
    x, y = shard(_data(DATA_N))
    kw = dict(DATA_ARGS, num_chains=1, checkpoint=os.path.join(out, "run.ckpt"), checkpoint_every=10,
              resume=True)
    # the uninterrupted run evaluates the loss 52 times (one check of the model on the data, steps
    # 0..49, and the transition after the last draw); resumed at step 20 it needs 1 + 30 + 1 = 32,
    # so this loss raises if the run started over instead of resuming
    post = sample_distributed(_model(), _FailingLoss(fail_at=33), (x, y), mode="data", **kw)
    if rank == 0:
        post.save(os.path.join(out, "resumed.pt"))


def _scenario_crash_chains(rank: int, out: str) -> None:
    x, y = _data()
    loss = _FailingLoss(fail_at=5, die=True) if rank == 1 else _FailingLoss(fail_at=10**9, die=True)
    sample_distributed(_model(), loss, (x, y), **CHAIN_ARGS)


def _scenario_crash_data(rank: int, out: str) -> None:
    x, y = shard(_data(DATA_N))
    loss = _FailingLoss(fail_at=5, die=True) if rank == 1 else _FailingLoss(fail_at=10**9, die=True)
    sample_distributed(_model(), loss, (x, y), mode="data", **dict(DATA_ARGS, num_chains=1))


def _scenario_crash_chains_long(rank: int, out: str) -> None:
    """Rank 1 dies at its 5th loss call; rank 0's own chains would take minutes: the heartbeat
    stops it within seconds."""
    x, y = _data()
    loss = _FailingLoss(fail_at=5, die=True) if rank == 1 else _FailingLoss(fail_at=10**9, die=True)
    t0 = time.monotonic()
    try:
        sample_distributed(_model(), loss, (x, y), **dict(CHAIN_ARGS, num_warmup=10**6))
    finally:
        with open(os.path.join(out, "crash_chains_long.seconds"), "w") as f:
            f.write(f"{time.monotonic() - t0:.3f} {loss.calls}")


def _scenario_bad_input(rank: int, out: str) -> None:
    x, y = _data()
    model = _model() if rank == 0 else nn.Linear(3, 1).double()  # the ranks disagree on the model
    sample_distributed(model, "gaussian", shard((x, y)), mode="data", **DATA_ARGS)


def _small_chunks() -> None:
    """Chunks of 64 bytes (2 draws of the 4-weight layer a chunk, the 12-weight one split): many
    chunks per chain to send, and segments of one draw."""
    import pib_bayes.driver.stream
    import pib_bayes.store

    pib_bayes.store.CHUNK_BYTES = pib_bayes.driver.stream.CHUNK_BYTES = 64


def _scenario_store(rank: int, out: str) -> None:
    _small_chunks()
    x, y = _data()
    for dst in (0, 1):  # the store written by rank 0, then by rank 1 (rank 0 sending)
        path = os.path.join(out, f"store_chains_dst{dst}.nc")
        got = sample_distributed(_model(), "gaussian", (x, y), chain_method="sequential", dst=dst, store=path,
                                 **CHAIN_ARGS)
        mem = sample_distributed(_model(), "gaussian", (x, y), chain_method="sequential", dst=dst,
                                 **CHAIN_ARGS)
        if rank == dst:
            assert got.lazy and mem is not None
            mem.save(os.path.join(out, f"store_chains_dst{dst}.memory.nc"))
        elif got is not None:
            raise AssertionError(f"rank {rank} got a Posterior with dst={dst}")
    xs, ys = shard(_data(DATA_N))
    for name, loss, data, kw in (
            ("sequential", "gaussian", (xs, ys), dict(DATA_ARGS, chain_method="sequential")),
            ("one_diverged", _MarkerLoss(), shard(_marked_data()),  # NaN draws after a divergence on rank 1
             dict(DATA_ARGS, num_warmup=0, chain_method="vectorized", init=_two_chain_init()))):
        path = os.path.join(out, f"store_data_{name}.nc")
        got = sample_distributed(_model(), loss, data, mode="data", store=path, **kw)
        mem = sample_distributed(_model(), loss, data, mode="data", **kw)
        if rank == 0:
            assert got.lazy
            mem.save(os.path.join(out, f"store_data_{name}.memory.nc"))


def _scenario_store_locked(rank: int, out: str) -> None:
    """Another writer holds the store on dst (rank 0) when the gather starts: every rank must fail
    with that error (none left waiting to send), and the old file stays as it was."""
    from pib_bayes.io import exclusive_lock

    path = os.path.join(out, "locked_store.nc")
    if rank == 0:
        with open(path, "wb") as f:
            f.write(b"old")
    with exclusive_lock(path, "store") if rank == 0 else contextlib.nullcontext():
        sample_distributed(_model(), "gaussian", _data(), store=path, **CHAIN_ARGS)


STORE_RUN = dict(CHAIN_ARGS, chain_method="sequential", checkpoint_every=6)


def _scenario_store_disk(rank: int, out: str) -> None:
    """No disk space anywhere: every rank refuses before sampling, and dst's refusal also counts
    the store it would gather (chains mode, then data mode)."""
    import shutil

    real = shutil.disk_usage
    shutil.disk_usage = lambda path: shutil._ntuple_diskusage(2**40, 2**40, 0)
    try:
        for mode, data, kw in (("chains", _data(), CHAIN_ARGS), ("data", shard(_data(DATA_N)), DATA_ARGS)):
            try:
                sample_distributed(_model(), "gaussian", data, mode=mode,
                                   store=os.path.join(out, f"disk_{mode}.nc"), **kw)
            except DistributedSamplingError as err:
                with open(os.path.join(out, f"store_disk_{mode}.rank{rank}.txt"), "w") as f:
                    f.write(str(err))
            else:
                raise AssertionError(f"rank {rank}: mode={mode} sampled on a full disk")
    finally:
        shutil.disk_usage = real


def _scenario_fail_store(rank: int, out: str) -> None:
    """Rank 1 raises in its second chain (chain 4) after a few checkpoints; rank 0 finishes."""
    _small_chunks()
    loss = _FailingLoss(fail_at=70) if rank == 1 else _FailingLoss(fail_at=10**9)
    try:
        sample_distributed(_model(), loss, _data(), store=os.path.join(out, "resumed_store.nc"),
                           checkpoint=os.path.join(out, "resumed_store.ckpt"), **STORE_RUN)
    finally:
        with open(os.path.join(out, f"fail_store.left{rank}"), "w") as f:
            json.dump(sorted(n for n in os.listdir(out) if "resumed_store" in n), f)


def _scenario_resume_store(rank: int, out: str) -> None:
    """Resumed: rank 0 (finished) must not evaluate its loss at all, rank 1 continues (its calls
    counted for the test)."""
    _small_chunks()
    loss = _FailingLoss(fail_at=1) if rank == 0 else _FailingLoss(fail_at=10**9)
    try:
        sample_distributed(_model(), loss, _data(), store=os.path.join(out, "resumed_store.nc"),
                           checkpoint=os.path.join(out, "resumed_store.ckpt"), resume=True, **STORE_RUN)
    finally:
        with open(os.path.join(out, f"resume_store.calls{rank}"), "w") as f:
            f.write(str(loss.calls))


def _worker(rank: int, world: int, port: int, scenarios: list[str], out: str) -> None:
    """Run the scenarios one after another in ONE process group (starting processes is what costs):
    after a failing scenario the same group must still work, which the later scenarios check."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for scenario in scenarios:
            try:
                globals()[f"_scenario_{scenario}"](rank, out)
                result = {"ok": True}
            except Exception as err:  # report, do not crash: the tests assert on what each rank saw
                cause = err.__cause__
                result = {"ok": False, "type": type(err).__name__, "message": str(err),
                          "cause": None if cause is None else f"{type(cause).__name__}: {cause}",
                          "traceback": traceback.format_exc()}
            with open(os.path.join(out, f"{scenario}.rank{rank}.json"), "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenarios: list[str], out) -> list[int]:
    """Run the scenarios on 2 ranks; fail (and kill them) if they do not finish by the deadline."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), scenarios, str(out)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    # poll instead of ctx.join(), which terminates the other ranks as soon as one exits non-zero
    while any(p.is_alive() for p in ctx.processes):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"scenarios {scenarios}: the ranks did not finish in {DEADLINE_S} s (hang)")
        time.sleep(0.2)
    return [p.exitcode for p in ctx.processes]


def _results(out, scenario: str) -> list[dict]:
    results = []
    for r in range(WORLD):
        path = os.path.join(out, f"{scenario}.rank{r}.json")
        if not os.path.exists(path):
            pytest.fail(f"scenario {scenario!r}: rank {r} wrote no result (it did not get that far)")
        with open(path) as f:
            results.append(json.load(f))
    return results


SCENARIOS = ["chains", "data", "fail_chains", "fail_data", "resume_data", "bad_input", "store", "fail_store",
             "resume_store", "store_locked", "store_disk"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Every scenario, run once by one 2-rank group; the tests read what the ranks wrote."""
    out = tmp_path_factory.mktemp("dist")
    _launch(SCENARIOS, out)
    return out


def _ok(out, scenario: str) -> None:
    for r, res in enumerate(_results(out, scenario)):
        assert res["ok"], f"rank {r} failed:\n{res.get('traceback')}"


def _assert_same(a: Posterior, b: Posterior, exact: bool, rtol: float = 1e-9, atol: float = 1e-11) -> None:
    assert set(a.draws) == set(b.draws)
    for k in a.draws:
        if exact:
            assert torch.equal(a.draws[k], b.draws[k]), k
        else:
            torch.testing.assert_close(a.draws[k], b.draws[k], rtol=rtol, atol=atol, equal_nan=True)
    for k in ("energy", "loss", "step_size", "diverging"):
        if exact or k == "diverging":
            assert torch.equal(a.sample_stats[k].nan_to_num(0.0), b.sample_stats[k].nan_to_num(0.0)), k
        else:
            torch.testing.assert_close(a.sample_stats[k], b.sample_stats[k], rtol=rtol, atol=atol,
                                       equal_nan=True)
    assert torch.equal(a.diverged, b.diverged) and torch.equal(a.divergence_step, b.divergence_step)


# ----------------------------------------------------------------------------- tests
def test_chain_shares_and_shard_cover_everything_once():
    for k, w in [(5, 2), (4, 4), (1, 3), (7, 3)]:
        shares = chain_shares(k, w)
        assert [c for s in shares for c in s] == list(range(k)) and len(shares) == w
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    x, y = _data(7)
    parts = [shard((x, y), r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and [len(p[1]) for p in parts] == [3, 2, 2]
    with pytest.raises(ValueError, match="rank"):
        shard((x, y), 3, 3)
    with pytest.raises(ValueError, match="world_size"):
        shard((x, y), 0, 0)


def test_needs_a_process_group():
    x, y = _data()
    with pytest.raises(RuntimeError, match="process group"):
        sample_distributed(_model(), "gaussian", (x, y), beta=1.0)


@pytest.fixture
def one_rank():
    """A 1-process gloo group in this process: the bookkeeping without the cost of starting ranks."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_equals_sample_in_both_modes(one_rank):
    x, y = _data(DATA_N)
    for mode in ("chains", "data"):
        ref = sample(_model(), "gaussian", (x, y), **dict(DATA_ARGS, chain_method="sequential"))
        got = sample_distributed(_model(), "gaussian", (x, y), mode=mode, chain_method="sequential",
                                 **DATA_ARGS)
        _assert_same(got, ref, exact=True)  # one shard of weight 1: the same floating-point ops
        assert got.metadata["distributed"]["mode"] == mode and got.metadata["n"] == DATA_N


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mode="both"), ValueError, "mode"),
    (dict(dst=1), ValueError, "dst"),
    (dict(chain_ids=[0]), ValueError, "chain_ids"),
    (dict(store="post.nc", dst=None), ValueError, "dst: with store=, one rank writes the store"),
    (dict(store=b"post.nc"), TypeError, "store: expected a file path"),
    (dict(num_chain=2), TypeError, "num_chain"),
    (dict(beta=None), TypeError, "beta"),
    (dict(num_chains=0), DistributedSamplingError, "num_chains"),
    (dict(mode="data", num_chains=0), DistributedSamplingError, "num_chains"),
    (dict(beta=-1.0), DistributedSamplingError, "rank 0 failed: ValueError: beta"),
    (dict(mode="data", beta=-1.0), DistributedSamplingError, "rank 0 failed: ValueError: beta"),
    (dict(mode="data", sampler="nuts"), DistributedSamplingError, "sampler"),
    (dict(mode="data", chain_method="batched"), DistributedSamplingError, "chain_method"),
])
def test_bad_input_is_one_clear_error(one_rank, kwargs, error, match):
    kw = dict(beta=0.1, num_warmup=2, num_draws=2)
    kw.update(kwargs)
    if kw["beta"] is None:
        del kw["beta"]
    with pytest.raises(error, match=match):
        sample_distributed(_model(), "gaussian", _data(), **kw)


def test_chains_across_ranks_equal_the_single_process_run(run_dir):
    tmp_path = run_dir
    _ok(tmp_path, "chains")
    x, y = _data()
    ref_seq = sample(_model(), "gaussian", (x, y), chain_method="sequential", **CHAIN_ARGS)
    got = Posterior.load(tmp_path / "chains_seq.pt")
    _assert_same(got, ref_seq, exact=True)  # same seeds, same ops: bit-identical
    assert got.metadata["chain_ids"] == list(range(5))
    assert got.metadata["distributed"]["chain_shares"] == [[0, 1, 2], [3, 4]]
    assert got.metadata["distributed"]["backend"] == "gloo"
    ref_vec = sample(_model(), "gaussian", (x, y), chain_method="vectorized", **CHAIN_ARGS)
    for r in range(WORLD):  # dst=None: every rank holds the whole Posterior
        _assert_same(Posterior.load(tmp_path / f"chains_vec.rank{r}.pt"), ref_vec, exact=False)


def test_data_parallel_equals_the_single_process_trajectory(run_dir):
    tmp_path = run_dir
    _ok(tmp_path, "data")
    x, y = _data(DATA_N)
    for sampler in ("sgld", "psgld", "sghmc"):
        kw = dict(DATA_ARGS, sampler=sampler, chain_method="sequential")
        if sampler == "psgld":
            kw["sampler_kwargs"] = {"alpha": 0.9}
        ref = sample(_model(), "gaussian", (x, y), **kw)
        for r in range(WORLD):
            got = Posterior.load(tmp_path / f"data_{sampler}.rank{r}.pt")
            _assert_same(got, ref, exact=False)
            assert got.metadata["distributed"]["shard_sizes"] == [32, 31] and got.metadata["n"] == DATA_N
        # the check can fail: one shard alone (or an unweighted mean) gives another trajectory
        alone = sample(_model(), "gaussian", shard((x, y), 0, WORLD), **kw)
        assert (alone.draws["0.weight"] - ref.draws["0.weight"]).abs().max() > 1e-4
    ref = sample(_model(), "gaussian", (x, y), **dict(DATA_ARGS, chain_method="sequential"))
    _assert_same(Posterior.load(tmp_path / "data_loader.rank0.pt"), ref, exact=False)
    ref_vec = sample(_model(), "gaussian", (x, y), **dict(DATA_ARGS, chain_method="vectorized"))
    vec = Posterior.load(tmp_path / "data_vectorized.rank0.pt")
    _assert_same(vec, ref_vec, exact=False)
    assert vec.metadata["chain_method"] == "vectorized"
    # per-rank minibatches: no single-process twin, but every rank must hold the same weights
    a, b = (Posterior.load(tmp_path / f"data_minibatch.rank{r}.pt") for r in range(WORLD))
    _assert_same(a, b, exact=True)
    assert bool(torch.isfinite(a.draws["0.weight"]).all())


def test_data_parallel_divergence_on_one_shard_stops_every_rank(run_dir):
    # rank 1's shard overflows the loss at the first step, rank 0's does not: no rank may hang
    tmp_path = run_dir
    _ok(tmp_path, "data")
    x, y = _data(DATA_N)
    y = y.clone()
    y[32] = 1e200  # the first example of rank 1's shard
    ref = sample(_model(), "gaussian", (x, y), chain_method="sequential", **dict(DATA_ARGS, num_warmup=0))
    assert bool(ref.diverged.all()) and ref.divergence_step.tolist() == [0, 0]
    for r, method in ((r, m) for r in range(WORLD) for m in ("sequential", "vectorized")):
        got = Posterior.load(tmp_path / f"data_diverged_{method}.rank{r}.pt")
        assert torch.equal(got.diverged, ref.diverged)
        assert torch.equal(got.divergence_step, ref.divergence_step)
        for k in ref.draws:
            assert torch.equal(got.draws[k].isnan(), ref.draws[k].isnan()), k


def test_a_rank_that_raises_stops_every_rank_with_a_clear_error(run_dir):
    for scenario in ("fail_chains", "fail_data"):
        results = _results(run_dir, scenario)
        for r, res in enumerate(results):
            assert not res["ok"], f"{scenario}: rank {r} should have failed"
            assert res["type"] == "DistributedSamplingError", res["traceback"]
            assert "rank 1 failed: ValueError: boom" in res["message"], res["message"]
        # the failing rank keeps its own exception as the cause
        assert results[1]["cause"].startswith("ValueError: boom")


def test_a_failed_data_parallel_run_leaves_checkpoints_that_resume_exactly(run_dir):
    tmp_path = run_dir
    assert all(not res["ok"] for res in _results(tmp_path, "fail_data"))
    # the run failed at step 23 (rank 1's 25th loss call, the first being the check of the model on
    # the data); the checkpoints, written at the start of
    # steps 0, 10, 20, are whole, and the "resume_data" scenario (same group, after the failure)
    # continued from step 20 and ends exactly where the uninterrupted single-process run does
    files = sorted(p.name for p in tmp_path.glob("run.ckpt.*"))
    assert files == [f"run.ckpt.rank{r}-of-2.chain0" for r in range(WORLD)], files
    _ok(tmp_path, "resume_data")
    x, y = _data(DATA_N)
    ref = sample(_model(), "gaussian", (x, y), chain_method="sequential", **dict(DATA_ARGS, num_chains=1))
    _assert_same(Posterior.load(tmp_path / "resumed.pt"), ref, exact=False)


def _assert_bits(a: Posterior, b: Posterior) -> None:
    """Equal bit for bit: draws (NaN where NaN), statistics, flags, metadata."""
    assert list(a.draws) == list(b.draws) and list(a.sample_stats) == list(b.sample_stats)
    for k in a.draws:
        assert torch.equal(a.draws[k].view(torch.int64), b.draws[k].view(torch.int64)), k
    for k in a.sample_stats:
        assert torch.equal(a.sample_stats[k].nan_to_num(7.5), b.sample_stats[k].nan_to_num(7.5)), k
    assert torch.equal(a.diverged, b.diverged) and torch.equal(a.divergence_step, b.divergence_step)
    assert a.metadata == b.metadata


def test_store_streams_each_ranks_draws_into_one_file_equal_to_the_in_memory_run(run_dir):
    _ok(run_dir, "store")
    for name in ("chains_dst0", "chains_dst1", "data_sequential", "data_one_diverged"):
        got = Posterior.load(run_dir / f"store_{name}.nc", lazy=True)
        assert got.lazy
        _assert_bits(got, Posterior.load(run_dir / f"store_{name}.memory.nc"))
    x, y = _data()  # and chain k is chain k of the single-process run
    _assert_bits(Posterior.load(run_dir / "store_chains_dst1.nc"), Posterior.load(
        run_dir / "store_chains_dst0.memory.nc"))
    ref = sample(_model(), "gaussian", (x, y), chain_method="sequential", **CHAIN_ARGS)
    got = Posterior.load(run_dir / "store_chains_dst0.nc")
    for k in ref.draws:
        assert torch.equal(got.draws[k], ref.draws[k]), k
    diverged = Posterior.load(run_dir / "store_data_one_diverged.nc")
    assert diverged.diverged.tolist() == [False, True] and bool(diverged.draws["2.bias"][1].isnan().any())
    # the ranks' own files, segments and locks are gone: the store holds the run
    ours = ("store_chains", "store_data")
    left = sorted(p.name for p in run_dir.iterdir()
                  if p.name.lstrip(".").startswith(ours) and not p.name.endswith(".nc"))
    assert left == [], left


def test_a_full_disk_stops_every_rank_before_sampling_and_dst_counts_the_gathered_store(run_dir):
    _ok(run_dir, "store_disk")
    for mode in ("chains", "data"):
        texts = [(run_dir / f"store_disk_{mode}.rank{r}.txt").read_text() for r in range(WORLD)]
        assert texts[0] == texts[1]  # every rank raises the same DistributedSamplingError
        dst_part, other_part = texts[0].split("; rank 1 failed: ")
        assert "rank 0 failed: ValueError: store: the run would write" in dst_part
        assert "gathered from every rank" in dst_part and "gathered" not in other_part
        assert not list(run_dir.glob(f"disk_{mode}.nc*"))  # nothing written


def test_a_failed_streamed_run_resumes_into_the_store_bit_identically(run_dir):
    assert all(not res["ok"] for res in _results(run_dir, "fail_store"))
    for r in range(WORLD):  # no store; each rank's checkpoint and segments, rank 0's finished file
        left = json.loads((run_dir / f"fail_store.left{r}").read_text())
        assert "resumed_store.nc" not in left and "resumed_store.nc.rank0-of-2" in left, left
        assert {f"resumed_store.ckpt.rank{k}-of-2" for k in range(WORLD)} <= set(left), left
    _ok(run_dir, "resume_store")
    calls = [int((run_dir / f"resume_store.calls{r}").read_text()) for r in range(WORLD)]
    x, y = _data()
    counting = _FailingLoss(fail_at=10**9)
    sample(_model(), counting, (x, y), chain_ids=[3, 4], **dict(STORE_RUN, checkpoint_every=100))
    assert calls[0] == 0 and 0 < calls[1] < counting.calls - 60  # rank 1 resumed in chain 4, not restarted
    ref = sample(_model(), "gaussian", (x, y), **dict(STORE_RUN, checkpoint_every=100))
    got = Posterior.load(run_dir / "resumed_store.nc", lazy=True)
    for k in ref.draws:
        assert torch.equal(got.draws[k], ref.draws[k]), k
    for k in ref.sample_stats:
        assert torch.equal(got.sample_stats[k], ref.sample_stats[k]), k
    assert sorted(p.name for p in run_dir.iterdir() if "resumed_store" in p.name) == ["resumed_store.nc"]


def test_a_failed_gather_into_the_store_stops_every_rank_and_keeps_the_old_file(run_dir):
    for res in _results(run_dir, "store_locked"):
        assert not res["ok"] and res["type"] == "DistributedSamplingError", res
        assert "rank 0 failed: LockedError: store:" in res["message"], res["message"]
    assert (run_dir / "locked_store.nc").read_bytes() == b"old"


def test_ranks_with_different_models_fail_on_every_rank(run_dir):
    results = _results(run_dir, "bad_input")
    for res in results:
        assert not res["ok"] and "different trainable parameters" in res["message"], res


@pytest.mark.parametrize("mode", ["chains", "data"])
def test_a_rank_that_dies_makes_the_others_fail_not_hang(tmp_path, mode):
    # a process that exits without raising cannot report; gloo sees the closed connection
    t0 = time.monotonic()
    codes = _launch([f"crash_{mode}"], tmp_path)
    assert codes[1] == 3 and codes[0] == 0, codes
    with open(tmp_path / f"crash_{mode}.rank0.json") as f:
        res = json.load(f)
    assert res["type"] == "DistributedSamplingError" and "collective failed" in res["message"], res
    assert time.monotonic() - t0 < 60  # well inside the 60 s process-group timeout


def test_a_rank_that_dies_mid_run_stops_the_chains_of_the_others_within_seconds(tmp_path):
    """mode="chains" exchanges nothing while sampling; the heartbeat (every 1 s) notices the dead
    peer, so rank 0 stops its 10^6-step chains instead of finishing them first."""
    codes = _launch(["crash_chains_long"], tmp_path)
    assert codes[1] == 3 and codes[0] == 0, codes
    with open(tmp_path / "crash_chains_long.rank0.json") as f:
        res = json.load(f)
    assert res["type"] == "DistributedSamplingError" and "heartbeat collective failed" in res["message"], res
    seconds, calls = (tmp_path / "crash_chains_long.seconds").read_text().split()
    assert float(seconds) < 15 and int(calls) < 10**6, (seconds, calls)


def test_data_parallel_one_chain_diverges_on_one_shard_the_other_goes_on(run_dir):
    _ok(run_dir, "data")
    ref = sample(_model(), _MarkerLoss(), _marked_data(), chain_method="vectorized", init=_two_chain_init(),
                 **dict(DATA_ARGS, num_warmup=0))
    assert ref.diverged.tolist() == [False, True] and ref.divergence_step.tolist() == [-1, 0]
    _assert_same(Posterior.load(run_dir / "data_one_diverged.rank0.pt"), ref, exact=False)


# ----------------------------------------------------------------------------- start-up (issue 19)
def _startup_worker(rank: int, world: int, port: int, how: str, out: str) -> None:
    """Rank 1 dies during start-up: before joining (``never``) or after joining, before the
    handshake (``joined``); rank 0 starts with pib_bayes's bounded timeout and reports."""
    import torch.distributed as dist

    from pib_bayes.distributed import start_process_group

    init = f"tcp://127.0.0.1:{port}"
    if rank == 1:
        if how == "joined":
            dist.init_process_group("gloo", init_method=init, rank=1, world_size=world,
                                    timeout=datetime.timedelta(seconds=3))
        os._exit(3)
    t0 = time.monotonic()
    os.environ["PIB_DIST_TIMEOUT"] = "3"
    try:
        start_process_group("gloo", init_method=init, rank=0, world_size=world)
        result = {"ok": True}
    except Exception as err:
        result = {"ok": False, "type": type(err).__name__, "message": str(err)}
    result["seconds"] = time.monotonic() - t0
    with open(os.path.join(out, f"startup_{how}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.parametrize("how", ["never", "joined"])
def test_a_rank_killed_during_start_up_fails_the_others_within_the_timeout(tmp_path, how):
    import torch.multiprocessing as mp

    t0 = time.monotonic()
    ctx = mp.start_processes(_startup_worker, args=(WORLD, _free_port(), how, str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")
    while any(p.is_alive() for p in ctx.processes):
        if time.monotonic() - t0 > 60:
            for p in ctx.processes:
                p.kill()
            pytest.fail("rank 0 did not give up within 60 s of a 3 s timeout")
        time.sleep(0.1)
    with open(tmp_path / f"startup_{how}.json") as f:
        res = json.load(f)
    assert not res["ok"] and res["type"] == "DistributedSamplingError", res
    assert res["seconds"] < 20, res  # the 3 s bound (plus connection retries), not torch's 30 minutes
    assert ("did not start within 3 s" in res["message"]) if how == "never" else (
        "start-up handshake" in res["message"]), res


def test_collective_timeout_sources(monkeypatch):
    from pib_bayes.distributed import DEFAULT_TIMEOUT_S, collective_timeout

    monkeypatch.delenv("PIB_DIST_TIMEOUT", raising=False)
    assert collective_timeout().total_seconds() == DEFAULT_TIMEOUT_S == 300
    monkeypatch.setenv("PIB_DIST_TIMEOUT", "12.5")
    assert collective_timeout().total_seconds() == 12.5
    assert collective_timeout(datetime.timedelta(minutes=2)).total_seconds() == 120
    for bad in ("soon", "-1", "nan", "0"):
        monkeypatch.setenv("PIB_DIST_TIMEOUT", bad)
        with pytest.raises(ValueError, match="PIB_DIST_TIMEOUT"):
            collective_timeout()
    with pytest.raises(ValueError, match="timeout"):
        collective_timeout(-3)
