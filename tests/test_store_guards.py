"""Guards in ``Store.apply`` and ``Store.lineage_outputs`` that no other
test pinned down (each one survived a mutation-testing pass)."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from messages import (
    AgentKey,
    Decision,
    PersistBranch,
    PersistDecision,
    PersistOutput,
    PersistRun,
    RunUpdate,
    StageKey,
    TokenUsage,
)
from store import Store, StoreFull

from .test_store import new_run, output


def test_a_different_decision_with_a_reused_seq_is_not_a_replay(tmp_path: Path) -> None:
    # Only the same (seq, status) is an idempotent replay.  Compared on seq
    # alone, a conflict decided under the seq of the stored "ok" was acked
    # as a duplicate success: the coordinator believed a decision durable
    # that the store never held.
    with Store.open(str(tmp_path / "a.db")) as s:
        new_run(s)
        key = StageKey(run_id="r", branch_id="b", stage="plan")
        assert s.apply([PersistDecision(decision=Decision(key=key, seq=1, status="ok", verdict={"v": 1}))])[0].ok
        [ack] = s.apply([PersistDecision(decision=Decision(key=key, seq=1, status="conflict", verdict={}))])
        assert not ack.ok and ack.duplicate
        [stored] = s.decisions("r")
        assert (stored.seq, stored.status, stored.verdict) == (1, "ok", {"v": 1})
        assert len(s.events("r", "decision")) == 1


def test_an_interrupt_does_not_overwrite_a_finished_run(tmp_path: Path) -> None:
    # A cancellation acknowledged after the run's end was written must leave
    # that end standing, on the run and on its branch: overwritten, a resume
    # re-drove a completed run.
    with Store.open(str(tmp_path / "a.db")) as s:
        new_run(s)
        assert s.apply([RunUpdate(run_id="r", status="completed", digest="d1")])[0].ok
        assert s.apply([RunUpdate(run_id="r", status="interrupted", halt_reason="cancelled")])[0].ok
        run = s.get_run("r")
        assert run is not None and (run.status, run.halt_reason, run.digest) == ("completed", None, "d1")
        branch = s.get_branch("r", "b")
        assert branch is not None and (branch.status, branch.halt_reason, branch.digest) == ("completed", None, "d1")


def test_an_interrupt_of_a_running_run_marks_run_and_branch(tmp_path: Path) -> None:
    # The other side of the guard above: a running run is interrupted, and
    # its current branch with it.
    with Store.open(str(tmp_path / "a.db")) as s:
        new_run(s)
        assert s.apply([RunUpdate(run_id="r", status="interrupted", halt_reason="cancelled")])[0].ok
        run, branch = s.get_run("r"), s.get_branch("r", "b")
        assert run is not None and (run.status, run.halt_reason) == ("interrupted", "cancelled")
        assert branch is not None and (branch.status, branch.halt_reason) == ("interrupted", "cancelled")


@pytest.mark.parametrize("status", ["completed", "halted", "interrupted"])
@pytest.mark.parametrize("usage", [None, TokenUsage.of(input_tokens=3, output_tokens=2)])
def test_an_update_of_a_missing_run_is_refused(tmp_path: Path, status: str, usage: TokenUsage | None) -> None:
    # An UPDATE that matches no row is not an error to SQLite; acked ok, a
    # run's end written under a wrong id was reported durable and lost.
    with Store.open(str(tmp_path / "a.db")) as s:
        new_run(s)
        [ack] = s.apply([RunUpdate(run_id="nope", status=status, usage=usage)])
        assert not ack.ok and "no run 'nope'" in (ack.error or "")
        run = s.get_run("r")
        assert run is not None and run.status == "running"
        assert s.get_run("nope") is None


class HookFailed(Exception):
    pass


def test_a_batch_failing_outside_sqlite_is_rolled_back_and_the_next_applies(tmp_path: Path) -> None:
    # An error SQLite did not raise (here the commit hook's) fails the whole
    # batch.  Left open, its transaction showed the batch's rows to reads on
    # the same connection and every later batch failed on BEGIN ("cannot
    # start a transaction within a transaction"): the writer was wedged.
    with Store.open(str(tmp_path / "a.db")) as s:
        new_run(s)

        def fail(when: str, items: int) -> None:
            if when == "before_commit":
                raise HookFailed(when)

        s.commit_hook = fail
        with pytest.raises(HookFailed):
            s.apply([PersistOutput(output=output("gemini")), RunUpdate(run_id="r", status="completed")])
        assert s.outputs("r") == []
        run = s.get_run("r")
        assert run is not None and run.status == "running"
        s.commit_hook = None
        assert [a.ok for a in s.apply([PersistOutput(output=output("claude"))])] == [True]
        assert [o.agent for o in s.outputs("r")] == ["claude"]
    with Store.open(str(tmp_path / "a.db")) as s:  # and that is what is durable
        assert [o.agent for o in s.outputs("r")] == ["claude"]


PIPELINE = json.dumps({"stages": [{"name": "plan"}, {"name": "tasks"}]})


def _out(branch: str, stage: str, agent: str, status: str, attempt: int = 1) -> PersistOutput:
    key = AgentKey(run_id="r", branch_id=branch, stage=stage, agent=agent)
    return PersistOutput(output=attrs.evolve(output(agent, attempt, status), key=key))


def test_accepted_only_holds_on_a_forked_branch(tmp_path: Path) -> None:
    # A fork reads through the lineage query, not the root fast path; there
    # too a failed attempt (the fork's own, or one it inherits) must never
    # reach consensus as if accepted.
    with Store.open(str(tmp_path / "a.db")) as s:
        assert s.apply([PersistRun(run_id="r", branch_id="root", spec_id="S", goal="g", seed=1, pipeline=PIPELINE)])[0].ok
        writes = [_out("root", "plan", "a", "failed"), _out("root", "plan", "a", "accepted", 2)]
        assert all(a.ok for a in s.apply(writes))
        assert s.apply([PersistBranch(run_id="r", branch_id="kid", parent_branch_id="root", fork_stage="tasks")])[0].ok
        assert s.apply([_out("kid", "tasks", "a", "failed")])[0].ok
        assert s.lineage_outputs("r", "kid", "tasks", accepted_only=True) == []
        assert [o.status for o in s.lineage_outputs("r", "kid", "tasks")] == ["failed"]
        inherited = s.lineage_outputs("r", "kid", "plan", accepted_only=True)
        assert [(o.branch_id, o.attempt, o.status) for o in inherited] == [("root", 2, "accepted")]
        everything = s.lineage_outputs("r", "kid", accepted_only=True)
        assert [(o.branch_id, o.stage, o.attempt) for o in everything] == [("root", "plan", 2)]


def _fill(s: Store, pages: int = 0) -> None:
    # The database's own size limit gives SQLITE_FULL as a full disk does.
    count = s._conn.execute("PRAGMA page_count").fetchall()[0][0]
    s._conn.execute(f"PRAGMA max_page_count = {count + pages if pages >= 0 else 1 << 30}")


def test_a_full_disk_fails_the_batch_with_a_typed_error_and_the_store_goes_on(tmp_path: Path) -> None:
    """SQLite rolls the transaction back itself when the disk is full: the
    items "failed" on savepoints that no longer existed, and COMMIT raised
    a bare apsw "no transaction is active", which named no cause."""
    with Store.open(str(tmp_path / "a.db")) as s:
        new_run(s)
        _fill(s)
        big = attrs.evolve(output("gemini"), content="x" * 200_000)
        with pytest.raises(StoreFull, match=r"a\.db: database or disk is full .* nothing of this batch was written"):
            s.apply([PersistOutput(output=output("claude")), PersistOutput(output=big)])
        assert s.outputs("r") == [] and s._conn.getautocommit()
        _fill(s, -1)  # space again
        assert all(a.ok for a in s.apply([PersistOutput(output=big)]))
        assert [o.agent for o in s.outputs("r")] == ["gemini"]


async def test_a_run_on_a_full_disk_stops_saying_so_and_resumes_once_there_is_space(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The store writer died on a full disk with a bare apsw error, and
    with it every run of the orchestrator."""
    from actors import open_orchestrator
    from messages import ConclaveError

    async with open_orchestrator(store=str(tmp_path / "ref.db"), seed=7) as orch:
        expected = await orch.run("SPEC-F", run_id="f")
    with Store.open(str(tmp_path / "f.db")) as s:
        _fill(s, 4)
        # Whichever write met the full disk (an output, a decision), the
        # run stops with a typed error that says so.
        with pytest.raises(ConclaveError, match="database or disk is full"):
            async with open_orchestrator(store=s, seed=7) as orch:
                await orch.run("SPEC-F", run_id="f")
        _fill(s, -1)
        async with open_orchestrator(store=s, seed=7) as orch:
            resumed = await orch.resume("f")
    assert resumed.completed and resumed.digest == expected.digest


