"""The model zoo end to end (issue 16): every architecture in tests/zoo.py, handed in eval() and in train()
mode, through sample (several chains), predict / outputs (== the loop over draws), to_arviz + summary,
iiw.fisher (== the brute-force per-example gradients), iiw.kl, save/load and the optimizer form.

Adding a model is one line in tests/zoo.py's ZOO.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from zoo import ZOO, ZooEntry, images

import pib_bayes as pb
from pib_bayes import Posterior, diagnostics, iiw
from pib_bayes.energy import Energy, resolve_loss
from pib_bayes.iiw.fisher import per_example_gradient_quadratic
from pib_bayes.optim import SGLD
from pib_bayes.prior import GaussianPrior

N = 64
BETA = 1.0 / N
RUN = dict(beta=BETA, prior=1.0, step_size=1e-4, num_chains=3, num_warmup=10, num_draws=12, batch_size=32)
IDS = [e.name for e in ZOO]




def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _handed_in(entry: ZooEntry, mode: str) -> nn.Module:
    model = entry.make_model()
    return model.train() if mode == "train" else model.eval()


def _loop(model: nn.Module, post: Posterior, x: torch.Tensor) -> torch.Tensor:
    """The plain loop a user would write: functional_call per draw, eval mode."""
    draws = post.draws_for_prediction()
    m = next(iter(draws.values())).shape[0]
    was = _modes(model)
    model.eval()
    with torch.no_grad():
        out = torch.stack([functional_call(model, {**post.fixed, **{k: v[i] for k, v in draws.items()}}, (x,))
                           for i in range(m)])
    for mod, t in zip(model.modules(), was):
        mod.training = t
    return out


def _per_draw_predictive(entry: ZooEntry, outputs: torch.Tensor) -> torch.Tensor:
    """What predict's per-draw tensor holds, from the loop's raw outputs: class probabilities, or for the
    heteroscedastic likelihood the per-draw means mu_m (the first half of the last dimension)."""
    if entry.loss == "heteroscedastic_gaussian":
        return outputs[..., 0]
    return torch.softmax(outputs, -1)


_EVAL_RUN: dict[str, Posterior] = {}  # entry name -> the posterior sampled from the eval-mode model


def _sampled(entry: ZooEntry, mode: str) -> tuple[nn.Module, Posterior, tuple[torch.Tensor, torch.Tensor]]:
    model = _handed_in(entry, mode)
    data = entry.make_data(N)
    before = _modes(model)
    post = pb.sample(model, entry.loss, data, seed=0, **RUN)
    assert _modes(model) == before, "the model must come back in the mode it was handed in"
    return model, post, data


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("entry", ZOO, ids=IDS)
def test_zoo_end_to_end(entry: ZooEntry, mode: str, tmp_path):
    model, post, (x, y) = _sampled(entry, mode)
    modes = _modes(model)

    # ---- sample: several chains, finite, the same chain method and draws whatever the mode
    assert post.num_chains == 3 and post.num_draws == 12 and not bool(post.diverged.any())
    assert all(bool(torch.isfinite(v).all()) for v in post.draws.values())
    if mode == "eval":
        _EVAL_RUN[entry.name] = post
    else:
        ref = _EVAL_RUN.get(entry.name)
        if ref is None:  # this case ran alone: sample the eval-mode model here
            ref = pb.sample(_handed_in(entry, "eval"), entry.loss, entry.make_data(N), seed=0, **RUN)
        assert post.metadata["chain_method"] == ref.metadata["chain_method"]
        for k, v in post.draws.items():
            torch.testing.assert_close(v, ref.draws[k], rtol=0, atol=0)

    # ---- predict and outputs equal the loop over draws
    expected = _loop(model, post, x)
    out = post.outputs(x)
    assert post.last_engine in ("batched", "vmap", "loop") and post.last_engine_reason
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(post.outputs(x, engine="loop"), expected, rtol=0, atol=0)
    pred = post.predict(x)
    torch.testing.assert_close(pred.per_draw, _per_draw_predictive(entry, expected), rtol=1e-4, atol=1e-5)
    assert _modes(model) == modes

    # ---- ArviZ export and the summary table
    idata = post.to_arviz(data=(x, y))
    ll = idata["log_likelihood"]["y"]
    assert ll.shape == (3, 12, N) and bool(torch.isfinite(torch.as_tensor(ll.values)).all())
    table = diagnostics.summary(post, data=(x, y), probe_x=x[:2], warn=False)
    assert {"log_lik", "energy", "pred[0]"} <= set(table.index)
    assert table[["mean", "sd"]].notna().all().all()
    assert _modes(model) == modes

    # ---- Fisher IIW at the last draw of chain 0, against the brute-force per-example gradients
    loss, _ = resolve_loss(entry.loss)
    theta_0 = {k: v.detach().clone() for k, v in entry.make_model().named_parameters()}
    at = {k: v[0, -1] for k, v in post.draws.items()}
    r = iiw.fisher(model, loss, (x, y), theta_0, params=at, beta=BETA)
    assert r.settings["engine"] in ("layerwise", "jvp", "mixed") and _modes(model) == modes
    brute_model = entry.make_model().eval()
    with torch.no_grad():
        for k, p in brute_model.named_parameters():
            p.copy_(at[k])
    delta = {k: at[k] - theta_0[k] for k in at}
    brute = per_example_gradient_quadratic(brute_model, loss, (x, y), delta)
    assert r.settings["joint_raw"] == pytest.approx(brute, rel=1e-3, abs=1e-9)
    assert all(v >= 0 for v in r.raw_per_group.values())

    # ---- KL to the sampling prior
    prior = GaussianPrior(std=1.0, mean=theta_0)
    k = iiw.kl(post, prior)
    assert math.isfinite(k.total) and k.total > 0

    # ---- save / load round trip
    path = tmp_path / "post.pt"
    post.save(path)
    back = Posterior.load(path, model=model)
    for name, v in post.draws.items():
        assert torch.equal(back.draws[name], v)
    torch.testing.assert_close(back.predict(x).per_draw, pred.per_draw, rtol=1e-4, atol=1e-6)

    # ---- the optimizer form: SGLD + Energy.of_module on the module's own weights
    net = _handed_in(entry, mode)
    start = [p.detach().clone() for p in net.parameters()]
    opt = SGLD(net.parameters(), lr=1e-5, generator=torch.Generator().manual_seed(0))
    energy = Energy(net, entry.loss, prior=1.0, beta=BETA)
    for _ in range(3):
        opt.zero_grad()
        u = energy.of_module(x[:32], y[:32])
        u.backward()
        opt.step()
    assert math.isfinite(float(u.detach()))
    assert any(not torch.equal(a, b) for a, b in zip(start, net.parameters()))
    assert net.training == (mode == "train")


class _LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def test_lstm_predict_equals_the_loop_through_the_fallback():
    torch.manual_seed(0)
    net = _LSTMNet()
    draws = {n: p.detach() + 0.05 * torch.randn(2, 5, *p.shape) for n, p in net.named_parameters()}
    post = Posterior(draws, {}, {"task": "classification"}, model=net)
    x = torch.randn(16, 6, 4)
    pred = post.predict(x)
    assert post.last_engine == "loop" and "aten::lstm" in post.last_engine_reason
    torch.testing.assert_close(pred.per_draw, torch.softmax(_loop(net, post, x), -1), rtol=1e-5, atol=1e-6)
    # asked for vmap explicitly: one error naming the engine and the model, not x
    with pytest.raises(ValueError, match=r"^engine: 'vmap' cannot run the model \(_LSTMNet\)"):
        post.outputs(x, engine="vmap")
    # ... unless x is what is wrong: then the error names x, whichever engine was asked for
    with pytest.raises(ValueError, match=r"^x: the model cannot be evaluated on x of shape \(16, 6, 5\)"):
        post.outputs(torch.randn(16, 6, 5), engine="vmap")
    # a vmap-able model whose first vmap chunk fails would fall back the same way; the recorded choice
    # is reused on the next call with the same input shape
    post.outputs(x)
    assert post.last_engine == "loop"


def test_a_model_that_cannot_run_on_x_names_model_op_and_shape():
    torch.manual_seed(0)
    net = _LSTMNet()
    draws = {n: p.detach().expand(1, 4, *p.shape).clone() for n, p in net.named_parameters()}
    post = Posterior(draws, {}, {"task": "classification"}, model=net)
    with pytest.raises(ValueError, match=r"^x: the model cannot be evaluated on x of shape \(16, 6, 5\) "
                                         r"and dtype torch.float32.*_LSTMNet raised RuntimeError") as info:
        post.predict(torch.randn(16, 6, 5))  # 5 features, the LSTM takes 4
    assert isinstance(info.value.__cause__, RuntimeError)


def test_timed_choice_is_the_faster_engine_and_matches_the_loop():
    entry = next(e for e in ZOO if e.name == "cnn_bn_dropout")
    net = entry.make_model().eval()
    draws = {n: p.detach() + 0.05 * torch.randn(1, 40, *p.shape) for n, p in net.named_parameters()}
    fixed = {n: b.clone() for n, b in net.named_buffers()}
    post = Posterior(draws, {}, {"task": "classification"}, fixed=fixed, model=net)
    x, _ = images(32)
    out = post.outputs(x)
    assert post.last_engine in ("vmap", "loop") and post.last_engine_reason.startswith("timed")
    torch.testing.assert_close(out, _loop(net, post, x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="^engine: 'batched' needs an nn.Sequential MLP"):
        post.outputs(x, engine="batched")
    with pytest.raises(ValueError, match="^engine: expected one of"):
        post.outputs(x, engine="fast")


def test_train_mode_model_gets_the_eval_chain_method_and_comes_back_in_train_mode():
    entry = next(e for e in ZOO if e.name == "cnn_bn_dropout")
    data = entry.make_data(N)
    runs = {}
    for mode in ("eval", "train"):
        model = _handed_in(entry, mode)
        stats = model[1].running_mean.clone()
        runs[mode] = pb.sample(model, entry.loss, data, seed=3, **RUN)
        assert model.training == (mode == "train") and all(m.training == (mode == "train")
                                                            for m in model.modules())
        assert torch.equal(model[1].running_mean, stats)  # BatchNorm statistics frozen while sampling
    assert runs["eval"].metadata["chain_method"] == "vectorized"
    assert runs["train"].metadata["chain_method"] == "vectorized"
    for k, v in runs["train"].draws.items():
        assert torch.equal(v, runs["eval"].draws[k])
    # a mixed mode (one submodule in eval inside a train-mode model) comes back exactly as it was
    model = _handed_in(entry, "train")
    model[4].eval()
    before = _modes(model)
    pb.sample(model, entry.loss, data, seed=3, **{**RUN, "num_chains": 2})
    assert _modes(model) == before


def test_train_mode_dropout_gives_each_chain_its_own_masks_reproducibly():
    entry = next(e for e in ZOO if e.name == "cnn_bn_dropout")
    data = entry.make_data(N)
    run = {**RUN, "batch_size": None, "num_warmup": 0, "num_draws": 3}  # full batch: the same data per chain
    model = _handed_in(entry, "train")
    rng = torch.get_rng_state()
    on = pb.sample(model, entry.loss, data, seed=1, train_mode_dropout=True, **run)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's global RNG is untouched
    again = pb.sample(model, entry.loss, data, seed=1, train_mode_dropout=True, **run)
    off = pb.sample(model, entry.loss, data, seed=1, **run)
    assert model.training and all(m.training for m in model.modules())
    assert on.metadata["chain_method"] == "vectorized" and on.metadata["train_mode_dropout"] is True
    first_on, first_off = on.sample_stats["loss"][:, 0], off.sample_stats["loss"][:, 0]
    # every chain starts at the same weights on the same batch: without dropout the same loss, with it each
    # chain's own mask gives its own loss
    assert torch.allclose(first_off, first_off[0].expand(3))
    assert len(set(first_on.tolist())) == 3
    for k, v in on.draws.items():
        assert torch.equal(v, again.draws[k])
    seq = pb.sample(model, entry.loss, data, seed=1, train_mode_dropout=True, chain_method="sequential",
                    **run)
    assert len(set(seq.sample_stats["loss"][:, 0].tolist())) == 3
    with pytest.raises(ValueError, match="^train_mode_dropout: expected True or False"):
        pb.sample(model, entry.loss, data, seed=1, train_mode_dropout=1, **run)


def test_train_mode_dropout_resume_is_bit_identical(tmp_path):
    entry = next(e for e in ZOO if e.name == "cnn_bn_dropout")
    data = entry.make_data(N)
    run = {**RUN, "num_chains": 2, "chain_method": "sequential", "train_mode_dropout": True}
    full = pb.sample(entry.make_model(), entry.loss, data, seed=2, **run)
    path = tmp_path / "ckpt.pt"
    # stop the first run part-way through its second chain: raise from a stat function at a kept draw
    calls = {"n": 0}

    def stop(params):
        calls["n"] += 1
        if calls["n"] == 12 + 5:
            raise KeyboardInterrupt
        return torch.tensor(0.0)

    with pytest.raises(KeyboardInterrupt):
        pb.sample(entry.make_model(), entry.loss, data, seed=2, checkpoint=path, checkpoint_every=3,
                  stat_fns={"s": stop}, **run)
    resumed = pb.sample(entry.make_model(), entry.loss, data, seed=2, checkpoint=path, checkpoint_every=3,
                        stat_fns={"s": lambda p: torch.tensor(0.0)}, resume=True, **run)
    for k, v in full.draws.items():
        assert torch.equal(resumed.draws[k], v)


class _Fussy(nn.Module):
    """Fails on weights whose first entry is large: the loop over draws raises part-way through."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("offset", torch.zeros(2))

    def forward(self, x):
        if float(self.lin.weight[0, 0]) > 5:
            raise RuntimeError("weight too large")
        return self.lin(x) + self.offset


