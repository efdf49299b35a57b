"""Retry policy: capped exponential backoff with seeded jitter.

Jitter is drawn from (seed, call identity, attempt), so the same seed gives
the same schedule however trio interleaves the agents.
"""

from __future__ import annotations

import attrs

from messages import AgentKey, ProviderError, RateLimited, is_retryable

from ._rng import derive_unit


@attrs.frozen(kw_only=True, slots=True)
class RetryPolicy:
    """``max_attempts`` calls at most; the delay before attempt n+1 is
    ``min(cap, initial * multiplier**(n-1))`` less up to ``jitter`` of it,
    or the provider's reset hint when it gave one (never less)."""

    max_attempts: int = attrs.field(default=3)
    initial: float = 0.5
    multiplier: float = 2.0
    cap: float = 8.0
    jitter: float = 0.25
    call_timeout: float = 600.0

    @max_attempts.validator
    def _check(self, attribute: attrs.Attribute[int], value: int) -> None:
        if value < 1:
            raise ValueError(f"max_attempts must be at least 1, got {value}")

    def should_retry(self, error: ProviderError, attempt: int) -> bool:
        return is_retryable(error) and attempt < self.max_attempts

    def delay(self, error: ProviderError, key: AgentKey, attempt: int, seed: int) -> float:
        base = min(self.cap, self.initial * self.multiplier ** (attempt - 1))
        unit = derive_unit(seed, "backoff", key.run_id, key.branch_id, key.stage, key.agent, attempt)
        backoff = base * (1.0 - self.jitter * unit)
        if isinstance(error, RateLimited) and error.retry_after is not None:
            return max(backoff, error.retry_after)
        return backoff
