"""Smoke test of bench/soak_bench.py: tiny, not timed (figures go to the
performance issue)."""

from __future__ import annotations

from .conftest import run_bench


def test_soak_bench_runs_and_reports_throughput() -> None:
    out = run_bench("soak_bench.py", "--runs", "8", "--concurrency", "4", "--repeat", "1")
    assert "raw trio" in out and "turns/s" in out and "virtual s/s" in out
    assert "ratio" in out and "one million agent turns" in out


def test_soak_bench_with_two_workers_prints_both_figures() -> None:
    out = run_bench("soak_bench.py", "--runs", "8", "--concurrency", "4", "--repeat", "1", "--workers", "2")
    assert "#1 1 process: raw trio" in out and "#1 2 processes: raw trio" in out
    assert "speed-up with 2 processes" in out and "one million agent turns" in out
