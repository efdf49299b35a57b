"""A circuit breaker on trio's clock: closed, open, half-open.

Closed: calls pass, and their outcomes are kept for ``window`` seconds.
When a call arrives and, among the outcomes reported *before that
instant*, there are at least ``min_calls`` with a failure rate of at least
``failure_rate``, the breaker opens.  Open: calls fail fast
(:class:`~messages.CircuitOpen`, carrying the time left) until ``cooldown``
has passed; then the next call is let through as the half-open probe
(every call arriving in that same instant is a probe too, so which calls
probe does not depend on trio's order).  Later callers in half-open wait
for the probes' verdict
(:meth:`CircuitBreaker.wait_for_verdict`) rather than failing fast and
burning their attempts: the first probe outcome decides - a success closes
the breaker (and clears the window), and they go ahead; a failure opens it
again for another cooldown, and they fail fast.  Outcomes of calls admitted before a
transition are stale and ignored.

Deciding to open when a call *arrives*, from a time window that excludes
the current instant, makes the breaker's state a function of virtual time
alone: outcomes reported in the same instant (a tie trio may order either
way) are all counted or none, so the same seed opens the breaker at the
same moments whatever the scheduling order.

Defaults follow the reference's docs - 50 % failures, 30 s cooldown, a test
call after the cooldown - over a 60 s window once 20 outcomes are in.  (A
window of the last 20 outcomes tripped on bursts of 30 s timeouts reporting
together while a 429 held every other call back: it measured the gate,
not the provider.)
"""

from __future__ import annotations

import collections
import math
from typing import Literal

import attrs
import trio

from ._checks import check_seconds, check_whole

State = Literal["closed", "open", "half_open"]


@attrs.frozen(kw_only=True, slots=True)
class BreakerPolicy:
    """When a provider's circuit breaker opens: a call arriving when, of the
    outcomes in the last ``window`` seconds (at least ``min_calls`` of
    them), ``failure_rate`` or more failed (disconnects, timeouts, 5xx); it
    stays open ``cooldown`` seconds on trio's clock, then lets probes
    through.  Checked when built."""

    failure_rate: float = attrs.field(default=0.5)
    window: float = 60.0  # seconds of outcomes considered
    min_calls: int = 20
    cooldown: float = 30.0
    probe_wait: float = 1.0  # hint to callers refused while a probe is out

    @failure_rate.validator
    def _check(self, attribute: attrs.Attribute[float], value: float) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"failure_rate must be a number within (0, 1], got {value!r}")
        if not 0.0 < value <= 1.0:
            raise ValueError(f"failure_rate must be within (0, 1], got {value!r}")

    def __attrs_post_init__(self) -> None:
        # "not x > 0" rather than "x <= 0": NaN fails too.
        check_seconds(self.window, "window")
        check_whole(self.min_calls, "min_calls")
        if not self.window > 0 or not isinstance(self.min_calls, int) or self.min_calls < 1:
            raise ValueError(f"need window > 0 and min_calls >= 1, got {self.window!r} and {self.min_calls!r}")
        check_seconds(self.cooldown, "cooldown")
        check_seconds(self.probe_wait, "probe_wait")


@attrs.frozen(slots=True)
class Ticket:
    """An admitted call: which breaker generation admitted it, and whether
    it is the half-open probe."""

    generation: int
    probe: bool


class CircuitBreaker:
    def __init__(self, policy: BreakerPolicy | None = None) -> None:
        self.policy = policy or BreakerPolicy()
        self.state: State = "closed"
        self.generation = 0
        self.opened_at = 0.0
        self.probe_instant: float | None = None  # when the half-open probes went out
        self.probes_out = 0
        self._outcomes: collections.deque[tuple[float, bool]] = collections.deque()
        self._failures = 0
        # Outcomes reported at the latest instant (the deque's tail), kept
        # apart so that deciding at that instant need not scan them: under
        # a virtual clock a whole stage can report in one instant, and a
        # scan per call was quadratic in the stage's size.
        self._tail_at = -math.inf
        self._tail_total = 0
        self._tail_failures = 0
        self.transitions: list[tuple[float, State]] = []  # (trio time, new state)
        self.rejected = 0
        self._changed = trio.Event()  # set (and replaced) when the probe slot may be free

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_verdict(self) -> None:
        """Wait until the half-open probe has finished (or was abandoned)."""
        await self._changed.wait()

    def _move(self, now: float, state: State) -> None:
        self.state = state
        self.generation += 1
        self.transitions.append((now, state))
        if state == "open":
            self.opened_at = now
        self.probe_instant = None
        self.probes_out = 0
        if state == "closed":
            self._outcomes.clear()
            self._failures = 0
            self._tail_total = self._tail_failures = 0
        self._wake()

    def _in_window(self, now: float) -> tuple[int, int]:
        """Forget outcomes older than the window; (calls, failures) left."""
        outcomes = self._outcomes
        horizon = now - self.policy.window
        while outcomes and outcomes[0][0] < horizon:
            self._failures -= outcomes.popleft()[1]
        return len(outcomes), self._failures

    def _should_open(self, now: float) -> bool:
        total, failures = self._in_window(now)
        if self._tail_at >= now:  # this instant's outcomes are not in yet
            total -= self._tail_total
            failures -= self._tail_failures
        return total >= self.policy.min_calls and failures >= self.policy.failure_rate * total

    def acquire(self, now: float) -> Ticket | float:
        """Admit a call (a :class:`Ticket`) or refuse it: the float is how
        long until trying again makes sense."""
        if self.state == "closed" and self._should_open(now):
            self._move(now, "open")
        if self.state == "open":
            left = self.opened_at + self.policy.cooldown - now
            if left > 0:
                self.rejected += 1
                return left
            self._move(now, "half_open")
        if self.state == "half_open":
            if self.probes_out == 0 and (self.probe_instant is None or now > self.probe_instant):
                self.probe_instant = now  # no probe out: this instant probes
            if now == self.probe_instant:
                self.probes_out += 1
                return Ticket(self.generation, probe=True)
            self.rejected += 1
            return self.policy.probe_wait
        return Ticket(self.generation, probe=False)

    def record(self, ticket: Ticket, now: float, *, failure: bool) -> None:
        if ticket.generation != self.generation:
            return  # admitted before the last transition: stale
        if ticket.probe:
            self._move(now, "open" if failure else "closed")
            return
        self._outcomes.append((now, failure))
        self._failures += failure
        if now != self._tail_at:
            self._tail_at, self._tail_total, self._tail_failures = now, 0, 0
        self._tail_total += 1
        self._tail_failures += failure

    def release(self, ticket: Ticket) -> None:
        """The call was abandoned (cancelled): free the probe slot."""
        if ticket.probe and ticket.generation == self.generation:
            self.probes_out -= 1
            if self.probes_out == 0:
                self._wake()

    @property
    def failure_ratio(self) -> float:
        return self._failures / len(self._outcomes) if self._outcomes else 0.0
