"""Provider usage payloads -> :class:`~messages.TokenUsage`.

Conclave's convention (the OpenAI/OTel one): ``input_tokens`` *includes*
cached input and ``output_tokens`` includes reasoning output.  Each provider
spells usage differently:

- OpenAI Chat Completions: ``prompt_tokens`` (includes cached),
  ``prompt_tokens_details.cached_tokens``, ``completion_tokens`` (includes
  reasoning), ``completion_tokens_details.reasoning_tokens``; the Responses
  API says ``input_tokens``/``output_tokens`` with ``*_details``.
- Anthropic Messages: ``input_tokens`` *excludes* cache reads and writes, so
  the normalised input is ``input + cache_read + cache_creation``; cache
  reads are the cached input.  Streaming ``message_delta`` usage is
  cumulative: merge it over ``message_start``'s, never sum.
- Gemini ``usageMetadata``: ``promptTokenCount`` includes cached content;
  ``candidatesTokenCount`` excludes thoughts, which are billed as output.

A payload that is missing or not a mapping gives ``None`` (unknown), never
zero.  Missing or malformed counters inside a payload count as 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from messages import TokenUsage


def _count(payload: Mapping[str, Any] | None, *path: str) -> int:
    value: Any = payload
    for part in path:
        if not isinstance(value, Mapping):
            return 0
        value = value.get(part)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return 0
    return int(value)


def usage_from_openai(payload: Any) -> TokenUsage | None:
    """Chat Completions ``usage`` (or Responses API ``usage``)."""
    if not isinstance(payload, Mapping):
        return None
    if "prompt_tokens" in payload or "completion_tokens" in payload:
        input_tokens = _count(payload, "prompt_tokens")
        cached = _count(payload, "prompt_tokens_details", "cached_tokens")
        output_tokens = _count(payload, "completion_tokens")
        reasoning = _count(payload, "completion_tokens_details", "reasoning_tokens")
    else:
        input_tokens = _count(payload, "input_tokens")
        cached = _count(payload, "input_tokens_details", "cached_tokens")
        output_tokens = _count(payload, "output_tokens")
        reasoning = _count(payload, "output_tokens_details", "reasoning_tokens")
    total = _count(payload, "total_tokens") or input_tokens + output_tokens
    return TokenUsage(
        input_tokens=input_tokens,
        cached_input_tokens=min(cached, input_tokens),
        output_tokens=output_tokens,
        reasoning_output_tokens=min(reasoning, output_tokens),
        total_tokens=total,
    )


def merge_anthropic_usage(start: Any, delta: Any) -> dict[str, Any] | None:
    """Anthropic streaming: ``message_delta`` usage fields are cumulative
    and override ``message_start``'s; fields absent from the delta keep
    their start value."""
    if not isinstance(start, Mapping) and not isinstance(delta, Mapping):
        return None
    merged: dict[str, Any] = dict(start) if isinstance(start, Mapping) else {}
    if isinstance(delta, Mapping):
        merged.update({k: v for k, v in delta.items() if v is not None})
    return merged


def usage_from_anthropic(payload: Any) -> TokenUsage | None:
    """Messages API ``usage``: input excludes cache reads and writes."""
    if not isinstance(payload, Mapping):
        return None
    fresh = _count(payload, "input_tokens")
    cache_read = _count(payload, "cache_read_input_tokens")
    cache_write = _count(payload, "cache_creation_input_tokens")
    output_tokens = _count(payload, "output_tokens")
    thinking = _count(payload, "output_tokens_details", "thinking_tokens")
    input_tokens = fresh + cache_read + cache_write
    return TokenUsage(
        input_tokens=input_tokens,
        cached_input_tokens=cache_read,
        output_tokens=output_tokens,
        reasoning_output_tokens=min(thinking, output_tokens),
        total_tokens=input_tokens + output_tokens,
    )


def usage_from_gemini(payload: Any) -> TokenUsage | None:
    """``usageMetadata``: thoughts are output (and reasoning); tool-use
    prompt tokens are input."""
    if not isinstance(payload, Mapping):
        return None
    input_tokens = _count(payload, "promptTokenCount") + _count(payload, "toolUsePromptTokenCount")
    cached = _count(payload, "cachedContentTokenCount")
    thoughts = _count(payload, "thoughtsTokenCount")
    output_tokens = _count(payload, "candidatesTokenCount") + thoughts
    total = _count(payload, "totalTokenCount") or input_tokens + output_tokens
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
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": usage.reasoning_output_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
