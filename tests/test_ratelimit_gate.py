"""The rate-limit gate's waiting: release times follow the reset time and
each waiter's unit, and a 429 that pushes the reset out wakes only the head
of the queue, not every waiter."""

from __future__ import annotations

import math
import re

import pytest
import trio
import trio.testing

from actors import RateLimitGate


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The deadline of every trio.sleep_until call the gate makes."""
    deadlines: list[float] = []
    real_sleep_until = trio.sleep_until

    async def counting_sleep_until(deadline: float) -> None:
        deadlines.append(deadline)
        await real_sleep_until(deadline)

    monkeypatch.setattr(trio, "sleep_until", counting_sleep_until)
    return deadlines


async def test_release_order_and_cost_under_repeated_extensions(
    autojump_clock: trio.testing.MockClock, sleeps: list[float]
) -> None:
    gate = RateLimitGate(spread=1.0)
    gate.close_until(10.0)
    await trio.sleep(0.5)  # callers in the 429's own instant would pass
    released: dict[int, float] = {}
    waiters = 200
    # Units in [0.1, 1): every waiter is due after the 429s below.
    units = {i: 0.1 + 0.9 * (i * 7919 % waiters) / waiters for i in range(waiters)}

    async def waiter(i: int) -> None:
        await gate.wait(units[i])
        released[i] = trio.current_time()

    async with trio.open_nursery() as nursery:
        for i in range(waiters):
            nursery.start_soon(waiter, i)
        # Fifty more 429s, each just after the reset time, each pushing it
        # out again: every waiter's own deadline passes once per 429.
        for _ in range(50):
            await trio.sleep_until(gate.reset_at + 0.05)
            gate.close_until(trio.current_time() + 1.0)
        final_reset = gate.reset_at
    assert final_reset == pytest.approx(10.0 + 50 * 1.05)
    assert sorted(released, key=lambda i: released[i]) == sorted(units, key=lambda i: units[i])
    for i, at in released.items():
        assert at == pytest.approx(final_reset + units[i]), (i, at)
    assert gate.waits == waiters
    # One sleep per waiter plus a few per 429, not waiters x 429s (the
    # gate that let every waiter sleep on its own made about 10,000 here).
    assert len(sleeps) <= 2 * waiters + 2 * 50, len(sleeps)


async def test_a_cancelled_head_hands_the_lead_on(autojump_clock: trio.testing.MockClock) -> None:
    gate = RateLimitGate(spread=1.0)
    gate.close_until(5.0)
    await trio.sleep(0.5)
    released: dict[str, float] = {}

    async def waiter(name: str, unit: float) -> None:
        await gate.wait(unit)
        released[name] = trio.current_time()

    head_scope = trio.CancelScope()

    async def cancellable_head() -> None:
        with head_scope:
            await waiter("head", 0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancellable_head)
        nursery.start_soon(waiter, "next", 0.2)
        await trio.sleep(1.0)
        head_scope.cancel()
    assert released == {"next": pytest.approx(5.2)}


async def test_on_a_grid_the_head_releases_a_whole_tick_in_one_step(
    autojump_clock: trio.testing.MockClock, sleeps: list[float]
) -> None:
    gate = RateLimitGate(spread=1.0, quantum=0.5)
    gate.close_until(10.0)
    await trio.sleep(0.5)
    waiters = 100
    units = {i: (i * 37 % waiters) / waiters for i in range(waiters)}  # 0.00 .. 0.99
    released: dict[int, float] = {}
    late = trio.CancelScope()

    async def waiter(i: int) -> None:
        with late if i == 1 else trio.CancelScope():
            await gate.wait(units[i])
            released[i] = trio.current_time()

    with trio.fail_after(1_000):  # a waiter left unwoken fails, not hangs
        async with trio.open_nursery() as nursery:
            # In unit order, so the first stays the head: a later arrival
            # that sorts first would sleep as head too (trio shuffles start
            # order).
            for i in sorted(units, key=units.__getitem__):
                nursery.start_soon(waiter, i)
                await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(5.0)
            late.cancel()  # a waiter that gives up leaves the others' ticks alone
    assert set(released) == set(units) - {1}
    for i, at in released.items():
        # The first tick of the grid at or after its point, never before it.
        assert at >= 10.0 + units[i] and at - (10.0 + units[i]) < 0.5, (i, at)
        assert at in (10.0, 10.5, 11.0), (i, at)
    # One sleep per tick, not one per waiter: the head lets the whole tick
    # through in its own step.
    assert sorted(set(sleeps)) == [10.0, 10.5, 11.0] and len(sleeps) == 3, sleeps


def test_gate_quantum_is_checked() -> None:
    with pytest.raises(ValueError, match="gate quantum.*-1"):
        RateLimitGate(quantum=-1.0)


@pytest.mark.parametrize("quantum", [0.0, 0.25, 1.0])
def test_random_arrivals_cancellations_and_429s_never_release_early(quantum: float) -> None:
    """Whatever the interleaving of arrivals, 429s and waiters giving up:
    every waiter that stays is released, on the grid, with the gate open,
    and never before the reset in force when it arrived plus its spread."""
    import random

    for scenario in range(60):
        rng = random.Random(scenario)
        released: dict[int, float] = {}
        floors: dict[int, float] = {}
        cancelled: set[int] = set()
        gate = RateLimitGate(spread=1.0, quantum=quantum)

        async def waiter(i: int, unit: float, arrive: float, give_up: float) -> None:
            await trio.sleep(arrive)
            now = trio.current_time()
            floors[i] = now if gate.is_open(now) else gate.reset_for(now) + unit * gate.spread
            with trio.move_on_after(give_up) as scope:
                await gate.wait(unit)
                released[i] = trio.current_time()
                assert gate.is_open(released[i])
            if scope.cancelled_caught:
                cancelled.add(i)

        async def extender() -> None:
            for _ in range(rng.randrange(4)):
                await trio.sleep(rng.random() * 6)
                gate.close_until(trio.current_time() + rng.random() * 4)

        async def main() -> None:
            gate.close_until(5.0 + rng.random() * 5)
            # A waiter nobody wakes would hang: on the virtual clock this
            # deadline comes at once and fails the test instead.
            with trio.fail_after(10_000):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(extender)
                    for i in range(30):
                        give_up = rng.random() * 10 if rng.random() < 0.3 else math.inf
                        nursery.start_soon(waiter, i, rng.random(), rng.random() * 12, give_up)

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        assert set(released) | cancelled == set(range(30)), scenario
        for i, at in released.items():
            assert at >= floors[i] - 1e-9, (scenario, i, at, floors[i])
            if quantum and at > floors[i]:  # it waited: released on a tick
                assert abs(at / quantum - round(at / quantum)) < 1e-9, (scenario, i, at)


async def test_a_waiter_is_refused_when_a_later_429_moves_its_release_past_its_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Parked at the gate with a call timeout to keep, a waiter was not
    looked at again when a later 429 pushed the reset past it: it waited
    out its whole timeout at the gate (an attempt lost), and was refused
    on its retry.  It now leaves at the 429's instant, saying how long the
    gate stays closed; the others (the head included) are unaffected."""
    from actors._ratelimit import GateRefused

    gate = RateLimitGate(spread=1.0)
    gate.close_until(10.0)
    await trio.sleep(0.5)  # (a caller in the 429's own instant passes)
    outcome: dict[str, object] = {}

    async def waiter(name: str, unit: float, until: float) -> None:
        try:
            await gate.wait(unit, until)
            outcome[name] = ("released", trio.current_time())
        except GateRefused as refused:
            outcome[name] = ("refused", trio.current_time(), refused.left)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, "head", 0.1, 50.0)  # the head: asleep on the old reset
        nursery.start_soon(waiter, "short", 0.2, 30.0)
        nursery.start_soon(waiter, "long", 0.3, math.inf)
        await trio.sleep(3.0)
        gate.close_until(40.0)  # past 30 for "short", not 50 for "head"
        await trio.sleep(1.0)
        assert outcome == {"short": ("refused", 3.5, 36.5)}
        gate.close_until(60.0)  # now past the head's limit too
    assert outcome["head"] == ("refused", 4.5, 55.5)
    assert outcome["long"] == ("released", pytest.approx(60.3))


