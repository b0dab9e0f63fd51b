"""Fisher / Δθ IIW estimator (SPEC §3a): JVP quadratic form vs brute force, scales, groups, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from iiw_helpers import PaddedBag
from torch import nn

import pib_bayes as pb
from pib_bayes.iiw import IIWResult, fisher
from pib_bayes.iiw.fisher import per_example_gradient_quadratic


def _moved(model: nn.Module, scale: float = 0.05, seed: int = 1) -> dict[str, torch.Tensor]:
    """theta_0 = the current weights; then move the weights by a random Δθ."""
    theta_0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return theta_0


def _delta(model, theta_0, names=None):
    return {n: p.detach() - theta_0[n] for n, p in model.named_parameters() if names is None or n in names}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 2 * 2, 3)).double()


@pytest.mark.parametrize("engine", ["jvp", "layerwise"])
@pytest.mark.parametrize("make, xshape", [(_mlp, (6,)), (_cnn, (1, 8, 8))])
def test_jvp_equals_per_example_gradients(make, xshape, engine):
    model = make()
    theta_0 = _moved(model)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, *xshape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    loss = nn.CrossEntropyLoss(reduction="none")
    r = fisher(model, loss, (x, y), theta_0, chunk_size=16, engine=engine)  # chunks must not change the sum
    assert r.settings["engine"] == engine
    for group, members in {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}.items():
        ref = per_example_gradient_quadratic(model, loss, (x, y), _delta(model, theta_0, members))
        assert r.raw_per_group[group] == pytest.approx(ref, rel=1e-5)
    joint = per_example_gradient_quadratic(model, loss, (x, y), _delta(model, theta_0))
    assert r.settings["joint_raw"] == pytest.approx(joint, rel=1e-5)
    assert r.raw_total == pytest.approx(sum(r.raw_per_group.values()), rel=1e-12)
    assert r.units == "raw" and r.per_group == r.raw_per_group


class _Shared(nn.Module):
    """One Linear applied twice (its derivative sums over both uses), an in-place ReLU that overwrites a
    layer output, and a reflect-padded Conv1d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect")
        self.act = nn.ReLU(inplace=True)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.act(self.conv(x)).flatten(1)[:, :6]
        return self.head(torch.tanh(self.mid(torch.tanh(self.mid(h)))))


def test_layerwise_weight_sharing_inplace_and_padding_modes():
    torch.manual_seed(3)
    model = _Shared().double()
    theta_0 = _moved(model)
    x, y = torch.randn(25, 2, 5, dtype=torch.float64), torch.randint(0, 2, (25,))
    loss = nn.CrossEntropyLoss(reduction="none")
    r = fisher(model, loss, (x, y), theta_0, chunk_size=10)
    assert r.settings["engine"] == "layerwise"
    for group in ("conv", "mid", "head"):
        members = [f"{group}.weight", f"{group}.bias"]
        ref = per_example_gradient_quadratic(model, loss, (x, y), _delta(model, theta_0, members))
        assert r.raw_per_group[group] == pytest.approx(ref, rel=1e-6)
    # groups that split a layer's weight from its bias, or leave layers out
    split = {"w": ["mid.weight", "conv.weight"], "b": ["mid.bias"], "hb": ["head.bias"]}
    r_lw = fisher(model, loss, (x, y), theta_0, groups=split, engine="layerwise")
    r_jvp = fisher(model, loss, (x, y), theta_0, groups=split, engine="jvp")
    for group, members in split.items():
        ref = per_example_gradient_quadratic(model, loss, (x, y), _delta(model, theta_0, members))
        assert r_lw.raw_per_group[group] == pytest.approx(ref, rel=1e-6)
        assert r_jvp.raw_per_group[group] == pytest.approx(ref, rel=1e-6)
    assert r_lw.settings["joint_raw"] == pytest.approx(r_jvp.settings["joint_raw"], rel=1e-9)


