"""The paper's fast IIW estimator Δθᵀ F Δθ (SPEC §3a), per layer, by forward-mode JVP.

``F = (1/n) Σ_i ∇l_i ∇l_iᵀ`` is the empirical Fisher of the per-example losses at the current
weights θ_S and ``Δθ = θ_S − θ₀``. The quadratic form never needs F:

    Δθᵀ F Δθ = (1/n) Σ_i (∇l_iᵀ Δθ)²,

and only the n directional derivatives ``∇_g l_iᵀ Δθ_g`` are needed. For Linear/Conv layers they
come from one forward and one backward pass to the layer outputs (``_layerwise.py``:
``∇_W l_iᵀ ΔW = ⟨∂l_i/∂z_i, ΔW a_i⟩``); for any other model from ONE forward-mode
``torch.func.jvp`` of the per-example-loss vector, the groups' restricted tangents batched with
``vmap``. The joint derivative along the whole Δθ is their sum, by linearity. No per-example
gradient and no F is ever formed. Cost (benchmarks/bench_iiw.py; docs/iiw.md): layerwise ≈ one
forward-backward pass, 1.05x faster than the minibatch method's gradients over the same examples;
forward-mode ≈ two to three forward passes per group.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap
from torch.utils.data import DataLoader

from .._validate import is_int
from ..data import as_tensors
from ..energy import LossFn, check_beta, resolve_loss
from ._groups import resolve_groups
from ._layerwise import plan_layerwise
from .paper import check_paper_batches, is_weight, paper_gradients, paper_iiw
from .result import IIWResult

__all__ = ["fisher", "directional_derivatives", "check_theta0", "zero_padding_rows"]

METHODS = ("jvp", "minibatch", "paper")
ENGINES = ("auto", "layerwise", "jvp")


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def check_theta0(model: nn.Module, theta_0: Mapping[str, Tensor] | nn.Module, names: Sequence[str]) -> dict:
    """``theta_0`` as name -> tensor for ``names``, validated against the model's parameter shapes.

    Accepts a state dict (extra buffer entries are ignored) or a module with the same parameters.
    """
    if isinstance(theta_0, nn.Module):
        theta_0 = dict(theta_0.named_parameters())
    if not isinstance(theta_0, Mapping):
        raise TypeError(f"theta_0: expected a state dict name -> tensor (e.g. the initial weights) or a "
                        f"module, "
                        f"got {type(theta_0).__name__}")
    params = dict(model.named_parameters())
    known = set(params) | {n for n, _ in model.named_buffers()}
    unknown = sorted(set(theta_0) - known)
    if unknown:
        raise ValueError(f"theta_0: unknown names {unknown}; the model's parameters are {list(params)}")
    out = {}
    for n in names:
        if n not in theta_0:
            raise ValueError(f"theta_0: missing parameter {n!r}; pass a value for every trainable parameter "
                             "(e.g. {k: v.clone() for k, v in model.state_dict().items()} before training)")
        v = torch.as_tensor(theta_0[n])
        if tuple(v.shape) != tuple(params[n].shape):
            raise ValueError(f"theta_0: {n!r} has shape {tuple(v.shape)}, the parameter has "
                             f"{tuple(params[n].shape)}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"theta_0: {n!r} contains NaN/Inf; pass finite prior-mean weights (e.g. the "
                             "initial weights, or pib_bayes.iiw.fit_prior_mean on a held-out split)")
        out[n] = v.detach().to(dtype=params[n].dtype, device=params[n].device)
    return out


@contextmanager
def _no_fused_attention() -> Iterator[None]:
    """Switch off the fused inference kernel of nn.TransformerEncoderLayer / nn.MultiheadAttention
    (``torch.backends.mha`` fast path) for the block: it has no forward- or reverse-mode derivative, and
    is taken whenever gradients look off (under ``no_grad`` or inside ``torch.func`` transforms)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


@contextmanager
def _plain_kernels() -> Iterator[None]:
    """oneDNN off and scaled_dot_product_attention on its math backend: kernels with forward-mode AD."""
    with torch.backends.mkldnn.flags(enabled=False):
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # torch < 2.3
            yield
            return
        with sdpa_kernel(SDPBackend.MATH):
            yield


