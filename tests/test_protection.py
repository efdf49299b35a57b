"""Acceptance 4 and the retry path: the circuit breaker on the virtual clock,
the rate-limit gate shared by real and injected 429s, the classifier, and
the agent's retries."""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from actors import (
    BaseProvider,
    BreakerPolicy,
    CircuitBreaker,
    Gateway,
    HealthRegistry,
    Latency,
    Limits,
    MockProvider,
    RetryPolicy,
    SimulatedProvider,
    ConfigError,
    classify,
    open_orchestrator,
)
from messages import (
    AgentKey,
    AuthenticationFailed,
    BadRequest,
    CircuitOpen,
    Completion,
    CompletionRequest,
    CompletionResult,
    Disconnected,
    FaultInterceptor,
    FaultPlan,
    ProviderBug,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    QuotaExceeded,
    RateLimited,
    TokenUsage,
    open_channel,
    reply_pair,
)
from store import RetryableStoreError, Store

from actors._breaker import Ticket

POLICY = BreakerPolicy(failure_rate=0.5, window=60.0, min_calls=4, cooldown=30.0)


def call(agent: str = "a", attempt: int = 1, provider: str = "p") -> CompletionRequest:
    key = AgentKey(run_id="r", branch_id="b", stage="plan", agent=agent)
    return CompletionRequest(key=key, attempt=attempt, spec_id="S", provider=provider, model="m", prompt="x", panel=(agent,))


async def ask(gateway_tx: object, request: CompletionRequest) -> CompletionResult:
    reply, pending = reply_pair("test")
    await gateway_tx.send(attrs.evolve(request, reply_to=reply))  # type: ignore[attr-defined]
    result: CompletionResult = await pending.receive()
    return result


async def test_breaker_closed_open_half_open_closed(autojump_clock: trio.testing.MockClock) -> None:
    failing = True
    calls: list[float] = []

    async def handler(request: CompletionRequest) -> Completion:
        calls.append(trio.current_time())
        await trio.sleep(1)  # each call takes a second of virtual time
        if failing:
            raise ProviderUnavailable("503 Service Unavailable")
        return Completion(content="{}", usage=TokenUsage.of(input_tokens=1), model="m")

    health = HealthRegistry(POLICY)
    gateway = Gateway({"p": MockProvider(handler, name="p")}, health=health)
    tx, rx = open_channel(8, name="gateway")
    breaker = health["p"].breaker
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.run, rx)
        t0 = trio.current_time()
        for i in range(4):
            result = await ask(tx, call(attempt=i + 1))
            assert isinstance(result.error, ProviderUnavailable)
            assert breaker.state == "closed", "the breaker decides when the next call arrives"
        assert len(calls) == 4
        # t=14: four failures in the window, 100 % >= 50 %: the call that
        # arrives opens the breaker and fails fast; nothing reaches the
        # provider, nothing is billed.
        await trio.sleep(10)
        fast = await ask(tx, call(attempt=5))
        assert breaker.state == "open"
        assert isinstance(fast.error, CircuitOpen) and fast.usage == TokenUsage()
        assert fast.error.retry_after == pytest.approx(30.0)
        await trio.sleep(10)
        again = await ask(tx, call(attempt=6))
        assert isinstance(again.error, CircuitOpen) and again.error.retry_after == pytest.approx(20.0)
        assert len(calls) == 4
        # t=44, after the cooldown: one half-open probe; it fails, so open again.
        await trio.sleep(20)
        probe = await ask(tx, call(attempt=7))
        assert isinstance(probe.error, ProviderUnavailable) and breaker.state == "open"
        assert len(calls) == 5
        await trio.sleep(30)
        failing = False
        # In half-open: the call at t=75 probes; one arriving later (t=75.5)
        # waits for the verdict instead of burning an attempt, then goes ahead.
        results: list[tuple[str, float, CompletionResult]] = []

        async def caller(agent: str, delay: float) -> None:
            await trio.sleep(delay)
            result = await ask(tx, call(agent=agent))
            results.append((agent, trio.current_time() - t0, result))

        async with trio.open_nursery() as inner:
            inner.start_soon(caller, "x", 0)
            inner.start_soon(caller, "y", 0.5)
        assert all(r.completion is not None for _, _, r in results)
        assert sorted((a, round(t, 6)) for a, t, _ in results) == [("x", 76.0), ("y", 77.0)]
        assert breaker.state == "closed" and len(calls) == 7
        assert [round(t - t0, 6) for t in calls[-2:]] == [75.0, 76.0]
        tx.close()
    states = [state for _, state in breaker.transitions]
    assert states == ["open", "half_open", "open", "half_open", "closed"]
    times = [round(t - t0, 6) for t, _ in breaker.transitions]
    # opened when a call came after the failures (t=14); half-open 30 s
    # later; the failed probe (1 s) re-opens; 30 s on, a good probe closes it.
    assert times == [14.0, 44.0, 45.0, 75.0, 76.0]


def test_breaker_ignores_stale_outcomes_and_releases_abandoned_probes() -> None:
    breaker = CircuitBreaker(BreakerPolicy(window=60, min_calls=2, cooldown=5))
    early = breaker.acquire(0.0)
    tickets = [breaker.acquire(0.0) for _ in range(2)]
    for t in tickets:
        breaker.record(t, 1.0, failure=True)  # type: ignore[arg-type]
    assert not isinstance(breaker.acquire(1.0), float), "outcomes of this very instant are not counted yet"
    assert breaker.acquire(2.0) == 5.0 and breaker.state == "open"
    breaker.record(early, 2.5, failure=False)  # type: ignore[arg-type]
    assert breaker.state == "open", "an outcome admitted before the transition is stale"
    probe = breaker.acquire(7.0)
    assert breaker.state == "half_open" and isinstance(probe, Ticket) and probe.probe
    also = breaker.acquire(7.0)
    assert isinstance(also, Ticket) and also.probe, "a call in the probes' own instant probes too"
    assert breaker.acquire(7.5) == 1.0, "later callers wait for the verdict"
    breaker.release(probe, 7.55)  # type: ignore[arg-type]
    assert breaker.acquire(7.6) == 1.0
    breaker.release(also, 7.7)  # type: ignore[arg-type]
    again = breaker.acquire(8.0)
    assert isinstance(again, Ticket) and again.probe, "abandoned probes free the slot"