def test_engine_choice_and_errors():
    class Scaled(nn.Module):  # a bare parameter outside any Linear/Conv: only the JVP engine can take it
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.lin(x) * self.scale

    torch.manual_seed(0)
    model = Scaled().double()
    theta_0 = _moved(model)
    data = (torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64))
    # per group: the Linear layer by the layerwise identity, the bare parameter by JVP (not the whole model)
    mixed = fisher(model, "gaussian", data, theta_0)
    assert mixed.settings["engine"] == "mixed"
    assert mixed.settings["engines"] == {"lin": "layerwise", "scale": "jvp"}
    whole_jvp = fisher(model, "gaussian", data, theta_0, engine="jvp")
    assert whole_jvp.settings["engines"] == {"lin": "jvp", "scale": "jvp"}
    for group in ("lin", "scale"):
        assert mixed.raw_per_group[group] == pytest.approx(whole_jvp.raw_per_group[group], rel=1e-9)
    assert mixed.settings["joint_raw"] == pytest.approx(whole_jvp.settings["joint_raw"], rel=1e-9)
    only_lin = {"lin": ["lin.weight", "lin.bias"]}
    auto = fisher(model, "gaussian", data, theta_0, groups=only_lin)
    jvp = fisher(model, "gaussian", data, theta_0, groups=only_lin, engine="jvp")
    assert auto.settings["engine"] == "layerwise"
    assert auto.raw_total == pytest.approx(jvp.raw_total, rel=1e-9)
    with pytest.raises(ValueError, match="engine: 'layerwise' needs"):
        fisher(model, "gaussian", data, theta_0, engine="layerwise")
    # a global forward hook may rewrite any layer's output: only the JVP engine sees it
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    try:
        assert fisher(model, "gaussian", data, theta_0, groups=only_lin).settings["engine"] == "jvp"
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="engine: expected one of"):
        fisher(model, "gaussian", data, theta_0, engine="fast")


def test_wrong_reference_is_caught():
    """The brute-force comparison would catch a JVP along the wrong direction (e.g. θ instead of Δθ)."""
    model = _mlp()
    theta_0 = _moved(model)
    x, y = torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 3, (30,))
    r = fisher(model, "cross_entropy", (x, y), theta_0)
    wrong = per_example_gradient_quadratic(model, nn.CrossEntropyLoss(reduction="none"), (x, y),
                                           {n: p.detach() for n, p in model.named_parameters()})
    assert r.settings["joint_raw"] != pytest.approx(wrong, rel=1e-2)


def test_nats_scale_and_groups():
    model = _mlp()
    theta_0 = _moved(model)
    data = (torch.randn(50, 6, dtype=torch.float64), torch.randint(0, 3, (50,)))
    raw = fisher(model, "cross_entropy", data, theta_0)
    nats = fisher(model, "cross_entropy", data, theta_0, beta=0.02)
    assert nats.units == "nats" and raw.units == "raw"
    for g in raw.per_group:
        assert nats.per_group[g] == pytest.approx(0.5 * raw.per_group[g] / 0.02, rel=1e-12)
    assert nats.raw_per_group == raw.raw_per_group
    # a user grouping: everything but the last layer in one group; its value is the joint form of its members
    custom = fisher(model, "cross_entropy", data, theta_0,
                    groups={"body": ["0.weight", "0.bias", "2.weight", "2.bias"],
                            "head": ["4.weight", "4.bias"]})
    ref = per_example_gradient_quadratic(model, nn.CrossEntropyLoss(reduction="none"), data,
                                         _delta(model, theta_0, ["0.weight", "0.bias", "2.weight", "2.bias"]))
    assert custom.raw_per_group["body"] == pytest.approx(ref, rel=1e-5)
    assert custom.raw_per_group["head"] == pytest.approx(raw.raw_per_group["4"], rel=1e-10)


def test_parameter_order_invariance():
    """The same net with its layers registered in another order gives the same per-group values."""
    torch.manual_seed(0)
    a = nn.Linear(4, 5).double()
    b = nn.Linear(5, 2).double()

    class Net(nn.Module):
        def __init__(self, first):
            super().__init__()
            if first == "a":
                self.a, self.b = a, b
            else:
                self.b, self.a = b, a

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    n1, n2 = Net("a"), Net("b")
    assert [n for n, _ in n1.named_parameters()] != [n for n, _ in n2.named_parameters()]
    theta_0 = _moved(n1)
    data = (torch.randn(30, 4, dtype=torch.float64), torch.randn(30, 2, dtype=torch.float64))
    r1 = fisher(n1, "gaussian", data, theta_0, beta=0.1)
    r2 = fisher(n2, "gaussian", data, theta_0, beta=0.1)
    assert set(r1.per_group) == set(r2.per_group) == {"a", "b"}
    for g in r1.per_group:
        assert r1.per_group[g] == pytest.approx(r2.per_group[g], rel=1e-12)