async def test_admit_refuses_a_parked_call_past_its_deadline_at_once(autojump_clock: trio.testing.MockClock) -> None:
    import attrs

    from actors import HealthRegistry
    from messages import RateLimited

    from ._providers_support import make_request

    health = HealthRegistry()["p"]
    health.gate.close_until(10.0)
    await trio.sleep(0.5)
    request = attrs.evolve(make_request(), provider="p", deadline=100.0)
    result: list[object] = []

    async def call() -> None:
        result.append(await health.admit(request))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await trio.sleep(2.0)
        health.gate.close_until(300.0)
    [(permit, error)] = result
    assert permit is None and isinstance(error, RateLimited)
    assert error.retry_after == pytest.approx(297.5) and trio.current_time() == pytest.approx(2.5)
    assert "past the 98s this call has left" in str(error)


def _race(
    waiter_at: float, unit: float, until: float, max_wait: float, close_at: float, *resets: float
) -> set[tuple[object, ...]]:
    """A waiter and a 429 (one per reset, all at ``close_at``) in trio's
    (randomised) order, 40 times over: the set of outcomes.  The gate is
    closed until 10 from t=0.5."""
    from actors._ratelimit import GateRefused

    outcomes: set[tuple[object, ...]] = set()
    for _ in range(40):
        got: list[tuple[object, ...]] = []

        async def main() -> None:
            gate = RateLimitGate(spread=1.0)
            gate.close_until(10.0)
            await trio.sleep(0.5)

            async def waiter() -> None:
                await trio.sleep_until(waiter_at)
                try:
                    await gate.wait(unit, until, max_wait)
                    got.append(("released", trio.current_time()))
                except GateRefused as refused:
                    got.append(("refused", trio.current_time(), refused.left))

            async def reporter(reset: float) -> None:
                await trio.sleep_until(close_at)
                gate.close_until(reset)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                for reset in resets:
                    nursery.start_soon(reporter, reset)

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        outcomes.add(got[0])
    return outcomes


