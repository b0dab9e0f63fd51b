"""``pib_bayes.sample``: run Langevin chains on the PIB energy and return a :class:`Posterior`.

Chains are independent: chain k has its own noise generator and its own data-order generator,
both derived from ``seed`` with ``numpy.random.SeedSequence(seed).spawn``. ``num_chains`` chains
run either *vectorized* (one batched computation, ``torch.func.vmap`` over the stacked weights)
or *sequentially* (one after another); since each chain only ever touches its own streams, both
give the same draws to float tolerance, and a chain gives the same draws as when run alone.

Layout: :mod:`.run` (``sample``: checks the arguments, plans the chain groups, runs them, builds the
Posterior), :mod:`.checks` (input checks before any chain runs), :mod:`.chains` (chain groups and the
energy/gradient of a step), :mod:`.warmup` (automatic step size, noise report, control-variate centre),
:mod:`.recorder` (the step loop and the kept draws), :mod:`.checkpoint` (fingerprints, save, resume).
"""

from .chains import chain_seeds
from .checkpoint import ROWS_HASHED, data_fingerprint, tensor_fingerprint
from .run import sample

__all__ = ["sample", "chain_seeds", "ROWS_HASHED", "data_fingerprint", "tensor_fingerprint"]
