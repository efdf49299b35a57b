"""Usage payloads of each provider normalise onto TokenUsage."""

from __future__ import annotations

import pytest

from actors._usage_normalise import (
    merge_anthropic_usage,
    usage_from_anthropic,
    usage_from_gemini,
    usage_from_openai,
    usage_to_openai,
)
from messages import TokenUsage


def test_openai_chat_usage_includes_cached_and_reasoning() -> None:
    usage = usage_from_openai(
        {
            "prompt_tokens": 1200,
            "completion_tokens": 300,
            "total_tokens": 1500,
            "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 128},
        }
    )
    assert usage == TokenUsage(
        input_tokens=1200, cached_input_tokens=1024, output_tokens=300, reasoning_output_tokens=128, total_tokens=1500
    )


def test_openai_responses_api_usage() -> None:
    usage = usage_from_openai(
        {
            "input_tokens": 50,
            "input_tokens_details": {"cached_tokens": 10},
            "output_tokens": 20,
            "output_tokens_details": {"reasoning_tokens": 5},
            "total_tokens": 70,
        }
    )
    assert usage == TokenUsage(
        input_tokens=50, cached_input_tokens=10, output_tokens=20, reasoning_output_tokens=5, total_tokens=70
    )


def test_openai_usage_with_missing_details_and_nulls() -> None:
    usage = usage_from_openai({"prompt_tokens": 7, "completion_tokens": 3, "prompt_tokens_details": None})
    assert usage == TokenUsage.of(input_tokens=7, output_tokens=3)


def test_a_malformed_counter_makes_usage_unknown_not_zero() -> None:
    # Counted as 0, a call reporting -5 or "7" tokens was priced at nothing
    # and hidden from a budget.  Missing detail counters still count as 0.
    assert usage_from_openai({"prompt_tokens": -5, "completion_tokens": 3}) is None
    assert usage_from_openai({"prompt_tokens": 5, "completion_tokens": "7"}) is None
    assert usage_from_openai({"prompt_tokens": 5, "completion_tokens": float("nan")}) is None
    assert usage_from_anthropic({"input_tokens": "n/a", "output_tokens": 3}) is None
    assert usage_from_gemini({"promptTokenCount": 3, "candidatesTokenCount": -1}) is None
    assert usage_from_openai({"prompt_tokens": 5, "completion_tokens": 2}) == TokenUsage.of(input_tokens=5, output_tokens=2)
    # 10.7 tokens was cut to 10 without a word; 10.0 is a count written as a float.
    assert usage_from_openai({"prompt_tokens": 10.7, "completion_tokens": 2}) is None
    assert usage_from_openai({"prompt_tokens": 10.0, "completion_tokens": 2}) == TokenUsage.of(input_tokens=10, output_tokens=2)


@pytest.mark.parametrize(
    "payload", [{}, {"total_tokens": 1500}, {"prompt_tokens": 5}, {"prompt_tokens": 5, "completion_tokens": None},
                {"input_tokens": 5}, {"output_tokens": 3}],
)
def test_usage_without_its_input_or_output_count_is_unknown(payload: dict) -> None:
    # '{}' and '{"total_tokens": 1500}' were 0 tokens in, 0 out, $0, and not
    # counted as unknown; a null completion count priced the call's output at nothing.
    assert usage_from_openai(payload) is None
    assert usage_from_anthropic(payload) is None


def test_absent_usage_is_unknown_not_zero() -> None:
    assert usage_from_openai(None) is None
    assert usage_from_anthropic(None) is None
    assert usage_from_gemini("nonsense") is None


def test_anthropic_input_adds_cache_reads_and_writes() -> None:
    usage = usage_from_anthropic(
        {
            "input_tokens": 21,
            "cache_creation_input_tokens": 188,
            "cache_read_input_tokens": 1000,
            "output_tokens": 393,
            "cache_creation": {"ephemeral_5m_input_tokens": 188, "ephemeral_1h_input_tokens": 0},
        }
    )
    assert usage == TokenUsage(
        input_tokens=21 + 188 + 1000,
        cached_input_tokens=1000,
        output_tokens=393,
        reasoning_output_tokens=0,
        total_tokens=21 + 188 + 1000 + 393,
        cache_write_input_tokens=188,
    )


def test_counts_within_bounds_that_sum_past_them_are_unknown_usage() -> None:
    """10**12 input and 1 output: each count is allowed, their total is
    not.  The normaliser built that usage and the Completion refused it, so
    a good answer failed as the provider's bug and the run halted."""
    big = 10**12
    assert usage_from_openai({"prompt_tokens": big, "completion_tokens": 1}) is None
    assert usage_from_anthropic({"input_tokens": big, "cache_read_input_tokens": 5, "output_tokens": 1}) is None
    assert usage_from_gemini({"promptTokenCount": big, "candidatesTokenCount": 1}) is None
    assert usage_from_openai({"prompt_tokens": big - 1, "completion_tokens": 1}) == TokenUsage.of(
        input_tokens=big - 1, output_tokens=1
    )


def test_anthropic_null_cache_write_total_reads_its_breakdown() -> None:
    # A null total beside the breakdown counted no writes at all: 3,000
    # one-hour writes went unpriced.
    usage = usage_from_anthropic(
        {
            "input_tokens": 1000,
            "cache_creation_input_tokens": None,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 3000},
            "output_tokens": 10,
        }
    )
    assert usage is not None
    assert (usage.input_tokens, usage.cache_write_input_tokens, usage.cache_write_1h_input_tokens) == (4000, 3000, 3000)


def test_anthropic_stream_delta_usage_is_cumulative_not_summed() -> None:
    start = {"input_tokens": 25, "cache_read_input_tokens": 100, "output_tokens": 1}
    delta = merge_anthropic_usage(None, {"output_tokens": 10})
    delta = merge_anthropic_usage(delta, {"output_tokens": 15})
    usage = usage_from_anthropic(merge_anthropic_usage(start, delta))
    assert usage is not None
    assert usage.output_tokens == 15
    assert usage.input_tokens == 125 and usage.cached_input_tokens == 100


def test_gemini_thoughts_are_output_and_reasoning() -> None:
    usage = usage_from_gemini(
        {
            "promptTokenCount": 900,
            "cachedContentTokenCount": 400,
            "candidatesTokenCount": 100,
            "thoughtsTokenCount": 60,
            "totalTokenCount": 1060,
        }
    )
    assert usage == TokenUsage(
        input_tokens=900, cached_input_tokens=400, output_tokens=160, reasoning_output_tokens=60, total_tokens=1060
    )


def test_gemini_total_below_its_parts_is_their_sum() -> None:
    usage = usage_from_gemini({"promptTokenCount": 900, "candidatesTokenCount": 100, "thoughtsTokenCount": 60,
                               "totalTokenCount": 1000})
    assert usage is not None and usage.total_tokens == 1060


def test_openai_round_trip_is_exact() -> None:
    usage = TokenUsage.of(input_tokens=812, cached_input_tokens=300, output_tokens=250, reasoning_output_tokens=90)
    assert usage_from_openai(usage_to_openai(usage)) == usage
