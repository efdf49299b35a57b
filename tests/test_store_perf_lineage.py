"""The root-branch fast path of ``Store.lineage_outputs`` (remembered
root-ness and pipeline stages, one indexed query) must return what the
lineage CTE returns."""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from messages import AgentKey, PersistBranch, PersistOutput, PersistRun
import store._store as store_module
from store import Store

from .test_store import output

STAGES = ["plan", "tasks", "impl"]
PIPELINE = json.dumps({"stages": [{"name": n} for n in STAGES]})


def _out(branch: str, stage: str, agent: str, attempt: int = 1, status: str = "accepted") -> PersistOutput:
    return PersistOutput(
        output=attrs.evolve(
            output(agent, attempt, status),
            key=AgentKey(run_id="r", branch_id=branch, stage=stage, agent=agent),
            content=f"{branch}/{stage}/{agent}/{attempt}",
            format="text",
        )
    )


def test_fast_path_matches_lineage_query(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "a.db")) as s:
        # Asked before the run or branch exists: nothing, and nothing remembered.
        assert s.lineage_outputs("r", "root", "plan") == []
        assert s.apply([PersistRun(run_id="r", branch_id="root", spec_id="S", goal="", seed=1, pipeline=PIPELINE)])[0].ok
        # An output of a stage outside the pipeline is never seen.
        writes = [_out("root", st, a, n, "failed" if n == 1 else "accepted") for st in [*STAGES, "extra"] for a in "ba" for n in (1, 2)]
        assert all(a.ok for a in s.apply(writes))
        for accepted_only in (False, True):
            everything = s.lineage_outputs("r", "root", accepted_only=accepted_only)  # the CTE
            for stage in [*STAGES, "extra", "nope"]:
                fast = s.lineage_outputs("r", "root", stage, accepted_only=accepted_only)
                assert fast == [o for o in everything if o.stage == stage]
                assert [(o.agent, o.attempt) for o in fast] == (
                    [] if stage not in STAGES else
                    [("a", 2), ("b", 2)] if accepted_only else [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
                )
        # A child forked at "tasks" takes the lineage query, not the fast
        # path: it inherits the root's "plan" and owns the rest.
        assert s.apply([PersistBranch(run_id="r", branch_id="child", parent_branch_id="root", fork_stage="tasks")])[0].ok
        assert s.apply([_out("child", "tasks", "a")])[0].ok
        assert [o.branch_id for o in s.lineage_outputs("r", "child", "plan", accepted_only=True)] == ["root", "root"]
        assert [o.content for o in s.lineage_outputs("r", "child", "tasks")] == ["child/tasks/a/1"]
        assert s.lineage_outputs("r", "child", "impl") == []
        # The root still sees only its own rows.
        assert {o.branch_id for o in s.lineage_outputs("r", "root", "tasks")} == {"root"}


def test_hot_reads_reuse_their_compiled_statements(tmp_path: Path) -> None:
    """SQLite (3.54, as apsw bundles it) compiled a statement with ORDER BY
    or LIMIT again on every run when a parameter was bound bare: the stage
    read consensus decides from was compiled 600 times in a 100-run soak,
    6x the cost of the query.  Counted with an authorizer, which SQLite
    calls only while compiling: a read run a second time compiles nothing."""
    import apsw

    from messages import PersistDecision, PersistEvent
    from messages._messages import Decision

    with Store.open(str(tmp_path / "c.db")) as s:
        assert s.apply([PersistRun(run_id="r", branch_id="root", spec_id="S", goal="", seed=1, pipeline=PIPELINE)])[0].ok
        key = AgentKey(run_id="r", branch_id="root", stage="plan", agent="a")
        decision = Decision(key=key.stage_key, seq=1, status="ok", verdict={})
        writes = [_out("root", "plan", a, n, "failed" if n == 1 else "accepted") for a in "ab" for n in (1, 2)]
        writes += [PersistEvent.of_attempt(key, 1, "retry", {}), PersistDecision(decision=decision)]
        assert all(a.ok for a in s.apply(writes))
        reads = {
            "stage read": lambda: s.lineage_outputs("r", "root", "plan", accepted_only=True),
            "stage rows": lambda: s.lineage_outputs("r", "root", "plan"),
            "outputs": lambda: s.outputs("r", "root", "plan"),
            "decisions": lambda: s.decisions("r", "root"),
            "events": lambda: s.events("r", "retry"),
            "iter_events": lambda: list(s.iter_events("r", branch_id="root", kinds=("retry", "gave_up"), up_to=99)),
            "event_counts": lambda: s.event_counts("r", "root"),
            "branches": lambda: s.branches("r"),
            "list_runs": lambda: s.list_runs(5),
        }
        compiled = 0

        def authorizer(*_: object) -> int:
            nonlocal compiled
            compiled += 1
            return apsw.SQLITE_OK

        # (Set first: setting an authorizer expires every compiled statement.)
        s._conn.authorizer = authorizer
        for name, read in reads.items():
            first = read()
            compiled = 0
            assert read() == first, name
            assert compiled == 0, f"{name} was compiled again"
        s._conn.authorizer = None
        # Still the indexed plan (the + is on the value, never the column).
        plan = s._conn.execute(
            "EXPLAIN QUERY PLAN " + store_module._ROOT_STAGE_ACCEPTED, ("r", "root", "plan")
        ).fetchall()
        assert "USING INDEX agent_outputs_accepted" in str(plan)


def test_statements_used_once_a_run_stay_compiled_between_runs(tmp_path: Path) -> None:
    """apsw's statement cache keeps the last N uses of statements, not the
    N statements: at its default of 100 a soak evicted the statements each
    run uses once (its row, its end, its drop...) before the next run came
    to them.  Here 200 uses of hot statements come between two uses of
    one, which must still be compiled."""
    import apsw

    with Store.open(str(tmp_path / "cache.db")) as s:
        assert s._conn.cache_stats()["size"] >= 512
        assert s.apply([PersistRun(run_id="r", branch_id="root", spec_id="S", goal="", seed=1, pipeline=PIPELINE)])[0].ok
        compiled = 0

        def authorizer(*_: object) -> int:
            nonlocal compiled
            compiled += 1
            return apsw.SQLITE_OK

        s._conn.authorizer = authorizer  # (expires every compiled statement: set first)
        s.get_run("r")
        for _ in range(50):
            s.apply([_out("root", "plan", "a", 1, "failed")])  # BEGIN, INSERT, COMMIT
            s._conn.execute("DELETE FROM agent_outputs")
        compiled = 0
        s.get_run("r")
        assert compiled == 0
