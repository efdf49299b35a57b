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


def _bench(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_turns_bench_runs_tiny() -> None:
    # The script asserts each run completed with one turn per agent.
    out = _bench("turns_bench.py", "--agents", "20,50", "--runs", "1")
    assert out.count("ratio") == 2 and "turns/s" in out


def test_memory_bench_runs_tiny() -> None:
    out = _bench("memory_bench.py", "--agents", "2000", "--runs", "1")
    assert "KiB/agent" in out and "ratio" in out


def test_floor_bench_runs_tiny() -> None:
    # Correctness only: the floor checks its rows landed in SQLite, the
    # Conclave side asserts its stage completed; no timing is asserted.
    out = _bench("floor_bench.py", "--agents", "20", "--runs", "1")
    assert out.count("x raw  (median") == 6 and "conclave / floor (no spawn) =" in out
    assert "floor (no spawn) / raw =" in out and "floor + features / raw =" in out and "0.5x target is" in out
    soak = _bench("floor_bench.py", "--soak", "--pipelines", "8", "--concurrency", "4", "--runs", "1")
    assert soak.count("x raw  (median") == 4 and "conclave / best floor =" in soak
    assert "best floor =" in soak and "20,000 turns/s target is" in soak
