"""The docs-build helpers that need no mkdocs: the built-site check (.ci/check_site.py), the
SPEC-link hook (docs/_hooks.py), and the pages' math delimiters. .ci/run builds the real site and
runs the check on it."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_site = _load(".ci/check_site.py")
hooks = _load("docs/_hooks.py")


def test_check_site_names_each_raw_role_and_bare_spec(tmp_path):
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "index.html").write_text(
        "<p>Returns a :class:<code>~pib_bayes.Posterior</code> (SPEC §2).</p>"
        "<p>see :meth:`.predict`</p><script>var s = ':func:`x`';</script>", encoding="utf-8")
    (tmp_path / "index.html").write_text(
        '<p>A <a href="api/#pib_bayes.posterior.Posterior"><code>Posterior</code></a>, '
        '<a href="math/#spec-2">the mathematics, §2</a>.</p>', encoding="utf-8")
    bad = check_site.check(tmp_path)
    assert len(bad) == 3, bad  # two roles and one SPEC on the api page; the script and index.html are clean
    assert all(line.startswith("api/index.html: ") for line in bad)
    assert sum("raw reST role" in line for line in bad) == 2
    assert check_site.main([str(tmp_path)]) == 1
    (tmp_path / "api" / "index.html").unlink()
    assert check_site.main([str(tmp_path)]) == 0


def test_hook_links_spec_in_prose_only():
    md = ("The energy (SPEC §1) and the oracle of SPEC §3c, SPEC §1-2.\n"
          "```python\n# SPEC §2 in code stays\n```\n"
          "`SPEC §4` stays\n## A heading with SPEC §5 stays\n")
    out = hooks.link_spec(md)
    assert "([the mathematics, §1][spec-1])" in out
    assert "[the mathematics, §3c][spec-3c]" in out
    assert "[the mathematics, §1-2][spec-1]" in out
    assert "# SPEC §2 in code stays" in out and "`SPEC §4` stays" in out
    assert "## A heading with SPEC §5 stays" in out


def test_hook_links_a_subsection_without_an_id_to_its_section():
    assert "spec-3c" in hooks.MATH_ANCHORS and "spec-2b" not in hooks.MATH_ANCHORS
    assert hooks.link_spec("SPEC §2b") == "[the mathematics, §2b][spec-2]"


def test_check_site_flags_math_left_untypeset():
    ok = ('<p>A <span class="arithmatex">\\(q^*(w)\\)</span> and</p>'
          '<div class="arithmatex">\\[U = L/\\beta\\]</div>'
          '<pre><code>echo $HOME \\(x\\)</code></pre><p><code>cost = $5</code></p>')
    assert check_site.problems(ok) == []
    # a $$ block in a list item without the item's indentation reaches the page as text, twice
    bad = check_site.problems('<li>around a centre: $$ \\nabla U_{cv}(w) = ... $$ It is unbiased</li>')
    assert len(bad) == 2 and all("math not typeset (a stray '$$')" in line for line in bad), bad
    # an unbalanced $ in prose, and math in a heading (the table of contents keeps only its text)
    assert len(check_site.problems("<p>costs $5 a run</p>")) == 1
    assert len(check_site.problems('<a class="md-nav__link">across \\(\\beta\\)</a>')) == 1


def test_check_site_flags_a_doctest_rendered_as_block_quotes():
    quoted = "<blockquote>\n<blockquote>\n<blockquote>\n<p>import torch prior = GaussianPrior(std=2.0)</p>"
    bad = check_site.problems(quoted + "</blockquote></blockquote></blockquote>")
    assert len(bad) == 1 and bad[0].startswith("doctest rendered as block quotes: import torch"), bad
    assert check_site.problems("<blockquote><p>a quoted remark</p></blockquote>") == []


PROSE_CODE = re.compile(r"^(```|~~~).*?^\1[^\n]*$|`[^`\n]+`", re.S | re.M)
DOLLAR = re.compile(r"(?<!\\)\$")


def unbalanced_dollars(markdown: str) -> list[str]:
    """The paragraphs of ``markdown`` (outside code) with an odd number of unescaped ``$``."""
    prose = PROSE_CODE.sub("", markdown)
    return [p.strip()[:120] for p in re.split(r"\n\s*\n", prose) if len(DOLLAR.findall(p)) % 2]


def test_unbalanced_dollars_finds_a_stray_dollar_only():
    text = "Inline $x$ and\n\n$$\na + b\n$$\n\nand `$HOME` and\n```bash\necho $A\n```\n"
    assert unbalanced_dollars(text) == []
    assert unbalanced_dollars("a $x$ b\n\nit costs $5 here\n") == ["it costs $5 here"]
    assert unbalanced_dollars(r"a price of \$5") == []


@pytest.mark.parametrize("page", sorted(p.relative_to(ROOT / "docs").as_posix()
                                        for p in (ROOT / "docs").rglob("*.md")))
def test_every_dollar_on_the_pages_is_balanced(page):
    assert unbalanced_dollars((ROOT / "docs" / page).read_text(encoding="utf-8")) == []
