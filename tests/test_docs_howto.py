"""Every ```python block of each docs/howto/*.md page runs, top to bottom, in one namespace per page.

A block is skipped only when the line just before its fence is ``<!-- no-run -->``. Pages run in a
temporary working directory with one torch thread."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

HOWTO = Path(__file__).resolve().parents[1] / "docs" / "howto"
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
PAGES = sorted(HOWTO.glob("*.md"))


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a page, in order, without those marked ``<!-- no-run -->``."""
    blocks = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        if before != "<!-- no-run -->":
            blocks.append(m.group(1))
    return blocks


def test_the_howto_pages_exist():
    names = {p.name for p in PAGES}
    assert {"cnn.md", "lstm.md", "iiw_tracking.md"} <= names, names


def test_blocks_are_found_and_no_run_skips_one():
    text = "a\n```python\nx = 1\n```\n<!-- no-run -->\n```python\nraise SystemExit\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == ["x = 1\n"]


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_howto_page_runs(page, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    assert blocks, f"{page.name} has no ```python block"
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    namespace: dict = {"__name__": f"howto_{page.stem}"}
    try:
        for i, block in enumerate(blocks):
            code = compile(block, f"{page.name} block {i + 1}", "exec")
            exec(code, namespace)  # noqa: S102 - the docs' own examples
    finally:
        torch.set_num_threads(before)
