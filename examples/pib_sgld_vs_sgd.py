"""SPEC §5 claim 5: sampling the PIB posterior with SGLD improves test accuracy over plain SGD (MNIST MLP).

Per seed, from the same initialisation and with the same minibatches per step budget:

* SGD: plain minibatch SGD, learning rate η, ``--epochs`` epochs; the final weights predict.
* PIB-SGLD: :func:`pib_bayes.sample` on U(w) = L_B(w)/β - log p(w) with p = N(θ_init, σ_0² I) and
  the SGLD step h = η β (so the drift equals SGD's), the same number of steps; the first half is
  warm-up, draws are kept over the second half, and the posterior predictive (1/M) Σ softmax
  averages ``--chains`` chains.
* SGD-ensemble (a control): SGD's own iterates over the second half, averaged the same way, without
  noise, so that the effect of averaging alone is visible.

Check: the mean over seeds of (PIB-SGLD test accuracy - SGD test accuracy) > 0, reported with its
standard error over seeds.

    python examples/pib_sgld_vs_sgd.py --data ../shared/data/mnist
    python examples/pib_sgld_vs_sgd.py --smoke

With ``--config examples/configs/pib_vs_sgd.toml`` it runs the pre-registered design instead: per seed the
authors' prior and pretraining, then every arm from that same net with :func:`pib_bayes.train_pib` (SGD to
convergence, the authors' PIB-SGD, its β = 0 ablation, SGLD at three temperatures with the averaged
predictive, PIB-Langevin); the paired differences with SGD get a paired t-test and a Wilcoxon test with 95%
intervals, Holm over the comparisons, and the minimal detectable effect.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Timer,
    base_parser,
    fixed_split,
    holm,
    load_config,
    load_split,
    mlp,
    paired_comparison,
    provenance,
    pyplot,
    save_figure,
    setup,
    usage_error,
    verdict,
    write_csv,
    write_json,
)

from pib_bayes import GaussianPrior, sample, train_pib  # noqa: E402
from pib_bayes.iiw import PAPER_PRIOR, fit_prior_mean  # noqa: E402
from pib_bayes.uncertainty import expected_calibration_error  # noqa: E402


def run_seed(args, seed: int, x_tr, y_tr, x_te, y_te) -> dict:
    n = len(y_tr)
    bs = min(args.batch_size, n)
    steps_per_epoch = n // bs
    total = args.epochs * steps_per_epoch
    warmup = total // 2
    thin = max(1, (total - warmup) // args.draws)
    draws = max(1, (total - warmup) // thin)
    beta = args.temperature / n

    # --- SGD (and its iterate ensemble over the second half)
    model = mlp([args.hidden], args.activation, seed)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(seed + 1)
    ens, k, t = torch.zeros(len(y_te), 10), 0, 0
    for _ in range(args.epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * bs : (s + 1) * bs]
            opt.zero_grad()
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
            t += 1
            if t > warmup and (t - warmup) % thin == 0:
                with torch.no_grad():
                    ens += torch.softmax(model(x_te), -1)
                k += 1
    with torch.no_grad():
        sgd_acc = float((model(x_te).argmax(-1) == y_te).double().mean())
        sgd_train = float((model(x_tr).argmax(-1) == y_tr).double().mean())
    ens_acc = float(((ens / max(k, 1)).argmax(-1) == y_te).double().mean())

    # --- PIB-SGLD from the same initialisation
    model = mlp([args.hidden], args.activation, seed)
    model.load_state_dict(init)
    prior = GaussianPrior.from_module(model, std=args.prior_std, mean="init")
    post = sample(
        model,
        "cross_entropy",
        (x_tr, y_tr),
        beta=beta,
        prior=prior,
        sampler="sgld",
        step_size=args.lr * beta,
        num_chains=args.chains,
        num_warmup=warmup,
        num_draws=draws,
        thin=thin,
        batch_size=bs,
        seed=seed,
    )
    pred = post.predict(x_te)
    sgld_acc = float((pred.mean.argmax(-1) == y_te).double().mean())
    single = float((pred.per_draw[-1].argmax(-1) == y_te).double().mean())  # one final draw, chain -1
    return {
        "seed": seed,
        "sgd_test_acc": sgd_acc,
        "sgd_train_acc": sgd_train,
        "sgd_ensemble_test_acc": ens_acc,
        "pib_sgld_test_acc": sgld_acc,
        "pib_sgld_single_draw_test_acc": single,
        "diff_sgld_minus_sgd": sgld_acc - sgd_acc,
        "diff_sgld_minus_sgd_ensemble": sgld_acc - ens_acc,
        "beta": beta,
        "step_size": args.lr * beta,
        "steps": total,
        "warmup": warmup,
        "thin": thin,
        "draws_per_chain": draws,
        "chains": args.chains,
        "diverged_chains": int(post.diverged.sum()),
    }


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0], n_train=5000, n_test=5000, epochs=20, lr=0.05)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--activation", default="relu", choices=["linear", "tanh", "relu", "sigmoid"])
    p.add_argument(
        "--temperature", type=float, default=1.0, help="beta = temperature / n (1 = Bayes posterior)"
    )
    p.add_argument("--prior-std", type=float, default=1.0, help="sigma_0 of the prior centred at the init")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--draws", type=int, default=25, help="draws kept per chain (second half of the steps)")
    p.add_argument("--seeds", type=int, default=3, help="repetitions with seeds seed, seed+1, ...")
    p.add_argument("--config", default=None, help="a pre-registered config (examples/configs/pib_vs_sgd.toml "
                   "or beta_frontier.toml): its split, seeds and arms replace the flags above")
    args = p.parse_args(argv)
    out = setup(args, "pib_sgld_vs_sgd")
    if args.config:
        return run_config(args, load_config(args.config), out, Timer())
    if args.smoke:
        args.seeds, args.chains, args.draws = 1, 2, 4
    timer = Timer()
    rows = []
    for i in range(args.seeds):
        seed = args.seed + i
        x_tr, y_tr, x_te, y_te = load_split(args.data, args.n_train, args.n_test, seed)
        r = run_seed(args, seed, x_tr, y_tr, x_te, y_te)
        rows.append(r)
        print(
            f"seed {seed}: test accuracy SGD {r['sgd_test_acc']:.4f}, SGD iterate ensemble "
            f"{r['sgd_ensemble_test_acc']:.4f}, PIB-SGLD posterior predictive {r['pib_sgld_test_acc']:.4f} "
            f"(single draw {r['pib_sgld_single_draw_test_acc']:.4f}); diverged chains {r['diverged_chains']}",
            flush=True,
        )
    diffs = [r["diff_sgld_minus_sgd"] for r in rows]
    mean = sum(diffs) / len(diffs)
    se = (
        math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
        if len(diffs) > 1
        else float("nan")
    )
    diffs_e = [r["diff_sgld_minus_sgd_ensemble"] for r in rows]
    mean_e = sum(diffs_e) / len(diffs_e)
    ok = mean > 0

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    labels = ["SGD", "SGD iterate\nensemble", "PIB-SGLD\nposterior pred.", "PIB-SGLD\nsingle draw"]
    keys = ["sgd_test_acc", "sgd_ensemble_test_acc", "pib_sgld_test_acc", "pib_sgld_single_draw_test_acc"]
    for r in rows:
        ax.plot(range(4), [r[k] for k in keys], "o-", alpha=0.7, label=f"seed {r['seed']}")
    ax.set_xticks(range(4), labels)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"MNIST MLP 784-{args.hidden}-10, n={args.n_train}; mean gain {100 * mean:+.2f} points")
    ax.legend(fontsize=8)
    save_figure(fig, out / "pib_sgld_vs_sgd.png")
    write_csv(out / "pib_sgld_vs_sgd.csv", rows)
    write_json(
        out / "pib_sgld_vs_sgd.json",
        {
            "claim": "PIB-SGLD improves test accuracy over plain SGD",
            "mean_diff": mean,
            "se_diff": se,
            "mean_diff_vs_ensemble": mean_e,
            "passed": ok,
            "rows": rows,
            "args": vars(args),
            "seconds": timer(),
        },
    )
    print(
        f"CHECK mean test-accuracy gain of PIB-SGLD over SGD = {100 * mean:+.2f} points "
        f"(SE {100 * se:.2f} over {len(rows)} seeds; vs the SGD iterate ensemble {100 * mean_e:+.2f}) > 0: "
        f"{verdict(ok)}; {timer()} s; outputs in {out}"
    )
    return 0


def pretrained(cfg: dict, split: dict, seed: int, smoke: bool) -> tuple[torch.nn.Module, dict, dict]:
    """The authors' pipeline before the fine-tune (run_vgg_PIB.py): θ₀ = ``fit_prior_mean(**PAPER_PRIOR)`` on
    the prior split, the net re-initialised N(0, 0.01²), then Adam on S with early stopping on the prior
    split's accuracy (``patience`` epochs without a strictly higher one; the best epoch's weights kept)."""
    hidden = [16] if smoke else list(cfg["model"]["hidden"])
    model = mlp(hidden, cfg["model"]["activation"], seed)
    theta_0 = fit_prior_mean(model, "cross_entropy", split["prior"], seed=seed, **PAPER_PRIOR)
    pre = cfg["common"]["pretrain"]
    (x, y), (xv, yv) = split["train"], split["prior"]
    opt = torch.optim.Adam(model.parameters(), lr=float(pre["lr"]))
    gen = torch.Generator().manual_seed(seed + 1)
    best, best_state, bad, epochs = -1.0, None, 0, 0
    for _ in range(2 if smoke else int(pre["epochs"])):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), int(pre["batch_size"])):
            idx = perm[start:start + int(pre["batch_size"])]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        epochs += 1
        model.eval()
        with torch.no_grad():
            acc = float((model(xv).argmax(-1) == yv).double().mean())
        if acc > best:
            best, bad = acc, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= int(pre["patience"]):
                break
    model.load_state_dict(best_state)
    model.eval()
    return model, theta_0, {"pretrain_epochs": epochs, "pretrain_val_acc": best}


def _arms(cfg: dict, n: int) -> dict[str, dict[str, Any]]:
    """The config's arms as train_pib keyword sets (an SGLD arm per temperature)."""
    out: dict[str, dict[str, Any]] = {}
    for name, arm in cfg["arms"].items():
        if arm["mode"] == "paper":
            out[name] = {"mode": "paper", "beta": float(arm["beta"]), "noise_std": float(arm["noise_std"])}
            continue
        kw = {"mode": "langevin", "beta": float(arm["beta"]), "burn_in": int(arm["burn_in"]),
              "thin": int(arm["thin"])}
        if "temperatures" in arm:
            for t in arm["temperatures"]:
                out[f"{name}_T{t:g}"] = {**kw, "gibbs_beta": float(t) / n}
        else:
            assert arm["gibbs_beta"] == "1/n", arm["gibbs_beta"]
            out[name] = {**kw, "gibbs_beta": 1.0 / n}
    return out


