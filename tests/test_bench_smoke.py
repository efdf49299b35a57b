"""The benchmarks run tiny and print their ratios: correctness only, not timing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import apsw
import pytest
import trio
import trio.testing

from .conftest import REPO, run_bench


def test_metrics_bench_runs_tiny() -> None:
    out = run_bench("metrics_bench.py", "--events", "300", "--repeats", "1", "--agents", "6")
    assert out.count("ratio") == 3
    assert "events/s" in out and "never reads" in out


def test_turns_bench_runs_tiny() -> None:
    # The script asserts each run completed with one turn per agent.
    out = run_bench("turns_bench.py", "--agents", "20,50", "--runs", "1", timeout=300)
    assert out.count("ratio") == 2 and "turns/s" in out


def test_memory_bench_runs_tiny() -> None:
    out = run_bench("memory_bench.py", "--agents", "2000", "--runs", "1", timeout=300)
    assert "KiB/agent" in out and "ratio" in out


def test_floor_bench_runs_tiny() -> None:
    # Correctness only: the floor checks its rows landed in SQLite, the
    # Conclave side asserts its stage completed; no timing is asserted.
    out = run_bench("floor_bench.py", "--agents", "20", "--runs", "1", timeout=300)
    assert out.count("x raw  (median") == 7 and "conclave / floor (no spawn) =" in out
    assert "floor (no spawn) / raw =" in out and "floor + features / raw =" in out and "0.5x target is" in out
    assert "floor + features + Random / raw =" in out
    soak = run_bench("floor_bench.py", "--soak", "--pipelines", "8", "--concurrency", "4", "--runs", "1", timeout=300)
    assert soak.count("x raw  (median") == 5 and "conclave / best floor =" in soak
    assert "best floor =" in soak and "floor + soak features =" in soak and "20,000 turns/s target is" in soak
    split = run_bench("floor_bench.py", "--soak", "--pipelines", "8", "--concurrency", "4", "--runs", "1",
                      "--workers", "2", timeout=300)
    assert "2 processes" in split and split.count("x raw  (median") == 5


def test_the_featured_soak_floor_does_the_feature_work(tmp_path: Path) -> None:
    # Its figure stands for "the barest soak turn issue 5 allows" only if it
    # really injects and retries each fault kind and logs them.
    sys.path.insert(0, str(REPO))
    from bench.floor_bench import featured_soak

    path = str(tmp_path / "floor.db")
    turns = trio.run(featured_soak, 40, 8, path, clock=trio.testing.MockClock(autojump_threshold=0))
    conn = apsw.Connection(path)
    kinds = dict(conn.execute("SELECT detail, count(*) FROM events WHERE kind = 'fault_injected' GROUP BY detail"))
    retries = conn.execute("SELECT count(*) FROM events WHERE kind = 'retry'").fetchall()[0][0]
    calls = conn.execute("SELECT count(*) FROM events WHERE kind = 'agent_call'").fetchall()[0][0]
    assert set(kinds) == {"disconnect", "429", "timeout"}
    assert turns == calls == 40 * 19 + retries and retries == sum(kinds.values())


@pytest.mark.parametrize(
    ("script", "args", "needle"),
    [
        ("turns_bench.py", ["--agents", "100,abc"], "argument --agents: not a whole number: 'abc'"),
        ("floor_bench.py", ["--runs", "0"], "argument --runs: must be at least 1, got 0"),
        ("memory_bench.py", ["--agents", "0"], "argument --agents: must be at least 1, got 0"),
        ("soak_bench.py", ["--workers", "-2"], "argument --workers: must be at least 1, got -2"),
        ("store_bench.py", ["--rows", "lots"], "argument --rows: not a whole number: 'lots'"),
        ("metrics_bench.py", ["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    ],
)
def test_a_bad_bench_argument_is_a_usage_error_naming_it(script: str, args: list[str], needle: str) -> None:
    # Before, a traceback (int('abc'), or the median of no runs) after the imports.
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
