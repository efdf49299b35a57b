"""Edges of the gateway's bookkeeping with the breaker and the fault
interceptor: a half-open probe whose caller gives up (at the rate-limit
gate, or mid-call) frees its slot; a resend refused at the gate is not the
provider's failure; a queued injected fault whose caller gave up never
fires; and a failed call's implausible usage is unknown, not counted."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from actors import BreakerPolicy, Gateway, HealthRegistry, MockProvider
from actors._http_errors import with_usage
from actors._provider import before_resend
from messages import (
    ZERO_USAGE,
    AgentKey,
    CircuitOpen,
    Completion,
    CompletionRequest,
    CompletionResult,
    Disconnected,
    FaultInterceptor,
    FaultPlan,
    RateLimited,
    TokenUsage,
    open_channel,
    reply_pair,
)

from .conftest import run_watching

POLICY = BreakerPolicy(failure_rate=0.5, window=60.0, min_calls=1, cooldown=5.0)
ANSWER = Completion(content="{}", usage=TokenUsage.of(input_tokens=1), model="m")


def call(agent: str, *, attempt: int = 1, stage: str = "plan") -> CompletionRequest:
    key = AgentKey(run_id="r", branch_id="b", stage=stage, agent=agent)
    return CompletionRequest(
        key=key, attempt=attempt, spec_id="S", provider="p", model="m", prompt="x", panel=(agent,)
    )


async def ask(tx: object, request: CompletionRequest, timeout: float = float("inf")) -> CompletionResult | str:
    """Send ``request`` and wait for its result at most ``timeout`` seconds
    ("gave up" after that, the reply slot abandoned, as an agent's call
    timeout leaves it)."""
    reply, pending = reply_pair("test")
    await tx.send(attrs.evolve(request, reply_to=reply))  # type: ignore[attr-defined]
    with trio.move_on_after(timeout):
        result: CompletionResult = await pending.receive()
        return result
    return "gave up"


async def trip(health: HealthRegistry) -> None:
    """Open provider p's breaker: one real failure at 0, then the call a
    second later opens it and fails fast (returns at that instant, 1 s)."""
    p = health["p"]
    permit, _ = await p.admit()
    assert permit is not None
    p.report(permit, Disconnected("cut"))
    await trio.sleep(1)
    refused, error = await p.admit()
    assert refused is None and isinstance(error, CircuitOpen) and p.breaker.state == "open"


def answering(
    made: list[str], *, hang: str | None = None, seconds: float = 1.0
) -> Callable[[CompletionRequest], Awaitable[Completion]]:
    """A provider answering in ``seconds`` (never, for agent ``hang``),
    recording who it was called for in ``made``."""

    async def handler(request: CompletionRequest) -> Completion:
        made.append(request.key.agent)
        if request.key.agent == hang:
            await trio.sleep_forever()
        await trio.sleep(seconds)
        return ANSWER

    return handler


async def test_a_probe_given_up_at_the_rate_limit_gate_frees_the_probe_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Half-open behind a closed gate: the first call the gate releases is
    admitted as the probe, but its caller gave up meanwhile, so it is
    dropped unmade.  Had its permit not been given back, the probe slot
    stayed taken with no verdict ever coming: every later call waited for
    it, and the provider was never called again."""
    health = HealthRegistry(POLICY)
    made: list[str] = []
    gateway = Gateway({"p": MockProvider(answering(made), name="p")}, health=health)
    await trip(health)  # opened at 1; probes from 6
    gate = health["p"].gate
    gate.close_until(trio.current_time() + 30.0, trio.current_time())  # a 429's reset, at 31
    await trio.sleep(0.001)
    tx, rx = open_channel(8, name="gateway")
    with trio.fail_after(600):  # a call left waiting for a verdict would hang the test
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gateway.run, rx)
            assert await ask(tx, call("impatient"), timeout=5.0) == "gave up"
            await trio.sleep(40.0)  # the gate released it (as the probe) and it was dropped
            assert gateway.abandoned == 1 and made == []
            result = await ask(tx, call("next"))
            tx.close()
    assert isinstance(result, CompletionResult) and result.completion is not None
    assert made == ["next"]
    assert [state for _, state in health["p"].breaker.transitions] == ["open", "half_open", "closed"]


