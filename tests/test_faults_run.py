"""Acceptance 2: the reference's fault plan on a normal run.  The run
completes with the same decisions as without faults, the event log shows
the 6 injected faults and their retries, and no call reaches the provider
inside the 429's 30 s reset window (virtual time)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from actors import BaseProvider, ConfigError, SimulatedProvider, open_orchestrator, parse_pipeline
from messages import AgentRetrying, Completion, CompletionRequest, FaultInterceptor, FaultPlan, FunctionInterceptor
from store import Store

from .conftest import cut_at_write, run_cli, run_watching

FAULT_ENV = {"CODEX_FAULTS": "disconnect:3,429:1,timeout:2", "CODEX_FAULTS_429_RESET": "now+30s"}


def decisions(db: str, run_id: str) -> list[dict[str, Any]]:
    with Store.open(db) as s:
        return [
            {k: d.verdict.get(k) for k in ("stage", "status", "agreements", "conflicts", "missing_agents", "outputs")}
            for d in s.decisions(run_id)
        ]


def test_cli_run_survives_the_reference_plan(tmp_path: Path) -> None:
    clean_db, faulty_db = str(tmp_path / "clean.db"), str(tmp_path / "faulty.db")
    clean = run_cli(["run", "--db", clean_db, "--seed", "4", "--json", "--run-id", "R"])
    faulty = run_cli(["run", "--db", faulty_db, "--seed", "4", "--json", "--run-id", "R"], env=FAULT_ENV)
    assert clean.returncode == 0 and faulty.returncode == 0, faulty.stderr
    assert "FAULT INJECTION ACTIVE: disconnect:3,429:3" not in faulty.stderr
    assert "FAULT INJECTION ACTIVE: disconnect:3,429:1,timeout:2" in faulty.stderr
    assert "FAULT INJECTION" not in clean.stderr
    a, b = json.loads(clean.stdout), json.loads(faulty.stdout)
    assert a["status"] == b["status"] == "completed"
    assert a["stages"] == b["stages"]
    assert decisions(clean_db, "R") == decisions(faulty_db, "R")
    assert b["unknown_usage_calls"] == 5 and a["unknown_usage_calls"] == 0
    # --json carries what the banner and the summary line say.
    assert "faults" not in a
    assert b["faults"]["faults"] == "disconnect:3,429:1,timeout:2" and b["faults"]["reset"] == "now+30s"
    assert b["faults"]["injected"] == b["faults"]["injected_in_run"] == {"disconnect": 3, "rate_limit": 1, "timeout": 2}
    assert b["faults"]["left_in_run"] == {"disconnect": 0, "rate_limit": 0, "timeout": 0}
    assert b["turns"] == a["turns"] + 6
    # A kind counted 0 has no budget to be left of.
    rated = run_cli(["run", "--db", str(tmp_path / "r.db"), "--seed", "4", "--json"],
                    env={"CODEX_FAULTS": "disconnect:2%,429:0"})
    assert rated.returncode == 0, rated.stderr
    assert json.loads(rated.stdout)["faults"]["left_in_run"] == {}
    assert "left in this run's budget" not in rated.stdout

    with Store.open(faulty_db) as s:
        events = s.events("R")
    faults = [e for e in events if e.kind == "fault"]
    retries = [e for e in events if e.kind == "retry"]
    assert sorted(e.detail["fault"] for e in faults) == ["disconnect"] * 3 + ["rate_limit"] + ["timeout"] * 2
    # Every injected fault was retried: the same (stage, agent, attempt).
    assert {(e.stage, e.agent, e.attempt) for e in faults} == {(e.stage, e.agent, e.attempt) for e in retries}
    assert len(retries) == 6
    limited = next(e for e in faults if e.detail["fault"] == "rate_limit")
    assert "(fault injected)" in limited.detail["message"] and limited.detail["retry_after_s"] > 25
    timeout = next(e for e in faults if e.detail["fault"] == "timeout")
    assert timeout.detail["message"] == "operation timed out after 30000ms (fault injected)"
    disconnect = next(e for e in faults if e.detail["fault"] == "disconnect")
    assert disconnect.detail["message"] == "model stream error: stream disconnected before completion"

    # And a user sees it: `conclave events` lists the same log.
    shown = run_cli(["events", "R", "--db", faulty_db, "--kind", "fault", "--kind", "retry", "--json"])
    assert shown.returncode == 0, shown.stderr
    listed = json.loads(shown.stdout)
    assert [(e["id"], e["kind"], e["detail"]) for e in listed["events"]] == [
        (e.id, e.kind, e.detail) for e in events if e.kind in ("fault", "retry")
    ]
    assert listed["kinds"]["fault"] == 6 and listed["kinds"]["agent_call"] == b["turns"] - 6
    human = run_cli(["events", "R", "--db", faulty_db, "--kind", "fault"]).stdout.splitlines()
    assert human[0].startswith(f"events of R: {len(events)} (agent_call ")
    assert len(human) == 7 and all(" fault " in line and "fault=" in line for line in human[1:])


def test_cli_events_names_a_missing_run_or_branch(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    assert run_cli(["run", "--db", db, "--run-id", "R"]).returncode == 0
    for args, needle in (
        (["events", "NOPE", "--db", db], "no run 'NOPE'"),
        (["events", "R", "--db", db, "--branch", "zzz"], "has no branch 'zzz'"),
        (["events", "R", "--db", str(tmp_path / "missing.db")], "missing.db"),
        # A typo answered "none of kind retyr", exit 0: to a script, no retries.
        (["events", "R", "--db", db, "--kind", "retry", "--kind", "retyr", "--json"],
         "unknown event kind 'retyr'; kinds: agent_call, budget_warning,"),
    ):
        proc = run_cli(args)
        assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr)
    none = run_cli(["events", "R", "--db", db, "--kind", "fault"])
    assert none.returncode == 0 and "none of kind fault; this run has: agent_call," in none.stdout


def test_every_event_kind_written_is_one_events_knows() -> None:
    """``events --kind`` refuses kinds outside EVENT_KINDS: a kind written
    somewhere and missing there would be refused although it happens."""
    import ast

    from actors._cli_events import EVENT_KINDS

    root = Path(__file__).resolve().parent.parent
    written: set[str] = {"decision"}  # the store writer logs each decision itself
    for path in [*root.glob("actors/*.py"), *root.glob("messages/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            kind: ast.expr | None = None
            if name == "of_attempt" and len(node.args) >= 3:
                kind = node.args[2]
            elif name == "PersistEvent":
                kind = next((k.value for k in node.keywords if k.arg == "kind"), None)
            if kind is not None:
                assert isinstance(kind, ast.Constant) and isinstance(kind.value, str), (path.name, ast.dump(kind))
                written.add(kind.value)
    assert len(written) > 8, written  # the scan found the writers
    assert written <= EVENT_KINDS, written - EVENT_KINDS


class Recording(BaseProvider):
    name = "sim"

    def __init__(self, inner: SimulatedProvider) -> None:
        self.inner = inner
        self.calls: list[tuple[float, str, str, int]] = []

    async def complete(self, request: CompletionRequest) -> Completion:
        self.calls.append((trio.current_time(), request.key.stage, request.key.agent, request.attempt))
        return await self.inner.complete(request)


async def test_no_call_inside_the_reset_window(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    results = {}
    for name, env in (("clean", {}), ("faulty", FAULT_ENV)):
        plan = FaultPlan.from_env(env)
        provider = Recording(SimulatedProvider(seed=4))
        start = trio.current_time()
        async with open_orchestrator(store=str(tmp_path / f"{name}.db"), provider=provider, seed=4, faults=plan) as orch:
            result = await orch.run("SPEC-DEMO", run_id="R")
            injected = dict(orch.faults.injected) if orch.faults else {}
            windows = [
                (at - start, until - start)
                for health in (orch.health.providers().values() if orch.health else ())
                for at, until in health.rate_limits
            ]
        results[name] = (result, provider.calls, injected, windows, start)

    clean, faulty = results["clean"][0], results["faulty"][0]
    assert faulty.completed and [s.to_json() for s in faulty.stages] == [s.to_json() for s in clean.stages]
    _, calls, injected, windows, start = results["faulty"]
    assert injected == {"disconnect": 3, "rate_limit": 1, "timeout": 2}
    # now+30s: the window closes 30 s after the run's first call.
    assert len(windows) == 1
    opened, closes = windows[0]
    assert closes == pytest.approx(30.0) and 0 < opened < 30
    inside = [c for c in calls if opened < c[0] - start < closes]
    assert inside == [], f"calls inside the rate-limit window: {inside}"
    assert any(c[0] - start >= closes for c in calls)


def test_max_attempts_is_kept_with_the_run_for_resume_and_rerun(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    faulted = ["run", "--db", db, "--faults", "disconnect:100%", "--json"]
    once = json.loads(run_cli([*faulted, "--run-id", "ONE", "--max-attempts", "1"]).stdout)
    thrice = json.loads(run_cli([*faulted, "--run-id", "THREE"]).stdout)
    assert (once["turns"], thrice["turns"]) == (3, 9)  # the plan stage's 3 agents

    # Killed once the first agent's only attempt (a timeout) is durable: the
    # resume must judge it by the run's 1 attempt, not the default 3.
    env = {"CODEX_FAULTS_TIMEOUT_MS": "5000", "CONCLAVE_TEST_KILL_AFTER_WRITES": "4"}
    killed = run_cli(["run", "--db", db, "--run-id", "K", "--faults", "timeout:100%", "--max-attempts", "1"], env=env)
    assert killed.returncode == -9
    with Store.open(db) as s:
        assert [(o.stage, o.agent, o.attempt, o.status) for o in s.outputs("K")] == [("plan", "gemini", 1, "failed")]
    resumed = json.loads(run_cli(["resume", "K", "--db", db, "--json"]).stdout)
    assert resumed["stages"][0]["status"] == "degraded" and resumed["stages"][0]["missing_agents"] == ["gemini"]

    def options(branch_id: str) -> dict[str, Any]:
        with Store.open(db) as s:
            branch = s.get_branch("ONE", branch_id)
            assert branch is not None
            return dict(branch.options)

    inherited = json.loads(run_cli(["rerun", "ONE", "--from", "plan", "--db", db, "--json"]).stdout)
    overridden = json.loads(run_cli(["rerun", "ONE", "--from", "plan", "--db", db, "--json", "--max-attempts", "2"]).stdout)
    assert options(inherited["branch_id"])["max_attempts"] == 1
    assert options(overridden["branch_id"])["max_attempts"] == 2
    with Store.open(db) as s:  # a run without the flag stores what it always did
        three = s.get_run("THREE")
        assert three is not None and three.current_branch_id is not None
        assert "max_attempts" not in (s.get_branch("THREE", three.current_branch_id) or pytest.fail()).options


async def test_a_fault_interceptor_reused_by_a_second_orchestrator_uses_its_gate_and_log(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Sequential reuse (one interceptor for several orchestrators, as a test
    fixture would): the second orchestrator's faults used to go to the
    first's closed event log and through the first's gate and breaker."""
    faults = FaultInterceptor(FaultPlan.from_env(FAULT_ENV))
    for name in ("first", "second"):
        db = str(tmp_path / f"{name}.db")
        async with open_orchestrator(store=db, provider=SimulatedProvider(seed=4), seed=4, faults=faults) as orch:
            result = await orch.run("SPEC-DEMO", run_id="R")
            assert orch.health is not None
            windows = [w for h in orch.health.providers().values() for w in h.rate_limits]
        assert result.completed
        assert len(windows) == 1, f"{name}: the 429 closed this orchestrator's gate"
        with Store.open(db) as s:
            kinds = sorted(e.detail["fault"] for e in s.events("R") if e.kind == "fault")
        assert kinds == ["disconnect"] * 3 + ["rate_limit"] + ["timeout"] * 2, name
    assert not faults.attached and faults.health is None and faults.events is None