def test_breaker_window_is_time_and_order_independent() -> None:
    """Same outcomes in the same instants, reported in any order: the same
    verdict.  Outcomes older than the window no longer count."""
    import itertools

    verdicts = set()
    outcomes = [(1.0, True), (1.0, False), (1.0, True), (2.0, True), (2.0, False)]
    for order in itertools.permutations(outcomes):
        breaker = CircuitBreaker(BreakerPolicy(window=10, min_calls=5, failure_rate=0.5))
        tickets = [breaker.acquire(0.0) for _ in order]
        for ticket, (at, failed) in zip(tickets, sorted(order, key=lambda o: o[0])):
            breaker.record(ticket, at, failure=failed)  # type: ignore[arg-type]
        # At 2.0: 2 of the 5 calls admitted before it failed; at 3.0: 3 of 6
        # (the call admitted at 2.0 is out, not failed).
        verdicts.add((isinstance(breaker.acquire(2.0), float), isinstance(breaker.acquire(3.0), float)))
    assert verdicts == {(False, True)}
    late = CircuitBreaker(BreakerPolicy(window=10, min_calls=2))
    for ticket in [late.acquire(0.0), late.acquire(0.0)]:
        late.record(ticket, 1.0, failure=True)  # type: ignore[arg-type]
    assert not isinstance(late.acquire(11.5), float), "failures older than the window are forgotten"


@pytest.mark.parametrize(
    "refusal",
    [lambda: RateLimited("429 Too Many Requests", retry_after=12.0),
     # A 503 or 529 with Retry-After gives a reset time too: only the agent
     # that got it waited, the next went in a second later.
     lambda: ProviderUnavailable("529 overloaded", retry_after=12.0)],
)
async def test_one_429_pauses_every_caller_until_reset(
    autojump_clock: trio.testing.MockClock, refusal: Callable[[], ProviderError]
) -> None:
    """The gate: after a real 429, no caller reaches the provider before the
    reset time - the gate, not each agent's own backoff, holds them."""
    calls: list[tuple[float, str]] = []

    def handler(request: CompletionRequest) -> Completion:
        calls.append((trio.current_time(), request.key.agent))
        if request.key.agent == "first":
            raise refusal()
        return Completion(content="{}", usage=None, model="m")

    health = HealthRegistry()
    gateway = Gateway({"p": MockProvider(handler, name="p")}, health=health)
    tx, rx = open_channel(8, name="gateway")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.run, rx)
        start = trio.current_time()
        limited = await ask(tx, call(agent="first"))
        assert isinstance(limited.error, (RateLimited, ProviderUnavailable))
        await trio.sleep(1)
        results = []

        async def caller(agent: str) -> None:
            results.append(await ask(tx, call(agent=agent)))

        async with trio.open_nursery() as inner:
            for agent in ("b", "c", "d"):
                inner.start_soon(caller, agent)
        tx.close()
    assert all(r.completion is not None for r in results)
    released = [t - start for t, a in calls if a != "first"]
    assert len(released) == 3 and all(12.0 <= t < 13.0 for t in released)
    assert len(set(released)) == 3, "the herd is spread over a second after the reset"
    assert health["p"].gate.waits == 3


async def test_injected_429_closes_the_gate_for_real_calls(tmp_path: object, autojump_clock: trio.testing.MockClock) -> None:
    """Injected and real faults take one path: the interceptor's 429 closes
    the same gate the gateway's real calls wait at."""
    seen: list[tuple[float, str, int]] = []

    def handler(request: CompletionRequest) -> Completion:
        seen.append((trio.current_time(), request.key.agent, request.attempt))
        return Completion(content="{}", usage=None, model="m")

    health = HealthRegistry()
    plan = FaultPlan.parse("429:1", reset="8")
    faults = FaultInterceptor(plan, health=health)
    gateway = Gateway({"p": MockProvider(handler, name="p")}, health=health)
    tx, rx = open_channel(8, name="gateway", interceptors=[faults])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.run, rx)
        start = trio.current_time()
        first = await ask(tx, call(agent="a"))
        assert isinstance(first.error, RateLimited) and first.error.retry_after == 8.0
        assert str(first.error) == "rate limit exceeded: retry after 8 seconds (fault injected)"
        assert first.usage == TokenUsage(), "a 429 is refused before the model runs: it costs nothing, as a real one"
        await trio.sleep(1)  # a call in the 429's own instant was simultaneous with it
        second = await ask(tx, call(agent="b"))
        assert second.completion is not None
        tx.close()
    [(at, agent, _)] = seen
    assert agent == "b" and 8.0 <= at - start < 9.0


async def test_timeout_fault_takes_its_time(autojump_clock: trio.testing.MockClock) -> None:
    faults = FaultInterceptor(FaultPlan.parse("timeout:1", timeout_ms=2500))
    reply, pending = reply_pair("t")
    start = trio.current_time()

    async def never(item: object) -> None:
        raise AssertionError("an injected fault is not forwarded")

    await faults.send(attrs.evolve(call(), reply_to=reply), never)
    result = await pending.receive()
    assert trio.current_time() - start == pytest.approx(2.5)
    assert isinstance(result.error, ProviderTimeout)
    assert str(result.error) == "operation timed out after 2500ms (fault injected)"


