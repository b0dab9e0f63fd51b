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
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Timer,
    base_parser,
    load_split,
    mlp,
    pyplot,
    save_figure,
    setup,
    verdict,
    write_csv,
    write_json,
)

from pib_bayes import GaussianPrior, sample  # noqa: E402


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
    args = p.parse_args(argv)
    out = setup(args, "pib_sgld_vs_sgd")
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


if __name__ == "__main__":
    sys.exit(main())
