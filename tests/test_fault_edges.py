"""Edges of the fault interceptor, the rate-limit gate and the channel seam
that a mutation pass found unguarded: overlapping rate slices, count faults
that never fired going back to the budget, a cancelled timeout fault's
permit, the kind check of a budget restore, the gate's limit boundaries and
snapshot round trip, and the interceptor seam's answer watch."""

from __future__ import annotations

import collections
import math
import types
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from actors import RateLimitGate
from actors._ratelimit import GateRefused
from messages import (
    AgentKey,
    CompletionRequest,
    FaultInterceptor,
    FaultPlan,
    Undelivered,
    open_channel,
    reply_pair,
)
from messages._channel import FunctionInterceptor


def call(agent: str = "a", attempt: int = 1, *, stage: str = "plan", run: str = "r", spec: str = "SPEC-1",
         panel: tuple[str, ...] = ()) -> CompletionRequest:
    key = AgentKey(run_id=run, branch_id="b", stage=stage, agent=agent)
    return CompletionRequest(key=key, attempt=attempt, spec_id=spec, provider="p", model="m", prompt="x",
                             panel=panel or (agent,))


async def never(item: object) -> None:
    raise AssertionError("a placed fault is not forwarded")


class FakeHealth:
    """A HealthPort that records what the interceptor does with permits."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def admit(self, provider: str, request: CompletionRequest | None = None) -> tuple[Any, Any]:
        permit = object()
        self.calls.append(("admit", permit))
        return permit, None

    def report(self, permit: Any, error: Any) -> None:
        self.calls.append(("report", permit))

    def abandon(self, permit: Any) -> None:
        self.calls.append(("abandon", permit))


# -- the fault interceptor ---------------------------------------------------------


async def test_rate_slices_are_laid_end_to_end_not_overlapping() -> None:
    """'disconnect:10%,429:10%' means each kind 10% and 20% together: the
    slices are [0, .1) and [.1, .2).  Were the edge set to each rate instead
    of accumulated, both slices would be [0, .1): the 429 would never fire
    and the plan would inject half its faults."""
    faults = FaultInterceptor(FaultPlan.parse("disconnect:10%,429:10%"), seed=7)
    n = 6000
    kinds: collections.Counter[str] = collections.Counter()
    for i in range(n):
        decision = faults.decide(call(agent=f"agent{i}", spec=f"SPEC-{i % 13}", attempt=1 + i % 3))
        kinds[decision[0] if decision else "none"] += 1
    assert kinds["disconnect"] / n == pytest.approx(0.10, abs=0.02)
    assert kinds["rate_limit"] / n == pytest.approx(0.10, abs=0.02)
    assert (kinds["disconnect"] + kinds["rate_limit"]) / n == pytest.approx(0.20, abs=0.025)
    assert kinds["timeout"] == 0


async def test_a_queued_fault_whose_forward_is_cancelled_goes_back_to_the_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """On a queued gateway the fault is forwarded as an Injection; a send
    cancelled before the gateway took it sent nothing, so the count it
    placed must be unplaced: else the run silently loses a fault and the
    same call, sent again, is not faulted."""
    faults = FaultInterceptor(FaultPlan.parse("disconnect:1"))
    faults.attach(queued=True)
    before = faults.remaining("r")

    async def stuck(item: object) -> None:
        await trio.sleep_forever()

    reply, _pending = reply_pair("cancelled")
    with trio.move_on_after(1) as scope:
        await faults.send(attrs.evolve(call(), reply_to=reply), stuck)
    assert scope.cancelled_caught
    assert faults.remaining("r") == before == {"disconnect": 1, "rate_limit": 0, "timeout": 0}
    assert faults.decided["disconnect"] == 0

    got: list[CompletionRequest] = []

    async def take(item: CompletionRequest) -> None:
        got.append(item)

    reply, _pending = reply_pair("again")
    await faults.send(attrs.evolve(call(), reply_to=reply), take)
    [item] = got
    assert item.injection is not None, "the call sent again must still carry its fault"
    assert faults.remaining("r")["disconnect"] == 0


async def test_a_cancelled_timeout_fault_abandons_its_permit(autojump_clock: trio.testing.MockClock) -> None:
    """A timeout fault cancelled during its wait has no outcome to report,
    but its permit must be abandoned: a permit neither reported nor
    abandoned holds a breaker probe slot (or an in-flight count) for ever."""
    health = FakeHealth()
    faults = FaultInterceptor(FaultPlan.parse("timeout:1", timeout_ms=5000), health=health)
    reply, _pending = reply_pair("t")
    with trio.move_on_after(1) as scope:
        await faults.send(attrs.evolve(call(), reply_to=reply), never)
    assert scope.cancelled_caught
    [(admit, permit), *rest] = health.calls
    assert admit == "admit"
    assert rest == [("abandon", permit)], "the cancelled fault's permit must be abandoned, not reported or leaked"


async def test_restore_checks_the_kind_before_putting_a_fault_back_in_place() -> None:
    """A logged fault whose kind is not the one planned at its position (the
    plan changed since) takes the first free place of its own kind: it must
    not spend the other kind's count."""
    faults = FaultInterceptor(FaultPlan.parse("disconnect:1,timeout:1"))
    assert faults.restore("r", "b", stages=[("plan", ("a", "b"))], fired=[("plan", "a", 1, "timeout")])
    assert faults.remaining("r", "b") == {"disconnect": 1, "rate_limit": 0, "timeout": 0}
    # And the disconnect is still there to be placed, on the next stage's first call.
    decision = faults.decide(call(agent="a", stage="tasks", run="r"))
    assert decision is not None and decision[0] == "disconnect"


