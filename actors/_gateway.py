"""The provider gateway: the one place model calls leave the process.

It owns the providers, a concurrency limit per provider, and (through
:class:`~actors._health.HealthRegistry`) each provider's rate-limit gate and
circuit breaker: a call is admitted (waiting out a 429's reset time, or
failing fast with :class:`~messages.CircuitOpen`), made, and its outcome
reported.  The fault interceptor admits and reports injected faults on the
same registry, so both kinds of fault take one path.  Every request is
answered exactly once through its reply slot - with the completion, or with
a typed :class:`~messages.ProviderError`.

Concurrency: each provider has a pool of at most ``max_concurrency`` worker
tasks and a FIFO queue.  A request joins its provider's queue; an idle
worker is woken for it, or a new one started while the pool is below the
limit.  So a slow provider never delays another's calls, the limit needs no
lock, and a queued call costs a deque slot rather than a task parked on a
limiter (a task per call, spawned and then parked, was a third of the
gateway's cost per turn).  Workers that find the queue empty park until
there is work or the gateway stops.  A provider need not checkpoint (the
zero-latency simulator does not): a worker then serves queued calls back
to back, yielding every ``_CHECKPOINT_EVERY`` calls, so a burst of N
answers costs N/64 schedule points instead of N.

A call whose caller stops waiting while the provider is working on it is
cancelled there (``call_cancelled`` event, ``Gateway.cancelled``): a hung
provider no longer holds a worker, and no answer is bought for nobody.
A call whose caller has stopped waiting (its call timeout fired while the
call was queued or at the rate-limit gate) is dropped unmade, and so is
every call still queued when the gateway is cancelled.  Each was logged as
an ``agent_call`` when it reached the gateway, so the gateway logs a
``call_dropped`` event for it on ``events``: agent_call events less
call_dropped ones are the calls handed to providers (a cancelled gateway
logs its drops shielded, for at most ``_DROP_LOG_SECONDS``).  ``events`` is
the gateway's own clone of the store's inbox, closed when it stops, so the
store writer outlives the gateway's last drop.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Mapping

import trio

from messages import (
    ZERO_USAGE,
    ActorStopped,
    BadRequest,
    Completion,
    CompletionRequest,
    CallWaiting,
    CompletionResult,
    Injection,
    Outbox,
    PersistEvent,
    ProgressEvent,
    ProviderBug,
    ProviderError,
    Reply,
    StoreWrite,
    TokenUsage,
    fail_pending,
)
from messages._messages import implausible_usage, storable_text

from ._checks import check_whole
from ._format import shown
from ._health import HealthRegistry, Permit, ProviderHealth
from ._provider import BaseProvider, _resend_check


# A worker serves at most this many calls back to back without yielding.
_CHECKPOINT_EVERY = 64
# How long a cancelled gateway may spend logging the calls it never made.
_DROP_LOG_SECONDS = 1.0
_NO_SCOPE = contextlib.nullcontext()  # reusable


class _Resend:
    """A call's way through its provider's gate and breaker again, for a
    request it sends a second time (see ``before_resend``); remembers the
    refusal it raised, so the gateway can tell it from the provider's own
    errors."""

    __slots__ = ("health", "permit", "request", "refused")

    def __init__(self, health: ProviderHealth, permit: Permit, request: CompletionRequest) -> None:
        self.health = health
        self.permit = permit
        self.request = request
        self.refused: ProviderError | None = None

    async def check(self) -> None:
        refused = await self.health.readmit(self.permit, self.request)
        if refused is not None:
            self.refused = refused
            raise refused


class _Pool:
    """One provider's queue and workers (see the module docstring)."""

    __slots__ = ("queue", "workers", "idle")

    def __init__(self) -> None:
        self.queue: collections.deque[CompletionRequest] = collections.deque()
        self.workers = 0
        self.idle = trio.lowlevel.ParkingLot()