async def test_a_fault_interceptor_in_two_open_orchestrators_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    faults = FaultInterceptor(FaultPlan.from_env(FAULT_ENV), seed=9)
    async with open_orchestrator(store=str(tmp_path / "a.db"), faults=faults, seed=1):
        assert faults.seed == 9  # given to the constructor: wins over the orchestrator's
        with pytest.raises(ConfigError, match="installed in another orchestrator that is still open"):
            async with open_orchestrator(store=str(tmp_path / "b.db"), faults=faults):
                pass  # pragma: no cover
        assert not (tmp_path / "b.db").exists()  # refused before anything was created
        assert faults.attached
    assert not faults.attached


async def test_each_retry_and_its_wait_is_published_as_progress(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A 6-minute 429 wait used to show nothing until the agent answered."""
    db = str(tmp_path / "p.db")
    plan = FaultPlan.from_env({**FAULT_ENV, "CODEX_FAULTS_429_RESET": "6m0s"})
    async with open_orchestrator(store=db, provider=SimulatedProvider(seed=4), seed=4, faults=plan) as orch:
        result, seen = await run_watching(orch, "SPEC-DEMO", "R", AgentRetrying)
    assert result.completed
    with Store.open(db) as s:
        retries = [e for e in s.events("R") if e.kind == "retry"]
    assert [(e.key.stage, e.key.agent, e.attempt) for e in seen] == [(e.stage, e.agent, e.attempt) for e in retries]
    assert [e.delay for e in seen] == pytest.approx([e.detail["delay_s"] for e in retries], abs=1e-3)
    (limited,) = [e for e in seen if e.error.startswith("rate_limit: ")]
    assert 360 <= limited.delay < 361


def test_the_cli_shows_each_retry_and_its_wait(tmp_path: Path) -> None:
    env = {**FAULT_ENV, "CODEX_FAULTS_429_RESET": "6m0s"}
    human = run_cli(["run", "--db", str(tmp_path / "h.db"), "--seed", "4"], env=env)
    assert human.returncode == 0, human.stderr
    lines = [line.strip() for line in human.stdout.splitlines() if "retrying in" in line]
    assert len(lines) == 6
    assert any(re.fullmatch(r"\w+: attempt \d failed \(rate_limit: rate limit exceeded: retry after 360 seconds "
                            r"\(fault injected\)\); retrying in 6m0s", line) for line in lines), lines
    assert sum("(timeout: operation timed out after 30000ms (fault injected)); retrying in" in x for x in lines) == 2
    quiet = run_cli(["run", "--db", str(tmp_path / "j.db"), "--seed", "4", "--json"], env=env)
    assert "retrying in" not in quiet.stdout + quiet.stderr
    json.loads(quiet.stdout)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "0.25s"), (0.5, "0.5s"), (2.0, "2s"), (9.994, "9.99s"), (30.4, "30s"), (360.2, "6m0s"), (3725, "1h2m")],
)
def test_waits_are_written_as_reset_hints_are(seconds: float, text: str) -> None:
    from actors._format import duration

    assert duration(seconds) == text


def test_resume_and_rerun_inject_faults_as_run_does(tmp_path: Path) -> None:
    """CODEX_FAULTS and --faults used to be ignored by resume and rerun: a
    crash-and-resume test under faults got none after the resume."""
    db = str(tmp_path / "r.db")
    clean = json.loads(run_cli(["run", "--db", str(tmp_path / "clean.db"), "--seed", "4", "--json", "--run-id", "R"]).stdout)
    killed = run_cli(["run", "--db", db, "--seed", "4", "--run-id", "R"], env={"CONCLAVE_TEST_KILL_AFTER_WRITES": "4"})
    assert killed.returncode == -9

    bad = run_cli(["resume", "R", "--db", db, "--faults", "bogus:1"])
    assert bad.returncode == 2 and "unknown fault kind 'bogus'" in bad.stderr
    with Store.open(db) as s:
        before = len(s.events("R"))
        assert not any(e.kind == "resume" for e in s.events("R"))  # refused before anything was written

    resumed = run_cli(["resume", "R", "--db", db, "--json"], env=FAULT_ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert "FAULT INJECTION ACTIVE: disconnect:3,429:1,timeout:2" in resumed.stderr
    assert "fault seed 4 (the run's seed)" in resumed.stderr
    data = json.loads(resumed.stdout)
    assert data["faults"]["injected"] == {"disconnect": 3, "rate_limit": 1, "timeout": 2}
    assert data["stages"] == clean["stages"] and data["unknown_usage_calls"] == 5  # survived them
    with Store.open(db) as s:
        after = s.events("R")[before:]
    assert sorted(e.detail["fault"] for e in after if e.kind == "fault") == (
        ["disconnect"] * 3 + ["rate_limit"] + ["timeout"] * 2
    )

    forked = run_cli(["rerun", "R", "--from", "audit", "--db", db, "--faults", "timeout:1", "--json"])
    assert forked.returncode == 0, forked.stderr
    assert json.loads(forked.stdout)["faults"]["injected"] == {"disconnect": 0, "rate_limit": 0, "timeout": 1}
    quiet = run_cli(["resume", "R", "--db", db, "--json"])
    assert "FAULT INJECTION" not in quiet.stderr and "faults" not in json.loads(quiet.stdout)
    # The branch was made under a plan this resume leaves out: it says so
    # (a crash-and-resume test given none got another digest, silently).
    assert "note: run R was made with faults (timeout:1); this resume injects none" in quiet.stderr
    assert "--faults timeout:1 to go on under the same plan" in quiet.stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The reference plan's run without a crash (once for every kill point)."""
    db = str(tmp_path_factory.mktemp("clean") / "clean.db")
    proc = run_cli(["run", "--db", db, "--seed", "4", "--json", "--run-id", "R"], env=FAULT_ENV)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.mark.parametrize(
    ("writes", "phase"), [(6, "after_commit"), (14, "after_commit"), (12, "before_commit"), (20, "before_commit")]
)
def test_a_crash_and_resume_gets_the_faults_an_uninterrupted_run_gets(
    tmp_path: Path, uninterrupted: dict[str, Any], writes: int, phase: str
) -> None:
    """The count budget is the run's: a resume in a new process used to
    refill it, so a crash after some faults gave the run up to 11 instead of
    6, and a digest unlike the uninterrupted run's (seed and plan the same)."""
    db = str(tmp_path / "k.db")
    killed = run_cli(
        ["run", "--db", db, "--seed", "4", "--run-id", "R"],
        env={**FAULT_ENV, "CONCLAVE_TEST_KILL_AFTER_WRITES": str(writes), "CONCLAVE_TEST_KILL_PHASE": phase},
    )
    assert killed.returncode == -9
    with Store.open(db) as s:
        fired_before = len(s.events("R", "fault"))
    resumed = run_cli(["resume", "R", "--db", db, "--json"], env=FAULT_ENV)
    assert resumed.returncode == 0, resumed.stderr
    a, b = uninterrupted, json.loads(resumed.stdout)
    assert fired_before > 0  # the crash came after some faults
    assert b["digest"] == a["digest"] and b["unknown_usage_calls"] == a["unknown_usage_calls"] == 5
    assert sum(b["faults"]["injected"].values()) < 6
    assert b["faults"]["left_in_run"] == {"disconnect": 0, "rate_limit": 0, "timeout": 0}
    # The resume injected only what was left; the run got the whole plan
    # (the summary used to show just this process's share).
    assert b["faults"]["injected_in_run"] == {"disconnect": 3, "rate_limit": 1, "timeout": 2}


async def test_an_orchestrator_takes_a_fault_spec_as_the_cli_does(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """faults="disconnect:3" used to be installed as an interceptor and fail
    at the run's first model call with an AttributeError."""
    db = str(tmp_path / "s.db")
    async with open_orchestrator(store=db, provider=SimulatedProvider(seed=4), seed=4, faults="disconnect:3") as orch:
        result = await orch.run("SPEC-DEMO", run_id="R")
        assert orch.faults is not None and dict(orch.faults.injected) == {"disconnect": 3}
    assert result.completed


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"faults": "bogus:1"}, "unknown fault kind 'bogus'"),
        ({"faults": 3}, "faults must be a FaultPlan, a spec such as 'disconnect:3' or an Interceptor, got 3"),
        ({"interceptors": {"gateway": ["x"]}}, "interceptors['gateway'] holds 'x', which is not an Interceptor"),
        ({"interceptors": {"store": "x"}}, "interceptors['store'] must be a list of Interceptors, got 'x'"),
        # Not a mapping: a TypeError from dict() used to say nothing useful.
        ({"interceptors": [object()]}, "interceptors must map a channel (agent, coordinator, gateway, metrics, store)"),
        ({"interceptors": "gateway"}, "interceptors must map a channel"),
    ],
)
async def test_bad_faults_or_interceptors_are_refused_before_anything_is_created(
    tmp_path: Path, kwargs: dict[str, Any], needle: str
) -> None:
    db = tmp_path / "never.db"
    with pytest.raises((ConfigError, ValueError), match=re.escape(needle)):
        async with open_orchestrator(store=str(db), **kwargs):
            pass  # pragma: no cover
    assert not db.exists()