async def test_cancelled_timeout_fault_sent_nothing(autojump_clock: trio.testing.MockClock) -> None:
    health = HealthRegistry(BreakerPolicy(window=1, min_calls=1))
    faults = FaultInterceptor(FaultPlan.parse("timeout:1"), health=health)
    reply, pending = reply_pair("t")
    with trio.move_on_after(1):
        await faults.send(attrs.evolve(call(provider="p"), reply_to=reply), lambda item: trio.sleep(0))
    # No answer went out and the breaker saw no outcome; the fault itself
    # had fired (its count is spent, so it is counted, as it is logged).
    assert reply.send("first") and health["p"].breaker.state == "closed"
    assert faults.injected["timeout"] == 1


@pytest.mark.parametrize(
    ("error", "kind", "retryable"),
    [
        (Disconnected("model stream error: stream disconnected before completion"), "disconnect", True),
        (ProviderTimeout("timed out"), "timeout", True),
        (RateLimited("429", retry_after=3), "rate_limit", True),
        (ProviderUnavailable("529 overloaded"), "unavailable", True),
        (CircuitOpen("open", retry_after=2), "circuit_open", True),
        (RetryableStoreError("database is locked"), "database_busy", True),
        (AuthenticationFailed("401"), "authentication", False),
        (BadRequest("404 model not found"), "bad_request", False),
        (QuotaExceeded("insufficient quota"), "quota", False),
        (ProviderError("provider 'x' failed: KeyError"), "permanent", False),
        (ProviderBug("provider 'x' (Mine) failed: KeyError"), "provider_bug", False),
        (ValueError("bug"), "permanent", False),
    ],
)
def test_classifier(error: BaseException, kind: str, retryable: bool) -> None:
    c = classify(error)
    assert (c.kind, c.retryable) == (kind, retryable)
    assert c.unhealthy == (kind in {"disconnect", "timeout", "unavailable"})
    if isinstance(error, (RateLimited, CircuitOpen)):
        assert c.retry_after == error.retry_after
    assert classify(AuthenticationFailed("401"), auth_retries_left=1).retryable


def test_backoff_is_capped_jittered_seeded_and_honours_hints() -> None:
    policy = RetryPolicy(initial=1.0, multiplier=2.0, cap=8.0, jitter=0.25)
    key = AgentKey(run_id="r", branch_id="b", stage="plan", agent="a")
    delays = [policy.delay(Disconnected("x"), key, n, seed=1) for n in range(1, 7)]
    for n, d in enumerate(delays, start=1):
        base = min(8.0, 2.0 ** (n - 1))
        assert 0.75 * base <= d <= base
    assert delays == [policy.delay(Disconnected("x"), key, n, seed=1) for n in range(1, 7)]
    assert delays != [policy.delay(Disconnected("x"), key, n, seed=2) for n in range(1, 7)]
    # Never before a hint, and spread past it by identity (up to jitter x base).
    assert 360.0 <= policy.delay(RateLimited("429", retry_after=360.0), key, 1, seed=1) <= 360.25
    assert 20.0 <= policy.delay(CircuitOpen("open", retry_after=20.0), key, 1, seed=1) <= 20.25
    other = AgentKey(run_id="r", branch_id="b", stage="plan", agent="b")
    assert policy.delay(Disconnected("x"), key, 2, seed=1) == policy.delay(
        Disconnected("x"), attrs.evolve(key, run_id="other-run", branch_id="other-branch"), 2, seed=1
    ), "random run and branch ids do not move the jitter"
    assert policy.delay(CircuitOpen("o", retry_after=20.0), key, 1, seed=1) != policy.delay(
        CircuitOpen("o", retry_after=20.0), other, 1, seed=1
    )


def test_the_retry_defaults_are_the_documented_ones() -> None:
    # The README promises these; a changed default would change every
    # run's attempts (and digests) without a word.
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.max_wait) == (3, 600.0)


def test_retry_quantum_resumes_on_the_grid_never_early() -> None:
    assert RetryPolicy().resume_at(3.2, 0.45) == pytest.approx(3.65)  # off by default: exact
    grid = RetryPolicy(quantum=1.0)
    assert grid.resume_at(3.2, 0.45) == 4.0
    assert grid.resume_at(3.0, 1.0) == 4.0  # already on a tick: not pushed on
    assert grid.resume_at(0.1, 360.0) == 361.0  # a reset hint still holds
    with pytest.raises(ValueError, match="retry quantum.*nan"):
        RetryPolicy(quantum=float("nan"))


async def test_agent_does_not_retry_authentication(tmp_path: object, autojump_clock: trio.testing.MockClock) -> None:
    """The provider refreshes and retries a 401 once itself; by the time the
    agent sees AuthenticationFailed it is permanent: one attempt, no backoff."""
    attempts: list[tuple[str, int]] = []
    sim = SimulatedProvider(seed=0)

    def handler(request: CompletionRequest) -> Completion:
        attempts.append((request.key.agent, request.attempt))
        if request.key.agent == "claude":
            raise AuthenticationFailed("401 Unauthorized")
        if request.key.agent == "gemini" and request.attempt == 1:
            raise ProviderUnavailable("503")
        return sim.answer(request)

    async with open_orchestrator(store=f"{tmp_path}/a.db", provider=MockProvider(handler, name="sim"),
                                 retry=RetryPolicy(max_attempts=5)) as orch:
        result = await orch.run("S", run_id="auth")
    plan_calls = [a for a in attempts if a[0] in ("gemini", "claude")][:3]
    assert plan_calls == [("gemini", 1), ("gemini", 2), ("claude", 1)]
    assert result.stages[0].missing_agents == ("claude",)
    with Store.open(f"{tmp_path}/a.db") as s:
        assert [o.attempt for o in s.outputs("auth", stage="plan") if o.agent == "claude"] == [1]


