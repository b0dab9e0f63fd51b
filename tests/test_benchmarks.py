"""Smoke test of the benchmark suite (issue 8): the one documented command runs every benchmark to
the end and writes a ratio for every comparison.

Timing figures are *not* asserted here (they belong to docs/performance.md, measured on a quiet
machine); this guards the scripts against rot, and their built-in agreement checks (predict vs
the loop, the IIW estimators' values) run with them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_run_produces_every_row(tmp_path):
    # benchmarks/ ships with tests/: a checkout without it fails here rather than skipping (issue 17)
    assert (ROOT / "benchmarks" / "run.py").is_file()
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert all(run["returncode"] == 0 for run in result["runs"])
    groups = {r["group"] for r in result["rows"]}
    assert groups == {"steps", "sample", "predict", "memory", "chains", "iiw", "zoo", "tuning", "io"}
    for row in result["rows"]:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row["name"]
    names = " ".join(r["name"] for r in result["rows"])
    for needle in ("sgld vs floor", "psgld vs floor", "sghmc vs floor", "predict vs loop", "matmul floor",
                   "jvp vs loop", "jvp vs minibatch", "IIWRegularizer step",
                   "sample() step vs torch SGD step", "zoo lstm: predict vs loop",
                   "time to accuracy vs NUTS", "vs hand-written SGLD loop",
                   "optim.SGLD + Energy.of_module", "io Posterior.save vs torch.save",
                   "io Posterior.load transient memory"):
        assert needle in names
    assert "| benchmark | baseline | candidate | ratio | target | met |" in proc.stdout
