"""Render the pre-registered reproductions' result files (docs/figures/prereg/*.json) as the markdown tables
of docs/reproductions.md, between the markers ``<!-- BEGIN prereg:NAME -->`` and ``<!-- END prereg:NAME -->``.

    python examples/reproduction_tables.py            # rewrite the tables in docs/reproductions.md
    python examples/reproduction_tables.py --check    # exit 1 if the page differs from the result files
    python examples/reproduction_tables.py --print    # print the tables

A design without a result file gets "not run" and its runtime estimate (from its config's ``amended`` line or
the estimate below). Verdicts follow the pre-registered rules: a sign-test claim "holds" when every seed is on
the predicted side and p < 0.05, "does not hold" when no seed is, else "inconclusive"; a PIB arm "holds" when
its paired t-test and Wilcoxon test are both significant after Holm with a positive mean difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "figures" / "prereg"
PAGE = ROOT / "docs" / "reproductions.md"
NAMES = [
    "iiw_activations",
    "iiw_depth",
    "iiw_label_noise",
    "iiw_generalization",
    "pib_vs_sgd",
    "beta_frontier",
]
# CPU-minute estimates (one seed timed at full size, --threads 1) for designs that may not have run
ESTIMATES: dict[str, str] = {
    "beta_frontier": "about 111 CPU-minutes as registered (100 epochs) and about 22 at 20 epochs: 6 betas x "
    "2 arms x 6 seeds at 0.65 (paper mode) and 0.7-1.3 (Langevin, without / with the IIW penalty) CPU s per "
    "epoch, timed on one pib_vs_sgd seed at full size; the paper-mode arms may stop earlier (patience 10)"
}


def _f(v: float, d: int = 3) -> str:
    return f"{v:.{d}f}"


def _p(v: float) -> str:
    return f"{v:.3g}"


def sign_verdict(c: dict) -> str:
    """The pre-registered verdict of a sign test over seeds (``k`` of ``n`` on the predicted side)."""
    if c["k"] == c["n"] and c["p"] < 0.05:
        return "**holds**"
    if c["k"] == 0:
        return "**does not hold**"
    return f"inconclusive ({c['k']}/{c['n']}; the sign test needs {c['n']}/{c['n']})"


def _runtime(r: dict) -> str:
    commit = (r.get("git_commit") or "?")[:7]
    wall = f"{r['seconds'] / 60:.1f} min wall, " if r["seconds"] == r["seconds"] else ""
    return (
        f"Runtime: **{r['cpu_seconds'] / 60:.1f} CPU-minutes** ({wall}one thread), commit `{commit}`, "
        f"config SHA-256 `{(r.get('config_sha256') or '?')[:12]}`."
    )


def _rng(vals: list[float], d: int = 2) -> str:
    return f"{statistics.mean(vals):.{d}f} [{min(vals):.{d}f}, {max(vals):.{d}f}]"


def activations(r: dict) -> str:
    rows = []
    for key, c in r["checks"].items():
        arm, act = key.split("/")
        s = c["seeds"]
        first = sum(x["peak_epoch"] == 0 for x in s)
        rows.append(
            [
                arm,
                act,
                f"{c['passed_seeds']}/{len(s)}",
                _p(c["sign_test_p"]),
                _rng([x["peak_epoch"] for x in s], 1),
                f"{first}/{len(s)}",
                _rng([x["relative_fall"] for x in s]),
                _rng([x["train_acc_at_peak"] for x in s]),
                _rng([x["final_test_acc"] for x in s], 3),
                sign_verdict({"k": c["passed_seeds"], "n": len(s), "p": c["sign_test_p"]}),
            ]
        )
    head = [
        "arm",
        "activation",
        "seeds with peak + fall >= 10%",
        "sign test p",
        "peak epoch, mean [min, max]",
        "peak at epoch 0",
        "relative fall",
        "train acc at the peak",
        "final test acc",
        "pre-registered verdict",
    ]
    return markdown_table(head, rows) + "\n\n" + _runtime(r)


def depth(r: dict) -> str:
    rows = []
    for arm, c in r["checks"].items():
        rows.append(
            [
                arm,
                ", ".join(f"{v:+.2f}" for v in c["values"]),
                f"{c['k']}/{c['n']}",
                _p(c["p"]),
                sign_verdict(c),
            ]
        )
    t1 = markdown_table(
        [
            "arm",
            "per-seed rho(weight matrices, peak step)",
            "rho < 0",
            "sign test p",
            "pre-registered verdict",
        ],
        rows,
    )
    rows2 = []
    for arm in r["checks"]:
        for n_mat in sorted({x["weight_matrices"] for x in r["per_seed"]}):
            s = [x for x in r["per_seed"] if x["arm"] == arm and x["weight_matrices"] == n_mat]
            last = sum(not x["interior"] for x in s)
            rows2.append(
                [
                    arm,
                    n_mat,
                    f"{s[0]['lr']:g} / {s[0]['epochs']}",
                    _rng([x["peak_step"] for x in s], 0),
                    f"{last}/{len(s)}",
                    _rng([x["train_acc_at_peak"] for x in s]),
                    _rng([x["final_train_acc"] for x in s]),
                ]
            )
    t2 = markdown_table(
        [
            "arm",
            "weight matrices",
            "lr / epochs",
            "peak step, mean [min, max]",
            "peak at the last record",
            "train acc at the peak",
            "final train acc",
        ],
        rows2,
    )
    return t1 + "\n\n" + t2 + "\n\n" + _runtime(r)


def _sweep_table(r: dict, sweeps: list[str], extra: str | None = None) -> str:
    rows = []
    for key, c in r["checks"].items():
        row = [*key.split("/"), ", ".join(f"{v:+.2f}" for v in c["values"]), f"{c['k']}/{c['n']}", _p(c["p"])]
        if extra:
            row.append(f"{c[extra]}/{c['n']}")
        rows.append([*row, sign_verdict(c)])
    head = ["arm", "sweep", "per-seed Spearman rho", "seeds as predicted", "sign test p"]
    if extra:
        head.append("minima coincide")
    t1 = markdown_table([*head, "pre-registered verdict"], rows)
    rows2 = []
    for arm in dict.fromkeys(x["arm"] for x in r["rows"]):
        for sweep in sweeps:
            vals = list(dict.fromkeys(x["value"] for x in r["rows"] if x["sweep"] == sweep))
            for v in vals:
                s = [x for x in r["rows"] if x["arm"] == arm and x["sweep"] == sweep and x["value"] == v]
                rows2.append(
                    [
                        arm,
                        sweep,
                        f"{v:g}",
                        f"{statistics.mean(x['iiw'] for x in s):.3g}",
                        _rng([x["train_acc"] for x in s], 3),
                        _rng([x["test_acc"] for x in s], 3),
                        _rng([x["gap"] for x in s], 3),
                    ]
                )
    t2 = markdown_table(
        ["arm", "sweep", "value", "IIW (mean over seeds)", "train acc", "test acc", "gap"], rows2
    )
    return t1 + "\n\n" + t2 + "\n\n" + _runtime(r)


def label_noise(r: dict) -> str:
    return _sweep_table(r, ["noise_ratio", "sample_size"])


def generalization(r: dict) -> str:
    return _sweep_table(r, ["batch_size", "width"], extra="minima_coincide")


def pib_vs_sgd(r: dict) -> str:
    arms = list(dict.fromkeys(x["arm"] for x in r["rows"]))
    rows = []
    for a in arms:
        s = [x for x in r["rows"] if x["arm"] == a]
        acc = [x["test_acc"] for x in s]
        row = [
            a,
            f"{statistics.mean(acc):.4f} ± {statistics.stdev(acc):.4f}",
            _f(statistics.mean(x["test_nll"] for x in s), 4),
            _f(statistics.mean(x["test_ece"] for x in s), 4),
            f"{statistics.mean(x['epochs_run'] for x in s):.1f}",
            f"{statistics.mean(x['cpu_s'] for x in s):.1f}",
        ]
        c = r["comparisons"].get(a)
        if c is None:
            rows.append([*row, "(reference)", "", "", "", "", ""])
            continue
        if c["significant"]:
            verdict = "**holds**" if c["mean_diff"] > 0 else "**does not hold** (worse than SGD)"
        else:
            verdict = f"inconclusive (MDE {100 * c['mde']:.2f} points)"
        rows.append(
            [
                *row,
                f"{100 * c['mean_diff']:+.2f} [{100 * c['t_ci'][0]:+.2f}, {100 * c['t_ci'][1]:+.2f}]",
                f"{100 * c['hodges_lehmann']:+.2f} [{100 * c['wilcoxon_ci'][0]:+.2f}, "
                f"{100 * c['wilcoxon_ci'][1]:+.2f}]",
                _p(c["t_p_holm"]),
                _p(c["wilcoxon_p_holm"]),
                f"{100 * c['mde']:.2f}",
                verdict,
            ]
        )
    head = [
        "arm",
        "test acc (mean ± sd)",
        "NLL",
        "ECE",
        "epochs run",
        "CPU s per run",
        "minus SGD, points: mean [95% t CI]",
        "Hodges-Lehmann [95% CI]",
        "t p (Holm)",
        "Wilcoxon p (Holm)",
        "MDE, points",
        "pre-registered verdict",
    ]
    return markdown_table(head, rows) + "\n\n" + _runtime(r)


def _fmt_rho(v: float) -> str:
    return "undefined" if v != v else f"{v:+.2f}"


def beta_frontier(r: dict) -> str:
    """Per arm and statistic the per-seed rho(beta, .) with its sign test, then per arm and beta the
    values over seeds; a non-finite IIW (the run's last epoch diverged) is counted and shown as such."""
    rows1 = []
    for key, c in r["checks"].items():
        arm, stat = key.split("/")
        rows1.append([arm, stat, ", ".join(_fmt_rho(v) for v in c["values"]),
                      f"{c['k']}/{c['n']}", str(c.get("undefined_or_tied", 0)), _p(c["p"]), sign_verdict(c)])
    t1 = markdown_table(["arm", "rho(beta, .)", "per-seed Spearman rho", "rho < 0", "undefined or tied",
                         "sign test p", "pre-registered verdict"], rows1)
    rows2 = []
    arms = list(dict.fromkeys(x["arm"] for x in r["rows"]))
    betas = list(dict.fromkeys(x["beta"] for x in r["rows"]))
    for arm in arms:
        for b in betas:
            s = [x for x in r["rows"] if x["arm"] == arm and x["beta"] == b]
            finite = [x["iiw"] for x in s if x["iiw"] == x["iiw"] and abs(x["iiw"]) < 1e6]
            bad = len(s) - len(finite)
            iiw = (f"{statistics.mean(finite):.4g}" if finite else "-") + (f" ({bad}/{len(s)} diverged)"
                                                                           if bad else "")
            epochs = statistics.mean(x["epochs_run"] for x in s)
            rows2.append([arm, f"{b:g}", iiw, _rng([x["test_acc"] for x in s], 4),
                          _rng([x["gap"] for x in s], 4), f"{epochs:.1f}"])
    iiw_head = "IIW at the last epoch (mean over the seeds where it stayed finite and below 1e6)"
    t2 = markdown_table(["arm", "beta", iiw_head, "test acc", "gap", "epochs run"], rows2)
    return t1 + "\n\n" + t2 + "\n\n" + _runtime(r)


RENDER = {
    "iiw_activations": activations,
    "iiw_depth": depth,
    "iiw_label_noise": label_noise,
    "iiw_generalization": generalization,
    "pib_vs_sgd": pib_vs_sgd,
    "beta_frontier": beta_frontier,
}


def _partial_pib_vs_sgd(r: dict) -> str:
    """The seeds a cut-short pib_vs_sgd run finished: the same statistics, flagged as short of the design."""
    from _common import holm, paired_comparison

    arms = list(dict.fromkeys(x["arm"] for x in r["rows"]))
    seeds = sorted({x["seed"] for x in r["rows"] if x["arm"] == arms[-1]})  # seeds with every arm done
    r = {**r, "rows": [x for x in r["rows"] if x["seed"] in seeds]}
    acc = {a: [x["test_acc"] for x in r["rows"] if x["arm"] == a] for a in arms}
    comps = {a: paired_comparison(acc[a], acc["sgd"]) for a in arms if a != "sgd"}
    th = holm({a: c["t_p"] for a, c in comps.items()})
    wh = holm({a: c["wilcoxon_p"] for a, c in comps.items()})
    for a, c in comps.items():
        c.update(t_p_holm=th[a], wilcoxon_p_holm=wh[a], significant=bool(th[a] < 0.05 and wh[a] < 0.05))
    r["comparisons"] = comps
    r.setdefault("seconds", float("nan"))
    note = (f"**Partial run: {len(seeds)} of the 10 registered paired seeds finished** (seeds {seeds}); the "
            "run was cut short by the session's time limit, so the verdicts below are not those of the "
            "registered design.\n\n")
    return note + pib_vs_sgd(r)


def render(name: str) -> str:
    path = RESULTS / f"{name}.json"
    partial = RESULTS / f"{name}.partial.json"
    if name == "pib_vs_sgd" and not path.is_file() and partial.is_file():
        return _partial_pib_vs_sgd(json.loads(partial.read_text()))
    if not path.is_file() or name not in RENDER:
        return f"**Not run** in this session: estimated {ESTIMATES.get(name, 'see its config')}."
    r = json.loads(path.read_text())
    if r.get("smoke"):
        raise SystemExit(f"error: {path} is a --smoke result; run the full design")
    return RENDER[name](r)


def rewrite(text: str) -> str:
    for name in NAMES:
        begin, end = f"<!-- BEGIN prereg:{name} -->", f"<!-- END prereg:{name} -->"
        if begin not in text:
            continue
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{render(name)}\n{end}{tail}"
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/reproductions.md is out of date")
    p.add_argument("--print", action="store_true", help="print every table")
    args = p.parse_args(argv)
    if args.print:
        for name in NAMES:
            print(f"## {name}\n\n{render(name)}\n")
        return 0
    old = PAGE.read_text()
    new = rewrite(old)
    if args.check:
        if new != old:
            print("docs/reproductions.md differs from the result files: run examples/reproduction_tables.py")
            return 1
        return 0
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