def _evaluate(result, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        probs = result.predict_proba(x)
    nll = float(-torch.log(probs[torch.arange(len(y)), y].clamp_min(1e-12)).mean())
    return {"test_acc": float((probs.argmax(-1) == y).double().mean()), "test_nll": nll,
            "test_ece": expected_calibration_error(probs, y)[0]}


def run_config(args, cfg: dict, out, timer) -> int:
    """The pre-registered design of ``cfg`` (examples/configs/pib_vs_sgd.toml)."""
    if cfg["name"] == "beta_frontier":
        return run_frontier(args, cfg, out, timer)
    if cfg["name"] != "pib_vs_sgd":
        usage_error(f"--config: {args.config} is {cfg['name']!r}; this script runs pib_vs_sgd and "
                    "beta_frontier")
    prov = provenance(args.config)
    split = fixed_split(args.data, cfg["data"], smoke=args.smoke)
    (x_tr, y_tr), (x_te, y_te) = split["train"], split["test"]
    n = len(y_tr)
    seeds = cfg["seeds"][:3] if args.smoke else cfg["seeds"]
    arms = _arms(cfg, n)
    epochs = 3 if args.smoke else int(cfg["common"]["epochs"])
    bs = int(cfg["common"]["batch_size"])
    milestones = [int(m) for m in cfg["common"].get("milestones", [50, 80])]
    rows = []
    for seed in seeds:
        t0 = time.process_time()
        start, theta_0, pre = pretrained(cfg, split, seed, args.smoke)
        pre["pretrain_cpu_s"] = round(time.process_time() - t0, 2)
        for name, kw in arms.items():
            t0 = time.process_time()
            model = copy.deepcopy(start)
            extra: dict[str, Any] = {"milestones": milestones}
            if kw["mode"] == "langevin":
                extra = {"burn_in": min(kw["burn_in"], epochs - 1), "thin": 1 if args.smoke else kw["thin"]}
            res = train_pib(model, "cross_entropy", (x_tr, y_tr), beta=kw["beta"], mode=kw["mode"],
                            theta_0=theta_0, val_data=split["prior"], epochs=epochs, batch_size=bs, seed=seed,
                            iiw_batch_size=100 if args.smoke else 1000,
                            **({"noise_std": kw["noise_std"]} if kw["mode"] == "paper" else
                               {"gibbs_beta": kw["gibbs_beta"]}), **extra)
            ev = _evaluate(res, x_te, y_te)
            rows.append({"seed": seed, "arm": name, **ev, "iiw_end": res.history["iiw"][-1],
                         "iiw_estimator": "paper" if kw["mode"] == "paper" else "jvp",
                         "best_epoch": res.best_epoch, "epochs_run": len(res.history["epoch"]),
                         "stopped_early": res.stopped_early, "cpu_s": round(time.process_time() - t0, 2),
                         **pre})
            print(f"seed {seed} {name:>16}: test acc {ev['test_acc']:.4f}, NLL {ev['test_nll']:.4f}, ECE "
                  f"{ev['test_ece']:.4f}, epochs {len(res.history['epoch'])}, {rows[-1]['cpu_s']} s",
                  flush=True)
        # the seeds so far, in case the run is cut short (removed when the run completes)
        write_json(out / "pib_vs_sgd.partial.json", {"partial": True, "seeds_done": seed, "rows": rows,
                                                     **prov, "cpu_seconds": round(time.process_time(), 1)})
    ref = "sgd"
    acc = {a: [r["test_acc"] for r in rows if r["arm"] == a] for a in arms}
    comps = {a: paired_comparison(acc[a], acc[ref]) for a in arms if a != ref}
    t_holm = holm({a: c["t_p"] for a, c in comps.items()})
    w_holm = holm({a: c["wilcoxon_p"] for a, c in comps.items()})
    for a, c in comps.items():
        c.update(t_p_holm=t_holm[a], wilcoxon_p_holm=w_holm[a],
                 significant=bool(t_holm[a] < 0.05 and w_holm[a] < 0.05))
        print(f"{a:>16} - sgd: {100 * c['mean_diff']:+.2f} points, 95% CI [{100 * c['t_ci'][0]:+.2f}, "
              f"{100 * c['t_ci'][1]:+.2f}], t p (Holm) {t_holm[a]:.3g}, Wilcoxon p (Holm) {w_holm[a]:.3g}, "
              f"MDE {100 * c['mde']:.2f} points", flush=True)

    plt = pyplot()
    names = list(arms)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.8))
    for seed in seeds:
        ax.plot(range(len(names)), [next(r["test_acc"] for r in rows if r["seed"] == seed and r["arm"] == a)
                                    for a in names], "o-", lw=0.7, ms=3, alpha=0.7)
    ax.set_xticks(range(len(names)), [a.replace("_", "\n") for a in names], fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"pre-registered PIB vs SGD ({args.config}), one line per seed", fontsize=9)
    save_figure(fig, out / "pib_vs_sgd.png")
    write_csv(out / "pib_vs_sgd.csv", rows)
    ok = any(c["significant"] and c["mean_diff"] > 0 for a, c in comps.items() if a.startswith("pib"))
    (out / "pib_vs_sgd.partial.json").unlink(missing_ok=True)
    write_json(out / "pib_vs_sgd.json", {"claim": cfg["claim"], "seeds": seeds, "smoke": args.smoke,
                                         "epochs": epochs, "comparisons": comps, "rows": rows, "passed": ok,
                                         "seconds": timer(), **prov,
                                         "cpu_seconds": round(time.process_time(), 1)})
    print(f"CHECK (pre-registered) a PIB arm beats SGD in test accuracy (paired t and Wilcoxon, Holm, "
          f"alpha 0.05): {verdict(ok)}; {timer()} s; outputs in {out}")
    return 0


