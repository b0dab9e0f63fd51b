"""Sampling across processes and machines with ``torch.distributed`` (gloo on CPU, nccl on GPU).

Two ways to spread a run over the ranks of an initialised process group (e.g. one started by
``torchrun``; see docs/distributed.md for the launch lines):

``mode="chains"`` (chain parallelism)
    The ``num_chains`` chains are split into contiguous blocks, one per rank
    (:func:`chain_shares`); each rank runs its block with ``pib_bayes.sample(..., chain_ids=block)``,
    so chain k keeps the seeds of chain k of the single-process run (:func:`~pib_bayes.chain_seeds`)
    and the draws do not depend on the number of ranks. Nothing but a liveness heartbeat is
    communicated while sampling; at the end the per-rank posteriors are gathered (as bytes,
    never pickled) into one :class:`~pib_bayes.Posterior` on ``dst``. Every rank holds the full
    data.

``mode="data"`` (data parallelism, for data that do not fit one worker)
    ``data`` is this rank's shard (:func:`shard`). Every rank runs the *same* chains from the same
    seeds; at every step the gradient of the energy is all-reduced so that every rank moves with
    the gradient of the whole data set (below), and the Gaussian noise xi is drawn from the chain's
    own noise seed on every rank, i.e. the same numbers, so every rank holds identical weights.
    The update rule is the kernel's own (the all-reduce wraps it, it does not replace it); for SGLD

        w <- w - h * g + sqrt(2 h) * xi,     g = sum_r (n_r / n) * grad U_{S_r}(w),

    where S_r is rank r's shard of n_r examples, n = sum_r n_r, and
    U_{S_r}(w) = mean_{i in S_r} l_i(w)/beta - log p(w). Since L_S = sum_r (n_r/n) L_{S_r} and the
    weights n_r/n sum to one, g = grad U_S(w) exactly: the shards may have unequal sizes, and with
    full batches the trajectory is the single-process one to float tolerance. With ``batch_size``
    each rank draws its own minibatch of ``batch_size`` examples from its shard; the same weighting
    then gives an unbiased estimate of grad U_S (a stratified minibatch of ``world_size * batch_size``
    examples when the shards are equal). What is all-reduced, per step and chain: the weighted
    gradient (one flat buffer of D numbers, D = number of sampled weights) plus three status
    numbers (this rank's weights are non-finite, this rank has finished, this rank has failed),
    which keep every rank on the same step and let a failure or divergence on one rank stop all
    of them instead of leaving the others waiting. The recorded ``energy`` and ``loss`` statistics
    are the weighted averages over the shards, i.e. full-data values. With
    ``chain_method="vectorized"`` all chains step together (one all-reduce of K x D numbers per
    step); otherwise the chains run one after another, each on all ranks.

A rank that raises makes every rank raise :class:`DistributedSamplingError` naming the failing
rank and its error (the failing rank's own exception is chained); no rank is left waiting. A rank
that dies without raising (killed, out of memory) makes the others fail in the next collective,
either at once (gloo sees the closed connection) or after the process group's ``timeout``.
:func:`start_process_group` (what the CLI uses) bounds it: 5 minutes by default, or
``PIB_DIST_TIMEOUT`` seconds, or its ``timeout`` argument (torch's own default is 30 minutes), and
its start-up handshake makes a peer that died while starting fail the others at once. In
``mode="chains"``, where the chains exchange nothing while sampling, a heartbeat thread
all-reduces one number every :data:`HEARTBEAT_S` seconds on a gloo group of its own (with the
world group), so a dead peer stops the others within about a second.

Nothing a peer sends is unpickled: statuses and layouts travel as JSON, the draws as
``torch.save`` bytes read back with ``weights_only=True`` (tensors, numbers, strings).

``store=PATH`` (draws on disk, never all in one process's memory): each rank streams its
``sample`` call(s) to its own file ``PATH.rank{r}-of-{R}`` (data mode: ``....chain{k}`` or
``....chains``), then ``dst`` writes the one store ``PATH`` chunk by chunk in the order
:func:`pib_bayes.store.write_store` writes them: a chunk (one chain's) of its own chains is read
from its own file, another rank's is received from that rank (``send``/``recv`` of its raw bytes,
one chunk at a time), so every process holds at most a chunk of draws; in ``mode="data"`` every
rank holds the same draws and ``dst`` writes its own, NaN at the steps where any rank diverged
(as in memory). The store is written to a temporary name and renamed over ``PATH`` only after every
rank has reported success; then each rank deletes its own file and checkpoint. ``dst`` returns
``Posterior.load(PATH, lazy=True)``, the others None; the draws equal those of the in-memory run bit
for bit.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._validate import itemsize
from .data import as_tensors
from .driver import sample
from .posterior import Posterior
from .samplers.kernels import build_kernel
from .samplers.schedules import expand_shorthand

__all__ = ["sample_distributed", "shard", "chain_shares", "DistributedSamplingError", "start_process_group",
           "collective_timeout"]

_SAMPLE_ARGS = {n for n, p in inspect.signature(sample).parameters.items() if p.kind is p.KEYWORD_ONLY}


class DistributedSamplingError(RuntimeError):
    """A rank failed (raised, died or timed out); raised on every rank that is still running."""


class _PeerFailed(Exception):
    """Raised inside a step when another rank reported a failure."""


def chain_shares(num_chains: int, world_size: int) -> list[list[int]]:
    """Contiguous blocks of chain indices, one per rank; sizes differ by at most one.

    >>> chain_shares(5, 2)
    [[0, 1, 2], [3, 4]]
    >>> chain_shares(1, 3)
    [[0], [], []]
    """
    for name, v in (("num_chains", num_chains), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: must be an int >= 1, got {v!r}")
    q, r = divmod(num_chains, world_size)
    out, start = [], 0
    for k in range(world_size):
        size = q + (k < r)
        out.append(list(range(start, start + size)))
        start += size
    return out


def shard(data: Any, rank: int | None = None, world_size: int | None = None) -> tuple[Tensor, Tensor]:
    """This rank's contiguous shard ``(x[a:b], y[a:b])`` of tensor data for ``mode="data"``.

    Shard sizes differ by at most one (any sizes are fine for :func:`sample_distributed`, which
    weights each shard by its size). ``rank``/``world_size`` default to the process group's.
    In a real run each worker would load only its own part; this helper is for data that fit.

    >>> import torch
    >>> x, y = torch.arange(5.0).unsqueeze(1), torch.arange(5.0)
    >>> [tuple(shard((x, y), r, 2)[1].tolist()) for r in range(2)]
    [(0.0, 1.0, 2.0), (3.0, 4.0)]
    """
    tensors = as_tensors(data)
    if tensors is None:
        raise TypeError("data: shard() needs (x, y) tensors or a TensorDataset; shard a DataLoader's "
                        "dataset yourself (e.g. torch.utils.data.Subset)")
    if rank is None or world_size is None:
        _, rank_, world_ = _group_info(None)
        rank = rank_ if rank is None else rank
        world_size = world_ if world_size is None else world_size
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: must be an int in [0, {world_size}), got {rank!r}")
    x, y = tensors
    n = x.shape[0]
    if n < world_size:
        raise ValueError(f"data: {n} examples cannot be split over {world_size} ranks")
    bounds = [0]
    for size in (len(s) for s in chain_shares(n, world_size)):
        bounds.append(bounds[-1] + size)
    return x[bounds[rank]:bounds[rank + 1]], y[bounds[rank]:bounds[rank + 1]]


# ----------------------------------------------------------------------- start-up and timeouts
DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "PIB_DIST_TIMEOUT"


def collective_timeout(timeout: float | datetime.timedelta | None = None) -> datetime.timedelta:
    """The bound on every collective: ``timeout`` (seconds or a timedelta), else the environment
    variable ``PIB_DIST_TIMEOUT`` (seconds), else :data:`DEFAULT_TIMEOUT_S` (5 minutes; torch's
    own default is 30).

    >>> collective_timeout(90).total_seconds()
    90.0
    """
    source = "timeout"
    if timeout is None and os.environ.get(TIMEOUT_ENV, "").strip():
        source, timeout = TIMEOUT_ENV, os.environ[TIMEOUT_ENV].strip()
        try:
            timeout = float(timeout)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}: must be a number of seconds, got {timeout!r}") from None
    if timeout is None:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise ValueError(f"{source}: must be a positive number of seconds, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


def start_process_group(backend: str | None = None, timeout: float | datetime.timedelta | None = None,
                        **kwargs: Any) -> None:
    """``torch.distributed.init_process_group`` with a bounded timeout, then one start-up handshake.

    ``backend`` defaults to nccl with CUDA, else gloo; ``timeout`` as in :func:`collective_timeout`
    bounds the rendezvous and every later collective of the group. The handshake (an all-reduce
    of one number) makes a peer that died during start-up fail the survivors now, within the
    timeout, not at their first collective after sampling. Other ``kwargs`` (``init_method``,
    ``rank``, ``world_size``, ``store``) go to ``init_process_group``; under torchrun none is needed.

    Raises:
        DistributedSamplingError: a peer did not join, or died, within the timeout.

    >>> import torch.distributed as dist
    >>> if not dist.is_initialized():
    ...     start_process_group("gloo", timeout=60, store=dist.HashStore(), rank=0, world_size=1)
    ...     dist.destroy_process_group()
    """
    import torch.distributed as dist

    bound = collective_timeout(timeout)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    rank = kwargs.get("rank", os.environ.get("RANK", "?"))
    try:
        dist.init_process_group(backend, timeout=bound, **kwargs)
    except Exception as err:  # the store's barrier timed out, or the rendezvous failed
        raise DistributedSamplingError(
            f"rank {rank}: the process group did not start within {bound.total_seconds():g} s "
            f"({type(err).__name__}: {err}); a peer did not join: did it die during start-up? "
            f"(raise the bound with {TIMEOUT_ENV}=SECONDS if start-up is slow)") from err
    rank = dist.get_rank()
    flag = torch.ones(1, device=_comm_device(None))
    try:
        _collective("start-up handshake", rank, dist.all_reduce, flag)
    except DistributedSamplingError:
        dist.destroy_process_group()  # a group left open aborts at interpreter exit
        raise


# ----------------------------------------------------------------------- collectives
def _group_info(group: Any) -> tuple[Any, int, int]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sample_distributed: needs an initialised process group "
                           "(torch.distributed.init_process_group, e.g. launched with torchrun); "
                           "without one, use pib_bayes.sample")
    return group, dist.get_rank(group), dist.get_world_size(group)


def _collective(what: str, rank: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a collective; a broken or timed-out one becomes a :class:`DistributedSamplingError`."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # gloo/nccl report a dead peer or a timeout as RuntimeError/DistError
        raise DistributedSamplingError(
            f"rank {rank}: the {what} collective failed ({type(err).__name__}: {err}); another rank "
            "probably died or timed out (see its own output)") from err


def _comm_device(group: Any) -> torch.device:
    """Where the backend reduces tensors: the current CUDA device for nccl, else the CPU."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange_bytes(data: bytes | None, group: Any, rank: int, world: int, what: str,
                    dst: int | None = None) -> list[bytes] | None:
    """Every rank's ``data`` (in rank order) on every rank, or on ``dst`` only (None elsewhere).

    Sent as uint8 tensors (lengths first, then the padded bytes): nothing is pickled, so a peer
    can send no code (``all_gather_object`` would unpickle whatever a peer sends).
    """
    import torch.distributed as dist

    device = _comm_device(group)
    payload = b"" if data is None else data
    size = torch.tensor([len(payload)], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    _collective(what, rank, dist.all_gather, sizes, size, group=group)
    lengths = [int(t.item()) for t in sizes]
    buf = torch.zeros(max(lengths + [1]), dtype=torch.uint8, device=device)
    if payload:
        buf[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    if dst is None:
        bufs = [torch.empty_like(buf) for _ in range(world)]
        _collective(what, rank, dist.all_gather, bufs, buf, group=group)
    else:
        bufs = [torch.empty_like(buf) for _ in range(world)] if rank == dst else None
        _collective(what, rank, dist.gather, buf, bufs, group=group, group_dst=dst)
        if bufs is None:
            return None
    return [bytes(b[:n].cpu().numpy().tobytes()) for b, n in zip(bufs, lengths)]


def _all_gather(obj: Any, group: Any, rank: int, world: int, what: str) -> list[Any]:
    """Every rank's JSON-able ``obj`` (statuses, shard sizes, layouts), exchanged as JSON text."""
    import json

    raw = _exchange_bytes(json.dumps(obj).encode(), group, rank, world, what)
    assert raw is not None
    try:
        return [json.loads(r) for r in raw]
    except (ValueError, RecursionError) as err:
        raise DistributedSamplingError(f"rank {rank}: the {what} exchange received malformed data "
                                       f"({err})") from None


def _encode_part(part: dict[str, Any] | None) -> bytes | None:
    if part is None:
        return None
    buf = io.BytesIO()
    torch.save({**{k: v for k, v in part.items() if k != "metadata"},
                "metadata_json": json.dumps(part["metadata"])}, buf)
    return buf.getvalue()


def _decode_part(raw: bytes, rank: int, source: int) -> dict[str, Any] | None:
    """A peer's draws, loaded with ``weights_only=True`` (tensors, numbers, strings: no code)."""
    if not raw:
        return None
    try:
        part = torch.load(io.BytesIO(raw), weights_only=True)
        part["metadata"] = json.loads(part.pop("metadata_json"))
    except Exception as err:
        raise DistributedSamplingError(f"rank {rank}: the draws received from rank {source} cannot be "
                                       f"decoded ({type(err).__name__}: {err})") from None
    return part


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _raise_if_failed(statuses: list[str | None], rank: int, own: BaseException | None) -> None:
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if not failed:
        return
    text = "; ".join(f"rank {r} failed: {s}" for r, s in failed)
    raise DistributedSamplingError(f"sample_distributed stopped on every rank: {text}") from own


# ----------------------------------------------------------------------- data parallel gradient
class _AllReduceGradient:
    """The data-parallel gradient transform (:class:`~pib_bayes.gradients.GradientTransform`): the
    all-reduced size-weighted shard gradient ``grad U_S = sum_r (n_r/n) grad U_{S_r}`` and the chains
    to stop (non-finite on any rank, or every chain once a rank has left), then the driver's kernel
    step as for any run (no update rule or divergence handling of its own).

    The buffer, the same size on every rank: ``[K x D weighted gradient | K non-finite flags |
    done | failed]`` for the K chains of one ``sample`` call (tensors carry a leading chain dim).
    """

    def __init__(self, weight: float, num_chains: int, numel: int, dtype: torch.dtype,
                 device: torch.device, group: Any, rank: int, world: int) -> None:
        self.weight = float(weight)
        self.k, self.d = int(num_chains), int(numel)
        self.dtype, self.device = dtype, device  # the same on every rank: the buffers must match
        self.group, self.rank, self.world = group, rank, world

    @property
    def size(self) -> int:
        return self.k * self.d + self.k + 2

    def _all_reduce(self, buf: Tensor) -> Tensor:
        import torch.distributed as dist

        _collective("gradient all-reduce", self.rank, dist.all_reduce, buf, group=self.group)
        return buf

    def __call__(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        k, d = self.k, self.d
        sizes = [g[0].numel() for g in grads]
        if grads[0].shape[0] != k or sum(sizes) != d:
            raise RuntimeError(f"data-parallel step: expected {k} chains x {d} gradient entries, got "
                               f"{[tuple(g.shape) for g in grads]}")
        with torch.no_grad():
            buf = torch.empty(self.size, dtype=self.dtype, device=self.device)
            grad = buf[:k * d].view(k, d)
            torch.cat([g.reshape(k, -1).to(self.dtype) for g in grads], dim=1, out=grad)
            grad.mul_(self.weight)
            bad = buf[k * d:k * d + k]
            bad.zero_()
            for p in params:  # chains this rank has found non-finite (the driver set them to NaN)
                bad.add_((~torch.isfinite(p.reshape(k, -1))).any(1).to(self.dtype))
            buf[k * d + k:] = 0.0  # done, failed
            self._all_reduce(buf)
            done, failed = (float(v) for v in buf[k * d + k:].tolist())
            if failed > 0:
                raise _PeerFailed()
            # a chain that is non-finite on any rank is dead on every rank; a rank only leaves the run
            # early when all its chains diverged
            dead = torch.ones(k, dtype=torch.bool, device=self.device) if done > 0 else bad > 0
            reduced = [v.reshape(g.shape).to(g.dtype) for v, g in zip(grad.split(sizes, dim=1), grads)]
        return reduced, dead

    def finish(self, failed: bool) -> None:
        """Leave the run: keep answering the others' step all-reduces until every rank has left."""
        while True:
            buf = torch.zeros(self.size, dtype=self.dtype, device=self.device)
            buf[-2] = 1.0
            buf[-1] = float(failed)
            self._all_reduce(buf)
            if float(buf[-2]) >= self.world:
                return


# ----------------------------------------------------------------------- merging
def _parts(post: Posterior) -> dict[str, Any]:
    return {"draws": post.draws, "sample_stats": post.sample_stats, "metadata": post.metadata,
            "fixed": post.fixed, "diverged": post.diverged, "divergence_step": post.divergence_step}


def _merge(parts: Sequence[dict[str, Any]], model: nn.Module, info: dict[str, Any]) -> Posterior:
    """Concatenate per-chain-block posteriors (in chain order) along the chain axis."""
    draws = {k: torch.cat([p["draws"][k] for p in parts]) for k in parts[0]["draws"]}
    rest = _merge_rest(parts, info)
    return Posterior(draws, rest["sample_stats"], rest["metadata"], rest["fixed"], rest["diverged"],
                     rest["divergence_step"], model=model)


def _merge_rest(parts: Sequence[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """Everything but the draws of :func:`_merge`: statistics, metadata, fixed tensors, flags."""
    first = parts[0]
    names: list[str] = []
    for p in parts:
        names += [k for k in p["sample_stats"] if k not in names]
    stats = {}
    for k in names:
        ref = next(p["sample_stats"][k] for p in parts if k in p["sample_stats"])
        stats[k] = torch.cat([
            p["sample_stats"][k] if k in p["sample_stats"]
            else torch.full((p["diverged"].shape[0], *ref.shape[1:]), math.nan).to(ref.dtype)
            for p in parts])
    ids = [c for p in parts for c in p["metadata"]["chain_ids"]]
    methods = [p["metadata"].get("chain_method") for p in parts]
    metadata = dict(first["metadata"])
    metadata.update({"num_chains": len(ids), "chain_ids": ids,
                     "chain_method": methods[0] if len(set(methods)) == 1 else "mixed",
                     "distributed": {**info, "chain_methods": methods}})
    return {"sample_stats": stats, "metadata": metadata, "fixed": dict(first["fixed"]),
            "diverged": torch.cat([p["diverged"] for p in parts]),
            "divergence_step": torch.cat([p["divergence_step"] for p in parts])}


def _rank_checkpoint(kwargs: dict[str, Any], tag: str) -> dict[str, Any]:
    """A per-rank (and per-chain) checkpoint file and store file next to the ones asked for."""
    for key in ("checkpoint", "store"):
        if kwargs.get(key) is not None:
            kwargs = {**kwargs, key: f"{os.fspath(kwargs[key])}.{tag}"}
    return kwargs


# ----------------------------------------------------------------------- store=: one file on dst
def _gathering(store: str | None, num_chains: int) -> contextlib.AbstractContextManager[None]:
    """dst's sample() call: its disk check also counts the store it gathers afterwards."""
    from .driver.checks import gathered_store

    return contextlib.nullcontext() if store is None else gathered_store(store, num_chains)


def _rank_files(post: Posterior | None, kwargs: dict[str, Any]) -> None:
    """Delete what a rank's streamed ``sample`` call left once the store holds the run: its own
    store file and its checkpoint (which would point at that file)."""
    from .driver.checkpoint import remove_checkpoint
    from .store import LazyDraws

    if post is not None and isinstance(post.draws, LazyDraws):
        post.draws.close()
    if kwargs.get("store") is not None:
        try:
            os.unlink(kwargs["store"])
        except FileNotFoundError:
            pass
    if kwargs.get("checkpoint") is not None:
        remove_checkpoint(kwargs["checkpoint"])


def _layout(post: Posterior) -> dict[str, Any]:
    """A rank's part without its draws, plus their shapes and dtypes (sent to dst, small)."""
    part = {k: v for k, v in _parts(post).items() if k != "draws"}
    part["draw_shapes"] = {n: list(post.draws.shape(n)) for n in post.draws}
    part["draw_dtypes"] = {n: str(post.draws.dtype(n)).removeprefix("torch.") for n in post.draws}
    return part


def _schedule(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype]) -> list[tuple[str, tuple]]:
    """(variable, chunk region) in the order :func:`pib_bayes.store.write_store` writes the
    posterior's chunks; every chunk holds one chain (``region[0]`` is one index wide)."""
    from .store import _chunks, _grid, _region

    out = []
    for name, shape in shapes.items():
        if not math.prod(shape):
            continue
        chunk = _chunks(shape, itemsize(dtypes[name]), 1)
        out += [(name, _region(shape, chunk, off)) for off in _grid(shape, chunk)]
    return out


class _GatheredSource:
    """One posterior variable of the store written on dst (a :class:`pib_bayes.store.BlockSource`):
    each chunk, one chain's, read from dst's own streamed file or received from the rank that
    streamed that chain (raw bytes, point to point), so that no rank holds more than a chunk."""

    def __init__(self, gather: _Gather, name: str) -> None:
        self.gather, self.name = gather, name
        self.shape = gather.shapes[name]
        self.dtype = gather.dtypes[name]

    def block(self, region: tuple[slice, ...]) -> Tensor:
        return self.gather.next_block(self.name, region)


class _Gather:
    """dst's side of the chunk-by-chunk gather: the schedule, dst's own chains, the mask of draws
    taken at a divergence step on any rank (``mode="data"``: NaN, as in memory)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype],
                 local: dict[int, tuple[Posterior, int]], owner: dict[int, int],
                 masks: dict[int, Tensor] | None, group: Any, rank: int) -> None:
        self.shapes, self.dtypes, self.local, self.owner = shapes, dtypes, local, owner
        self.masks, self.group, self.rank = masks, group, rank
        self.schedule = _schedule(shapes, dtypes)
        self.done = 0  # chunks of the schedule taken so far

    def next_block(self, name: str, region: tuple[slice, ...]) -> Tensor:
        expected = self.schedule[self.done]
        if expected[0] != name or expected[1] != region:  # pragma: no cover - the layouts are one code
            raise RuntimeError(f"gather of the draws: chunk {name} {region} out of order")
        c = region[0].start
        if c in self.local:
            t = _local_block(self.local, name, region)
        else:
            t = self._recv(name, region)
        self.done += 1
        mask = None if self.masks is None else self.masks[c][region[1]]
        if mask is not None and bool(mask.any()):
            t = t.clone()
            t[0, mask] = math.nan
        return t

    def drain(self) -> None:
        """Receive (and drop) the chunks still due after a failed write, so that no sender waits."""
        for name, region in self.schedule[self.done:]:
            c = region[0].start
            if c not in self.local:
                self._recv(name, region)
        self.done = len(self.schedule)

    def _recv(self, name: str, region: tuple[slice, ...]) -> Tensor:
        return _recv_block(self.dtypes[name], region, self.owner[region[0].start], self.group, self.rank)


def _local_block(local: dict[int, tuple[Posterior, int]], name: str, region: tuple[slice, ...]) -> Tensor:
    """The store chunk ``region`` (one chain's) of ``name`` from this rank's own streamed file."""
    post, i = local[region[0].start]
    return post.draws.source(name).block((slice(i, i + 1), *region[1:]))


def _recv_block(dtype: torch.dtype, region: tuple[slice, ...], src: int, group: Any, rank: int) -> Tensor:
    import torch.distributed as dist

    dims = [r.stop - r.start for r in region]
    raw = torch.empty(math.prod(dims) * itemsize(dtype), dtype=torch.uint8)
    _collective("gather of the draws", rank, dist.recv, raw, group=group, group_src=src)
    return raw.view(dtype).reshape(dims)


def _send_blocks(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype],
                 local: dict[int, tuple[Posterior, int]], dst: int, group: Any,
                 rank: int) -> BaseException | None:
    """A sender's side: its chains' chunks, in the schedule's order; after a read error, zeros in
    their place (dst must not wait; the error is reported in the status exchange that follows)."""
    import torch.distributed as dist

    error: BaseException | None = None
    for name, region in _schedule(shapes, dtypes):
        c = region[0].start
        if c not in local:
            continue
        dims = [r.stop - r.start for r in region]
        t = None
        if error is None:
            try:
                t = _local_block(local, name, region).contiguous()
            except Exception as err:  # a damaged rank file
                error = err
        if t is None:
            t = torch.zeros(dims, dtype=dtypes[name])
        _collective("gather of the draws", rank, dist.send, t.reshape(-1).view(torch.uint8), group=group,
                    group_dst=dst)
    return error


def _write_gathered(store: str, gather: _Gather, rest: dict[str, Any], group: Any, rank: int,
                    world: int) -> None:
    """On dst: the store, from the gather, under its lock, to a temporary file renamed over
    ``store`` only once every rank has sent its chunks without error (a failure leaves the old file,
    if any, untouched; a killed dst leaves a temporary file the next writer of ``store`` removes)."""
    from .io import atomic_path, exclusive_lock
    from .posterior import FORMAT_VERSION
    from .store import write_store

    error: BaseException | None = None
    exchanged = False
    try:
        with exclusive_lock(store, "store"), atomic_path(store) as tmp:
            try:
                groups = {"posterior": {n: _GatheredSource(gather, n) for n in gather.shapes},
                          "sample_stats": rest["sample_stats"], "fixed": rest["fixed"],
                          "divergences": {"diverged": rest["diverged"],
                                          "divergence_step": rest["divergence_step"]}}
                metadata = json.loads(json.dumps(rest["metadata"], default=str))
                write_store(tmp, "posterior", FORMAT_VERSION, groups, metadata, atomic=False)
            except DistributedSamplingError:
                raise
            except Exception as err:  # e.g. the disk is full: the senders must still be answered
                error = err
            gather.drain()
            statuses = _all_gather(None if error is None else _describe(error), group, rank, world,
                                   "status of the gather")
            exchanged = True
            _raise_if_failed(statuses, rank, error)  # inside atomic_path: the temporary file is removed
    except DistributedSamplingError:
        raise
    except Exception as err:
        if exchanged:  # the final rename failed, after every rank had succeeded
            raise
        gather.drain()  # the lock (another writer) or the temporary file failed: no chunk was taken
        statuses = _all_gather(_describe(err), group, rank, world, "status of the gather")
        _raise_if_failed(statuses, rank, err)


# ----------------------------------------------------------------------- public entry point
def sample_distributed(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    mode: str = "chains",
    group: Any = None,
    dst: int | None = 0,
    **kwargs: Any,
) -> Posterior | None:
    """Run :func:`pib_bayes.sample` on every rank of a process group and gather one Posterior.

    Call it on every rank, with the same arguments (and, in ``mode="data"``, each rank's own
    shard as ``data``), after ``torch.distributed.init_process_group``.

    Args:
        model, loss_fn, data: as for :func:`pib_bayes.sample`; in ``mode="data"`` ``data`` is
            this rank's shard (see :func:`shard`), and every rank must hold the same model.
        mode: ``"chains"`` (each rank runs its block of the chains, :func:`chain_shares`) or
            ``"data"`` (every rank runs every chain on its shard; the energy gradient is the
            all-reduced, size-weighted average of the shard gradients, so the chain samples the
            posterior of the whole data; see the module docstring for the update equation).
        group: the process group (default: the world).
        dst: the rank (in ``group``) that receives the Posterior; ``None`` gives it to every rank.
        **kwargs: the keyword arguments of :func:`pib_bayes.sample` (``beta``, ``prior``,
            ``sampler``, ``step_size``, ``num_chains``, ``num_warmup``, ``num_draws``, ``thin``,
            ``batch_size`` (per rank in ``mode="data"``), ``seed``, ...). ``chain_ids`` is chosen
            here and may not be passed. A ``checkpoint`` path gets a per-rank suffix
            (``.rank{r}-of-{R}``, plus ``.chain{k}`` or, vectorized, ``.chains`` in
            ``mode="data"``); resume with the same number of ranks. ``store=PATH``: every
            rank streams to ``PATH`` with the same suffix, and ``dst`` (not None) writes the one
            store ``PATH`` from them chunk by chunk (the module docstring); once it is written the
            per-rank files and checkpoints are deleted (``resume=True`` then starts over).

    Returns:
        On ``dst`` (or every rank when ``dst=None``), the Posterior of all ``num_chains`` chains,
        chain k equal to chain k of ``pib_bayes.sample(model, loss_fn, full_data, **kwargs)``
        (exactly for ``mode="chains"`` with ``chain_method="sequential"``, to float tolerance
        otherwise, and for ``mode="data"`` with full batches); ``metadata["distributed"]`` records
        the mode, world size, backend and split. With ``store=``, ``Posterior.load(store,
        lazy=True)``. ``None`` on the other ranks.

    Raises:
        DistributedSamplingError: on every rank, when any rank fails (its error is named).

    Under torchrun the process group already exists; this example makes a 1-process group itself:

    >>> import torch
    >>> import torch.distributed as dist
    >>> from torch import nn
    >>> started = not dist.is_initialized()
    >>> if started:
    ...     dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
    >>> post = sample_distributed(nn.Linear(3, 1), "gaussian", (x, y), beta=1 / 64, step_size=1e-3,
    ...                           num_chains=2, num_warmup=20, num_draws=10, seed=0)
    >>> post.draws["weight"].shape, post.metadata["distributed"]["chain_shares"]
    (torch.Size([2, 10, 1, 3]), [[0, 1]])
    >>> if started:
    ...     dist.destroy_process_group()
    """
    group, rank, world = _group_info(group)
    if mode not in ("chains", "data"):
        raise ValueError(f"mode: expected 'chains' or 'data', got {mode!r}")
    if dst is not None and (isinstance(dst, bool) or not isinstance(dst, int) or not 0 <= dst < world):
        raise ValueError(f"dst: must be a rank in [0, {world}) or None, got {dst!r}")
    unknown = sorted(set(kwargs) - _SAMPLE_ARGS)
    if unknown:
        raise TypeError(f"sample_distributed: unknown arguments {unknown}; it takes those of "
                        "pib_bayes.sample")
    if "chain_ids" in kwargs:
        raise ValueError("chain_ids: sample_distributed chooses each rank's chains itself; pass num_chains")
    if kwargs.get("store") is not None:
        from ._validate import check_path

        kwargs = {**kwargs, "store": check_path("store", kwargs["store"])}
        if dst is None:
            raise ValueError("dst: with store=, one rank writes the store (chunk by chunk, the others send "
                             "their chains' draws to it); pass dst=RANK (default 0), not None")
    if "beta" not in kwargs:
        raise TypeError("sample_distributed: missing the keyword argument 'beta' (as for pib_bayes.sample)")
    import torch.distributed as dist

    info = {"mode": mode, "world_size": world, "backend": str(dist.get_backend(group))}
    run = _chains if mode == "chains" else _data_parallel
    post = run(model, loss_fn, data, group, rank, world, dst, info, kwargs)
    return post if dst is None or rank == dst else None


HEARTBEAT_S = 1.0  # seconds between the liveness all-reduces of mode="chains"


class _Heartbeat:
    """Liveness for ``mode="chains"``, where nothing else is exchanged while sampling.

    A daemon thread all-reduces one number every :data:`HEARTBEAT_S` seconds on a gloo group of
    its own (bounded by :func:`collective_timeout`): 1 once this rank has finished sampling, else
    0; every rank's thread leaves on the round whose sum is the world size. A dead peer breaks the
    round (gloo sees the closed connection; a hung one exceeds the timeout): the error is kept,
    and the sampling thread raises it at its next step (see :meth:`kernel`).
    """

    def __init__(self, world: int) -> None:
        import threading

        import torch.distributed as dist

        self.world, self.error = world, None
        self.group = dist.new_group(backend="gloo", timeout=collective_timeout())
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pib-bayes-heartbeat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import torch.distributed as dist

        while True:
            self.done.wait(HEARTBEAT_S)
            flag = torch.tensor([1.0 if self.done.is_set() else 0.0])
            try:
                dist.all_reduce(flag, group=self.group)
            except Exception as err:  # a dead or hung peer
                self.error = err
                return
            if float(flag) >= self.world:
                return

    def __call__(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[Sequence[Tensor], None]:
        """A gradient transform that changes nothing but stops the run once the heartbeat has failed."""
        if self.error is not None:
            raise _PeerFailed()
        return grads, None

    def finish(self, rank: int) -> None:
        """Wait until every rank has finished sampling (or the heartbeat broke), then close."""
        import torch.distributed as dist

        self.done.set()
        self.thread.join()
        if self.error is not None:
            raise DistributedSamplingError(
                f"rank {rank}: the heartbeat collective failed ({type(self.error).__name__}: "
                f"{self.error}); another rank probably died or timed out (see its own output)"
            ) from self.error
        dist.destroy_process_group(self.group)


def _chains(model: nn.Module, loss_fn: Any, data: Any, group: Any, rank: int, world: int, dst: int | None,
            info: dict[str, Any], kwargs: dict[str, Any]) -> Posterior | None:
    import torch.distributed as dist

    error: BaseException | None = None
    part, post = None, None
    store = kwargs.get("store")
    run_kwargs = _rank_checkpoint(kwargs, f"rank{rank}-of-{world}")
    # a peer that dies while this rank samples stops it within a heartbeat (world group only: a
    # new group is a collective of the whole world)
    beat = _Heartbeat(world) if group is None and world > 1 and dist.is_gloo_available() else None
    try:
        num_chains = kwargs.get("num_chains", 1)
        shares = chain_shares(num_chains, world) if not isinstance(num_chains, bool) else None
        if shares is None:
            raise ValueError(f"num_chains: must be an int >= 1, got {num_chains!r}")
        if shares[rank]:
            if beat is not None:
                run_kwargs = {**run_kwargs, "gradient_transform": beat}
            with _gathering(store if rank == dst else None, num_chains):
                post = sample(model, loss_fn, data, chain_ids=shares[rank], **run_kwargs)
            part = _parts(post) if store is None else _layout(post)
    except _PeerFailed:
        pass  # the heartbeat's own error is raised by finish() below
    except Exception as err:  # reported to every rank below, so none waits for this one
        error = err
    if beat is not None:
        beat.finish(rank)
    statuses = _all_gather(None if error is None else _describe(error), group, rank, world, "status")
    _raise_if_failed(statuses, rank, error)
    info = {**info, "chain_shares": shares}
    raw = _exchange_bytes(_encode_part(part), group, rank, world, "gather of the draws", dst)
    if store is None:
        if raw is None:
            return None
        parts = [_decode_part(r, rank, source) for source, r in enumerate(raw)]
        return _merge([p for p in parts if p is not None], model, info)
    # store=: each rank streamed its chains to its own file; dst writes the store chunk by chunk
    assert shares is not None and dst is not None
    local = {c: (post, i) for i, c in enumerate(shares[rank])} if post is not None else {}
    if raw is None:
        own: dict[str, tuple[int, ...]] = {} if post is None else {
            n: (num_chains, *post.draws.shape(n)[1:]) for n in post.draws}
        dtypes = {} if post is None else {n: post.draws.dtype(n) for n in post.draws}
        failed = _send_blocks(own, dtypes, local, dst, group, rank)
        statuses = _all_gather(None if failed is None else _describe(failed), group, rank, world,
                               "status of the gather")
        _raise_if_failed(statuses, rank, failed)
    else:
        parts = [p for p in (_decode_part(r, rank, source) for source, r in enumerate(raw)) if p is not None]
        shapes, dtypes = _draw_layout(parts, num_chains, rank)
        owner = {c: r for r, share in enumerate(shares) for c in share}
        gather = _Gather(shapes, dtypes, local, owner, None, group, rank)
        _write_gathered(store, gather, _merge_rest(parts, info), group, rank, world)
    _rank_files(post, run_kwargs)
    return Posterior.load(store, model=model, lazy=True) if rank == dst else None


def _draw_layout(parts: Sequence[dict[str, Any]], num_chains: int,
                 rank: int) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    """The store's posterior variables, (num_chains, draw, ...) and dtype, from the ranks' layouts."""
    shapes, dtypes = {}, {}
    for name, shape in parts[0]["draw_shapes"].items():
        dtype = getattr(torch, str(parts[0]["draw_dtypes"][name]), None)
        if not isinstance(dtype, torch.dtype) or any(
                list(p["draw_shapes"].get(name, []))[1:] != list(shape)[1:] for p in parts):
            raise DistributedSamplingError(f"rank {rank}: the ranks' draws of {name!r} differ in shape or "
                                           "dtype")
        shapes[name], dtypes[name] = (num_chains, *(int(a) for a in shape[1:])), dtype
    return shapes, dtypes


def _data_parallel(model: nn.Module, loss_fn: Any, data: Any, group: Any, rank: int, world: int,
                   dst: int | None, info: dict[str, Any], kwargs: dict[str, Any]) -> Posterior | None:
    # setup: every rank's shard size and weight layout, exchanged once (errors included)
    error: BaseException | None = None
    local: dict[str, Any] | None = None
    try:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        tensors = as_tensors(data)
        if tensors is not None:
            n_local = int(tensors[0].shape[0])
        else:
            try:
                n_local = len(data.dataset)
            except TypeError:
                raise ValueError("data: mode='data' needs the shard size; use tensors or a DataLoader "
                                 "over a dataset with len()") from None
        num_chains = kwargs.get("num_chains", 1)
        if isinstance(num_chains, bool) or not isinstance(num_chains, int) or num_chains < 1:
            raise ValueError(f"num_chains: must be an int >= 1, got {num_chains!r}")
        if kwargs.get("chain_method", "auto") not in ("auto", "vectorized", "sequential"):
            raise ValueError("chain_method: expected 'auto', 'vectorized' or 'sequential', got "
                             f"{kwargs['chain_method']!r}")
        sampler = expand_shorthand(kwargs.get("sampler", "sgld"), kwargs.get("step_size", 1e-4))
        inner = build_kernel(sampler, **dict(kwargs.get("sampler_kwargs") or {}))
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("model: has no trainable parameters (requires_grad=True) to sample")
        layout = [(n, tuple(p.shape), str(p.dtype)) for n, p in trainable]
        dtypes = {p.dtype for _, p in trainable}
        dtype = trainable[0][1].dtype if len(dtypes) == 1 else torch.float64
        device = trainable[0][1].device
        local = {"n": n_local, "layout": layout}
    except Exception as err:
        error = err
    setups = _all_gather(local if error is None else _describe(error), group, rank, world, "setup")
    if error is None:
        bad = [(r, s) for r, s in enumerate(setups) if isinstance(s, str)]
        if not bad and any(s["layout"] != setups[0]["layout"] for s in setups):
            error = ValueError("model: the ranks hold models with different trainable parameters "
                               f"(rank 0: {setups[0]['layout']}, rank {rank}: {local['layout']})")
    _raise_if_failed([s if isinstance(s, str) else None for s in setups], rank, error)
    if error is not None:
        raise error
    sizes = [int(s["n"]) for s in setups]
    weight = sizes[rank] / sum(sizes)
    numel = sum(math.prod(shape) for _, shape, _ in local["layout"])
    info = {**info, "shard_sizes": sizes, "weights": [s / sum(sizes) for s in sizes], "n": sum(sizes)}
    rest = {k: v for k, v in kwargs.items() if k not in ("sampler", "sampler_kwargs", "chain_method")}

    # "vectorized": all chains in one batched group (one all-reduce per step for all of them);
    # otherwise one chain per call. Never several groups in one call: a rank whose group ends
    # early would start the next group while the others still step the previous one.
    method = kwargs.get("chain_method", "auto")
    calls = [list(range(num_chains))] if method == "vectorized" else [[k] for k in range(num_chains)]
    store = kwargs.get("store")
    parts, call_kwargs = [], []
    for ids in calls:
        wrapper = _AllReduceGradient(weight, len(ids), numel, dtype, device, group, rank, world)
        error, own = None, False
        post = None
        try:
            tag = f"chain{ids[0]}" if len(ids) == 1 else "chains"
            chain_kwargs = _rank_checkpoint(rest, f"rank{rank}-of-{world}.{tag}")
            with _gathering(store if rank == dst else None, num_chains):
                post = sample(model, loss_fn, data, sampler=inner, gradient_transform=wrapper, chain_ids=ids,
                              chain_method="vectorized" if len(ids) > 1 else "sequential", **chain_kwargs)
        except _PeerFailed:
            error = RuntimeError("stopped because another rank failed")
        except DistributedSamplingError:
            raise  # the collectives are broken: nothing more can be exchanged
        except Exception as err:
            error, own = err, True
        wrapper.finish(failed=error is not None)
        statuses = _all_gather(_describe(error) if own else None, group, rank, world, "status")
        _raise_if_failed(statuses, rank, error)
        if error is not None:  # a peer failure that was not reported (cannot happen) -- be loud
            raise DistributedSamplingError(f"rank {rank}: {error}")
        assert post is not None
        parts.append(_combine_shards(post, weight, device, group, rank, world, mask_draws=store is None))
        call_kwargs.append(chain_kwargs)
    whole_data = {"n": sum(sizes), "batch_size_per_rank": kwargs.get("batch_size")}  # the merged metadata's
    if store is None:
        merged = _merge([_parts(p) for p in parts], model, info)
        merged.metadata.update(whole_data)
        return merged if dst is None or rank == dst else None
    # store=: every rank holds the same draws; dst writes its own into the store, chunk by chunk,
    # NaN at a divergence step of any rank (as _combine_shards does in memory)
    if rank == dst:
        rest = _merge_rest([_parts(p) for p in parts], info)
        rest["metadata"].update(whole_data)
        first = parts[0].draws
        shapes = {n: (num_chains, *first.shape(n)[1:]) for n in first}
        local = {c: (p, i) for p, ids in zip(parts, calls, strict=True) for i, c in enumerate(ids)}
        masks = {c: p.sample_stats["diverging"][i] for c, (p, i) in local.items()}
        gather = _Gather(shapes, {n: first.dtype(n) for n in first}, local, {}, masks, group, rank)
        _write_gathered(store, gather, rest, group, rank, world)
    else:
        statuses = _all_gather(None, group, rank, world, "status of the gather")
        _raise_if_failed(statuses, rank, None)
    for p, kw in zip(parts, call_kwargs, strict=True):
        _rank_files(p, kw)
    return Posterior.load(store, model=model, lazy=True) if rank == dst else None


def _combine_shards(post: Posterior, weight: float, device: torch.device, group: Any, rank: int,
                    world: int, mask_draws: bool = True) -> Posterior:
    """Full-data energy/loss (the weighted sum of the shard values) and one divergence record
    (with ``mask_draws``, the draws taken at a divergence step of any rank set to NaN: in memory)."""
    import torch.distributed as dist

    stats = post.sample_stats
    shape = stats["energy"].shape
    buf = torch.cat([stats["energy"].double().reshape(-1), stats["loss"].double().reshape(-1),
                     stats["diverging"].double().reshape(-1)])
    buf[:2 * shape.numel()] *= weight
    buf = buf.to(device)  # nccl reduces device tensors only
    _collective("statistics all-reduce", rank, dist.all_reduce, buf, group=group)
    buf = buf.cpu()
    energy, loss, diverging = buf.split(shape.numel())
    stats["energy"] = energy.reshape(shape).to(stats["energy"].dtype)
    stats["loss"] = loss.reshape(shape).to(stats["loss"].dtype)
    stats["diverging"] = diverging.reshape(shape) > 0
    steps = _all_gather(post.divergence_step.tolist(), group, rank, world, "divergence")
    first = [min((s[c] for s in steps if s[c] >= 0), default=-1) for c in range(len(steps[0]))]
    post.divergence_step = torch.tensor(first, dtype=torch.long)
    post.diverged = post.divergence_step >= 0
    if mask_draws:
        with torch.no_grad():  # a draw taken at or after the divergence step on any rank is NaN
            for v in post.draws.values():
                v[stats["diverging"]] = math.nan
    return post
