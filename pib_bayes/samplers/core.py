"""The one update core every Langevin sampler shares.

Each sampler is a :class:`Kernel`: a pair of small functions in the BlackJAX style,

    state = kernel.init(params)
    stats = kernel.step(params, grads, state, step_size, noise, noise_scale=1.0, batch_ndim=0)

operating in place on *lists* of tensors with ``torch._foreach_*`` ops (as torch.optim's
multi-tensor path does). Step size, minibatch and schedule all come from outside. The update
rules differ only in how they precondition the drift and scale the diffusion; the move itself,

    target <- target - h * drift + noise_scale * sqrt(2 h D) * xi,    xi ~ N(0, I),

is :func:`langevin_move_` for all of them, so the "noise uses the same h as the drift" rule
lives in one place.

``batch_ndim = 1`` means every tensor carries a leading chain dimension (batched chains);
statistics are then reduced per chain.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["Kernel", "KernelInit", "KernelStep", "KernelState", "SCRATCH", "scratch_of", "STEP", "step_count",
           "count_step",
           "GaussianNoise", "RademacherNoise", "NOISES", "make_noise", "langevin_move_",
           "reduce_sum", "Workspace", "flat_view", "flat_zeros_like", "FlatTensors", "NoisePrefetcher"]


class GaussianNoise:
    """Standard-normal noise for a list of tensors, from one flat buffer per step.

    One ``torch.randn`` call fills a single flat buffer that is then viewed as the parameter
    shapes: far fewer kernel launches than one draw per tensor, and the same numbers whatever the
    grouping of tensors, so an optimizer and the driver draw identical noise from one seed.

    With ``batched=True`` the tensors carry a leading chain dimension K and generator k fills row
    k, so chain k sees exactly the noise it would see running alone with its own generator.
    """

    kind = "gaussian"
    _pad = 1  # each row of the buffer is padded to a multiple of this many elements

    def __init__(self, generators: torch.Generator | Sequence[torch.Generator],
                 batched: bool = False) -> None:
        self.generators = [generators] if isinstance(generators, torch.Generator) else list(generators)
        self.batched = batched
        if not batched and len(self.generators) != 1:
            raise ValueError("generators: an unbatched noise source takes exactly one generator")
        self._buffer: Tensor | None = None
        self._rows: list[Tensor] = []
        self._views: list[Tensor] = []
        self._key: tuple = ()
        self._like: Sequence[Tensor] | None = None

    def _layout(self, like: Sequence[Tensor]) -> None:
        if like is self._like:  # the same immutable tiling as last time (a chain group's weights)
            return
        key = _layout_key(like)
        self._like = like if isinstance(like, FlatTensors) else None
        if key == self._key:
            return
        dtype, device = like[0].dtype, like[0].device
        pad = self._pad
        if self.batched:
            k = like[0].shape[0]
            if k != len(self.generators):
                raise ValueError(f"noise: {len(self.generators)} generators for {k} chains")
            sizes = [t[0].numel() for t in like]
            total = -(-sum(sizes) // pad) * pad
            buf = torch.empty(k, total, dtype=dtype, device=device)
            views, off = [], 0
            for t, n in zip(like, sizes, strict=True):
                views.append(buf[:, off : off + n].view(t.shape))
                off += n
            rows = list(buf.unbind(0))
            if k == 1:  # one chain: the views tile the row's first sum(sizes) entries
                views = FlatTensors(views, buf[0, : sum(sizes)])
        else:
            sizes = [t.numel() for t in like]
            total = -(-sum(sizes) // pad) * pad
            buf = torch.empty(total, dtype=dtype, device=device)
            views = FlatTensors([v.view(t.shape) for v, t in zip(buf[: sum(sizes)].split(sizes), like,
                                                                  strict=True)], buf[: sum(sizes)])
            rows = [buf]
        self._buffer, self._rows, self._views, self._key = buf, rows, views, key

    def _fill(self, row: Tensor, generator: torch.Generator) -> None:
        torch.randn(row.shape, generator=generator, out=row)

    def draw(self, like: Sequence[Tensor]) -> list[Tensor]:
        """Fresh noise shaped like ``like`` (views into an internal buffer, valid until the next draw)."""
        self._layout(like)
        self.refill()
        return self._views

    def refill(self) -> None:
        """Fill the buffer of the current layout with the next numbers of the generator(s)."""
        for row, gen in zip(self._rows, self.generators, strict=True):
            self._fill(row, gen)


class RademacherNoise(GaussianNoise):
    """Opt-in cheaper noise: i.i.d. signs xi = +-1 with probability 1/2 (mean 0, variance 1).

    One 64-bit draw of the generator gives 64 signs (unpacked through a 256 x 8 table), where
    ``torch.randn`` spends a 32-bit draw and a Box-Muller transform per number: on the CPU the
    draw costs about an eighth of ``torch.randn`` (docs/performance.md).

    What it changes (measured in ``benchmarks/bench_steps.py --case noise``, docs/performance.md):
    on a Gaussian target the Langevin recursion is linear, so the stationary mean and covariance
    are *exactly* those of Gaussian noise (SPEC §2: s^2/(1 - h/(2 s^2)) for U = x^2/(2 s^2)); the
    higher cumulants are not: the stationary excess kurtosis is -2 (1 - a^2)/(1 + a^2) with
    a = 1 - h/s^2, about -h/s^2 for small steps (0 with Gaussian noise). On non-quadratic energies
    the discretisation bias differs at the same order in h. Streams differ from the Gaussian ones.
    """

    kind = "rademacher"
    _pad = 64

    def _layout(self, like: Sequence[Tensor]) -> None:
        key = self._key
        super()._layout(like)
        if self._key is key and self._words is not None:
            return
        n = self._rows[0].numel()
        self._words = torch.empty(n // 64, dtype=torch.int64)
        self._index = torch.empty(n // 8, dtype=torch.int64)
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        self._table = (2 * bits - 1).to(dtype=self._rows[0].dtype, device=self._rows[0].device)

    _words: Tensor | None = None

    def _fill(self, row: Tensor, generator: torch.Generator) -> None:
        torch.randint(-(2**63), 2**63 - 1, self._words.shape, dtype=torch.int64, generator=generator,
                      out=self._words)
        self._index.copy_(self._words.view(torch.uint8))
        torch.index_select(self._table, 0, self._index.to(row.device), out=row.view(-1, 8))


NOISES: dict[str, type[GaussianNoise]] = {"gaussian": GaussianNoise, "rademacher": RademacherNoise}


def make_noise(kind: str, generators: torch.Generator | Sequence[torch.Generator],
               batched: bool = False) -> GaussianNoise:
    """A noise source by name: ``"gaussian"`` (exact, the default everywhere) or the opt-in
    ``"rademacher"`` (cheaper; see :class:`RademacherNoise` for what it changes).

    Examples:
        >>> import torch
        >>> like = [torch.empty(3, 5), torch.empty(7)]
        >>> xi = make_noise("rademacher", torch.Generator().manual_seed(0)).draw(like)
        >>> [tuple(t.shape) for t in xi], sorted(set(torch.cat([t.flatten() for t in xi]).tolist()))
        ([(3, 5), (7,)], [-1.0, 1.0])
        >>> # batched: chain k draws exactly what it draws alone from its own generator
        >>> gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        >>> stacked = [torch.empty(2, 3, 5), torch.empty(2, 7)]
        >>> rows = make_noise("rademacher", gens, batched=True).draw(stacked)
        >>> torch.equal(rows[0][0], xi[0]) and torch.equal(rows[1][0], xi[1])
        True
    """
    if kind not in NOISES:
        raise ValueError(f"noise: expected one of {sorted(NOISES)}, got {kind!r}")
    return NOISES[kind](generators, batched)


def _layout_key(like: Sequence[Tensor]) -> tuple:
    return tuple((t.shape, t.dtype, t.device) for t in like)


class _Drawn:
    """A noise source whose next draw is already in its buffer (see :class:`NoisePrefetcher`)."""

    def __init__(self, source: GaussianNoise) -> None:
        self.kind, self._source = source.kind, source

    def draw(self, like: Sequence[Tensor]) -> list[Tensor]:
        if _layout_key(like) != self._source._key:  # the prefetcher drew for the caller's own layout
            raise RuntimeError("noise prefetch: drawn for another layout")
        return self._source._views


class NoisePrefetcher:
    """Draws the *next* step's noise on a worker thread while the caller computes gradients.

    ``take(likes)`` returns one noise source per layout (the tensors each param group moves this
    step, in the order a synchronous step draws them); each source's ``draw`` hands back a buffer
    already holding the numbers the synchronous sampler would draw there, and ``take`` then starts
    filling the next step's buffers, for the same layouts, from the same generator(s) on a worker
    thread (double-buffered: this step's noise stays valid). If the next step asks for other
    layouts (a parameter lost its gradient, a noise scale went to 0), the generators are rewound to
    where that prefetch began and the draws are made synchronously, so the stream of numbers is
    always exactly that of the synchronous sampler. ``torch.randn`` releases the GIL, so the draw
    overlaps the forward and backward pass when a CPU core is free (docs/performance.md).

    ``generators`` and ``batched`` are those of :func:`make_noise`. While a prefetch is pending the
    generators are ahead of the sampler: read and set their states with :meth:`generator_states` /
    :meth:`set_generator_states`, not on the generators themselves.
    """

    def __init__(self, kind: str, generators: torch.Generator | Sequence[torch.Generator],
                 batched: bool = False) -> None:
        self.kind, self.batched = kind, batched
        self.generators = [generators] if isinstance(generators, torch.Generator) else list(generators)
        self._sources: tuple[list[GaussianNoise], list[GaussianNoise]] = ([], [])
        self._parity = 0
        self._pending: tuple | None = None  # (future, layout keys, generator states before the prefetch)
        self._pool = None

    def _buffers(self, parity: int, count: int) -> list[GaussianNoise]:
        sources = self._sources[parity]
        while len(sources) < count:
            sources.append(make_noise(self.kind, self.generators, self.batched))
        return sources[:count]

    def _settle(self, keys: tuple | None = None) -> bool:
        """Wait for the pending prefetch; True if it drew for ``keys``, else rewind the generators."""
        if self._pending is None:
            return False
        future, pending_keys, before = self._pending
        self._pending = None
        future.result()
        if pending_keys == keys:
            return True
        for gen, state in zip(self.generators, before, strict=True):
            gen.set_state(state)
        return False

    def take(self, likes: Sequence[Sequence[Tensor]]) -> list[_Drawn]:
        """This step's noise sources for ``likes`` (drawn ahead if the last call prefetched them)."""
        keys = tuple(_layout_key(like) for like in likes)
        ready = self._settle(keys)
        current = self._buffers(self._parity, len(likes))
        if not ready:
            for source, like in zip(current, likes, strict=True):
                source.draw(like)
        if likes:
            self._parity ^= 1
            upcoming = self._buffers(self._parity, len(likes))
            for source, like in zip(upcoming, likes, strict=True):
                source._layout(like)  # allocate here: the worker only fills
            if self._pool is None:  # first prefetch: the import and the thread, once
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pib-noise")
            before = [gen.get_state() for gen in self.generators]
            future = self._pool.submit(lambda: [source.refill() for source in upcoming])
            self._pending = (future, keys, before)
        return [_Drawn(source) for source in current]

    def generator_states(self) -> list[Tensor]:
        """The generators' states as the synchronous sampler would have them now."""
        if self._pending is not None:
            return list(self._pending[2])
        return [gen.get_state() for gen in self.generators]

    def set_generator_states(self, states: Sequence[Tensor]) -> None:
        """Drop any prefetched draw and set the generators' states."""
        self._settle()
        for gen, state in zip(self.generators, states, strict=True):
            gen.set_state(state)

    def close(self) -> None:
        """Drop any prefetched draw (rewinding the generators) and stop the worker thread."""
        self._settle()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def langevin_move_(
    targets: list[Tensor],
    drifts: list[Tensor],
    step_size: float,
    noise: GaussianNoise | None,
    diffusion: float = 1.0,
    noise_scale: float = 1.0,
    workspace: Sequence[Tensor] | None = None,
    divide_by: Sequence[Tensor] | None = None,
) -> None:
    """In place: ``target <- target - h * drift + noise_scale * sqrt(2 h D) * xi``.

    ``diffusion`` D is a scalar. A diagonal preconditioner ``D = 1 / M`` (pSGLD's
    ``M = eps + sqrt(V)``) is passed as ``divide_by=M``: the move is then
    ``target - h * drift / M + noise_scale * sqrt(2 h) * rsqrt(M) * xi``, which spends no passes
    forming ``1/M``, ``drift/M`` or ``sqrt(2 h / M)``; ``workspace`` (tensors shaped like
    ``targets``, or ``divide_by`` itself, overwritten after the drift) receives ``rsqrt(M)``
    instead of freshly allocated tensors. With
    ``noise_scale == 0`` (or ``noise is None``) no noise is drawn: plain gradient descent.
    """
    flat_t = _tiled(targets)
    if divide_by is None:
        flat_d = _tiled(drifts, flat_t) if flat_t is not None else None
        if flat_d is not None:  # both tile one buffer: one op instead of one per tensor, same numbers
            flat_t.add_(flat_d, alpha=-step_size)
        else:
            torch._foreach_add_(targets, drifts, alpha=-step_size)
    else:
        torch._foreach_addcdiv_(targets, drifts, divide_by, value=-step_size)
    if noise is None or noise_scale == 0.0:
        return
    xi = noise.draw(targets)
    if divide_by is None:
        amp = noise_scale * math.sqrt(2.0 * step_size * diffusion)
        flat_xi = _tiled(xi, flat_t) if flat_t is not None else None
        if flat_xi is not None:
            flat_t.add_(flat_xi, alpha=amp)
        else:
            torch._foreach_add_(targets, xi, alpha=amp)
        return
    std = workspace if workspace is not None else [torch.empty_like(m) for m in divide_by]
    flat_m, flat_w = flat_view(divide_by), flat_view(std)
    if flat_m is not None and flat_w is not None and flat_m.numel() == flat_w.numel():
        torch.rsqrt(flat_m, out=flat_w)  # one op on the whole buffer: the same numbers as per tensor
    else:
        for out, m in zip(std, divide_by, strict=True):
            torch.rsqrt(m, out=out)
    torch._foreach_addcmul_(targets, xi, std, value=noise_scale * math.sqrt(2.0 * step_size))


def _tiled(tensors: Sequence[Tensor], like: Tensor | None = None) -> Tensor | None:
    """The flat buffer of a :class:`FlatTensors` (no check of the tiling: it is one by construction),
    None for any other sequence or, given ``like``, when its buffer differs from ``like`` in size or dtype."""
    if not isinstance(tensors, FlatTensors):
        return None
    flat = tensors.flat
    if like is not None and (flat.numel() != like.numel() or flat.dtype != like.dtype):
        return None
    return flat


class FlatTensors(tuple):
    """Tensors that are views tiling one contiguous buffer in order, carrying that buffer as ``flat``.

    A tuple, so the views and the buffer cannot drift apart; :func:`flat_view` returns ``flat``
    without re-checking the tiling (it sits on the per-step path of every sampler).
    """

    flat: Tensor

    def __new__(cls, views: Sequence[Tensor], flat: Tensor) -> FlatTensors:
        obj = super().__new__(cls, views)
        obj.flat = flat
        return obj


def flat_zeros_like(tensors: Sequence[Tensor]) -> Sequence[Tensor]:
    """Zeros shaped like ``tensors``, as views tiling one contiguous buffer in order (see :func:`flat_view`).

    Kernel state made this way lets elementwise updates that involve only state run as one op on
    the whole buffer instead of one op per tensor: the same numbers, far fewer dispatches.
    """
    if not tensors:
        return []
    if len({(t.dtype, t.device) for t in tensors}) > 1:
        return [torch.zeros_like(t, memory_format=torch.contiguous_format) for t in tensors]
    sizes = [t.numel() for t in tensors]
    buf = torch.zeros(sum(sizes), dtype=tensors[0].dtype, device=tensors[0].device)
    return FlatTensors([v.view(t.shape) for v, t in zip(buf.split(sizes), tensors, strict=True)], buf)


def flat_view(tensors: Sequence[Tensor]) -> Tensor | None:
    """One 1-D tensor aliasing ``tensors`` when they tile a single storage back to back (as
    :func:`flat_zeros_like` makes them), else ``None`` (e.g. state reloaded tensor by tensor)."""
    if isinstance(tensors, FlatTensors):
        return tensors.flat
    if not tensors:
        return None
    first = tensors[0]
    dtype, item = first.dtype, first.element_size()
    start = ptr = first.data_ptr()
    for t in tensors:
        if t.data_ptr() != ptr or t.dtype != dtype or not t.is_contiguous():
            return None
        ptr += t.numel() * item
    # back-to-back addresses inside the first tensor's storage: one storage (allocations never overlap)
    storage = first.untyped_storage()
    if ptr > storage.data_ptr() + storage.nbytes():
        return None
    return first.as_strided(((ptr - start) // item,), (1,), first.storage_offset())


class Workspace:
    """Scratch tensors shaped like a list of tensors, reallocated only when the layout changes.

    Each set is laid out by :func:`flat_zeros_like`, so :func:`flat_view` finds its flat buffer.
    """

    def __init__(self) -> None:
        self._key: tuple = ()
        self._like: FlatTensors | None = None
        self._bufs: list[Sequence[Tensor]] = []
        self._flat: list[Tensor | None] = []

    def get(self, like: Sequence[Tensor], count: int) -> tuple[list[Sequence[Tensor]], list[Tensor | None]]:
        """``count`` sets of scratch tensors shaped like ``like``, and each set's flat view (or None)."""
        if like is self._like and len(self._bufs) >= count:  # the same immutable state as last step
            return self._bufs[:count], self._flat[:count]
        key = tuple((t.shape, t.dtype, t.device) for t in like)
        if key != self._key or len(self._bufs) < count:
            self._bufs = [flat_zeros_like(like) for _ in range(count)]
            self._flat = [flat_view(b) for b in self._bufs]
            self._key = key
        self._like = like if isinstance(like, FlatTensors) else None
        return self._bufs[:count], self._flat[:count]


def reduce_sum(tensors: Sequence[Tensor], batch_ndim: int = 0) -> Tensor:
    """Sum of every element of every tensor, keeping the first ``batch_ndim`` dims."""
    parts = [t.sum(dim=tuple(range(batch_ndim, t.dim()))) if t.dim() > batch_ndim else t for t in tensors]
    return torch.stack(parts).sum(0)


KernelState = dict[str, Any]
"""A kernel's state: ``{state_name: [tensor per param]}`` for every name in ``Kernel.state_names``
(what checkpoints and ``optimizer.state_dict()`` keep), plus at most one :data:`SCRATCH` entry and
one :data:`STEP` entry (the steps it has taken)."""

STEP = "step"
"""The state entry counting the steps a state has taken (a Python int; absent: 0). It is the one step
counter t of a chain, the t its schedule is evaluated at (h_t, the noise scale, whether step t is
collected), as optax and BlackJAX keep ``count`` in the state: :func:`pib_bayes.sample`'s chain
groups and :class:`pib_bayes.pyro.LangevinKernel` read it (:func:`step_count`) and advance it once
per step (:func:`count_step`); a checkpoint saves it as the group's step."""


def step_count(state: KernelState) -> int:
    """The steps ``state`` has taken: the index t of its next step (:data:`STEP`).

    >>> state = {}
    >>> step_count(state), count_step(state), count_step(state), step_count(state)
    (0, 1, 2, 2)
    """
    return state.get(STEP, 0)


def count_step(state: KernelState) -> int:
    """Count one step of ``state`` (t <- t + 1, :data:`STEP`) and return the new count."""
    t = state[STEP] = state.get(STEP, 0) + 1
    return t

SCRATCH = "scratch"
"""The state entry holding a kernel's scratch buffers (a :class:`Workspace`, made by :func:`scratch_of`
on the first step): owned by the state, so one kernel object can step many states of different
shapes; never checkpointed (its contents are dead between steps)."""


def scratch_of(state: KernelState) -> Workspace:
    """The scratch :class:`Workspace` of ``state``, created (and stored under :data:`SCRATCH`) on first use.

    >>> state = {}
    >>> scratch_of(state) is scratch_of(state) is state[SCRATCH]
    True
    """
    ws = state.get(SCRATCH)
    if ws is None:
        ws = state[SCRATCH] = Workspace()
    return ws


class KernelInit(Protocol):
    """``init(params) -> state``: fresh state for the tensors ``params`` (see :class:`Kernel`).

    An ``init`` whose state holds per-chain scalars also takes ``batch_ndim`` (a keyword, default 0).
    """

    def __call__(self, params: list[Tensor], /) -> KernelState: ...


class KernelStep(Protocol):
    """``step(params, grads, state, step_size, noise, noise_scale=1.0, batch_ndim=0, with_stats=False)
    -> stats``: one move of ``params`` (and ``state``) in place, with
    ``target <- target - h * drift + noise_scale * sqrt(2 h D) * xi`` (:func:`langevin_move_`);
    returns ``{stat_name: tensor}`` (empty unless ``with_stats``)."""

    def __call__(self, params: list[Tensor], grads: list[Tensor], state: KernelState, step_size: float,
                 noise: GaussianNoise | None, noise_scale: float = 1.0, batch_ndim: int = 0,
                 with_stats: bool = False) -> dict[str, Tensor]: ...


_STEP_CALL = "step(params, grads, state, step_size, noise, noise_scale, batch_ndim=, with_stats=)"


def _check_callable(kernel: str, what: str, fn: object, args: tuple, kwargs: dict, call: str) -> None:
    if not callable(fn):
        raise TypeError(f"Kernel {kernel!r}: {what} must be callable as {call}, got {type(fn).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no readable signature (some builtins): nothing to check
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"Kernel {kernel!r}: {what} must accept {call}; its signature {what}{signature} "
                        f"does not ({err})") from None


@dataclass(frozen=True)
class Kernel:
    """A Langevin sampler as a pair of functions (BlackJAX style).

    A kernel holds no mutable state of its own (scratch buffers live in the state, see
    :func:`scratch_of`), so one kernel object may step any number of states, of any shapes.

    Attributes:
        name: registry name ("sgld", "psgld", "sghmc", "sgnht").
        state_names: per-tensor state buffers the kernel keeps (e.g. ``("momentum",)``).
        init: a :class:`KernelInit`, ``init(params) -> {state_name: [tensor per param]}``. A kernel
            whose state holds per-chain scalars (SGNHT's thermostat) takes
            ``init(params, batch_ndim=0)``, told how many leading dims of ``params`` are chain dims;
            call it through :meth:`init_state`.
        step: a :class:`KernelStep`, ``step(params, grads, state, step_size, noise, noise_scale=1.0,
            batch_ndim=0, with_stats=False) -> {stat_name: tensor}``; updates params and state in
            place. Callers pass the first six positionally and the last two by keyword; a step
            that cannot take them is a TypeError at construction.
        settings: the hyper-parameters it was built with (recorded in Posterior metadata).
        curvature_rule: how ``step_size="auto"`` maps the energy's lambda_max to the step size
            and settings (a :class:`~pib_bayes.samplers.step_size.CurvatureRule`); None: no "auto".

    Examples:
        >>> import torch
        >>> def init(params):
        ...     return {}
        >>> def step(params, grads, state, step_size, noise, noise_scale=1.0, batch_ndim=0, with_stats=False):
        ...     langevin_move_(params, grads, step_size, noise, 1.0, noise_scale)
        ...     return {}
        >>> k = Kernel("my_sgld", (), init, step)
        >>> w = [torch.zeros(2)]
        >>> _ = k.step(w, [torch.ones(2)], k.init_state(w), 0.5, None)
        >>> w[0]
        tensor([-0.5000, -0.5000])
        >>> Kernel("bad", (), init, lambda params, grads: {})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: Kernel 'bad': step must accept step(params, grads, state, step_size, noise, ...
    """

    name: str
    state_names: tuple[str, ...]
    init: KernelInit
    step: KernelStep
    settings: dict = field(default_factory=dict)
    curvature_rule: Any = None

    def __post_init__(self) -> None:
        if SCRATCH in self.state_names:
            raise ValueError(f"Kernel {self.name!r}: state_names: {SCRATCH!r} is reserved for scratch "
                             "buffers (see scratch_of); name the state buffer otherwise")
        if STEP in self.state_names:
            raise ValueError(f"Kernel {self.name!r}: state_names: {STEP!r} is reserved for the step count "
                             "(see step_count); name the state buffer otherwise")
        w = [torch.zeros(0)]
        _check_callable(self.name, "init", self.init, (w,), {}, "init(params)")
        _check_callable(self.name, "step", self.step, (w, w, {}, 0.1, None, 1.0),
                        {"batch_ndim": 0, "with_stats": False},
                        _STEP_CALL)

    def init_state(self, params: list[Tensor], batch_ndim: int = 0) -> KernelState:
        """``init(params)``, passing ``batch_ndim`` on to an ``init`` that takes it (see ``init``)."""
        if batch_ndim and "batch_ndim" in inspect.signature(self.init).parameters:
            return self.init(params, batch_ndim=batch_ndim)
        return self.init(params)
