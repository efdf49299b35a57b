"""One reader of reset-hint durations: the fault plan's
``CODEX_FAULTS_429_RESET`` and a real provider's reset headers mean the same
wait by the same text, and no text means a wait that is negative, NaN or
infinite."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors._http_errors import parse_reset_hint as header_reset
from messages import FaultPlanError, RateLimited, parse_duration, parse_reset_hint, parse_seconds

UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("120", 120.0),
        (" 1.5 ", 1.5),
        (".5", 0.5),
        ("0", 0.0),
        ("90s", 90.0),
        ("1500ms", 1.5),
        ("6m0s", 360.0),
        ("1h2m", 3720.0),
        ("250us", 250e-6),
        ("1s500ms", 1.5),  # Go writes these; the fault plan used to refuse them
        ("1.5h", 5400.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "  ", "-5", "-1s", "inf", "nan", "Infinity", "1e3", "9" * 400, "9" * 400 + "h", "6 minutes", "5x", "s",
     "1.5.5s", "1_000", "+5"],
)
def test_what_is_not_a_duration(text: str) -> None:
    assert parse_duration(text) is None
    with pytest.raises(FaultPlanError, match="cannot read"):
        parse_reset_hint(text)


def test_bare_seconds_take_no_units() -> None:
    assert parse_seconds("30") == 30.0
    assert parse_seconds("30s") is None and parse_seconds("inf") is None


parts = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 10_000).map(str), st.decimals(0, 1000, places=3).map(str)),
        st.sampled_from(sorted(UNITS)),
    ),
    min_size=1,
    max_size=4,
)


@given(parts)
def test_an_injected_429_and_a_real_one_read_the_same_hint_alike(parts: list[tuple[str, str]]) -> None:
    text = "".join(number + unit for number, unit in parts)
    expected = sum(float(number) * UNITS[unit] for number, unit in parts)
    assert parse_duration(text) == pytest.approx(expected)
    injected = parse_reset_hint(text)
    assert (injected.mode, injected.seconds) == ("relative", pytest.approx(expected))
    real = header_reset({"x-ratelimit-reset-requests": text, "x-ratelimit-remaining-requests": "0"})
    assert real == pytest.approx(expected)


@pytest.mark.parametrize("value", ["inf", "nan", "-3", "1e9999"])
def test_a_header_that_is_no_finite_wait_is_no_hint(value: str) -> None:
    # Before, "retry-after: inf" closed the provider's rate-limit gate for good.
    assert header_reset({"retry-after": value}) is None
    assert header_reset({"retry-after-ms": value}) is None
    assert header_reset({"x-ratelimit-reset-tokens": value}) is None


@pytest.mark.parametrize("hint", [math.inf, -math.inf, math.nan])
def test_a_rate_limit_built_with_a_non_finite_hint_carries_none(hint: float) -> None:
    # A user's provider or interceptor builds RateLimited directly.
    assert RateLimited("429", retry_after=hint).retry_after is None
    assert RateLimited("429", retry_after=-2.0).retry_after == 0.0
