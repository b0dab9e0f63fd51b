"""Checkpoint and resume: a run killed at any moment and resumed gives bit-identical draws."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from crash_helpers import Crash, crashing_stat, kill_after_ready, start_run_child
from torch import nn

import pib_bayes as pb
from pib_bayes.io import FormatError


def _child(tmp_path, out, ckpt=None):
    return start_run_child(tmp_path, out, ckpt=ckpt)


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    ref = _child(tmp_path, tmp_path / "ref.pib")
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    ckpt = tmp_path / "run.ckpt"
    rng = np.random.default_rng(0)  # kill times: a fixed, unexamined stream, not a tuned seed
    kills = 0
    for _ in range(4):
        proc = _child(tmp_path, tmp_path / "resumed.pib", ckpt)
        kills += kill_after_ready(proc, float(rng.uniform(0.2, 1.5)))
        if ckpt.exists():  # whatever moment the kill hit, the checkpoint on disk is whole
            pb.io.load_payload(ckpt, "checkpoint", (pb.driver.checkpoint.CHECKPOINT_VERSION,))
    assert kills >= 1
    final = _child(tmp_path, tmp_path / "resumed.pib", ckpt)
    assert final.wait(timeout=300) == 0, final.stderr.read()
    # temporary files of writes cut short by a kill are swept by the next write
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    a, b = pb.Posterior.load(tmp_path / "ref.pib"), pb.Posterior.load(tmp_path / "resumed.pib")
    for k in a.draws:
        assert torch.equal(a.draws[k], b.draws[k]), k
    for k in a.sample_stats:
        assert torch.equal(a.sample_stats[k], b.sample_stats[k]), k
        assert not a.sample_stats[k].isnan().any(), k


def _run(tmp_path, ckpt=None, crash_after=None, method="sequential", resume=False, prefetch=False):
    crash = crashing_stat(crash_after)
    torch.manual_seed(0)
    x, y = pb.data.make_classification_data(n=128, num_classes=3, seed=2)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    return pb.sample(model, "cross_entropy", (x, y), beta=1 / 128, step_size=1e-3, sampler="psgld",
                     num_chains=3, num_warmup=20, num_draws=25, thin=3, batch_size=16, seed=3,
                     chain_method=method, stat_fns={"w0": crash}, checkpoint=ckpt, checkpoint_every=4,
                     resume=resume, prefetch_noise=prefetch)


@pytest.mark.parametrize("method", ["sequential", "vectorized"])
@pytest.mark.parametrize("crash_after", [1, 30, 52])
def test_crash_and_resume_in_process(tmp_path, method, crash_after):
    ref = _run(tmp_path, method=method)
    ckpt = tmp_path / "c.ckpt"
    with pytest.raises(Crash):
        _run(tmp_path, ckpt, crash_after=crash_after, method=method)
    resumed = _run(tmp_path, ckpt, method=method, resume=True)
    for k in ref.draws:
        assert torch.equal(ref.draws[k], resumed.draws[k])
    for k in ref.sample_stats:
        assert torch.equal(ref.sample_stats[k], resumed.sample_stats[k]), k
    # resuming a finished run returns the same posterior without sampling again
    again = _run(tmp_path, ckpt, method=method, resume=True, crash_after=0)
    assert torch.equal(again.draws["0.weight"], ref.draws["0.weight"])


@pytest.mark.parametrize("method", ["sequential", "vectorized"])
@pytest.mark.parametrize("resume_prefetch", [True, False])
def test_crash_and_resume_with_prefetched_noise(tmp_path, method, resume_prefetch):
    """With prefetch_noise the checkpoints hold the generators' synchronous states (not the ones
    a pending draw has advanced), so a crashed prefetching run resumes, with or without prefetch,
    to the draws of a run that never prefetched."""
    ref = _run(tmp_path, method=method)
    ckpt = tmp_path / "c.ckpt"
    with pytest.raises(Crash):
        _run(tmp_path, ckpt, crash_after=30, method=method, prefetch=True)
    resumed = _run(tmp_path, ckpt, method=method, resume=True, prefetch=resume_prefetch)
    for k in ref.draws:
        assert torch.equal(ref.draws[k], resumed.draws[k])
    for k in ref.sample_stats:
        assert torch.equal(ref.sample_stats[k], resumed.sample_stats[k]), k


def test_checkpointing_does_not_change_the_draws(tmp_path):
    ref = _run(tmp_path)
    with_ckpt = _run(tmp_path, tmp_path / "c.ckpt")
    assert torch.equal(ref.draws["2.weight"], with_ckpt.draws["2.weight"])


def test_resume_with_other_settings_is_refused(tmp_path):
    ckpt = tmp_path / "c.ckpt"
    x, y = torch.randn(20, 2), torch.randn(20, 1)
    pb.sample(nn.Linear(2, 1), "gaussian", (x, y), beta=0.1, num_warmup=5, num_draws=5, checkpoint=ckpt)
    with pytest.raises(ValueError, match=r"resume:.*beta"):
        pb.sample(nn.Linear(2, 1), "gaussian", (x, y), beta=0.2, num_warmup=5, num_draws=5, checkpoint=ckpt,
                  resume=True)
    with pytest.raises(ValueError, match="resume"):
        pb.sample(nn.Linear(2, 1), "gaussian", (x, y), beta=0.2, num_warmup=5, num_draws=5, resume=True)
    with pytest.raises(ValueError, match="checkpoint_every"):
        pb.sample(nn.Linear(2, 1), "gaussian", (x, y), beta=0.2, num_draws=5, checkpoint=ckpt,
                  checkpoint_every=0)


def test_corrupt_or_truncated_checkpoint_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "c.ckpt"
    x, y = torch.randn(20, 2), torch.randn(20, 1)
    kw = dict(beta=0.1, num_warmup=5, num_draws=5, checkpoint=ckpt)
    pb.sample(nn.Linear(2, 1), "gaussian", (x, y), **kw)
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FormatError, match="truncated or corrupt"):
        pb.sample(nn.Linear(2, 1), "gaussian", (x, y), resume=True, **kw)
    flipped = bytearray(raw)
    flipped[-10] ^= 0xFF
    ckpt.write_bytes(bytes(flipped))
    with pytest.raises(FormatError):
        pb.sample(nn.Linear(2, 1), "gaussian", (x, y), resume=True, **kw)


def _small_run(ckpt, x, y, seed_model=0, resume=False, loss=None, **kw):
    torch.manual_seed(seed_model)
    model = nn.Linear(2, 1)
    return pb.sample(model, loss or "gaussian", (x, y), beta=0.1, num_warmup=5, num_draws=5, num_chains=2,
                     checkpoint=ckpt, checkpoint_every=2, resume=resume, seed=1,
                     **({"task": "regression"} if loss is not None else {}), **kw)


def _interrupt(ckpt, x, y, seed_model=0):
    """A run stopped by a crash after a few steps, its checkpoint mid-run."""
    def crash(params):
        raise Crash
    with pytest.raises(Crash):
        _small_run(ckpt, x, y, seed_model, stat_fns={"boom": crash})


def test_resume_of_a_finished_run_returns_it_without_evaluating_the_loss(tmp_path):
    ckpt = tmp_path / "c.ckpt"
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 2, generator=g), torch.randn(20, 1, generator=g)
    calls = {"n": 0}

    def loss(out, target):
        calls["n"] += 1
        return ((out - target) ** 2).sum(-1)

    first = _small_run(ckpt, x, y, loss=loss)
    assert calls["n"] > 0
    calls["n"] = 0
    again = _small_run(ckpt, x, y, loss=loss, resume=True)
    assert calls["n"] == 0
    assert again.metadata == first.metadata
    for k in first.draws:
        assert torch.equal(first.draws[k], again.draws[k])
    for k in first.sample_stats:
        assert torch.equal(first.sample_stats[k], again.sample_stats[k])
    assert torch.equal(first.diverged, again.diverged)


def test_checkpoint_older_than_the_data_check_is_refused(tmp_path):
    """Decision: a checkpoint without the data/initial-weights fingerprint cannot be verified, so
    resuming it is refused with an error that says so (never resumed silently)."""
    ckpt = tmp_path / "c.ckpt"
    x, y = torch.randn(20, 2), torch.randn(20, 1)
    _interrupt(ckpt, x, y)
    saved = pb.io.load_payload(ckpt, "checkpoint", (pb.driver.checkpoint.CHECKPOINT_VERSION,))
    old = {k: v for k, v in saved.items() if k != "setup"}
    fp = json.loads(old["fingerprint"])
    old["fingerprint"] = json.dumps({k: v for k, v in fp.items() if k not in ("data", "initial_weights")},
                                    sort_keys=True)
    pb.io.save_payload(ckpt, "checkpoint", pb.driver.checkpoint.CHECKPOINT_VERSION, old)
    with pytest.raises(ValueError, match="predates the check"):
        _small_run(ckpt, x, y, resume=True)


def test_data_fingerprint_hashes_a_fixed_sample_of_rows_of_big_data():
    from pib_bayes.driver import ROWS_HASHED, data_fingerprint

    n = 3 * ROWS_HASHED
    x, y = torch.arange(2.0 * n).reshape(n, 2), torch.zeros(n, dtype=torch.long)
    base = data_fingerprint((x, y))
    assert data_fingerprint((x.clone(), y.clone())) == base
    hashed = x.clone()
    hashed[n - 1, 0] += 1  # the last row is always among the hashed ones
    assert data_fingerprint((hashed, y)) != base
    assert data_fingerprint((x.double(), y)) != base  # dtypes count
    assert data_fingerprint((x[:-1], y[:-1])) != base  # and the length
    small = x[:10]
    for i in range(10):  # data up to ROWS_HASHED rows: every row is hashed
        changed = small.clone()
        changed[i, 1] = -1.0
        assert data_fingerprint((changed, y[:10])) != data_fingerprint((small, y[:10]))


@pytest.mark.parametrize("change,named", [
    ({"sampler": "psgld"}, r"sampler, sampler settings \(sampler_kwargs\)"),
    ({"step_size": 2e-4}, r"schedule \(step_size\)"),
    ({"prior": 0.5}, r"prior"),
    ({"data": "one target"}, r"data"),  # one value of y changed: the data digest, not only shapes
    ({"data": "one example fewer"}, r"data, data \(number of examples\)"),
    ({"seed_model": 1}, r"initial weights"),
])
@pytest.mark.parametrize("finished", [False, True])
def test_resume_of_a_run_differing_in_one_metadata_field_is_refused_naming_it(tmp_path, change, named,
                                                                              finished):
    """The fingerprint is derived from the run's metadata (and the data / initial-weight digests): a
    checkpoint of a run that differs in one field is refused, the field named alone (the data and
    the initial weights by their digests: one changed target is enough)."""
    ckpt = tmp_path / "c.ckpt"
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 2, generator=g), torch.randn(20, 1, generator=g)
    if finished:
        _small_run(ckpt, x, y)
    else:
        _interrupt(ckpt, x, y)
    kw = {k: v for k, v in change.items() if k not in ("data", "seed_model")}
    x2, y2 = x, y.clone()
    if change.get("data") == "one target":
        y2[7, 0] += 1.0
    elif change.get("data") == "one example fewer":
        x2, y2 = x[:19], y[:19]
    with pytest.raises(ValueError, match=rf"^resume: .*different run \({named} differ\)"):
        _small_run(ckpt, x2, y2, seed_model=change.get("seed_model", 0), resume=True, **kw)
    resumed = _small_run(ckpt, x, y, resume=True)  # the same run resumes
    assert torch.equal(resumed.draws["weight"], _small_run(None, x, y).draws["weight"])


def test_the_fingerprint_is_the_metadata_less_what_does_not_identify_a_run(tmp_path):
    from pib_bayes.driver.checkpoint import NOT_IDENTIFYING, run_fingerprint

    ckpt = tmp_path / "c.ckpt"
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 2, generator=g), torch.randn(20, 1, generator=g)
    post = _small_run(ckpt, x, y)
    saved = pb.io.load_payload(ckpt, "checkpoint", (pb.driver.checkpoint.CHECKPOINT_VERSION,))
    fp = json.loads(saved["fingerprint"])
    hashes = {k: fp[k] for k in ("data", "initial_weights")}
    assert saved["fingerprint"] == run_fingerprint(post.metadata, hashes)
    assert set(fp) == set(post.metadata) - set(NOT_IDENTIFYING) | set(hashes)
    # the would-catch twin: a metadata field changed after the fact no longer matches
    assert saved["fingerprint"] != run_fingerprint({**post.metadata, "thin": 2}, hashes)


def test_an_older_checkpoint_version_is_refused_with_one_error_naming_checkpoint(tmp_path):
    """Decision: version-1/2 checkpoints are refused (not resumed): their fingerprints were built
    beside the metadata, and recomputing them would keep that second description of a run alive.
    tests/data/checkpoint_v2.ckpt is a mid-run checkpoint of _small_run written by pib_bayes main
    14eb777 (checkpoint version 2)."""
    ckpt = tmp_path / "c.ckpt"
    ckpt.write_bytes((Path(__file__).parent / "data" / "checkpoint_v2.ckpt").read_bytes())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 2, generator=g), torch.randn(20, 1, generator=g)
    with pytest.raises(ValueError, match=r"^checkpoint: .* older pib_bayes \(version 1 or 2.*resume=False"):
        _small_run(ckpt, x, y, resume=True)
    fresh = _small_run(ckpt, x, y)  # resume=False starts over, and writes a version-3 checkpoint
    assert torch.equal(fresh.draws["weight"], _small_run(None, x, y).draws["weight"])
    # the would-catch twin: the same run's current-version checkpoint resumes
    assert torch.equal(_small_run(ckpt, x, y, resume=True).draws["weight"], fresh.draws["weight"])


def _collected_steps(schedule, num_warmup, num_draws, thin):
    """The steps t whose draws a run keeps, from the schedule alone: every thin-th collected step after
    warm-up (what the one step counter must give)."""
    steps, t, collected = [], 0, 0
    while len(steps) < num_draws:
        if t >= num_warmup and schedule.collect(t):
            if collected % thin == 0:
                steps.append(t)
            collected += 1
        t += 1
    return steps


@pytest.mark.parametrize("num_chains", [1, 2])
def test_the_group_step_count_is_what_the_schedule_the_recorded_step_size_and_a_resume_see(tmp_path,
                                                                                            num_chains):
    """One step counter per chain group (its sampler state's step count): the recorded step size of
    every kept draw is h_t at the step the schedule collects it, in an uninterrupted run and in one
    resumed mid-cycle from a checkpoint (the thinning count is derived from t, not kept apart)."""
    from crash_helpers import Crash, crashing_stat

    schedule = pb.samplers.Cyclical(0.01, cycle_length=6, exploration_fraction=0.5)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 2, generator=g), torch.randn(20, 1, generator=g)
    ckpt = tmp_path / "c.ckpt"

    def run(resume=False, crash=None, path=ckpt):
        torch.manual_seed(0)
        return pb.sample(nn.Linear(2, 1), "gaussian", (x, y), beta=0.1, step_size=schedule, num_warmup=4,
                         num_draws=6, thin=2, num_chains=num_chains, seed=1, checkpoint=path,
                         checkpoint_every=5, resume=resume, stat_fns={"w": crashing_stat(crash, "weight")})

    expected = [schedule.step_size(t) for t in _collected_steps(schedule, 4, 6, 2)]
    assert len(set(expected)) > 2  # the steps' sizes differ: a step count off by one shows
    ref = run(path=None)
    assert ref.sample_stats["step_size"].tolist() == [expected] * num_chains
    with pytest.raises(Crash):
        run(crash=2 * num_chains)  # killed at its 3rd kept draw (step 11), its last checkpoint at step 10
    resumed = run(resume=True)
    assert resumed.sample_stats["step_size"].tolist() == [expected] * num_chains
    assert torch.equal(resumed.draws["weight"], ref.draws["weight"])
    # the would-catch twin: a resume whose step counter restarted at 0 (as a second counter that the
    # checkpoint did not restore would) records other step sizes
    with pytest.raises(Crash):
        run(crash=2 * num_chains)
    saved = pb.io.load_payload(ckpt, "checkpoint", (pb.driver.checkpoint.CHECKPOINT_VERSION,))
    assert saved["group_state"]["t"] == 10
    saved["group_state"]["t"] = 0
    pb.io.save_payload(ckpt, "checkpoint", pb.driver.checkpoint.CHECKPOINT_VERSION, saved)
    assert run(resume=True).sample_stats["step_size"].tolist() != [expected] * num_chains
