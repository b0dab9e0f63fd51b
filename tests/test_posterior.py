"""pib_bayes.posterior: the draws container, its predictive and the own-loop constructors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pib_bayes import DrawCollector, GaussianLoss, Posterior, sample


def _classifier_post(num_chains=2, num_draws=6, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(40, 2), torch.randint(0, 3, (40,))
    post = sample(net, "cross_entropy", (x, y), beta=1 / 40, step_size=1e-3, num_chains=num_chains,
                  num_warmup=5, num_draws=num_draws, seed=seed)
    return net, post, x


def _loop(net, draws, x, fn):
    out = []
    for d in range(next(iter(draws.values())).shape[0]):
        net.load_state_dict({k: v[d] for k, v in draws.items()})
        with torch.no_grad():
            out.append(fn(net(x)))
    return torch.stack(out)


def test_shapes_and_flat_layout():
    _, post, _ = _classifier_post()
    assert (post.num_chains, post.num_draws) == (2, 6)
    assert post.param_names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert post.num_params == 12 + 6 + 18 + 3
    flat = post.flat()
    assert flat.shape == (2, 6, post.num_params)
    torch.testing.assert_close(flat[1, 4, 12:18], post.draws["0.bias"][1, 4])
    with pytest.raises(KeyError, match="names: unknown parameters"):
        post.flat(["nope"])


def test_classification_predictive_is_the_mean_of_per_draw_softmaxes():
    net, post, x = _classifier_post()
    pred = post.predict(x[:7])
    loop = _loop(net, post.draws_for_prediction(), x[:7], lambda o: torch.softmax(o, -1))
    torch.testing.assert_close(pred.per_draw, loop)
    torch.testing.assert_close(pred.mean, loop.mean(0))
    torch.testing.assert_close(pred.mean.sum(-1), torch.ones(7))
    assert pred.variance is None


def test_outputs_are_the_raw_model_outputs_per_draw():
    net, post, x = _classifier_post()
    out = post.outputs(x[:5], chunk_size=4)
    torch.testing.assert_close(out, _loop(net, post.draws_for_prediction(), x[:5], lambda o: o))


def test_regression_predictive_variance_adds_the_observation_noise():
    torch.manual_seed(1)
    net = nn.Linear(1, 1)
    x, y = torch.randn(30, 1), torch.randn(30, 1)
    post = sample(net, GaussianLoss(noise_std=0.5), (x, y), beta=1 / 30, step_size=1e-2, num_warmup=5,
                  num_draws=8, seed=0)
    pred = post.predict(x[:4])
    outs = _loop(net, post.draws_for_prediction(), x[:4], lambda o: o)
    torch.testing.assert_close(pred.epistemic_variance, outs.var(0, unbiased=False))
    torch.testing.assert_close(pred.variance, outs.var(0, unbiased=False) + 0.25)


def test_diverged_chains_are_left_out_with_a_warning_unless_asked():
    _, post, x = _classifier_post()
    post.diverged[1] = True
    post.divergence_step[1] = 3
    with pytest.warns(UserWarning, match=r"chains \[1\] diverged \(steps \[3\]\)"):
        assert post.kept_chains() == [0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert post.kept_chains(include_diverged=True) == [0, 1]
        assert post.predict(x[:3], include_diverged=True).per_draw.shape[0] == 12
    post.diverged[0] = True
    with pytest.raises(ValueError, match="every chain diverged"), pytest.warns(UserWarning):
        post.kept_chains()


def test_predict_refuses_a_mismatched_model():
    _, post, x = _classifier_post()
    with pytest.raises(ValueError):
        post.predict(x[:3], model=nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3)))
    with pytest.raises(TypeError, match="^model: "):
        post.predict(x[:3], model="net")


def test_from_draws_thins_after_warm_up_and_collector_agrees():
    net = nn.Linear(2, 1)
    trail = [{k: v.detach().clone() + i for k, v in net.state_dict().items()} for i in range(10)]
    post = Posterior.from_draws(net, trail, task="regression", num_warmup=2, thin=3)
    assert post.num_chains == 1 and post.num_draws == 3
    offsets = post.draws["bias"][0, :, 0] - net.bias.detach()[0]
    torch.testing.assert_close(offsets, torch.tensor([2.0, 5.0, 8.0]))
    collector = DrawCollector(net, num_warmup=2, thin=3)
    for state in trail:
        net.load_state_dict(state)
        collector.add(net)
    collected = collector.posterior(task="regression")
    for k in post.draws:
        torch.testing.assert_close(collected.draws[k], post.draws[k])
    with pytest.raises(ValueError, match="^task: "):
        Posterior.from_draws(net, trail).predict(torch.zeros(1, 2))


def test_collector_refuses_bad_arguments():
    net = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="^thin: "):
        DrawCollector(net, thin=0)
    with pytest.raises(ValueError, match="^collector: no draw stored yet"):
        DrawCollector(net, num_warmup=5).posterior(task="regression")
    collector = DrawCollector(net)
    with pytest.raises(ValueError, match="^chain: "):
        collector.add(net, chain=-1)
