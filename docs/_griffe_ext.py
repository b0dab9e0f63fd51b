"""Griffe extension for the docs build: turns the docstrings' reST conventions into mkdocstrings Markdown.

The library's docstrings are written for ``help()`` and doctests: cross-references as reST roles
(``:class:`~pib_bayes.Posterior```), "SPEC §2" for the mathematics page, and Google-style ``Args:``
lines that may list several names at once (``num_chains, num_warmup, num_draws, thin: chain layout.``).
This extension rewrites them after the package is loaded and before mkdocstrings parses and renders
them; the source keeps its plain-text form.

* ``:role:`target``` (class, func, meth, attr, mod, data, exc, obj, optionally ``py:``-prefixed)
  becomes an *optional* autorefs cross-reference to the target's canonical path: a link when the
  target is rendered somewhere in the site, plain code when it is not (an external object, or one
  the API page leaves out), so a link can never break the strict build. ``~a.b.C`` shows ``C``;
  ``.foo`` and bare names are looked up in the enclosing class, then module, then the package, then
  (if unique) by name anywhere in the package.
* ``SPEC §N`` (also ``§3a``, ``§1-2``) becomes a link to the matching heading of ``docs/math.md``
  (headings carry the ids ``spec-1``, ``spec-3a``, ...); an id that does not exist fails the build.
* A mention of a docs page by its path (``docs/performance.md``, outside code) becomes an autorefs
  link to that page's title heading, shown as the title; a page without a title fails the build.
* An ``Args:`` entry naming several parameters is split into one entry per name, so that each
  parameter's default is found (otherwise the table says "required").
* A few displayed equations (exact code spans listed in ``EQUATIONS``) become typeset math; other
  code spans stay code.
* A doctest written in the body of a docstring (``>>>`` lines at the left margin, outside an
  ``Examples:`` section) becomes a fenced ``pycon`` block; as plain Markdown its ``>>>`` would
  render as three nested block quotes with the code run together. Any other line that starts with
  ``>`` (a wrapped ``>= 1 - delta``) gets the ``>`` escaped, so it is not a block quote either.

Loaded by mkdocs.yml through the mkdocstrings Python handler's ``extensions`` option.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

ROLE_RE = re.compile(r":(?:py:)?(class|func|meth|attr|mod|data|exc|obj):`([^`]+)`")
# the section ids of docs/math.md ("## 2. ... { #spec-2 }"); a subsection without an id links to its section
MATH_ANCHORS = set(re.findall(r"\{ #(spec-[0-9a-z]+) \}",
                              (Path(__file__).parent / "math.md").read_text(encoding="utf-8")))
SPEC_RE = re.compile(r"SPEC\s*§\s*(\d)([a-d])?(?:\s*[-–]\s*(\d))?")
# "docs/performance.md" in prose (not in a code span) -> a link to the page's "# Title" heading
DOCS_PAGE_RE = re.compile(r"(?<![\w/`])docs/([a-z_]+(?:/[a-z_]+)?)\.md(?![\w`])")
ARGS_HEADER_RE = re.compile(
    r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Keyword Arguments|Other Parameters):\s*$")
MULTI_ARG_RE = re.compile(r"^(\s+)([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)+)\s*:\s+(.*)$")

# Code spans that are displayed equations, as written in the docstrings -> LaTeX (inline math).
EQUATIONS = {
    "q*(w|S) ∝ p(w) exp(-L_S(w)/beta)": r"q^*(w\mid S) \propto p(w)\, e^{-L_S(w)/\beta}",
    "U_B(w) = mean_{i in B} l_i(w)/beta - log p(w)": (
        r"U_B(w) = \frac{1}{|B|}\sum_{i\in B} \ell_i(w)/\beta - \log p(w)"
    ),
    "w <- w - h_t grad U_B(w) + sqrt(2 h_t) xi": r"w \leftarrow w - h_t \nabla U_B(w) + \sqrt{2h_t}\,\xi",
    "KL(q||p)": r"\mathrm{KL}(q \Vert p)",
    "Δθᵀ F Δθ": r"\Delta\theta^\top F \Delta\theta",
    "Δθ = θ_S − θ₀": r"\Delta\theta = \theta_S - \theta_0",
    "½ Δθᵀ F Δθ / β": r"\tfrac12 \Delta\theta^\top F \Delta\theta / \beta",
    "F = (1/n) Σ_i ∇l_i ∇l_iᵀ": r"F = \frac1n \sum_i \nabla \ell_i \nabla \ell_i^\top",
    "IIW_g(t) = Δθ_g(t)ᵀ F_g(t) Δθ_g(t)": (
        r"\mathrm{IIW}_g(t) = \Delta\theta_g(t)^\top F_g(t)\, \Delta\theta_g(t)"
    ),
    "∇_W l_iᵀ ΔW = ⟨∂l_i/∂z_i, ΔW a_i⟩": (
        r"\nabla_W \ell_i^\top \Delta W = \langle \partial \ell_i/\partial z_i, \Delta W a_i \rangle"
    ),
    "(1/K) Σ_k (ḡ_kᵀ Δθ)²": r"\frac1K \sum_k (\bar g_k^\top \Delta\theta)^2",
    "I(w;S) <= E_S KL(Q_S || P)": r"I(w;S) \le \mathbb{E}_S\, \mathrm{KL}(Q_S \Vert P)",
    "E[L(w)] <= E[L_S(w)] + sqrt(2 sigma^2 I(w; S) / n)": (
        r"\mathbb{E}[L(w)] \le \mathbb{E}[L_S(w)] + \sqrt{2\sigma^2 I(w;S)/n}"
    ),
    "L(Q) <= L_S(Q) + (b - a) sqrt((KL(Q||P) + log(2 sqrt(n)/delta)) / (2n))": (
        r"L(Q) \le L_S(Q) + (b-a)\sqrt{\frac{\mathrm{KL}(Q\Vert P) + \log(2\sqrt{n}/\delta)}{2n}}"
    ),
    "L(Q) <= kl^{-1}(L_S(Q), (KL(Q||P) + log(2 sqrt(n)/delta)) / n)": (
        r"L(Q) \le \mathrm{kl}^{-1}\!\left(L_S(Q), "
        r"\frac{\mathrm{KL}(Q\Vert P) + \log(2\sqrt{n}/\delta)}{n}\right)"
    ),
    "L(Q) <= (1 - exp(-C L_S(Q) - (KL(Q||P) + log(k/delta)) / n)) / (1 - exp(-C))": (
        r"L(Q) \le \frac{1 - \exp\left(-C L_S(Q) - (\mathrm{KL}(Q\Vert P) + \log(k/\delta))/n\right)}"
        r"{1 - e^{-C}}"
    ),
    # the samplers' update rules, step-size rules and stationary variances, the losses, the prior,
    # the bounds' forms and the IIW estimators as their docstrings write them
    "h = 2 eps / ((1 + eps) lambda_max)": r"h = \frac{2\varepsilon}{(1 + \varepsilon)\, \lambda_{\max}}",
    "h = min(eps / A, sqrt(2 eps / lambda_max))": (
        r"h = \min\left(\varepsilon / A,\ \sqrt{2\varepsilon / \lambda_{\max}}\right)"),
    "eta lambda_max = 2 (2 - alpha) eps / (1 + eps)": (
        r"\eta\, \lambda_{\max} = 2 (2 - \alpha)\, \varepsilon / (1 + \varepsilon)"),
    "(1/lambda) / (1 - h lambda / 2)": r"(1/\lambda) / (1 - h\lambda/2)",
    "(1/lambda) / (1 - eta lambda / (2 (2 - alpha)))": (
        r"(1/\lambda) \big/ \left(1 - \frac{\eta\lambda}{2(2 - \alpha)}\right)"),
    "Sigma = A Sigma A^T + 2h I + h^2 C": r"\Sigma = A \Sigma A^\top + 2h I + h^2 C",
    "(Sigma_1)_jj = h C_jj / (2 lambda_j)": r"(\Sigma_1)_{jj} = h C_{jj} / (2 \lambda_j)",
    "P^{-1} (I - h P/2)^{-1}": r"P^{-1} (I - h P/2)^{-1}",
    "h_t = a (b + t)^(-gamma)": r"h_t = a (b + t)^{-\gamma}",
    "v <- (1 - alpha) v - eta g + sqrt(2 alpha eta) xi; w <- w + v": (
        r"v \leftarrow (1 - \alpha) v - \eta g + \sqrt{2 \alpha \eta}\, \xi, \quad w \leftarrow w + v"),
    "grad U_B(w) = (1/beta) mean_{i in B} grad l_i(w) - grad log p(w)": (
        r"\nabla U_B(w) = \frac{1}{\beta} \frac{1}{|B|} \sum_{i \in B} \nabla \ell_i(w) - \nabla \log p(w)"),
    "U_B(w) = mean_{i in B} l_i(w) / beta - log p(w)": (
        r"U_B(w) = \frac{1}{|B|}\sum_{i\in B} \ell_i(w)/\beta - \log p(w)"),
    "U_B(w) = mean_B l_i(w)/beta - log p(w)": (
        r"U_B(w) = \frac{1}{|B|}\sum_{i\in B} \ell_i(w)/\beta - \log p(w)"),
    "U_B(w) = mean_B l / beta - log p(w)": r"U_B(w) = \frac{1}{|B|}\sum_{i\in B} \ell_i(w)/\beta - \log p(w)",
    "l = -sum_k q_k log softmax(f(x))_k": r"\ell = -\sum_k q_k \log \mathrm{softmax}(f(x))_k",
    "l = ||y - f(x)||^2 / (2 s^2)": r"\ell = \lVert y - f(x) \rVert^2 / (2 s^2)",
    "l = sum_j (y_j - mu_j)^2 / (2 sigma_j^2) + log sigma_j": (
        r"\ell = \sum_j \frac{(y_j - \mu_j)^2}{2 \sigma_j^2} + \log \sigma_j"),
    "l = -[y log sigmoid(f) + (1 - y) log(1 - sigmoid(f))]": (
        r"\ell = -\left[y \log \sigma(f) + (1 - y) \log(1 - \sigma(f))\right]"),
    "log p(w) = sum_j [ -(w_j - theta_0j)^2 / (2 sigma_0j^2) - log sigma_0j - log(2 pi)/2 ]": (
        r"\log p(w) = \sum_j \left[ -\frac{(w_j - \theta_{0j})^2}{2 \sigma_{0j}^2} - \log \sigma_{0j}"
        r" - \tfrac12 \log(2\pi) \right]"),
    "dw = p dt, dp = -grad U dt - gamma p dt + sqrt(2 gamma) dW": (
        r"dw = p\, dt, \quad dp = -\nabla U\, dt - \gamma p\, dt + \sqrt{2\gamma}\, dW"),
    "θ <- θ − h ∇U_B + √(2h) ξ": r"\theta \leftarrow \theta - h \nabla U_B + \sqrt{2h}\, \xi",
    "kl^{-1}(q, c) = sup{p in [q, 1] : kl(q || p) <= c}": (
        r"\mathrm{kl}^{-1}(q, c) = \sup\{p \in [q, 1] : \mathrm{kl}(q \Vert p) \le c\}"),
    "L(Q) <= L_S(Q) + sqrt((KL + log(2 sqrt(n)/delta)) / (2n))": (
        r"L(Q) \le L_S(Q) + \sqrt{\frac{\mathrm{KL} + \log(2\sqrt{n}/\delta)}{2n}}"),
    "L(Q) <= kl^{-1}(L_S(Q), (KL + log(2 sqrt(n)/delta)) / n)": (
        r"L(Q) \le \mathrm{kl}^{-1}\!\left(L_S(Q), \frac{\mathrm{KL} + \log(2\sqrt{n}/\delta)}{n}\right)"),
    "L(Q) <= (1 - exp(-C L_S(Q) - (KL + log(1/delta)) / n)) / (1 - exp(-C))": (
        r"L(Q) \le \frac{1 - \exp\left(-C L_S(Q) - (\mathrm{KL} + \log(1/\delta))/n\right)}{1 - e^{-C}}"),
    "kl(L_S(Q) || L(Q)) <= (KL + log(2 sqrt(n)/delta)) / n": (
        r"\mathrm{kl}(L_S(Q) \Vert L(Q)) \le \frac{\mathrm{KL} + \log(2\sqrt{n}/\delta)}{n}"),
    "IIW_g = (1/K) Σ_k (ḡ_{k,g}ᵀ Δθ_g)²": (
        r"\mathrm{IIW}_g = \frac1K \sum_k (\bar g_{k,g}^\top \Delta\theta_g)^2"),
    "q(x) ∝ p(x) p(y|x)^(1/T)": r"q(x) \propto p(x)\, p(y \mid x)^{1/T}",
    "1/T = 1/(n beta)": r"1/T = 1/(n\beta)",
    "−H(q) − E_q[log p(w)]": r"-H(q) - \mathbb{E}_q[\log p(w)]",
    "u^T C u = Var_i(u . grad l_i) / (|B| beta^2)": (
        r"u^\top C u = \mathrm{Var}_i(u \cdot \nabla \ell_i) / (|B| \beta^2)"),
    "N(theta_0, diag(sigma_0^2))": r"\mathcal{N}(\theta_0, \mathrm{diag}(\sigma_0^2))",
    "N(θ₀, diag(σ₀²))": r"\mathcal{N}(\theta_0, \mathrm{diag}(\sigma_0^2))",
    "β Σ_l ((w_l − w0_l)·g_l)²": r"\beta \sum_l \big((w_l - w_{0,l}) \cdot g_l\big)^2",
    "U_B = L_B/β' − log p(θ) + β·IIW_B": r"U_B = L_B/\beta' - \log p(\theta) + \beta\, \mathrm{IIW}_B",
}


def _objects(obj: griffe.Object) -> list[griffe.Object]:
    """Every non-alias object under ``obj`` (itself included)."""
    found = [obj]
    for member in obj.members.values():
        if member.is_alias:
            continue
        found.extend(_objects(member))  # type: ignore[arg-type]
    return found


class ReSTRoles(griffe.Extension):
    """Rewrite reST roles, SPEC references, multi-name Args entries and listed equations."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self.pkg = pkg
        self.collection = loader.modules_collection
        objects = _objects(pkg)
        self.by_name: dict[str, list[str]] = {}
        for obj in objects:
            self.by_name.setdefault(obj.name, []).append(obj.path)
        for obj in objects:
            if obj.docstring is not None:
                obj.docstring.value = self.rewrite(obj.docstring.value, obj)

    # -- cross-references -------------------------------------------------------------------------
    def _canonical(self, path: str, kind: str) -> str | None:
        try:
            found = self.collection[path]
            if found.is_alias:
                found = found.final_target
            # a function living in a module of the same name (pib_bayes.iiw.fisher): the function
            if kind in ("func", "class") and found.is_module and found.name in found.members:
                member = found.members[found.name]
                found = member.final_target if member.is_alias else member
            return found.path
        except Exception:  # noqa: BLE001 - not found / alias that does not resolve: no link
            return None

    def resolve(self, target: str, obj: griffe.Object, kind: str = "obj") -> str | None:
        """The canonical path a role's target names, seen from ``obj``; None if not in the package.

        A docstring never links to itself: inside ``IIWTracker.peak``, ``:func:`peak``` is the
        module-level function, not the method being documented."""
        relative = target.startswith(".")
        name = target.lstrip(".")
        scope: griffe.Object | None = obj
        while scope is not None:  # enclosing scopes, innermost first
            found = self._canonical(f"{scope.path}.{name}", kind)
            if found and found != obj.path:
                return found
            scope = scope.parent
        if not relative:
            found = self._canonical(name, kind)
            if found and found != obj.path:
                return found
        last = name.rsplit(".", 1)[-1]
        matches = [p for p in self.by_name.get(last, [])
                   if (p.endswith("." + name) or p == name) and p != obj.path]
        return matches[0] if len(matches) == 1 else None

    def role(self, match: re.Match[str], obj: griffe.Object) -> str:
        kind, text = match.group(1), match.group(2).strip()
        if "<" in text and text.endswith(">"):  # :role:`title <target>`
            title, target = text[:-1].split("<", 1)
            title, target = title.strip(), target.strip()
        else:
            short = text.startswith("~")
            target = text.lstrip("~")
            title = target.rsplit(".", 1)[-1] if short else target.lstrip(".")
            if kind in ("func", "meth") and not title.endswith(")"):
                title += "()"
        target = target.removesuffix("()")
        path = self.resolve(target, obj, kind)
        if path is None:
            return f"`{title}`"
        return f'<autoref identifier="{path}" optional><code>{title}</code></autoref>'

    # -- the whole docstring -----------------------------------------------------------------------
    def rewrite(self, text: str, obj: griffe.Object) -> str:
        text = ROLE_RE.sub(lambda m: self.role(m, obj), text)
        text = SPEC_RE.sub(_spec_link, text)
        text = DOCS_PAGE_RE.sub(_page_link, text)
        for code, tex in EQUATIONS.items():
            text = text.replace(f"``{code}``", f"${tex}$")
        return _fence_doctests(_split_multi_args(text))