def run_frontier(args, cfg: dict, out, timer) -> int:
    """The pre-registered β frontier (examples/configs/beta_frontier.toml): per seed the pretrained net of
    pib_vs_sgd.toml's [common], then train_pib at every β of the sweep in both arms; per seed Spearman ρ of β
    with IIW, with the gap and with the test accuracy, and a sign test of ρ < 0 across seeds for each."""
    from _common import seeds_sign_test, spearman

    prov = provenance(args.config)
    common = load_config(str(Path(args.config).resolve().parent / "pib_vs_sgd.toml"))
    split = fixed_split(args.data, cfg["data"], smoke=args.smoke)
    (x_tr, y_tr), (x_te, y_te) = split["train"], split["test"]
    n = len(y_tr)
    seeds = cfg["seeds"][:2] if args.smoke else cfg["seeds"]
    betas = [float(b) for b in cfg["sweep"]["betas"]]
    rows, checks = [], {}
    starts = {}
    for seed in seeds:
        starts[seed] = pretrained({**common, "model": cfg["model"]}, split, seed, args.smoke)
    for arm_name, arm in cfg["arms"].items():
        epochs = 3 if args.smoke else int(arm["epochs"])
        rhos: dict[str, list[float]] = {"iiw": [], "gap": [], "test_acc": []}
        for seed in seeds:
            start, theta_0, _ = starts[seed]
            per = []
            for beta in betas:
                t0 = time.process_time()
                kw: dict[str, Any] = ({"milestones": [int(m) for m in arm["milestones"]]}
                                      if "milestones" in arm else {})
                if arm["mode"] == "langevin":
                    assert arm["gibbs_beta"] == "1/n", arm["gibbs_beta"]
                    kw.update({"gibbs_beta": 1.0 / n, "burn_in": min(int(arm["burn_in_epochs"]), epochs - 1),
                               "thin": 1 if args.smoke else int(arm["thin"])})
                res = train_pib(copy.deepcopy(start), "cross_entropy", (x_tr, y_tr), beta=beta,
                                mode=arm["mode"], theta_0=theta_0, val_data=split["prior"], epochs=epochs,
                                batch_size=int(common["common"]["batch_size"]), seed=seed,
                                iiw_batch_size=100 if args.smoke else 1000, **kw)
                ev = _evaluate(res, x_te, y_te)
                tr = _evaluate(res, x_tr, y_tr)["test_acc"]
                per.append({"arm": arm_name, "seed": seed, "beta": beta, **ev, "train_acc": tr,
                            "gap": tr - ev["test_acc"], "iiw": res.history["iiw"][-1],
                            "epochs_run": len(res.history["epoch"]),
                            "cpu_s": round(time.process_time() - t0, 2)})
            rows += per
            for key in rhos:
                rhos[key].append(spearman(betas, [r[key] for r in per]))
            print(f"{arm_name:>8} seed {seed}: rho(beta, IIW) {rhos['iiw'][-1]:+.2f}, gap "
                  f"{rhos['gap'][-1]:+.2f}, test acc {rhos['test_acc'][-1]:+.2f}", flush=True)
        for key in rhos:
            test = seeds_sign_test(rhos[key], "negative")
            passed = bool(test["k"] == test["n"] and test["p"] < 0.05)
            checks[f"{arm_name}/{key}"] = {**test, "passed": passed}

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key in zip(axes, ("test_acc", "gap", "iiw"), strict=True):
        for i, arm_name in enumerate(cfg["arms"]):
            rs = [r for r in rows if r["arm"] == arm_name]
            ax.scatter([r["beta"] + 1e-3 for r in rs], [r[key] for r in rs], s=8, color=f"C{i}", alpha=0.5)
            means = [_mean([r[key] for r in rs if r["beta"] == b]) for b in betas]
            ax.plot([b + 1e-3 for b in betas], means, "-", color=f"C{i}", label=arm_name)
        ax.set_xscale("log")
        ax.set_xlabel("beta (+0.001)")
        ax.set_title(key)
        ax.legend(fontsize=8)
    axes[2].set_yscale("log")
    fig.suptitle(f"pre-registered information-accuracy frontier ({args.config}); dots: seeds, lines: means")
    save_figure(fig, out / "beta_frontier.png")
    write_csv(out / "beta_frontier.csv", rows)
    ok = all(c["passed"] for c in checks.values())
    write_json(out / "beta_frontier.json", {"claim": cfg["claim"], "seeds": seeds, "smoke": args.smoke,
                                            "checks": checks, "rows": rows, "passed": ok, "seconds": timer(),
                                            **prov, "cpu_seconds": round(time.process_time(), 1)})
    n_ok = sum(c["passed"] for c in checks.values())
    print(f"CHECK (pre-registered) rho(beta, IIW), rho(beta, gap), rho(beta, test acc) < 0 in every seed, "
          f"sign test p < 0.05, per arm: {verdict(ok)} ({n_ok}/{len(checks)}); {timer()} s; outputs in {out}")
    return 0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


if __name__ == "__main__":
    sys.exit(main())
