"""Edges of usage normalisation, retry, classification, budgets, durations
and HTTP error mapping that a mutation-testing pass found unpinned.

Each test pins one behaviour a user would notice if it changed: the token
counts (and so the cost) read from a provider's usage payload, how sums of
usage and a run's digest add up, which failures are retried, how long a
retry waits, which reset hint a 429 carries, what a budget allows and how
it is shown, and what a reset-time header means.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal

import apsw
import attrs
import httpx
import pytest
import trio
import trio.testing

from actors import RetryPolicy, open_orchestrator, parse_budget
from actors._budget import stored_budget, usd
from actors._classify import classify
from actors._http_errors import parse_reset_hint
from actors._usage_normalise import (
    merge_anthropic_usage,
    usage_from_anthropic,
    usage_from_gemini,
    usage_from_openai,
    usage_to_openai,
)
from messages import (
    AgentKey,
    Disconnected,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    TokenUsage,
    parse_duration,
    parse_rfc3339,
    parse_seconds,
)
from messages._messages import MAX_CALL_TOKENS
from store import Store

from ._providers_support import fixed, raising
from .test_budget import pipeline as priced_pipeline
from .test_budget import provider as priced_provider
from .test_budget import run_with_budget
from .test_providers_errors import WALL, failure


def _at(offset: float) -> str:
    """An RFC 3339 time ``offset`` seconds after the tests' wall clock."""
    return datetime.fromtimestamp(WALL + offset, UTC).isoformat()


# -- usage payloads -> TokenUsage ----------------------------------------------


def test_a_count_of_exactly_the_per_call_limit_is_still_a_count() -> None:
    usage = usage_from_openai({"prompt_tokens": MAX_CALL_TOKENS, "completion_tokens": 0})
    assert usage is not None and usage.input_tokens == MAX_CALL_TOKENS


def test_a_boolean_count_makes_usage_unknown() -> None:
    # True is an int to Python: read as 1 token, a broken payload was priced.
    assert usage_from_openai({"prompt_tokens": True, "completion_tokens": 3}) is None
    assert usage_from_anthropic({"input_tokens": 5, "output_tokens": False}) is None


def test_openai_reported_total_is_kept_and_parts_never_exceed_their_whole() -> None:
    usage = usage_from_openai(
        {
            "prompt_tokens": 10,
            "completion_tokens": 4,
            "total_tokens": 20,  # what the provider billed: kept as reported
            "prompt_tokens_details": {"cached_tokens": 50},
            "completion_tokens_details": {"reasoning_tokens": 9},
        }
    )
    assert usage == TokenUsage(
        input_tokens=10, cached_input_tokens=10, output_tokens=4, reasoning_output_tokens=4, total_tokens=20
    )