def _closed_store(tmp_path: Path) -> tuple[Store, str]:
    """A store holding run "r", closed; and its path."""
    path = str(tmp_path / "c.db")
    s = Store.open(path)
    new_run(s)
    s.close()
    return s, path


def test_reading_a_closed_store_is_a_store_error_naming_it(tmp_path: Path) -> None:
    # Store.closed was tracked, yet every read raised apsw's bare
    # ConnectionClosedError, which names no store and is no ConclaveError.
    from store import StoreError

    s, path = _closed_store(tmp_path)
    reads = (
        lambda: s.get_run("r"),
        lambda: s.list_runs(),
        lambda: s.branches("r"),
        lambda: s.events("r"),
        lambda: list(s.iter_events("r")),
        lambda: s.integrity_check(),
    )
    for read in reads:
        with pytest.raises(StoreError, match=f"store {path!r} is closed"):
            read()


def test_writing_to_a_closed_store_is_a_store_error_naming_it(tmp_path: Path) -> None:
    # As reads are: apsw's bare ConnectionClosedError names no store and is
    # no ConclaveError.  The file is left as it was.
    from store import StoreError

    s, path = _closed_store(tmp_path)
    writes = (
        lambda: s.writable,
        lambda: s.apply([PersistOutput(output=output())]),
        lambda: s.apply([]),
    )
    for write in writes:
        with pytest.raises(StoreError, match=f"store {path!r} is closed: open it again \\(Store.open\\) to write"):
            write()
    with Store.open(path) as again:
        assert again.lineage_outputs("r", "b", "plan") == []


