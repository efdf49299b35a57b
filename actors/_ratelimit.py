"""The rate-limit gate: one 429 pauses every caller of that provider.

After a 429 with a reset hint the gate stays closed until the reset time on
trio's clock, and every call to the provider - real or an injected fault
standing in for one - waits at the gate instead of hammering the provider
on its own schedule.  A later 429 can only push the reset time further out.

The gate is a function of virtual time: a 429 reported at instant ``t``
closes it for callers arriving *after* ``t``; one arriving in the same
instant passes (it was simultaneous with the 429, whichever trio ran
first), so the same seed gates the same calls in every run.

Waiters are not all released in the instant the window ends (a thundering
herd the provider would answer with another 429): each is released within
``spread`` seconds after the reset, at a point drawn from its identity, so
the release order is the same in every run and no two callers tie.

Waiting costs one sleep per waiter, not one per extension: waiters queue in
release order and only the head sleeps (on the reset time as it stands);
the others park until the head is released and hands the lead on.  When a
429 pushes the reset time out during a release wave, only the head wakes
and sleeps again - the release times are the same as if every waiter slept
on its own, but the cost no longer grows with waiters times 429s (it was
quadratic: 24 sleeps per agent turn in a 256-run soak).

A waiter may give limits (its call's deadline, the longest wait it
accepts): when a later 429 moves the reset so that a caller arriving at
that instant would be refused - released at or past the deadline, or the
gate closed longer than the wait - it leaves at once with
:class:`GateRefused`, rather than waiting out its call timeout at the
gate, an attempt lost for nothing, and then being refused.  Like the gate
itself this is a function of virtual time: a waiter due in the 429's own
instant is released, and one arriving in it counts as arrived before it.

With a ``quantum`` (the soak's timing grid, see :mod:`actors._grid`)
release points are rounded up onto the grid, so several waiters share one;
the head then releases, in the same step, every waiter whose point has come
instead of handing the lead down the queue one scheduling round at a time.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Mapping

import trio

from messages import ConclaveError

from ._checks import check_seconds
from ._format import whole_seconds
from ._grid import on_grid


class GateRefused(ConclaveError):
    """A later 429 moved the reset past a waiter's limits (see
    :meth:`RateLimitGate.wait`, which raises it); ``left``: seconds until the reset;
    ``past_until``: its release point passed ``until`` (else the gate stays
    closed longer than its ``max_wait``)."""

    def __init__(self, left: float, past_until: bool) -> None:
        super().__init__(f"the gate stays closed {whole_seconds(left)} more")
        self.left = left
        self.past_until = past_until


class RateLimitGate:
    """One provider's gate: closed until a 429's reset time on trio's
    clock, then releasing its waiters one by one, spread by identity (see
    the module docstring).  ``spread``: seconds over which waiters are
    released after the reset; ``quantum``: the grid release points are
    rounded onto (0: none)."""

    def __init__(self, *, spread: float = 1.0, quantum: float = 0.0) -> None:
        # NaN passed "spread < 0" and made every release point NaN; inf
        # released no waiter, ever.
        self.spread = check_seconds(spread, "gate spread")
        self.quantum = check_seconds(quantum, "gate quantum")
        self.reset_at = -math.inf  # in force for callers after the closing instant
        self._before = -math.inf  # the reset time as it stood before that instant
        self._closed_at = -math.inf
        self.closures = 0  # how many 429s closed (or extended) the gate
        self.waits = 0  # how many calls had to wait
        self._queue: list[_Waiter] = []  # a heap in release order
        self._order = itertools.count()  # ties (practically impossible) by arrival

    def close_until(self, deadline: float, now: float | None = None) -> None:
        """Keep the gate closed until ``deadline`` (trio clock) for callers
        arriving after ``now`` (default: the current time)."""
        now = trio.current_time() if now is None else now
        self.closures += 1
        if now > self._closed_at:
            self._before = self.reset_at
            self._closed_at = now
        if deadline > self.reset_at:
            self.reset_at = deadline
            self._refuse_past(now)

    def _refused(self, waiter: _Waiter, now: float) -> bool | None:
        """Whether a caller of ``waiter``'s limits arriving at ``now`` would
        be refused under the reset in force after this instant: True past
        its ``until``, False past its ``max_wait``, None if not."""
        if on_grid(self.reset_at + waiter.unit * self.spread, self.quantum) >= waiter.until:
            return True
        if self.reset_at - now > waiter.max_wait:
            return False
        return None

    def _refuse_past(self, now: float) -> None:
        # Waiters queued before this instant meet the new reset time when
        # they wake; those it would refuse on arrival leave now.  One due in
        # this very instant (under the reset as it stood before it: several
        # 429s may share the instant) is released, as no 429 is before it.
        for waiter in self._queue:
            if waiter.gone or (waiter.until == math.inf and waiter.max_wait == math.inf):
                continue
            if on_grid(self._before + waiter.unit * self.spread, self.quantum) <= now:
                continue
            past_until = self._refused(waiter, now)
            if past_until is not None:
                self._refuse(waiter, now, past_until)

    def _refuse(self, waiter: _Waiter, now: float, past_until: bool) -> None:
        waiter.gone = waiter.refused = True
        waiter.past_until = past_until
        waiter.left = self.reset_at - now
        waiter.lead.set()
        if waiter.sleep is not None:
            waiter.sleep.cancel()  # the head, asleep on the old reset time

    def snapshot(self, now: float) -> dict[str, float] | None:
        """The reset times relative to ``now`` (None: the gate never
        closed), for :meth:`restore`."""
        if self._closed_at == -math.inf:
            return None
        return {
            "reset_at": self.reset_at - now,
            "before": max(self._before - now, -1e9),  # -inf is not JSON
            "closed_at": self._closed_at - now,
        }

    def restore(self, snapshot: Mapping[str, float], now: float) -> None:
        reset_at, before, closed_at = (float(snapshot[k]) for k in ("reset_at", "before", "closed_at"))
        self.reset_at, self._before, self._closed_at = now + reset_at, now + before, now + closed_at

    def reset_for(self, now: float) -> float:
        """The reset time in force for a caller arriving at ``now``."""
        return self._before if now == self._closed_at else self.reset_at

    def is_open(self, now: float) -> bool:
        return now >= self.reset_for(now)

    async def wait(self, unit: float = 0.0, until: float = math.inf, max_wait: float = math.inf) -> float:
        """Return once the gate is open (at once, without a checkpoint, if
        it already is); returns how long it waited.  A caller that had to
        wait is released ``unit * spread`` seconds after the reset
        (``unit`` in [0, 1), from its identity; rounded up onto the grid
        with a ``quantum``).  Raises :class:`GateRefused` as soon as a later
        429 moves the reset so that this caller, arriving then, would be
        refused: its release point at ``until`` (trio time) or past it, or
        the gate closed more than ``max_wait`` seconds on.  (The caller
        checks its limits on arrival; this is not a checkpoint then.)
        Cancellable: a cancelled waiter leaves the queue and hands the
        lead on if it held it."""
        start = trio.current_time()
        if self.is_open(start):
            return 0.0
        me = _Waiter(unit, next(self._order), until, max_wait)
        if start == self._closed_at and self.reset_at > self._before:
            # Arriving in the instant a 429 moved the reset: admitted under
            # the reset before it, it counts as arrived before it - and the
            # extension refuses it as it would a waiter already queued.
            past_until = self._refused(me, start)
            if past_until is not None:
                raise GateRefused(self.reset_at - start, past_until)
        self.waits += 1
        heapq.heappush(self._queue, me)
        try:
            while True:
                if me.refused:
                    raise GateRefused(me.left, me.past_until)
                if self._head() is me:
                    now = trio.current_time()
                    # The reset time may move on while we sleep: check again.
                    with trio.CancelScope() as me.sleep:
                        await trio.sleep_until(self._release_at(now, unit))
                    me.sleep = None
                    if me.refused:
                        raise GateRefused(me.left, me.past_until)
                    now = trio.current_time()
                    if self.is_open(now):
                        me.gone = True  # leaving; the finally hands the lead on
                        self._release_due(now)
                        return now - start
                else:
                    await me.lead.wait()
                    if me.released:
                        return trio.current_time() - start
                    me.lead = trio.Event()
        finally:
            # A waiter released by the head is already off the queue and
            # the head hands the lead on: waking the new head again would
            # only cost it a round.
            if not me.released:
                me.gone = True
                head = self._head()
                if head is not None:
                    head.lead.set()

    def release_at(self, now: float, unit: float = 0.0) -> float:
        """When a waiter of spread ``unit`` arriving at ``now`` would be
        released (``now`` itself while the gate is open)."""
        return now if self.is_open(now) else self._release_at(now, unit)

    def _release_at(self, now: float, unit: float) -> float:
        return on_grid(self.reset_for(now) + unit * self.spread, self.quantum)

    def _release_due(self, now: float) -> None:
        """Release, without a round each, every other waiter whose release
        point is ``now`` or earlier (they share a grid tick with the head;
        off the grid, points practically never tie).  The queue is in unit
        order and points grow with the unit, so they are at its front."""
        queue = self._queue
        while queue:
            waiter = queue[0]
            if not (waiter.gone or self._release_at(now, waiter.unit) <= now):
                return
            heapq.heappop(queue)
            if not waiter.gone:
                waiter.gone = waiter.released = True
                waiter.lead.set()

    def _head(self) -> _Waiter | None:
        queue = self._queue
        while queue and queue[0].gone:
            heapq.heappop(queue)
        return queue[0] if queue else None


class _Waiter:
    __slots__ = (
        "unit", "order", "until", "max_wait", "lead", "gone", "released", "refused", "past_until", "left", "sleep"
    )

    def __init__(self, unit: float, order: int, until: float = math.inf, max_wait: float = math.inf) -> None:
        self.unit = unit
        self.order = order
        self.until = until  # released at or after this, it is refused instead
        self.max_wait = max_wait  # the gate closed longer than this from a 429 on: refused
        self.lead = trio.Event()  # set: you are (or may be) the head now, or released
        self.gone = False  # off the queue, or to be dropped from it
        self.released = False  # let through by the head, in its step
        self.refused = False  # a later 429 moved the reset past its limits
        self.past_until = False  # (past ``until``; else past ``max_wait``)
        self.left = 0.0  # seconds to the reset, when refused
        self.sleep: trio.CancelScope | None = None  # the head's sleep, to wake it when refused

    def __lt__(self, other: _Waiter) -> bool:
        return (self.unit, self.order) < (other.unit, other.order)
