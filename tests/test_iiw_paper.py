"""fisher(method="paper"): the PIB authors' estimator (SPEC §3d) against a plain transcription of their
``MLP.compute_information_bp_fast`` / ``_all_sample`` (RyanWangZf/PAC-Bayes-IB, src/models.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pib_bayes.iiw import fisher


def _net():
    """Train mode matters here: BatchNorm uses batch statistics, Dropout drops."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.2),
                         nn.Linear(12, 3)).double()


def _setup(n=250):
    model = _net()
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(n, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, w0, x, y


def _transcription(model, w0, x, y, batch_size, num_batches, seed, scale_by_k=False):
    """Their loop, written out: forward in train mode, mean CE, grad over all parameters, summed over the
    batches, times 1/num_all_batch, then ((w - w0).flatten() . g)^2 for every name containing 'weight'."""
    net = copy.deepcopy(model)
    net.train()
    gen = torch.Generator().manual_seed(seed)
    num_all_batch = int(math.ceil(len(x) / batch_size))
    keys = [k for k, _ in net.named_parameters()]
    gw = dict.fromkeys(keys)
    count = num_all_batch if num_batches == "all" else num_batches
    for idx in range(count):
        if num_batches == "all":
            xb, yb = x[batch_size * idx: batch_size * (idx + 1)], y[batch_size * idx: batch_size * (idx + 1)]
        else:
            sub = torch.randint(len(x), (batch_size,), generator=gen)
            xb, yb = x[sub], y[sub]
        loss = F.cross_entropy(net(xb), yb, reduction="mean")
        for k, g in zip(keys, torch.autograd.grad(loss, list(net.parameters())), strict=True):
            gw[k] = g.flatten().clone() if gw[k] is None else gw[k] + g.flatten()
    info = {}
    for k, p in net.named_parameters():
        if "weight" in k:
            g = gw[k] * (1 / (count if scale_by_k else num_all_batch))
            info[k] = float(((p.detach() - w0[k]).flatten() * g).sum() ** 2)
    return info


@pytest.mark.parametrize("num_batches, batch_size", [(10, 40), (3, 1000), ("all", 40), ("all", 1000)])
def test_paper_equals_transcription(num_batches, batch_size):
    model, w0, x, y = _setup()
    running = model[1].running_mean.clone()
    torch.manual_seed(11)  # the Dropout masks: the same global stream for both
    r = fisher(model, "cross_entropy", (x, y), w0, method="paper", num_batches=num_batches,
               batch_size=batch_size, seed=3)
    torch.manual_seed(11)
    ref = _transcription(model, w0, x, y, batch_size, num_batches, seed=3)
    assert r.method == "fisher-paper" and r.units == "raw"
    # biases excluded; the BatchNorm scale is named "weight", so it counts (their rule)
    assert set(r.settings["per_tensor"]) == set(ref) == {"0.weight", "1.weight", "4.weight"}
    for k, v in ref.items():
        assert r.settings["per_tensor"][k] == pytest.approx(v, rel=1e-9, abs=1e-300)
    assert r.per_group == pytest.approx({"0": ref["0.weight"], "1": ref["1.weight"], "4": ref["4.weight"]},
                                        rel=1e-9)
    assert r.raw_total == pytest.approx(sum(ref.values()), rel=1e-9)
    assert r.settings["N_b"] == math.ceil(len(x) / batch_size)
    assert torch.equal(model[1].running_mean, running)  # BatchNorm's statistics untouched
    assert model.training  # the mode it had


def test_wrong_variants_are_caught():
    """The check above tells the authors' estimator from the near misses: 1/K instead of 1/N_b, eval mode,
    and the library's 'minibatch' method (mean of squares, biases included)."""
    model, w0, x, y = _setup()
    torch.manual_seed(11)
    r = fisher(model, "cross_entropy", (x, y), w0, method="paper", num_batches=10, batch_size=40, seed=3)
    torch.manual_seed(11)
    by_k = _transcription(model, w0, x, y, 40, 10, seed=3, scale_by_k=True)
    assert sum(by_k.values()) != pytest.approx(r.raw_total, rel=1e-3)
    model.eval()
    torch.manual_seed(11)
    r_eval_model = fisher(model, "cross_entropy", (x, y), w0, method="paper", num_batches=10, batch_size=40,
                          seed=3)
    assert not model.training  # restored
    torch.manual_seed(11)
    ref = _transcription(model, w0, x, y, 40, 10, seed=3)  # the transcription sets train mode itself
    assert r_eval_model.raw_total == pytest.approx(sum(ref.values()), rel=1e-9)
    evaluated = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(3)
    sums = None
    for _ in range(10):
        sub = torch.randint(len(x), (40,), generator=gen)
        g = torch.autograd.grad(F.cross_entropy(evaluated(x[sub]), y[sub]), evaluated[0].weight)[0]
        sums = g if sums is None else sums + g
    eval_value = float(((evaluated[0].weight.detach() - w0["0.weight"]) * sums / 7).sum() ** 2)
    assert eval_value != pytest.approx(r.settings["per_tensor"]["0.weight"], rel=1e-3)
    mb = fisher(model, "cross_entropy", (x, y), w0, method="minibatch", num_batches=10, batch_size=40, seed=3)
    assert mb.raw_total != pytest.approx(r.raw_total, rel=1e-3)


def test_paper_seeded_and_random():
    model, w0, x, y = _setup()
    model[3].p = 0.0  # no dropout: only the batch draws are random
    a = fisher(model, "cross_entropy", (x, y), w0, method="paper", batch_size=40, seed=1)
    b = fisher(model, "cross_entropy", (x, y), w0, method="paper", batch_size=40, seed=1)
    c = fisher(model, "cross_entropy", (x, y), w0, method="paper", batch_size=40, seed=2)
    assert a.raw_total == b.raw_total and a.raw_total != c.raw_total
    full = fisher(model, "cross_entropy", (x, y), w0, method="paper", batch_size=40, num_batches="all")
    assert full.settings["draws"] == "consecutive batches"


def test_paper_bad_inputs():
    model, w0, x, y = _setup()
    with pytest.raises(ValueError, match="^beta: method='paper' has only the authors' raw scale"):
        fisher(model, "cross_entropy", (x, y), w0, method="paper", beta=0.1)
    with pytest.raises(ValueError, match="^num_batches: must be an int >= 1 .* or 'all'"):
        fisher(model, "cross_entropy", (x, y), w0, method="paper", num_batches="some")
    with pytest.raises(ValueError, match="^batch_size: must be an int >= 1"):
        fisher(model, "cross_entropy", (x, y), w0, method="paper", batch_size=0)
    with pytest.raises(ValueError, match=r"^groups: method='paper' measures weight tensors only .*\['b'\]"):
        fisher(model, "cross_entropy", (x, y), w0, method="paper",
               groups={"a": ["0.weight"], "b": ["0.bias"]})
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    with pytest.raises(ValueError, match="^data: method='paper' needs"):
        fisher(model, "cross_entropy", loader, w0, method="paper")
    y_bad = y.clone()
    y_bad[-1] = 9
    with pytest.raises(ValueError, match="^data: the loss cannot"):
        fisher(model, "cross_entropy", (x, y_bad), w0, method="paper", num_batches="all", batch_size=40)


def test_paper_prior_recipe():
    """fit_prior_mean(**PAPER_PRIOR) = a transcription of their train_prior (Adam lr 1e-3, weight decay 1e-5,
    batch 128, 10 epochs, shuffled batches) followed by their _initialize_weights on the model itself."""
    from pib_bayes.iiw import PAPER_PRIOR, fit_prior_mean

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 300), nn.ReLU(), nn.Linear(300, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 20, generator=g), torch.randint(0, 3, (300,), generator=g)
    init_net = copy.deepcopy(net)
    ref_net = copy.deepcopy(net)
    theta_0 = fit_prior_mean(net, "cross_entropy", (x, y), seed=4, **PAPER_PRIOR)
    opt = torch.optim.Adam(ref_net.parameters(), lr=1e-3, weight_decay=1e-5)
    perm_gen = torch.Generator().manual_seed(4)
    for _ in range(10):
        perm = torch.randperm(300, generator=perm_gen)
        for start in range(0, 300, 128):
            idx = perm[start:start + 128]
            opt.zero_grad()
            F.cross_entropy(ref_net(x[idx]), y[idx]).backward()
            opt.step()
    for k, v in ref_net.named_parameters():
        torch.testing.assert_close(theta_0[k], v.detach(), rtol=1e-6, atol=1e-7)
    # the net itself was re-initialised: Linear weights N(0, 0.01^2), biases 0, so Δθ != 0 at the start
    for layer in (net[0], net[2]):
        assert float(layer.bias.abs().max()) == 0.0
        w = layer.weight.detach().flatten()
        se = 0.01 / math.sqrt(2 * w.numel())  # s.e. of a sample sd of N(0, 0.01^2)
        assert abs(float(w.std()) - 0.01) < 4 * se
        assert abs(float(w.mean())) < 4 * 0.01 / math.sqrt(w.numel())
    assert float((net[0].weight - theta_0["0.weight"]).abs().max()) > 0.01
    # the would-catch twin: without the weight decay the prior mean differs
    plain = fit_prior_mean(init_net, "cross_entropy", (x, y), seed=4,
                           **{**PAPER_PRIOR, "weight_decay": 0.0, "reinit_std": None})
    assert not torch.allclose(plain["0.weight"], theta_0["0.weight"], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="^reinit_std: must be a finite float > 0"):
        fit_prior_mean(net, "cross_entropy", (x, y), reinit_std=0.0)
    with pytest.raises(ValueError, match="^weight_decay: must be a finite float >= 0"):
        fit_prior_mean(net, "cross_entropy", (x, y), weight_decay=-1.0)