def test_an_event_keeps_the_time_it_was_made_not_its_commits(tmp_path: Path) -> None:
    """The writer holds events up to a second before committing: stamped at
    the commit, a retry read as a second after the 429 it followed, and a
    call's retry and its next agent_call as the same instant."""
    import time

    from messages import PersistEvent

    before = time.time_ns() // 1_000_000
    made = PersistEvent(run_id="r", branch_id="b", kind="retry")
    after = time.time_ns() // 1_000_000
    assert before <= made.at_ms <= after
    with Store.open(str(tmp_path / "e.db")) as s:
        new_run(s)
        s.apply([PersistEvent(run_id="r", branch_id="b", kind="retry", at_ms=1_000), made])
        assert [e.at for e in s.events("r", "retry")] == [1_000, made.at_ms]


def test_a_string_for_kinds_or_a_non_string_run_id_is_refused_naming_it(tmp_path: Path) -> None:
    # kinds="metrics" was read as its letters and found no event, without a
    # word; claim_run(None) failed as an AttributeError in the lock table.
    with Store.open(str(tmp_path / "g.db")) as s:
        with pytest.raises(TypeError, match=r"got the string 'metrics'; for one kind, give \('metrics',\)"):
            list(s.iter_events("r", kinds="metrics"))
        with pytest.raises(TypeError, match="run_id must be a string, got None"):
            s.claim_run(None)  # type: ignore[arg-type]
