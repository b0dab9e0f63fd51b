"""train_pib: the PIB authors' PIB-SGD (mode="paper") against a transcription of their train_SGLD loop, its
noise, schedule, early stopping and frozen penalty gradient; mode="langevin" returns a Posterior."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pib_bayes as pb
from pib_bayes.iiw.paper import paper_gradients
from pib_bayes.pib_train import _streams, paper_penalty, train_pib


def _data(n=48, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _their_train_sgld(model, w0, x, y, *, epochs, batch_size, lr, beta, noise_std, iiw_batch_size, seed,
                      milestones=(50, 80)):
    """src/pib_utils.py train_SGLD (x_va=None), written out: their SGLD optimizer (momentum 0.9, dampening 0,
    p.data updates, + sqrt(noise_scale) N(0, I)), energy_decay.backward(retain_graph=True) on the graph built
    at the previous epoch's end by compute_information_bp_fast (grad without create_graph, 1/num_all_batch).
    The random draws take the library's three streams in the same order."""
    shuffle_gen, iiw_gen, noise_gen = _streams(seed)
    n = len(x)
    params = list(model.parameters())
    bufs: dict[int, torch.Tensor] = {}
    energy_decay = 0
    for epoch in range(epochs):
        if epoch in milestones:
            lr = lr * 0.1
        model.train()
        perm = torch.randperm(n, generator=shuffle_gen)
        for idx in range(math.ceil(n / batch_size)):
            b = perm[idx * batch_size:(idx + 1) * batch_size]
            avg_loss = F.cross_entropy(model(x[b]), y[b], reduction="none").mean()
            for p in params:
                p.grad = None
            if epoch > 0:
                energy_decay.backward(retain_graph=True)
            avg_loss.backward()
            for i, p in enumerate(params):
                d_p = p.grad.data
                if i not in bufs:
                    bufs[i] = d_p.clone()
                else:
                    bufs[i].mul_(0.9).add_(d_p)
                p.data.add_(-lr * bufs[i])
                p.data.add_(noise_std * torch.randn(p.shape, generator=noise_gen, dtype=p.dtype))
        # compute_information_bp_fast(x_tr, y_tr) with batch_size=iiw_batch_size
        num_all_batch = math.ceil(n / iiw_batch_size)
        keys = [k for k, _ in model.named_parameters()]
        gw = dict.fromkeys(keys)
        for _ in range(10):
            sub = torch.randint(n, (iiw_batch_size,), generator=iiw_gen)
            loss = F.cross_entropy(model(x[sub]), y[sub], reduction="mean")
            for k, g in zip(keys, torch.autograd.grad(loss, params), strict=True):
                gw[k] = g.flatten() if gw[k] is None else gw[k] + g.flatten()
        energy_decay = 0
        for k, p in model.named_parameters():
            if "weight" in k:
                gw[k] = gw[k] * (1 / num_all_batch)
                energy_decay = energy_decay + ((p - w0[k]).flatten() * gw[k]).sum() ** 2
        energy_decay = beta * energy_decay
    return model


def test_paper_mode_equals_their_loop():
    x, y = _data()
    model = _net()
    w0 = {k: v.detach().clone() + 0.05 for k, v in model.state_dict().items()}
    ref = _their_train_sgld(copy.deepcopy(model), w0, x, y, epochs=4, batch_size=16, lr=0.05, beta=0.5,
                            noise_std=1e-5, iiw_batch_size=20, seed=7)
    r = train_pib(model, "cross_entropy", (x, y), beta=0.5, theta_0=w0, epochs=4, batch_size=16, lr=0.05,
                  iiw_batch_size=20, seed=7)
    for (k, a), b in zip(r.model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-9, atol=1e-12, msg=k)
    # the would-catch twin: a penalty that is not there (beta = 0) moves the weights elsewhere
    other = train_pib(_net(), "cross_entropy", (x, y), beta=0.0, theta_0=w0, epochs=4, batch_size=16, lr=0.05,
                      iiw_batch_size=20, seed=7)
    gap = max(float((a - b).detach().abs().max()) for a, b in zip(other.model.parameters(), ref.parameters(),
                                                          strict=True))
    assert gap > 1e-4
    assert r.history["epoch"] == [0, 1, 2, 3] and len(r.history["iiw"]) == 4
    assert all(math.isnan(v) for v in r.history["val_acc"]) and r.best_epoch is None


