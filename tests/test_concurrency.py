"""Two writers of one path: the second is refused at once (LockedError), nothing is corrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import pib_bayes as pb
from pib_bayes.io import LockedError, exclusive_lock, lock_path

RUN = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import pib_bayes as pb
    torch.set_num_threads(1)
    ckpt, steps = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    x, y = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(64, 1)
    first = [True]
    def loss(out, target):  # announces that the run has begun (it holds the lock by then)
        if first[0]:
            print("SAMPLING", flush=True)
            first[0] = False
        return ((out - target) ** 2).sum(-1)
    pb.sample(nn.Linear(2, 1), loss, (x, y), beta=0.1, num_warmup=steps, num_draws=5, seed=0,
              task="regression", checkpoint=ckpt, checkpoint_every=50, resume=True)
    print("DONE", flush=True)
""")


def _start(tmp_path, ckpt, steps):
    script = tmp_path / "run.py"
    script.write_text(RUN)
    return subprocess.Popen([sys.executable, str(script), str(ckpt), str(steps)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_second_run_on_the_same_checkpoint_fails_fast_and_a_killed_holder_frees_it(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    first = _start(tmp_path, ckpt, 10**7)  # samples until killed
    try:
        assert first.stdout.readline().strip() == "SAMPLING"
        second = _start(tmp_path, ckpt, 10)
        out, err = second.communicate(timeout=120)
        assert second.returncode != 0 and "DONE" not in out
        assert "LockedError: checkpoint:" in err and "being written by another writer" in err
        assert f".{first.pid} holds" in err  # the holder is named (host.pid)
        assert first.poll() is None  # the first run was not disturbed
    finally:
        os.kill(first.pid, signal.SIGKILL)  # a crash: the OS drops the lock
        first.wait(timeout=60)
    third = _start(tmp_path, ckpt.with_name("other.ckpt"), 10)
    assert third.communicate(timeout=120)[0].strip().endswith("DONE")
    with exclusive_lock(ckpt, "checkpoint"):  # free again after the kill
        pass


def test_save_while_another_writer_holds_the_path_is_refused_and_leaves_the_file_whole(tmp_path):
    x, y = torch.randn(20, 2), torch.randn(20, 1)
    post = pb.sample(nn.Linear(2, 1), "gaussian", (x, y), beta=0.1, num_warmup=2, num_draws=3)
    path = tmp_path / "post.pib"
    post.save(path)
    before = path.read_bytes()
    with exclusive_lock(path):
        with pytest.raises(LockedError, match=r"path: .*post\.pib.*being written by another writer"):
            post.save(path)
    assert path.read_bytes() == before
    assert lock_path(path).name == ".post.pib.lock"
    assert not lock_path(path).exists()  # removed by its holder on release
    post.save(path)  # released
    assert not lock_path(path).exists()


SAVER = textwrap.dedent("""
    import sys, torch
    import pib_bayes as pb
    from pib_bayes.io import LockedError
    path, tag = sys.argv[1], float(sys.argv[2])
    post = pb.Posterior({"w": torch.full((2, 50, 1000), tag)}, {}, {"task": "regression"})
    saved = refused = 0
    for _ in range(40):
        try:
            post.save(path)
            saved += 1
        except LockedError:
            refused += 1
    print(saved, refused, flush=True)
""")


def test_two_processes_saving_one_path_never_corrupt_it(tmp_path):
    """The issue's failure: two processes saving to one path raised FileNotFoundError on each
    other's temporary files. Now each save either completes or is refused with LockedError."""
    script = tmp_path / "save.py"
    script.write_text(SAVER)
    path = tmp_path / "post.pib"
    procs = [subprocess.Popen([sys.executable, str(script), str(path), str(tag)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for tag in (1.0, 2.0)]
    results = [p.communicate(timeout=300) for p in procs]
    total_saved = 0
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err  # no error but LockedError (counted, not raised, by the script)
        saved, refused = map(int, out.split())
        assert saved + refused == 40
        total_saved += saved
    assert total_saved >= 1
    w = pb.Posterior.load(path).draws["w"]
    assert w.shape == (2, 50, 1000) and float(w.min()) == float(w.max()) in (1.0, 2.0)  # one writer's whole
    assert not [q.name for q in tmp_path.iterdir() if q.name.endswith(".tmp")]
