"""The rate-limit gate: one 429 pauses every caller of that provider.

After a 429 with a reset hint the gate stays closed until the reset time on
trio's clock, and every call to the provider - real or an injected fault
standing in for one - waits at the gate instead of hammering the provider
on its own schedule.  A later 429 can only push the reset time further out.
"""

from __future__ import annotations

import math

import trio


class RateLimitGate:
    def __init__(self) -> None:
        self.reset_at = -math.inf
        self.closures = 0  # how many 429s closed (or extended) the gate
        self.waits = 0  # how many calls had to wait

    def close_until(self, deadline: float) -> None:
        """Keep the gate closed until ``deadline`` (trio clock)."""
        self.closures += 1
        if deadline > self.reset_at:
            self.reset_at = deadline

    def is_open(self, now: float) -> bool:
        return now >= self.reset_at

    async def wait(self) -> float:
        """Return once the gate is open (at once, without a checkpoint, if
        it already is); returns how long it waited.  Cancellable."""
        start = trio.current_time()
        if start >= self.reset_at:
            return 0.0
        self.waits += 1
        while trio.current_time() < self.reset_at:
            await trio.sleep_until(self.reset_at)  # the deadline may move on
        return trio.current_time() - start