def test_minibatch_variant_scale():
    """The minibatch form (mean over batches of the squared projection of each batch's mean gradient):
    on a least-squares fit (∇L_S = 0)
    it is ≈ per-example value / m, with m the minibatch size; its spread is measured, not assumed."""
    torch.manual_seed(0)
    n, d = 4000, 3
    x = torch.randn(n, d, dtype=torch.float64)
    y = x @ torch.ones(d, 1, dtype=torch.float64) + torch.randn(n, 1, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)  # ∇L_S(θ_S) = 0
    theta_0 = {"weight": torch.zeros(1, d, dtype=torch.float64)}
    full = fisher(model, "gaussian", (x, y), theta_0)
    m = 100
    vals = torch.tensor([fisher(model, "gaussian", (x, y), theta_0, method="minibatch", batch_size=m,
                                num_batches=10, seed=s).raw_total for s in range(40)])
    se = float(vals.std() / math.sqrt(len(vals)))
    # without replacement from n: Var(mean) = Var/m * (n-m)/(n-1)
    expected = full.raw_total / m * (n - m) / (n - 1)
    assert abs(float(vals.mean()) - expected) < 4 * se
    assert abs(float(vals.mean()) - full.raw_total) > 100 * se  # so it is not the per-example scale


def test_nats_fisher_approaches_exact_when_small():
    """SPEC §3c oracle: Bayesian linear regression, X fixed, fresh y. With θ_S = μ_S and θ₀ = E_S μ_S
    the nats-scaled Fisher ½ΔθᵀFΔθ/β averaged over S estimates ½ tr(Λ Cov μ_S) (first order of the exact
    ½ log det(I + Λ Cov μ_S)). Small I: within MC error plus the second-order term; large I: it is not."""
    g = torch.Generator().manual_seed(0)
    n, d, s, sigma0 = 400, 4, 1.0, 10.0
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    wstar = torch.randn(d, generator=g, dtype=torch.float64)
    loss = pb.GaussianLoss(s)

    def run(beta: float, reps: int = 1000):
        lam = torch.eye(d, dtype=torch.float64) / sigma0**2 + x.T @ x / (n * beta * s**2)
        a = torch.linalg.solve(lam, x.T) / (n * beta * s**2)
        cov_mu = s**2 * a @ a.T
        exact = 0.5 * float(torch.logdet(torch.eye(d, dtype=torch.float64) + lam @ cov_mu))
        mu_bar = a @ (x @ wstar)
        model = nn.Linear(d, 1, bias=False).double()
        vals = []
        for _ in range(reps):
            y = x @ wstar + s * torch.randn(n, generator=g, dtype=torch.float64)
            with torch.no_grad():
                model.weight.copy_((a @ y)[None])
            vals.append(fisher(model, loss, (x, y[:, None]), {"weight": mu_bar[None]}, beta=beta).total)
        v = torch.tensor(vals)
        return exact, float(v.mean()), float(v.std() / math.sqrt(reps))

    exact, est, se = run(beta=20.0 / n)   # I ≈ 0.1 nats
    print(f"small I: exact {exact:.4f} nats, mean nats-Fisher {est:.4f} ± {se:.4f}")
    assert exact < 0.15
    # first-order term overshoots the exact log det by at most ½ Σ λ²/2 ≈ I²; plus 4 s.e.
    assert abs(est - exact) < 4 * se + exact**2
    # would catch a missing ½ or a wrong β power: either moves the mean by ~exact >> 4 s.e. + exact²
    assert abs(2 * est - exact) > 4 * se + exact**2
    exact_big, est_big, se_big = run(beta=0.05 / n)  # I ≈ 6 nats: the first-order estimate is far off
    print(f"large I: exact {exact_big:.3f} nats, mean nats-Fisher {est_big:.3f} ± {se_big:.3f}")
    assert exact_big > 5 and est_big > 2 * exact_big


