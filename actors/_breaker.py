"""A circuit breaker on trio's clock: closed, open, half-open.

Closed: calls pass; the last ``window`` outcomes are kept, and once at least
``min_calls`` of them are in and the failure rate reaches ``failure_rate``
the breaker opens.  Open: calls fail fast (:class:`~messages.CircuitOpen`,
carrying the time left) until ``cooldown`` has passed; then the next call
is let through as the one half-open probe.  Other callers in half-open
wait for the probe's verdict (:meth:`CircuitBreaker.wait_for_verdict`)
rather than failing fast and burning their attempts: the probe's success
closes the breaker (and clears the window), and they go ahead; its failure
opens it again for another cooldown, and they fail fast.  Outcomes of calls admitted before a
transition are stale and ignored.  Defaults follow the reference's docs:
50 % failures, 30 s cooldown, a test call after the cooldown; the rate is
taken over the last 50 outcomes once 20 are in.  (A window of 20 tripped on
bursts of 30 s timeouts reporting together while a 429 held every other
call back: a window that short measures the gate, not the provider.)
"""

from __future__ import annotations

import collections
from typing import Literal

import attrs
import trio

State = Literal["closed", "open", "half_open"]


@attrs.frozen(kw_only=True, slots=True)
class BreakerPolicy:
    failure_rate: float = attrs.field(default=0.5)
    window: int = 50
    min_calls: int = 20
    cooldown: float = 30.0
    probe_wait: float = 1.0  # hint to callers refused while a probe is out

    @failure_rate.validator
    def _check(self, attribute: attrs.Attribute[float], value: float) -> None:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"failure_rate must be within (0, 1], got {value!r}")

    def __attrs_post_init__(self) -> None:
        if self.window < 1 or not 1 <= self.min_calls <= self.window:
            raise ValueError(f"need 1 <= min_calls <= window, got {self.min_calls} and {self.window}")
        if self.cooldown < 0 or self.probe_wait < 0:
            raise ValueError("cooldown and probe_wait must be >= 0")


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
        self.probe_out = False
        self._outcomes: collections.deque[bool] = collections.deque(maxlen=self.policy.window)
        self._failures = 0
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
        if state != "half_open":
            self.probe_out = False
        if state == "closed":
            self._outcomes.clear()
            self._failures = 0
        self._wake()

    def acquire(self, now: float) -> Ticket | float:
        """Admit a call (a :class:`Ticket`) or refuse it: the float is how
        long until trying again makes sense."""
        if self.state == "open":
            left = self.opened_at + self.policy.cooldown - now
            if left > 0:
                self.rejected += 1
                return left
            self._move(now, "half_open")
        if self.state == "half_open":
            if self.probe_out:
                self.rejected += 1
                return self.policy.probe_wait
            self.probe_out = True
            return Ticket(self.generation, probe=True)
        return Ticket(self.generation, probe=False)

    def record(self, ticket: Ticket, now: float, *, failure: bool) -> None:
        if ticket.generation != self.generation:
            return  # admitted before the last transition: stale
        if ticket.probe:
            self._move(now, "open" if failure else "closed")
            return
        if len(self._outcomes) == self._outcomes.maxlen and self._outcomes[0]:
            self._failures -= 1
        self._outcomes.append(failure)
        self._failures += failure
        count = len(self._outcomes)
        if count >= self.policy.min_calls and self._failures >= self.policy.failure_rate * count:
            self._move(now, "open")

    def release(self, ticket: Ticket) -> None:
        """The call was abandoned (cancelled): free the probe slot."""
        if ticket.probe and ticket.generation == self.generation:
            self.probe_out = False
            self._wake()

    @property
    def failure_ratio(self) -> float:
        return self._failures / len(self._outcomes) if self._outcomes else 0.0