async def test_a_failed_probe_fails_the_waiters_fast(autojump_clock: trio.testing.MockClock) -> None:
    health = HealthRegistry(BreakerPolicy(window=60, min_calls=1, cooldown=5))
    p = health["p"]
    permit, _ = await p.admit()
    assert permit is not None
    p.report(permit, Disconnected("x"))
    await trio.sleep(1)
    refused, error = await p.admit()
    assert refused is None and isinstance(error, CircuitOpen) and p.breaker.state == "open"
    await trio.sleep(5)
    probe, _ = await p.admit()
    assert probe is not None and probe.ticket.probe
    outcomes: list[object] = []

    async def waiter() -> None:
        outcomes.append(await p.admit())

    async with trio.open_nursery() as nursery:
        await trio.sleep(0.5)
        nursery.start_soon(waiter)
        await trio.sleep(2)
        assert outcomes == [], "a caller in half-open waits for the probe's verdict"
        p.report(probe, ProviderTimeout("t"))
    [(permit2, error2)] = outcomes
    assert permit2 is None and isinstance(error2, CircuitOpen) and error2.retry_after == pytest.approx(5.0)


async def test_a_resend_is_refused_once_the_breaker_opened_during_its_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # (A resend: the request sent again after a token refresh.)
    health = HealthRegistry(BreakerPolicy(window=60, min_calls=1, cooldown=5))
    p = health["p"]
    slow, _ = await p.admit()
    assert slow is not None
    assert await p.readmit(slow) is None, "nothing changed: the resend goes"
    other, _ = await p.admit()
    assert other is not None
    p.report(other, Disconnected("x"))
    await trio.sleep(1)
    # Due to open now, though no call has arrived to move it: the resend
    # is refused as a new call would be, whether or not one came first.
    assert p.breaker.state == "closed"
    refused = await p.readmit(slow)
    assert isinstance(refused, CircuitOpen) and refused.retry_after == pytest.approx(5.0)  # opened at 1 s
    assert p.breaker.state == "open"
    p.abandon(slow)
    # A permit given while the breaker is half-open (the probe's) resends;
    # another probe's, once a failed probe has decided it open, does not.
    await trio.sleep(5)
    probe, _ = await p.admit()
    second, _ = await p.admit()
    assert probe is not None and second is not None and await p.readmit(probe) is None
    p.report(probe, Disconnected("y"))
    await trio.sleep(1)
    assert isinstance(await p.readmit(second), CircuitOpen) and p.breaker.state == "open"


@pytest.mark.parametrize(
    ("build", "error", "needle"),
    [
        (lambda: RetryPolicy(max_attempts="3"), TypeError, "'max_attempts'"),  # type: ignore[arg-type]
        (lambda: RetryPolicy(max_attempts=0), ValueError, "max_attempts must be at least 1, got 0"),
        (lambda: RetryPolicy(initial=-1.0), ValueError, "initial must be a finite number of seconds"),
        (lambda: RetryPolicy(cap=float("nan")), ValueError, "cap must be"),
        (lambda: RetryPolicy(multiplier=0.5), ValueError, "multiplier must be a finite number >= 1"),
        (lambda: RetryPolicy(jitter=1.5), ValueError, "jitter must be between 0 and 1"),
        (lambda: RetryPolicy(call_timeout=0.0), ValueError, "call_timeout must be > 0"),
        (lambda: RetryPolicy(call_timeout=float("nan")), ValueError, "call_timeout must be > 0"),
        (lambda: BreakerPolicy(window=float("nan")), ValueError, "window must be a finite number of seconds"),
        (lambda: BreakerPolicy(window=0.0), ValueError, "need window > 0"),
        # Not numbers: these failed inside a comparison, naming nothing.
        (lambda: BreakerPolicy(window="60"), TypeError, "window must be a number of seconds, got '60'"),  # type: ignore[arg-type]
        (lambda: BreakerPolicy(failure_rate="0.5"), TypeError, "failure_rate must be a number"),  # type: ignore[arg-type]
        (lambda: RetryPolicy(initial="1"), TypeError, "initial must be a number of seconds, got '1'"),  # type: ignore[arg-type]
        (lambda: HealthRegistry("strict"), TypeError, "HealthRegistry needs a BreakerPolicy, got 'strict'"),  # type: ignore[arg-type]
        (lambda: BreakerPolicy(min_calls=2.5), TypeError, "min_calls must be a whole number, got 2.5"),  # type: ignore[arg-type]
        # Not numbers (or a bool read as 1): a bare "'<=' not supported", or a one-second timeout.
        (lambda: BreakerPolicy(min_calls="20"), TypeError, "min_calls must be a whole number, got '20'"),  # type: ignore[arg-type]
        (lambda: RetryPolicy(call_timeout=True), TypeError, "call_timeout must be a number, got True"),
        (lambda: RetryPolicy(multiplier="2"), TypeError, "multiplier must be a number, got '2'"),  # type: ignore[arg-type]
        (lambda: RetryPolicy(max_attempts=True), TypeError, "max_attempts must be a whole number, got True"),
        (lambda: Limits(metrics_interval="1"), TypeError, "metrics_interval must be a number, got '1'"),  # type: ignore[arg-type]
        (lambda: Latency(sigma=None), TypeError, "latency sigma must be a number, got None"),  # type: ignore[arg-type]
        (lambda: SimulatedProvider(disagreement_rate="0.1"), TypeError, "disagreement_rate must be a number"),  # type: ignore[arg-type]
        (lambda: BreakerPolicy(cooldown=float("nan")), ValueError, "cooldown must be"),
        (lambda: BreakerPolicy(probe_wait=-1.0), ValueError, "probe_wait must be"),
    ],
)
def test_policies_refuse_bad_values_when_built(build: Any, error: type[Exception], needle: str) -> None:
    # NaN and friends used to pass and fail later, inside an agent's call or
    # the breaker's window arithmetic.
    with pytest.raises(error, match=re.escape(needle)):
        build()