def _page_link(match: re.Match[str]) -> str:
    """``docs/<page>.md`` -> ``[<its title>][<the title's heading id>]`` (autorefs)."""
    from markdown.extensions.toc import slugify

    page = Path(__file__).parent / f"{match.group(1)}.md"
    first = page.read_text(encoding="utf-8").split("\n", 1)[0] if page.is_file() else ""
    if not first.startswith("# "):
        return f"[{match.group(0)}][no-title-heading-in-{match.group(1)}]"  # fails the strict build
    title = first[2:].strip()
    return f"[{title}][{slugify(title, '-')}]"


def _spec_link(match: re.Match[str]) -> str:
    section, sub, upto = match.group(1), match.group(2) or "", match.group(3)
    label = f"§{section}{sub}" + (f"-{upto}" if upto else "")
    anchor = f"spec-{section}{sub}" if f"spec-{section}{sub}" in MATH_ANCHORS else f"spec-{section}"
    return f"[the mathematics, {label}][{anchor}]"  # an unknown section fails the strict build


def _fence_doctests(text: str) -> str:
    """Each doctest block at the left margin (a ``>>>`` line up to the next blank line) -> a ``pycon`` fence.

    Indented doctests belong to a section (``Examples:``), which mkdocstrings renders itself; text
    already inside a fence is left alone. Other lines starting with ``>`` get it escaped."""
    out: list[str] = []
    in_fence = in_doctest = False
    for line in text.split("\n"):
        if in_doctest and not line.strip():
            out.append("```")
            in_doctest = False
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and not in_doctest and line.startswith(">>>"):
            if out and out[-1].strip():
                out.append("")  # a fence opens a block of its own
            out.append("```pycon")
            in_doctest = True
        elif not in_fence and not in_doctest and re.match(r"\s*>(?!>>)", line):
            line = line.replace(">", "\\>", 1)  # ">= 1 - delta" wrapped to a line start: text, not a quote
        out.append(line)
    if in_doctest:
        out.append("```")
    return "\n".join(out)


def _split_multi_args(text: str) -> str:
    """``a, b, c: desc`` inside an Args-like section -> one entry per name."""
    lines = text.split("\n")
    out: list[str] = []
    section_indent: int | None = None
    for line in lines:
        header = ARGS_HEADER_RE.match(line)
        if header:
            section_indent = len(header.group(1))
            out.append(line)
            continue
        if section_indent is not None and line.strip():
            indent = len(line) - len(line.lstrip())
            if indent <= section_indent:
                section_indent = None
        multi = MULTI_ARG_RE.match(line) if section_indent is not None else None
        if multi:
            pad, names, desc = multi.groups()
            out.extend(f"{pad}{n.strip()}: {desc}" for n in names.split(","))
            continue
        out.append(line)
    return "\n".join(out)
