"""Typed errors that travel in messages.

Real providers (over httpx), the embedded simulator and the fault interceptor
all produce these same classes, so an agent cannot tell an injected fault
from a real one: both go through :func:`is_retryable` and the same backoff.
"""

from __future__ import annotations

import math
from typing import ClassVar


class ConclaveError(Exception):
    """Base class of every error Conclave raises on purpose."""


class ActorStopped(ConclaveError):
    """A request was sent to an actor that has stopped, or that stopped
    before answering.  Work that can no longer be done fails loudly."""


class Undelivered(ActorStopped):
    """An interceptor neither forwarded nor answered an item that its
    receiver waits for and that has no reply slot to fail (an agent's
    request, its reply to the coordinator): the run would hang for ever."""


class ProviderError(ConclaveError):
    """A model call failed.  ``kind`` names the failure class for logs,
    events and the soak's counters; ``retryable`` says whether an agent may
    try again."""

    kind: ClassVar[str] = "provider_error"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and isinstance(other, ProviderError) and other.args == self.args

    def __hash__(self) -> int:
        return hash((type(self), self.args))


class Disconnected(ProviderError):
    """The connection or stream broke before the completion arrived."""

    kind = "disconnect"
    retryable = True


class ProviderTimeout(ProviderError):
    """The call took longer than its deadline."""

    kind = "timeout"
    retryable = True


def _hint(retry_after: float | None) -> float | None:
    """A reset hint in seconds, or None.  NaN or infinity would close a
    gate for good (or never), and NaN read "resets in nans": no hint, and
    the agent backs off instead; a negative one means now."""
    if retry_after is None or not math.isfinite(retry_after):
        return None
    return max(retry_after, 0.0)


class RateLimited(ProviderError):
    """HTTP 429.  ``retry_after`` is the provider's reset hint in seconds
    from now (``None`` when it gave none)."""

    kind = "rate_limit"
    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = _hint(retry_after)


class ProviderUnavailable(ProviderError):
    """5xx, 529 or "overloaded": the provider may recover.  ``retry_after``:
    the server's ``Retry-After``, if it sent one (seconds from now)."""

    kind = "unavailable"
    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = _hint(retry_after)


class CircuitOpen(ProviderError):
    """The provider's circuit breaker is open: the call failed fast.
    ``retry_after`` is how long until the breaker lets a probe through."""

    kind = "circuit_open"
    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = _hint(retry_after)


class AuthenticationFailed(ProviderError):
    """401/403: credentials are missing, invalid or expired."""

    kind = "authentication"


class BadRequest(ProviderError):
    """400/422 (404: :class:`NotFound`): the request itself is wrong;
    retrying cannot help."""

    kind = "bad_request"


class NotFound(BadRequest):
    """404 not about a model, or a redirect (not followed): a wrong base
    URL, fixed outside the run (then ``resume --retry-failed --base-url``),
    as a key or a quota is."""

    kind = "not_found"


class ProviderBug(ProviderError):
    """A provider raised something that is no :class:`ProviderError`, or
    returned something that is no completion: a bug in the provider's code
    (an app's own, most likely), fixed outside the run, then
    ``resume --retry-failed``, as a wrong key is."""

    kind = "provider_bug"


class QuotaExceeded(ProviderError):
    """The account is out of quota: permanent until a human acts."""

    kind = "quota"


def is_retryable(error: BaseException) -> bool:
    """Whether an agent may retry after ``error``."""
    return isinstance(error, ProviderError) and error.retryable
