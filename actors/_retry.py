"""Retry policy: capped exponential backoff with seeded jitter.

What is retryable is the classifier's call (:mod:`actors._classify`).
Jitter is drawn from (seed, call identity, attempt), so the same seed gives
the same schedule however trio interleaves the agents.  A reset hint (a
429's ``retry_after``, an open breaker's time left) is honoured: the delay
is never shorter than the hint.
"""

from __future__ import annotations

import attrs

from messages import AgentKey, ProviderError

from ._checks import check_seconds
from ._classify import classify
from ._grid import on_grid
from ._rng import derive_unit


@attrs.frozen(kw_only=True, slots=True)
class RetryPolicy:
    """``max_attempts`` calls at most; the delay before attempt n+1 is
    ``min(cap, initial * multiplier**(n-1))`` less up to ``jitter`` of it,
    or, after a reset hint, the hint plus up to ``jitter`` of that base."""

    max_attempts: int = attrs.field(default=3)
    initial: float = 0.5
    multiplier: float = 2.0
    cap: float = 8.0
    jitter: float = 0.25
    call_timeout: float = 600.0
    # Seconds; 0 = off.  Attempts resume on the next tick of a grid of this
    # spacing (see actors._grid): the soak's, never a real run's.
    quantum: float = attrs.field(default=0.0, validator=lambda _, __, v: check_seconds(v, "retry quantum"))

    @max_attempts.validator
    def _check(self, attribute: attrs.Attribute[int], value: int) -> None:
        if value < 1:
            raise ValueError(f"max_attempts must be at least 1, got {value}")

    def should_retry(self, error: ProviderError, attempt: int, *, auth_retries_left: int = 0) -> bool:
        """Whether to make attempt ``attempt + 1`` after ``error``.  An
        authentication failure is retried only while ``auth_retries_left``
        (0 for agents: the provider has already refreshed and retried once)."""
        return attempt < self.max_attempts and classify(error, auth_retries_left=auth_retries_left).retryable

    def delay(self, error: ProviderError, key: AgentKey, attempt: int, seed: int, *, spec_id: str = "") -> float:
        """The pause before attempt ``attempt + 1``.  Jitter comes from
        (seed, spec, stage, agent, attempt): never from run or branch ids,
        which are random, so the same seed retries at the same moments."""
        base = min(self.cap, self.initial * self.multiplier ** (attempt - 1))
        unit = derive_unit(seed, "backoff", spec_id, key.stage, key.agent, attempt)
        backoff = base * (1.0 - self.jitter * unit)
        hint = classify(error).retry_after
        if hint is not None:
            # Never before the hint; spread past it by identity, so callers
            # told the same moment do not all come back in the same instant.
            return max(backoff, hint + base * self.jitter * unit)
        return backoff

    def resume_at(self, now: float, delay: float) -> float:
        """When to make the next attempt after pausing ``delay`` from
        ``now``: ``now + delay``, or with a ``quantum`` the first grid tick
        at or after it (never earlier, so a reset hint still holds)."""
        return on_grid(now + delay, self.quantum)
