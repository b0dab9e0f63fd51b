"""PIB-SGD, the PIB authors' training procedure, and its calibrated Langevin counterpart (SPEC §1, §3d, §5).

:func:`train_pib` trains ``model`` against ``L_S + β·IIW`` in one of two modes.

``mode="paper"`` transcribes the authors' fine-tune (RyanWangZf/PAC-Bayes-IB, ``src/pib_utils.py``:
``train_SGLD``, called by ``train_pib`` from ``run_vgg_PIB.py``). Per epoch e, the steps are

    v <- 0.9 v + (∇ mean-CE_B(θ) + c_l),   θ <- θ − lr·v,   θ <- θ + σ ξ,   ξ ~ N(0, I),  σ = 1e-5,

with σ = √noise_scale = √1e-10 fixed (not tied to lr), lr ×0.1 at epochs 50 and 80. The penalty
gradient c_l is frozen for the epoch: at the end of epoch e−1 their code builds
``β Σ_l ((w_l − w0_l)·g_l)²`` with ``g_l`` the authors' IIW gradient (:mod:`pib_bayes.iiw.paper`,
``torch.autograd.grad`` without ``create_graph``, so g is a constant) and calls
``backward(retain_graph=True)`` on that same graph at every step of epoch e. The graph holds the values
of epoch e−1, so each step adds

    c_l = 2 β (Δθ_l · g_l) g_l,   Δθ_l, g_l at the end of epoch e−1   (c = 0 in epoch 0).

Early stopping on validation accuracy (patience 10) restores the best checkpoint; one checkpoint predicts.

``mode="langevin"`` is the sound counterpart: SGLD (:class:`pib_bayes.optim.SGLD`, noise √(2h) at the step h)
on the energy

    U_B(θ) = L_B(θ)/β' − log p(θ) + β·IIW_B(θ),

with L_B/β' − log p from :class:`pib_bayes.Energy` and β·IIW_B the per-example Fisher penalty of
:class:`~pib_bayes.iiw.IIWRegularizer` on the same minibatch (differentiated every step). The draws kept after
burn-in form a :class:`~pib_bayes.Posterior`, whose predictive averages them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._validate import check_count, is_real
from .data import as_tensors
from .energy import Energy, check_beta, check_positive_finite, resolve_loss
from .iiw.fisher import _per_example, check_theta0, fisher
from .iiw.paper import check_paper_batches, is_weight, paper_gradients
from .iiw.regularizer import IIWRegularizer
from .optim import SGLD
from .posterior import Posterior
from .prior import GaussianPrior, Prior

__all__ = ["train_pib", "PIBTrainResult", "MODES"]

MODES = ("paper", "langevin")


@dataclass
class PIBTrainResult:
    """What :func:`train_pib` returns.

    Attributes:
        model: the trained module (trained in place, returned in eval mode): for ``"paper"`` with
            validation data, at the best checkpoint; for ``"langevin"``, the last iterate.
        mode: ``"paper"`` or ``"langevin"``.
        history: per epoch: ``epoch``, ``lr``, ``train_loss`` (mean minibatch CE), ``train_acc``, ``iiw``
            (paper: the authors' Σ_l IIW_l that sets the next epoch's penalty; langevin: the per-example
            Fisher Δθᵀ F Δθ summed over layers, raw scale), ``val_acc`` (NaN without validation data).
        best_epoch: the epoch whose weights ``model`` holds (paper mode with validation data), else None.
        best_state: ``model.state_dict()`` at ``best_epoch`` (a copy), else None.
        stopped_early: whether early stopping ended the run.
        posterior: langevin mode: the kept draws (chain 1, draw M); else None.
        settings: every setting of the run.
    """

    model: nn.Module
    mode: str
    history: dict[str, list[float]]
    best_epoch: int | None = None
    best_state: dict[str, Tensor] | None = None
    stopped_early: bool = False
    posterior: Posterior | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities: softmax of the one checkpoint (paper), or the posterior predictive
        (1/M) Σ_m softmax(f(x; w_m)) over the kept draws (langevin)."""
        if self.posterior is not None:
            return self.posterior.predict(x).mean
        was = self.model.training
        self.model.eval()
        try:
            return torch.softmax(self.model(x), -1)
        finally:
            self.model.train(was)


