"""Test-session settings shared by tests/ and the doctests in pib_bayes/.

One torch thread for every test: the tests are small, and on a shared, loaded machine a second OpenMP
thread spin-waits for a core (a 6 s how-to page took over 8 minutes that way). A test that needs more
threads sets them; the count is put back to one before the next test.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
