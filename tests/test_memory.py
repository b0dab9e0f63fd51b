"""Memory stays flat over long runs: it grows with kept draws only, never with steps."""

from __future__ import annotations

import os

import torch
from torch import nn

import pib_bayes as pb


def _rss_bytes() -> float:
    with open("/proc/self/statm") as fh:
        return float(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_1e5_step_sgld_run_keeps_resident_memory_flat():
    torch.manual_seed(0)
    x, y = torch.randn(16, 2), torch.randn(16, 1)
    # RSS is recorded at every kept draw (every 1000 steps) through the stat_fns hook
    post = pb.sample(nn.Linear(2, 1), "gaussian", (x, y), beta=1 / 16, step_size=1e-3, num_warmup=0,
                     num_draws=100, thin=1000, stat_fns={"rss": lambda params: _rss_bytes()})
    rss = post.sample_stats["rss"][0]
    assert torch.isfinite(rss).all()
    growth = float(rss[-1] - rss[10])  # after start-up allocations settle
    # 90,000 steps: a leak of ~100 bytes per step would show as 9 MB
    assert growth < 8e6, f"resident memory grew by {growth / 1e6:.1f} MB over 9e4 steps"
