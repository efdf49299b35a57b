"""Acceptance 3: two processes write runs into one database file at once;
both finish, nothing is "locked", no row is lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from store import Store

from .conftest import REPO, run_cli

WRITER = """
import sys, trio, trio.testing
from actors import open_orchestrator

async def main(path, tag, runs):
    sys.stdin.readline()  # start together: the parent releases both at once
    for i in range(runs):
        async with open_orchestrator(store=path, seed=i) as orch:
            result = await orch.run(f"SPEC-{tag}", run_id=f"{tag}-{i}")
        print(result.run_id, result.status, flush=True)

trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]),
         clock=trio.testing.MockClock(autojump_threshold=0))
"""

RUNS = 12


def test_two_processes_write_one_database(tmp_path: Path) -> None:
    db = str(tmp_path / "shared.db")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, db, tag, str(RUNS)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("A", "B")
    ]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "locked" not in err and "busy" not in err
        assert len(out.splitlines()) == RUNS
    with Store.open(db) as s:
        assert s.integrity_check() == "ok"
        runs = s.list_runs(limit=1000)
        assert len(runs) == 2 * RUNS
        for run in runs:
            assert run.status in ("completed", "halted")
            decided = s.decisions(run.run_id)
            assert [d.seq for d in decided] == list(range(1, len(decided) + 1))
            # Every decision's answers are there: nothing lost.
            accepted = {(o.stage, o.agent) for o in s.outputs(run.run_id, accepted_only=True)}
            for d in decided:
                assert {(d.stage, a) for a in d.verdict["present_agents"]} <= accepted
            calls = s.events(run.run_id, "agent_call")
            assert len(calls) == len(s.outputs(run.run_id))


def test_two_cli_runs_create_one_new_database_at_once(tmp_path: Path) -> None:
    """Both processes find no file, create it and migrate it: one wins, the
    other waits its turn (busy is retried), neither fails."""
    db = str(tmp_path / "new.db")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "actors", "run", "--db", db, "--run-id", f"R{i}", "--seed", str(i), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode in (0, 3), err
        assert json.loads(out)["run_id"]
    listing = json.loads(run_cli(["status", "--db", db, "--json"]).stdout)
    assert sorted(r["run_id"] for r in listing["runs"]) == ["R0", "R1"]
