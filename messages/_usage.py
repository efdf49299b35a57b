"""Token usage, normalised across providers."""

from __future__ import annotations

import attrs


def _refuse_count(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


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

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_output_tokens: int = 0
    total_tokens: int = 0
    cache_write_input_tokens: int = 0
    cache_write_1h_input_tokens: int = 0

    def __attrs_post_init__(self) -> None:
        # Every count in one pass: a validator per field cost 7 calls and
        # 14 isinstance checks per usage, and a soak builds about five
        # usages per agent turn (7 % of its calls).  A plain int passes on
        # one type test; anything else gets the full check, field by field
        # in order, so the first wrong one is named as before.
        counts = (
            self.input_tokens,
            self.cached_input_tokens,
            self.output_tokens,
            self.reasoning_output_tokens,
            self.total_tokens,
            self.cache_write_input_tokens,
            self.cache_write_1h_input_tokens,
        )
        for value in counts:
            if type(value) is not int or value < 0:
                for name, count in zip(_COUNT_NAMES, counts):
                    _refuse_count(name, count)

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


_COUNT_NAMES = tuple(field.name for field in attrs.fields(TokenUsage))

ZERO_USAGE = TokenUsage()
