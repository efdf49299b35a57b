"""Smoke test of bench/soak_bench.py: tiny, not timed (figures go to the
performance issue)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO


def test_soak_bench_runs_and_reports_throughput() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak_bench.py"), "--runs", "8", "--concurrency", "4", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "raw trio" in proc.stdout and "turns/s" in proc.stdout and "virtual s/s" in proc.stdout
    assert "ratio" in proc.stdout and "one million agent turns" in proc.stdout
