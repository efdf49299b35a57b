"""Provider usage payloads, normalised (issue 7's module), priced; a call
cut off mid-stream is unknown usage, not zero."""

from __future__ import annotations

from decimal import Decimal

import attrs
import trio
import trio.testing

from actors import MockProvider, PriceTable, SimulatedProvider, open_orchestrator, pipeline_from_dict
from actors._usage_normalise import usage_from_anthropic, usage_from_gemini, usage_from_openai
from messages import Completion, CompletionRequest, Disconnected, TokenUsage

PRICES = PriceTable.vendored()


def test_openai_payload_is_priced_with_cached_and_reasoning() -> None:
    usage = usage_from_openai(
        {
            "prompt_tokens": 2_000,
            "completion_tokens": 500,
            "prompt_tokens_details": {"cached_tokens": 1_024},
            "completion_tokens_details": {"reasoning_tokens": 300},
        }
    )
    assert usage is not None
    # gpt-5: 976 x 1.25e-6 + 1,024 x 1.25e-7 + 500 x 1e-5 (reasoning is output)
    assert PRICES.cost(usage, "gpt-5") == Decimal("0.00122") + Decimal("0.000128") + Decimal("0.005")


def test_anthropic_input_adds_cache_reads_and_writes_before_pricing() -> None:
    usage = usage_from_anthropic(
        {"input_tokens": 100, "cache_read_input_tokens": 1_000, "cache_creation_input_tokens": 200, "output_tokens": 50}
    )
    assert usage == TokenUsage.of(
        input_tokens=1_300, cached_input_tokens=1_000, output_tokens=50, cache_write_input_tokens=200
    )
    # claude-sonnet-4-5: 100 x 3e-6 + 1,000 x 3e-7 + 200 x 3.75e-6 (a cache write
    # costs more than fresh input; it was priced as input) + 50 x 1.5e-5
    assert PRICES.cost(usage, "claude-sonnet-4-5") == (
        Decimal("0.0003") + Decimal("0.0003") + Decimal("0.00075") + Decimal("0.00075")
    )


def test_anthropic_one_hour_cache_writes_are_priced_at_their_own_rate() -> None:
    usage = usage_from_anthropic(
        {
            "input_tokens": 10,
            "cache_creation_input_tokens": 1_000,
            "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600},
            "output_tokens": 0,
        }
    )
    assert usage is not None
    assert (usage.input_tokens, usage.cache_write_input_tokens, usage.cache_write_1h_input_tokens) == (1_010, 1_000, 600)
    # claude-sonnet-4-5: 10 x 3e-6 + 400 x 3.75e-6 + 600 x 6e-6 (the one-hour rate)
    assert PRICES.cost(usage, "claude-sonnet-4-5") == Decimal("0.00003") + Decimal("0.0015") + Decimal("0.0036")
    # Only the breakdown given: its parts are the writes.
    parts = usage_from_anthropic(
        {"input_tokens": 0, "cache_creation": {"ephemeral_5m_input_tokens": 3, "ephemeral_1h_input_tokens": 4}, "output_tokens": 1}
    )
    assert parts is not None and (parts.input_tokens, parts.cache_write_input_tokens, parts.cache_write_1h_input_tokens) == (7, 7, 4)


def test_openai_cache_writes_are_part_of_the_input_and_priced_apart() -> None:
    usage = usage_from_openai(
        {
            "prompt_tokens": 2_000,
            "completion_tokens": 0,
            "prompt_tokens_details": {"cached_tokens": 500, "cache_write_tokens": 1_000},
        }
    )
    assert usage is not None and usage.cache_write_input_tokens == 1_000
    responses = usage_from_openai(
        {"input_tokens": 100, "output_tokens": 1, "input_tokens_details": {"cached_tokens": 90, "cache_write_tokens": 50}}
    )
    # Never more writes than the input left after cache reads.
    assert responses is not None and responses.cache_write_input_tokens == 10
    # gpt-5 has no cache-write price: writes cost what fresh input does, never nothing.
    assert PRICES.cost(usage, "gpt-5") == 1_500 * Decimal("1.25e-6") + 500 * Decimal("1.25e-7")


def test_a_price_file_can_give_cache_write_rates() -> None:
    table = PriceTable.vendored().with_overrides(
        {"my-model": {"input_cost_per_token": 1, "output_cost_per_token": 2, "cache_creation_input_token_cost": 5}}
    )
    usage = TokenUsage.of(input_tokens=10, cache_write_input_tokens=4, cache_write_1h_input_tokens=1)
    # 6 fresh x 1 + 4 writes x 5 (no one-hour rate given: the write rate)
    assert table.cost(usage, "my-model") == 26


def test_gemini_thoughts_are_output_and_priced_at_the_reasoning_rate() -> None:
    usage = usage_from_gemini(
        {"promptTokenCount": 1_000, "cachedContentTokenCount": 400, "candidatesTokenCount": 100, "thoughtsTokenCount": 50}
    )
    assert usage == TokenUsage(
        input_tokens=1_000, cached_input_tokens=400, output_tokens=150, reasoning_output_tokens=50, total_tokens=1_150
    )
    cost = PRICES.cost(usage, "gemini-2.5-flash", "gemini")
    assert cost == 600 * Decimal("3e-7") + 400 * Decimal("3e-8") + 100 * Decimal("2.5e-6") + 50 * Decimal("2.5e-6")


