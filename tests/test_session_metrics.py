"""SessionMetrics: the reference's checks, ported, plus properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors import SessionMetrics
from messages import ZERO_USAGE, TokenUsage


def turn(inp: int, out: int, cached: int = 0) -> TokenUsage:
    return TokenUsage.of(input_tokens=inp, output_tokens=out, cached_input_tokens=cached)


def test_two_turns_accumulate_and_estimate_their_mean() -> None:
    m = SessionMetrics()
    m.record_turn(turn(1_000, 500))
    m.record_turn(turn(4_000, 2_000))
    assert (m.running_total.input_tokens, m.running_total.output_tokens) == (5_000, 2_500)
    assert m.turn_count == 2
    assert m.last_turn == turn(4_000, 2_000)
    assert m.estimated_next_prompt_tokens() == 2_500


def test_sync_absolute_replaces_totals_and_restarts_the_window() -> None:
    m = SessionMetrics()
    m.record_turn(turn(50_000, 1))
    m.record_replay()
    m.record_duplicate_items(7)
    m.sync_absolute(turn(10_000, 4_000), turn(3_000, 1_000), 3)
    assert m.turn_count == 3
    assert m.running_total == turn(10_000, 4_000)
    assert m.last_turn == turn(3_000, 1_000)
    assert m.estimated_next_prompt_tokens() == 3_000
    assert (m.replay_updates, m.duplicate_items) == (0, 0)
    assert m.recent_prompt_tokens == (3_000,)


def test_window_evicts_the_oldest_and_takes_the_integer_mean() -> None:
    m = SessionMetrics()
    for tokens in (1_000, 2_000, 3_000, 6_000):
        m.record_turn(turn(tokens, 0))
    assert m.recent_prompt_tokens == (2_000, 3_000, 6_000)
    assert m.estimated_next_prompt_tokens() == 3_666


def test_estimate_uses_non_cached_input() -> None:
    m = SessionMetrics()
    m.record_turn(turn(5_000, 100, cached=3_000))
    assert m.estimated_next_prompt_tokens() == 2_000


def test_reset_gives_the_default_estimate_and_keeps_the_window_size() -> None:
    m = SessionMetrics(window=2)
    m.record_turn(turn(9_000, 9))
    m.record_replay()
    m.reset()
    assert m.estimated_next_prompt_tokens() == 4_000
    assert (m.turn_count, m.replay_updates, m.running_total) == (0, 0, ZERO_USAGE)
    assert m.window == 2
    for tokens in (1_000, 2_000, 3_000):
        m.record_turn(turn(tokens, 0))
    assert m.recent_prompt_tokens == (2_000, 3_000)


def test_blended_total_includes_cached_input() -> None:
    m = SessionMetrics()
    m.record_turn(turn(10_000, 5_000, cached=4_000))
    assert m.blended_total() == 15_000


def test_duplicate_and_replay_counters() -> None:
    m = SessionMetrics()
    m.record_duplicate_items(5)
    m.record_duplicate_items(3)
    assert m.duplicate_items == 8
    m.record_duplicate_items(0)
    assert m.duplicate_items == 8
    m.set_duplicate_items(100)
    assert m.duplicate_items == 100
    m.record_replay()
    m.record_replay()
    assert m.replay_updates == 2
    m.set_replay_updates(9)
    assert m.replay_updates == 9


def test_zero_turns_are_skipped_by_the_window_but_counted() -> None:
    m = SessionMetrics()
    m.record_turn(turn(2_000, 1))
    m.record_turn(turn(0, 10))
    m.record_turn(turn(1_000, 10, cached=1_000))  # all cached: 0 non-cached
    assert m.turn_count == 3
    assert m.recent_prompt_tokens == (2_000,)
    assert m.estimated_next_prompt_tokens() == 2_000


def test_estimate_falls_back_to_the_last_turn_then_4000() -> None:
    m = SessionMetrics()
    assert m.estimated_next_prompt_tokens() == 4_000
    m.sync_absolute(turn(10, 10), turn(0, 5), 1)
    assert m.estimated_next_prompt_tokens() == 4_000


@pytest.mark.parametrize("window", [0, -1, 1.5])
def test_window_must_be_positive(window: object) -> None:
    with pytest.raises(ValueError, match="window"):
        SessionMetrics(window=window)  # type: ignore[arg-type]


usages = st.builds(
    lambda inp, cached_pct, out: TokenUsage.of(
        input_tokens=inp, cached_input_tokens=inp * cached_pct // 100, output_tokens=out
    ),
    st.integers(0, 2_000_000),
    st.integers(0, 100),
    st.integers(0, 200_000),
)


@given(st.lists(usages, max_size=40), st.integers(1, 6))
def test_totals_equal_the_sum_of_recorded_turns(turns: list[TokenUsage], window: int) -> None:
    m = SessionMetrics(window=window)
    for u in turns:
        m.record_turn(u)
    expected = sum(turns, ZERO_USAGE)
    assert m.running_total == expected
    assert m.turn_count == len(turns)
    assert m.blended_total() == expected.input_tokens + expected.output_tokens


@given(st.lists(usages, min_size=1, max_size=40), st.integers(1, 6))
def test_estimate_lies_within_the_window(turns: list[TokenUsage], window: int) -> None:
    m = SessionMetrics(window=window)
    for u in turns:
        m.record_turn(u)
    recent = [u.non_cached_input_tokens for u in turns if u.non_cached_input_tokens > 0][-window:]
    assert list(m.recent_prompt_tokens) == recent
    estimate = m.estimated_next_prompt_tokens()
    if recent:
        assert min(recent) <= estimate <= max(recent)
    else:
        assert estimate == 4_000


def test_the_tally_sums_cache_writes_as_usage_addition_does() -> None:
    from actors._session_metrics import Tally
    from messages import TokenUsage

    odd = TokenUsage.of(input_tokens=10, cache_write_1h_input_tokens=5)  # 1h alone: nothing enforces writes >= 1h
    usual = TokenUsage.of(input_tokens=10, cache_write_input_tokens=4, cache_write_1h_input_tokens=1)
    tally = Tally()
    for usage in (odd, usual, odd):
        tally.add(usage)
    assert tally.usage() == odd + usual + odd


def test_a_turn_claiming_more_cached_than_input_pushes_nothing() -> None:
    # (record_turn computes the non-cached input itself now.)
    m = SessionMetrics()
    m.record_turn(TokenUsage(input_tokens=10, cached_input_tokens=30, total_tokens=10))
    assert m.recent_prompt_tokens == ()
    m.record_turn(turn(500, 1, cached=200))
    assert m.recent_prompt_tokens == (300,)
