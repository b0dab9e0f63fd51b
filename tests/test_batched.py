"""pib_bayes.batched: the hand-batched MLP forward over the chain dimension."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from pib_bayes.batched import batched_forward


def _chains(net, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + 0.1 * torch.randn((k, *p.shape), generator=g) for n, p in net.named_parameters()}


def test_each_chain_equals_functional_call_shared_and_stacked_inputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.GELU(),
                        nn.Sequential(nn.Linear(5, 4), nn.LeakyReLU(0.1)), nn.Linear(4, 2))
    f = batched_forward(net)
    assert f is not None
    params = _chains(net)
    x = torch.randn(7, 2, 3)
    out = f(params, x, False)
    assert out.shape == (3, 7, 2)
    xs = torch.randn(3, 7, 2, 3)
    stacked = f(params, xs, True)
    for k in range(3):
        pk = {n: v[k] for n, v in params.items()}
        torch.testing.assert_close(out[k], functional_call(net, pk, (x,)))
        torch.testing.assert_close(stacked[k], functional_call(net, pk, (xs[k],)))


def test_unsupported_models_fall_back_to_vmap():
    assert batched_forward(nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU())) is None
    assert batched_forward(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))) is None  # buffers
    assert batched_forward(nn.Linear(2, 2)) is None  # not a Sequential
    net = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    net[0].register_forward_hook(lambda m, i, o: o * 2)
    assert batched_forward(net) is None  # a hook would be skipped
    frozen = nn.Sequential(nn.Linear(2, 2))
    frozen[0].bias.requires_grad_(False)
    assert batched_forward(frozen) is None
    assert batched_forward(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))) is not None