def test_refusals_do_not_depend_on_trios_order_within_an_instant() -> None:
    """A reviewer's races, each decided by trio's batch order: a head due
    in the 429's own instant was refused or released at random; a waiter
    arriving in that instant was refused or released past its limit; and a
    wait within max_wait was refused by any extension at all (the spread
    counted against it, as it is not on arrival)."""
    # Due at 10, the 429 at 10: released (the 429 is not before it).
    assert _race(1.0, 0.0, 15.0, math.inf, 10.0, 20.0) == {("released", 10.0)}
    # Arriving at 3 with the 429 at 3: counts as arrived before it, refused.
    assert _race(3.0, 0.2, 30.0, math.inf, 3.0, 40.0) == {("refused", 3.0, 37.0)}
    # Within max_wait (10) before and after a 10 ms extension: released.
    [(kind, at)] = _race(1.0, 0.9, math.inf, 10.0, 2.0, 10.01)
    assert kind == "released" and at == pytest.approx(10.9)  # (asleep on 10.9, past the new reset)
    # An extension past max_wait from its instant: refused.
    assert _race(1.0, 0.9, math.inf, 10.0, 2.0, 12.5) == {("refused", 2.0, 10.5)}


def test_two_429s_in_one_instant_refuse_as_one_would() -> None:
    """The waiter due at 10 is released whichever of two 429s at 10 comes
    first: each is measured against the reset before the instant."""
    assert _race(1.0, 0.0, 15.0, math.inf, 10.0, 12.0, 20.0) == {("released", 10.0)}


@pytest.mark.parametrize("spread", [math.nan, math.inf, -1.0])
def test_a_spread_that_is_not_a_finite_number_of_seconds_is_refused_naming_it(spread: float) -> None:
    # NaN and inf were accepted: NaN release points, or waiters never released.
    with pytest.raises(ValueError, match=re.escape(f"gate spread must be a finite number of seconds >= 0, got {spread!r}")):
        RateLimitGate(spread=spread)


def test_a_spread_that_is_not_a_number_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="gate spread must be a number of seconds, got True"):
        RateLimitGate(spread=True)
