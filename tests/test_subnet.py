"""pib_bayes.subnet: choosing the sampled subnetwork by names, globs, submodules or tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pib_bayes import sample
from pib_bayes.subnet import select_params


def _net():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def test_entries_of_every_kind_select_in_model_order():
    net = _net()
    assert select_params(net, "2.bias") == ["2.bias"]
    assert select_params(net, "*.weight") == ["0.weight", "2.weight"]
    assert select_params(net, net[0]) == ["0.weight", "0.bias"]
    assert select_params(net, net[2].weight) == ["2.weight"]
    assert select_params(net, ["2.*", net[0].bias]) == ["0.bias", "2.weight", "2.bias"]


def test_tied_parameters_are_matched_by_identity():
    net = _net()
    tied = nn.Sequential(net[0], nn.Tanh(), nn.Linear(4, 3))
    tied.add_module("again", net[0])  # the same module twice: named once by named_parameters()
    assert select_params(tied, tied.again) == ["0.weight", "0.bias"]


def test_a_bad_selection_gets_one_clear_error():
    net = _net()
    with pytest.raises(ValueError, match="^params: 'head.*' matches no parameter"):
        select_params(net, "head.*")
    with pytest.raises(ValueError, match="^params: the selection is empty"):
        select_params(net, [])
    with pytest.raises(ValueError, match="^params: the module Linear is not a submodule"):
        select_params(net, nn.Linear(1, 1))
    with pytest.raises(ValueError, match="^params: the submodule Tanh has no parameters"):
        select_params(net, net[1])
    with pytest.raises(ValueError, match="^params: a tensor of shape"):
        select_params(net, torch.zeros(2))
    with pytest.raises(TypeError, match="^params: entries must be"):
        select_params(net, [3])
    with pytest.raises(TypeError, match="^params: expected names"):
        select_params(net, 3)


def test_sample_moves_only_the_selected_parameters():
    torch.manual_seed(0)
    net = _net()
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    post = sample(net, "cross_entropy", (x, y), beta=1 / 32, step_size=1e-3, num_warmup=5, num_draws=5,
                  params="2.*", seed=0)
    assert sorted(post.draws) == ["2.bias", "2.weight"]
    assert post.metadata["sampled_params"] == ["2.weight", "2.bias"]
    assert not torch.equal(post.draws["2.weight"][0, -1], before["2.weight"])
    assert torch.equal(post.fixed["0.weight"], before["0.weight"])  # held at its value
    for n, p in net.named_parameters():  # the module itself is handed back untouched
        assert torch.equal(p, before[n])
