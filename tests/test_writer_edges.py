"""Edges of the store writer and of the agent's use of it: what an ack
means to ``write_durably`` (a duplicate is written, a refusal is not), a
batch whose transaction blows up (its requesters are told, not left
waiting), an acked write never waiting out a hold, and an agent whose
coordinator has gone (its late reply is dropped, the agent lives on).
Real SQLite files in tmp_path; trio's MockClock measures every wait."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from actors import Agent, AgentSpec, RetryPolicy, StoreWriter, pipeline_with_panel
from actors._store_writer import write_durably
from messages import (
    ActorStopped,
    AgentKey,
    AgentRequest,
    Completion,
    CompletionRequest,
    CompletionResult,
    PersistEvent,
    PersistOutput,
    TokenUsage,
    open_channel,
)
from store import Store

from .test_store import new_run, output
from .test_store_hold import writing  # a store with run "r" and its writer serving


def event(n: int) -> PersistEvent:
    return PersistEvent(run_id="r", branch_id="b", kind="retry", stage="plan", agent=f"a{n}", detail={"n": n})


# -- write_durably: what an ack means ---------------------------------------


async def test_a_duplicate_ack_counts_as_written(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """A write the store already holds (a resume or a cancelled requester
    sending it again) comes back ``ok=False, duplicate=True``: the row is
    durable, so ``write_durably`` returns.  Reading only ``ok`` turned
    every such replay into ActorStopped, killing a run whose output was
    safely stored."""
    path = str(tmp_path / "w.db")
    async with writing(path) as (_, send):
        item = PersistOutput(output=output())
        await write_durably(send, item, "persisting an output", "could not persist")
        await write_durably(send, item, "persisting an output", "could not persist")  # the replay
    with Store.open(path, readonly=True) as reader:
        assert [(o.agent, o.attempt) for o in reader.outputs("r")] == [("gemini", 1)]


async def test_a_refused_write_raises_actor_stopped(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """A write the store refused (here: an output of a run it does not
    have) is not durable: ``write_durably`` raises ActorStopped with the
    caller's words and the store's reason.  Ignoring the ack let the agent
    go on as if the output were stored, and a resume later found nothing."""
    path = str(tmp_path / "w.db")
    stray = output()
    stray = attrs.evolve(stray, key=attrs.evolve(stray.key, run_id="no-such-run"))
    async with writing(path) as (_, send):
        with pytest.raises(ActorStopped, match="could not persist gemini: FOREIGN KEY"):
            await write_durably(send, PersistOutput(output=stray), "persisting an output", "could not persist gemini")
    with Store.open(path, readonly=True) as reader:
        assert reader.outputs("no-such-run") == []


# -- a transaction that raises --------------------------------------------


async def test_requesters_of_a_batch_that_raised_get_actor_stopped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """``store.apply`` raising something the writer does not retry (here the
    connection is gone) kills the writer - and every write of that batch
    has left the inbox, so only the writer can tell its requesters.  Each
    must get ActorStopped; without it they waited for ever (the fail_after
    on trio's clock turns that hang into TooSlowError)."""
    path = str(tmp_path / "w.db")
    s = Store.open(path)
    new_run(s)
    writer = StoreWriter(s)
    send, receive = open_channel(100, name="store")
    died: list[BaseException] = []

    async def serve() -> None:
        try:
            await writer.run(receive)
        except Exception as exc:  # the writer's death is expected here
            died.append(exc)

    async def write(agent: str, outcomes: list[str]) -> None:
        try:
            await write_durably(send, PersistOutput(output=output(agent)), "persisting an output", "refused")
        except ActorStopped:
            outcomes.append("stopped")
        else:
            outcomes.append("written")

    s.close()  # every apply now raises ConnectionClosedError
    outcomes: list[str] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            for agent in ("gemini", "claude", "gpt"):
                nursery.start_soon(write, agent, outcomes)
    assert outcomes == ["stopped"] * 3
    assert len(died) == 1 and writer.batches == 0


# -- holds never delay an acked write -------------------------------------


async def test_an_acked_write_is_not_held(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """A hold is for writes nobody awaits.  A batch holding an acked write
    is committed at once: held, the agent waiting on it stalled the whole
    ``hold`` (5 s here) for every accepted output."""
    path = str(tmp_path / "w.db")
    async with writing(path, hold=5.0) as (writer, send):
        sent = trio.current_time()
        await write_durably(send, PersistOutput(output=output()), "persisting an output", "refused")
        assert trio.current_time() == sent, "acked at the time it was sent"
    assert writer.holds == 0 and writer.batches == 1


async def test_an_acked_write_ends_a_hold_at_once(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """An event started a hold; the acked write arriving a second later ends
    it and is committed with it, at once - not when the 5 s hold runs out.
    (The ride-along test checks what is committed, not when.)"""
    path = str(tmp_path / "w.db")
    async with writing(path, hold=5.0) as (writer, send):
        send.send_nowait(event(0))
        await trio.sleep(1.0)
        sent = trio.current_time()
        await write_durably(send, PersistOutput(output=output()), "persisting an output", "refused")
        assert trio.current_time() == sent, "acked at the time it was sent"
        with Store.open(path, readonly=True) as reader:
            assert len(reader.events("r", kind="retry")) == 1, "the held event went with it"
    assert writer.holds == 1 and writer.batches == 1 and writer.items == 2


# -- an agent whose coordinator has gone -----------------------------------


async def test_a_late_reply_to_a_closed_coordinator_does_not_kill_the_agent(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The coordinator closed its inbox (the run ended or was cancelled)
    while an agent was still answering.  The reply has nobody to go to and
    its output is already durable: the agent drops it and goes on serving
    until its own inbox ends.  Letting ActorStopped out crashed the agent, and with it the
    nursery the orchestrator runs every agent in."""
    path = str(tmp_path / "a.db")
    pipeline = pipeline_with_panel("validate", ["a0"])
    gateway, calls = open_channel(10, name="gateway")
    metrics, _usage = open_channel(100, name="metrics")
    agent_inbox, agent_receive = open_channel(1, name="agent a0", awaited=True)
    coordinator, replies = open_channel(1, name="coordinator", awaited=True)
    replies.close()  # the coordinator has gone

    async def provider() -> None:
        async for call in calls:
            assert isinstance(call, CompletionRequest) and call.reply_to is not None
            call.reply_to.send(
                CompletionResult(
                    key=call.key,
                    attempt=call.attempt,
                    completion=Completion(
                        content='{"verdict": "pass"}', usage=TokenUsage(input_tokens=3, output_tokens=2), model="m"
                    ),
                )
            )

    async with writing(path) as (_, store):
        agent = Agent(
            spec=AgentSpec(name="a0", model="m"),
            pipeline=pipeline,
            gateway=gateway,
            metrics=metrics,
            store=store,
            retry=RetryPolicy(),
            seed=0,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(provider)
            with trio.fail_after(10):
                async with trio.open_nursery() as agents:
                    agents.start_soon(agent.run, agent_receive)
                    key = AgentKey(run_id="r", branch_id="b", stage="validate", agent="a0")
                    await agent_inbox.send(AgentRequest(key=key, spec_id="S", goal="g", reply_to=coordinator))
                    await trio.testing.wait_all_tasks_blocked()
                    agent_inbox.close()  # the agent finishes normally once it has handled it
            gateway.close()
    with Store.open(path, readonly=True) as reader:
        assert [(o.agent, o.status) for o in reader.outputs("r")] == [("a0", "accepted")]
