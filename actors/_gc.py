"""Garbage-collector settings for many agents in one process.

CPython's cyclic collector makes a full (generation 2) pass whenever enough
objects have survived the younger passes, and each full pass walks every
live container object.  A stage of 10,000 agents keeps hundreds of
thousands alive (tasks, coroutine frames, channels, messages, outputs), so
with the default thresholds (700, 10, 10) full passes took about 40 % of a
10,000-agent stage and 15-20 % of a fault soak (bench/turns_bench.py,
bench/soak_bench.py; measured 2026-11-29).  Making young passes and full
passes rarer removes most of that.  Reference counting still frees acyclic
garbage at once; cycles are still collected, only later.  Young passes
every 50,000 allocations rather than 5,000 let most of a turn's short-lived
objects die before a pass ever walks them (+8 % turns/s at N=1,000 and
10,000; the soak unchanged).

The thresholds are process-wide, so the library never changes them on its
own: the CLI does for its commands, the benchmarks do for both sides of
each comparison, and an application embedding Conclave may opt in with
:func:`throughput_gc`.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

THROUGHPUT_THRESHOLDS = (50_000, 20, 100)


@contextmanager
def throughput_gc(thresholds: tuple[int, int, int] = THROUGHPUT_THRESHOLDS) -> Iterator[None]:
    """Run the body with the collector's thresholds set to ``thresholds``
    (default :data:`THROUGHPUT_THRESHOLDS`), then restore the previous ones.
    Not a checkpoint; not thread-safe (it changes process-wide settings)."""
    if len(thresholds) != 3 or any(not isinstance(t, int) or t < 1 for t in thresholds):
        raise ValueError(f"thresholds must be three positive ints, got {thresholds!r}")
    previous = gc.get_threshold()
    gc.set_threshold(*thresholds)
    try:
        yield
    finally:
        gc.set_threshold(*previous)
