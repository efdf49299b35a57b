"""The provider gateway: the one place model calls leave the process.

It owns the providers, a concurrency limit per provider, and (through
:class:`~actors._health.HealthRegistry`) each provider's rate-limit gate and
circuit breaker: a call is admitted (waiting out a 429's reset time, or
failing fast with :class:`~messages.CircuitOpen`), made, and its outcome
reported.  The fault interceptor admits and reports injected faults on the
same registry, so both kinds of fault take one path.  Each request
is served in a task of its own (so a slow provider never delays another's
calls) and answered exactly once through its reply slot - with the
completion, or with a typed :class:`~messages.ProviderError`.
"""

from __future__ import annotations

from collections.abc import Mapping

import trio

from messages import (
    ZERO_USAGE,
    BadRequest,
    CompletionRequest,
    CompletionResult,
    ProviderError,
    fail_pending,
)

from ._health import HealthRegistry
from ._provider import BaseProvider


class Gateway:
    def __init__(
        self,
        providers: Mapping[str, BaseProvider],
        *,
        max_concurrency: int = 64,
        health: HealthRegistry | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.providers = dict(providers)
        self.health = health if health is not None else HealthRegistry()
        self._limits = {name: trio.CapacityLimiter(max_concurrency) for name in self.providers}

    async def run(self, inbox: trio.MemoryReceiveChannel[CompletionRequest]) -> None:
        """Serve until the inbox closes and every call in flight is done."""
        try:
            async with trio.open_nursery() as nursery:
                async for request in inbox:
                    nursery.start_soon(self._serve, request)
                    # Spawn for everything already queued in the same step.
                    while True:
                        try:
                            request = inbox.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        nursery.start_soon(self._serve, request)
        finally:
            fail_pending(inbox)

    async def _serve(self, request: CompletionRequest) -> None:
        reply = request.reply_to
        try:
            result = await self._complete(request)
        except BaseException:
            # Cancelled mid-call: close the slot so the caller sees
            # ActorStopped rather than waiting forever.
            if reply is not None:
                reply.close()
            raise
        if reply is not None:
            reply.send(result)

    async def _complete(self, request: CompletionRequest) -> CompletionResult:
        provider = self.providers.get(request.provider)
        if provider is None:
            return CompletionResult(
                key=request.key,
                attempt=request.attempt,
                error=BadRequest(f"no provider named {request.provider!r} is configured"),
            )
        health = self.health[request.provider]
        limiter = self._limits[request.provider]
        try:
            # A free slot costs no scheduling round; only a full limit waits.
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await limiter.acquire()
        try:
            permit, blocked = await health.admit(request)
            if permit is None:
                # Failed fast: nothing reached the provider, nothing was billed.
                return CompletionResult(
                    key=request.key, attempt=request.attempt, error=blocked, usage=ZERO_USAGE
                )
            try:
                completion = await provider.complete(request)
            except ProviderError as error:
                health.report(permit, error)
                return CompletionResult(
                    key=request.key,
                    attempt=request.attempt,
                    error=error,
                    usage=getattr(error, "usage", None),
                )
            except Exception as exc:  # a bug in the provider: fail this call, loudly
                bug = ProviderError(f"provider {request.provider!r} failed: {type(exc).__name__}: {exc}")
                health.report(permit, bug)
                return CompletionResult(key=request.key, attempt=request.attempt, error=bug)
            except BaseException:
                health.abandon(permit)
                raise
        finally:
            limiter.release()
        health.report(permit, None)
        return CompletionResult(key=request.key, attempt=request.attempt, completion=completion)

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()
