"""Command line: ``pib-bayes demo`` (more subcommands build on the same parser)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_demo, run_demo

    result = run_demo(quick=args.quick, seed=args.seed, progress=not args.quiet and not args.json)
    print(json.dumps(result, indent=2) if args.json else format_demo(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pib-bayes", description="Sample PIB Gibbs posteriors of torch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sample a small MLP posterior on embedded data and compare predictors")
    demo.add_argument("--quick", action="store_true", help="tiny settings (seconds)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--json", action="store_true", help="machine-readable output")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
