"""The typed retry classifier: what may be retried, and what counts against
a provider's health.

One table for every failure, injected or real: disconnect, timeout, 429,
5xx/overloaded, an open breaker and a busy database are retryable (but an
error that refuses it - a 503 with ``x-should-retry: false`` - keeps its
kind and is not retried);
authentication is permanent once a token refresh has been tried (the HTTP
provider refreshes and retries a 401 once itself; a caller that refreshes
on its own passes ``auth_retries_left``); bad request, not-found and quota
are permanent, as is
anything unrecognised (a bug should fail loudly, not be retried forever).
"""

from __future__ import annotations

from typing import Literal

import attrs

from messages import (
    AuthenticationFailed,
    BadRequest,
    CircuitOpen,
    Disconnected,
    NotFound,
    ProviderBug,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    QuotaExceeded,
    RateLimited,
)

ErrorClass = Literal[
    "disconnect",
    "timeout",
    "rate_limit",
    "unavailable",
    "circuit_open",
    "database_busy",
    "authentication",
    "bad_request",
    "not_found",
    "provider_bug",
    "quota",
    "permanent",
]

_RETRYABLE: frozenset[str] = frozenset(
    {"disconnect", "timeout", "rate_limit", "unavailable", "circuit_open", "database_busy"}
)
# Failures that say the provider itself is unwell: they feed the breaker.
# A 429 is the provider working as designed (the gate handles it); client
# errors say nothing about the provider's health.
_UNHEALTHY: frozenset[str] = frozenset({"disconnect", "timeout", "unavailable"})


@attrs.frozen(kw_only=True, slots=True)
class Classification:
    """What :func:`classify` says of a failure: its kind, whether it may
    be retried, the provider's wait hint and whether it counts against the
    provider's circuit breaker."""

    kind: ErrorClass
    retryable: bool
    retry_after: float | None = None  # the provider's (or breaker's) hint, seconds
    unhealthy: bool = False  # counts against the provider's circuit breaker


def classify(error: BaseException, *, auth_retries_left: int = 0) -> Classification:
    """Classify ``error``.  ``auth_retries_left`` > 0 makes an authentication
    failure retryable (for a caller that refreshes the token itself)."""
    kind: ErrorClass
    if isinstance(error, Disconnected):
        kind = "disconnect"
    elif isinstance(error, ProviderTimeout):
        kind = "timeout"
    elif isinstance(error, RateLimited):
        kind = "rate_limit"
    elif isinstance(error, ProviderUnavailable):
        kind = "unavailable"
    elif isinstance(error, CircuitOpen):
        kind = "circuit_open"
    elif isinstance(error, AuthenticationFailed):
        kind = "authentication"
    elif isinstance(error, QuotaExceeded):
        kind = "quota"
    elif isinstance(error, NotFound):
        kind = "not_found"
    elif isinstance(error, BadRequest):
        kind = "bad_request"
    elif isinstance(error, ProviderBug):
        kind = "provider_bug"
    elif _is_database_busy(error):
        kind = "database_busy"
    elif isinstance(error, ProviderError) and error.retryable:
        kind = "unavailable"  # a retryable ProviderError subclass we do not know
    else:
        kind = "permanent"
    # A ProviderError may refuse the retry its kind allows (a 503 with
    # "x-should-retry: false"): the kind stays, for the breaker, and for
    # the coordinator, which leaves such a stage undecided.
    refused = isinstance(error, ProviderError) and not error.retryable
    retryable = (kind in _RETRYABLE and not refused) or (kind == "authentication" and auth_retries_left > 0)
    hint = getattr(error, "retry_after", None)
    return Classification(
        kind=kind,
        retryable=retryable,
        retry_after=float(hint) if isinstance(hint, (int, float)) else None,
        unhealthy=kind in _UNHEALTHY,
    )


def _is_database_busy(error: BaseException) -> bool:
    try:
        import apsw
    except ImportError:  # pragma: no cover - apsw is a dependency
        return False
    from store import RetryableStoreError

    return isinstance(error, (RetryableStoreError, apsw.BusyError, apsw.LockedError))
