"""Fail when the built docs site shows a raw reST role or an unlinked "SPEC §" reference.

Usage: ``python .ci/check_site.py SITE_DIR`` after ``mkdocs build``. The docstrings are written with reST
roles (``:class:`~pib_bayes.Posterior```) that docs/_griffe_ext.py turns into cross-references; a role
that reaches the HTML as text means that conversion missed it. Exit status 1 names each page and the
offending text.
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj):(?=`|<code>)")
SPEC = re.compile(r"SPEC\s*§")
SCRIPT = re.compile(r"<(script|style)\b.*?</\1>", re.S | re.I)


def problems(page: str) -> list[str]:
    """The raw roles and bare SPEC references in one page's HTML (scripts and styles ignored)."""
    text = SCRIPT.sub("", page)
    found = []
    for pattern, what in ((ROLE, "raw reST role"), (SPEC, "bare SPEC reference")):
        for m in pattern.finditer(text):
            context = html.unescape(re.sub(r"<[^>]+>", "", text[max(0, m.start() - 60): m.end() + 60]))
            found.append(f"{what}: ...{' '.join(context.split())}...")
    return found


def check(site: Path) -> list[str]:
    """``page: problem`` for every HTML page under ``site``."""
    return [f"{p.relative_to(site)}: {msg}" for p in sorted(site.rglob("*.html"))
            for msg in problems(p.read_text(encoding="utf-8"))]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python .ci/check_site.py SITE_DIR", file=sys.stderr)
        return 2
    site = Path(argv[0])
    if not any(site.rglob("*.html")):
        print(f"check_site: no HTML page under {site}", file=sys.stderr)
        return 1
    bad = check(site)
    for line in bad:
        print(f"check_site: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