def zero_padding_rows(model: nn.Module, delta: dict[str, Tensor]) -> dict[str, Tensor]:
    """``delta`` with the ``padding_idx`` row of every ``nn.Embedding`` weight set to 0 (differentiably).

    torch gives that row no gradient, so it carries no information in the per-example gradients;
    forward-mode AD would see it, the layerwise engine and per-example backprop do not."""
    for path, module in model.named_modules():
        name = f"{path}.weight" if path else "weight"
        if isinstance(module, nn.Embedding) and module.padding_idx is not None and name in delta:
            pad = torch.tensor([module.padding_idx], device=delta[name].device)
            delta[name] = delta[name].index_fill(0, pad, 0.0)
    return delta


def _batches(data: Any, chunk_size: int | None) -> Iterable[tuple[Tensor, Tensor]]:
    tensors = as_tensors(data)
    if tensors is None:
        yield from ((b[0], b[1]) for b in data)  # DataLoader, iterated once
        return
    x, y = tensors
    step = x.shape[0] if chunk_size is None else chunk_size
    for start in range(0, x.shape[0], step):
        yield x[start:start + step], y[start:start + step]


def _per_example(loss_fn: LossFn, out: Tensor, y: Tensor) -> Tensor:
    losses = loss_fn(out, y)
    if losses.dim() != 1 or losses.shape[0] != out.shape[0]:
        raise ValueError(f"loss_fn: must return one loss per example, shape ({out.shape[0]},), got "
                         f"{tuple(losses.shape)}; use reduction='none'")
    return losses