class Gateway:
    """The provider gateway actor (see the module docstring): serves
    each :class:`~messages.CompletionRequest` from its inbox on a pool of
    at most ``max_concurrency`` workers per provider, through ``health``'s
    gates and breakers, answering each exactly once."""

    def __init__(
        self,
        providers: Mapping[str, BaseProvider],
        *,
        max_concurrency: int = 64,
        health: HealthRegistry | None = None,
        events: Outbox[StoreWrite] | None = None,
    ) -> None:
        # '2' failed as "'<' not supported", naming nothing; 1.5 was taken.
        check_whole(max_concurrency, "max_concurrency")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.providers = dict(providers)
        self.health = health if health is not None else HealthRegistry()
        self.max_concurrency = max_concurrency
        self._pools = {name: _Pool() for name in self.providers}
        self._stopping = False
        # Calls dropped unmade (their caller had stopped waiting, or the
        # gateway was cancelled with them queued).
        self.abandoned = 0
        # Calls cancelled at the provider because their caller stopped waiting.
        self.cancelled = 0
        self._events = events
        # Progress for calls that wait at a closed rate-limit gate (set by
        # the orchestrator, which owns the subscribers).
        self.publish: Callable[[ProgressEvent], None] | None = None

    def relay(self, event: ProgressEvent) -> None:
        """Pass ``event`` to :attr:`publish` once it is set (the fault
        interceptor is attached before the orchestrator that owns the
        subscribers exists).  Not a checkpoint."""
        if self.publish is not None:
            self.publish(event)

    async def run(self, inbox: trio.MemoryReceiveChannel[CompletionRequest]) -> None:
        """Serve until the inbox closes and every queued call is done.
        Cancelled: the calls in flight and in the queues are failed (their
        callers see :class:`~messages.ActorStopped`)."""
        try:
            async with trio.open_nursery() as nursery:
                try:
                    async for request in inbox:
                        self._enqueue(nursery, request)
                        # Everything already queued goes in the same step.
                        while True:
                            try:
                                request = inbox.receive_nowait()
                            except (trio.WouldBlock, trio.EndOfChannel):
                                break
                            self._enqueue(nursery, request)
                finally:
                    # Busy workers finish the queue; idle ones leave now.
                    self._stopping = True
                    for pool in self._pools.values():
                        pool.idle.unpark_all()
        finally:
            # Calls never handed to a provider: each was logged as an
            # agent_call on its way in, so each is logged as dropped too.
            unmade: list[CompletionRequest] = []
            for pool in self._pools.values():
                unmade.extend(pool.queue)
                pool.queue.clear()
            for request in unmade:
                if request.reply_to is not None:
                    request.reply_to.close()  # the caller sees ActorStopped
            fail_pending(inbox, into=unmade)
            for request in unmade:
                if request.injection is not None:
                    request.injection.withdraw()
            # (An injected fault never fired is no call: nothing to log.)
            unmade = [request for request in unmade if request.injection is None]
            if unmade and self._events is not None:
                # Shielded and bounded: the store writer outlives this
                # clone, but a stopping orchestrator must not hang on it.
                with trio.CancelScope(shield=True, deadline=trio.current_time() + _DROP_LOG_SECONDS):
                    for request in unmade:
                        await self._dropped(request, "the gateway stopped before making it")
            if self._events is not None:
                self._events.close()

    def _enqueue(self, nursery: trio.Nursery, request: CompletionRequest) -> None:
        pool = self._pools.get(request.provider)
        if pool is None:
            if request.reply_to is not None:
                request.reply_to.send(
                    CompletionResult(
                        key=request.key,
                        attempt=request.attempt,
                        error=BadRequest(f"no provider named {request.provider!r} is configured"),
                    )
                )
            return
        pool.queue.append(request)
        if pool.idle:
            pool.idle.unpark()
        elif pool.workers < self.max_concurrency:
            pool.workers += 1
            nursery.start_soon(self._work, pool)

    async def _work(self, pool: _Pool) -> None:
        served = 0
        try:
            while True:
                if pool.queue:
                    await self._serve(pool.queue.popleft())
                    served += 1
                    if served % _CHECKPOINT_EVERY == 0:
                        # A provider that answers without a schedule point
                        # (the zero-latency simulator) must not starve the
                        # agents waiting for these answers, nor cancellation.
                        await trio.lowlevel.checkpoint()
                elif self._stopping:
                    return
                else:
                    await pool.idle.park()
        finally:
            pool.workers -= 1

    async def _serve(self, request: CompletionRequest) -> None:
        reply = request.reply_to
        injection = request.injection
        if injection is not None:
            # A fault standing in for this call, served in its turn.
            await self._inject(injection, reply)
            return
        if reply is not None and reply.abandoned:
            # Its caller gave up (its call timed out) while the call was
            # queued, and has retried or failed since: a model call now
            # would be paid for and never read.
            await self._dropped(request)
            return
        waited: list[float] = []
        try:
            result = await self._complete(request, waited)
        except BaseException:
            # Cancelled mid-call: close the slot so the caller sees
            # ActorStopped rather than waiting forever.
            if reply is not None:
                reply.close()
            raise
        if reply is not None and result is not None:
            reply.send(result)
        if waited:
            # On the log beside the agent's retry event, whose delay_s is
            # only its own backoff: the time the call spent at the gate.
            # Written once the call is over: nothing may come between its
            # admission and the call (a cancellation there left no trace).
            detail = {"provider": request.provider, "waited_s": round(waited[0], 3)}
            await self._log(PersistEvent.of_attempt(request.key, request.attempt, "gate_wait", detail))

    async def _inject(self, injection: Injection, reply: Reply[CompletionResult] | None) -> None:
        if reply is not None and reply.abandoned:
            injection.withdraw()  # given up on while queued: it never fires (nor was a provider called)
            return
        # Cancelled when its caller stops waiting, as a provider call is.
        scope = trio.CancelScope()
        if reply is not None:
            reply.on_abandoned(scope.cancel)
        try:
            with scope:
                await injection.run()
        except BaseException:
            if reply is not None:
                reply.close()
            raise

    async def _complete(self, request: CompletionRequest, waited: list[float]) -> CompletionResult | None:
        """The call's result, or None if its caller had stopped waiting
        before it could be made (nothing was sent to the provider).  A call
        made after waiting at the rate-limit gate appends the wait to
        ``waited``."""
        provider = self.providers[request.provider]
        health = self.health[request.provider]
        arrived = trio.current_time()
        waiting = False

        def on_wait(left: float) -> None:
            nonlocal waiting
            waiting = True
            self.relay(CallWaiting(key=request.key, attempt=request.attempt, provider=request.provider, delay=left))

        try:
            permit, blocked = await health.admit(request, on_wait)
        except BaseException:
            # Cancelled at the gate (or the breaker's half-open wait): the
            # call never left the process, and the log says so, as for a
            # call still queued (else `metrics` counted it as possibly billed).
            with trio.CancelScope(shield=True, deadline=trio.current_time() + _DROP_LOG_SECONDS):
                await self._dropped(request, "the gateway stopped before making it")
            raise
        reply = request.reply_to
        if permit is not None and reply is not None and reply.abandoned:
            # Given up on while it waited at the rate-limit gate.
            health.abandon(permit)
            await self._dropped(request)
            return None
        if waiting and permit is not None:
            waited.append(trio.current_time() - arrived)
        if permit is None:
            # Failed fast: nothing reached the provider, nothing was billed.
            return CompletionResult(
                key=request.key, attempt=request.attempt, error=blocked, usage=ZERO_USAGE
            )
        # Cancelled when its caller stops waiting (its call timeout, or its
        # run cancelled): a call left running held a worker for as long as
        # a hung provider liked, and its answer, paid for, reached nobody -
        # a resume then bought the same attempt again.
        # (Not for a provider that answers without awaiting: nothing in its
        # call could be cancelled, and a scope per call cost 5 % of a turn.)
        call = None if provider.answers_at_once else trio.CancelScope()
        if call is not None and reply is not None:
            reply.on_abandoned(call.cancel)
        resend: _Resend | None = None
        if call is not None:
            resend = _Resend(health, permit, request)
            resend_token = _resend_check.set(resend.check)
        with call if call is not None else _NO_SCOPE:
            try:
                completion = await provider.complete(request)
            except ProviderError as error:
                if resend is not None and error is resend.refused:
                    # Its resend was refused at the gate or breaker: only
                    # its first request went out, and was answered (401).
                    health.abandon(permit)
                    return CompletionResult(key=request.key, attempt=request.attempt, error=error, usage=ZERO_USAGE)
                health.report(permit, error)
                return CompletionResult(
                    key=request.key,
                    attempt=request.attempt,
                    error=error,
                    usage=_usage_of(error),
                    model=_model_of(error),
                    requested_model=_model_of(error, "requested_model"),
                )
            except Exception as exc:  # a bug in the provider: fail this call, loudly
                said = f": {exc}" if str(exc) else ""  # trio.TooSlowError() says nothing
                bug = ProviderBug(f"{_named(request, provider)} failed: {type(exc).__name__}{said}")
                health.report(permit, bug)
                return CompletionResult(key=request.key, attempt=request.attempt, error=bug)
            except BaseException:
                health.abandon(permit)
                raise
            finally:
                if resend is not None:
                    _resend_check.reset(resend_token)
        if call is not None and call.cancelled_caught:
            # Handed to the provider, so not a call_dropped: what it cost is unknown.
            self.cancelled += 1
            await self._log(
                PersistEvent.of_attempt(
                    request.key,
                    request.attempt,
                    "call_cancelled",
                    {"provider": request.provider, "model": request.model, "reason": "caller stopped waiting"},
                )
            )
            return None
        if not isinstance(completion, Completion):
            # The same bug as raising: this call fails, not the agent that
            # would take it apart.
            bug = ProviderBug(f"{_named(request, provider)} returned {type(completion).__name__}, not a Completion")
            health.report(permit, bug)
            return CompletionResult(key=request.key, attempt=request.attempt, error=bug)
        health.report(permit, None)
        return CompletionResult(key=request.key, attempt=request.attempt, completion=completion)

    async def _dropped(self, request: CompletionRequest, reason: str = "caller stopped waiting") -> None:
        self.abandoned += 1
        await self._log(
            PersistEvent.of_attempt(
                request.key,
                request.attempt,
                "call_dropped",
                {"provider": request.provider, "model": request.model, "reason": reason},
            )
        )

    async def _log(self, event: PersistEvent) -> None:
        if self._events is None:
            return
        try:
            await self._events.send_eager(event)
        except ActorStopped:
            pass  # the store writer has stopped: the orchestrator is closing

    async def aclose(self) -> None:
        """Close each provider once (one provider may serve several names),
        every one of them even when one fails; the first failure is raised
        after the rest are closed."""
        failure: Exception | None = None
        closed: set[int] = set()
        for provider in self.providers.values():
            if id(provider) in closed:
                continue
            closed.add(id(provider))
            try:
                await provider.aclose()
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure


def _named(request: CompletionRequest, provider: object) -> str:
    # The pipeline's name for it, and what it is: an app's own provider
    # stands in for "sim" by default, and "provider 'sim' failed" read as if
    # the simulator had.
    return f"provider {request.provider!r} ({type(provider).__name__})"


def _model_of(error: ProviderError, attribute: str = "model") -> str | None:
    """The model a failed call's server named (see ``with_usage``), or with
    ``requested_model`` the one its provider asked for, if any."""
    model = getattr(error, attribute, None)
    # (Read from a stream's JSON, it may hold a lone surrogate: never stored.)
    return storable_text(shown(model)) if isinstance(model, str) and model else None


def _usage_of(error: ProviderError) -> TokenUsage | None:
    """What a failed call consumed, if the error says so in the one form the
    metrics can count; anything else (a provider's own dict, or more tokens
    than any call uses, which overflowed the run's stored totals) is
    unknown, not an error in the accumulator or store that stops the run."""
    usage = getattr(error, "usage", None)
    return usage if isinstance(usage, TokenUsage) and implausible_usage(usage) is None else None
