"""Whole runs through the OpenAI-compatible provider and serve-mock's
backend, in process on trio's virtual clock (httpx.MockTransport: no
sockets, so autojump makes no false timeouts)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import apsw
import httpx
import pytest
import trio

from actors._mock_backend import FaultRule, MockBackend
from actors._mock_server import mock_transport
from actors._openai import OpenAIProvider
from actors._pipeline import pipeline_with_panel
from actors._runtime import open_orchestrator
from actors._simulator import Latency, SimulatedProvider
from store import Store

from tests._providers_support import SECRET

SEED = 6
_META = re.compile(r"conclave-request: (\{.*\})")


class Recorder(httpx.AsyncBaseTransport):
    """Wraps a transport; logs (time, stage, agent, status) per call and can
    add fault headers to chosen (stage, agent, n-th call) requests."""

    def __init__(self, inner: httpx.AsyncBaseTransport, faults: dict[tuple[str, str, int], dict[str, str]] | None = None):
        self.inner = inner
        self.faults = faults or {}
        self.calls: list[tuple[float, str, str, int]] = []
        self._seen: Counter[tuple[str, str]] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(await request.aread())
        match = _META.search(body["messages"][0]["content"])
        assert match is not None
        meta = json.loads(match.group(1))
        who = (meta["stage"], meta["agent"])
        self._seen[who] += 1
        extra = self.faults.get((*who, self._seen[who]), {})
        if extra:
            request.headers.update(extra)
        at = trio.current_time()
        response = await self.inner.handle_async_request(request)
        self.calls.append((at, *who, response.status_code))
        return response


async def run_once(tmp_path: Path, provider: object, *, pipeline: object = None, name: str = "db") -> tuple[object, Store]:
    store = Store.open(str(tmp_path / f"{name}.sqlite"))
    async with open_orchestrator(store=store, provider=provider, pipeline=pipeline, seed=SEED) as orch:  # type: ignore[arg-type]
        result = await orch.run("SPEC-1", goal="ship it")
    return result, store


async def halts_undecided_then_resumes(tmp_path: Path, failing: object, *, says: str, fixed_at: str) -> None:
    """A one-stage run against ``failing`` halts with agents_failed, its
    message saying ``says``, and decides nothing; once the cause is gone
    (the mock API at ``fixed_at``), 'resume --retry-failed' completes it."""
    result, store = await run_once(tmp_path, failing, pipeline=pipeline_with_panel("validate", ["a", "b"]))
    assert result.halt_reason == "agents_failed", result.halt_message  # type: ignore[attr-defined]
    assert says in result.halt_message  # type: ignore[attr-defined]
    assert not store.decisions(result.run_id)  # type: ignore[attr-defined]
    healthy = OpenAIProvider(base_url=fixed_at, api_key=SECRET, transport=mock_transport(MockBackend(seed=SEED)))
    async with open_orchestrator(store=store, provider=healthy, seed=SEED) as orch:
        fixed = await orch.resume(result.run_id, retry_failed=True)  # type: ignore[attr-defined]
    assert fixed.completed


async def test_run_against_mock_matches_the_simulator(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    backend = MockBackend(seed=SEED)
    http = OpenAIProvider(base_url="http://mock.test/v1", api_key=SECRET, transport=mock_transport(backend))
    result, store = await run_once(tmp_path, http, name="http")
    sim_result, _ = await run_once(tmp_path, SimulatedProvider(seed=SEED, latency=Latency(median=0)), name="sim")
    assert result.completed  # type: ignore[attr-defined]
    assert result.digest == sim_result.digest  # type: ignore[attr-defined]
    assert [(s.stage, s.status) for s in result.stages] == [(s.stage, s.status) for s in sim_result.stages]  # type: ignore[attr-defined]
    assert result.usage == backend.ledger.usage == sim_result.usage  # type: ignore[attr-defined]
    assert result.unknown_usage_calls == 0  # type: ignore[attr-defined]


async def test_mid_stream_disconnect_is_retried_and_usage_unknown(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = MockBackend(seed=SEED)
    recorder = Recorder(mock_transport(backend), {("plan", "claude", 1): {"x-mock-fault": "disconnect"}})
    http = OpenAIProvider(base_url="http://mock.test/v1", api_key=SECRET, transport=recorder)
    result, store = await run_once(tmp_path, http)
    assert result.completed  # type: ignore[attr-defined]
    assert backend.ledger.faults == {"disconnect": 1}

    rows = store.outputs(result.run_id, stage="plan")  # type: ignore[attr-defined]
    claude = [r for r in rows if r.agent == "claude"]
    assert [(r.attempt, r.status) for r in claude] == [(1, "failed"), (2, "accepted")]
    broken, retry = claude
    assert broken.usage is None  # recorded as unknown, not as zero
    assert "disconnect" in (broken.error or "") or "cut short" in (broken.error or "")
    assert broken.content == ""  # the half-streamed text is never kept
    # The accepted output is the retry's: whole, and the simulator's answer.
    sim = SimulatedProvider(seed=SEED, latency=Latency(median=0))
    [accepted] = [
        r for r in store.outputs(result.run_id, stage="plan", accepted_only=True) if r.agent == "claude"  # type: ignore[attr-defined]
    ]
    assert accepted.attempt == 2 and accepted.content == retry.content
    assert json.loads(retry.content)["agent"] == "claude"
    assert retry.usage is not None
    assert result.unknown_usage_calls == 1  # type: ignore[attr-defined]
    # Known usage is exactly what the server sent in full.
    assert result.usage == backend.ledger.usage  # type: ignore[attr-defined]
    sim_result, sim_store = await run_once(tmp_path, sim, name="sim")
    # Same decisions and same accepted outputs as an undisturbed run; the
    # known usage is too (the broken attempt is counted apart, as unknown).
    assert [(x.stage, x.status) for x in result.stages] == [(x.stage, x.status) for x in sim_result.stages]  # type: ignore[attr-defined]
    assert result.usage == sim_result.usage  # type: ignore[attr-defined]
    sim_claude = [r for r in sim_store.outputs(sim_result.run_id, stage="plan") if r.agent == "claude"]  # type: ignore[attr-defined]
    assert [r.content for r in sim_claude] == [accepted.content]


async def test_429_pauses_the_agent_until_its_reset_and_the_run_completes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = MockBackend(seed=SEED, faults=[FaultRule(kind="429", count=1)], reset_seconds=45)
    recorder = Recorder(mock_transport(backend))
    http = OpenAIProvider(base_url="http://mock.test/v1", api_key=SECRET, transport=recorder)
    result, store = await run_once(tmp_path, http)
    assert result.completed  # type: ignore[attr-defined]
    (t429, stage, agent, status) = recorder.calls[0]
    assert status == 429
    again = [t for t, s, a, code in recorder.calls[1:] if (s, a) == (stage, agent)]
    assert again and again[0] - t429 >= 45  # not a moment before the reset
    # Nothing reached the provider while it was rate limited.
    assert not [c for c in recorder.calls[1:] if t429 < c[0] < t429 + 45]
    retry_events = [e for e in store.events(result.run_id) if e.kind == "retry"]  # type: ignore[attr-defined]
    assert retry_events[0].detail["error"] == "rate_limit" and retry_events[0].detail["delay_s"] >= 45


async def test_429_pauses_every_caller_of_the_provider(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    # In one parallel stage: a is told 429 (reset 30 s) while b gets a 500 and
    # would retry after ~0.5 s.  A provider-wide gate holds b's retry too.
    backend = MockBackend(seed=SEED, reset_seconds=30)
    recorder = Recorder(
        mock_transport(backend),
        {("validate", "a", 1): {"x-mock-fault": "429"}, ("validate", "b", 1): {"x-mock-fault": "503"}},
    )
    http = OpenAIProvider(base_url="http://mock.test/v1", api_key=SECRET, transport=recorder)
    result, _ = await run_once(tmp_path, http, pipeline=pipeline_with_panel("validate", ["a", "b"]))
    assert result.completed  # type: ignore[attr-defined]
    [t429] = [t for t, _, _, code in recorder.calls if code == 429]
    assert not [c for c in recorder.calls if t429 < c[0] < t429 + 30]


class Renamer(httpx.AsyncBaseTransport):
    """A server that names its model itself ("local-x"), whatever it was asked."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        body = json.loads(await response.aread())
        body["model"] = "local-x"
        return httpx.Response(response.status_code, json=body)


