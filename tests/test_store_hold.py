"""The store writer holds writes nobody awaits (events, failed attempts)
for the next acknowledged one, within a bound on trio's clock, and never
loses them: not at the inbox's end, not on cancellation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from actors import Limits, StoreWriter
from messages import Outbox, PersistEvent, PersistOutput, StoreWrite, open_channel, reply_pair
from store import Store

from .test_store import new_run, output


def event(n: int) -> PersistEvent:
    return PersistEvent(run_id="r", branch_id="b", kind="retry", stage="plan", agent=f"a{n}", detail={"n": n})


def committed_events(path: str) -> int:
    with Store.open(path, readonly=True) as reader:
        return len(reader.events("r", kind="retry"))


@asynccontextmanager
async def writing(path: str, **kwargs: float) -> AsyncIterator[tuple[StoreWriter, Outbox[StoreWrite]]]:
    """A store with one run and its writer serving; the inbox is closed
    (so the writer finishes) when the block ends."""
    with Store.open(path) as s:
        new_run(s)
        writer = StoreWriter(s, **kwargs)
        send, receive = open_channel(100, name="store")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run, receive)
            yield writer, send
            send.close()


async def test_unacked_writes_ride_with_the_next_acked_one(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = str(tmp_path / "h.db")
    async with writing(path, hold=5.0) as (writer, send):
        for n in range(3):
            send.send_nowait(event(n))
            await trio.sleep(1.0)  # far apart: each would have been a commit of its own
        assert committed_events(path) == 0, "held, not yet committed"
        reply, pending = reply_pair("output")
        send.send_nowait(PersistOutput(output=output(), reply_to=reply))
        assert (await pending.receive()).ok
        # Acked means durable - and so is everything sent before it.
        assert committed_events(path) == 3
    assert writer.batches == 1 and writer.items == 4 and writer.holds == 1


async def test_a_hold_ends_after_its_bound(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    path = str(tmp_path / "h.db")
    async with writing(path, hold=2.0) as (_, send):
        send.send_nowait(event(0))
        await trio.sleep(1.9)
        assert committed_events(path) == 0
        await trio.sleep(0.2)
        assert committed_events(path) == 1, "visible within the hold bound"


async def test_no_hold_commits_at_once(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    path = str(tmp_path / "h.db")
    async with writing(path) as (writer, send):  # hold=0, the default
        send.send_nowait(event(0))
        await trio.testing.wait_all_tasks_blocked()
        assert committed_events(path) == 1
    assert writer.holds == 0


async def test_held_writes_are_committed_when_the_inbox_ends(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = str(tmp_path / "h.db")
    async with writing(path, hold=60.0) as (_, send):
        send.send_nowait(event(0))
        send.send_nowait(event(1))
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
    assert trio.current_time() == start, "the end of the inbox ends the hold at once"
    assert committed_events(path) == 2


async def test_held_writes_are_committed_on_cancellation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = str(tmp_path / "h.db")
    with Store.open(path) as s:
        new_run(s)
        writer = StoreWriter(s, hold=60.0)
        send, receive = open_channel(100, name="store")
        send.send_nowait(event(0))
        send.send_nowait(event(1))
        with trio.move_on_after(1.0):
            await writer.run(receive)
        assert committed_events(path) == 2, "a cancelled hold writes what it held"


def test_bad_hold_is_refused_by_name(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "h.db")) as s:
        with pytest.raises(ValueError, match="hold must be .* got -1"):
            StoreWriter(s, hold=-1)
    with pytest.raises(ValueError, match="store_hold must be .* got nan"):
        Limits(store_hold=float("nan"))


async def test_a_failed_attempt_is_durable_before_its_retry_waits(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A failed attempt may have been billed.  It was sent to the writer
    unacknowledged, so it was held (up to a second) through the backoff:
    a crash there lost it - its usage gone from the metrics, and a resume
    numbered its retry as the same attempt.  Seen from another connection,
    as a crash would leave the file, it is on disk by the time the agent
    starts waiting."""
    from actors import MockProvider, RetryPolicy, SimulatedProvider, open_orchestrator
    from actors._http_errors import with_usage
    from messages import AgentRetrying, CompletionRequest, Disconnected, TokenUsage

    sim = SimulatedProvider(seed=0)
    billed = TokenUsage(input_tokens=700, output_tokens=30)

    def handler(request: CompletionRequest) -> object:
        if request.key.agent == "claude" and request.attempt == 1:
            raise with_usage(Disconnected("stream cut after its usage"), billed)
        return sim.answer(request)

    path = str(tmp_path / "d.db")
    seen: list[tuple[str, int, TokenUsage | None]] = []
    provider = MockProvider(handler, name="sim")
    provider.bills = True  # as a real provider's: its failed calls may be charged
    async with open_orchestrator(
        store=path, provider=provider, retry=RetryPolicy(initial=30.0, cap=30.0, jitter=0.0)
    ) as orch:
        progress = orch.subscribe()
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for event in progress:
                    if isinstance(event, AgentRetrying):
                        with Store.open(path, readonly=True) as reader:
                            seen.extend(
                                (o.status, o.attempt, o.usage)
                                for o in reader.outputs("D", stage="plan")
                                if o.agent == "claude"
                            )
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await orch.run("S", run_id="D")
    assert seen == [("failed", 1, billed)]


