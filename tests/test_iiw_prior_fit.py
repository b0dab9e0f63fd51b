"""pib_bayes.iiw.prior_fit: the held-out split, the prior mean fitted on it, and the authors'
re-initialisation."""

from __future__ import annotations

import pytest
import torch
from iiw_helpers import tiny_classifier as _problem
from torch import nn

import pib_bayes as pb
from pib_bayes.iiw import PAPER_PRIOR, fit_prior_mean, paper_init_, split_for_prior

F64 = torch.float64



# ----------------------------------------------------------------------------- prior mean
def test_fit_prior_mean_uses_only_the_held_out_split():
    net, x, y = _problem(n=200, seed=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    prior_data, sample = split_for_prior((x, y), fraction=0.25, seed=0)
    assert len(prior_data[0]) == 50 and len(sample[0]) == 150
    theta_0 = fit_prior_mean(net, "cross_entropy", prior_data, epochs=30, lr=0.05, seed=0)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # model untouched
    assert any(not torch.equal(theta_0[k], before[k]) for k in theta_0)
    # deterministic given the held-out split and the seed (it takes no other data)
    again = fit_prior_mean(net, "cross_entropy", prior_data, epochs=30, lr=0.05, seed=0)
    assert all(torch.equal(theta_0[k], again[k]) for k in theta_0)
    # it fits the held-out split better than the initial weights
    with torch.no_grad():
        init_loss = nn.functional.cross_entropy(net(prior_data[0]), prior_data[1])
    fitted = pb.GaussianPrior.from_module(net, std=0.1, mean=theta_0)
    assert set(fitted.mean) == set(theta_0)
    net2 = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    net2.load_state_dict(theta_0)
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(net2(prior_data[0]), prior_data[1])) < float(init_loss)


def test_prior_split_bad_inputs():
    x, y = torch.randn(10, 2), torch.randn(10)
    with pytest.raises(ValueError, match="fraction"):
        split_for_prior((x, y), fraction=1.5)
    with pytest.raises(ValueError, match="fraction"):
        split_for_prior((x, y), fraction=0.01)
    with pytest.raises(ValueError, match="epochs"):
        fit_prior_mean(nn.Linear(2, 1), "gaussian", (x, y[:, None]), epochs=0)


def test_fit_prior_mean_names_prior_data_when_the_model_cannot_take_it():
    net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="prior_data: the model and loss cannot be evaluated"):
        fit_prior_mean(net, "cross_entropy", (torch.randn(8, 4), torch.zeros(8, dtype=torch.long)), epochs=1)


def test_split_for_prior_is_a_seeded_partition():
    x, y = torch.arange(40.0)[:, None], torch.arange(40)
    (xp, yp), (xs, ys) = split_for_prior((x, y), fraction=0.25, seed=3)
    assert len(yp) == 10 and len(ys) == 30
    assert sorted(torch.cat([yp, ys]).tolist()) == list(range(40))  # disjoint and complete
    assert torch.equal(xp[:, 0].long(), yp) and torch.equal(xs[:, 0].long(), ys)  # rows stay paired
    again = split_for_prior((x, y), fraction=0.25, seed=3)[0][1]
    other = split_for_prior((x, y), fraction=0.25, seed=4)[0][1]
    assert torch.equal(again, yp) and not torch.equal(other, yp)
    with pytest.raises(TypeError, match="^data: "):
        split_for_prior("x.csv")
    with pytest.raises(ValueError, match="^data: "):
        split_for_prior([x, y, y])


def test_fit_prior_mean_with_full_batch_sgd_reaches_the_least_squares_fit_of_the_held_out_split():
    """Gaussian loss 0.5 (y - w.x - b)^2 on a linear model: full-batch gradient descent converges to the
    least-squares solution of the prior split alone, not to that of the whole data."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 3, generator=g, dtype=F64)
    noise = 0.3 * torch.randn(120, 1, generator=g, dtype=F64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=F64) + noise
    prior_data, sample = split_for_prior((x, y), fraction=0.5, seed=1)
    net = nn.Linear(3, 1).double()
    theta_0 = fit_prior_mean(net, "gaussian", prior_data, epochs=400, lr=0.5, batch_size=60, optimizer="sgd")

    def lstsq(xs, ys):
        design = torch.cat([xs, torch.ones(len(xs), 1, dtype=F64)], 1)
        return torch.linalg.lstsq(design, ys).solution.squeeze(1)

    fitted = torch.cat([theta_0["weight"].squeeze(0), theta_0["bias"]])
    torch.testing.assert_close(fitted, lstsq(*prior_data), rtol=0, atol=1e-6)
    # "would catch the bug": a fit on the other split (or all the data) is measurably elsewhere
    assert float((lstsq(*sample) - lstsq(*prior_data)).abs().max()) > 1e-2


def test_paper_prior_is_a_set_of_fit_prior_mean_arguments():
    import inspect

    assert set(PAPER_PRIOR) <= set(inspect.signature(fit_prior_mean).parameters)
    assert PAPER_PRIOR["reinit_std"] == 0.01 and PAPER_PRIOR["optimizer"] == "adam"


def test_paper_init_draws_linear_and_conv_weights_at_the_authors_scales():
    """Linear: N(0, std^2), conv: N(0, 2 / (k_h k_w out_channels)), biases 0, BatchNorm (1, 0); the sample
    standard deviation of n normal draws has standard error sd / sqrt(2 n)."""
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(400, 300))
    with torch.no_grad():
        net[1].weight.fill_(3.0)
    paper_init_(net, std=0.02, seed=0)
    for w, sd in ((net[3].weight.detach(), 0.02), (net[0].weight.detach(), (2.0 / (3 * 3 * 16)) ** 0.5)):
        se = sd / (2 * w.numel()) ** 0.5
        assert abs(float(w.double().std()) - sd) < 5 * se
        assert abs(float(w.double().mean())) < 5 * sd / w.numel() ** 0.5
    # "would catch the bug": the conv scale is not the linear one (many standard errors apart)
    conv = net[0].weight.detach()
    assert abs(float(conv.double().std()) - 0.02) > 20 * 0.02 / (2 * conv.numel()) ** 0.5
    assert float(net[0].bias.abs().max()) == 0.0 and float(net[3].bias.abs().max()) == 0.0
    assert torch.equal(net[1].weight, torch.ones(16)) and torch.equal(net[1].bias, torch.zeros(16))
    a, b = paper_init_(nn.Linear(5, 4), seed=7), paper_init_(nn.Linear(5, 4), seed=7)
    assert torch.equal(a.weight, b.weight)
    with pytest.raises(ValueError, match="^reinit_std: must be a finite float > 0"):
        paper_init_(nn.Linear(2, 2), std=0.0)
    with pytest.raises(TypeError, match="^model: "):
        paper_init_("net")