def test_a_call_timeout_may_be_unlimited() -> None:
    assert RetryPolicy(call_timeout=math.inf).call_timeout == math.inf


async def test_a_counted_fault_the_breaker_refuses_goes_back_to_the_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """It never fired (the call failed fast, as a real one would), so it
    must not be spent: 'disconnect:3' in a soak whose breaker tripped used
    to inject 50 of 60."""
    health = HealthRegistry(BreakerPolicy(min_calls=1, cooldown=30))
    permit, _ = await health["p"].admit()
    health["p"].report(permit, Disconnected("a real one"))
    await trio.sleep(1)  # the next call to arrive, in a later instant, trips the breaker
    faults = FaultInterceptor(FaultPlan.parse("disconnect:1"), health=health)

    async def never(item: object) -> None:
        raise AssertionError("a placed fault is not forwarded")

    reply, pending = reply_pair("refused")
    await faults.send(attrs.evolve(call(), reply_to=reply), never)
    assert isinstance((await pending.receive()).error, CircuitOpen) and health["p"].breaker.state == "open"
    assert faults.injected["disconnect"] == 0 and faults.remaining("r") == {"disconnect": 1, "rate_limit": 0, "timeout": 0}

    await trio.sleep(31)  # the cooldown is over: the next stage's call is the probe, and gets the fault
    later = attrs.evolve(call(), key=attrs.evolve(call().key, stage="tasks"))
    reply, pending = reply_pair("fired")
    await faults.send(attrs.evolve(later, reply_to=reply), never)
    assert isinstance((await pending.receive()).error, Disconnected)
    assert faults.injected["disconnect"] == 1 and faults.remaining("r")["disconnect"] == 0


async def test_a_counted_fault_cancelled_at_the_gate_is_not_spent(autojump_clock: trio.testing.MockClock) -> None:
    health = HealthRegistry()
    permit, _ = await health["p"].admit()
    health["p"].report(permit, RateLimited("429", retry_after=10))  # the gate is shut for 10 s
    await trio.sleep(0.5)  # a call in the 429's own instant would be simultaneous with it
    faults = FaultInterceptor(FaultPlan.parse("timeout:1"), health=health)
    reply, _pending = reply_pair("cancelled")
    with trio.move_on_after(1) as waited:
        await faults.send(attrs.evolve(call(), reply_to=reply), lambda item: trio.sleep(0))
    assert waited.cancelled_caught, "it waited at the gate"
    assert faults.remaining("r") == {"disconnect": 0, "rate_limit": 0, "timeout": 1}
    assert faults.injected["timeout"] == 0


@pytest.mark.parametrize(
    ("wrong", "needle"),
    [
        (lambda req, ok: ok.content, "returned str, not a Completion"),
        (lambda req, ok: None, "returned NoneType, not a Completion"),
        (lambda req, ok: attrs.evolve(ok, model=None), "ValueError|TypeError"),
        (lambda req, ok: Completion(content=ok.content, usage={"input_tokens": 1}, model="m"), "TypeError"),  # type: ignore[arg-type]
    ],
)
async def test_a_provider_returning_the_wrong_thing_fails_that_call_only(
    tmp_path: object, autojump_clock: trio.testing.MockClock, wrong: Any, needle: str
) -> None:
    """Like a provider that raises: claude's calls fail as the provider's
    bug and the stage goes on with the others.  They used to crash the
    agent, metrics or store actor, failing every run of the orchestrator."""
    sim = SimulatedProvider(seed=0)

    def handler(request: CompletionRequest) -> Any:
        ok = sim.answer(request)
        return wrong(request, ok) if request.key.agent == "claude" else ok

    async with open_orchestrator(store=f"{tmp_path}/a.db", provider=MockProvider(handler, name="sim")) as orch:
        result = await orch.run("S", run_id="wrong")
        assert result.status == "completed"
        assert all("claude" in stage.missing_agents for stage in result.stages)
        again = await orch.run("S", run_id="again")  # the orchestrator still works
        assert again.status == "completed"
    with Store.open(f"{tmp_path}/a.db") as s:
        errors = [o.error for o in s.outputs("wrong", stage="plan") if o.agent == "claude"]
    assert errors and all(e is not None and re.search(needle, e) for e in errors), errors


async def test_a_bug_in_an_apps_provider_halts_resumably_naming_it(
    tmp_path: object, autojump_clock: trio.testing.MockClock
) -> None:
    """A provider raising something that is no ProviderError (its own
    trio.fail_after, a ValueError) was decided durably as no_consensus,
    "only 0 agent(s) agree", naming no cause, and fixing the provider could
    not resume the run.  The error also read "provider 'sim' failed", as if
    the simulator had."""

    class Broken(BaseProvider):
        async def complete(self, request: CompletionRequest) -> Completion:
            raise trio.TooSlowError()

    db = f"{tmp_path}/b.db"
    async with open_orchestrator(store=db, provider=Broken(), seed=3) as orch:
        halted = await orch.run("S", run_id="bug")
    assert (halted.status, halted.halt_reason) == ("halted", "agents_failed")
    assert "provider_bug: provider 'sim' (Broken) failed: TooSlowError" in (halted.halt_message or "")
    with Store.open(db) as s:
        assert s.decisions("bug") == []  # left undecided, for the fixed provider
    async with open_orchestrator(store=db, provider=SimulatedProvider(seed=3), seed=3) as orch:
        fixed = await orch.resume("bug", retry_failed=True)
    assert fixed.completed