@contextmanager
def _explain_data_errors(model: nn.Module, loss_fn: LossFn, params: Mapping[str, Tensor],
                         fixed: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Iterator[None]:
    """Re-raise a failure inside the block as a ValueError naming ``data`` when a plain forward pass
    or the loss cannot take ``(x, y)`` (the original error chained); anything else unchanged."""
    try:
        yield
    except (RuntimeError, IndexError, TypeError, ValueError) as err:
        explained = _data_error(model, loss_fn, params, fixed, x, y)
        if explained is None:
            raise
        raise explained from err


def _data_error(model: nn.Module, loss_fn: LossFn, params: Mapping[str, Tensor], fixed: Mapping[str, Tensor],
                x: Tensor, y: Tensor) -> ValueError | None:
    """Why a batch failed, when it is the data: a ValueError naming ``data`` if a plain forward pass or
    the loss cannot take ``(x, y)``, None when both work (then the failure is something else).

    Called only after an exception, so the normal path pays nothing for it."""
    state = {**fixed, **{n: p.detach() for n, p in params.items()}}
    try:
        with torch.no_grad():
            out = functional_call(model, state, (x,))
    except Exception as e:  # noqa: BLE001 - any failure here means the model cannot take x
        return ValueError(f"data: the model cannot be evaluated on x of shape {tuple(x.shape)}, dtype "
                          f"{x.dtype} ({type(e).__name__}: {e}); x must have the input width and dtype the "
                          "model expects")
    try:
        with torch.no_grad():
            loss_fn(out, y)
    except Exception as e:  # noqa: BLE001 - the loss cannot take y for these outputs
        k = out.shape[-1] if out.dim() else 1
        return ValueError(f"data: the loss cannot be evaluated on y of shape {tuple(y.shape)}, dtype "
                          f"{y.dtype} for model outputs of shape {tuple(out.shape)} ({type(e).__name__}: "
                          f"{e}); for 'cross_entropy' y must hold integer class labels in [0, {k - 1}], "
                          "for 'gaussian' one float target per output")
    return None


def directional_derivatives(
    model: nn.Module,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    tangents: Sequence[Mapping[str, Tensor]],
    x: Tensor,
    y: Tensor,
    fixed: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """``(K, B)``: ``∇l_i(θ)ᵀ t_k`` for each of K tangents and each example of the batch, by forward-mode
    AD (one ``torch.func.jvp``, vmapped over the tangents). Differentiable in ``params``/``tangents``
    (it composes with reverse mode), which :class:`~pib_bayes.iiw.IIWRegularizer` uses."""
    fixed = dict(fixed or {})
    buffers = {n for n, _ in model.named_buffers()}

    def losses(p: dict[str, Tensor]) -> Tensor:
        # a module may update its buffers in place (BatchNorm's running statistics in training mode):
        # inside a torch.func transform only tensors made inside it may be mutated, and the model's own
        # buffers must not be, so it gets copies
        state = {n: (v.clone() if n in buffers else v) for n, v in fixed.items()}
        return _per_example(loss_fn, functional_call(model, {**state, **p}, (x,)), y)

    names = list(params)
    primal = {n: params[n] for n in names}

    def run() -> Tensor:
        if len(tangents) == 1:
            return jvp(losses, (primal,), ({n: tangents[0][n] for n in names},))[1].unsqueeze(0)
        stacked = {n: torch.stack([t[n] for t in tangents]) for n in names}
        try:
            return vmap(lambda t: jvp(losses, (primal,), (t,))[1])(stacked)
        except Exception:  # some modules cannot be vmapped; fall back to one JVP per tangent
            return torch.stack([jvp(losses, (primal,), ({n: t[n] for n in names},))[1] for t in tangents])

    with _explain_data_errors(model, loss_fn, params, fixed, x, y), _no_fused_attention():
        try:
            return run()
        except NotImplementedError as err:
            if "forward AD" not in str(err):
                raise
            # some fused CPU kernels have no forward-mode derivative (oneDNN's mkldnn_rnn_layer under
            # nn.LSTM/nn.GRU, the flash kernel of scaled_dot_product_attention); torch's plain kernels
            # for the same ops do
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # oneDNN's flags() warns about TF32
                with _plain_kernels():
                    return run()


def fisher(
    model: nn.Module,
    loss_fn: str | LossFn,
    data: tuple[Tensor, Tensor] | DataLoader | Any,
    theta_0: Mapping[str, Tensor] | nn.Module,
    *,
    groups: Mapping[str, Sequence[str]] | None = None,
    method: str = "jvp",
    beta: float | None = None,
    params: Mapping[str, Tensor] | None = None,
    chunk_size: int | None = 1024,
    engine: str = "auto",
    num_batches: int | str = 10,
    batch_size: int = 1000,
    seed: int = 0,
) -> IIWResult:
    """IIW per group by the Fisher / Δθ estimator (Wang et al. 2022, PIB, ICLR; SPEC §3a).

    ``method="jvp"`` (default, every example used):

        IIW_g = Δθ_gᵀ F_g Δθ_g = (1/n) Σ_i (∇_g l_iᵀ Δθ_g)²,  Δθ = θ_S − θ₀,

    with the n directional derivatives from one forward and one backward pass (Linear/Conv layers)
    or one forward-mode JVP per group (batched; any model), see ``engine``. The total
    is Σ_g IIW_g (block-diagonal F across groups, as in the paper); the joint form with the
    cross-group terms, Δθᵀ F Δθ, is in ``settings["joint_raw"]``.

    ``method="minibatch"`` (a minibatch-gradient Fisher, this library's variant, NOT the authors'
    code): ``IIW_g = (1/K) Σ_k (ḡ_{k,g}ᵀ Δθ_g)²`` with ḡ_k the gradient of the mean loss on minibatch
    k, each of the K = ``num_batches`` minibatches ``min(batch_size, n)`` distinct examples (drawn
    without replacement within a batch, independently across batches, seeded by ``seed``), the
    model in eval mode, weights AND biases of each group, squared per batch then averaged over
    the K batches. It is *not* on the per-example scale: E(ḡ_kᵀΔθ)² = (∇L_Sᵀ Δθ)² +
    Var_i(∇l_iᵀΔθ)/m (m = batch size), ≈ 1/m of the per-example value near a stationary point.

    ``method="paper"`` (the authors' ``compute_information_bp_fast``, SPEC §3d): K =
    ``num_batches`` minibatches of ``batch_size`` indices drawn WITH replacement, the model in
    TRAIN mode; the gradients are SUMMED over the batches and scaled by 1/N_b, N_b =
    ceil(n / batch_size) (not 1/K), and per WEIGHT tensor (``"weight" in name``; biases excluded)

        IIW_l = ((w_l − w0_l) · g_l)²,   g_l = (1/N_b) Σ_k ∇_{w_l} mean-loss(batch k);

    a group's value is the sum over its weight tensors (``settings["per_tensor"]`` has each).
    ``num_batches="all"`` is their ``_all_sample`` variant: the N_b consecutive batches. It
    differs from ``"minibatch"`` in four ways: it sums gradients before squaring (one square per
    tensor, not a mean of K squares), scales by 1/N_b (so the value depends on n), drops biases
    and runs in train mode. Only the raw scale is defined (``beta`` must be None); the value is
    random (``seed``).

    Scales (``"jvp"``, ``"minibatch"``): ``raw_per_group``/``raw_total`` are always the paper's Δθᵀ F Δθ
    (``"paper"``: the authors' value above, raw only). When ``beta`` is
    given, ``per_group``/``total`` are in nats, ``½ Δθᵀ F Δθ / β`` (the first-order term of the
    channel formula ½ log det(I + W⁻¹B) with W⁻¹ ≈ F/β; accurate when it is small); otherwise
    they repeat the raw values with ``units="raw"``.

    Args:
        model: the network at θ_S (its current trainable parameters, or ``params``). Evaluated in
            ``eval()`` mode so that every loss is per example (BatchNorm statistics, no dropout);
            ``method="paper"`` runs it in train mode, as the authors' code (its mode is restored).
        loss_fn: per-example loss ``(output, target) -> (B,)``, or ``"cross_entropy"``/``"gaussian"``.
        data: ``(x, y)`` tensors, a TensorDataset, or a DataLoader (iterated once).
        theta_0: the prior mean θ₀ (initial weights or :func:`~pib_bayes.iiw.fit_prior_mean`),
            a state dict or a module.
        groups: ``{group: [parameter names]}``; default one group per layer (module prefix).
        beta: the PIB β, for the nats scale.
        params: evaluate at these weights instead of the module's own (e.g. a posterior draw).
        chunk_size: examples per pass (memory); None = all at once.
        engine: how ``method="jvp"`` gets the directional derivatives ``∇_g l_iᵀ Δθ_g`` (same values
            to float rounding): ``"jvp"`` = ``torch.func.jvp`` vmapped over the groups (any model);
            ``"layerwise"`` = one forward and one backward pass to the layer outputs,
            ``∇_W l_iᵀ ΔW = ⟨∂l_i/∂z_i, ΔW a_i⟩`` for ``z = W a`` (every measured parameter must be
            the weight/bias of an ``nn.Linear``/``nn.Conv{1,2,3}d``, or the affine parameters of an
            ``nn.BatchNorm{1,2,3}d`` (running statistics) / ``nn.LayerNorm`` (tangent
            ``x̂ ⊙ Δγ + Δβ``), or an ``nn.Embedding`` weight, used by that module alone; assumes
            examples do not interact in the forward pass, true in eval mode for standard layers);
            ``"auto"`` (default) = per group: layerwise for the groups it covers, one batched JVP
            for the others (e.g. attention's in/out projections, a tied weight, an LSTM). The choice
            is in ``settings["engine"]`` (``"layerwise"``, ``"jvp"`` or ``"mixed"``) and per group in
            ``settings["engines"]``.
        num_batches, batch_size, seed: the ``"minibatch"`` and ``"paper"`` methods (``"paper"`` also
            takes ``num_batches="all"``); ``seed`` seeds a ``torch.Generator`` for the batch draws.

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    >>> theta_0 = {k: v.clone() for k, v in net.state_dict().items()}
    >>> with torch.no_grad():
    ...     _ = net[0].weight.add_(0.1)
    >>> r = fisher(net, "gaussian", (torch.randn(64, 3), torch.randn(64, 1)), theta_0, beta=0.01)
    >>> r.groups, r.units, r.raw_per_group["2"] == 0.0  # only layer "0" moved
    (['0', '2'], 'nats', True)
    >>> p = fisher(net, "gaussian", (torch.randn(64, 3), torch.randn(64, 1)), theta_0, method="paper",
    ...            batch_size=16, num_batches=10, seed=0)   # the authors' estimator, weights only
    >>> p.method, p.settings["N_b"], sorted(p.settings["per_tensor"])
    ('fisher-paper', 4, ['0.weight', '2.weight'])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    if beta is not None:
        if method == "paper":
            raise ValueError("beta: method='paper' has only the authors' raw scale ((Δw·g)² per weight "
                             "tensor is not a per-example Fisher form, so ½ΔθᵀFΔθ/β does not apply); "
                             "leave beta=None")
        beta = check_beta(beta)
    if method == "paper":
        check_paper_batches(num_batches, batch_size)
    loss, _ = resolve_loss(loss_fn)
    trainable = _trainable(model)
    names = list(trainable)
    if not names:
        raise ValueError("model: has no trainable parameters")
    grouped = resolve_groups(names, groups)
    measured = [n for n in names if any(n in g for g in grouped.values())]
    theta0 = check_theta0(model, theta_0, measured)
    if params is not None:
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ValueError(f"params: unknown parameter names {unknown}")
        theta = {n: (params[n] if n in params else trainable[n]).detach() for n in names}
        for n in params:
            if tuple(theta[n].shape) != tuple(trainable[n].shape):
                raise ValueError(f"params: {n!r} has shape {tuple(theta[n].shape)}, expected "
                                 f"{tuple(trainable[n].shape)}")
    else:
        theta = {n: p.detach() for n, p in trainable.items()}
    for n in measured:
        if not bool(torch.isfinite(theta[n]).all()):
            where = "params" if params is not None and n in params else "model"
            raise ValueError(f"{where}: the weights {n!r} contain NaN/Inf (a diverged run?); estimate IIW at "
                             "finite weights")
    delta = zero_padding_rows(model, {n: theta[n] - theta0[n] for n in measured})
    fixed = {n: b for n, b in model.named_buffers()}
    fixed.update({n: p.detach() for n, p in model.named_parameters() if not p.requires_grad})

    group_names = list(grouped)
    if method == "paper":
        return _paper_result(model, loss, data, theta, delta, grouped, fixed, num_batches, batch_size, seed)

    def tangents() -> list[dict[str, Tensor]]:
        # the joint derivative along Δθ is the sum of the groups' (linearity): no extra JVP for it
        return [{n: delta[n] if n in grouped[g] else torch.zeros_like(theta[n]) for n in names}
                for g in group_names]

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), _no_fused_attention():
            if method == "jvp":
                plan = None if engine == "jvp" else plan_layerwise(model, grouped,
                                                                    allow_partial=engine == "auto")
                if engine == "layerwise" and plan is None:
                    raise ValueError("engine: 'layerwise' needs every measured parameter to be the weight or "
                                     "bias of an nn.Linear/Conv1d/2d/3d/BatchNorm1d/2d/3d/LayerNorm/"
                                     "Embedding used by that module alone; use engine='jvp' (or 'auto') "
                                     "for this model")
                covered = set(plan.covered) if plan is not None else set()
                rest = [gi for gi in range(len(group_names)) if gi not in covered]
                along = [t for gi, t in enumerate(tangents()) if gi in rest]

                def derivs(x, y):
                    if plan is None:
                        return directional_derivatives(model, loss, theta, along, x, y, fixed)
                    with _explain_data_errors(model, loss, theta, fixed, x, y):
                        d = plan.derivatives(model, partial(_per_example, loss), theta, delta,
                                             len(group_names), x, y, fixed)
                    if rest:  # the groups the layerwise identity does not cover: JVP, those groups only
                        d[rest] = directional_derivatives(model, loss, theta, along, x, y, fixed).to(d.dtype)
                    return d
                sums, count = _jvp_sums(derivs, data, chunk_size)
                per = {g: ("layerwise" if gi in covered else "jvp") for gi, g in enumerate(group_names)}
                settings: dict[str, Any] = {
                    "examples": count, "chunk_size": chunk_size, "engines": per,
                    "engine": "jvp" if not covered else ("layerwise" if not rest else "mixed")}
            else:
                sums, count = _minibatch_sums(model, loss, theta, tangents(), data, num_batches, batch_size,
                                              seed, fixed)
                settings = {"num_batches": num_batches, "batch_size": batch_size, "seed": seed,
                            "note": "minibatch-gradient Fisher: ≈ 1/batch_size of the per-example scale"}
    finally:
        for m, training in modes:  # every module back in its own mode
            m.training = training
    raw = (sums / count).tolist()
    raw_per_group = dict(zip(group_names, raw[:-1], strict=True))
    raw_total = float(sum(raw[:-1]))
    settings.update(joint_raw=float(raw[-1]), total_rule="sum of groups (block-diagonal F)", beta=beta,
                    raw_scale="Δθᵀ F Δθ (Wang et al. 2022)", nats_scale="½ Δθᵀ F Δθ / β")
    if beta is None:
        per_group, total, units = dict(raw_per_group), raw_total, "raw"
    else:
        per_group = {g: 0.5 * v / beta for g, v in raw_per_group.items()}
        total, units = 0.5 * raw_total / beta, "nats"
    return IIWResult(per_group, float(total), f"fisher-{method}", units, settings, raw_per_group, raw_total)


def _paper_result(model, loss, data, theta, delta, grouped, fixed, num_batches, batch_size,
                  seed) -> IIWResult:
    """``method="paper"``: the authors' estimator (SPEC §3d, :mod:`pib_bayes.iiw.paper`)."""
    tensors = as_tensors(data)
    if tensors is None:
        raise ValueError("data: method='paper' needs (x, y) tensors or a TensorDataset")
    x, y = tensors
    weights = [n for members in grouped.values() for n in members if is_weight(n)]
    empty = [g for g, members in grouped.items() if not any(is_weight(n) for n in members)]
    if empty:
        raise ValueError(f"groups: method='paper' measures weight tensors only (the authors' rule: 'weight' "
                         f"in the parameter name); groups {empty} have none; leave them out or use "
                         "method='jvp'")
    gen = torch.Generator().manual_seed(seed)
    with _explain_data_errors(model, loss, theta, fixed, x, y):
        grads = paper_gradients(model, partial(_per_example, loss), x, y, weights, params=theta, fixed=fixed,
                                batch_size=batch_size, num_batches=num_batches, generator=gen)
    per_tensor = paper_iiw(delta, grads)
    raw_per_group = {g: float(sum(per_tensor[n] for n in members if is_weight(n)))
                     for g, members in grouped.items()}
    raw_total = float(sum(raw_per_group.values()))
    n_b = -(-x.shape[0] // batch_size)
    settings = {"num_batches": num_batches, "batch_size": batch_size, "seed": seed, "examples": x.shape[0],
                "N_b": n_b, "scale": "1/N_b, N_b = ceil(n / batch_size)", "mode": "train",
                "draws": "consecutive batches" if num_batches == "all" else "with replacement",
                "per_tensor": per_tensor, "total_rule": "sum of weight tensors (biases excluded)",
                "beta": None,
                "raw_scale": "((w_l - w0_l) . g_l)^2 per weight tensor (the authors' code)"}
    return IIWResult(dict(raw_per_group), raw_total, "fisher-paper", "raw", settings, raw_per_group,
                     raw_total)


def _jvp_sums(derivs, data, chunk_size) -> tuple[Tensor, int]:
    if chunk_size is not None and (not is_int(chunk_size)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: must be an int >= 1 or None, got {chunk_size!r}")
    sums: Tensor | float = 0.0
    count = 0
    for x, y in _batches(data, chunk_size):
        d = derivs(x, y).to(torch.float64)  # (G, B)
        sums = sums + torch.cat([d.square().sum(1), d.sum(0).square().sum()[None]])
        count += x.shape[0]
    if count == 0:
        raise ValueError("data: is empty")
    return torch.as_tensor(sums), count


def _minibatch_sums(model, loss, theta, tangents, data, num_batches, batch_size, seed,
                    fixed) -> tuple[Tensor, int]:
    tensors = as_tensors(data)
    if tensors is None:
        raise ValueError("data: method='minibatch' needs (x, y) tensors or a TensorDataset")
    x, y = tensors
    n = x.shape[0]
    for label, v in (("num_batches", num_batches), ("batch_size", batch_size)):
        if not is_int(v) or v < 1:
            raise ValueError(f"{label}: must be an int >= 1, got {v!r}")
    m = min(batch_size, n)
    gen = torch.Generator().manual_seed(seed)
    names = list(theta)
    sums: Tensor | float = 0.0
    for _ in range(num_batches):
        idx = torch.randperm(n, generator=gen)[:m]
        p = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        with torch.enable_grad():
            with _explain_data_errors(model, loss, theta, fixed, x[idx], y[idx]):
                mean_loss = _per_example(loss, functional_call(model, {**fixed, **p}, (x[idx],)),
                                         y[idx]).mean()
            grads = torch.autograd.grad(mean_loss, [p[k] for k in names], allow_unused=True)
        g = {k: (gr if gr is not None else torch.zeros_like(theta[k]))
             for k, gr in zip(names, grads, strict=True)}
        dots = torch.stack([sum((g[k] * t[k]).sum() for k in names) for t in tangents]).to(torch.float64)
        sums = sums + torch.cat([dots, dots.sum()[None]]).square()
    return torch.as_tensor(sums), num_batches


def per_example_gradient_quadratic(model: nn.Module, loss_fn: LossFn, data: tuple[Tensor, Tensor],
                                   delta: Mapping[str, Tensor]) -> float:
    """Brute-force reference (tests, benchmark): (1/n) Σ_i (∇l_iᵀ Δθ)² with one backward per example."""
    x, y = data
    params = _trainable(model)
    total = 0.0
    for i in range(x.shape[0]):
        li = _per_example(loss_fn, model(x[i:i + 1]), y[i:i + 1]).sum()
        grads = torch.autograd.grad(li, list(params.values()), allow_unused=True)
        dot = sum(float((g * delta[n]).sum()) for (n, _), g in zip(params.items(), grads, strict=True)
                  if g is not None and n in delta)
        total += dot * dot
    return total / x.shape[0]