# -- the rate-limit gate -------------------------------------------------------


async def test_a_release_exactly_at_the_deadline_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    """A waiter is refused when a later 429 moves its release point *to* its
    deadline or past it (released at the deadline, its call has no time
    left): '>=', not '>'."""
    gate = RateLimitGate(spread=0.0)
    gate.close_until(10.0)
    await trio.sleep(0.5)
    outcome: list[object] = []

    async def waiter() -> None:
        try:
            outcome.append(await gate.wait(until=20.0))
        except GateRefused as refused:
            outcome.append(refused)
            outcome.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(0.5)
        gate.close_until(20.0)  # the release point becomes exactly the deadline
    refused, at = outcome
    assert isinstance(refused, GateRefused) and refused.past_until
    assert at == pytest.approx(1.0), "refused at once, not after waiting to its deadline"


async def test_a_wait_exactly_max_wait_long_is_waited(autojump_clock: trio.testing.MockClock) -> None:
    """The gate closed exactly ``max_wait`` more seconds is within the
    waiter's limit: it waits and passes, it is not refused."""
    gate = RateLimitGate(spread=0.0)
    gate.close_until(10.0)
    await trio.sleep(0.5)
    outcome: list[object] = []

    async def waiter() -> None:
        try:
            outcome.append(await gate.wait(max_wait=19.0))
        except GateRefused as refused:  # pragma: no cover - the bug
            outcome.append(refused)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(0.5)
        gate.close_until(20.0)  # at t=1: closed for exactly 19 s more
    assert outcome == [pytest.approx(19.5)]
    assert trio.current_time() == pytest.approx(20.0)


async def test_a_gate_snapshot_restores_to_the_same_instant_relations() -> None:
    """restore rebases every time on ``now``, the closing instant too: a
    caller in the restored 429's own instant passes (it was simultaneous
    with it), and the snapshot taken at the new ``now`` is the one saved."""
    gate = RateLimitGate(spread=0.0)
    gate.close_until(15.0, now=5.0)
    saved = gate.snapshot(5.0)
    assert saved is not None
    again = RateLimitGate(spread=0.0)
    again.restore(saved, 100.0)
    assert again.snapshot(100.0) == saved
    assert again.is_open(100.0), "a caller in the 429's own instant passes"
    assert not again.is_open(100.5) and again.is_open(110.0)