async def test_an_agent_that_stops_retrying_says_why_in_the_event_log(
    tmp_path: object, autojump_clock: trio.testing.MockClock
) -> None:
    # Retries were on the event log with their reason; the final failure
    # was only in the stored output and on the terminal.
    sim = SimulatedProvider(seed=0)

    def handler(request: CompletionRequest) -> Completion:
        if request.key.agent == "claude":
            raise ProviderUnavailable("503 upstream sleeping")
        return sim.answer(request)

    async with open_orchestrator(store=f"{tmp_path}/a.db", provider=MockProvider(handler, name="sim"),
                                 retry=RetryPolicy(max_attempts=2)) as orch:
        await orch.run("S", run_id="g")
    with Store.open(f"{tmp_path}/a.db") as s:
        plan = [(e.kind, e.agent, e.attempt) for e in s.events("g") if e.stage == "plan" and e.kind in ("retry", "gave_up")]
        gave_up = [e for e in s.events("g", kind="gave_up") if e.stage == "plan"]
    assert plan == [("retry", "claude", 1), ("gave_up", "claude", 2)]
    assert gave_up[0].detail == {"error": "unavailable", "message": "503 upstream sleeping"}


@pytest.mark.parametrize(
    ("hint", "max_wait", "waits"),
    # 1e300: a server's nonsense, printed in its 301 digits in every message.
    [(86400.0, 600.0, False), (300.0, 600.0, True), (86400.0, math.inf, True), (1e300, 600.0, False)],
)
async def test_a_reset_further_off_than_max_wait_is_not_waited_out(
    tmp_path: object, autojump_clock: trio.testing.MockClock, hint: float, max_wait: float, waits: bool
) -> None:
    """A daily quota's "retry after 86400" parked the agent for a day, and
    every other caller waited at the gate until its call timed out, three
    times over - a silent day for a run that could never finish sooner."""
    sim = SimulatedProvider(seed=0)
    calls: list[tuple[float, str]] = []

    async def handler(request: CompletionRequest) -> Completion:
        calls.append((trio.current_time(), request.key.agent))
        first = len(calls) == 1
        await trio.sleep(1)
        if first:
            raise RateLimited("429 Too Many Requests", retry_after=hint)
        return sim.answer(request)

    async with open_orchestrator(
        store=f"{tmp_path}/a.db", provider=MockProvider(handler, name="sim"), retry=RetryPolicy(max_wait=max_wait)
    ) as orch:
        start = trio.current_time()
        result = await orch.run("S", run_id="q")
        took = trio.current_time() - start
    limited_at = start + 1  # the 429 came back after a second
    late = [at for at, _ in calls if at > limited_at]
    assert all(at >= limited_at + hint for at in late), "nothing reached the provider inside the window"
    if waits:
        assert result.status == "completed" and late
        return
    assert result.status == "halted" and not late
    assert took < 60, f"gave up after {took:.0f} virtual seconds"
    with Store.open(f"{tmp_path}/a.db") as s:
        gave_up = [e for e in s.events("q", kind="gave_up")]
        timeouts = [o for o in s.outputs("q") if o.error and o.error.startswith("timeout")]
    assert not timeouts
    first, *others = gave_up
    assert first.attempt == 1 and first.detail["error"] == "rate_limit"
    shown = "86400s" if hint == 86400.0 else "1e+300s"
    assert first.detail["reason"] == f"resets in {shown}, later than the 600s a retry waits (max_wait; --max-retry-wait)"
    assert others, "the rest of the panel was refused at the gate"
    for event in others:
        assert event.attempt == 1
        assert re.search(r"rate-limited for (86\d{3}s|1e\+300s) more, longer than the 600s a call waits; the call was not made",
                         event.detail["message"])


def test_waits_are_shown_in_whole_seconds_and_nonsense_in_three_figures() -> None:
    from actors._format import whole_seconds

    assert [whole_seconds(s) for s in (0.4, 86400.0, 999_999_999.4)] == ["0s", "86400s", "999999999s"]
    # Rounded past the limit it would print ten digits; infinity must not
    # raise (round() of it does).
    assert [whole_seconds(s) for s in (999_999_999.6, 1e300, math.inf)] == ["1e+09s", "1e+300s", "infs"]


@pytest.mark.parametrize("bad", [-1.0, math.nan, "600", True])
def test_max_wait_is_checked(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="max_wait"):
        RetryPolicy(max_wait=bad)
    with pytest.raises((TypeError, ValueError), match="max_wait"):
        HealthRegistry(max_wait=bad)


def test_should_retry_stops_at_max_wait() -> None:
    policy = RetryPolicy()
    assert policy.should_retry(RateLimited("429", retry_after=600.0), 1)
    assert not policy.should_retry(RateLimited("429", retry_after=601.0), 1)
    assert not policy.should_retry(CircuitOpen("open", retry_after=601.0), 1)
    assert RetryPolicy(max_wait=math.inf).should_retry(RateLimited("429", retry_after=1e9), 1)
    assert policy.wait_refused(None) is None and policy.wait_refused(600.0) is None