def _streams(seed: int) -> tuple[torch.Generator, torch.Generator, torch.Generator]:
    """Independent generators (shuffles, IIW batch draws, noise) from ``np.random.SeedSequence(seed)``."""
    states = np.random.SeedSequence(int(seed)).spawn(3)
    return tuple(torch.Generator().manual_seed(int(s.generate_state(1, np.uint64)[0] >> np.uint64(1)))
                 for s in states)  # type: ignore[return-value]


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 4096) -> float:
    was = model.training
    model.eval()
    try:
        hits = sum(int((model(x[i:i + chunk]).argmax(-1) == y[i:i + chunk]).sum())
                   for i in range(0, len(x), chunk))
    finally:
        model.train(was)
    return hits / max(len(x), 1)


def paper_penalty(model: nn.Module, loss_fn: Any, x: Tensor, y: Tensor, theta_0: Mapping[str, Tensor], *,
                  beta: float, batch_size: int = 1000, num_batches: int | str = 10,
                  generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The authors' penalty at the current weights: ``(c, iiw)`` with, per weight tensor l,
    ``iiw[l] = (Δθ_l · g_l)²`` and ``c[l] = 2 β (Δθ_l · g_l) g_l`` = ∇_θ β Σ_l (Δθ_l · g_l)² with g held
    constant (g from :func:`pib_bayes.iiw.paper.paper_gradients`, Δθ = θ − θ₀).

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> net = nn.Linear(3, 2)
    >>> theta_0 = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    >>> c, iiw = paper_penalty(net, "cross_entropy", torch.randn(20, 3), torch.randint(0, 2, (20,)), theta_0,
    ...                        beta=0.1, batch_size=10, generator=torch.Generator().manual_seed(0))
    >>> sorted(c), sorted(iiw)   # weights only
    (['weight'], ['weight'])
    """
    loss, _ = resolve_loss(loss_fn)
    names = [n for n, p in model.named_parameters() if p.requires_grad and is_weight(n)]
    grads = paper_gradients(model, lambda out, t: _per_example(loss, out, t), x, y, names,
                            batch_size=batch_size, num_batches=num_batches, generator=generator)
    params = dict(model.named_parameters())
    c, iiw = {}, {}
    for n in names:
        s = (params[n].detach() - theta_0[n]).flatten().dot(grads[n].flatten())
        iiw[n] = float(s) ** 2
        c[n] = 2.0 * beta * s * grads[n]
    return c, iiw


def train_pib(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    beta: float = 0.1,
    mode: str = "paper",
    theta_0: Mapping[str, Tensor] | nn.Module | None = None,
    val_data: Any = None,
    epochs: int = 100,
    lr: float | None = None,
    batch_size: int = 32,
    milestones: Sequence[int] | None = None,
    gamma: float = 0.1,
    patience: int = 10,
    momentum: float = 0.9,
    noise_std: float = 1e-5,
    iiw_batch_size: int = 1000,
    iiw_num_batches: int | str = 10,
    gibbs_beta: float | None = None,
    prior: Prior | None = None,
    burn_in: int | None = None,
    thin: int = 1,
    seed: int = 0,
) -> PIBTrainResult:
    """Train ``model`` (in place) against L_S + β·IIW: the PIB authors' PIB-SGD or its Langevin counterpart.

    ``mode="paper"`` (Wang et al. 2022, their ``train_SGLD``; see :mod:`pib_bayes.pib_train`): SGD with
    momentum 0.9 at lr 1e-4 on the mean CE of batches of ``batch_size`` (a fresh shuffle per epoch), the
    penalty gradient ``c_l = 2β(Δθ_l·g_l)g_l`` (the authors' IIW gradient g, computed at the end of the
    previous epoch in train mode on all of ``data``, frozen for the epoch; none in epoch 0) added to every
    step's gradient, then ``θ += noise_std·ξ`` (std 1e-5 = √1e-10 whatever lr is); lr × ``gamma`` at the
    start of each epoch in ``milestones`` (50, 80); with ``val_data``, early stopping after ``patience``
    epochs without a strictly higher validation accuracy (epoch 0 counts as one, as in their code), and
    the best checkpoint restored. ``beta=0`` is the ablation without the penalty. Two choices
    differ from their code, which (a) saves no checkpoint at epoch 0 and (b) keeps the last weights when
    the epochs run out: here epoch 0 is a checkpoint and the best one is always restored. Their
    pretraining (Adam, 20 epochs) is not part of this function: pass a pretrained ``model``.

    ``mode="langevin"``: :class:`pib_bayes.optim.SGLD` (``θ <- θ − h ∇U_B + √(2h) ξ``) on
    ``U_B = L_B/β' − log p(θ) + β·IIW_B`` (β' = ``gibbs_beta``, default 1/n; p = ``prior``, default
    N(θ₀, I); IIW_B the per-example Fisher of :class:`~pib_bayes.iiw.IIWRegularizer` on the minibatch),
    step h = ``lr`` (default 1e-4·β', the drift of SGD at lr 1e-4), × ``gamma`` at ``milestones``
    (default none); after ``burn_in`` epochs (default epochs // 2) every ``thin``-th step is kept, and
    :attr:`PIBTrainResult.posterior` averages the kept draws in its predictive.

    Args:
        model: a classifier (logits); pretrained for ``"paper"``.
        loss_fn: per-example loss (``reduction="none"``) or ``"cross_entropy"``.
        data: the training sample S, ``(x, y)`` tensors or a TensorDataset.
        beta: the penalty weight β (the authors: 0.1).
        theta_0: the prior mean θ₀ of Δθ = θ − θ₀ (e.g. :func:`~pib_bayes.iiw.fit_prior_mean` with
            ``**PAPER_PRIOR``); default: the model's weights at the call.
        val_data: ``(x, y)`` for validation accuracy (and, in paper mode, early stopping).
        epochs, lr, batch_size, milestones, gamma, patience, momentum, noise_std: as above.
        iiw_batch_size, iiw_num_batches: the authors' IIW estimator (1000, 10 as in their MLP class;
            their VGG class, which their CIFAR-10 PIB-SGD run uses, draws batches of 200; or ``"all"``).
        gibbs_beta, prior, burn_in, thin: langevin mode only.
        seed: seeds three independent streams (shuffles, IIW batches, noise).

    Returns:
        :class:`PIBTrainResult`.

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    >>> net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> r = train_pib(net, "cross_entropy", (x, y), val_data=(x[:16], y[:16]), epochs=3, lr=1e-2,
    ...               iiw_batch_size=32)
    >>> len(r.history["iiw"]), r.best_epoch in (0, 1, 2)
    (3, True)
    >>> s = train_pib(net, "cross_entropy", (x, y), mode="langevin", epochs=4, batch_size=16)
    >>> s.posterior.num_draws   # 2 kept epochs x 4 steps
    8
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not is_real(beta) or not 0 <= beta < np.inf:
        raise ValueError(f"beta: the penalty weight must be a finite float >= 0 (the authors: 0.1; 0 is the "
                         f"ablation without the IIW term), got {beta!r}")
    beta = float(beta)
    loss, _ = resolve_loss(loss_fn)
    tensors = as_tensors(data)
    if tensors is None:
        raise ValueError("data: train_pib needs (x, y) tensors or a TensorDataset")
    x, y = tensors
    n = x.shape[0]
    if n == 0:
        raise ValueError("data: is empty")
    val = None
    if val_data is not None:
        val = as_tensors(val_data)
        if val is None:
            raise ValueError("val_data: needs (x, y) tensors or a TensorDataset")
    epochs = check_count("epochs", epochs, 1)
    batch_size = check_count("batch_size", batch_size, 1)
    patience = check_count("patience", patience, 1)
    thin = check_count("thin", thin, 1)
    seed = check_count("seed", seed, 0)
    check_paper_batches(iiw_num_batches, iiw_batch_size)
    gamma = check_positive_finite("gamma", gamma)
    if mode == "paper":
        milestones = (50, 80) if milestones is None else milestones
    if milestones is not None and not isinstance(milestones, (list, tuple)):
        raise ValueError(f"milestones: expected a list of epochs at which lr is multiplied by gamma, e.g. "
                         f"[50, 80], got {milestones!r}")
    milestones = tuple(check_count("milestones", m, 0) for m in (milestones or ()))
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("model: has no trainable parameters")
    if theta_0 is None:
        theta_0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    theta0 = check_theta0(model, theta_0, names)
    shuffle_gen, iiw_gen, noise_gen = _streams(seed)
    settings: dict[str, Any] = {"mode": mode, "beta": beta, "epochs": epochs, "batch_size": batch_size,
                                "milestones": list(milestones), "gamma": gamma, "seed": seed, "n": n,
                                "iiw_batch_size": iiw_batch_size, "iiw_num_batches": iiw_num_batches}
    if mode == "paper":
        if gibbs_beta is not None or prior is not None or burn_in is not None or thin != 1:
            raise ValueError("gibbs_beta: gibbs_beta, prior, burn_in and thin belong to mode='langevin'")
        lr = 1e-4 if lr is None else check_positive_finite("lr", lr)
        if not is_real(momentum) or not 0 <= momentum < 1:
            raise ValueError(f"momentum: must be in [0, 1) (the authors use 0.9), got {momentum!r}")
        if not is_real(noise_std) or not 0 <= noise_std < np.inf:
            raise ValueError(f"noise_std: must be a finite float >= 0 (the authors: sqrt(1e-10) = 1e-5), got "
                             f"{noise_std!r}")
        settings.update(lr=lr, momentum=float(momentum), noise_std=float(noise_std), patience=patience,
                        penalty="c_l = 2 beta (dtheta_l . g_l) g_l, frozen per epoch (none in epoch 0)")
        return _train_paper(model, loss, x, y, val, theta0, names, lr, momentum, float(noise_std), beta,
                            epochs, batch_size, milestones, gamma, patience, iiw_batch_size, iiw_num_batches,
                            shuffle_gen, iiw_gen, noise_gen, settings)
    for label, value, default in (("momentum", momentum, 0.9), ("noise_std", noise_std, 1e-5),
                                  ("patience", patience, 10)):
        if value != default:
            raise ValueError(f"{label}: belongs to mode='paper' (the Langevin mode has no momentum, its "
                             "noise is sqrt(2h) at the step h, and it runs every epoch); leave it at its "
                             "default")
    gibbs_beta = 1.0 / n if gibbs_beta is None else check_beta(gibbs_beta)
    lr = 1e-4 * gibbs_beta if lr is None else check_positive_finite("lr", lr)
    burn_in = epochs // 2 if burn_in is None else check_count("burn_in", burn_in, 0)
    if burn_in >= epochs:
        raise ValueError(f"burn_in: must be < epochs ({epochs}) so that some draws are kept, got {burn_in}")
    if prior is None:
        prior = GaussianPrior.from_module(model, std=1.0, mean={k: theta0[k] for k in names})
    settings.update(lr=lr, gibbs_beta=gibbs_beta, burn_in=burn_in, thin=thin, prior=repr(prior))
    return _train_langevin(model, loss, loss_fn, x, y, val, theta0, names, lr, beta, gibbs_beta, prior,
                           epochs, batch_size, milestones, gamma, burn_in, thin, shuffle_gen, noise_gen,
                           settings)


def _new_history() -> dict[str, list[float]]:
    return {k: [] for k in ("epoch", "lr", "train_loss", "train_acc", "iiw", "val_acc")}


def _start_epoch(opt: torch.optim.Optimizer, lr: float, epoch: int, milestones: Sequence[int], gamma: float,
                 n: int, batch_size: int, shuffle_gen: torch.Generator) -> tuple[float, list[Tensor]]:
    """An epoch of both modes begins alike: the learning rate times ``gamma`` at each milestone, then
    one permutation of the n examples cut into minibatches of ``batch_size`` (the last may be short)."""
    if epoch in milestones:
        lr *= gamma
        for group in opt.param_groups:
            group["lr"] = lr
    perm = torch.randperm(n, generator=shuffle_gen)
    return lr, [perm[start:start + batch_size] for start in range(0, n, batch_size)]


def _train_paper(model, loss, x, y, val, theta0, names, lr, momentum, noise_std, beta, epochs, batch_size,
                 milestones, gamma, patience, iiw_batch_size, iiw_num_batches, shuffle_gen, iiw_gen,
                 noise_gen, settings) -> PIBTrainResult:
    params = [p for k, p in model.named_parameters() if k in names]
    by_name = dict(model.named_parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    history = _new_history()
    penalty: dict[str, Tensor] = {}
    best_acc, best_epoch, best_state, counter, stopped = -1.0, None, None, 0, False
    n = x.shape[0]
    for epoch in range(epochs):
        lr, batches = _start_epoch(opt, lr, epoch, milestones, gamma, n, batch_size, shuffle_gen)
        model.train()
        total = 0.0
        steps = 0
        for idx in batches:
            opt.zero_grad()
            batch_loss = _per_example(loss, model(x[idx]), y[idx]).mean()
            batch_loss.backward()
            with torch.no_grad():
                for k, c in penalty.items():
                    g = by_name[k].grad
                    if g is None:
                        by_name[k].grad = c.clone()
                    else:
                        g.add_(c)
            opt.step()
            with torch.no_grad():
                for p in params:
                    if p.grad is not None and noise_std > 0:
                        xi = torch.randn(p.shape, generator=noise_gen, dtype=p.dtype)
                        p.add_(noise_std * xi.to(p.device))
            total += float(batch_loss.detach())
            steps += 1
        # the authors' IIW at the end of the epoch, in train mode: its gradient is next epoch's penalty
        c, iiw = paper_penalty(model, loss, x, y, theta0, beta=beta, batch_size=iiw_batch_size,
                               num_batches=iiw_num_batches, generator=iiw_gen)
        penalty = c if beta > 0 else {}
        history["epoch"].append(epoch)
        history["lr"].append(lr)
        history["train_loss"].append(total / steps)
        history["train_acc"].append(_accuracy(model, x, y))
        history["iiw"].append(float(sum(iiw.values())))
        if val is None:
            history["val_acc"].append(float("nan"))
            continue
        acc = _accuracy(model, *val)
        history["val_acc"].append(acc)
        # their rule: epoch 0 sets the best accuracy but counts as an epoch without improvement; a later
        # epoch improves only with a strictly higher accuracy (here epoch 0 is also a checkpoint)
        if epoch == 0 or acc > best_acc:
            best_acc, best_epoch = acc, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        counter = 0 if (epoch > 0 and best_epoch == epoch) else counter + 1
        if counter >= patience:
            stopped = True
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return PIBTrainResult(model, "paper", history, best_epoch, best_state, stopped, None, settings)


def _train_langevin(model, loss, loss_fn, x, y, val, theta0, names, lr, beta, gibbs_beta, prior, epochs,
                    batch_size, milestones, gamma, burn_in, thin, shuffle_gen, noise_gen,
                    settings) -> PIBTrainResult:
    energy = Energy(model, loss_fn, prior=prior, beta=gibbs_beta)
    reg = IIWRegularizer(model, loss_fn, theta0, beta=beta) if beta > 0 else None
    params = [p for k, p in model.named_parameters() if k in names]
    opt = SGLD(params, lr=lr, generator=noise_gen)
    history = _new_history()
    kept: dict[str, list[Tensor]] = {k: [] for k in names}
    energies: list[float] = []
    losses: list[float] = []
    n = x.shape[0]
    step = 0
    for epoch in range(epochs):
        lr, batches = _start_epoch(opt, lr, epoch, milestones, gamma, n, batch_size, shuffle_gen)
        model.train()
        total, steps = 0.0, 0
        for idx in batches:
            opt.zero_grad()
            u = energy.of_module(x[idx], y[idx])
            if reg is not None:
                u = u + reg(x[idx], y[idx])
            u.backward()
            opt.step()
            step += 1
            with torch.no_grad():
                batch_loss = float(_per_example(loss, model(x[idx]), y[idx]).mean())
            total += batch_loss
            steps += 1
            if epoch >= burn_in and step % thin == 0:
                for k, p in model.named_parameters():
                    if k in kept:
                        kept[k].append(p.detach().clone())
                energies.append(float(u.detach()))
                losses.append(batch_loss)
        history["epoch"].append(epoch)
        history["lr"].append(lr)
        history["train_loss"].append(total / steps)
        history["train_acc"].append(_accuracy(model, x, y))
        history["iiw"].append(fisher(model, loss, (x, y), theta0).raw_total)
        history["val_acc"].append(_accuracy(model, *val) if val is not None else float("nan"))
    if not energies:
        raise ValueError(f"thin: no draw was kept (thin={thin} exceeds the {step} steps after burn-in); "
                         "lower thin or burn_in")
    draws = {k: torch.stack(v)[None] for k, v in kept.items()}
    fixed = {k: b.detach().clone() for k, b in model.named_buffers()}
    fixed.update({k: p.detach().clone() for k, p in model.named_parameters() if k not in kept})
    metadata = {"library": "pib_bayes", "beta": gibbs_beta, "pib_beta": beta, "sampler": "sgld",
                "prior": repr(prior), "task": "classification", "train_pib": dict(settings), "n": n}
    post = Posterior(draws, {"energy": torch.tensor(energies)[None], "loss": torch.tensor(losses)[None]},
                     metadata, fixed=fixed, model=model)
    model.eval()
    return PIBTrainResult(model, "langevin", history, None, None, False, post, settings)
