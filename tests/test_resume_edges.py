"""Edges of resume and rerun that the broad crash/resume tests passed over:
the rounds a user-fixable failure is granted, an attempt budget spent just
before a crash, forking past a stage that halted, and rounds that belong to
one branch only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from actors import MockProvider, RetryPolicy, SimulatedProvider, open_orchestrator
from actors._pipeline import pipeline_with_panel
from actors._resume import ResumeError, load_state
from messages import (
    AuthenticationFailed,
    Completion,
    CompletionRequest,
    FunctionInterceptor,
    PersistEvent,
    ProviderUnavailable,
    RateLimited,
)
from store import Store

RETRY = RetryPolicy(max_attempts=3)


def drain(channel: Any) -> list[Any]:
    events = []
    while True:
        try:
            events.append(channel.receive_nowait())
        except trio.WouldBlock:
            return events


def recording(calls: list[tuple[str, str, int]], fail: Any, *, seed: int = 0, rate: float = 0.0) -> MockProvider:
    """The simulator, except where ``fail(request)`` returns an error to raise;
    every call is recorded as (stage, agent, attempt)."""
    sim = SimulatedProvider(seed=seed, disagreement_rate=rate)

    def answer(request: CompletionRequest) -> Completion:
        calls.append((request.key.stage, request.key.agent, request.attempt))
        error = fail(request)
        if error is not None:
            raise error
        return sim.answer(request)

    return MockProvider(answer, name="sim")


async def test_retry_failed_after_a_fixed_key_calls_the_agent_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A 401 is fixed outside the run (a new key); 'resume --retry-failed'
    then grants one ask per halt.  Counted as ``gave_up < rounds``, the one
    halt outweighed the one round granted: the resume replayed the 401 and
    halted again without calling the agent."""
    path = str(tmp_path / "auth.db")
    pipeline = pipeline_with_panel("validate", ["a"])
    broken: list[tuple[str, str, int]] = []
    async with open_orchestrator(
        store=path, provider=recording(broken, lambda r: AuthenticationFailed("401 invalid api key")),
        pipeline=pipeline, retry=RETRY,
    ) as orch:
        halted = await orch.run("SPEC", run_id="K")
    assert (halted.status, halted.halt_reason) == ("halted", "agents_failed")
    assert broken == [("validate", "a", 1)], "authentication is not retried"

    fixed: list[tuple[str, str, int]] = []
    async with open_orchestrator(
        store=path, provider=recording(fixed, lambda r: None), pipeline=pipeline, retry=RETRY
    ) as orch:
        resumed = await orch.resume("K", retry_failed=True)
    assert fixed == [("validate", "a", 2)], "the agent is asked again, its attempts numbered on"
    assert resumed.completed
    assert [(s.stage, s.status) for s in resumed.stages] == [("validate", "ok")]


def crash_at_gave_up(scope: trio.CancelScope) -> FunctionInterceptor[Any]:
    """A store-edge interceptor that cancels ``scope`` as the first gave_up
    event arrives: the crash lands between an agent's last failed attempt
    and the event that says it gave up."""

    async def crash(item: Any, forward: Any) -> None:
        if isinstance(item, PersistEvent) and item.kind == "gave_up":
            scope.cancel()
            return  # never written
        await forward(item)

    return FunctionInterceptor(crash)