def test_a_null_field_of_anthropics_streaming_delta_keeps_the_start_value() -> None:
    merged = merge_anthropic_usage(
        {"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 4},
        {"output_tokens": 7, "input_tokens": None, "cache_read_input_tokens": None},
    )
    assert merged == {"input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 4}
    assert usage_from_anthropic(merged) == TokenUsage.of(input_tokens=14, cached_input_tokens=4, output_tokens=7)


def test_anthropic_one_hour_cache_writes_never_exceed_the_writes() -> None:
    usage = usage_from_anthropic(
        {
            "input_tokens": 1,
            "output_tokens": 2,
            "cache_creation_input_tokens": 10,
            "cache_creation": {"ephemeral_1h_input_tokens": 50},
        }
    )
    assert usage is not None
    assert (usage.cache_write_input_tokens, usage.cache_write_1h_input_tokens) == (10, 10)


def test_gemini_tool_prompt_tokens_count_as_input_and_its_total_is_kept() -> None:
    usage = usage_from_gemini(
        {
            "promptTokenCount": 100,
            "toolUsePromptTokenCount": 30,
            "cachedContentTokenCount": 500,  # more than the input: capped
            "candidatesTokenCount": 20,
            "thoughtsTokenCount": 5,
            "totalTokenCount": 160,
        }
    )
    assert usage == TokenUsage(
        input_tokens=130, cached_input_tokens=130, output_tokens=25, reasoning_output_tokens=5, total_tokens=160
    )


def test_serve_mocks_openai_usage_carries_cache_writes_back() -> None:
    usage = TokenUsage.of(input_tokens=100, cached_input_tokens=20, output_tokens=10, cache_write_input_tokens=30)
    assert usage_from_openai(usage_to_openai(usage)) == usage


# -- TokenUsage itself ------------------------------------------------------------


def test_token_usage_refuses_a_boolean_count() -> None:
    with pytest.raises(ValueError, match="input_tokens must be a non-negative int"):
        TokenUsage(input_tokens=True)


@pytest.mark.parametrize("name", [f.name for f in attrs.fields(TokenUsage)])
@pytest.mark.parametrize("bad", [-1, True, 1.0, "3", None])
def test_token_usage_refuses_a_wrong_count_in_every_field(name: str, bad: object) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be a non-negative int, got {re.escape(repr(bad))}$"):
        TokenUsage(**{name: bad})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"^{name} must be"):
        attrs.evolve(TokenUsage(), **{name: bad})


def test_token_usage_names_the_first_wrong_count_and_takes_int_subclasses() -> None:
    class Count(int):
        pass

    with pytest.raises(ValueError, match="^output_tokens must"):
        TokenUsage(output_tokens=-1, total_tokens=-2)
    assert TokenUsage(input_tokens=Count(3), total_tokens=3).input_tokens == 3


def test_non_cached_input_is_never_negative() -> None:
    assert TokenUsage(input_tokens=3, cached_input_tokens=5).non_cached_input_tokens == 0


def test_a_sum_of_usages_adds_every_count_and_keeps_reported_totals() -> None:
    a = TokenUsage(input_tokens=10, output_tokens=5, reasoning_output_tokens=2, total_tokens=20)
    b = TokenUsage(input_tokens=1, output_tokens=4, reasoning_output_tokens=3, total_tokens=9)
    assert (a + b).reasoning_output_tokens == 5
    assert (a + b).total_tokens == 29  # the reported totals, not input + output


def test_a_digest_leaves_out_a_zero_one_hour_cache_write_count() -> None:
    digest = TokenUsage.of(input_tokens=10, output_tokens=1, cache_write_input_tokens=4).digest_dict()
    assert digest["cache_write_input_tokens"] == 4
    assert "cache_write_1h_input_tokens" not in digest


# -- classification -------------------------------------------------------------


def test_an_unknown_retryable_provider_error_is_retried_as_unavailable() -> None:
    class Overloaded(ProviderError):  # an embedding app's own error type
        retryable = True

    verdict = classify(Overloaded("busy"))
    assert (verdict.kind, verdict.retryable, verdict.unhealthy) == ("unavailable", True, True)


def test_a_locked_database_is_retried() -> None:
    verdict = classify(apsw.LockedError("database table is locked"))
    assert (verdict.kind, verdict.retryable) == ("database_busy", True)


# -- retry ----------------------------------------------------------------------

KEY = AgentKey(run_id="r", branch_id="b", stage="plan", agent="a")


def test_the_default_backoff_doubles_from_half_a_second_up_to_eight() -> None:
    policy = RetryPolicy()
    for attempt, base in enumerate([0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0], start=1):
        assert 0.75 * base <= policy.delay(Disconnected("cut"), KEY, attempt, seed=3) <= base


def test_a_full_jitter_is_allowed() -> None:
    policy = RetryPolicy(jitter=1.0)
    assert 0.0 <= policy.delay(Disconnected("cut"), KEY, 1, seed=3) <= policy.initial


def test_jitter_is_drawn_afresh_for_each_attempt() -> None:
    # At the cap every attempt has the same base: only the jitter tells them apart.
    policy = RetryPolicy(initial=1.0, cap=1.0)
    delays = {policy.delay(Disconnected("cut"), KEY, attempt, seed=3) for attempt in range(1, 7)}
    assert len(delays) == 6


def test_a_reset_hint_sooner_than_the_backoff_does_not_cut_it_short() -> None:
    # A 429 saying "retry-after: 0" on the 4th attempt still waits its backoff.
    policy = RetryPolicy(initial=1.0, cap=8.0, jitter=0.25)
    plain = policy.delay(Disconnected("cut"), KEY, 4, seed=3)
    assert policy.delay(RateLimited("429", retry_after=0.0), KEY, 4, seed=3) == plain >= 6.0


# -- budgets --------------------------------------------------------------------


def test_the_largest_budget_is_accepted() -> None:
    assert parse_budget(10**12) == Decimal(10**12)
    with pytest.raises(ValueError, match="at most"):
        parse_budget(10**12 + 1)


def test_a_cent_and_tiny_amounts_are_shown_to_the_right_places() -> None:
    assert usd(Decimal("0.01")) == "$0.01"
    assert usd(Decimal("0.000000000012")) == "$0.000000000012"


async def test_a_zero_budget_dispatches_nothing(db_path: str, autojump_clock: trio.testing.MockClock) -> None:
    result, mock, _ = await run_with_budget(db_path, "0")
    assert result.status == "halted" and result.halt_reason == "budget_exceeded"  # type: ignore[attr-defined]
    assert len(mock.calls) == 0


async def test_the_last_resumes_budget_is_the_one_kept(db_path: str, autojump_clock: trio.testing.MockClock) -> None:
    # $0.035 a call: 0.16 halts at 0.175, 0.20 at 0.21, 0.25 at 0.28.
    halted, _, _ = await run_with_budget(db_path, "0.16")
    run_id = halted.run_id  # type: ignore[attr-defined]
    async with open_orchestrator(store=db_path, provider=priced_provider(), pipeline=priced_pipeline()) as orch:
        for budget in ("0.20", "0.25"):
            again = await orch.resume(run_id, budget=budget)
            assert again.halt_reason == "budget_exceeded"
        plain = await orch.resume(run_id)
    assert plain.budget_usd == Decimal("0.25")
    with Store.open(db_path, readonly=True) as s:
        run = s.get_run(run_id)
        assert run is not None and run.current_branch_id is not None
        branch = s.get_branch(run_id, run.current_branch_id)
        assert branch is not None and stored_budget(s, branch) == Decimal("0.25")


# -- durations and reset times ----------------------------------------------------


@pytest.mark.parametrize("text", ["250µs", "250μs"])  # micro sign and Greek mu
def test_microseconds_in_either_spelling(text: str) -> None:
    assert parse_duration(text) == pytest.approx(250e-6)


def test_a_date_without_a_time_is_no_reset_time() -> None:
    assert parse_rfc3339("2026-11-29") is None
    assert parse_reset_hint({"anthropic-ratelimit-requests-reset": "2026-11-29"}, wall_now=lambda: WALL) is None


def test_a_reset_time_without_a_zone_is_no_reset_time() -> None:
    assert parse_rfc3339("2026-11-29T17:00:00") is None
    naive = _at(30).replace("+00:00", "")
    assert parse_reset_hint({"anthropic-ratelimit-requests-reset": naive}, wall_now=lambda: WALL) is None


def test_digits_of_other_scripts_are_no_seconds() -> None:
    assert parse_seconds("٣٠") is None
    assert parse_duration("٣٠s") is None
    assert parse_reset_hint({"retry-after": "٣٠"}, wall_now=lambda: WALL) is None


# -- HTTP errors ------------------------------------------------------------------


async def test_of_two_exhausted_limits_the_later_reset_is_waited_for() -> None:
    error = await failure(
        fixed(
            429,
            headers={
                "x-ratelimit-reset-requests": "1s",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-tokens": "6m0s",
                "x-ratelimit-remaining-tokens": "0",
            },
        )
    )
    assert isinstance(error, RateLimited) and error.retry_after == 360.0


async def test_anthropics_input_token_limit_is_read() -> None:
    error = await failure(
        fixed(
            429,
            headers={
                "anthropic-ratelimit-tokens-reset": _at(5),
                "anthropic-ratelimit-input-tokens-reset": _at(40),
                "anthropic-ratelimit-input-tokens-remaining": "0",
            },
        )
    )
    assert isinstance(error, RateLimited) and error.retry_after == 40.0


def test_a_past_anthropic_reset_means_now() -> None:
    assert parse_reset_hint({"anthropic-ratelimit-requests-reset": _at(-30)}, wall_now=lambda: WALL) == 0.0


async def test_a_408_the_server_says_not_to_retry_is_a_timeout_not_retried() -> None:
    # A timeout still (a bad request was decided for good), but not retried.
    error = await failure(fixed(408, headers={"x-should-retry": "false"}))
    assert type(error) is ProviderTimeout and not classify(error).retryable


async def test_x_should_retry_is_read_case_blind() -> None:
    error = await failure(fixed(400, headers={"x-should-retry": "True"}))
    assert type(error) is ProviderUnavailable
    error = await failure(fixed(503, headers={"x-should-retry": "FALSE"}))
    assert not classify(error).retryable


async def test_a_refused_connection_while_streaming_is_not_a_cut_stream() -> None:
    error = await failure(raising(lambda r: httpx.ConnectError("[Errno 111] Connection refused", request=r)))
    assert type(error) is Disconnected
    assert "cut short" not in str(error)


def test_a_budget_too_small_to_show_is_refused() -> None:
    # It was accepted and shown as $0.000000000000, spent "of" nothing.
    from actors._budget import parse_budget, usd

    with pytest.raises(ValueError, match=r"budget must be 0 or at least 0\.000000000001 USD, got '0\.0000000000001'"):
        parse_budget("0.0000000000001")
    smallest = parse_budget("0.000000000001")
    assert smallest is not None and usd(smallest) == "$0.000000000001"
    assert parse_budget("0") == 0