def test_dataloader_and_chunks_give_the_same_value():
    model = _mlp()
    theta_0 = _moved(model)
    x, y = torch.randn(70, 6, dtype=torch.float64), torch.randint(0, 3, (70,))
    ref = fisher(model, "cross_entropy", (x, y), theta_0, chunk_size=None)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    for r in (fisher(model, "cross_entropy", loader, theta_0), fisher(model, "cross_entropy", (x, y), theta_0,
                                                                        chunk_size=7)):
        assert r.settings["examples"] == 70
        for g in ref.raw_per_group:
            assert r.raw_per_group[g] == pytest.approx(ref.raw_per_group[g], rel=1e-10)


def test_params_override_and_stat_use():
    model = _mlp()
    theta_0 = {k: v.clone() for k, v in model.state_dict().items()}
    data = (torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,)))
    assert fisher(model, "cross_entropy", data, theta_0).total == 0.0
    moved = {n: p.detach() + 0.1 for n, p in model.named_parameters()}
    r = fisher(model, "cross_entropy", data, theta_0, params=moved)
    assert r.total > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in theta_0.items())  # model untouched


def test_bad_inputs():
    model = _mlp()
    theta_0 = {k: v.clone() for k, v in model.state_dict().items()}
    data = (torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,)))
    with pytest.raises(ValueError, match="groups: unknown parameter names"):
        fisher(model, "cross_entropy", data, theta_0, groups={"g": ["nope.weight"]})
    with pytest.raises(ValueError, match="theta_0: '0.weight' has shape"):
        fisher(model, "cross_entropy", data, {**theta_0, "0.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="theta_0: missing parameter"):
        fisher(model, "cross_entropy", data, {k: v for k, v in theta_0.items() if k != "0.bias"})
    with pytest.raises(ValueError, match="theta_0: unknown names"):
        fisher(model, "cross_entropy", data, {**theta_0, "extra": torch.zeros(1)})
    with pytest.raises(TypeError, match="theta_0"):
        fisher(model, "cross_entropy", data, 0.5)
    with pytest.raises(ValueError, match="method"):
        fisher(model, "cross_entropy", data, theta_0, method="hessian")
    with pytest.raises(ValueError, match="beta"):
        fisher(model, "cross_entropy", data, theta_0, beta=-1.0)
    with pytest.raises(ValueError, match="loss_fn: must return one loss per example"):
        fisher(model, nn.CrossEntropyLoss(), data, theta_0)
    with pytest.raises(ValueError, match="in both"):
        fisher(model, "cross_entropy", data, theta_0, groups={"a": ["0.weight"], "b": ["0.weight"]})


def test_data_the_model_cannot_take_names_data():
    model = _mlp()
    theta_0 = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    for method in ("jvp", "minibatch", "paper"):
        with pytest.raises(ValueError, match=r"^data: the model cannot be evaluated on x of shape \(20, 5\)"):
            fisher(model, "cross_entropy", (x[:, :5], y), theta_0, method=method)
        with pytest.raises(ValueError, match="^data: the model cannot be evaluated on x .* torch.int64"):
            fisher(model, "cross_entropy", (x.long(), y), theta_0, method=method)
        with pytest.raises(ValueError, match="^data: the loss cannot .* labels in \\[0, 2\\]"):
            fisher(model, "cross_entropy", (x, y + 3), theta_0, method=method)
        with pytest.raises(ValueError, match="^data: the loss cannot"):
            fisher(model, "cross_entropy", (x, y.double()), theta_0, method=method)
    # a bad label in a later chunk only is caught too
    y_late = y.clone()
    y_late[-1] = 7
    with pytest.raises(ValueError, match="^data: the loss cannot"):
        fisher(model, "cross_entropy", (x, y_late), theta_0, chunk_size=8)
    # a loss that is not per-example is still reported as such (not as a data error)
    with pytest.raises(ValueError, match="^loss_fn: must return one loss per example"):
        fisher(model, nn.CrossEntropyLoss(), (x, y), theta_0)
    with pytest.raises(ValueError, match="^theta_0: '0.weight' contains NaN"):
        fisher(model, "cross_entropy", (x, y), {**theta_0, "0.weight": torch.full_like(theta_0["0.weight"],
                                                                                       math.nan)})


def test_result_type():
    model = _mlp()
    theta_0 = _moved(model)
    r = fisher(model, "cross_entropy", (torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))),
               theta_0, beta=0.1)
    assert isinstance(r, IIWResult) and r.method == "fisher-jvp"
    assert r.total == pytest.approx(sum(r.per_group.values()))
    assert r.to_dict()["units"] == "nats"