def test_no_penalty_in_epoch_zero():
    x, y = _data()
    w0 = {k: v.detach().clone() + 0.05 for k, v in _net().state_dict().items()}
    one = [train_pib(_net(), "cross_entropy", (x, y), beta=b, theta_0=w0, epochs=1, batch_size=16, lr=0.05,
                     iiw_batch_size=20).model for b in (0.0, 5.0)]
    for a, b in zip(one[0].parameters(), one[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_penalty_gradient_is_autograd_with_g_detached():
    x, y = _data()
    model = _net()
    w0 = {k: v.detach().clone() + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()}
    beta = 0.3
    c, iiw = paper_penalty(model, "cross_entropy", x, y, w0, beta=beta, batch_size=20,
                           generator=torch.Generator().manual_seed(3))
    names = ["0.weight", "2.weight"]
    loss = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    g = paper_gradients(model, loss, x, y, names, batch_size=20, generator=torch.Generator().manual_seed(3))
    params = dict(model.named_parameters())
    value = beta * sum(((params[k] - w0[k]) * g[k].detach()).sum() ** 2 for k in names)
    grads = torch.autograd.grad(value, [params[k] for k in names])
    for k, gr in zip(names, grads, strict=True):
        torch.testing.assert_close(c[k], gr, rtol=1e-10, atol=1e-14)
    assert sum(iiw.values()) == pytest.approx(float(value.detach()) / beta, rel=1e-10)
    assert set(c) == set(names)  # biases carry no penalty
    # the would-catch twin: differentiating through g (create_graph) gives another gradient
    gen = torch.Generator().manual_seed(3)
    sums = {k: 0 for k in names}
    for _ in range(10):
        sub = torch.randint(len(x), (20,), generator=gen)
        gs = torch.autograd.grad(F.cross_entropy(model(x[sub]), y[sub]), [params[k] for k in names],
                                 create_graph=True)
        sums = {k: sums[k] + gk for k, gk in zip(names, gs, strict=True)}
    full = beta * sum(((params[k] - w0[k]) * sums[k] / math.ceil(len(x) / 20)).sum() ** 2 for k in names)
    through = torch.autograd.grad(full, [params[k] for k in names])
    assert float(full.detach()) == pytest.approx(float(value.detach()), rel=1e-10)  # same value ...
    assert max(float((a - b).abs().max()) for a, b in zip(through, grads, strict=True)) > 1e-3 * max(
        float(b.abs().max()) for b in grads)  # ... another gradient


@pytest.mark.parametrize("lr", [1e-2, 1e-6])
def test_paper_noise_std_is_1e_5_whatever_lr(lr):
    """One step from the same start with and without noise: the difference is the noise alone."""
    x, y = _data(n=16)
    runs = [train_pib(_net(), "cross_entropy", (x, y), beta=0.1, epochs=1, batch_size=16, lr=lr,
                      noise_std=s, iiw_batch_size=16).model for s in (1e-5, 0.0)]
    diff = torch.cat([(a - b).detach().flatten() for a, b in zip(runs[0].parameters(), runs[1].parameters(),
                                                                 strict=True)])
    d = diff.numel()
    sd = float(diff.std())
    assert abs(sd - 1e-5) < 4 * 1e-5 / math.sqrt(2 * d)  # s.e. of a sample sd
    assert abs(float(diff.mean())) < 4 * 1e-5 / math.sqrt(d)
    assert abs(sd - math.sqrt(2 * lr)) > 0.5 * math.sqrt(2 * lr)  # not the Langevin sqrt(2h)


def test_paper_lr_schedule_drops_at_50_and_80():
    x, y = _data(n=8)
    r = train_pib(_net(), "cross_entropy", (x, y), epochs=85, batch_size=8, iiw_batch_size=8, lr=1e-4)
    lrs = r.history["lr"]
    assert lrs[0] == lrs[49] == pytest.approx(1e-4)
    assert lrs[50] == lrs[79] == pytest.approx(1e-5)
    assert lrs[80] == lrs[84] == pytest.approx(1e-6)
    assert r.settings["milestones"] == [50, 80]


def test_paper_early_stopping_restores_the_best_state():
    """Validation labels that disagree with the training labels: validation accuracy falls as the net
    learns, so the run stops `patience` epochs after its best epoch (epoch 0 counting as one without
    improvement, as in their code) and the model holds that epoch's weights."""
    x, y = _data(n=96)
    xv, yv = x[:48], (y[:48] + 1) % 3
    r = train_pib(_net(), "cross_entropy", (x, y), val_data=(xv, yv), epochs=40, batch_size=16, lr=0.05,
                  patience=3, iiw_batch_size=20)
    acc = r.history["val_acc"]
    assert r.stopped_early and len(acc) < 40
    assert r.best_epoch == max(range(len(acc)), key=lambda e: (acc[e], -e))  # first maximum
    stop = len(acc) - 1
    assert stop == (2 if r.best_epoch == 0 else r.best_epoch + 3)
    with torch.no_grad():
        now = float((r.model(xv).argmax(-1) == yv).double().mean())
    assert now == acc[r.best_epoch] > acc[-1]
    for k, v in r.model.state_dict().items():
        assert torch.equal(v, r.best_state[k])
    probs = r.predict_proba(xv)
    assert probs.shape == (48, 3) and torch.allclose(probs.sum(-1), torch.ones(48, dtype=probs.dtype))


def test_langevin_mode_returns_a_posterior():
    x, y = _data(n=64)
    r = train_pib(_net(), "cross_entropy", (x, y), beta=0.1, mode="langevin", val_data=(x[:16], y[:16]),
                  epochs=6, batch_size=16, burn_in=2, thin=2, seed=1)
    assert isinstance(r.posterior, pb.Posterior)
    assert r.posterior.num_chains == 1 and r.posterior.num_draws == (6 - 2) * 4 // 2
    draws = r.posterior.draws["0.weight"][0]
    assert float((draws[0] - draws[-1]).abs().max()) > 0  # the chain moves
    probs = r.predict_proba(x[:10])
    assert torch.allclose(probs, r.posterior.predict(x[:10]).mean)
    assert r.settings["gibbs_beta"] == pytest.approx(1 / 64) and r.settings["lr"] == pytest.approx(1e-4 / 64)
    assert len(r.history["iiw"]) == 6 and not any(math.isnan(v) for v in r.history["val_acc"])


def test_bad_inputs():
    x, y = _data(n=16)
    with pytest.raises(ValueError, match="^mode: expected one of"):
        train_pib(_net(), "cross_entropy", (x, y), mode="sgd")
    with pytest.raises(ValueError, match="^beta: the penalty weight must be a finite float >= 0"):
        train_pib(_net(), "cross_entropy", (x, y), beta=-1.0)
    with pytest.raises(ValueError, match="^gibbs_beta: gibbs_beta, prior, burn_in and thin belong"):
        train_pib(_net(), "cross_entropy", (x, y), burn_in=3)
    with pytest.raises(ValueError, match="^burn_in: must be < epochs"):
        train_pib(_net(), "cross_entropy", (x, y), mode="langevin", epochs=2, burn_in=2)
    with pytest.raises(ValueError, match="^noise_std: must be a finite float >= 0"):
        train_pib(_net(), "cross_entropy", (x, y), noise_std=-1.0)
    with pytest.raises(ValueError, match="^epochs: must be an int >= 1"):
        train_pib(_net(), "cross_entropy", (x, y), epochs=0)
    with pytest.raises(ValueError, match="^noise_std: belongs to mode='paper'"):
        train_pib(_net(), "cross_entropy", (x, y), mode="langevin", noise_std=1e-3)
    with pytest.raises(ValueError, match="^milestones: expected a list"):
        train_pib(_net(), "cross_entropy", (x, y), milestones=50)
    with pytest.raises(ValueError, match="^momentum: must be in"):
        train_pib(_net(), "cross_entropy", (x, y), momentum="high")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    with pytest.raises(ValueError, match="^data: train_pib needs"):
        train_pib(_net(), "cross_entropy", loader)


def test_paper_early_stopping_rule_on_a_scripted_accuracy_sequence(monkeypatch):
    """Validation accuracies 0.5, 0.6, 0.7, 0.65, 0.6, 0.7 (a tie is no improvement) with patience 3: the
    run stops after epoch 5 and restores the weights of epoch 2, which a run of 3 epochs without validation
    data reaches (validation consumes no random numbers, so the trajectories agree)."""
    import pib_bayes.pib_train as T

    x, y = _data(n=64)
    xv, yv = x[:8].clone(), y[:8].clone()
    ref = train_pib(_net(), "cross_entropy", (x, y), epochs=3, batch_size=16, lr=0.05, iiw_batch_size=20)
    script = iter([0.5, 0.6, 0.7, 0.65, 0.6, 0.7, 0.9, 0.9])
    real = T._accuracy
    monkeypatch.setattr(T, "_accuracy", lambda m, a, b: next(script) if a is xv else real(m, a, b))
    r = train_pib(_net(), "cross_entropy", (x, y), val_data=(xv, yv), epochs=20, batch_size=16, lr=0.05,
                  patience=3, iiw_batch_size=20)
    assert r.history["val_acc"] == [0.5, 0.6, 0.7, 0.65, 0.6, 0.7]
    assert r.stopped_early and r.best_epoch == 2
    for (k, a), b in zip(r.model.named_parameters(), ref.model.parameters(), strict=True):
        assert torch.equal(a, b), k
    # the would-catch twin: the last epoch's weights are not those of the best epoch
    last = train_pib(_net(), "cross_entropy", (x, y), epochs=6, batch_size=16, lr=0.05, iiw_batch_size=20)
    assert not all(torch.equal(a, b) for a, b in zip(last.model.parameters(), ref.model.parameters(),
                                                         strict=True))


@pytest.mark.parametrize("h", [1e-4, 1e-8])
def test_langevin_noise_is_tied_to_the_step(h):
    """One SGLD step with a negligible drift (beta' and the prior std 1e6): the increment is sqrt(2h) xi."""
    x, y = _data(n=16)
    net = _net()
    start = [p.detach().clone() for p in net.parameters()]
    prior = pb.GaussianPrior.from_module(net, std=1e6)
    train_pib(net, "cross_entropy", (x, y), beta=0.0, mode="langevin", epochs=1, burn_in=0, batch_size=16,
              lr=h, gibbs_beta=1e6, prior=prior)
    inc = torch.cat([(p.detach() - s).flatten() for p, s in zip(net.parameters(), start, strict=True)])
    sd, d = float(inc.std()), inc.numel()
    assert abs(sd - math.sqrt(2 * h)) < 4 * math.sqrt(2 * h) / math.sqrt(2 * d)
    assert abs(sd - 1e-5) > 0.5 * max(sd, 1e-5)  # not the authors' fixed 1e-5
