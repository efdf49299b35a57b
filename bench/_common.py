"""Shared helpers for the benchmarks: alternate runs, medians, ratios."""

from __future__ import annotations

import multiprocessing
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from actors._checks import positive_arg as positive  # argparse type: a whole number >= 1
from actors._soak_shards import DEFAULT_START_METHOD

T = TypeVar("T")


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


def in_shards(shard: Callable[..., T], runs: int, concurrency: int, workers: int, *args: Any) -> list[T]:
    """``shard(runs_of_k, concurrency_of_k, *args)`` for each of ``workers``
    processes, split as ``conclave soak --workers`` splits: run i in process
    i % W, ceil(concurrency / W) in flight in each; in this process when
    there is one shard."""
    shards = min(workers, runs)
    if shards == 1:
        return [shard(runs, concurrency, *args)]
    per = -(-concurrency // shards)
    context = multiprocessing.get_context(DEFAULT_START_METHOD)
    with ProcessPoolExecutor(max_workers=shards, mp_context=context) as pool:
        futures = [pool.submit(shard, len(range(k, runs, shards)), per, *args) for k in range(shards)]
        return [f.result() for f in futures]