async def test_a_probe_cancelled_mid_call_frees_the_slot_for_the_callers_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Half-open: the probe's provider hangs and its caller's timeout
    cancels it there.  A caller that arrived meanwhile waits for the
    probe's verdict; the cancelled probe must give its slot back and wake
    it, so that it probes in turn.  Without that, it (and every call after
    it) waited for ever."""
    health = HealthRegistry(POLICY)
    made: list[str] = []
    gateway = Gateway({"p": MockProvider(answering(made, hang="hung"), name="p")}, health=health)
    await trip(health)
    await trio.sleep(5.0)  # past the cooldown
    tx, rx = open_channel(8, name="gateway")
    results: dict[str, CompletionResult | str] = {}

    async def caller(agent: str, delay: float, timeout: float) -> None:
        await trio.sleep(delay)
        results[agent] = await ask(tx, call(agent), timeout)

    with trio.fail_after(600):  # a caller left waiting for a verdict would hang the test
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gateway.run, rx)
            async with trio.open_nursery() as callers:
                callers.start_soon(caller, "hung", 0.0, 2.0)
                callers.start_soon(caller, "waiting", 0.5, float("inf"))
            tx.close()
    assert results["hung"] == "gave up" and gateway.cancelled == 1
    waited = results["waiting"]
    assert isinstance(waited, CompletionResult) and waited.completion is not None
    assert made == ["hung", "waiting"]
    assert health["p"].breaker.state == "closed"


async def test_a_resend_refused_at_the_gate_is_not_a_provider_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A call's first request is answered 401; while its token refreshes,
    another call's 429 closes the gate for longer than ``max_wait``, so
    its resend (``before_resend``) is refused and never sent.  That is the
    gate's doing: reported as the provider failing, it counted against the
    breaker (and could open it on a healthy provider); it also costs
    nothing, and its refusal is not another 429 from the provider."""
    health = HealthRegistry(POLICY, max_wait=10.0)

    async def handler(request: CompletionRequest) -> Completion:
        if request.key.agent == "limited":
            await trio.sleep(0.5)
            raise RateLimited("429 Too Many Requests", retry_after=60.0)
        await trio.sleep(1.0)  # the 401 and the token refresh
        await before_resend()
        return ANSWER

    gateway = Gateway({"p": MockProvider(handler, name="p")}, health=health)
    tx, rx = open_channel(8, name="gateway")
    results: dict[str, CompletionResult | str] = {}

    async def caller(agent: str) -> None:
        results[agent] = await ask(tx, call(agent))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.run, rx)
        async with trio.open_nursery() as callers:
            callers.start_soon(caller, "resending")
            callers.start_soon(caller, "limited")
        tx.close()
    refused = results["resending"]
    assert isinstance(refused, CompletionResult) and isinstance(refused.error, RateLimited)
    assert "the call was not made" in str(refused.error)
    assert refused.usage == ZERO_USAGE
    p = health["p"]
    assert p.breaker.failure_ratio == 0.0
    assert len(p.rate_limits) == 1, "only the provider's own 429"
    assert p.breaker.state == "closed" and p.breaker.transitions == []


