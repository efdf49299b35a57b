"""A timing grid for simulated time.

Under ``MockClock(autojump_threshold=0)`` every distinct deadline is at
least one trip round trio's run loop, plus the chain of hops it wakes.
Deadlines moved onto a grid share ticks, so what ends in the same tick
wakes in one batch.  Used only where the exact instant carries no meaning
(simulated latency, a soak's backoff and rate-limit releases), and always
rounding *up*: nothing on the grid happens earlier than it would off it.
"""

from __future__ import annotations

import math


def on_grid(t: float, quantum: float) -> float:
    """``t`` itself when ``quantum`` is 0; otherwise the first whole
    multiple of ``quantum`` at or after ``t`` (never earlier than ``t``,
    whatever the float rounding)."""
    if quantum <= 0:
        return t
    tick = math.ceil(t / quantum) * quantum
    return tick if tick >= t else tick + quantum