# -- the channel seam ----------------------------------------------------------


async def test_an_interceptor_answering_an_awaited_request_itself_is_no_swallow() -> None:
    """On an awaited edge, an interceptor may answer an agent's request on
    its reply outbox instead of forwarding it: the sender must not get
    Undelivered for an item that was answered."""
    replies, replies_rx = open_channel(1, name="replies")

    async def answer(item: Any, forward: Any) -> None:
        await item.reply_to.send("answered")

    tx, rx = open_channel(1, name="agent", interceptors=[FunctionInterceptor(answer)], awaited=True)
    await tx.send(types.SimpleNamespace(reply_to=replies))
    assert replies_rx.receive_nowait() == "answered"
    with pytest.raises(trio.WouldBlock):
        rx.receive_nowait()


async def test_sending_on_an_unrelated_outbox_is_not_an_answer(autojump_clock: trio.testing.MockClock) -> None:
    """Only a send on the item's *own* reply outbox counts as answering it:
    an interceptor that sends elsewhere and drops the item must make the
    sender fail with Undelivered, else its receiver waits for ever."""
    replies, replies_rx = open_channel(1, name="replies")
    elsewhere, elsewhere_rx = open_channel(1, name="elsewhere")

    async def drop(item: Any, forward: Any) -> None:
        await elsewhere.send("noise")

    tx, _rx = open_channel(1, name="agent", interceptors=[FunctionInterceptor(drop)], awaited=True)
    with trio.fail_after(5):
        with pytest.raises(Undelivered, match="neither forwarded nor answered"):
            await tx.send(types.SimpleNamespace(reply_to=replies))
    assert elsewhere_rx.receive_nowait() == "noise"
    with pytest.raises(trio.WouldBlock):
        replies_rx.receive_nowait()


async def test_send_eager_is_not_a_checkpoint_when_there_is_room() -> None:
    """send_eager puts the item in the buffer without a scheduling round:
    inside a cancelled scope it still delivers and does not raise (the hot
    paths using it rely on it not being a cancellation point)."""
    tx, rx = open_channel(1, name="eager")
    with trio.CancelScope() as scope:
        scope.cancel()
        await tx.send_eager("item")
    assert not scope.cancelled_caught
    assert rx.receive_nowait() == "item"
    assert math.isfinite(trio.current_time())


async def test_a_stage_of_a_count_plan_costs_no_memory_per_fault_in_the_budget() -> None:
    """Each stage of each run laid out every fault of the budget not yet
    placed: at the 1,000,000-per-kind cap a tuple of 3,000,000 per stage
    (a 4-run soak reached 545 MB), and the interceptor the whole sequence."""
    import tracemalloc

    plan = FaultPlan.parse("disconnect:1000000,429:1000000,timeout:1000000")
    tracemalloc.start()
    try:
        faults = FaultInterceptor(plan)
        got = [faults.decide(call(stage=f"s{i}", run=f"r{i % 2}")) for i in range(6)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [d[0] if d else None for d in got] == ["disconnect"] * 6
    assert peak < 200_000, f"{peak:,} bytes for six stages"
    assert faults.remaining("r0") == {"disconnect": 999_997, "rate_limit": 1_000_000, "timeout": 1_000_000}


@pytest.mark.parametrize("seed", range(40))
async def test_a_stage_places_as_laying_out_its_left_faults_did(seed: int) -> None:
    """The stage's faults, read lazily, are the budget's unplaced faults in
    order, as the tuple the stage used to build."""
    import random

    from messages._faults import _Bucket

    rng = random.Random(seed)
    size = rng.randint(0, 30)
    bucket = _Bucket(anchor=0.0, placed=set(rng.sample(range(size), rng.randint(0, size))))
    stage = bucket.begin_stage(("s",), ("a",), size)
    laid_out = [i for i in range(size) if i not in bucket.placed]
    assert [stage.left(p) for p in range(-1, size + 2)] == [None, *laid_out, *[None] * (size + 2 - len(laid_out))]
