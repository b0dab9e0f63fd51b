"""pib_bayes.gradients: the full-data gradient and the control-variate estimator (Baker et al. 2019)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pib_bayes import sample
from pib_bayes.gradients import ControlVariateGradient, full_data_gradient


def _base(params, batched, x, y, stacked):
    """U_B(w) = mean_i (y_i - x_i w)^2 / 2 + |w|^2 / 2 (a linear-Gaussian energy), exact gradient."""
    w = params[0]
    r = y - x @ w
    u = (r.square().mean() / 2 + w.square().sum() / 2).reshape(1)
    return u, (r.square().mean() / 2).reshape(1), ((-(x * r.unsqueeze(1)).mean(0) + w),)


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.1 * torch.randn(n, generator=g,
                                                                                         dtype=torch.float64)


def test_full_data_gradient_does_not_depend_on_the_chunking():
    x, y = _data()
    w = [torch.tensor([0.3, 0.1, -0.2], dtype=torch.float64)]
    whole = full_data_gradient(_base, w, False, [(x, y)])
    chunks = full_data_gradient(_base, w, False, [(x[:5], y[:5]), (x[5:17], y[5:17]), (x[17:], y[17:])])
    for a, b in zip(whole, chunks):
        torch.testing.assert_close(a[0] if isinstance(a, list) else a, b[0] if isinstance(b, list) else b)
    with pytest.raises(ValueError, match="^gradient: "):
        full_data_gradient(_base, w, False, [])


def test_control_variate_is_unbiased_over_a_partition_and_exact_at_the_centre():
    x, y = _data()
    centre = [torch.tensor([0.8, -1.5, 0.2], dtype=torch.float64)]
    cv = ControlVariateGradient(_base, centre, full_data_gradient(_base, centre, False, [(x, y)])[2])
    w = [torch.tensor([0.1, 0.4, -0.3], dtype=torch.float64)]
    full = full_data_gradient(_base, w, False, [(x, y)])[2][0]
    batches = [(x[i:i + 6], y[i:i + 6]) for i in range(0, 24, 6)]
    mean = torch.stack([cv(w, False, bx, by, False)[2][0] for bx, by in batches]).mean(0)
    torch.testing.assert_close(mean, full)  # unbiased: the mean over a partition is the full gradient
    # at w = w_hat every minibatch gives the full-data gradient exactly (zero variance)
    for bx, by in batches:
        torch.testing.assert_close(cv(centre, False, bx, by, False)[2][0],
                                   full_data_gradient(_base, centre, False, [(x, y)])[2][0])


def test_control_variate_variance_vanishes_quadratically_at_the_centre():
    # on a quadratic energy grad U_cv(w) - grad U_S(w) is linear in w - w_hat: its variance over the
    # minibatches is exactly quadratic in the distance, so it vanishes at the centre, where the plain
    # minibatch gradient keeps its own variance
    x, y = _data(n=60)
    centre = [torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)]
    cv = ControlVariateGradient(_base, centre, full_data_gradient(_base, centre, False, [(x, y)])[2])
    batches = [(x[i:i + 6], y[i:i + 6]) for i in range(0, 60, 6)]
    direction = torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64)

    def var(estimate, w):
        return torch.stack([estimate([w], False, bx, by, False)[2][0] for bx, by in batches]).var(0).sum()

    near, far = var(cv, centre[0] + 0.01 * direction), var(cv, centre[0] + 0.02 * direction)
    torch.testing.assert_close(far, 4 * near, rtol=1e-9, atol=0)
    assert var(cv, centre[0]) < 1e-25
    assert near < var(_base, centre[0] + 0.01 * direction) / 10


def test_a_wrong_control_variate_is_caught_by_the_unbiasedness_check():
    # the would-catch twin: dropping the minibatch gradient at the centre biases the estimator
    x, y = _data()
    centre = [torch.tensor([0.8, -1.5, 0.2], dtype=torch.float64)]
    centre_grad = full_data_gradient(_base, centre, False, [(x, y)])[2]
    w = [torch.tensor([0.1, 0.4, -0.3], dtype=torch.float64)]

    def wrong(params, bx, by):
        return _base(params, False, bx, by, False)[2][0] + centre_grad[0]

    batches = [(x[i:i + 6], y[i:i + 6]) for i in range(0, 24, 6)]
    mean = torch.stack([wrong(w, bx, by) for bx, by in batches]).mean(0)
    full = full_data_gradient(_base, w, False, [(x, y)])[2][0]
    assert not torch.allclose(mean, full)


def test_sample_with_cv_records_its_centre_and_refuses_unknown_estimators():
    torch.manual_seed(0)
    x, y = torch.randn(64, 2), torch.randn(64, 1)
    post = sample(nn.Linear(2, 1), "gaussian", (x, y), beta=1 / 64, step_size=1e-3, num_warmup=20,
                  num_draws=10, batch_size=16, gradient="cv", seed=0)
    assert post.metadata["gradient"] == "cv"
    assert "warm-up steps [10, 20)" in post.metadata["control_variate"]["centre"]
    assert bool(torch.isfinite(post.draws["weight"]).all())
    with pytest.raises(ValueError, match="^gradient: expected one of"):
        sample(nn.Linear(2, 1), "gaussian", (x, y), beta=1 / 64, gradient="svrg")


@pytest.mark.parametrize("chain_method", ["vectorized", "sequential"])
def test_gradient_transform_is_applied_before_the_kernel_and_stops_chains(chain_method):
    x, y = _data()
    x, y = x.float(), y.float().unsqueeze(1)
    kw = {"beta": 1 / 24, "step_size": 1e-3, "num_chains": 2, "num_warmup": 0, "num_draws": 8, "seed": 1,
          "batch_size": 8, "chain_method": chain_method}
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    plain = sample(model, "gaussian", (x, y), **kw)
    seen = []

    def identity(params, grads):
        seen.append(tuple(g.shape for g in grads))
        return grads, None

    same = sample(model, "gaussian", (x, y), gradient_transform=identity, **kw)
    k = 2 if chain_method == "vectorized" else 1  # chains per group: one call per step of each group
    assert seen == [((k, 1, 3), (k, 1))] * (8 if k == 2 else 16)
    for n in plain.draws:
        assert torch.equal(same.draws[n], plain.draws[n]), n

    def doubled(params, grads):  # twin: a transform that changes the gradient changes the draws
        return [2 * g for g in grads], None

    other = sample(model, "gaussian", (x, y), gradient_transform=doubled, **kw)
    assert not torch.equal(other.draws["weight"][:, 1:], plain.draws["weight"][:, 1:])

    calls = {"n": 0}

    def stop_chain_1(params, grads):  # stop the second chain at its 4th step
        k = grads[0].shape[0]
        calls["n"] += 1
        stop = torch.zeros(k, dtype=torch.bool)
        if k == 2 and calls["n"] == 4:
            stop[1] = True
        elif k == 1 and int(params[0].shape[0]) == 1 and calls["n"] == 8 + 4:  # sequential: chain 1's 4th
            stop[0] = True
        return grads, stop

    stopped = sample(model, "gaussian", (x, y), gradient_transform=stop_chain_1, **kw)
    assert torch.equal(stopped.draws["weight"][0], plain.draws["weight"][0])  # chain 0 untouched
    assert torch.equal(stopped.draws["weight"][1, :4], plain.draws["weight"][1, :4])
    assert bool(torch.isnan(stopped.draws["weight"][1, 4:]).all())  # NaN weights: flagged at step 4
    assert stopped.diverged.tolist() == [False, True] and int(stopped.divergence_step[1]) == 4
