"""A resume or a rerun on the virtual clock takes up the rate-limit gates
and circuit breakers where its uninterrupted self had them, so it ends the
same way: they lived in memory only, and a breaker opened by failures
before a budget halt let through, after the resume, calls the uninterrupted
run had refused (a different digest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
import trio.testing

from actors import BreakerPolicy, HealthRegistry
from actors._breaker import CircuitBreaker, Ticket
from store import Store

from .conftest import run_cli

# Seed 4 with these faults opens the breaker in 'validate' (found by a
# helper's determinism probe); the failures that open it start earlier.
FAULTS = ["--faults", "disconnect:35%,timeout:15%", "--max-attempts", "6"]


def _run(argv: list[str]) -> dict[str, object]:
    proc = run_cli([*argv, "--json"])
    assert proc.returncode in (0, 3), proc.stderr
    data: dict[str, object] = json.loads(proc.stdout)
    return data


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    db = tmp_path_factory.mktemp("health") / "u.db"
    return db, _run(["run", "--db", str(db), "--run-id", "B", "--seed", "4", *FAULTS])


@pytest.mark.parametrize("budget", ["0.04", "0.06"])
def test_a_resume_after_a_budget_halt_meets_the_same_breaker(
    tmp_path: Path, uninterrupted: tuple[Path, dict[str, object]], budget: str
) -> None:
    _, full = uninterrupted
    db = str(tmp_path / "b.db")
    halted = _run(["run", "--db", db, "--run-id", "B", "--seed", "4", *FAULTS, "--budget", budget])
    assert halted["halt_reason"] == "budget_exceeded"
    resumed = _run(["resume", "B", "--db", db, "--budget", "10", "--faults", "disconnect:35%,timeout:15%"])
    assert resumed["status"] == "completed"
    assert resumed["digest"] == full["digest"]
    assert resumed["unknown_usage_calls"] == full["unknown_usage_calls"]


@pytest.mark.parametrize("stage", ["implement", "validate"])
def test_a_rerun_meets_the_breaker_its_fork_stage_started_with(
    tmp_path: Path, uninterrupted: tuple[Path, dict[str, object]], stage: str
) -> None:
    source, full = uninterrupted
    db = tmp_path / "r.db"
    db.write_bytes(source.read_bytes())
    root = full["branch_id"]
    assert isinstance(root, str)
    rerun = _run(["rerun", "B", "--from", stage, "--branch", root, "--db", str(db), "--faults", "disconnect:35%,timeout:15%"])
    assert rerun["digest"] == full["digest"]


def test_a_breaker_restored_from_its_snapshot_decides_as_the_original() -> None:
    policy = BreakerPolicy(min_calls=4, window=60.0, cooldown=30.0)
    original = CircuitBreaker(policy)
    for at, failure in ((1.0, True), (2.0, True), (3.0, False), (4.0, True)):
        ticket = original.acquire(at)
        assert isinstance(ticket, Ticket)
        original.record(ticket, at + 0.5, failure=failure)
    snapshot = original.snapshot(10.0)
    assert snapshot is not None
    copy = CircuitBreaker(policy)
    copy.restore(json.loads(json.dumps(snapshot)), 110.0)  # JSON-ready, and relative to now
    # 3 of 4 failed: the next call opens both, 100 s apart, and each stays
    # open for its cooldown.
    assert not isinstance(original.acquire(11.0), Ticket)
    assert not isinstance(copy.acquire(111.0), Ticket)
    assert original.state == copy.state == "open"
    assert copy.acquire(111.0 + 29.0) == pytest.approx(1.0)
    assert isinstance(copy.acquire(111.0 + 30.0), Ticket)  # the half-open probe


async def test_a_gate_restored_from_its_snapshot_holds_until_the_same_reset(
    autojump_clock: trio.testing.MockClock,
) -> None:
    health = HealthRegistry()
    health["sim"].gate.close_until(trio.current_time() + 30.0, trio.current_time() - 1.0)
    snapshot = health.snapshot(trio.current_time())
    assert snapshot is not None
    await trio.sleep(500.0)
    later = HealthRegistry()
    assert later.fresh
    later.restore(json.loads(json.dumps(snapshot)), trio.current_time())
    now = trio.current_time()
    assert not later["sim"].gate.is_open(now + 29.0) and later["sim"].gate.is_open(now + 30.0)


def test_a_retry_failed_round_does_not_meet_the_gate_that_failed_its_agents(tmp_path: Path) -> None:
    """Only a budget halt's gates and breakers are taken up: after
    agents_failed on a long 429 reset, taking up the closed gate failed
    every --retry-failed round the same way (no virtual time passes
    between the halt and the resume)."""
    db = str(tmp_path / "f.db")
    env = {"CODEX_FAULTS_429_RESET": "300"}
    common = ["--db", db, "--json"]
    halted = run_cli(["run", "--run-id", "F", "--seed", "1", "--faults", "429:1", "--max-retry-wait", "100", *common], env=env)
    assert json.loads(halted.stdout)["halt_reason"] == "agents_failed", halted.stdout
    again = run_cli(["resume", "F", "--retry-failed", "--faults", "429:1", *common], env=env)
    assert json.loads(again.stdout)["status"] == "completed", again.stdout


def test_a_plain_resume_of_a_halt_on_a_long_reset_replays_it_and_writes_nothing(tmp_path: Path) -> None:
    """An agent that gave up on a reset past max_wait had attempts left,
    and its stored error does not keep the reset: a plain resume judged it
    one to retry, asked it again (paid, against a real provider), decided
    all six stages and said "completed", while the run stayed halted."""
    db = tmp_path / "l.db"
    env = {"CODEX_FAULTS_429_RESET": "86400"}
    common = ["--db", str(db), "--json"]
    halted = run_cli(["run", "--run-id", "L", "--faults", "429:1", *common], env=env)
    first = json.loads(halted.stdout)
    assert halted.returncode == 3 and first["halt_reason"] == "agents_failed", halted.stdout

    def stored() -> tuple[int, int, int]:
        with Store.open(str(db), readonly=True) as s:
            return len(s.events("L")), len(s.outputs("L")), len(s.decisions("L"))

    before = stored()
    plain = run_cli(["resume", "L", *common])
    again = json.loads(plain.stdout)
    assert plain.returncode == 3 and again["halt_reason"] == "agents_failed", plain.stdout
    assert again["digest"] == first["digest"] and again["turns"] == 0
    assert stored() == before, "a plain resume of the halt writes nothing"
    # A --retry-failed resume killed after it logged its new round, before
    # it marked the run running: the round counted, and a plain resume then
    # asked the failed agents again.
    killed = run_cli(["resume", "L", "--retry-failed", *common], env={"CONCLAVE_TEST_KILL_AFTER_WRITES": "1"})
    assert killed.returncode == -9
    before = stored()
    plain = run_cli(["resume", "L", *common])
    assert plain.returncode == 3 and json.loads(plain.stdout)["turns"] == 0, plain.stdout
    assert stored() == before
    # status says how to go on (only a stalled run's did).
    shown = run_cli(["status", "L", "--db", str(db)])
    assert f"'conclave resume L --retry-failed --db {db}' asks the failed agents again" in shown.stdout
    # Granted a new round, the failed agents are asked again.
    granted = run_cli(["resume", "L", "--retry-failed", *common])
    assert granted.returncode == 0 and json.loads(granted.stdout)["status"] == "completed", granted.stdout
