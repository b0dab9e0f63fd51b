"""MkDocs hook: "SPEC §N" in a page's prose becomes a link to that section of the mathematics page.

The pages and docstrings refer to the mathematics as "SPEC §2", "SPEC §3a", ...; docs/math.md gives
its sections the ids ``spec-1`` ... ``spec-5`` (and ``spec-3a`` ... ``spec-3d``). Code (fenced blocks
and inline spans) and headings are left alone. The link is an autorefs reference, so it works from any
page and a section that does not exist fails the strict build. Docstrings get the same treatment
from docs/_griffe_ext.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# the section ids of docs/math.md ("## 2. ... { #spec-2 }"); a subsection without an id links to its section
MATH_ANCHORS = set(re.findall(r"\{ #(spec-[0-9a-z]+) \}",
                              (Path(__file__).parent / "math.md").read_text(encoding="utf-8")))
SPEC_RE = re.compile(r"SPEC\s*§\s*(\d)([a-d])?(?:\s*[-–]\s*(\d))?")
CODE_RE = re.compile(r"(^```.*?^```[^\n]*$|`[^`\n]+`)", re.S | re.M)


def spec_link(match: re.Match[str]) -> str:
    section, sub, upto = match.group(1), match.group(2) or "", match.group(3)
    label = f"§{section}{sub}" + (f"-{upto}" if upto else "")
    anchor = f"spec-{section}{sub}" if f"spec-{section}{sub}" in MATH_ANCHORS else f"spec-{section}"
    return f"[the mathematics, {label}][{anchor}]"  # an unknown section fails the strict build


def link_spec(markdown: str) -> str:
    """Rewrite the SPEC references of ``markdown`` outside code and headings."""
    parts = CODE_RE.split(markdown)
    for i in range(0, len(parts), 2):  # even parts are prose
        parts[i] = "\n".join(line if line.lstrip().startswith("#") else SPEC_RE.sub(spec_link, line)
                             for line in parts[i].split("\n"))
    return "".join(parts)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return link_spec(markdown)
