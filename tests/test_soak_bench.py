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


def test_soak_bench_with_two_workers_prints_both_figures() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak_bench.py"), "--runs", "8", "--concurrency", "4", "--repeat", "1",
         "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "#1 1 process: raw trio" in proc.stdout and "#1 2 processes: raw trio" in proc.stdout
    assert "speed-up with 2 processes" in proc.stdout and "one million agent turns" in proc.stdout
