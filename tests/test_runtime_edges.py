"""Edges of the coordinator and the runtime that the broader tests passed
over: what later agents of a sequential stage are shown, duplicate and late
replies, budgets kept (or given again) across a resume, a resumed parallel
stage's batch, and a failed ack of the run's end."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from actors import MockProvider, SimulatedProvider, default_pipeline, open_orchestrator
from actors._pipeline import pipeline_with_panel
from messages import (
    AgentFinished,
    AgentReply,
    AgentRequest,
    Completion,
    CompletionRequest,
    ConclaveError,
    Forward,
    FunctionInterceptor,
    ProgressEvent,
    RunUpdate,
    StoreAck,
)
from store import Store

from .test_budget import CALL  # gpt-4o: $0.035 a call
from .test_budget import pipeline as priced_pipeline


def priced(latency: dict[str, float] | None = None) -> MockProvider:
    """The simulator in agreement, every call $0.035 and 1 s (or the
    agent's own latency)."""
    sim = SimulatedProvider(seed=5, disagreement_rate=0.0)

    async def answer(request: CompletionRequest) -> Completion:
        await trio.sleep((latency or {}).get(request.key.agent, 1.0))
        return attrs.evolve(sim.answer(request), usage=CALL)

    return MockProvider(answer, name="sim")


def drain(progress: trio.MemoryReceiveChannel[ProgressEvent]) -> list[ProgressEvent]:
    events: list[ProgressEvent] = []
    while True:
        try:
            events.append(progress.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return events


def event_count(path: str, run_id: str) -> int:
    with Store.open(path) as store:
        return len(store.events(run_id))


async def test_later_agents_see_a_json_answer_whole_and_raw_text_cut(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """In a sequential stage the third agent's prompt holds the first
    answer's JSON object in full (8,000+ characters) and the second's raw
    text cut at 5,000.  Breaks if every answer is cut at 5,000 (the JSON no
    longer closes: a long plan reached the aggregator broken) or if the
    coordinator passes answers on uncut (a raw answer blows up the prompt)."""
    big = json.dumps({"decision": "approve", "notes": "A" * 8000})
    raw = "B" * 7000
    prompts: dict[str, str] = {}

    def answer(request: CompletionRequest) -> Completion:
        prompts[request.key.agent] = request.prompt
        content = {"first": big, "second": raw}.get(request.key.agent, big)
        return Completion(content=content, usage=None, model="sim-model")

    pipeline = pipeline_with_panel("plan", ["first", "second", "third"], mode="sequential")
    async with open_orchestrator(
        store=str(tmp_path / "p.db"), provider=MockProvider(answer, name="sim"), pipeline=pipeline
    ) as orch:
        await orch.run("SPEC", run_id="P")
    third = prompts["third"]
    assert f"Earlier answer from first:\n{big}" in third, "the JSON answer is shown whole"
    assert f"Earlier answer from second:\n{'B' * 5000}" in third
    assert "B" * 5001 not in third, "raw text is cut at 5,000 characters"


async def test_duplicated_requests_are_counted_once_per_agent(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """An agent-edge interceptor hands every request to its agent twice, so
    each agent answers twice.  The second reply is a duplicate: one
    AgentFinished per agent and stage, one decision per stage.  Breaks if
    the coordinator's duplicate check is lost (the second reply is taken
    as a fresh one and reported finished again)."""

    async def twice(request: AgentRequest, forward: Forward[AgentRequest]) -> None:
        await forward(request)
        await forward(request)

    path = str(tmp_path / "dup.db")
    with trio.fail_after(3600):
        async with open_orchestrator(
            store=path, seed=7, interceptors={"agent": [FunctionInterceptor(twice)]}
        ) as orch:
            progress = orch.subscribe()
            result = await orch.run("SPEC-X", run_id="dup")
            events = drain(progress)
    assert result.completed
    finished = [(e.key.stage, e.key.agent) for e in events if isinstance(e, AgentFinished)]
    assert finished, "the run reported its agents"
    assert len(finished) == len(set(finished)), f"duplicates reported as finished: {finished}"
    with Store.open(path) as store:
        assert len(store.decisions("dup")) == len(result.stages)


async def test_late_replies_of_the_last_stage_fail_fast(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A coordinator-edge interceptor delivers each reply of the last stage
    ten times: once the stage is decided nobody reads them.  The run must
    still end.  (Written when the reply channel had a slot per panel seat,
    which the flood overfilled: it broke if the runtime stopped closing
    that channel.  The channel is unbounded now, so the flood only piles
    up unread.)"""
    last = default_pipeline().stage_names[-1]

    async def flood(reply: AgentReply, forward: Forward[AgentReply]) -> None:
        for _ in range(10 if reply.key.stage == last else 1):
            await forward(reply)

    path = str(tmp_path / "late.db")
    with trio.fail_after(3600):
        async with open_orchestrator(
            store=path, seed=7, interceptors={"coordinator": [FunctionInterceptor(flood)]}
        ) as orch:
            result = await orch.run("SPEC-X", run_id="late")
    assert result.completed
    assert [s.stage for s in result.stages] == list(default_pipeline().stage_names)


async def test_a_resumed_parallel_batch_is_not_gated_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Budget $0.07, parallel stages: the uninterrupted run sends the plan
    batch (spent $0), buys 3 answers ($0.105) and halts before tasks.  A
    crash after two plan answers are durable ($0.07) leaves the third
    outstanding; the resume must send it - the batch passed its check
    before the crash - and halt before tasks, as the uninterrupted run did.
    Breaks if a resumed parallel stage is gated again: it then halts at
    plan, undecided."""
    path = str(tmp_path / "b.db")
    late = {"gemini": 1.0, "claude": 2.0, "gpt_pro": 10.0}
    with trio.move_on_after(5.0) as crash:
        async with open_orchestrator(store=path, provider=priced(late), pipeline=priced_pipeline("parallel")) as orch:
            await orch.run("SPEC-B", run_id="B", budget="0.07")
    assert crash.cancelled_caught
    with Store.open(path) as store:
        assert sorted(o.agent for o in store.outputs("B") if o.status == "accepted") == ["claude", "gemini"]

    mock = priced(late)
    async with open_orchestrator(store=path, provider=mock, pipeline=priced_pipeline("parallel")) as orch:
        result = await orch.resume("B")
    assert [c.key.agent for c in mock.calls] == ["gpt_pro"]
    assert (result.status, result.halt_reason) == ("halted", "budget_exceeded")
    assert [s.stage for s in result.stages] == ["plan"], "plan is decided; the halt is before tasks"


async def test_a_plain_resume_of_an_interrupted_run_keeps_its_budget(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A run with budget $0.16 halts before its 6th call uninterrupted.
    Interrupted after 2 calls and resumed without a budget, it must run on
    under the same $0.16 and halt the same way.  Breaks if a plain resume
    of a run that was not budget-halted forgets its stored budget (it then
    runs unlimited and completes)."""
    path = str(tmp_path / "k.db")
    with trio.move_on_after(2.5) as crash:
        async with open_orchestrator(store=path, provider=priced(), pipeline=priced_pipeline()) as orch:
            await orch.run("SPEC-B", run_id="K", budget="0.16")
    assert crash.cancelled_caught

    mock = priced()
    async with open_orchestrator(store=path, provider=mock, pipeline=priced_pipeline()) as orch:
        result = await orch.resume("K")
    assert (result.status, result.halt_reason) == ("halted", "budget_exceeded")
    assert result.budget_usd == Decimal("0.16")
    assert len(mock.calls) == 3, "5 calls in all, as uninterrupted: 2 before the crash, 3 after"


async def test_resuming_a_budget_halt_with_the_same_budget_writes_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The budget a run halted on, given again, is no new grant: the resume
    replays the halt, calls nothing and writes nothing.  Breaks if only a
    resume without a budget counts as a replay (a second set of warnings,
    a resume event, a metrics event and a halt, for nothing)."""
    path = str(tmp_path / "h.db")
    async with open_orchestrator(store=path, provider=priced(), pipeline=priced_pipeline()) as orch:
        halted = await orch.run("SPEC-B", run_id="H", budget="0.16")
    assert halted.halt_reason == "budget_exceeded"
    before = event_count(path, "H")

    mock = priced()
    async with open_orchestrator(store=path, provider=mock, pipeline=priced_pipeline()) as orch:
        again = await orch.resume("H", budget="0.16")
    assert (again.status, again.halt_reason) == ("halted", "budget_exceeded")
    assert mock.calls == []
    assert event_count(path, "H") == before, "the replay wrote nothing"


async def test_a_failed_ack_of_the_runs_end_is_an_error(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The store refuses the RunUpdate that records the run's end: the run
    must raise, not report a success the store does not hold.  Breaks if
    the end-of-run ack is not checked."""

    async def refuse_end(item: Any, forward: Forward[Any]) -> None:
        if isinstance(item, RunUpdate) and item.status == "completed" and item.reply_to is not None:
            item.reply_to.send(StoreAck(ok=False, error="disk I/O error"))
            return
        await forward(item)

    with pytest.raises(ConclaveError, match="could not record the end of run 'E'.*disk I/O error"):
        async with open_orchestrator(
            store=str(tmp_path / "e.db"), seed=3, interceptors={"store": [FunctionInterceptor(refuse_end)]}
        ) as orch:
            await orch.run("SPEC-E", run_id="E")
