"""Acceptance 1: SIGKILL a real `conclave run` at many points, resume it,
and get exactly the run that was never interrupted.

The kill points are chosen by durable-write count (the CLI's test-only
CONCLAVE_TEST_KILL_AFTER_WRITES switch kills the process from inside the
store's commit path), never by wall-clock sleeps: half of them right after
a commit (durable but unacknowledged), half inside the transaction that
would commit (that batch is lost).
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import apsw

from store import Store

from .conftest import run_cli

SEED = "5"
RUN = "CRASH"


def snapshot(db: str) -> dict[str, Any]:
    # A plain read-write connection: it recovers the hot WAL the kill left.
    conn = apsw.Connection(db)
    try:
        run = conn.execute("SELECT count(*) FROM runs WHERE run_id = ?", (RUN,)).fetchone()[0]
        status = conn.execute("SELECT max(status) FROM runs WHERE run_id = ?", (RUN,)).fetchone()[0]
        accepted = {
            (str(r[0]), str(r[1]))
            for r in conn.execute(
                "SELECT stage, agent FROM agent_outputs WHERE run_id = ? AND status = 'accepted'", (RUN,)
            )
        }
        decided = conn.execute("SELECT count(*) FROM decisions WHERE run_id = ?", (RUN,)).fetchone()[0]
        events = conn.execute("SELECT count(*) FROM events WHERE run_id = ?", (RUN,)).fetchone()[0]
    finally:
        conn.close()
    return {"run": run, "status": status, "accepted": accepted, "decided": decided, "events": events}


def decision_log(db: str) -> list[tuple[str, int, str, str]]:
    with Store.open(db) as s:
        return [
            (d.stage, d.seq, d.status, json.dumps(d.verdict, sort_keys=True))
            for d in s.decisions(RUN)
        ]


def crash_and_resume(tmp: Path, writes: int, phase: str) -> dict[str, Any]:
    db = str(tmp / f"crash-{writes}-{phase}.db")
    killed = run_cli(
        ["run", "--seed", SEED, "--run-id", RUN, "--db", db, "--json"],
        env={"CONCLAVE_TEST_KILL_AFTER_WRITES": str(writes), "CONCLAVE_TEST_KILL_PHASE": phase},
    )
    before = snapshot(db)
    resumed = run_cli(["resume", RUN, "--db", db, "--json"])
    return {"db": db, "killed": killed, "before": before, "resumed": resumed}


def test_sigkill_anywhere_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    base_db = str(tmp_path / "base.db")
    base = run_cli(["run", "--seed", SEED, "--run-id", RUN, "--db", base_db, "--json"])
    assert base.returncode in (0, 3), base.stderr
    expected = json.loads(base.stdout)
    expected_log = decision_log(base_db)
    with Store.open(base_db) as s:
        outputs = len(s.outputs(RUN))
        # decision events share their decision's write
        events = len([e for e in s.events(RUN) if e.kind != "decision"])
    # Every write of the run: the run itself, its events and outputs, its
    # decisions and the final update.
    total_writes = 1 + outputs + events + len(expected_log) + 1
    points = [(n, "after_commit" if n % 4 else "before_commit") for n in range(2, total_writes, 2)]
    points.append((total_writes - 1, "after_commit"))
    assert len(points) >= 20

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda p: crash_and_resume(tmp_path, *p), points))

    states = set()
    for (writes, phase), r in zip(points, results):
        where = f"killed at write {writes} ({phase})"
        killed: subprocess.CompletedProcess[str] = r["killed"]
        assert killed.returncode == -9, f"{where}: the run was not killed: {killed.returncode} {killed.stderr}"
        before = r["before"]
        assert before["run"] == 1, where
        states.add((before["decided"], len(before["accepted"]), before["events"]))

        resumed: subprocess.CompletedProcess[str] = r["resumed"]
        assert resumed.returncode == base.returncode, f"{where}: {resumed.stderr}"
        got = json.loads(resumed.stdout)
        assert got["digest"] == expected["digest"], where
        assert got["stages"] == expected["stages"], where
        assert got["usage"] == expected["usage"], where
        # Same decisions, each exactly once, seqs continuing 1..n.
        assert decision_log(r["db"]) == expected_log, where

        with Store.open(r["db"]) as s:
            assert s.integrity_check() == "ok", where
            assert s.foreign_key_violations() == 0, where
            events = s.events(RUN)
        if before["status"] in ("completed", "halted"):
            # Killed after its end was durable: the resume replays it and
            # writes nothing (it used to rewrite the metrics with 0 calls).
            assert len(events) == before["events"], where
            assert got["turns"] == 0, where
            continue
        [resume] = [e for e in events if e.kind == "resume"]
        assert [e.stage for e in events if e.kind == "decision"] == [d[0] for d in expected_log], where
        calls_after = [(e.stage, e.agent) for e in events if e.kind == "agent_call" and e.id > resume.id]
        # Nothing durable is bought again; everything missing is bought once.
        assert not set(calls_after) & before["accepted"], where
        assert len(calls_after) == len(set(calls_after)), where
        assert len(calls_after) == outputs - len(before["accepted"]), where
        assert got["turns"] == len(calls_after), where

    # The points really are spread over the run: from before the first
    # decision to after the last, through many distinct durable states.
    assert min(d for d, _, _ in states) == 0 and max(d for d, _, _ in states) >= len(expected_log) - 1
    assert len(states) >= 20, states


def test_resume_uses_the_stored_pipeline_seed_spec_and_goal(tmp_path: Path) -> None:
    """`resume` takes no pipeline, seed, spec or goal: it must use the run's."""
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        '[[stages]]\nname = "plan"\nagents = ["gemini", "claude"]\nquorum = "all"\n\n'
        '[[stages]]\nname = "deploy"\nagents = ["gemini", "claude", "gpt_pro"]\nmode = "parallel"\n'
        'required_fields = ["target"]\n'
    )
    args = ["run", "SPEC-P", "--goal", "ship it", "--seed", "17", "--pipeline", str(pipeline), "--run-id", "P",
            "--disagreement-rate", "0", "--json"]
    base = run_cli([*args, "--db", str(tmp_path / "base.db")])
    assert base.returncode == 0, base.stderr
    db = str(tmp_path / "killed.db")
    killed = run_cli([*args, "--db", db], env={"CONCLAVE_TEST_KILL_AFTER_WRITES": "9"})
    assert killed.returncode == -9
    pipeline.unlink()  # the file is gone: resume must not need it
    resumed = run_cli(["resume", "P", "--db", db, "--json"])
    assert resumed.returncode == 0, resumed.stderr
    got, expected = json.loads(resumed.stdout), json.loads(base.stdout)
    assert [s["stage"] for s in got["stages"]] == ["plan", "deploy"]
    assert got["spec_id"] == "SPEC-P" and got["digest"] == expected["digest"]
    with Store.open(db) as s:
        run = s.get_run("P")
        assert run is not None and (run.goal, run.seed) == ("ship it", 17)


def test_a_killed_run_reads_stalled_in_status_branches_and_metrics(tmp_path: Path) -> None:
    # 'status' said stalled; 'branches' and 'metrics' said running, as if a
    # process were at work on it.
    db = str(tmp_path / "k.db")
    killed = run_cli(["run", "--run-id", "K", "--db", db], env={"CONCLAVE_TEST_KILL_AFTER_WRITES": "9"})
    assert killed.returncode == -9
    assert "run K: stalled" in run_cli(["status", "K", "--db", db]).stdout
    listing = run_cli(["branches", "K", "--db", db]).stdout
    assert " stalled " in listing and "running" not in listing
    assert "(stalled; recomputed;" in run_cli(["metrics", "K", "--db", db]).stdout
    # JSON keeps the stored status beside "driven", as status --json does.
    [branch] = json.loads(run_cli(["branches", "K", "--db", db, "--json"]).stdout)["branches"]
    assert (branch["status"], branch["driven"]) == ("running", False)
