"""Resume in-process: cut a run off at every write, with provider faults
in play, and check the resumed run is the uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from actors import MockProvider, RetryPolicy, SimulatedProvider, open_orchestrator
from actors._resume import ResumeError
from messages import BadRequest, Completion, CompletionRequest, Disconnected, FunctionInterceptor, RateLimited
from store import Store

from .conftest import cut_at_write

RETRY = RetryPolicy(max_attempts=3)


def faulty_provider(calls: list[tuple[str, str, str, int]]) -> MockProvider:
    """The simulator, with faults placed by identity: (tasks, claude) fails
    once, (audit, claude) twice, (validate, gemini) for good."""
    sim = SimulatedProvider(seed=9)

    def answer(request: CompletionRequest) -> Completion:
        k = request.key
        calls.append((k.branch_id, k.stage, k.agent, request.attempt))
        if (k.stage, k.agent) == ("tasks", "claude") and request.attempt == 1:
            raise Disconnected("stream dropped")
        if (k.stage, k.agent) == ("audit", "claude") and request.attempt <= 2:
            raise RateLimited("slow down", retry_after=1.0)
        if (k.stage, k.agent) == ("validate", "gemini"):
            raise BadRequest("malformed")
        return sim.answer(request)

    return MockProvider(answer, name="sim")


async def full_run(path: str) -> tuple[Any, list[tuple[str, str, str, int]], int]:
    calls: list[tuple[str, str, str, int]] = []
    writes = 0

    async def count(item: Any, forward: Any) -> None:
        nonlocal writes
        writes += 1
        await forward(item)

    async with open_orchestrator(
        store=path, provider=faulty_provider(calls), seed=9, retry=RETRY,
        interceptors={"store": [FunctionInterceptor(count)]},
    ) as orch:
        result = await orch.run("SPEC-R", run_id="R")
    return result, calls, writes


def decision_log(path: str) -> list[tuple[str, int, str, str]]:
    with Store.open(path) as s:
        return [(d.stage, d.seq, d.status, json.dumps(d.verdict, sort_keys=True)) for d in s.decisions("R")]


async def test_cut_at_every_write_then_resume(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    expected, base_calls, total = await full_run(str(tmp_path / "base.db"))
    assert expected.completed
    assert ("validate", "gemini") in {(s, a) for _, s, a, _ in base_calls}
    assert expected.stages[3].missing_agents == ("gemini",)  # gave up: degraded, not halted
    expected_log = decision_log(str(tmp_path / "base.db"))

    for cut in range(2, total + 1):
        path = str(tmp_path / f"cut{cut}.db")
        calls: list[tuple[str, str, str, int]] = []
        with trio.CancelScope() as scope:
            async with open_orchestrator(
                store=path, provider=faulty_provider(calls), seed=9, retry=RETRY,
                interceptors={"store": [cut_at_write(cut, scope)]},
            ) as orch:
                await orch.run("SPEC-R", run_id="R")
        with Store.open(path) as s:
            durable = {(o.stage, o.agent, o.attempt) for o in s.outputs("R")}
            accepted = {(o.stage, o.agent) for o in s.outputs("R", accepted_only=True)}
        again: list[tuple[str, str, str, int]] = []
        async with open_orchestrator(store=path, provider=faulty_provider(again), seed=9, retry=RETRY) as orch:
            resumed = await orch.resume("R")
        where = f"cut at write {cut}"
        assert resumed.digest == expected.digest, where
        assert resumed.usage == expected.usage and resumed.unknown_usage_calls == expected.unknown_usage_calls, where
        assert decision_log(path) == expected_log, where
        # No attempt that was durable is made again, no accepted answer is
        # bought again, and every attempt of the uninterrupted run is made.
        made = {(s, a, n) for _, s, a, n in again}
        assert not made & durable, where
        assert not {(s, a) for s, a, _ in made} & accepted, where
        assert made | durable == {(s, a, n) for _, s, a, n in base_calls}, where


def stored(path: str) -> tuple[Any, ...]:
    with Store.open(path) as s:
        return s.get_run("R"), s.branches("R"), s.events("R"), s.decisions("R")


async def test_resume_of_a_finished_run_changes_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """It used to log a resume and rewrite the run's metrics event with 0
    calls (so `conclave metrics` showed no calls made), and mark the run
    running until the replay ended."""
    path = str(tmp_path / "done.db")
    expected, _, _ = await full_run(path)
    before = stored(path)
    calls: list[tuple[str, str, str, int]] = []
    async with open_orchestrator(store=path, provider=faulty_provider(calls), seed=9, retry=RETRY) as orch:
        again = await orch.resume("R")
    assert calls == []
    assert again.digest == expected.digest and again.turns == 0
    assert again.status == expected.status and again.usage == expected.usage
    assert [s.seq for s in again.stages] == [s.seq for s in expected.stages]
    assert stored(path) == before


async def test_a_run_halted_on_its_decision_resumes_to_the_same_halt_writing_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = str(tmp_path / "halt.db")
    async with open_orchestrator(store=path, provider=SimulatedProvider(seed=1, disagreement_rate=1.0)) as orch:
        halted = await orch.run("SPEC-H", run_id="R")
    assert halted.halt_reason in ("conflict", "no_consensus"), halted
    before = stored(path)
    async with open_orchestrator(store=path, provider=SimulatedProvider(seed=1, disagreement_rate=1.0)) as orch:
        again = await orch.resume("R")
    assert (again.status, again.halt_reason, again.halt_message) == (halted.status, halted.halt_reason, halted.halt_message)
    assert again.digest == halted.digest
    assert stored(path) == before


async def test_resume_errors(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    path = str(tmp_path / "e.db")
    await full_run(path)
    async with open_orchestrator(store=path, seed=9) as orch:
        with pytest.raises(ResumeError, match="no run 'nope'"):
            await orch.resume("nope")
        with pytest.raises(ResumeError, match="unknown stage 'deploy'"):
            await orch.rerun("R", "deploy")
        with pytest.raises(ResumeError, match="has no branch 'zzz'"):
            await orch.rerun("R", "plan", branch_id="zzz")


def test_a_run_stored_before_a_pipeline_check_existed_can_still_be_resumed(tmp_path: Path) -> None:
    """Review finding: the stored pipeline was checked again by the rules of
    the version resuming it, so a run whose stage decided on 'stage' (allowed
    before) could no longer be resumed or rerun."""
    import apsw

    from actors._pipeline import PipelineError, pipeline_from_dict

    from .conftest import run_cli

    db = str(tmp_path / "o.db")
    halted = run_cli(["run", "--db", db, "--run-id", "o1", "--budget", "0.005", "--json"])
    assert halted.returncode == 3, halted.stderr
    connection = apsw.Connection(db)
    (stored,) = connection.execute("SELECT pipeline FROM runs WHERE run_id = 'o1'").fetchone()
    pipeline = json.loads(stored)
    pipeline["stages"][-1]["decision_field"] = "stage"  # as an older version let it be
    connection.execute("UPDATE runs SET pipeline = ? WHERE run_id = 'o1'", (json.dumps(pipeline),))
    connection.close()
    with pytest.raises(PipelineError, match="decision_field 'stage'"):
        pipeline_from_dict(pipeline, source="a file")
    resumed = run_cli(["resume", "o1", "--db", db, "--budget", "10", "--json"])
    assert resumed.returncode == 0, resumed.stderr
    assert run_cli(["rerun", "o1", "--from", "audit", "--db", db]).returncode == 0
