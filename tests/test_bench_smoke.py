"""The metrics benchmark runs (tiny) and prints its ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_metrics_bench_runs_tiny() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "metrics_bench.py"), "--events", "300", "--repeats", "1", "--agents", "6"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ratio") == 3
    assert "events/s" in proc.stdout and "never reads" in proc.stdout
