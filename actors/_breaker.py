"""A circuit breaker on trio's clock: closed, open, half-open.

Closed: the breaker keeps, for ``window`` seconds, when calls were admitted
and when they failed.  When a call arrives and, of the calls admitted
*before that instant* (at least ``min_calls`` of them), the failures
reported before it reach ``failure_rate``, the breaker opens.  Calls still
out count as not failed: failures come back at once while answers take
seconds, so a share of *finished* calls read a burst of 20 instant
disconnects among 200 calls as 100 % failures (a 10 % fault rate opened the
breaker and failed whole runs).  Open: calls fail fast
(:class:`~messages.CircuitOpen`, carrying the time left) until ``cooldown``
has passed; then the next call is let through as a half-open probe (every
call arriving in that same instant is a probe too, so which calls probe
does not depend on trio's order).  Later callers in half-open wait for the
probes' verdict (:meth:`CircuitBreaker.wait_for_verdict`) rather than
failing fast and burning their attempts.  The verdict is the probes'
failure share, given once the probe instant is over and as soon as the
outcomes still out cannot change it: a share of ``failure_rate`` or more
opens the breaker again for another cooldown (they fail fast), less closes
it (and clears the window; they go ahead).  One probe therefore decides
alone, as in the reference.  Outcomes of calls admitted before a transition
are stale and ignored.

Deciding to open when a call *arrives*, from a time window that excludes
the current instant, makes the breaker's state a function of virtual time
alone: admissions and outcomes in the same instant (a tie trio may order
either way) are all counted or none, so the same seed opens the breaker at
the same moments whatever the scheduling order.  For the same reason a
probe that fails at once (a disconnect) does not refuse the probes still
arriving in its instant: which of them would have been refused was trio's
choice (a soak at ``disconnect:100%`` gave different digests run to run).
Its verdict, dated at the outcome, is taken when the next call or outcome
comes after that instant; it cannot flip once reached, since failures and
successes only grow and both thresholds cannot be crossed.

Defaults follow the reference's docs - 50 % failures, 30 s cooldown, a test
call after the cooldown - over a 60 s window once 20 calls are in.  (A
window of the last 20 outcomes tripped on bursts of 30 s timeouts reporting
together while a 429 held every other call back: it measured the gate,
not the provider.)
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, Literal

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
class BreakerTicket:
    """An admitted call: which breaker generation admitted it, and whether
    it is the half-open probe.  Not :class:`actors.Ticket`, which is the
    decision sequencer's."""

    generation: int
    probe: bool


# Its old name here, kept for the imports that use it; the public name is
# BreakerTicket (actors.Ticket is the decision sequencer's).
Ticket = BreakerTicket


class _Tally:
    """Counts per instant, oldest first, over a sliding time window."""

    __slots__ = ("_counts", "total")

    def __init__(self) -> None:
        self._counts: collections.deque[list[float]] = collections.deque()  # [instant, count]
        self.total = 0

    def add(self, now: float) -> None:
        counts = self._counts
        if counts and counts[-1][0] == now:
            counts[-1][1] += 1
        else:
            counts.append([now, 1])
        self.total += 1

    def before(self, now: float, horizon: float) -> int:
        """Forget instants older than ``horizon``; the count strictly before ``now``."""
        counts = self._counts
        while counts and counts[0][0] < horizon:
            self.total -= int(counts.popleft()[1])
        if counts and counts[-1][0] >= now:  # this instant's are not in yet
            return self.total - int(counts[-1][1])
        return self.total

    def clear(self) -> None:
        self._counts.clear()
        self.total = 0

    def offsets(self, now: float) -> list[list[float]]:
        """``[instant - now, count]`` per instant kept."""
        return [[at - now, count] for at, count in self._counts]

    def restore(self, offsets: list[list[float]], now: float) -> None:
        self.clear()
        for at, count in offsets:
            self._counts.append([now + float(at), int(count)])
            self.total += int(count)


