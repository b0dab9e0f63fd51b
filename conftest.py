"""Test-session settings shared by tests/ and the doctests in pib_bayes/.

One torch thread: the tests are small, and on a shared, loaded machine a second OpenMP thread spin-waits
for a core (a 6 s how-to page took over 8 minutes that way). Tests that need more threads set them.
"""

import torch

torch.set_num_threads(1)
