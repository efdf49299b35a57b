"""Provider usage payloads -> :class:`~messages.TokenUsage`.

Conclave's convention (the OpenAI/OTel one): ``input_tokens`` *includes*
cached input and ``output_tokens`` includes reasoning output.  Each provider
spells usage differently:

- OpenAI Chat Completions: ``prompt_tokens`` (includes cached),
  ``prompt_tokens_details.cached_tokens``, ``completion_tokens`` (includes
  reasoning), ``completion_tokens_details.reasoning_tokens``, and (newer)
  ``prompt_tokens_details.cache_write_tokens``; the Responses API says
  ``input_tokens``/``output_tokens`` with ``*_details``.
- Anthropic Messages: ``input_tokens`` *excludes* cache reads and writes, so
  the normalised input is ``input + cache_read + cache_creation``; cache
  reads are the cached input, ``cache_creation_input_tokens`` the cache
  writes (``cache_creation.ephemeral_1h_input_tokens`` of them to the
  one-hour cache, priced higher).  Streaming ``message_delta`` usage is
  cumulative: merge it over ``message_start``'s, never sum.
- Gemini ``usageMetadata``: ``promptTokenCount`` includes cached content;
  ``candidatesTokenCount`` excludes thoughts, which are billed as output.

A payload that is missing or not a mapping gives ``None`` (unknown), never
zero.  So does one without its input or output count (``{}``, or only
``total_tokens``; a ``null`` count): every real response has both, and
counted as zero the call would be priced at nothing and hidden from a
budget.  A detail counter missing (cached, reasoning, cache writes) counts
as 0 (providers leave out what they have none of); one that is there but
not a whole number >= 0 (``-5``, ``"7"``) makes the whole usage unknown.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from messages import TokenUsage
from messages._messages import MAX_CALL_TOKENS, implausible_usage


class _Malformed(Exception):
    """A counter is present but unreadable: the usage is unknown."""


def _count(payload: Mapping[str, Any] | None, *path: str) -> int:
    value: Any = payload
    for part in path:
        if not isinstance(value, Mapping):
            return 0
        value = value.get(part)
    if value is None:
        return 0
    if not _is_count(value):
        raise _Malformed(path)
    return int(value)


def _is_count(value: Any) -> bool:
    """A whole number of tokens: not past any real call (nor what SQLite's
    totals can hold), and not 10.7, which was cut to 10 without a word."""
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and 0 <= value <= MAX_CALL_TOKENS
        and float(value).is_integer()
    )


def _required(payload: Mapping[str, Any], key: str) -> int:
    if payload.get(key) is None:
        raise _Malformed((key,))
    return _count(payload, key)


def _total(reported: int, parts: int) -> int:
    """The server's total, unless it is less than input + output: every
    provider's total holds both (OpenAI's is their sum, Gemini's adds
    thoughts and tool-use prompts too), so a smaller one (prompt 100,
    completion 5, total 3) is wrong, and was stored and summed as given.
    Missing or 0, the sum too.  A larger total is kept: it may count
    tokens not broken out here."""
    return max(reported, parts)


def _unknown_if_malformed(read: Callable[[Any], TokenUsage | None]) -> Callable[[Any], TokenUsage | None]:
    @functools.wraps(read)
    def guarded(payload: Any) -> TokenUsage | None:
        try:
            usage = read(payload)
        except _Malformed:
            return None
        # Each count within bounds can still sum past them (10**12 input
        # and 1 output): such an answer stands, its usage unknown - the
        # Completion refused it, and the run halted on a good answer.
        return usage if usage is None or implausible_usage(usage) is None else None

    return guarded


@_unknown_if_malformed
def usage_from_openai(payload: Any) -> TokenUsage | None:
    """Chat Completions ``usage`` (or Responses API ``usage``)."""
    if not isinstance(payload, Mapping):
        return None
    if "prompt_tokens" in payload or "completion_tokens" in payload:
        input_tokens = _required(payload, "prompt_tokens")
        details = "prompt_tokens_details"
        output_tokens = _required(payload, "completion_tokens")
        reasoning = _count(payload, "completion_tokens_details", "reasoning_tokens")
    else:
        input_tokens = _required(payload, "input_tokens")
        details = "input_tokens_details"
        output_tokens = _required(payload, "output_tokens")
        reasoning = _count(payload, "output_tokens_details", "reasoning_tokens")
    cached = min(_count(payload, details, "cached_tokens"), input_tokens)
    total = _total(_count(payload, "total_tokens"), input_tokens + output_tokens)
    return TokenUsage(
        input_tokens=input_tokens,
        cached_input_tokens=cached,
        output_tokens=output_tokens,
        reasoning_output_tokens=min(reasoning, output_tokens),
        total_tokens=total,
        # Parts of the input, as cache reads are: never more than is left.
        cache_write_input_tokens=min(_count(payload, details, "cache_write_tokens"), input_tokens - cached),
    )


def merge_anthropic_usage(start: Any, delta: Any) -> dict[str, Any] | None:
    """Anthropic streaming: ``message_delta`` usage fields are cumulative
    and override ``message_start``'s; fields absent from the delta (or
    null) keep their start value.

    Being cumulative, a count in the delta never lowers one already given:
    SGLang sends ``"input_tokens": 0`` in its delta, and the call's input
    (the bulk of its price) was recorded as nothing.  So where both are
    counts the larger stands; a delta value that is no count (``-5``,
    ``"7"``) still replaces, and makes the usage unknown as it would alone.
    Nested counters (``cache_creation``) merge the same way."""
    if not isinstance(start, Mapping) and not isinstance(delta, Mapping):
        return None
    merged: dict[str, Any] = dict(start) if isinstance(start, Mapping) else {}
    if isinstance(delta, Mapping):
        for key, value in delta.items():
            if value is None:
                continue
            before = merged.get(key)
            if isinstance(before, Mapping) and isinstance(value, Mapping):
                merged[key] = merge_anthropic_usage(before, value)
            elif _is_count(before) and _is_count(value) and value < before:
                continue
            else:
                merged[key] = value
    return merged


@_unknown_if_malformed
def usage_from_anthropic(payload: Any) -> TokenUsage | None:
    """Messages API ``usage``: input excludes cache reads and writes."""
    if not isinstance(payload, Mapping):
        return None
    fresh = _required(payload, "input_tokens")
    cache_read = _count(payload, "cache_read_input_tokens")
    cache_write = _count(payload, "cache_creation_input_tokens")
    output_tokens = _required(payload, "output_tokens")
    thinking = _count(payload, "output_tokens_details", "thinking_tokens")
    hour = _count(payload, "cache_creation", "ephemeral_1h_input_tokens")
    if payload.get("cache_creation_input_tokens") is None:
        # Only the breakdown given (the total absent or null): its two
        # parts are the writes.
        cache_write = _count(payload, "cache_creation", "ephemeral_5m_input_tokens") + hour
    input_tokens = fresh + cache_read + cache_write
    return TokenUsage(
        input_tokens=input_tokens,
        cached_input_tokens=cache_read,
        output_tokens=output_tokens,
        reasoning_output_tokens=min(thinking, output_tokens),
        total_tokens=input_tokens + output_tokens,
        cache_write_input_tokens=cache_write,
        cache_write_1h_input_tokens=min(hour, cache_write),
    )


@_unknown_if_malformed
def usage_from_gemini(payload: Any) -> TokenUsage | None:
    """``usageMetadata``: thoughts are output (and reasoning); tool-use
    prompt tokens are input."""
    if not isinstance(payload, Mapping):
        return None
    input_tokens = _count(payload, "promptTokenCount") + _count(payload, "toolUsePromptTokenCount")
    cached = _count(payload, "cachedContentTokenCount")
    thoughts = _count(payload, "thoughtsTokenCount")
    output_tokens = _count(payload, "candidatesTokenCount") + thoughts
    total = _total(_count(payload, "totalTokenCount"), input_tokens + output_tokens)
    return TokenUsage(
        input_tokens=input_tokens,
        cached_input_tokens=min(cached, input_tokens),
        output_tokens=output_tokens,
        reasoning_output_tokens=thoughts,
        total_tokens=total,
    )


def usage_to_openai(usage: TokenUsage) -> dict[str, Any]:
    """The inverse of :func:`usage_from_openai` (serve-mock sends this)."""
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.cached_input_tokens,
            "cache_write_tokens": usage.cache_write_input_tokens,
            "audio_tokens": 0,
        },
        "completion_tokens_details": {
            "reasoning_tokens": usage.reasoning_output_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