async def test_each_retry_failed_resume_grants_one_more_round(
    tmp_path: object, autojump_clock: trio.testing.MockClock
) -> None:
    sim = SimulatedProvider(seed=0)
    down = True
    calls: list[tuple[str, str, int]] = []

    def handler(request: CompletionRequest) -> Completion:
        calls.append((request.key.stage, request.key.agent, request.attempt))
        if down and request.key.stage == "implement":
            raise ProviderUnavailable("503 upstream down")
        return sim.answer(request)

    path = f"{tmp_path}/a.db"
    async with open_orchestrator(store=path, provider=MockProvider(handler, name="sim")) as orch:
        first = await orch.run("S", run_id="u")
        assert (first.status, first.halt_reason) == ("halted", "agents_failed")
        assert [s.stage for s in first.stages] == ["plan", "tasks"]
        plain = await orch.resume("u")  # nothing granted: nobody is called
        assert plain.halt_reason == "agents_failed" and plain.turns == 0
        still = await orch.resume("u", retry_failed=True)  # one round more, still down
        assert still.halt_reason == "agents_failed"
        down = False
        done = await orch.resume("u", retry_failed=True)
        with pytest.raises(ConfigError, match="retry_failed must be True or False"):
            await orch.resume("u", retry_failed="yes")  # type: ignore[arg-type]
    assert done.completed
    implement = [(agent, attempt) for stage, agent, attempt in calls if stage == "implement"]
    first_agent = implement[0][0]
    # Rounds of 3, numbered on: the run's, the first retry-failed resume's,
    # then one that answers (the breaker, opened by the outage, may refuse
    # some attempts without a call).
    mine = [a for agent, a in implement if agent == first_agent]
    assert mine[:3] == [1, 2, 3] and mine == sorted(set(mine))
    assert any(4 <= a <= 6 for a in mine) and 7 <= mine[-1] <= 9
    async with open_orchestrator(store=f"{tmp_path}/b.db", provider=SimulatedProvider(seed=0)) as orch:
        never_down = await orch.run("S", run_id="u")
    assert [(s.stage, s.status) for s in done.stages] == [(s.stage, s.status) for s in never_down.stages]


async def test_a_call_its_caller_gave_up_on_is_cancelled_at_the_provider(
    tmp_path: object, autojump_clock: trio.testing.MockClock
) -> None:
    """A hung provider call outlived its caller's call timeout: it held a
    gateway worker for ever, so leaving the orchestrator hung."""
    sim = SimulatedProvider(seed=0)
    hung: list[str] = []

    async def handler(request: CompletionRequest) -> Completion:
        if (request.key.stage, request.key.agent, request.attempt) == ("plan", "claude", 1):
            try:
                await trio.sleep_forever()
            finally:
                hung.append("cancelled")
        return sim.answer(request)

    path = f"{tmp_path}/a.db"
    with trio.fail_after(3600):  # the old code never left the block
        async with open_orchestrator(store=path, provider=MockProvider(handler, name="sim"),
                                     retry=RetryPolicy(call_timeout=10)) as orch:
            result = await orch.run("S", run_id="h")
    assert result.completed and hung == ["cancelled"]
    with Store.open(path) as s:
        cancelled = s.events("h", kind="call_cancelled")
    assert [(e.stage, e.agent, e.attempt) for e in cancelled] == [("plan", "claude", 1)]


async def test_a_cancelled_run_buys_nothing_its_resume_buys_again(
    tmp_path: object, autojump_clock: trio.testing.MockClock
) -> None:
    """Cancelling a run left its in-flight provider calls running: each
    answer was paid for, dropped, and bought again by the resume."""
    sim = SimulatedProvider(seed=7)
    answered: collections.Counter[tuple[str, str, int]] = collections.Counter()

    async def handler(request: CompletionRequest) -> Completion:
        await trio.sleep(2)
        completion = sim.answer(request)
        answered[request.key.stage, request.key.agent, request.attempt] += 1
        return completion

    path = f"{tmp_path}/a.db"
    async with open_orchestrator(store=path, seed=7, provider=MockProvider(handler, name="sim")) as orch:
        with trio.move_on_after(5):  # mid-call: the third plan agent is being answered
            await orch.run("S", run_id="x")
        resumed = await orch.resume("x")
    assert resumed.completed
    assert [k for k, n in answered.items() if n > 1] == []


@pytest.mark.parametrize("error", [RateLimited, CircuitOpen])
@pytest.mark.parametrize(("given", "kept"), [(float("nan"), None), (float("inf"), None), (-3.0, 0.0), (7.5, 7.5)])
def test_a_reset_hint_that_is_no_time_is_no_hint(error: type, given: float, kept: float | None) -> None:
    # CircuitOpen kept NaN: the agent gave up at once, "resets in nans".
    assert error("x", retry_after=given).retry_after == kept
    assert RetryPolicy().should_retry(error("x", retry_after=given), 1)


