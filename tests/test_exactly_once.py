"""Exactly one decision per (run, branch, stage), whatever arrives.

Duplicates, late replies and out-of-order completions are produced with the
interceptor seam on the real channels of a real run; the coordinator's exit
paths are driven one by one against a real store writer and SQLite file.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from actors import (
    AlreadyDecided,
    Coordinator,
    DecisionNotDurable,
    Latency,
    MockProvider,
    RunContext,
    SimulatedProvider,
    StoreWriter,
    compute_verdict,
    default_pipeline,
    open_orchestrator,
)
from messages import (
    AgentKey,
    AgentOutput,
    AgentReply,
    Completion,
    CompletionRequest,
    Forward,
    FunctionInterceptor,
    PersistDecision,
    PersistRun,
    StageKey,
    StoreAck,
    StoreWrite,
    open_channel,
    reply_pair,
)
from store import Store


def decision_counts(path: str, run_id: str) -> dict[str, int]:
    with Store.open(path) as s:
        rows = s._conn.execute(
            "SELECT stage, COUNT(*) FROM decisions WHERE run_id = ? GROUP BY stage", (run_id,)
        ).fetchall()
    return {str(r[0]): int(r[1]) for r in rows}


async def baseline_digest(tmp_path: Any) -> str:
    async with open_orchestrator(store=str(tmp_path / "base.db"), seed=7) as orch:
        return (await orch.run("SPEC-X")).digest


async def test_duplicate_replies_are_dropped(tmp_path: Any, autojump_clock: trio.testing.MockClock) -> None:
    async def twice(reply: AgentReply, forward: Forward[AgentReply]) -> None:
        await forward(reply)
        await forward(reply)

    path = str(tmp_path / "dup.db")
    async with open_orchestrator(
        store=path, seed=7, interceptors={"coordinator": [FunctionInterceptor(twice)]}
    ) as orch:
        result = await orch.run("SPEC-X", run_id="dup")
    assert result.completed
    assert decision_counts(path, "dup") == {s: 1 for s in default_pipeline().stage_names}
    assert result.digest == await baseline_digest(tmp_path)


async def test_late_reply_after_the_decision_is_ignored(tmp_path: Any, autojump_clock: trio.testing.MockClock) -> None:
    held: list[AgentReply] = []
    replayed: list[str] = []

    async def late(reply: AgentReply, forward: Forward[AgentReply]) -> None:
        if reply.key.stage == "plan" and not held:
            held.append(reply)  # remember a plan reply...
        elif reply.key.stage == "implement" and held:
            stale = held.pop()
            replayed.append(stale.key.stage)
            await forward(stale)  # ...and deliver it again, stages later
        await forward(reply)

    path = str(tmp_path / "late.db")
    async with open_orchestrator(
        store=path, seed=7, interceptors={"coordinator": [FunctionInterceptor(late)]}
    ) as orch:
        result = await orch.run("SPEC-X", run_id="late")
    assert replayed == ["plan"]
    assert result.completed
    assert decision_counts(path, "late") == {s: 1 for s in default_pipeline().stage_names}
    assert result.digest == await baseline_digest(tmp_path)


async def test_out_of_order_completions_give_the_same_decisions(
    tmp_path: Any, autojump_clock: trio.testing.MockClock
) -> None:
    sim = SimulatedProvider(seed=7, latency=Latency(median=0))
    order = {"gemini": 30.0, "claude": 20.0, "gpt_pro": 10.0, "gpt_codex": 5.0}
    finished: list[str] = []

    async def reversed_latency(request: CompletionRequest) -> Completion:
        await trio.sleep(order[request.key.agent])  # the last agent finishes first
        finished.append(f"{request.key.stage}:{request.key.agent}")
        return sim.answer(request)

    path = str(tmp_path / "ooo.db")
    async with open_orchestrator(store=path, provider=MockProvider(reversed_latency, name="sim"), seed=7) as orch:
        result = await orch.run("SPEC-X", run_id="ooo")
    assert finished[-3:] == ["unlock:gpt_pro", "unlock:claude", "unlock:gemini"]
    assert decision_counts(path, "ooo") == {s: 1 for s in default_pipeline().stage_names}
    assert result.digest == await baseline_digest(tmp_path)


# -- the coordinator's exit paths, one by one ---------------------------------

STAGES = default_pipeline()


@asynccontextmanager
async def coordinator_with_store(
    path: str, store_interceptor: Callable[[StoreWrite, Forward[StoreWrite]], Any] | None = None
) -> AsyncIterator[Coordinator]:
    store = Store.open(path)
    writer = StoreWriter(store)
    interceptors = [FunctionInterceptor(store_interceptor)] if store_interceptor else []
    store_tx, store_rx = open_channel(64, name="store", interceptors=interceptors)
    replies_tx, replies_rx = open_channel(8, name="coordinator")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, store_rx)
        reply, pending = reply_pair("run")
        await store_tx.send(
            PersistRun(run_id="r", branch_id="b", spec_id="S", goal="", seed=0, pipeline="{}", reply_to=reply)
        )
        assert (await pending.receive()).ok
        yield Coordinator(
            ctx=RunContext(run_id="r", branch_id="b", spec_id="S", goal=""),
            agents={},
            replies_to=replies_tx,
            replies=replies_rx,
            store=store_tx,
        )
        store_tx.close()
    store.close()


def verdict_for(stage: str, agree: bool = True) -> Any:
    spec = STAGES.stage(stage)
    outputs = {}
    for i, agent in enumerate(spec.agents):
        body = {f: "x" for f in spec.required_fields}
        body[spec.decision_field] = "same" if agree else f"own-{i}"
        outputs[agent] = AgentOutput(
            key=AgentKey(run_id="r", branch_id="b", stage=stage, agent=agent),
            attempt=1,
            status="accepted",
            content=json.dumps(body),
            format="json",
            usage=None,
            model="m",
            provider="sim",
        )
    return compute_verdict(spec, outputs)


def key(stage: str) -> StageKey:
    return StageKey(run_id="r", branch_id="b", stage=stage)


async def test_every_exit_path_of_decide_leaves_the_next_stage_decidable(
    tmp_path: Any, autojump_clock: trio.testing.MockClock
) -> None:
    path = str(tmp_path / "paths.db")
    mode: dict[str, Any] = {"refuse": False, "hang": False, "cancel": None}

    async def store_gate(item: StoreWrite, forward: Forward[StoreWrite]) -> None:
        if isinstance(item, PersistDecision):
            if mode["refuse"]:
                assert item.reply_to is not None
                item.reply_to.send(StoreAck(ok=False, error="disk full (injected)"))
                return
            if mode["hang"]:
                await trio.sleep_forever()  # cancelled before anything is sent
        await forward(item)
        if isinstance(item, PersistDecision) and mode["cancel"] is not None:
            mode["cancel"].cancel()  # the store has it; cancel before the ack

    async with coordinator_with_store(path, store_gate) as coord:
        # 1. success (ok -> advance)
        d = await coord.decide(key("plan"), verdict_for("plan"))
        assert (d.seq, d.status) == (1, "ok")
        # 2. success that halts (conflict)
        d = await coord.decide(key("tasks"), verdict_for("tasks", agree=False))
        assert (d.seq, d.status) == (2, "conflict")
        # 3. duplicate: the same key again is refused by identity
        with pytest.raises(AlreadyDecided):
            await coord.decide(key("plan"), verdict_for("plan"))
        # 4. error: the store refuses the write
        mode["refuse"] = True
        with pytest.raises(DecisionNotDurable, match="disk full"):
            await coord.decide(key("implement"), verdict_for("implement"))
        mode["refuse"] = False
        assert coord.sequencer.pending_seq is None
        # 5. cancelled before the store saw anything
        mode["hang"] = True
        with trio.move_on_after(5):
            await coord.decide(key("implement"), verdict_for("implement"))
        mode["hang"] = False
        assert coord.sequencer.pending_seq is None
        # 6. cancelled after the store got the decision, before the ack
        with trio.CancelScope() as scope:
            mode["cancel"] = scope
            await coord.decide(key("implement"), verdict_for("implement"))
        mode["cancel"] = None
        assert scope.cancelled_caught
        assert coord.sequencer.pending_seq is None
        # The retry recognises its own durable decision instead of writing twice.
        d = await coord.decide(key("implement"), verdict_for("implement"))
        assert (d.seq, d.status) == (3, "ok")
        # And the next stage can still be decided.
        d = await coord.decide(key("validate"), verdict_for("validate"))
        assert d.seq == 4
    with Store.open(path) as s:
        rows = [(r.stage, r.seq, r.status) for r in s.decisions("r")]
    assert rows == [("plan", 1, "ok"), ("tasks", 2, "conflict"), ("implement", 3, "ok"), ("validate", 4, "ok")]


@pytest.mark.parametrize("edge", ["agent", "coordinator"])
async def test_every_item_delivered_three_times_still_decides_once(
    tmp_path: Any, autojump_clock: trio.testing.MockClock, edge: str
) -> None:
    """Two copies were survived; three copies of each request hung the run
    for good: the coordinator blocked handing an agent its third copy while
    the agent blocked on the coordinator's full reply inbox."""

    async def thrice(item: Any, forward: Any) -> None:
        for _ in range(3):
            await forward(item)

    path = str(tmp_path / "thrice.db")
    with trio.fail_after(3600):
        async with open_orchestrator(store=path, seed=7, interceptors={edge: [FunctionInterceptor(thrice)]}) as orch:
            result = await orch.run("SPEC-X", run_id="thrice")
    assert result.completed
    assert decision_counts(path, "thrice") == {s: 1 for s in default_pipeline().stage_names}
    assert result.digest == await baseline_digest(tmp_path)
