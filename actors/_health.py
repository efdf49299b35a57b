"""Provider health: the rate-limit gate and circuit breaker of each provider,
shared by the gateway and the fault interceptor.

Why shared: the fault interceptor sits on the gateway's *inbox*, before the
gateway, and answers for the provider.  For an injected fault to take
exactly the path of a real one, it must be admitted the way a real call
is, and its outcome must count the way a real outcome does.  So both the
gateway (around ``provider.complete``) and the interceptor (around an
injected fault) do ``admit`` -> call (or inject) -> ``report``, on the same
:class:`ProviderHealth`.  Invariant, for both: nothing reaches a provider
before its rate-limit reset time or while its breaker is open.

``admit`` waits at the gate, then asks the breaker (open: fail fast;
half-open: wait for the one probe's verdict); there is no checkpoint
between the last check and the caller's first step of the call.  A gate
closed for longer than ``max_wait`` fails fast too, with a
:class:`~messages.RateLimited` carrying the time left: the caller's retry
policy would not wait that long, and a call parked at the gate past its
call timeout would only be retried as a timeout, attempt after attempt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from messages import CircuitOpen, CompletionRequest, ProviderError, ProviderUnavailable, RateLimited

from ._breaker import BreakerPolicy, BreakerTicket, CircuitBreaker
from ._checks import check_seconds, check_wait
from ._classify import classify
from ._format import whole_seconds
from ._ratelimit import GateRefused, RateLimitGate
from ._rng import derive_unit


def _spread_unit(request: CompletionRequest | None) -> float:
    """Where in the release spread this call goes: from its identity only."""
    if request is None:
        return 0.0
    key = request.key
    return derive_unit(0, "gate", request.spec_id, key.stage, key.agent, request.attempt)


@attrs.frozen(slots=True)
class Permit:
    """A call's admission by :meth:`ProviderHealth.admit`: which provider,
    the breaker's ticket and when.  Hand it back exactly once, with
    ``report`` (the call's outcome) or ``abandon`` (it was never made or
    was cancelled)."""

    provider: str
    ticket: BreakerTicket
    at: float  # trio time the call was admitted


class ProviderHealth:
    """One provider's rate-limit gate and circuit breaker, and the
    ``admit`` -> call -> ``report``/``abandon`` protocol around them that
    the gateway and the fault interceptor both follow (see the module
    docstring).  ``max_wait``: seconds a call may wait at a closed gate
    before it is refused instead.  Not thread-safe: one trio run."""

    def __init__(
        self, name: str, policy: BreakerPolicy | None = None, *, gate_quantum: float = 0.0, max_wait: float = math.inf
    ) -> None:
        self.name = name
        self.max_wait = max_wait
        self.gate = RateLimitGate(quantum=gate_quantum)
        self.breaker = CircuitBreaker(policy)
        self.calls = 0
        self.rate_limits: list[tuple[float, float]] = []  # (at, reset_at) per 429 with a hint

    async def admit(
        self, request: CompletionRequest | None = None, on_wait: Callable[[float], object] | None = None
    ) -> tuple[Permit | None, ProviderError | None]:
        """Wait at the gate, then ask the breaker: a permit, or CircuitOpen
        while it is open.  In half-open, wait for the probe's verdict.
        ``request`` spreads the callers the gate releases (see
        :class:`RateLimitGate`).

        Refusals are returned, not raised: ``(None, CircuitOpen)``, or
        ``(None, RateLimited)`` when the gate stays closed past
        ``max_wait`` or past ``request.deadline``; either carries
        ``retry_after``.  A checkpoint only when it waits (at the gate or
        for a verdict): an open gate and a closed breaker admit without one,
        so nothing can run between the admission and the caller's call.
        Cancelled while waiting: no permit was taken (nothing to report or
        abandon) and the call has left the gate's queue.  ``on_wait(left)``
        is called (synchronously) when the call is about to wait at the
        gate, not when it is refused there at once."""
        while True:
            now = trio.current_time()
            if not self.gate.is_open(now):
                refused = await self._wait_at_gate(now, request, on_wait)
                if refused is not None:
                    return None, refused
                now = trio.current_time()
            ticket = self.breaker.acquire(now)
            if isinstance(ticket, BreakerTicket):
                self.calls += 1
                return Permit(self.name, ticket, now), None
            if self.breaker.state != "half_open":
                return None, CircuitOpen(
                    f"circuit breaker for provider {self.name!r} is open; retry in {ticket:.1f}s",
                    retry_after=ticket,
                )
            await self.breaker.wait_for_verdict()

    async def readmit(self, permit: Permit, request: CompletionRequest | None = None) -> ProviderError | None:
        """For a call that sends its request again under ``permit`` (after
        a token refresh): wait at the gate as :meth:`admit` does, with its
        refusals, and refuse it if the breaker has opened since the permit
        was given (see ``CircuitBreaker.refuses_resend``).  None: send it.  A refused call
        is given up with :meth:`abandon` (its resend was never made).

        Refusals are returned (``CircuitOpen`` or ``RateLimited``), not
        raised.  A checkpoint only when it waits at the gate.  ``permit``
        stays the caller's whatever happens, cancellation included: it
        must still be reported or abandoned."""
        now = trio.current_time()
        if not self.gate.is_open(now):
            refused = await self._wait_at_gate(now, request)
            if refused is not None:
                return refused
            now = trio.current_time()
        left = self.breaker.refuses_resend(permit.ticket, now)
        if left is not None:
            return CircuitOpen(
                f"circuit breaker for provider {self.name!r} opened during the call; retry in {left:.1f}s",
                retry_after=left,
            )
        return None

    async def _wait_at_gate(
        self, now: float, request: CompletionRequest | None, on_wait: Callable[[float], object] | None = None
    ) -> ProviderError | None:
        """Wait for the closed gate to release this call: None, or the
        RateLimited it is refused with instead."""
        left = self.gate.reset_for(now) - now
        if left > self.max_wait:
            return RateLimited(
                f"provider {self.name!r} is rate-limited for {whole_seconds(left)} more, longer than "
                f"the {self.max_wait:.0f}s a call waits; the call was not made",
                retry_after=left,
            )
        # The spread unit is a SHA-256 of the call's identity: only
        # worth deriving for a call that has to wait.  An open gate
        # is passed without a checkpoint, exactly as gate.wait does.
        unit = _spread_unit(request)
        if request is not None and self.gate.release_at(now, unit) >= request.deadline:
            # Its call timeout would end at the gate (at its own
            # release point, the spread included): the attempt
            # is lost either way, but refused now it says when the
            # gate opens, so its retry waits out the reset (and
            # starts with a whole timeout) instead of timing out
            # at the gate again.  (Refusing earlier, while some of
            # the timeout would be left, costs an attempt that
            # waiting would not: 6m0s token resets halted runs.)
            return RateLimited(
                f"provider {self.name!r} is rate-limited for {whole_seconds(left)} more, past the "
                f"{request.deadline - now:.0f}s this call has left; the call was not made",
                retry_after=left,
            )
        # Refused as soon as a later 429 moves its release past
        # its deadline or its max_wait, as it would have been on
        # arriving then (it waited out its call timeout at the
        # gate, an attempt lost, and was refused after all).
        until = request.deadline if request is not None else math.inf
        if on_wait is not None:
            on_wait(left)
        try:
            await self.gate.wait(unit, until, self.max_wait)
        except GateRefused as refused:
            later = trio.current_time()
            past = (
                f"past the {until - later:.0f}s this call has left"
                if refused.past_until
                else f"longer than the {self.max_wait:.0f}s a call waits"
            )
            return RateLimited(
                f"provider {self.name!r} is rate-limited for {whole_seconds(refused.left)} more (a later 429 "
                f"moved the reset), {past}; the call was not made",
                retry_after=refused.left,
            )
        return None

    def report(self, permit: Permit, error: ProviderError | None) -> None:
        now = trio.current_time()
        # A 429's reset, or the Retry-After of a 503/529: no call may reach
        # the provider before a reset time it gave (one agent honoured it
        # while the next went in a second later).
        if isinstance(error, (RateLimited, ProviderUnavailable)) and error.retry_after is not None:
            self.gate.close_until(now + error.retry_after, now)
            self.rate_limits.append((now, now + error.retry_after))
        failure = error is not None and classify(error).unhealthy
        self.breaker.record(permit.ticket, now, failure=failure)

    def abandon(self, permit: Permit) -> None:
        self.breaker.release(permit.ticket, trio.current_time())


class HealthRegistry:
    """The :class:`ProviderHealth` of every provider, created on first use.
    Implements ``messages.HealthPort`` for the fault interceptor.
    ``gate_quantum``: the rate-limit gates release onto a grid of that
    spacing (see :class:`RateLimitGate`; 0, the default, is off).
    ``max_wait``: seconds; a call that would wait longer at a closed gate
    fails fast instead (math.inf, the default: every call waits)."""

    def __init__(
        self,
        policy: BreakerPolicy | None = None,
        *,
        policies: dict[str, BreakerPolicy] | None = None,
        gate_quantum: float = 0.0,
        max_wait: float = math.inf,
    ) -> None:
        if policy is not None and not isinstance(policy, BreakerPolicy):
            raise TypeError(f"HealthRegistry needs a BreakerPolicy, got {policy!r}")
        self.policy = policy or BreakerPolicy()
        self._policies = dict(policies or {})
        self._gate_quantum = check_seconds(gate_quantum, "gate quantum")
        self._max_wait = check_wait(max_wait, "max_wait")
        self._providers: dict[str, ProviderHealth] = {}

    def __getitem__(self, provider: str) -> ProviderHealth:
        health = self._providers.get(provider)
        if health is None:
            health = self._providers[provider] = ProviderHealth(
                provider,
                self._policies.get(provider, self.policy),
                gate_quantum=self._gate_quantum,
                max_wait=self._max_wait,
            )
        return health

    def providers(self) -> dict[str, ProviderHealth]:
        return dict(self._providers)

    def snapshot(self, now: float) -> dict[str, Any] | None:
        """Every provider's breaker and gate, times relative to ``now``
        (JSON-ready), for :meth:`restore`; None if a breaker has a probe
        out (it cannot be taken up)."""
        taken: dict[str, Any] = {}
        for name, health in self._providers.items():
            breaker = health.breaker.snapshot(now)
            if breaker is None:
                return None
            taken[name] = {"breaker": breaker, "gate": health.gate.snapshot(now)}
        return taken

    @property
    def fresh(self) -> bool:
        """No call has been admitted yet (nothing a restore would overwrite)."""
        return all(h.calls == 0 and h.gate.closures == 0 for h in self._providers.values())

    def restore(self, snapshot: Mapping[str, Any], now: float) -> None:
        """Take up ``snapshot`` (from :meth:`snapshot`) as of ``now``: a run
        resumed on the virtual clock meets the breakers and gates its
        uninterrupted self would have.  Malformed parts are skipped."""
        for name, taken in snapshot.items():
            if not isinstance(name, str) or not isinstance(taken, Mapping):
                continue
            health = self[name]
            try:
                health.breaker.restore(taken["breaker"], now)
                if taken.get("gate") is not None:
                    health.gate.restore(taken["gate"], now)
            except (KeyError, TypeError, ValueError):
                continue

    async def admit(
        self,
        provider: str,
        request: CompletionRequest | None = None,
        on_wait: Callable[[float], object] | None = None,
    ) -> tuple[Permit | None, ProviderError | None]:
        """:meth:`ProviderHealth.admit` on ``provider``'s health (created
        on first use), with the same contract: refusals returned, a
        checkpoint only when it waits, cancelled: no permit taken."""
        return await self[provider].admit(request, on_wait)

    def report(self, permit: Permit, error: ProviderError | None) -> None:
        self[permit.provider].report(permit, error)

    def abandon(self, permit: Permit | None) -> None:
        if permit is not None:
            self[permit.provider].abandon(permit)

