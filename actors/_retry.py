"""Retry policy: capped exponential backoff with seeded jitter.

What is retryable is the classifier's call (:mod:`actors._classify`).
Jitter is drawn from (seed, call identity, attempt), so the same seed gives
the same schedule however trio interleaves the agents.  A reset hint (a
429's ``retry_after``, an open breaker's time left) is honoured: the delay
is never shorter than the hint - up to ``max_wait``.  A call told to come
back later than that gives up at once with the hint named: a daily quota's
"retry after 86400" would otherwise park the run for a day in silence (the
OpenAI SDK gives up above 120 s; 600 s here, the call timeout, so the
documented ``6m0s`` token resets are still waited out).
"""

from __future__ import annotations

import math

import attrs

from messages import AgentKey, ProviderError

from ._checks import check_number, check_seconds, check_wait, check_whole
from ._classify import classify
from ._format import whole_seconds
from ._grid import on_grid
from ._rng import derive_unit


@attrs.frozen(kw_only=True, slots=True)
class RetryPolicy:
    """``max_attempts`` calls at most; the delay before attempt n+1 is
    ``min(cap, initial * multiplier**(n-1))`` less up to ``jitter`` of it,
    or, after a reset hint, the hint plus up to ``jitter`` of that base."""

    max_attempts: int = attrs.field(default=3, validator=attrs.validators.instance_of(int))
    initial: float = attrs.field(default=0.5, validator=lambda _, __, v: check_seconds(v, "initial"))
    multiplier: float = 2.0
    cap: float = attrs.field(default=8.0, validator=lambda _, __, v: check_seconds(v, "cap"))
    jitter: float = 0.25
    # Seconds a model call may take; math.inf: no limit.
    call_timeout: float = 600.0
    # Seconds; 0 = off.  Attempts resume on the next tick of a grid of this
    # spacing (see actors._grid): the soak's, never a real run's.
    quantum: float = attrs.field(default=0.0, validator=lambda _, __, v: check_seconds(v, "retry quantum"))
    # Seconds: the longest reset hint a retry waits out; math.inf: any.
    max_wait: float = 600.0

    def __attrs_post_init__(self) -> None:
        # Checked here, not deep in an agent's first retry or call.
        check_whole(self.max_attempts, "max_attempts")
        for name in ("multiplier", "jitter", "call_timeout"):
            check_number(getattr(self, name), name)
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if not 1.0 <= self.multiplier < math.inf:  # NaN fails too
            raise ValueError(f"multiplier must be a finite number >= 1, got {self.multiplier!r}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter!r}")
        if not self.call_timeout > 0:
            raise ValueError(f"call_timeout must be > 0 seconds (math.inf: no limit), got {self.call_timeout!r}")
        check_wait(self.max_wait, "max_wait")

    def should_retry(self, error: ProviderError, attempt: int, *, auth_retries_left: int = 0) -> bool:
        """Whether to make attempt ``attempt + 1`` after ``error``.  An
        authentication failure is retried only while ``auth_retries_left``
        (0 for agents: the provider has already refreshed and retried once),
        and never after a reset hint beyond ``max_wait``."""
        if attempt >= self.max_attempts:
            return False
        verdict = classify(error, auth_retries_left=auth_retries_left)
        return verdict.retryable and self.wait_refused(verdict.retry_after) is None

    def round_attempt(self, attempt: int) -> int:
        """Which attempt of its round ``attempt`` is: rounds of
        ``max_attempts`` (a resume after a halt for want of answers grants
        a failed agent another round, its numbering continued)."""
        return (attempt - 1) % self.max_attempts + 1

    def wait_refused(self, hint: float | None) -> str | None:
        """Why a reset ``hint`` (seconds) is too far off to wait out, or
        None if it is not."""
        if hint is None or hint <= self.max_wait:
            return None
        return f"resets in {whole_seconds(hint)}, later than the {self.max_wait:.0f}s a retry waits (max_wait; --max-retry-wait)"

    def delay(self, error: ProviderError, key: AgentKey, attempt: int, seed: int, *, spec_id: str = "") -> float:
        """The pause before attempt ``attempt + 1``.  Jitter comes from
        (seed, spec, stage, agent, attempt): never from run or branch ids,
        which are random, so the same seed retries at the same moments."""
        try:
            grown = self.initial * self.multiplier ** (attempt - 1)
        except OverflowError:  # 2.0 ** 1024: past any cap (--max-attempts 1100 crashed the run)
            grown = math.inf if self.initial > 0 else 0.0
        base = min(self.cap, grown)
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
