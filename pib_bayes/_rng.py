"""torch's global RNG, seeded for a block and then handed back untouched (the package's library code
never reseeds the caller's global RNG)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Inside the block torch's global RNG is seeded with ``seed`` (what ``torch.manual_seed(seed)``
    does for the CPU generator and for every CUDA device already in use); afterwards the caller's
    states are restored (``torch.random.fork_rng``), whatever the block drew.

    For code that draws from the global RNG and takes no generator: ``nn.Module`` initialisers
    (``nn.Linear.reset_parameters``), user factories, dropout masks.

    >>> import torch
    >>> before = torch.get_rng_state()
    >>> with seeded_global_rng(0):
    ...     a = torch.randn(2)
    >>> with seeded_global_rng(0):
    ...     b = torch.randn(2)
    >>> torch.equal(a, b), torch.equal(torch.get_rng_state(), before)
    (True, True)
    """
    # only devices already initialised: torch.manual_seed would queue a seed for a CUDA device that is
    # not, applied when the caller first uses it, after this block
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(seed)
        yield
