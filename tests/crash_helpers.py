"""A run killed part-way, for the crash-and-resume tests: a statistic that raises between two steps,
and a child process that a test can SIGKILL at any moment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

CHILD_RUN = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import pib_bayes as pb
    import pib_bayes.store, pib_bayes.driver.stream
    out, store, ckpt, chunk = sys.argv[1:5]
    store, ckpt = (None if store == "-" else store), (None if ckpt == "-" else ckpt)
    if chunk != "-":  # smaller chunks: a segment every few draws
        pib_bayes.store.CHUNK_BYTES = pib_bayes.driver.stream.CHUNK_BYTES = int(chunk)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = pb.data.make_classification_data(n=256, num_classes=3, seed=1)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    print("READY", flush=True)
    post = pb.sample(model, "cross_entropy", (x, y), beta=1 / 256, step_size=1e-3, sampler="sghmc",
                     num_chains=3, num_warmup=300, num_draws=150, thin=4, batch_size=32, seed=7,
                     checkpoint=ckpt, checkpoint_every=5, resume=ckpt is not None, store=store)
    post.save(out)
""")


def start_run_child(tmp_path: Path, out: Path, *, store: Path | None = None, ckpt: Path | None = None,
                    chunk_bytes: int | None = None) -> subprocess.Popen:
    """Start :data:`CHILD_RUN` (3 SGHMC chains, checkpoint every 5 steps when ``ckpt`` is given, draws
    streamed to ``store`` when given, saved to ``out`` at the end); it prints READY before sampling."""
    script = tmp_path / "run.py"
    script.write_text(CHILD_RUN)
    args = [out, store or "-", ckpt or "-", "-" if chunk_bytes is None else chunk_bytes]
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_after_ready(proc: subprocess.Popen, delay: float) -> bool:
    """Wait for the child's READY line, then SIGKILL it ``delay`` seconds later unless it has already
    finished, and reap it; True if the kill hit a running run."""
    assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return killed


class Crash(Exception):
    """Raised by :func:`crashing_stat`'s statistic to stop a run in the middle."""


def crashing_stat(kept: int | None, name: str = "0.weight") -> Callable[[dict[str, Tensor]], Tensor]:
    """A ``stat_fns`` entry returning ``params[name].sum()`` that raises :class:`Crash` from call
    ``kept + 1`` on (one call per chain and kept draw); ``None`` never raises."""
    calls = {"n": 0}

    def stat(params: dict[str, Tensor]) -> Tensor:
        calls["n"] += 1
        if kept is not None and calls["n"] > kept:
            raise Crash
        return params[name].sum()

    return stat
