"""Shared helpers for the benchmarks: alternate runs, medians, ratios."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

from actors._checks import positive_arg as positive  # argparse type: a whole number >= 1


def machine() -> str:
    import os

    import gc

    return (
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores, "
        f"{platform.machine()}, gc thresholds {gc.get_threshold()} on both sides"
    )


def alternate(
    runs: int, baseline: Callable[[], float], subject: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """Run baseline and subject alternately ``runs`` times each; each
    callable returns a rate (higher is better)."""
    base, subj = [], []
    for _ in range(runs):
        base.append(baseline())
        subj.append(subject())
    return base, subj


def report(label: str, unit: str, base: list[float], subj: list[float]) -> float:
    b, s = statistics.median(base), statistics.median(subj)
    ratio = s / b if b else float("nan")
    print(f"{label}: raw trio {b:,.0f} {unit}, conclave {s:,.0f} {unit}, ratio {ratio:.2f}x (medians of {len(base)})")
    return ratio


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sizes(text: str) -> list[int]:
    """argparse type: comma-separated whole numbers >= 1 (``100,1000``)."""
    return [positive(part.strip()) for part in text.split(",")]
