"""Sleeps that share a grid tick share one trio timer (actors._grid).

The soak's simulated calls end on a 1 s grid, about four to a tick; each
sleeping on its own timer cost a cancel scope per call (about fifty calls
to enter and leave).  These pin that they now share one, and that the
sharing changes nothing a sleeper can see: everyone wakes at the
deadline, not before, and cancellation works for leader and follower.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from actors import Latency, SimulatedProvider
from actors._grid import _SLEEPERS, sleep_until_shared
from messages import AgentKey, CompletionRequest


def _call(agent: str) -> CompletionRequest:
    return CompletionRequest(
        key=AgentKey(run_id="r", branch_id="b", stage="plan", agent=agent),
        attempt=1,
        spec_id="SPEC-1",
        provider="sim",
        model="m",
        prompt="p",
        response_fields=("stage", "agent", "plan"),
        decision_field="plan",
    )


async def test_simulated_calls_ending_on_one_tick_share_one_timer(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A latency whose every draw ends on the first tick (quantum 60 s).
    sim = SimulatedProvider(seed=1, disagreement_rate=0.0, latency=Latency(median=1.0, sigma=0.0, quantum=60.0))
    entered = 0
    enter = trio.CancelScope.__enter__

    def counting(self: trio.CancelScope) -> trio.CancelScope:
        nonlocal entered
        entered += 1
        return enter(self)

    ended: list[float] = []

    async def one(agent: str) -> None:
        await sim.complete(_call(agent))
        ended.append(trio.current_time())

    start = trio.current_time()
    monkeypatch.setattr(trio.CancelScope, "__enter__", counting)
    async with trio.open_nursery() as nursery:  # (its own scope: one entry)
        for i in range(8):
            nursery.start_soon(one, f"a{i}")
    monkeypatch.undo()
    assert ended == [start + 60.0] * 8
    # Was 9: a timer of its own for every call.
    assert entered == 2


async def _sleep_and_note(deadline: float, woke: dict[str, float], name: str, scope: trio.CancelScope) -> None:
    with scope:
        await sleep_until_shared(deadline)
        woke[name] = trio.current_time()
        return
    woke[name] = -trio.current_time()  # cancelled: a negative time says so


async def test_a_cancelled_leader_hands_the_timer_on(autojump_clock: trio.testing.MockClock) -> None:
    woke: dict[str, float] = {}
    scopes = {name: trio.CancelScope() for name in ("leader", "first", "second")}
    async with trio.open_nursery() as nursery:
        for name, scope in scopes.items():
            nursery.start_soon(_sleep_and_note, 10.0, woke, name, scope)
            await trio.testing.wait_all_tasks_blocked()  # in this order: the first to come leads
        await trio.sleep(3)
        scopes["leader"].cancel()
        await trio.sleep(2)
        scopes["second"].cancel()  # a follower, leading nothing: leaves alone
    assert woke == {"leader": -3.0, "second": -5.0, "first": 10.0}
    assert _SLEEPERS.get() == {}


async def test_sleepers_cancelled_together_leave_nothing_behind(autojump_clock: trio.testing.MockClock) -> None:
    woke: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(_sleep_and_note, 10.0, woke, str(i), trio.CancelScope())
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert woke == {}  # cancelled from outside their own scopes: none went on
    assert _SLEEPERS.get() == {}
    # and the deadline is free for the next sleeper
    await sleep_until_shared(10.0)
    assert trio.current_time() == 10.0


@pytest.mark.parametrize("late", [0.0, 4.0])
async def test_a_sleeper_joining_a_tick_wakes_with_it(autojump_clock: trio.testing.MockClock, late: float) -> None:
    woke: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sleep_and_note, 5.0, woke, "early", trio.CancelScope())
        await trio.sleep(late)
        nursery.start_soon(_sleep_and_note, 5.0, woke, "late", trio.CancelScope())
        # and one whose deadline has passed by the time it sleeps
        await trio.sleep(2.0)
        nursery.start_soon(_sleep_and_note, 1.0, woke, "past", trio.CancelScope())
    assert woke == {"early": 5.0, "late": 5.0, "past": late + 2.0}


def test_sleepers_are_kept_per_trio_run() -> None:
    # Two runs, one after the other, each with a sleeper on the same tick.
    for _ in range(2):
        seen: list[Any] = []

        async def main() -> None:
            await sleep_until_shared(7.0)
            seen.append(_SLEEPERS.get())

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        assert seen == [{}]


async def test_a_hand_over_is_protected_from_keyboard_interrupt(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C delivered between a cancelled leader's taking its heir off
    the list and waking it left the heir parked, and its abort then failed
    inside trio (TrioInternalError).  The hand-over runs protected, as
    trio's own primitives do, so the signal waits until it is done."""
    protected: list[bool] = []
    reschedule = trio.lowlevel.reschedule

    def watched(task: Any, *args: Any) -> None:
        protected.append(trio.lowlevel.currently_ki_protected())
        reschedule(task, *args)

    leader_scope = trio.CancelScope()

    async def leader() -> None:
        with leader_scope:
            await sleep_until_shared(5.0)

    async def follower() -> None:
        await sleep_until_shared(5.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leader)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(follower)
        await trio.testing.wait_all_tasks_blocked()
        monkeypatch.setattr(trio.lowlevel, "reschedule", watched)
        leader_scope.cancel()  # the follower inherits the lead, then the timer wakes it
    assert protected and all(protected), protected
    assert trio.current_time() == 5.0