def test_the_loop_engine_hands_the_module_its_own_tensors_back():
    torch.manual_seed(0)
    net = _Fussy()
    tensors = [*net.named_parameters(), *net.named_buffers()]
    own = {k: (t, t.data_ptr(), t.detach().clone()) for k, t in tensors}
    draws = {n: p.detach() + 0.1 * torch.randn(1, 6, *p.shape) for n, p in net.named_parameters()}
    post = Posterior(draws, {}, {"task": "regression"}, fixed={"offset": torch.ones(2)}, model=net)
    x = torch.randn(4, 3)
    out = post.outputs(x, engine="loop")
    expected = torch.stack([functional_call(net, {"offset": torch.ones(2), **{k: v[0, i] for k, v in
                                                                              draws.items()}}, (x,))
                            for i in range(6)])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the fixed buffer value is the posterior's
    draws["lin.weight"][0, 3, 0, 0] = 10.0  # draw 3 makes the forward raise
    with pytest.raises(RuntimeError, match="weight too large"):
        post.outputs(x, engine="loop")
    for k, t in [*net.named_parameters(), *net.named_buffers()]:
        assert t is own[k][0] and t.data_ptr() == own[k][1] and torch.equal(t, own[k][2]), k


def test_sequential_fallback_reason_is_in_metadata_and_progress_output(capsys):
    entry = next(e for e in ZOO if e.name == "lstm")
    post = pb.sample(entry.make_model(), entry.loss, entry.make_data(N), seed=0, progress=True,
                     **{**RUN, "num_chains": 2, "num_draws": 4})
    assert post.metadata["chain_method"] == "sequential"
    assert "aten::lstm" in post.metadata["chain_method_reason"]
    out = capsys.readouterr()
    assert "chains run sequentially" in out.out + out.err and "aten::lstm" in out.out + out.err