class CircuitBreaker:
    """One provider's breaker: closed, open, half-open (see the module
    docstring).  Synchronous except :meth:`wait_for_verdict`; every method
    takes the time from its caller, so its state is a function of trio's
    clock alone."""

    def __init__(self, policy: BreakerPolicy | None = None) -> None:
        self.policy = policy or BreakerPolicy()
        self.state: State = "closed"
        self.generation = 0
        self.opened_at = 0.0
        self.probe_instant: float | None = None  # when the half-open probes went out
        self.probes_out = 0  # probes admitted and not yet reported or released
        self._probes = 0  # probes admitted and not released
        self._probe_failures = 0
        self._probe_successes = 0
        self._changed_at = 0.0  # when the probes' tallies last changed
        # Per instant, not per call: a whole stage can be admitted in one
        # virtual instant, and deciding must not scan it.
        self._admitted = _Tally()
        self._failed = _Tally()
        self.transitions: list[tuple[float, State]] = []  # (trio time, new state)
        self.rejected = 0
        self._changed = trio.Event()  # set (and replaced) when the probe slot may be free

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_verdict(self) -> None:
        """Wait until the half-open probes have a verdict (or were abandoned).

        Always a checkpoint, and always waits for the *next* change: any
        state transition (not only a verdict), a restore, or the last probe
        abandoned wakes it - so the caller must look at the state again
        (the breaker may still be half-open, its probe slot free).  Called
        while no probe is out it may wait indefinitely.  Cancelling it
        changes nothing; it raises nothing else."""
        await self._changed.wait()

    def _move(self, now: float, state: State) -> None:
        self.state = state
        self.generation += 1
        self.transitions.append((now, state))
        if state == "open":
            self.opened_at = now
        self.probe_instant = None
        self.probes_out = self._probes = self._probe_failures = self._probe_successes = 0
        if state == "closed":
            self._admitted.clear()
            self._failed.clear()
        self._wake()

    def _should_open(self, now: float) -> bool:
        horizon = now - self.policy.window
        total = self._admitted.before(now, horizon)
        failures = self._failed.before(now, horizon)
        return total >= self.policy.min_calls and failures >= self.policy.failure_rate * total

    def acquire(self, now: float) -> BreakerTicket | float:
        """Admit a call (a :class:`BreakerTicket`) or refuse it: the float is how
        long until trying again makes sense."""
        self._catch_up(now)
        if self.state == "closed":
            if self._should_open(now):
                self._move(now, "open")
            else:
                self._admitted.add(now)
                return BreakerTicket(self.generation, probe=False)
        if self.state == "open":
            left = self.opened_at + self.policy.cooldown - now
            if left > 0:
                self.rejected += 1
                return left
            self._move(now, "half_open")
        if self.probes_out == 0 and (self.probe_instant is None or now > self.probe_instant):
            # No probe out: this instant probes afresh.
            self.probe_instant = self._changed_at = now
            self._probes = self._probe_failures = self._probe_successes = 0
        if now == self.probe_instant:
            self.probes_out += 1
            self._probes += 1
            return BreakerTicket(self.generation, probe=True)
        self.rejected += 1
        return self.policy.probe_wait

    def refuses_resend(self, ticket: BreakerTicket, now: float) -> float | None:
        """For a call admitted with ``ticket`` that sends its request a
        second time: None if it may, else how long until trying again makes
        sense.  Refused if the breaker has left the state the ticket was
        given in for one that is not closed - counting a move due by now that
        no call has made yet (it opens, or takes its probes' verdict, as it
        would for a call arriving now)."""
        self._catch_up(now)
        if self.state == "closed" and self._should_open(now):
            self._move(now, "open")
        if self.state == "closed" or ticket.generation == self.generation:
            return None
        self.rejected += 1
        if self.state == "open":
            return max(self.opened_at + self.policy.cooldown - now, 0.0)
        return self.policy.probe_wait  # half-open: other calls' probes decide

    def _verdict(self) -> State | None:
        """What the probes' outcomes so far decide, if the ones still out
        cannot change it.  Exact: in floats, 7 failures of 25 probes at a
        rate of 0.28 satisfied neither side, and the breaker stayed
        half-open with its waiters asleep."""
        probes = self._probes
        if not probes:
            return None
        threshold = Fraction(self.policy.failure_rate) * probes
        if self._probe_failures >= threshold:
            return "open"
        if self._probe_successes > probes - threshold:
            return "closed"
        return None

    def _judge(self, at: float) -> None:
        verdict = self._verdict()
        if verdict is not None:
            self._move(at, verdict)

    def _catch_up(self, now: float) -> None:
        """At the first event after the probe instant: the verdict its
        outcomes already reached, dated when they reached it - never by
        which event of a later instant trio ran first."""
        if self.state == "half_open" and self.probe_instant is not None and now > self.probe_instant:
            self._judge(self._changed_at)

    def record(self, ticket: BreakerTicket, now: float, *, failure: bool) -> None:
        if ticket.generation != self.generation:
            return  # admitted before the last transition: stale
        if ticket.probe:
            self._catch_up(now)
            if ticket.generation != self.generation:
                return  # the verdict came before this outcome
            self.probes_out -= 1
            if failure:
                self._probe_failures += 1
            else:
                self._probe_successes += 1
            self._changed_at = now
            if self.probe_instant is not None and now > self.probe_instant:
                self._judge(now)
        elif failure:
            self._failed.add(now)

    def release(self, ticket: BreakerTicket, now: float) -> None:
        """The call was abandoned (cancelled).  A probe frees its slot and
        no longer counts towards the verdict; another call stays counted as
        admitted and not failed."""
        if not (ticket.probe and ticket.generation == self.generation):
            return
        self._catch_up(now)
        if ticket.generation != self.generation:
            return
        self.probes_out -= 1
        self._probes -= 1
        self._changed_at = now
        if self._probes == 0:
            self._wake()
        elif self.probe_instant is not None and now > self.probe_instant:
            self._judge(now)

    def snapshot(self, now: float) -> dict[str, Any] | None:
        """The state, its times relative to ``now``, for :meth:`restore`
        (a resume on the virtual clock goes on as if never interrupted);
        None while a probe is out, whose verdict a restored breaker would
        wait for in vain."""
        if self.probes_out:
            return None
        return {
            "state": self.state,
            "opened_at": self.opened_at - now,
            "probe_instant": None if self.probe_instant is None else self.probe_instant - now,
            "probes": [self._probes, self._probe_failures, self._probe_successes],
            "changed_at": self._changed_at - now,
            "admitted": self._admitted.offsets(now),
            "failed": self._failed.offsets(now),
        }

    def restore(self, snapshot: Mapping[str, Any], now: float) -> None:
        """Take up ``snapshot`` (from :meth:`snapshot`) as of ``now``.
        Malformed: ValueError (or TypeError, KeyError), the breaker as it was."""
        state = snapshot["state"]
        if state not in ("closed", "open", "half_open"):
            raise ValueError(f"unknown breaker state {state!r}")
        probes, failures, successes = (int(n) for n in snapshot["probes"])
        admitted, failed = _Tally(), _Tally()
        admitted.restore(snapshot["admitted"], now)
        failed.restore(snapshot["failed"], now)
        instant = snapshot["probe_instant"]
        probe_instant = None if instant is None else now + float(instant)
        opened_at, changed_at = now + float(snapshot["opened_at"]), now + float(snapshot["changed_at"])
        self.state = state
        self.generation += 1
        self.opened_at, self.probe_instant, self._changed_at = opened_at, probe_instant, changed_at
        self.probes_out = 0
        self._probes, self._probe_failures, self._probe_successes = probes, failures, successes
        self._admitted, self._failed = admitted, failed
        self._wake()

    @property
    def failure_ratio(self) -> float:
        """Failures per admitted call in the window (calls still out count as not failed)."""
        return self._failed.total / self._admitted.total if self._admitted.total else 0.0
