"""The provider seam: one method, like httpx's transports.

A provider turns one :class:`~messages.CompletionRequest` into a
:class:`~messages.Completion` or raises a :class:`~messages.ProviderError`.
The gateway owns concurrency limits, rate-limit gates and breakers; a
provider only speaks its API.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from messages import Completion, CompletionRequest

# Set by the gateway around each call of a provider that awaits: how to pass
# the provider's gate and breaker again (see before_resend).
_resend_check: ContextVar[Callable[[], Awaitable[None]] | None] = ContextVar("_resend_check", default=None)


async def before_resend() -> None:
    """For a provider that sends a call's request a second time within one
    call (the HTTP providers, after a token refresh): await this first.

    The call's admission covered its first request only.  Under the
    gateway this waits at the provider's rate-limit gate as a new call
    would (a 429 that reached another call meanwhile holds the resend back
    until its reset), and raises the refusal a new call would get
    (:class:`~messages.RateLimited`, :class:`~messages.CircuitOpen`), which
    the call then fails with.  A checkpoint only if it waits; outside a
    gateway it returns at once.
    """
    check = _resend_check.get()
    if check is not None:
        await check()


class BaseProvider:
    """Subclass and implement :meth:`complete`.

    ``complete`` may be cancelled at any checkpoint; it must then leave no
    work behind (httpx closes the request's response for us).  Failures are
    raised as :class:`~messages.ProviderError` subclasses; anything else is a
    bug in the provider and fails the call permanently.
    """

    name: str = "provider"
    # True only if complete() never awaits (answers in the step it is
    # called): nothing in it could be cancelled, so the gateway spends no
    # cancel scope on its calls.  A provider that awaits must leave it False.
    answers_at_once: bool = False
    # True if a call may cost money (the default: an app's own provider
    # may): each call is then logged durably before it is made, so a crash
    # mid-call leaves it counted as possibly billed.  The simulator and
    # MockProvider, which cost nothing, leave that write to group commit.
    bills: bool = True

    async def complete(self, request: CompletionRequest) -> Completion:
        """Answer ``request``, or raise a :class:`~messages.ProviderError`.

        The contract every override keeps: the gateway calls it from one of
        its workers, many at once, and cancels it when its caller stops
        waiting.  Cancelled, it must leave no work behind; what the call
        cost is then unknown (it was handed to the provider)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release connections; called once when the orchestrator closes."""


Handler = Callable[[CompletionRequest], "Completion | Awaitable[Completion]"]


class MockProvider(BaseProvider):
    """A provider from a function (sync or async) of the request: the mock
    implementation of the seam, for tests."""

    bills = False  # (see BaseProvider.bills)

    def __init__(self, handler: Handler, *, name: str = "mock") -> None:
        if not callable(handler):
            # Else every call fails later with "'NoneType' object is not callable".
            raise TypeError(f"MockProvider needs a function of the request, got {handler!r}")
        if not isinstance(name, str) or not name.strip() or not name.isprintable():
            # As a pipeline's provider names must be: name=3 or "" was taken,
            # and no agent could be routed to it.
            raise TypeError(f"MockProvider's name must be a non-empty printable string, got {name!r}")
        self._handler = handler
        self.name = name
        self.calls: list[CompletionRequest] = []

    async def complete(self, request: CompletionRequest) -> Completion:
        self.calls.append(request)
        result = self._handler(request)
        if inspect.isawaitable(result):
            return await result
        return result
