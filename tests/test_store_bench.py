"""Smoke test of bench/store_bench.py: tiny sizes, correctness only."""

from __future__ import annotations

import re
import subprocess
import sys

from .conftest import REPO


def test_store_bench_runs_and_reports_a_ratio() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "store_bench.py"), "--rows", "300", "--repeats", "2", "--producers", "16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # The script checks itself that every row landed (it exits non-zero otherwise).
    for label in ("store writer (acked):", "raw apsw executemany:", "ratio writer/raw:"):
        assert label in out
    ratio = float(re.search(r"ratio writer/raw:\s+([0-9.]+)x", out).group(1))  # type: ignore[union-attr]
    assert ratio > 0