async def test_a_billed_call_is_logged_durably_before_it_is_made(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The agent_call event of a provider that may charge was held for group
    commit up to a second: a crash while the provider worked lost every
    trace of the call, and 'metrics' could not count it as interrupted.
    Seen from another connection (as a crash leaves the file), each call is
    on disk when the provider gets it.  The simulator's calls still wait
    for group commit."""
    import json

    import httpx

    from actors import OpenAIProvider, SimulatedProvider, open_orchestrator, pipeline_from_dict

    path = str(tmp_path / "w.db")
    seen: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        with Store.open(path, readonly=True) as reader:
            seen.append(len(reader.events("W", kind="agent_call")))
        content = json.dumps({"stage": "plan", "agent": "x", "work_breakdown": "w", "acceptance_mapping": "m"})
        return httpx.Response(
            200,
            json={"model": "gpt-4o", "choices": [{"message": {"content": content}, "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 10, "completion_tokens": 5}},
        )

    provider = OpenAIProvider(base_url="http://llm.test/v1", api_key="k", stream=False, transport=httpx.MockTransport(answer))
    pipeline = pipeline_from_dict(
        {
            "agents": {a: {"provider": "openai", "model": "gpt-4o"} for a in ("gemini", "claude")},
            "stages": [{"name": "plan", "agents": ["gemini", "claude"], "mode": "sequential", "aggregator": ""}],
        },
        source="test",
    )
    async with open_orchestrator(store=path, provider=provider, pipeline=pipeline) as orch:
        assert (await orch.run("S", run_id="W")).completed
    assert seen == [1, 2]
    assert not SimulatedProvider.bills and OpenAIProvider.bills


async def test_a_give_up_of_a_billed_call_is_durable_before_the_agent_replies(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """For a provider that may charge, the failed attempt was durable but
    its gave_up event was left to group commit: a crash between them, and
    the resume judged the attempt again without its reset (a 429 past
    max_wait read as one to retry) and asked again, paid."""
    from actors import MockProvider, open_orchestrator
    from actors._pipeline import pipeline_with_panel
    from messages import AgentReply, RateLimited
    from messages._channel import Forward, Interceptor

    class Billed(MockProvider):
        bills = True

    def refuse(request: Any) -> Any:
        raise RateLimited("slow down", retry_after=86_400)

    path = str(tmp_path / "g.db")
    seen: list[int] = []

    class Peek(Interceptor[Any]):
        async def send(self, item: Any, forward: Forward[Any]) -> None:
            if isinstance(item, AgentReply) and item.output is None:
                with Store.open(path, readonly=True) as other:  # sees only what is committed
                    seen.append(len(other.events(item.key.run_id, "gave_up")))
            await forward(item)

    async with open_orchestrator(
        store=path, provider=Billed(refuse), seed=1, interceptors={"coordinator": [Peek()]},
        pipeline=pipeline_with_panel("validate", ["a"]),
    ) as orch:
        result = await orch.run("SPEC", run_id="G")
    assert result.halt_reason == "agents_failed"
    assert seen == [1]
