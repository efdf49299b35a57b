"""Token usage, normalised across providers."""

from __future__ import annotations

import attrs


def _non_negative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{attribute.name} must be a non-negative int, got {value!r}")


@attrs.frozen(kw_only=True, slots=True)
class TokenUsage:
    """Tokens used by one call, or a sum of calls.

    ``input_tokens`` *includes* cached input (the OpenAI/OTel convention):
    both cache reads (``cached_input_tokens``) and cache writes
    (``cache_write_input_tokens``, of which ``cache_write_1h_input_tokens``
    went to Anthropic's one-hour cache) are parts of it, priced at their own
    rates.  ``output_tokens`` includes reasoning output.  ``total_tokens`` is
    what the provider reported, or input + output when it reported nothing
    or less than that (no real total is below the sum of its parts).
    """

    input_tokens: int = attrs.field(default=0, validator=_non_negative)
    cached_input_tokens: int = attrs.field(default=0, validator=_non_negative)
    output_tokens: int = attrs.field(default=0, validator=_non_negative)
    reasoning_output_tokens: int = attrs.field(default=0, validator=_non_negative)
    total_tokens: int = attrs.field(default=0, validator=_non_negative)
    cache_write_input_tokens: int = attrs.field(default=0, validator=_non_negative)
    cache_write_1h_input_tokens: int = attrs.field(default=0, validator=_non_negative)

    @classmethod
    def of(
        cls,
        *,
        input_tokens: int = 0,
        cached_input_tokens: int = 0,
        output_tokens: int = 0,
        reasoning_output_tokens: int = 0,
        cache_write_input_tokens: int = 0,
        cache_write_1h_input_tokens: int = 0,
    ) -> TokenUsage:
        """Build a usage whose total is input + output."""
        return cls(
            input_tokens=input_tokens,
            cached_input_tokens=cached_input_tokens,
            output_tokens=output_tokens,
            reasoning_output_tokens=reasoning_output_tokens,
            total_tokens=input_tokens + output_tokens,
            cache_write_input_tokens=cache_write_input_tokens,
            cache_write_1h_input_tokens=cache_write_1h_input_tokens,
        )

    @property
    def non_cached_input_tokens(self) -> int:
        return max(0, self.input_tokens - self.cached_input_tokens)

    def __add__(self, other: TokenUsage) -> TokenUsage:
        if not isinstance(other, TokenUsage):
            return NotImplemented
        return TokenUsage(
            input_tokens=self.input_tokens + other.input_tokens,
            cached_input_tokens=self.cached_input_tokens + other.cached_input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            reasoning_output_tokens=self.reasoning_output_tokens + other.reasoning_output_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            cache_write_input_tokens=self.cache_write_input_tokens + other.cache_write_input_tokens,
            cache_write_1h_input_tokens=self.cache_write_1h_input_tokens + other.cache_write_1h_input_tokens,
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "output_tokens": self.output_tokens,
            "reasoning_output_tokens": self.reasoning_output_tokens,
            "total_tokens": self.total_tokens,
            "cache_write_input_tokens": self.cache_write_input_tokens,
            "cache_write_1h_input_tokens": self.cache_write_1h_input_tokens,
        }

    def digest_dict(self) -> dict[str, int]:
        """:meth:`as_dict` for a run's digest: cache writes only when there
        are any, so a digest taken before they were counted (and every run
        without them) stays what it was."""
        counts = self.as_dict()
        for name in ("cache_write_input_tokens", "cache_write_1h_input_tokens"):
            if not counts[name]:
                del counts[name]
        return counts


ZERO_USAGE = TokenUsage()