async def test_a_queued_injected_fault_whose_caller_gave_up_is_withdrawn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An injected disconnect queued behind a busy worker; its caller's
    timeout fires first.  Fired anyway, it spent the run's one counted
    fault on nobody and fed the breaker a failure no call had; withdrawn,
    the budget keeps it for a later stage."""
    health = HealthRegistry(POLICY)
    faults = FaultInterceptor(FaultPlan.parse("disconnect:1"), health=health)
    faults.attach(queued=True)  # as the runtime does for a gateway serving injections
    made: list[str] = []
    gateway = Gateway({"p": MockProvider(answering(made, seconds=10.0), name="p")}, health=health, max_concurrency=1)
    tx, rx = open_channel(8, name="gateway", interceptors=[faults])
    results: dict[str, CompletionResult | str] = {}

    async def caller(request: CompletionRequest, delay: float, timeout: float) -> None:
        await trio.sleep(delay)
        results[request.key.agent] = await ask(tx, request, timeout)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.run, rx)
        async with trio.open_nursery() as callers:
            # Attempt 2 of a one-seat stage: past "disconnect:1"'s placements.
            callers.start_soon(caller, call("busy", attempt=2), 0.0, float("inf"))
            callers.start_soon(caller, call("impatient"), 0.5, 1.0)
        assert results["impatient"] == "gave up"
        assert faults.injected["disconnect"] == 0
        assert faults.remaining("r") == {"disconnect": 1, "rate_limit": 0, "timeout": 0}
        assert health["p"].breaker.failure_ratio == 0.0
        # The fault it kept goes to the next stage's call.
        later = await ask(tx, call("next", stage="tasks"))
        tx.close()
    assert isinstance(later, CompletionResult) and isinstance(later.error, Disconnected)
    assert faults.injected["disconnect"] == 1 and faults.remaining("r")["disconnect"] == 0
    assert made == ["busy"], "no provider call for either fault"


@pytest.mark.parametrize(
    ("usage", "kept"),
    [
        (TokenUsage(input_tokens=2**62), None),  # more than any call uses: unknown
        (TokenUsage.of(input_tokens=700, output_tokens=30), TokenUsage.of(input_tokens=700, output_tokens=30)),
    ],
)
async def test_a_failed_calls_implausible_usage_is_unknown(
    autojump_clock: trio.testing.MockClock, usage: TokenUsage, kept: TokenUsage | None
) -> None:
    """A stream cut after a usage chunk reports what the call consumed; a
    count beyond any call's (a corrupt chunk) overflowed the run's stored
    totals and stopped the metrics.  It is unknown instead; a plausible
    one is kept as reported."""

    async def cut(request: CompletionRequest) -> Completion:
        await trio.sleep(1.0)
        raise with_usage(Disconnected("stream cut after its usage"), usage)

    gateway = Gateway({"p": MockProvider(cut, name="p")})
    tx, rx = open_channel(8, name="gateway")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.run, rx)
        result = await ask(tx, call("a"))
        tx.close()
    assert isinstance(result, CompletionResult) and isinstance(result.error, Disconnected)
    assert result.usage == kept


async def _b_later(item: Any, forward: Any) -> None:
    if item.key.agent == "b":
        await trio.sleep(1)  # decided before forwarding: the seam's rule holds
    await forward(item)


async def _run_watching_waits(orch: Any, run_id: str) -> tuple[Any, list[Any]]:
    """Run ``run_id`` and collect the CallWaiting progress it publishes."""
    from messages import CallWaiting

    return await run_watching(orch, "SPEC", run_id, CallWaiting)


async def test_a_call_waiting_at_a_closed_gate_says_so_and_is_logged(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """b's call arrives while a's 429 holds the gate shut for 30 s.  The wait
    was silent - the CLI showed nothing for 30 s - and the event log had no
    trace of it (the retry event's delay_s is the agent's own backoff)."""
    from actors import SimulatedProvider, open_orchestrator
    from actors._pipeline import pipeline_with_panel
    from messages import FunctionInterceptor, RateLimited
    from store import Store

    sim = SimulatedProvider(seed=1, disagreement_rate=0.0)

    def answer(request: CompletionRequest) -> Any:
        if request.key.agent == "a" and request.attempt == 1:
            raise RateLimited("429 Too Many Requests", retry_after=30.0)
        return sim.answer(request)

    path = str(tmp_path / "gate.db")
    async with open_orchestrator(
        store=path, provider=MockProvider(answer, name="sim"), pipeline=pipeline_with_panel("validate", ["a", "b"]),
        interceptors={"agent": [FunctionInterceptor(_b_later)]},
    ) as orch:
        result, seen = await _run_watching_waits(orch, "G")
    assert result.completed
    assert [(e.key.agent, e.attempt, e.provider) for e in seen] == [("b", 1, "sim")]
    assert seen[0].delay == pytest.approx(29.0)
    with Store.open(path) as store:
        (logged,) = store.events("G", "gate_wait")
    assert (logged.agent, logged.attempt, logged.detail["provider"]) == ("b", 1, "sim")
    assert 29.0 <= logged.detail["waited_s"] <= 31.0


async def test_an_injected_fault_waiting_at_a_closed_gate_says_so(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Injected faults take the real calls' path through the gate, and now
    its progress too: b's fault (the second of two counted 429s) arrived
    while a's held the gate shut for 30 s, and waited there in silence."""
    from actors import SimulatedProvider, open_orchestrator
    from actors._pipeline import pipeline_with_panel
    from messages import FaultInterceptor, FaultPlan, FunctionInterceptor

    faults = FaultInterceptor(FaultPlan.parse("429:2", reset="30"))
    async with open_orchestrator(
        store=str(tmp_path / "inj.db"), provider=SimulatedProvider(seed=1, disagreement_rate=0.0),
        pipeline=pipeline_with_panel("validate", ["a", "b"]),
        interceptors={"agent": [FunctionInterceptor(_b_later)], "gateway": [faults]},
    ) as orch:
        result, seen = await _run_watching_waits(orch, "I")
    assert result.completed
    assert faults.injected["rate_limit"] == 2
    assert [(e.key.agent, e.attempt, e.provider) for e in seen] == [("b", 1, "sim")]
    assert seen[0].delay == pytest.approx(29.0)


