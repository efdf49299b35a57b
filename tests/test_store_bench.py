"""Smoke test of bench/store_bench.py: tiny sizes, correctness only."""

from __future__ import annotations

import re

from .conftest import run_bench


def test_store_bench_runs_and_reports_a_ratio() -> None:
    # The script checks itself that every row landed (it exits non-zero otherwise).
    out = run_bench("store_bench.py", "--rows", "300", "--repeats", "2", "--producers", "16")
    for label in ("store writer (acked):", "raw apsw executemany:", "ratio writer/raw:"):
        assert label in out
    ratio = float(re.search(r"ratio writer/raw:\s+([0-9.]+)x", out).group(1))  # type: ignore[union-attr]
    assert ratio > 0