async def test_a_crash_before_gave_up_grants_no_extra_round(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """An agent spent its max_attempts on a retryable error; the process died
    before its gave_up event was written.  Its third attempt is the last of
    the round it was granted: with ``last.attempt <= granted`` a plain
    resume read the round as spent-and-regranted and bought three attempts
    more, though no --retry-failed asked for them."""
    path = str(tmp_path / "crash.db")
    pipeline = pipeline_with_panel("validate", ["a"])
    down = lambda r: ProviderUnavailable("503 upstream down")  # noqa: E731
    first: list[tuple[str, str, int]] = []
    with trio.CancelScope() as scope:
        async with open_orchestrator(
            store=path, provider=recording(first, down), pipeline=pipeline, retry=RETRY,
            interceptors={"store": [crash_at_gave_up(scope)]},
        ) as orch:
            await orch.run("SPEC", run_id="C")
    assert scope.cancelled_caught
    assert first == [("validate", "a", n) for n in (1, 2, 3)]
    with Store.open(path) as s:
        assert [(o.attempt, o.status) for o in s.outputs("C")] == [(1, "failed"), (2, "failed"), (3, "failed")]
        assert s.events("C", "gave_up") == []
        state = load_state(s, "C")
    assert state.rounds == {}
    resume = state.stage_resume(state.pipeline.stage("validate"), RETRY)
    assert resume is not None
    assert dict(resume.first_attempt) == {}, "no attempt beyond max_attempts is granted"
    assert resume.replay["a"].attempts == 3 and resume.replay["a"].error is not None

    again: list[tuple[str, str, int]] = []
    async with open_orchestrator(store=path, provider=recording(again, down), pipeline=pipeline, retry=RETRY) as orch:
        resumed = await orch.resume("C")
    assert again == [], "the failure is replayed, nobody is called"
    assert (resumed.status, resumed.halt_reason) == ("halted", "agents_failed")


def tasks_disagree(calls: list[tuple[str, str, int]]) -> MockProvider:
    """Agreeing answers everywhere except stage 'tasks', where every agent
    answers differently: the run halts there with a conflict."""
    agree = SimulatedProvider(seed=2, disagreement_rate=0.0)
    differ = SimulatedProvider(seed=2, disagreement_rate=1.0)

    def answer(request: CompletionRequest) -> Completion:
        calls.append((request.key.stage, request.key.agent, request.attempt))
        return (differ if request.key.stage == "tasks" else agree).answer(request)

    return MockProvider(answer, name="sim")


async def test_rerun_past_a_stage_that_halted_on_a_conflict_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Stage 2 ('tasks') halted with a conflict.  A rerun from stage 3 would
    inherit that conflict as if it had advanced; it must be refused, naming
    the stage to rerun from instead, having written nothing."""
    path = str(tmp_path / "conflict.db")
    calls: list[tuple[str, str, int]] = []
    async with open_orchestrator(store=path, provider=tasks_disagree(calls), seed=2) as orch:
        halted = await orch.run("SPEC", run_id="F")
        assert (halted.status, halted.halt_reason) == ("halted", "conflict")
        assert [(s.stage, s.status) for s in halted.stages] == [("plan", "ok"), ("tasks", "conflict")]
        with Store.open(path) as s:
            before = (len(s.branches("F")), len(s.events("F")))
        asked = len(calls)
        with pytest.raises(ResumeError, match=r"earlier stage 'tasks' ended in conflict.*rerun from 'tasks' instead"):
            await orch.rerun("F", "implement")
    assert len(calls) == asked
    with Store.open(path) as s:
        assert (len(s.branches("F")), len(s.events("F"))) == before


async def test_a_rerun_branch_does_not_inherit_its_parents_retry_rounds(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Rounds granted by 'resume --retry-failed' are the branch's own: counted
    across branches, a rerun's child started with its parent's rounds, and
    its agents were granted attempts its own halts never earned."""
    path = str(tmp_path / "rounds.db")
    calls: list[tuple[str, str, int]] = []
    down = lambda r: ProviderUnavailable("503") if r.key.stage == "implement" else None  # noqa: E731
    async with open_orchestrator(store=path, provider=recording(calls, down), retry=RETRY) as orch:
        halted = await orch.run("SPEC", run_id="N")
        assert (halted.status, halted.halt_reason) == ("halted", "agents_failed")
        still = await orch.resume("N", retry_failed=True)
        assert still.halt_reason == "agents_failed"
        with Store.open(path) as s:
            parent = load_state(s, "N")
        assert parent.rounds == {"implement": 1}
        child = await orch.rerun("N", "tasks")
        assert child.halt_reason == "agents_failed"
    with Store.open(path) as s:
        kid = load_state(s, "N")
        assert kid.branch.branch_id != parent.branch.branch_id
        assert kid.branch.parent_branch_id == parent.branch.branch_id
        assert kid.rounds == {}
        assert load_state(s, "N", parent.branch.branch_id).rounds == {"implement": 1}


async def test_a_resume_during_a_rate_limit_backoff_waits_it_out(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The process died 5 s into a 10 s wait for a 429's reset.  The resume
    made the next attempt at once, inside the window: another 429, one
    attempt of the agent's budget thrown away, and at two attempts a
    degraded stage the uninterrupted run did not have."""
    path = str(tmp_path / "reset.db")
    pipeline = pipeline_with_panel("validate", ["a"])
    retry = RetryPolicy(max_attempts=2)
    limited_until: list[float] = []
    calls: list[tuple[str, str, int]] = []
    crash = trio.CancelScope()

    def limit(request: CompletionRequest) -> Exception | None:
        now = trio.current_time()
        if not limited_until:
            limited_until.append(now + 10)
            crash.deadline = now + 5
        if now < limited_until[0]:
            return RateLimited("429 Too Many Requests", retry_after=limited_until[0] - now)
        return None

    with crash:
        async with open_orchestrator(
            store=path, provider=recording(calls, limit), pipeline=pipeline, retry=retry
        ) as orch:
            await orch.run("SPEC", run_id="R")
    assert crash.cancelled_caught and calls == [("validate", "a", 1)]

    from messages import AgentRetrying

    async with open_orchestrator(store=path, provider=recording(calls, limit), pipeline=pipeline, retry=retry) as orch:
        progress = orch.subscribe()
        resumed = await orch.resume("R")
        said = [e for e in drain(progress) if isinstance(e, AgentRetrying)]
    assert calls == [("validate", "a", 1), ("validate", "a", 2)]
    # The pause is said as it starts: the resume looked hung for its length.
    assert [(e.key.agent, e.attempt, e.error) for e in said] == [("a", 1, "before the interruption")]
    assert said[0].delay >= 10
    assert resumed.completed and [(s.stage, s.status) for s in resumed.stages] == [("validate", "ok")]

    with Store.open(path) as s:
        state = load_state(s, "R")
        (retried,) = s.events("R", "retry")
    assert retried.attempt == 1 and state.retry_waits == {("validate", "a", 1): retried.detail["delay_s"]}
    assert retried.detail["delay_s"] >= 10


async def test_a_resume_whose_retry_event_was_lost_waits_the_backoff_it_can_compute(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The writer holds events up to a second: a crash at once after a
    failure loses its retry event, not the failed attempt.  The resume then
    waits the backoff the policy gives that attempt (without the lost hint)."""
    path = str(tmp_path / "lost.db")
    pipeline = pipeline_with_panel("validate", ["a"])
    down = lambda r: ProviderUnavailable("503 upstream down") if r.attempt == 1 else None  # noqa: E731
    with trio.CancelScope() as crash:

        async def drop_retry(item: Any, forward: Any) -> None:
            if isinstance(item, PersistEvent) and item.kind == "retry":
                crash.cancel()
                return
            await forward(item)

        async with open_orchestrator(
            store=path, provider=recording([], down), pipeline=pipeline, retry=RETRY,
            interceptors={"store": [FunctionInterceptor(drop_retry)]},
        ) as orch:
            await orch.run("SPEC", run_id="L")
    with Store.open(path) as s:
        assert s.events("L", "retry") == []
        state = load_state(s, "L")
    resume = state.stage_resume(state.pipeline.stage("validate"), RETRY)
    assert resume is not None and dict(resume.first_attempt) == {"a": 2}
    expected = RETRY.delay(ProviderUnavailable("503 upstream down"), state.stage_key("validate").agent("a"), 1, state.seed, spec_id="SPEC")
    assert expected > 0 and dict(resume.first_wait) == {"a": expected}


async def test_a_round_granted_by_retry_failed_starts_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The agent gave up after a round of 503s (no retry event for its last
    attempt: a gave_up one).  The round --retry-failed grants starts afresh;
    it waited the backoff of the attempt that gave up."""
    path = str(tmp_path / "round.db")
    pipeline = pipeline_with_panel("validate", ["a"])
    retry = RetryPolicy(max_attempts=3, initial=2.0, cap=60.0)
    down = lambda r: ProviderUnavailable("503 upstream down")  # noqa: E731
    async with open_orchestrator(store=path, provider=recording([], down), pipeline=pipeline, retry=retry) as orch:
        halted = await orch.run("SPEC", run_id="F")
    assert halted.halt_reason == "agents_failed"
    with Store.open(path) as s:
        state = load_state(s, "F").with_new_round("validate")
    resume = state.stage_resume(state.pipeline.stage("validate"), retry)
    assert resume is not None and dict(resume.first_attempt) == {"a": 4} and dict(resume.first_wait) == {}

    times: list[float] = []

    def answered(request: CompletionRequest) -> None:
        times.append(trio.current_time())

    async with open_orchestrator(store=path, provider=recording([], answered), pipeline=pipeline, retry=retry) as orch:
        start = trio.current_time()
        resumed = await orch.resume("F", retry_failed=True)
    assert resumed.completed and times == [start]
