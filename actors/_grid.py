"""A timing grid for simulated time.

Under ``MockClock(autojump_threshold=0)`` every distinct deadline is at
least one trip round trio's run loop, plus the chain of hops it wakes.
Deadlines moved onto a grid share ticks, so what ends in the same tick
wakes together (and, through :func:`sleep_until_shared`, on one timer).  Used only where the exact instant carries no meaning
(simulated latency, a soak's backoff and rate-limit releases), and always
rounding *up*: nothing on the grid happens earlier than it would off it.
"""

from __future__ import annotations

import math

import trio


def on_grid(t: float, quantum: float) -> float:
    """``t`` itself when ``quantum`` is 0; otherwise the first whole
    multiple of ``quantum`` at or after ``t`` (never earlier than ``t``,
    whatever the float rounding)."""
    if quantum <= 0:
        return t
    tick = math.ceil(t / quantum) * quantum
    return tick if tick >= t else tick + quantum


# Per trio run, the tasks asleep until each deadline: {deadline: {task:
# its lead flag}} (the leader, asleep on the timer, is not among them).
_SLEEPERS: trio.lowlevel.RunVar[dict[float, dict[trio.lowlevel.Task, list[bool]]]] = trio.lowlevel.RunVar(
    "conclave_shared_sleepers"
)


# Protected from KeyboardInterrupt, as trio's own primitives are: raised
# between a hand-over's pop and its reschedule it left the heir parked and
# off the list, and its abort then failed inside trio (TrioInternalError).
@trio.lowlevel.enable_ki_protection
async def sleep_until_shared(deadline: float) -> None:
    """``trio.sleep_until(deadline)`` for deadlines many tasks share (the
    ticks of a grid): one trio timer per distinct deadline instead of one
    per sleeper.  A timer is a cancel scope, about fifty calls to enter and
    leave, and a soak's simulated calls end four to a tick.

    The first task to sleep until a deadline leads: it sleeps on the timer
    and, at the deadline, wakes the others, who wait parked without one
    (they run one batch later, in the same instant).  Cancellable like
    ``trio.sleep_until``: a cancelled follower leaves quietly; a leader
    cancelled before the deadline hands the lead (and the timer) on to the
    follower that came first."""
    try:
        sleepers = _SLEEPERS.get()
    except LookupError:  # this run's first
        sleepers = {}
        _SLEEPERS.set(sleepers)
    followers = sleepers.get(deadline)
    if followers is None:
        followers = sleepers[deadline] = {}
    else:
        task = trio.lowlevel.current_task()
        lead = followers[task] = [False]

        def abort(_: object) -> trio.lowlevel.Abort:
            followers.pop(task, None)  # (a task woken is off the list: never aborted)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if not lead[0]:
            return
    try:
        await trio.sleep_until(deadline)
    finally:
        if followers and trio.current_time() < deadline:
            # Cancelled early: the first in line sleeps on for the rest.
            heir = next(iter(followers))
            followers.pop(heir)[0] = True
            trio.lowlevel.reschedule(heir)
        else:
            del sleepers[deadline]
            for task in followers:
                trio.lowlevel.reschedule(task)