async def test_a_timeout_fault_outlasting_the_call_timeout_is_still_on_record(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """With a call timeout shorter than the fault's, the caller gave up
    during the fault's wait and the fault was neither counted nor logged:
    'timeout 0 injected, 0 left in the budget' beside an attempt that had
    timed out, and a resume would have spent the count again."""
    from actors import RetryPolicy

    db = str(tmp_path / "t.db")
    plan = FaultPlan.parse("timeout:1", timeout_ms=900_000)
    retry = RetryPolicy(call_timeout=600.0)
    async with open_orchestrator(store=db, provider=SimulatedProvider(seed=4), seed=4, faults=plan, retry=retry) as orch:
        start = trio.current_time()
        result = await orch.run("SPEC-DEMO", run_id="R")
        waited = trio.current_time() - start
        assert orch.faults is not None and dict(orch.faults.injected) == {"timeout": 1}
    assert result.completed and 600 <= waited < 900  # the caller's own timeout ended the wait
    with Store.open(db) as s:
        faults = s.events("R", "fault")
        retries = s.events("R", "retry")
    assert [(e.stage, e.agent, e.attempt, e.detail["fault"]) for e in faults] == [("plan", "gemini", 1, "timeout")]
    assert [(e.stage, e.agent, e.attempt) for e in retries] == [("plan", "gemini", 1)]
    assert retries[0].detail["message"] == "operation timed out after 600000ms"
    # The fault's event said "timed out after 900000ms", a timeout that never happened.
    assert faults[0].detail["message"] == (
        "operation would time out after 900000ms (fault injected), "
        "but the caller's own call timeout ends it after 600000ms"
    )
    assert faults[0].detail["cut_by_caller"] is True


async def test_a_timeout_fault_within_the_call_timeout_logs_the_timeout_it_gives(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    db = str(tmp_path / "t.db")
    plan = FaultPlan.parse("timeout:1", timeout_ms=600_000)  # ends with the call timeout: the fault's own answer
    async with open_orchestrator(store=db, provider=SimulatedProvider(seed=4), seed=4, faults=plan) as orch:
        await orch.run("SPEC-DEMO", run_id="R")
    with Store.open(db) as s:
        [fault] = s.events("R", "fault")
    assert fault.detail["message"] == "operation timed out after 600000ms (fault injected)"
    assert "cut_by_caller" not in fault.detail


TWO_PROVIDERS = """
[defaults]
agents = ["gemini", "claude", "gpt_pro"]
[agents.gemini]
provider = "a"
model = "sim-model"
[agents.claude]
provider = "b"
model = "sim-model"
[agents.gpt_pro]
provider = "a"
model = "sim-model"
[[stages]]
name = "plan"
mode = "sequential"
aggregator = ""
[[stages]]
name = "tasks"
mode = "sequential"
aggregator = ""
[[stages]]
name = "implement"
mode = "sequential"
aggregator = ""
"""


def _scoped_faults() -> list[FaultInterceptor]:
    return [
        FaultInterceptor(attrs.evolve(FaultPlan.parse("disconnect:3,timeout:1"), provider="a")),
        FaultInterceptor(attrs.evolve(FaultPlan.parse("disconnect:1,429:1"), provider="b")),
    ]


async def test_faults_scoped_to_two_providers_resume_each_their_own_budget(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Each fault interceptor on a resume used to be given every fault of
    the branch: one scoped to provider a took b's faults as its own, spent
    its budget on them and injected fewer than an uninterrupted run."""
    pipeline = parse_pipeline(TWO_PROVIDERS)

    async def run(path: str, cut: int | None) -> Any:
        with trio.CancelScope() as scope:
            async with open_orchestrator(
                store=path, provider={"a": SimulatedProvider(seed=5), "b": SimulatedProvider(seed=5)},
                pipeline=pipeline, seed=5, interceptors={"gateway": _scoped_faults(), "store": [cut_at_write(cut, scope)]},
            ) as orch:
                return await orch.run("SPEC-F", run_id="F")
        return None

    def faults(path: str) -> set[tuple[str | None, str | None, int | None, Any]]:
        with Store.open(path) as s:  # a set: a lost attempt's fault fires again on resume
            return {(e.stage, e.agent, e.attempt, e.detail["fault"]) for e in s.events("F", "fault")}

    expected = await run(str(tmp_path / "whole.db"), None)
    with Store.open(str(tmp_path / "whole.db")) as s:
        writes = len(s.events("F")) + len(s.outputs("F")) + len(s.decisions("F"))
        # Every fault of both budgets fires (a plan scoped to b used to place
        # faults on a's seats, where they never fired).
        assert len(s.events("F", "fault")) == 6
    resumed_with_faults_before = 0
    for cut in range(3, writes):
        path = str(tmp_path / f"cut{cut}.db")
        assert await run(path, cut) is None
        with Store.open(path) as s:
            before = len(s.events("F", "fault"))
        async with open_orchestrator(
            store=path, provider={"a": SimulatedProvider(seed=5), "b": SimulatedProvider(seed=5)},
            pipeline=pipeline, seed=5, interceptors={"gateway": _scoped_faults()},
        ) as orch:
            resumed = await orch.resume("F")
        resumed_with_faults_before += 0 < before < 6
        assert resumed.digest == expected.digest, f"cut at write {cut}"
        assert resumed.unknown_usage_calls == expected.unknown_usage_calls == 5, f"cut at write {cut}"
        assert faults(path) == faults(str(tmp_path / "whole.db")), f"cut at write {cut}"
    assert resumed_with_faults_before > 3  # the cuts fell between faults


async def test_the_fault_interceptor_that_served_a_run_resumes_it_as_a_new_one_would(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """An embedding app that resumes in the same process passes the same
    FaultInterceptor again.  It used to keep its own memory of the branch
    over the fault log: a fault placed on an attempt that never became
    durable did not fire again when the resume made that attempt again, so
    the run got fewer faults than an uninterrupted one, and another digest."""
    spec = "disconnect:2,429:1,timeout:2"

    writes = 0

    async def count(item: Any, forward: Any) -> None:
        nonlocal writes
        writes += 1
        await forward(item)

    async def run(path: str, faults: FaultInterceptor, cut: int | None) -> Any:
        with trio.CancelScope() as scope:
            async with open_orchestrator(
                store=path, seed=3, faults=faults,
                interceptors={"store": [cut_at_write(cut, scope), FunctionInterceptor(count)]},
            ) as orch:
                return await orch.run("SPEC-S", run_id="S")
        return None

    expected = await run(str(tmp_path / "whole.db"), FaultInterceptor(spec), None)
    assert expected.unknown_usage_calls == 4  # every fault fired; each cut or timed-out call's usage unknown (a 429 costs nothing)
    for cut in range(2, writes + 1):
        path = str(tmp_path / f"cut{cut}.db")
        faults = FaultInterceptor(spec)
        assert await run(path, faults, cut) is None
        async with open_orchestrator(store=path, seed=3, faults=faults) as orch:
            resumed = await orch.resume("S")
        assert resumed.unknown_usage_calls == 4, f"cut at write {cut}"
        assert resumed.digest == expected.digest, f"cut at write {cut}"
        assert faults.remaining("S") == {"disconnect": 0, "rate_limit": 0, "timeout": 0}, f"cut at write {cut}"


async def test_a_long_lived_orchestrator_keeps_no_rate_plan_state_per_finished_run(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A fault interceptor kept a reset anchor per run for as long as it
    lived: an embedding app running a rate plan grew by every run.  A count
    plan keeps each run's budget, which remaining() reports."""
    rates, counts = FaultInterceptor("disconnect:30%"), FaultInterceptor("disconnect:1")
    async with open_orchestrator(store=str(tmp_path / "l.db"), seed=2, faults=rates) as orch:
        for i in range(5):
            await orch.run("SPEC-L", run_id=f"L{i}")
    assert rates.injected["disconnect"] > 0
    assert not rates._buckets
    async with open_orchestrator(store=str(tmp_path / "c.db"), seed=2, faults=counts) as orch:
        for i in range(3):
            await orch.run("SPEC-C", run_id=f"C{i}")
    assert [counts.remaining(f"C{i}")["disconnect"] for i in range(3)] == [0, 0, 0]
    assert counts.remaining("never-ran")["disconnect"] == 1
    # A caller done with a run forgets it, every branch of it: the soak
    # does, as it drops each run once checked.
    async with open_orchestrator(store=str(tmp_path / "c.db"), seed=2, faults=counts) as orch:
        await orch.rerun("C0", "plan")
    assert {run for run, _ in counts._buckets} == {"C0", "C1", "C2"}
    counts.forget("C0")
    counts.forget("never-ran")  # nothing to forget: no error
    assert {run for run, _ in counts._buckets} == {"C1", "C2"}
    assert counts.remaining("C0") == {"disconnect": 1, "rate_limit": 0, "timeout": 0}  # as a run not seen
    assert counts.remaining("C1")["disconnect"] == 0


def test_a_soak_keeps_no_count_budget_of_a_run_it_has_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The soak drops each run once checked, but its fault interceptor kept
    every run's count budget: 30,000 counts grew a soak to 991 MB at 800
    runs, and disconnect:3,429:1,timeout:2 by ~7.5 KB a run."""
    import actors._soak
    from actors._soak import SoakConfig, run_soak

    made: list[FaultInterceptor] = []

    class Kept(FaultInterceptor):  # the soak's own interceptor, kept to look into afterwards
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(actors._soak, "FaultInterceptor", Kept)
    report = run_soak(SoakConfig(seed=0, runs=6, concurrency=3, faults="disconnect:3,429:1,timeout:2"))
    assert report.ok and sum(report.faults.values()) == 6 * 6
    [faults] = made
    assert faults._buckets == {}


def test_max_retry_wait_ends_retries_at_a_later_reset_and_is_kept_with_the_run(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    env = {"CODEX_FAULTS_429_RESET": "now+30s"}
    limited = ["run", "--db", db, "--faults", "429:1", "--json"]
    short = json.loads(run_cli([*limited, "--run-id", "SHORT", "--max-retry-wait", "10"], env=env).stdout)
    assert short["status"] == "halted"
    events = json.loads(run_cli(["events", "SHORT", "--db", db, "--kind", "gave_up", "--json"]).stdout)["events"]
    first = events[0]["detail"]
    assert first["error"] == "rate_limit"
    assert re.fullmatch(r"resets in (29|30)s, later than the 10s a retry waits \(max_wait; --max-retry-wait\)",
                        first["reason"]), first
    # The rest of the panel was refused at the closed gate, not left to time out.
    assert all("longer than the 10s a call waits; the call was not made" in e["detail"]["message"] for e in events[1:])
    long = json.loads(run_cli([*limited, "--run-id", "LONG", "--max-retry-wait", "60"], env=env).stdout)
    assert long["status"] == "completed"

    rerun = json.loads(run_cli(["rerun", "SHORT", "--from", "plan", "--db", db, "--json"]).stdout)
    with Store.open(db) as s:
        assert (s.get_branch("SHORT", rerun["branch_id"]) or pytest.fail()).options["max_retry_wait"] == 10


def test_a_stage_nobody_could_answer_is_left_undecided_for_resume_retry_failed(tmp_path: Path) -> None:
    """Every agent of a stage failing on a provider outage was decided
    'no_consensus': final, so a resume after the outage called nobody and
    only a rerun could recover; the halt never named the outage."""
    db = str(tmp_path / "o.db")
    down = run_cli(["run", "--db", db, "--run-id", "O", "--faults", "disconnect:100%", "--json"])
    assert down.returncode == 3, down.stderr
    halted = json.loads(down.stdout)
    assert (halted["status"], halted["halt_reason"]) == ("halted", "agents_failed")
    assert halted["stages"] == [], "nothing decided on the agents' silence"
    assert "3 agent(s) failed (gemini: disconnect: " in halted["halt_message"]
    assert "'conclave resume O --retry-failed" in halted["halt_message"]
    # A plain resume changes nothing (as after a budget halt), and buys nothing.
    plain = json.loads(run_cli(["resume", "O", "--db", db, "--json"]).stdout)
    assert (plain["halt_reason"], plain["turns"]) == ("agents_failed", 0)
    # Once the outage is over: a new round of attempts, numbered on.
    again = run_cli(["resume", "O", "--db", db, "--retry-failed", "--json"])
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["status"] == "completed"
    with Store.open(db) as s:
        attempts = sorted(o.attempt for o in s.outputs("O", stage="plan") if o.agent == "gemini")
        assert attempts == [1, 2, 3, 4]
        assert [d.status for d in s.decisions("O")][:1] == ["ok"]


def test_a_resume_places_faults_with_the_runs_own_fault_seed(tmp_path: Path) -> None:
    """Without --fault-seed, a resume placed its faults by the run's --seed,
    not the run's --fault-seed: a halted-and-resumed run mixed the two
    placements and ended with neither's digest."""
    from .conftest import run_cli

    env = {"CODEX_FAULTS_TIMEOUT_MS": "200"}
    faults = ["--faults", "disconnect:15%,429:10%,timeout:5%"]
    common = ["--run-id", "R", "--seed", "4", *faults, "--fault-seed", "9", "--json"]
    full = run_cli(["run", "--db", str(tmp_path / "full.db"), *common], env=env)
    assert full.returncode == 0, full.stderr
    halted = run_cli(["run", "--db", str(tmp_path / "cut.db"), *common, "--budget", "0.05"], env=env)
    assert json.loads(halted.stdout)["halt_reason"] == "budget_exceeded"
    resumed = run_cli(["resume", "R", "--db", str(tmp_path / "cut.db"), *faults, "--budget", "10", "--json"], env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "fault seed 9" in resumed.stderr or "seed 9" in resumed.stderr
    assert json.loads(resumed.stdout)["digest"] == json.loads(full.stdout)["digest"]


def test_a_rerun_keeps_its_own_fault_seed_for_its_resumes(tmp_path: Path) -> None:
    """A rerun given --fault-seed 7 of a run seeded 9 kept 9 with its new
    branch: halted and resumed, the branch mixed the two placements."""
    from .conftest import run_cli

    env = {"CODEX_FAULTS_TIMEOUT_MS": "200"}
    faults = ["--faults", "disconnect:15%,429:10%,timeout:5%"]
    db = str(tmp_path / "r.db")
    first = run_cli(["run", "--db", db, "--run-id", "R", "--seed", "4", *faults, "--fault-seed", "9", "--json"], env=env)
    assert first.returncode == 0, first.stderr
    whole = str(tmp_path / "whole.db")
    (tmp_path / "whole.db").write_bytes((tmp_path / "r.db").read_bytes())
    full = run_cli(["rerun", "R", "--from", "plan", "--db", whole, *faults, "--fault-seed", "7", "--json"], env=env)
    assert full.returncode == 0, full.stderr
    cut = run_cli(
        ["rerun", "R", "--from", "plan", "--db", db, *faults, "--fault-seed", "7", "--budget", "0.05", "--json"], env=env
    )
    assert json.loads(cut.stdout)["halt_reason"] == "budget_exceeded"
    resumed = run_cli(["resume", "R", "--db", db, *faults, "--budget", "10", "--json"], env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["digest"] == json.loads(full.stdout)["digest"]


async def test_two_fault_interceptors_on_one_gateway_each_fire_their_own(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The second interceptor replaced the first one's queued fault: the
    first's 429 counted as spent, never fired and was never logged."""
    import collections

    user = FaultInterceptor("429:1", seed=4)
    db = str(tmp_path / "two.db")
    async with open_orchestrator(
        store=db, seed=4, faults="disconnect:1", interceptors={"gateway": [user]}
    ) as orch:
        result = await orch.run("SPEC-TWO", run_id="R")
        assert orch.faults is not None
        assert dict(orch.faults.injected) == {"disconnect": 1}
    assert result.completed
    assert dict(user.injected) == {"rate_limit": 1}
    with Store.open(db, readonly=True) as store:
        logged = collections.Counter(e.detail["fault"] for e in store.events("R", "fault"))
    assert logged == {"disconnect": 1, "rate_limit": 1}