async def test_a_call_that_would_wait_out_its_timeout_at_the_gate_fails_fast(
    tmp_path: object, autojump_clock: trio.testing.MockClock
) -> None:
    """After a 429 with "retry after 900" (a --max-retry-wait of an hour
    allows it), the other agents of the stage retried into the closed gate
    and timed out there after their 600 s call timeout, then again on their
    next attempt: the run failed.  Refused at once, their retry waits out
    the reset."""
    from actors._pipeline import pipeline_with_panel

    sim = SimulatedProvider(seed=0, disagreement_rate=0.0)
    seen: collections.Counter[str] = collections.Counter()
    reset = 900

    async def handler(request: CompletionRequest) -> Completion:
        agent = request.key.agent
        seen[agent] += 1
        if agent == "a" and seen[agent] == 1:
            await trio.sleep(1)
            raise RateLimited("429 Too Many Requests", retry_after=reset)
        if seen[agent] == 1:
            await trio.sleep(4.4)
            raise ProviderUnavailable("500 boom")  # retried into the closed gate
        await trio.sleep(5)
        return sim.answer(request)

    async with open_orchestrator(
        store=f"{tmp_path}/g.db", provider=MockProvider(handler, name="sim"),
        pipeline=pipeline_with_panel("validate", ["a", "b", "c", "d"]),
        retry=RetryPolicy(max_wait=3600),
    ) as orch:
        result = await orch.run("S", run_id="g")
        # A reset the timeout outlasts (6m0s, as OpenAI's token limits
        # give) is waited out at the gate, costing no attempt: refusing
        # calls with over half their timeout spent there halted such runs.
        seen.clear()
        reset = 360
        again = await orch.run("S", run_id="h")
    assert again.completed
    assert result.completed
    with Store.open(f"{tmp_path}/g.db") as s:
        errors = [o.error for o in s.outputs("g") if o.error]
        assert not [e for e in errors if e.startswith("timeout")], errors
        assert not s.events("g", kind="call_cancelled")
        refused = [e for e in errors if "past the 600s this call has left" in e]
    assert len(refused) == 3, errors  # b, c and d, each once, then answered after the reset
    with Store.open(f"{tmp_path}/g.db") as s:
        assert not [o for o in s.outputs("h") if o.error and "this call has left" in o.error]


async def test_a_call_released_after_its_deadline_is_refused_at_once(autojump_clock: trio.testing.MockClock) -> None:
    """Review finding: the check compared the deadline with the reset, not
    with this caller's own release point (up to a second later, by its
    identity): a deadline in between timed out at the gate."""
    from actors._health import ProviderHealth, _spread_unit

    health = ProviderHealth("p")
    permit, _ = await health.admit()
    assert permit is not None
    health.report(permit, RateLimited("429", retry_after=10.0))
    await trio.sleep(0.5)  # the closing holds callers after its instant
    request = next(r for r in (call(agent=f"a{i}") for i in range(50)) if _spread_unit(r) > 0.5)
    late = attrs.evolve(request, deadline=10.0 + _spread_unit(request) / 2)  # after the reset, before its release
    granted, refused = await health.admit(late)
    assert granted is None and isinstance(refused, RateLimited) and trio.current_time() == 0.5
    in_time = attrs.evolve(request, deadline=12.0)
    granted, refused = await health.admit(in_time)
    assert granted is not None and refused is None and 10.0 < trio.current_time() < 11.0


async def test_injected_faults_wait_for_a_worker_as_the_calls_they_stand_for(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A panel larger than the gateway's workers: injected disconnects
    failed at the inbox at once, while the calls they stand for queued
    behind 64 workers, so the breaker saw 64 failures among 128 admitted
    calls (50 %) at a 30 % fault rate, opened, and failed agents with
    circuit_open (3,000 agents at 5 %: the run halted)."""
    from actors import HealthRegistry, open_orchestrator, pipeline_with_panel

    health = HealthRegistry()
    agents = [f"a{i:03d}" for i in range(200)]
    async with open_orchestrator(
        store=str(tmp_path / "wide.db"),
        pipeline=pipeline_with_panel("validate", agents),
        faults="disconnect:30%",
        health=health,
        retry=RetryPolicy(max_attempts=10),
    ) as orch:
        result = await orch.run("SPEC-WIDE")
    assert result.completed
    assert health["sim"].breaker.transitions == []
    # Each agent's calls: its faults, then one answer - no refusals in between.
    assert orch.faults is not None and result.turns == 200 + sum(orch.faults.injected.values())


def test_a_halt_for_want_of_answers_names_a_few_failed_agents_not_all() -> None:
    from actors._coordinator import SHOWN_FAILURES, StageUnanswered

    few = StageUnanswered("plan", {"a": "timeout: x", "b": "timeout: y"})
    assert "a: timeout: x; b: timeout: y" in str(few) and "more" not in str(few)
    many = StageUnanswered("plan", {f"a{i:04d}": "disconnect: cut" for i in range(1000)})
    assert str(many).startswith("1000 agent(s) failed")
    assert str(many).count("disconnect: cut") == SHOWN_FAILURES
    assert f"and {1000 - SHOWN_FAILURES} more" in str(many) and len(str(many)) < 500
    assert len(many.failures) == 1000  # all kept for the halt event


def test_a_halt_for_want_of_answers_never_claims_the_agents_were_retried() -> None:
    from actors._coordinator import StageUnanswered
    from actors._http_errors import NOT_RETRIED

    # A wrong key fails at once; so do a 503 the server said not to retry
    # and any error under --max-attempts 1, which a message cannot tell.
    for failures in (
        {"a": "timeout: x", "b": "rate_limit: y"},
        {"a": "timeout: x", "b": "authentication: 401 Unauthorized"},
        {"a": "timeout: x", "b": f"unavailable: 503 maintenance; {NOT_RETRIED}"},
    ):
        text = str(StageUnanswered("plan", failures))
        assert text.startswith("2 agent(s) failed (a: timeout: x; b: ") and "retries" not in text, text


def test_backoff_past_a_float_power_stays_at_its_cap() -> None:
    """2.0 ** 1024 overflows a float: an agent on its 1,026th attempt
    (--max-attempts 1100 and a provider that keeps failing) crashed the
    run with OverflowError, and the soak reported every run a breach."""
    policy = RetryPolicy(max_attempts=5000, jitter=0.0)
    key = AgentKey(run_id="r", branch_id="b", stage="plan", agent="a")
    assert policy.delay(Disconnected("cut"), key, 1100, 0) == policy.cap
    assert RetryPolicy(initial=0.0, jitter=0.0).delay(Disconnected("cut"), key, 1100, 0) == 0.0
