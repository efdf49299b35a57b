"""Values SQLite cannot hold - text with lone surrogates, integers beyond 64
bits - fail their own call or run, or are repaired, never the store writer:
it died on them, and with it every run of the orchestrator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from actors import ConfigError, MockProvider, OpenAIProvider, SimulatedProvider, open_orchestrator
from messages import AgentKey, AgentOutput, Completion, Disconnected, PersistOutput, PersistRun, TokenUsage
from store import Store
from tests._providers_support import SECRET, make_request

SURROGATE = json.loads('"caf\\udce9"')  # what a JSON body or surrogateescape'd argv can hold


async def test_a_goal_with_a_lone_surrogate_is_refused_and_other_runs_go_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = str(tmp_path / "g.db")
    results: list[Any] = []
    async with open_orchestrator(store=path, seed=1) as orch:
        async with trio.open_nursery() as nursery:
            async def good() -> None:
                results.append(await orch.run("S", run_id="good"))

            nursery.start_soon(good)
            with pytest.raises(ConfigError, match="goal is not valid Unicode"):
                await orch.run("S", goal=SURROGATE, run_id="bad")
    assert results[0].completed
    with Store.open(path) as s:
        assert s.get_run("bad") is None


async def test_a_providers_lone_surrogate_is_repaired_or_fails_only_its_call(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    sim = SimulatedProvider(seed=0)
    calls: list[int] = []

    def handler(request: Any) -> Any:
        calls.append(request.attempt)
        if request.attempt == 1 and request.key.stage == "plan":
            raise Disconnected("stream broke at " + SURROGATE)  # its text goes into the failed output
        if request.key.stage == "tasks" and request.key.agent == "claude":
            # A custom provider's own bad Completion: that call fails, as a provider bug.
            return Completion(content=SURROGATE, usage=TokenUsage.of(input_tokens=1), model="m")
        return sim.answer(request)

    path = str(tmp_path / "p.db")
    async with open_orchestrator(store=path, provider=MockProvider(handler, name="sim"), seed=0) as orch:
        result = await orch.run("S", run_id="p")
    assert result.completed
    with Store.open(path) as s:
        errors = [o.error for o in s.outputs("p") if o.status == "failed"]
    assert any(e and "stream broke at caf\ufffd" in e for e in errors)
    assert any(e and "lone surrogate" in e for e in errors)


async def test_an_openai_reply_with_a_split_surrogate_pair_is_kept_with_a_replacement() -> None:
    body = {"model": "gpt-5", "choices": [{"message": {"content": "ok \ud83d"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10**30, "completion_tokens": 5}}
    text = json.dumps(body)  # ensure_ascii: the lone half travels as a \\ud83d escape
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=text.encode()))
    provider = OpenAIProvider(base_url="http://mock.test/v1", api_key=SECRET, transport=transport, stream=False)
    try:
        completion = await provider.complete(make_request())
    finally:
        await provider.aclose()
    assert completion.content == "ok \ufffd"
    assert completion.usage is None, "10**30 prompt tokens is no real call's usage: unknown, not an overflow"


def test_the_store_repairs_an_outputs_text_and_refuses_other_unstorable_items(tmp_path: Path) -> None:
    key = AgentKey(run_id="r", branch_id="b", stage="plan", agent="claude")
    with Store.open(str(tmp_path / "s.db")) as s:
        acks = s.apply([
            PersistRun(run_id="r", branch_id="b", spec_id="S", goal=SURROGATE, seed=1, pipeline="{\"stages\": []}"),
            PersistRun(run_id="r", branch_id="b", spec_id="S", goal="fine", seed=1, pipeline="{\"stages\": []}"),
            PersistOutput(output=AgentOutput(key=key, attempt=1, status="failed", content="", format="text",
                                             usage=None, model="m", provider="sim", error="broke " + SURROGATE,
                                             started_at=0.0, finished_at=0.0)),
        ])
        assert [a.ok for a in acks] == [False, True, True]
        assert "lone surrogate" in (acks[0].error or "")
        assert [o.error for o in s.outputs("r")] == ["broke caf\ufffd"]
