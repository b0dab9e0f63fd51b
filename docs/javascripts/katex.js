// Typeset the math that pymdownx.arithmatex (generic mode) leaves as \( \) and \[ \] in the page,
// with the KaTeX copy shipped under docs/assets/katex (no network at build or view time).
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\[", right: "\\]", display: true },
      { left: "\\(", right: "\\)", display: false },
    ],
    throwOnError: false,
  });
});
