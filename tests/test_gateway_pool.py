"""The gateway's per-provider worker pools: the concurrency limit holds,
queued calls are served in arrival order, one provider's queue never delays
another's calls, and a stopped gateway fails what it still holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from actors import Gateway, MockProvider
from messages import (
    ActorStopped,
    AgentKey,
    BadRequest,
    Completion,
    CompletionRequest,
    CompletionResult,
    PersistEvent,
    StoreWrite,
    TokenUsage,
    open_channel,
    reply_pair,
)


def call(agent: str, provider: str = "slow") -> CompletionRequest:
    key = AgentKey(run_id="r", branch_id="b", stage="plan", agent=agent)
    return CompletionRequest(key=key, attempt=1, spec_id="S", provider=provider, model="m", prompt="x", panel=(agent,))


class Recorder:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.in_flight = 0
        self.peak = 0
        self.started: list[tuple[str, float]] = []

    async def __call__(self, request: CompletionRequest) -> Completion:
        self.started.append((request.key.agent, trio.current_time()))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await trio.sleep(self.seconds)
        finally:
            self.in_flight -= 1
        return Completion(content="{}", usage=TokenUsage.of(input_tokens=1), model="m")


async def ask(tx: object, request: CompletionRequest, into: dict[str, object]) -> None:
    reply, pending = reply_pair("test")
    await tx.send(attrs.evolve(request, reply_to=reply))  # type: ignore[attr-defined]
    try:
        into[request.key.agent] = (await pending.receive(), trio.current_time())
    except ActorStopped as exc:
        into[request.key.agent] = exc


async def test_limit_holds_and_queue_is_fifo(autojump_clock: trio.testing.MockClock) -> None:
    slow, fast = Recorder(10.0), Recorder(1.0)
    gateway = Gateway(
        {"slow": MockProvider(slow, name="slow"), "fast": MockProvider(fast, name="fast")}, max_concurrency=3
    )
    tx, rx = open_channel(64, name="gateway")
    results: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.run, rx)
        async with trio.open_nursery() as callers:
            for i in range(10):
                callers.start_soon(ask, tx, call(f"s{i}"), results)
                await trio.sleep(0.001)  # a known arrival order
            callers.start_soon(ask, tx, call("f0", provider="fast"), results)
        tx.close()  # the gateway then finishes and its workers leave
    assert slow.peak == 3, "never more than max_concurrency calls in flight per provider"
    assert [agent for agent, _ in slow.started] == [f"s{i}" for i in range(10)], "served in arrival order"
    assert len(results) == 11 and all(isinstance(r, tuple) for r in results.values())
    # Ten 10 s calls, three at a time: four waves.
    finished = max(at for result, at in results.values() if isinstance(result, CompletionResult))  # type: ignore[misc]
    assert finished == pytest.approx(40.0, abs=0.1)
    # The fast provider's call is not queued behind the slow provider's.
    _, fast_done = results["f0"]  # type: ignore[misc]
    assert fast_done == pytest.approx(1.0, abs=0.1)


async def test_unknown_provider_is_a_bad_request(autojump_clock: trio.testing.MockClock) -> None:
    gateway = Gateway({"slow": MockProvider(Recorder(1.0), name="slow")})
    tx, rx = open_channel(4, name="gateway")
    results: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.run, rx)
        await ask(tx, call("x", provider="nope"), results)
        tx.close()
    result, _ = results["x"]  # type: ignore[misc]
    assert isinstance(result.error, BadRequest) and "nope" in str(result.error)


async def test_cancelled_gateway_fails_calls_in_flight_and_queued(autojump_clock: trio.testing.MockClock) -> None:
    slow = Recorder(100.0)
    gateway = Gateway({"slow": MockProvider(slow, name="slow")}, max_concurrency=2)
    tx, rx = open_channel(64, name="gateway")
    results: dict[str, object] = {}
    with trio.fail_after(500):  # a caller left waiting would hang the test
        await _cancel_with_calls_queued(gateway, rx, tx, results)
    assert len(slow.started) == 2
    assert sorted(results) == [f"s{i}" for i in range(5)]
    assert all(isinstance(r, ActorStopped) for r in results.values()), results


async def _cancel_with_calls_queued(
    gateway: Gateway, rx: trio.MemoryReceiveChannel[CompletionRequest], tx: object, results: dict[str, object]
) -> None:
    async with trio.open_nursery() as callers:
        async with trio.open_nursery() as served:
            served.start_soon(gateway.run, rx)
            for i in range(5):
                callers.start_soon(ask, tx, call(f"s{i}"), results)
            await trio.sleep(5)
            served.cancel_scope.cancel()  # two calls in flight, three queued


async def _ask_with_timeout(tx: object, request: CompletionRequest, timeout: float, into: dict[str, object]) -> None:
    reply, pending = reply_pair("test")
    await tx.send(attrs.evolve(request, reply_to=reply))  # type: ignore[attr-defined]
    with trio.move_on_after(timeout):
        into[request.key.agent] = await pending.receive()
        return
    into[request.key.agent] = "gave up"


async def test_a_queued_call_whose_caller_gave_up_is_never_made(autojump_clock: trio.testing.MockClock) -> None:
    """An agent's call timeout leaves its request queued; making it later
    would buy an answer nobody reads (the agent has retried or failed)."""
    slow = Recorder(10.0)
    events, logged = open_channel(8, name="store")
    gateway = Gateway({"slow": MockProvider(slow, name="slow")}, max_concurrency=1, events=events)
    tx, rx = open_channel(8, name="gateway")
    results: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.run, rx)
        async with trio.open_nursery() as callers:
            callers.start_soon(ask, tx, call("busy"), results)
            await trio.sleep(0.001)
            callers.start_soon(_ask_with_timeout, tx, call("impatient"), 1.0, results)
            await trio.sleep(0.001)
            callers.start_soon(ask, tx, call("patient"), results)
        tx.close()
    assert results["impatient"] == "gave up"
    assert [agent for agent, _ in slow.started] == ["busy", "patient"], "the abandoned call was not made"
    assert gateway.abandoned == 1
    [dropped] = _drain(logged)
    assert isinstance(dropped, PersistEvent) and (dropped.kind, dropped.agent) == ("call_dropped", "impatient")
    _, patient_done = results["patient"]  # type: ignore[misc]
    assert patient_done == pytest.approx(20.0, abs=0.1), "and it did not hold up the queue"


async def test_a_call_given_up_at_the_rate_limit_gate_is_never_made(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fast = Recorder(1.0)
    events, logged = open_channel(8, name="store")
    gateway = Gateway({"p": MockProvider(fast, name="p")}, events=events)
    gateway.health["p"].gate.close_until(trio.current_time() + 60.0)  # a 429's reset hint
    tx, rx = open_channel(8, name="gateway")
    results: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.run, rx)
        await trio.sleep(0.001)  # the gate holds callers arriving after the 429
        await _ask_with_timeout(tx, call("a", provider="p"), 30.0, results)
        await ask(tx, call("b", provider="p"), results)
        tx.close()
    assert results["a"] == "gave up"
    assert [agent for agent, _ in fast.started] == ["b"]
    assert gateway.abandoned == 1
    # b waited at the gate too, and then was made: its wait is logged.
    assert sorted((e.kind, e.agent) for e in _drain(logged)) == [("call_dropped", "a"), ("gate_wait", "b")]  # type: ignore[union-attr]


def _drain(rx: trio.MemoryReceiveChannel[StoreWrite]) -> list[StoreWrite]:
    items = []
    while True:
        try:
            items.append(rx.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return items


async def test_the_event_log_counts_only_calls_made(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """agent_call events less call_dropped events are the calls a provider
    received: one call at a time, 10 s each, against a 5 s call timeout,
    so callers give up both in flight (made) and in the queue (dropped)."""
    from actors import Latency, Limits, RetryPolicy, SimulatedProvider, open_orchestrator, pipeline_with_panel
    from store import Store

    sim = SimulatedProvider(seed=1, latency=Latency(median=10.0, sigma=0.0))
    async with open_orchestrator(
        store=str(tmp_path / "c.db"),
        provider=sim,
        pipeline=pipeline_with_panel("validate", ["a", "b", "c"]),
        retry=RetryPolicy(max_attempts=2, call_timeout=5.0),
        limits=Limits(max_concurrency=1),
    ) as orch:
        result = await orch.run("SPEC-DROP")
    assert not result.completed
    with Store.open(str(tmp_path / "c.db"), readonly=True) as store:
        called = len(store.events(result.run_id, "agent_call"))
        dropped = len(store.events(result.run_id, "call_dropped"))
    assert called == 6 and dropped > 0, (called, dropped)  # 3 agents x 2 attempts
    assert called - dropped == sim.calls


async def test_calls_queued_when_the_orchestrator_is_cancelled_are_logged_unmade(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """They were logged as agent_call events on their way in and never
    reached the provider, but nothing said so: an interrupted run's log
    counted four calls more than the provider received."""
    from actors import Limits, open_orchestrator, pipeline_with_panel
    from store import Store

    made: list[str] = []

    async def never(request: CompletionRequest) -> Any:
        made.append(request.key.agent)
        await trio.sleep_forever()

    with trio.CancelScope() as scope:
        async with open_orchestrator(
            store=str(tmp_path / "c.db"),
            provider=MockProvider(never, name="sim"),
            pipeline=pipeline_with_panel("validate", ["a", "b", "c", "d", "e"]),
            limits=Limits(max_concurrency=1),
        ) as orch:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(orch.run, "SPEC-CUT")
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
    assert len(made) == 1  # max_concurrency=1: one call in flight, four queued
    with Store.open(str(tmp_path / "c.db"), readonly=True) as store:
        [run] = store.list_runs()
        called = store.events(run.run_id, "agent_call")
        dropped = store.events(run.run_id, "call_dropped")
    assert len(called) == 5
    assert sorted(e.agent for e in dropped) == sorted({"a", "b", "c", "d", "e"} - set(made))
    assert {e.detail["reason"] for e in dropped} == {"the gateway stopped before making it"}
    assert len(called) - len(dropped) == len(made)


async def test_calls_waiting_at_the_rate_limit_gate_when_cancelled_are_logged_unmade(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Parked at a closed gate, they never left the process, but an
    interrupted run logged no call_dropped for them: `metrics` counted them
    as cut off while a provider worked on them, cost unknown."""
    from actors import HealthRegistry, open_orchestrator, pipeline_with_panel
    from store import Store

    made: list[str] = []

    async def answer(request: CompletionRequest) -> Any:
        made.append(request.key.agent)
        await trio.sleep_forever()

    health = HealthRegistry()
    health["sim"].gate.close_until(trio.current_time() + 300.0, trio.current_time() - 1.0)
    with trio.CancelScope() as scope:
        async with open_orchestrator(
            store=str(tmp_path / "g.db"),
            provider=MockProvider(answer, name="sim"),
            pipeline=pipeline_with_panel("validate", ["a", "b", "c"]),
            health=health,
        ) as orch:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(orch.run, "SPEC-GATE")
                await trio.sleep(10.0)  # all three parked at the gate
                scope.cancel()
    assert made == []
    with Store.open(str(tmp_path / "g.db"), readonly=True) as store:
        [run] = store.list_runs()
        called = store.events(run.run_id, "agent_call")
        dropped = store.events(run.run_id, "call_dropped")
    assert len(called) == 3
    assert sorted(e.agent for e in dropped) == ["a", "b", "c"]
    assert {e.detail["reason"] for e in dropped} == {"the gateway stopped before making it"}
