r"""Fail when the built site shows a raw reST role, an unlinked "SPEC §" reference or untypeset math.

Usage: ``python .ci/check_site.py SITE_DIR`` after ``mkdocs build``. The docstrings are written with reST
roles (``:class:`~pib_bayes.Posterior```) that docs/_griffe_ext.py turns into cross-references; a role
that reaches the HTML as text means that conversion missed it. Math is written ``$...$`` / ``$$...$$``
and pymdownx.arithmatex wraps it in ``arithmatex`` elements for KaTeX; a ``$`` (or a ``\(``, ``\[``)
left in the prose outside those elements and outside code is math that was not recognised, e.g. a
``$$`` block inside a list item without the list's indentation, or an unbalanced ``$``. Nested block
quotes are a doctest written outside an ``Examples:`` section that the docs extension did not fence.
Exit status 1 names each page and the offending text.
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj):(?=`|<code>)")
SPEC = re.compile(r"SPEC\s*§")
SCRIPT = re.compile(r"<(script|style)\b.*?</\1>", re.S | re.I)
# what may hold a "$" or "\(" legitimately: code, and the math arithmatex recognised (never nested)
CODE_OR_MATH = re.compile(r"<(pre|code)\b.*?</\1>|<(span|div)\b[^>]*\bclass=\"arithmatex\"[^>]*>.*?</\2>",
                          re.S | re.I)
LOOSE_MATH = re.compile(r"\$\$?|\\\(|\\\[")
# a doctest (">>> ...") that Markdown read as text: three nested block quotes, the code run together
QUOTED_DOCTEST = re.compile(r"<blockquote>\s*<blockquote>", re.I)
TAG = re.compile(r"<[^>]+>")


def problems(page: str) -> list[str]:
    """The raw roles, bare SPEC references and untypeset math of one page's HTML (not in scripts, styles)."""
    text = SCRIPT.sub("", page)
    found = []
    for pattern, what in ((ROLE, "raw reST role"), (SPEC, "bare SPEC reference")):
        for m in pattern.finditer(text):
            context = html.unescape(TAG.sub("", text[max(0, m.start() - 60): m.end() + 60]))
            found.append(f"{what}: ...{' '.join(context.split())}...")
    for m in QUOTED_DOCTEST.finditer(text):
        context = html.unescape(TAG.sub(" ", text[m.end(): m.end() + 300]))
        found.append(f"doctest rendered as block quotes: {' '.join(context.split())[:80]}...")
    prose = html.unescape(TAG.sub("", CODE_OR_MATH.sub(" ", text)))
    for m in LOOSE_MATH.finditer(prose):
        context = prose[max(0, m.start() - 60): m.end() + 60]
        found.append(f"math not typeset (a stray '{m.group()}'): ...{' '.join(context.split())}...")
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
