"""At most one orchestrator drives a run: a second run, resume or rerun of
it is refused before it writes anything, in the same process or another,
and a process that dies gives the run up at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from actors import MockProvider, SimulatedProvider, open_orchestrator
from actors._format import tokens
from messages import Completion, CompletionRequest, PersistEvent
from store import RunLocked, Store

from .conftest import REPO, run_cli
from .test_cli_errors import assert_one_line_error

HOLDER = """
import sys
from store import Store
with Store.open(sys.argv[1]) as store, store.claim_run(sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
"""

ASK = """
import sys
from store import Store
with Store.open(sys.argv[1]) as store:
    print(store.run_is_driven(sys.argv[2]))
"""


def test_a_run_is_claimed_once_per_process_across_stores(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    with Store.open(path) as one, Store.open(path) as two:
        with one.claim_run("R"):
            # OS record locks are the process's: only the process's own
            # registry can refuse this one.
            with pytest.raises(RunLocked, match="run 'R' in .*c.db is being run by another"):
                with two.claim_run("R"):
                    pass
            with pytest.raises(RunLocked):
                with one.claim_run("R"):
                    pass
            with two.claim_run("S"):  # another run of the same file is free
                pass
        with two.claim_run("R"):  # released on exit
            pass


def test_claims_in_memory_are_per_database() -> None:
    with Store.open(":memory:") as one, Store.open(":memory:") as two:
        with one.claim_run("R"), two.claim_run("R"):  # two databases, one id each
            with pytest.raises(RunLocked):
                with one.claim_run("R"):
                    pass


def test_a_claim_is_released_when_its_block_raises(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "c.db")) as store:
        with pytest.raises(KeyError):
            with store.claim_run("R"):
                raise KeyError("R")
        with store.claim_run("R"):
            pass


def _holder(path: Path, run_id: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), run_id],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "held\n"
    return proc


def test_another_process_holds_a_run_until_it_dies(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    Store.open(str(path)).close()
    holder = _holder(path, "R")
    try:
        with Store.open(str(path)) as store:
            with pytest.raises(RunLocked):
                with store.claim_run("R"):
                    pass
            with store.claim_run("S"):
                pass
            holder.send_signal(signal.SIGKILL)  # no finally runs: the kernel lets go
            holder.wait()
            with store.claim_run("R"):
                pass
    finally:
        holder.kill()
        holder.wait()


def _counts(path: Path, run_id: str) -> tuple[int, int, int, str | None]:
    with Store.open(str(path), readonly=True) as store:
        run = store.get_run(run_id)
        assert run is not None
        return (
            len(store.events(run_id)),
            len(store.branches(run_id)),
            len(store.decisions(run_id)),
            run.current_branch_id,
        )


def test_the_cli_refuses_a_run_another_process_is_driving(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    done = run_cli(["run", "--db", str(db), "--run-id", "R1", "--json"])
    assert done.returncode == 0, done.stderr
    before = _counts(db, "R1")
    holder = _holder(db, "R1")
    try:
        for args in (["resume", "R1"], ["rerun", "R1", "--from", "audit"]):
            proc = run_cli([*args, "--db", str(db)])
            assert proc.returncode == 2, proc.stdout + proc.stderr
            assert_one_line_error(proc.stderr, "run 'R1' in")
            assert "is being run by another process" in proc.stderr
            assert proc.stderr.rstrip().endswith("then try again")  # a refused rerun was told to resume
            assert _counts(db, "R1") == before  # no resume or rerun event, no branch
        fresh = run_cli(["run", "--db", str(db), "--run-id", "R2"])
        assert fresh.returncode == 0, fresh.stderr  # other runs are not held up
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()
    again = run_cli(["resume", "R1", "--db", str(db), "--json"])
    assert again.returncode == 0, again.stderr


async def test_a_second_orchestrator_cannot_drive_a_running_run(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    path = str(tmp_path / "c.db")
    sim = SimulatedProvider(seed=3)
    first_call = trio.Event()
    release = trio.Event()

    async def answer(request: CompletionRequest) -> Completion:
        first_call.set()
        await release.wait()
        return sim.answer(request)

    provider = MockProvider(answer, name="sim")
    async with open_orchestrator(store=path, provider=provider, seed=3) as orch:
        async with open_orchestrator(store=path, seed=3) as other:
            async with trio.open_nursery() as nursery:
                results = []

                async def drive() -> None:
                    results.append(await orch.run("SPEC-C", run_id="C"))

                nursery.start_soon(drive)
                await first_call.wait()
                events = len(orch._require_db().events("C"))
                for attempt in (
                    lambda: orch.resume("C"),
                    lambda: other.resume("C"),
                    lambda: other.rerun("C", "plan"),
                    lambda: other.run(run_id="C"),
                ):
                    with pytest.raises(RunLocked):
                        await attempt()
                assert len(orch._require_db().events("C")) == events
                assert len(orch._require_db().branches("C")) == 1
                release.set()
        assert results[0].completed
        # Each agent of the pipeline answered each of its stages once.
        assert len(provider.calls) == sum(len(s.agents) for s in orch.pipeline.stages)
        again = await orch.resume("C")  # the claim went with the run
        assert again.completed and again.digest == results[0].digest


def test_status_tells_a_killed_run_from_one_in_progress(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    killed = run_cli(["run", "--db", str(db), "--run-id", "K"], env={"CONCLAVE_TEST_KILL_AFTER_WRITES": "5"})
    assert killed.returncode == -signal.SIGKILL

    def status(*extra: str) -> str:
        proc = run_cli(["status", *extra, "--db", str(db)])
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert status("K").startswith(
        f"run K: stalled\n  no process is driving it (it was killed): 'conclave resume K --db {db}' continues it"
    )
    assert status().split()[:2] == ["K", "stalled"]
    # What it spent before it was killed: status said "0 in / 0 out".
    metrics = json.loads(run_cli(["metrics", "K", "--db", str(db), "--json"]).stdout)
    spent = json.loads(status("K", "--json"))["usage"]
    assert spent["input_tokens"] == metrics["usage"]["input_tokens"] > 0
    assert "so far (its stored attempts)" in status("K")
    assert f"{tokens(spent['input_tokens'])} in" in status().splitlines()[0]
    assert '"driven": false' in status("K", "--json") and '"status": "running"' in status("K", "--json")
    holder = _holder(db, "K")
    try:
        assert status("K").startswith("run K: running\n  spec")
        assert status().split()[:2] == ["K", "running"]
        assert '"driven": true' in status("K", "--json")
    finally:
        holder.kill()
        holder.wait()


def test_asking_whether_a_run_is_driven_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    with Store.open(str(path)) as store:
        assert store.run_is_driven("R") is False
        assert not os.path.exists(f"{path}-lock")
        with store.claim_run("R"):
            assert store.run_is_driven("R") is True
            assert store.run_is_driven("S") is False
            with store.claim_run("S"):  # the probe of S above left nothing held
                pass
            # ... nor dropped the OS lock on R, as another process sees it.
            seen = subprocess.run(
                [sys.executable, "-c", ASK, str(path), "R"], cwd=REPO, capture_output=True, text=True, check=True
            )
            assert seen.stdout == "True\n"
        assert store.run_is_driven("R") is False
    with Store.open(":memory:") as memory:
        assert memory.run_is_driven("R") is None


POLLER = """
import sys
from store import Store
with Store.open(sys.argv[1]) as store:
    print("polling", flush=True)
    while True:  # a dashboard asking as fast as it can, until killed
        store.run_is_driven(sys.argv[2])
"""


def test_a_process_asking_whether_a_run_is_driven_never_blocks_a_claim(tmp_path: Path) -> None:
    """Asking takes the run's byte for an instant: a `resume` made in that
    instant was refused as "being run by another process" (2 in 15 beside
    a dashboard polling `status`)."""
    path = str(tmp_path / "p.db")
    with Store.open(path) as store:
        with store.claim_run("R"):  # the lock file exists, as after any run
            pass
        poller = subprocess.Popen(
            [sys.executable, "-c", POLLER, path, "R"], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        try:
            assert poller.stdout is not None and poller.stdout.readline() == "polling\n"
            refused = 0
            for _ in range(2_000):
                try:
                    with store.claim_run("R"):
                        pass
                except RunLocked:
                    refused += 1
        finally:
            poller.kill()
            poller.wait()
    assert refused == 0


def test_calls_of_a_run_still_driven_are_in_flight_not_interrupted(tmp_path: Path) -> None:
    """`metrics` of a run in progress said its calls at work were "cut off
    by an interruption"."""
    db = tmp_path / "f.db"
    killed = run_cli(["run", "--db", str(db), "--run-id", "F"], env={"CONCLAVE_TEST_KILL_AFTER_WRITES": "5"})
    assert killed.returncode == -signal.SIGKILL

    def metrics() -> tuple[dict[str, object], str]:
        as_json = run_cli(["metrics", "F", "--db", str(db), "--json"])
        text = run_cli(["metrics", "F", "--db", str(db)])
        assert as_json.returncode == text.returncode == 0, as_json.stderr + text.stderr
        return json.loads(as_json.stdout), text.stdout

    report, text = metrics()
    assert (report["interrupted_calls"], report["in_flight_calls"]) == (1, 0)
    assert "1 call(s) cut off by an interruption" in text and "in flight" not in text
    holder = _holder(db, "F")  # as if the run were still at work
    try:
        report, text = metrics()
        assert (report["interrupted_calls"], report["in_flight_calls"]) == (0, 1)
        assert "1 call(s) in flight: cost not known yet" in text and "interruption" not in text
        # Now as a resume holds it: the call cut off before the crash stays
        # cut off (it counted as in flight), and the resume's own call of
        # that attempt is the one at work.
        with Store.open(str(db)) as s:
            run = s.get_run("F")
            assert run is not None and run.current_branch_id is not None
            answered = {(o.stage, o.agent, o.attempt) for o in s.outputs("F", run.current_branch_id)}
            [cut] = [e for e in s.events("F", kind="agent_call") if (e.stage, e.agent, e.attempt) not in answered]
            resume = PersistEvent(run_id="F", branch_id=cut.branch_id, kind="resume", detail={})
            assert s.apply([resume])[0].ok
            assert (metrics()[0]["interrupted_calls"], metrics()[0]["in_flight_calls"]) == (1, 0)
            again = PersistEvent(
                run_id="F", branch_id=cut.branch_id, kind="agent_call", stage=cut.stage, agent=cut.agent,
                attempt=cut.attempt, detail={},
            )
            assert s.apply([again])[0].ok
        report, text = metrics()
        assert (report["interrupted_calls"], report["in_flight_calls"]) == (1, 1)
    finally:
        holder.kill()
        holder.wait()


def test_a_run_ending_while_it_is_asked_about_is_not_taken_for_a_killed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run records its end, then lets go of its claim: `status` read the
    row (running), then found no holder, and showed a run that had just
    completed as stalled (6 of 16 beside a fast poller)."""
    import apsw

    from actors._cli import main

    db = tmp_path / "e.db"
    killed = run_cli(["run", "--db", str(db), "--run-id", "E"], env={"CONCLAVE_TEST_KILL_AFTER_WRITES": "5"})
    assert killed.returncode == -signal.SIGKILL
    asked = Store.run_is_driven
    end = ("completed", None)

    def ends_first(store: Store, run_id: str) -> bool | None:
        # The run ends and lets go in the instant between the reads.
        connection = apsw.Connection(str(db))
        with connection:
            for table in ("runs", "branches"):
                connection.execute(f"UPDATE {table} SET status = ?, halt_reason = ? WHERE run_id = ?", (*end, run_id))
        connection.close()
        return asked(store, run_id)

    def shown(*argv: str) -> str:
        with monkeypatch.context() as m:
            m.setattr(Store, "run_is_driven", ends_first)
            assert main([*argv, "--db", str(db)]) == 0
        connection = apsw.Connection(str(db))
        with connection:
            for table in ("runs", "branches"):
                connection.execute(f"UPDATE {table} SET status = 'running', halt_reason = NULL WHERE run_id = 'E'")
        connection.close()
        return capsys.readouterr().out

    assert shown("status").split()[:2] == ["E", "completed"]
    assert shown("status", "E").startswith("run E: completed\n")
    assert json.loads(shown("status", "--json"))["runs"][0]["status"] == "completed"
    assert json.loads(shown("status", "E", "--json"))["status"] == "completed"
    assert "(completed;" in shown("metrics", "E")
    assert json.loads(shown("metrics", "E", "--json"))["status"] == "completed"
    assert "stalled" not in shown("branches", "E")
    # Its halt reason and hint too: they were read from the row read first.
    end = ("halted", "agents_failed")
    text = shown("status", "E")
    assert text.startswith("run E: halted (agents_failed)\n") and "--retry-failed" in text, text