async def test_a_renamed_model_is_priced_as_the_one_the_provider_sent(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A provider bound to gpt-4o serves every agent; the server calls it
    'local-x', which the table does not know.  Priced as the agent's own
    model (gemini-2.5-pro, claude-sonnet-4-5, gpt-5): a price for a model
    never asked."""
    from actors._pricing import PriceTable

    backend = MockBackend(seed=SEED)
    http = OpenAIProvider(base_url="http://mock.test/v1", api_key=SECRET, model="gpt-4o", stream=False,
                          transport=Renamer(mock_transport(backend)))
    result, store = await run_once(tmp_path, http)
    assert result.completed and result.unpriced_calls == 0  # type: ignore[attr-defined]
    table = PriceTable.vendored()
    expected = sum(table.cost(o.usage, "gpt-4o") for o in store.outputs(result.run_id) if o.usage)  # type: ignore[attr-defined,misc]
    assert {o.model for o in store.outputs(result.run_id)} == {"local-x"}  # type: ignore[attr-defined]
    assert result.cost_usd == expected  # type: ignore[attr-defined]


class RefreshingSource:
    """Bearer tokens "old", then after a forced refresh (which takes 2 s)
    "new"."""

    def __init__(self) -> None:
        self.token = "tok-old"

    async def bearer(self, *, force_refresh: bool = False) -> str:
        if force_refresh:
            await trio.sleep(2)
            self.token = "tok-new"
        return self.token


class RejectsOldTokenOf(httpx.AsyncBaseTransport):
    """Answers 401 to ``agent``'s requests with the old token."""

    def __init__(self, inner: httpx.AsyncBaseTransport, agent: str) -> None:
        self.inner = inner
        self.agent = agent

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(await request.aread())
        if f'"agent":"{self.agent}"' in body["messages"][0]["content"] and request.headers["authorization"] == "Bearer tok-old":
            return httpx.Response(401, json={"error": {"message": "token expired", "type": "invalid_request_error"}})
        return await self.inner.handle_async_request(request)


@pytest.mark.parametrize("reset", [30, 900])
async def test_the_request_resent_after_a_token_refresh_waits_at_the_gate(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, reset: int
) -> None:
    # b's token is rejected; while it refreshes (2 s), a is told 429 with a
    # 30 s reset.  b's request sent again with the new token went straight
    # out at 2 s, under the permit its first request had been given.  With
    # a reset longer than a call waits (600 s), its resend is refused as a
    # new call would be.
    backend = MockBackend(seed=SEED, reset_seconds=reset)
    recorder = Recorder(RejectsOldTokenOf(mock_transport(backend), "b"), {("validate", "a", 1): {"x-mock-fault": "429"}})
    http = OpenAIProvider(base_url="http://mock.test/v1", token_source=RefreshingSource(), transport=recorder)
    result, _ = await run_once(tmp_path, http, pipeline=pipeline_with_panel("validate", ["a", "b"]))
    [t429] = [t for t, _, _, code in recorder.calls if code == 429]
    assert not [c for c in recorder.calls if t429 < c[0] < t429 + reset]
    b_calls = [code for _, _, agent, code in recorder.calls if agent == "b"]
    if reset == 30:
        assert result.completed and b_calls == [401, 200]  # type: ignore[attr-defined]
    else:
        assert result.halt_reason == "agents_failed" and b_calls == [401]  # type: ignore[attr-defined]
        assert "the call was not made" in result.halt_message  # type: ignore[attr-defined]
    # A refused resend cost nothing (its first request was answered 401):
    # the run's usage is all known.
    assert result.unknown_usage_calls == 0  # type: ignore[attr-defined]


async def test_a_wrong_base_url_halts_for_a_retry_once_fixed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A 404 on every call (a wrong base URL, an unknown model) halted the
    run no_consensus, decided for good: a stage the user could only rerun.
    It is fixed outside the run, as a key is: the stage is left undecided
    for 'resume --retry-failed'."""
    from messages import NotFound

    from actors._classify import classify

    assert classify(NotFound("x")).kind == "not_found" and not classify(NotFound("x")).retryable
    wrong = OpenAIProvider(base_url="http://mock.test/v2", api_key=SECRET, transport=mock_transport(MockBackend(seed=SEED)))
    await halts_undecided_then_resumes(
        tmp_path, wrong, says="http://mock.test/v2/chat/completions", fixed_at="http://mock.test/v1"
    )


async def test_a_redirect_halts_for_a_retry_once_fixed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A redirect (http to https, a moved API) is a wrong base URL as a 404
    is: fixed outside the run, so the stage is left undecided for 'resume
    --retry-failed'.  As a bad request it was decided no_consensus for good.
    The advice names a base URL that works: the target less the endpoint's
    path, which the provider appends again."""

    def moved(request: httpx.Request) -> httpx.Response:
        return httpx.Response(301, headers={"location": "https://mock.test/v1/chat/completions"})

    wrong = OpenAIProvider(base_url="http://mock.test/v1", api_key=SECRET, transport=httpx.MockTransport(moved))
    await halts_undecided_then_resumes(
        tmp_path, wrong, says="point --base-url at https://mock.test/v1", fixed_at="https://mock.test/v1"
    )


@pytest.mark.parametrize(("status", "kind"), [(503, "unavailable"), (408, "timeout"), (429, "rate_limit")])
async def test_a_failure_the_server_says_not_to_retry_halts_undecided(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, status: int, kind: str
) -> None:
    """'x-should-retry: false' on a 503 (maintenance), a 408 or a 429: each
    agent is asked once, as the server wants, but the stage is not decided
    on their silence - the run halts with agents_failed, and once the
    outage has passed 'resume --retry-failed' completes it.  They were a
    bare ProviderError, a bad request and a quota: the first two decided
    no_consensus for good."""
    calls: list[httpx.Request] = []

    def down(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(status, headers={"x-should-retry": "false"}, json={"error": {"message": "maintenance"}})

    http = OpenAIProvider(base_url="http://mock.test/v1", api_key=SECRET, transport=httpx.MockTransport(down))
    await halts_undecided_then_resumes(
        tmp_path, http, says=f"{kind}: openai: HTTP {status}: maintenance; not retried", fixed_at="http://mock.test/v1"
    )
    assert len(calls) == 2, "each agent was asked once: the server said not to retry"


async def test_a_resume_after_a_crash_keeps_the_servers_word_not_to_retry(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A failed attempt is durable before its gave_up event: a crash
    between the two left a resume to judge the error by its kind alone,
    and a 503 the server said not to retry was asked again."""
    calls: list[httpx.Request] = []

    def down(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503, headers={"x-should-retry": "false"}, json={"error": {"message": "maintenance"}})

    http = OpenAIProvider(base_url="http://mock.test/v1", api_key=SECRET, transport=httpx.MockTransport(down))
    result, store = await run_once(tmp_path, http, pipeline=pipeline_with_panel("validate", ["a", "b"]))
    run_id = result.run_id  # type: ignore[attr-defined]
    store.close()
    # The crash: the failures are stored, nothing after them is.
    conn = apsw.Connection(str(tmp_path / "db.sqlite"))
    try:
        first_gave_up = conn.execute("SELECT min(id) FROM events WHERE kind = 'gave_up'").fetchone()[0]
        conn.execute("DELETE FROM events WHERE id >= ?", (first_gave_up,))
        conn.execute("UPDATE runs SET status = 'interrupted', halt_reason = NULL")
        conn.execute("UPDATE branches SET status = 'interrupted', halt_reason = NULL")
    finally:
        conn.close()
    calls.clear()
    http = OpenAIProvider(base_url="http://mock.test/v1", api_key=SECRET, transport=httpx.MockTransport(down))
    async with open_orchestrator(store=str(tmp_path / "db.sqlite"), provider=http, seed=SEED) as orch:
        again = await orch.resume(run_id)
    assert calls == [], "the server said not to retry: nobody is asked again"
    assert again.halt_reason == "agents_failed", again.halt_message