async def test_an_injected_fault_at_a_gate_of_the_callers_own_is_not_given_a_wait_hook(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A HealthPort the caller wrote to the two-argument ``admit`` keeps
    working: only the orchestrator's own port is given ``on_wait``."""
    from actors import SimulatedProvider, open_orchestrator
    from actors._pipeline import pipeline_with_panel
    from messages import FaultInterceptor, FaultPlan

    admitted: list[str] = []

    class OldPort:
        async def admit(self, provider: str, request: Any = None) -> tuple[Any, Any]:
            admitted.append(provider)
            return object(), None

        def report(self, permit: Any, error: Any) -> None:
            pass

        def abandon(self, permit: Any) -> None:
            pass

    faults = FaultInterceptor(FaultPlan.parse("disconnect:1"), health=OldPort())
    async with open_orchestrator(
        store=str(tmp_path / "old.db"), provider=SimulatedProvider(seed=1, disagreement_rate=0.0),
        pipeline=pipeline_with_panel("validate", ["a", "b"]), interceptors={"gateway": [faults]},
    ) as orch:
        result = await orch.run("SPEC", run_id="O")
    assert result.completed
    assert faults.injected["disconnect"] == 1 and admitted == ["sim"]


def test_the_public_health_port_keeps_its_two_argument_admit() -> None:
    """A caller's port typed to HealthPort must still type-check: the wait
    hook belongs to the orchestrator's own port alone."""
    import inspect

    from messages import HealthPort

    assert list(inspect.signature(HealthPort.admit).parameters) == ["self", "provider", "request"]


def test_the_cli_prints_a_call_waiting_at_the_gate() -> None:
    import io

    from actors._cli import ProgressPrinter
    from messages import AgentKey, CallWaiting

    out = io.StringIO()
    key = AgentKey(run_id="r", branch_id="b", stage="validate", agent="claude")
    ProgressPrinter(out, 6)(CallWaiting(key=key, attempt=2, provider="openai", delay=29.0))
    assert out.getvalue() == "    claude: attempt 2 waits 29s for openai's rate-limit reset\n"


def _a_limits_b_fails_once(retry_after: float, made: list[tuple[str, int, float]]) -> MockProvider:
    """a's first call gets a 429 closing the gate for ``retry_after``; b's
    first call fails (503), so its retry meets the closed gate."""
    from actors import SimulatedProvider
    from messages import ProviderUnavailable, RateLimited

    sim = SimulatedProvider(seed=0, disagreement_rate=0.0)

    def answer(request: CompletionRequest) -> Any:
        made.append((request.key.agent, request.attempt, trio.current_time()))
        if request.key.agent == "a" and request.attempt == 1:
            raise RateLimited("429", retry_after=retry_after)
        if request.key.agent == "b" and request.attempt == 1:
            raise ProviderUnavailable("503")
        return sim.answer(request)

    return MockProvider(answer, name="sim")


async def test_a_call_the_gate_refuses_at_once_is_not_said_to_wait(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # It printed "attempt 2 waits 16m40s" for a call refused in the same
    # instant (the reset past the 600 s a call may wait).
    from actors import RetryPolicy, open_orchestrator
    from actors._pipeline import pipeline_with_panel
    from messages import AgentFinished, CallWaiting

    seen: list[object] = []
    async with open_orchestrator(
        store=str(tmp_path / "w.db"), provider=_a_limits_b_fails_once(1000.0, []),
        pipeline=pipeline_with_panel("validate", ["a", "b"]), retry=RetryPolicy(max_attempts=2, initial=0.1),
    ) as orch:
        progress = orch.subscribe(1000)
        result = await orch.run("SPEC", run_id="W")
        while True:
            try:
                seen.append(progress.receive_nowait())
            except trio.WouldBlock:
                break
    assert result.halt_reason == "agents_failed"
    assert [e for e in seen if isinstance(e, CallWaiting)] == []
    assert any(isinstance(e, AgentFinished) and e.key.agent == "b" and "the call was not made" in (e.error or "") for e in seen)


async def test_logging_a_gate_wait_never_holds_up_the_call(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The gate_wait event was written between the call's admission and the
    call: with the store's inbox slow, the call went out late (or, cancelled
    there, was never made and left no call_dropped).  It is logged after."""
    from actors import RetryPolicy, open_orchestrator
    from actors._pipeline import pipeline_with_panel
    from messages import FunctionInterceptor, PersistEvent

    async def slow_store(item: Any, forward: Any) -> None:
        if isinstance(item, PersistEvent) and item.kind == "gate_wait":
            await trio.sleep(1000)  # an fsync taking for ever
        await forward(item)

    made: list[tuple[str, int, float]] = []
    with trio.move_on_after(100):
        async with open_orchestrator(
            store=str(tmp_path / "g.db"), provider=_a_limits_b_fails_once(10.0, made),
            pipeline=pipeline_with_panel("validate", ["a", "b"]), retry=RetryPolicy(max_attempts=3, initial=0.1),
            interceptors={"store": [FunctionInterceptor(slow_store)]},
        ) as orch:
            await orch.run("SPEC", run_id="G")
    (second,) = [at for agent, attempt, at in made if (agent, attempt) == ("b", 2)]
    assert 10.0 <= second < 12.0, "made when the gate let it through"