def test_missing_usage_is_unknown() -> None:
    assert usage_from_openai(None) is None and usage_from_anthropic(None) is None and usage_from_gemini(None) is None


async def test_a_call_cut_off_mid_stream_counts_as_unknown_not_zero(
    db_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    sim = SimulatedProvider(seed=3, disagreement_rate=0.0)
    call = TokenUsage.of(input_tokens=1_000, output_tokens=100)

    def answer(request: CompletionRequest) -> Completion:
        if request.attempt == 1:
            raise Disconnected("stream closed after 3 chunks")  # no final usage chunk
        return attrs.evolve(sim.answer(request), usage=call)

    pipeline = pipeline_from_dict(
        {
            "agents": {a: {"provider": "sim", "model": "gpt-4o"} for a in ("gemini", "claude", "gpt_pro")},
            "stages": [{"name": "plan", "agents": ["gemini", "claude", "gpt_pro"], "mode": "parallel"}],
        },
        source="test",
    )
    async with open_orchestrator(store=db_path, provider=MockProvider(answer, name="sim"), pipeline=pipeline) as orch:
        result = await orch.run("SPEC-CUT")
    assert result.completed
    assert result.unknown_usage_calls == 3 and result.turns == 6
    assert result.usage == TokenUsage.of(input_tokens=3_000, output_tokens=300)
    assert result.cost_usd == 3 * PRICES.cost(call, "gpt-4o")  # type: ignore[operator]


def test_the_usage_line_shows_cache_writes_only_when_there_are_any() -> None:
    from actors._format import usage_line

    assert "cache writes" not in usage_line(TokenUsage.of(input_tokens=10, cached_input_tokens=5))
    line = usage_line(TokenUsage.of(input_tokens=5_000, cache_write_input_tokens=1_200))
    assert "(0 cached, 1.2k cache writes)" in line


async def test_a_failed_attempt_is_priced_as_the_model_that_answered_it(
    db_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    """The server names the model it ran; a completion was priced as that
    model, a failed attempt that was billed (a stream cut after its usage)
    as the agent's configured one: a deployment alias went unpriced and out
    of the budget, a mini model was charged at the full model's rate."""
    from actors._http_errors import with_usage
    from store import Store

    sim = SimulatedProvider(seed=3, disagreement_rate=0.0)
    call = TokenUsage.of(input_tokens=1_000, output_tokens=100)

    def answer(request: CompletionRequest) -> Completion:
        if request.attempt == 1:
            raise with_usage(Disconnected("cut after the usage chunk"), call, model="gpt-4o-mini")
        return attrs.evolve(sim.answer(request), usage=call, model="gpt-4o-mini")

    pipeline = pipeline_from_dict(
        {
            "agents": {a: {"provider": "sim", "model": "my-deployment"} for a in ("gemini", "claude")},
            "stages": [{"name": "plan", "agents": ["gemini", "claude"], "mode": "parallel"}],
        },
        source="test",
    )
    async with open_orchestrator(store=db_path, provider=MockProvider(answer, name="sim"), pipeline=pipeline) as orch:
        result = await orch.run("SPEC-MODEL", run_id="M")
    assert result.completed and result.turns == 4
    assert result.cost_usd == 4 * PRICES.cost(call, "gpt-4o-mini")  # type: ignore[operator]
    with Store.open(db_path, readonly=True) as store:
        assert {(o.status, o.model) for o in store.outputs("M")} == {("failed", "gpt-4o-mini"), ("accepted", "gpt-4o-mini")}


async def test_a_failed_call_of_a_bound_provider_is_priced_as_the_model_it_asked_for(
    db_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    """A provider bound to a model (--model) asks for it whatever the agent
    names; a server calling it by a name the table does not know is priced
    as that bound model.  A completion was; a failed call that was billed
    fell back to the agent's model (gpt-4o for a gpt-4o-mini call)."""
    import json

    import httpx

    from actors import OpenAIProvider

    calls = 0

    def sse(chunks: list[dict[str, object]], done: bool) -> str:
        return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + ("data: [DONE]\n\n" if done else "")

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        body = json.loads(request.content)
        assert body["model"] == "gpt-4o-mini"
        content = json.dumps({"stage": "plan", "agent": "x", "work_breakdown": "w", "acceptance_mapping": "m"})
        chunks: list[dict[str, object]] = [
            {"model": "my-vllm-model", "choices": [{"delta": {"content": content}}]},
            {"model": "my-vllm-model", "choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 100}},
        ]
        # The first call is cut after its usage (billed), the rest complete.
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, text=sse(chunks, calls > 1))

    provider = OpenAIProvider(
        base_url="http://llm.test/v1", api_key="k", model="gpt-4o-mini", transport=httpx.MockTransport(answer)
    )
    pipeline = pipeline_from_dict(
        {
            "agents": {"gemini": {"provider": "openai", "model": "gpt-4o"}},
            "stages": [{"name": "plan", "agents": ["gemini"], "mode": "parallel", "quorum": 1, "aggregator": ""}],
        },
        source="test",
    )
    async with open_orchestrator(store=db_path, provider=provider, pipeline=pipeline) as orch:
        result = await orch.run("SPEC-BOUND")
    call = TokenUsage.of(input_tokens=1_000, output_tokens=100)
    assert result.turns == 2 and result.unpriced_calls == 0
    assert result.cost_usd == 2 * PRICES.cost(call, "gpt-4o-mini")  # type: ignore[operator]