class _Normed(nn.Module):
    """BatchNorm2d / BatchNorm1d (running statistics) and LayerNorm between Conv/Linear layers."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(3 * 6 * 6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8),
                                  nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.body(x)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(self.proj(x)).mean(1))


def _normed_data(g):
    return torch.randn(30, 1, 8, 8, generator=g, dtype=torch.float64)


def _bag_data(g):
    return torch.randint(0, 10, (30, 5), generator=g)  # token 0 (the padding row) appears


def _seq_data(g):
    return torch.randn(30, 5, 4, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("make, data, expect", [
    (_Normed, _normed_data, {"body.1": "layerwise", "body.5": "layerwise", "body.8": "layerwise"}),
    (PaddedBag, _bag_data, {"embed": "layerwise", "head": "layerwise"}),
    (_Attention, _seq_data, {"proj": "layerwise", "encoder.layers.0.self_attn": "jvp",
                             "encoder.layers.0.self_attn.out_proj": "jvp",
                             "encoder.layers.0.linear1": "layerwise", "encoder.layers.0.norm1": "layerwise",
                             "head": "layerwise"}),
], ids=["batchnorm-layernorm", "embedding-padding", "attention"])
def test_layerwise_covers_norms_and_embeddings_per_group(make, data, expect):
    torch.manual_seed(0)
    model = make().double()
    g = torch.Generator().manual_seed(4)
    x = data(g)
    y = torch.randint(0, 3, (30,), generator=g)
    model.train()
    with torch.no_grad():
        model(x)  # non-trivial BatchNorm running statistics
    model.eval()
    theta_0 = _moved(model, scale=0.2)
    loss = nn.CrossEntropyLoss(reduction="none")
    r = fisher(model, loss, (x, y), theta_0, chunk_size=16)
    for group, engine in expect.items():
        assert r.settings["engines"][group] == engine, group
    assert r.settings["engine"] == ("mixed" if "jvp" in expect.values() else "layerwise")
    jvp = fisher(model, loss, (x, y), theta_0, engine="jvp")
    for group in r.groups:
        members = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] == group]
        ref = per_example_gradient_quadratic(model, loss, (x, y), _delta(model, theta_0, members))
        assert ref > 0, group
        assert r.raw_per_group[group] == pytest.approx(ref, rel=1e-6), group
        assert jvp.raw_per_group[group] == pytest.approx(ref, rel=1e-6), group
    joint = per_example_gradient_quadratic(model, loss, (x, y), _delta(model, theta_0))
    assert r.settings["joint_raw"] == pytest.approx(joint, rel=1e-6)
    if make is not _Attention:
        strict = fisher(model, loss, (x, y), theta_0, engine="layerwise")
        assert strict.raw_total == pytest.approx(r.raw_total, rel=1e-12)


def test_embedding_padding_row_moves_nothing():
    """The padding row's gradient is zero, so moving only that row gives IIW 0 (a tangent that looked the
    row up anyway would not)."""
    torch.manual_seed(0)
    model = PaddedBag().double().eval()
    theta_0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.embed.weight[0] += 1.0
    x = torch.zeros(8, 5, dtype=torch.long)
    x[:, 0] = 3
    y = torch.zeros(8, dtype=torch.long)
    r = fisher(model, nn.CrossEntropyLoss(reduction="none"), (x, y), theta_0)
    assert r.settings["engines"]["embed"] == "layerwise" and r.raw_per_group["embed"] == 0.0
    with torch.no_grad():
        model.embed.weight[3] += 1.0  # a row that is looked up: now it counts
    assert fisher(model, nn.CrossEntropyLoss(reduction="none"), (x, y), theta_0).raw_per_group["embed"] > 0
