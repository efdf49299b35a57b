"""DropRun: a finished run leaves the store entirely, and nothing the store
remembered about it outlives it (the soak drops every checked run from its
scratch store)."""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from messages import (
    AgentKey,
    Decision,
    DropRun,
    PersistBranch,
    PersistDecision,
    PersistEvent,
    PersistOutput,
    PersistRun,
    StageKey,
)
from store import Store

from .test_store import output


def pipeline(*stages: str) -> str:
    return json.dumps({"stages": [{"name": s} for s in stages]})


def fill(s: Store, run_id: str, stages: tuple[str, ...] = ("plan", "tasks")) -> None:
    writes = [
        PersistRun(run_id=run_id, branch_id=f"{run_id}-b", spec_id="S", goal="g", seed=1, pipeline=pipeline(*stages)),
        PersistOutput(output=attrs.evolve(output(), key=AgentKey(run_id=run_id, branch_id=f"{run_id}-b", stage=stages[0], agent="a"))),
        PersistDecision(decision=Decision(key=StageKey(run_id=run_id, branch_id=f"{run_id}-b", stage=stages[0]), seq=1, status="ok", verdict={})),
        PersistEvent(run_id=run_id, branch_id=f"{run_id}-b", kind="note"),
        PersistBranch(run_id=run_id, branch_id=f"{run_id}-kid", parent_branch_id=f"{run_id}-b", fork_stage=stages[-1]),
    ]
    assert all(a.ok for a in s.apply(writes))


def count(s: Store, run_id: str) -> dict[str, int]:
    tables = ("runs", "branches", "agent_outputs", "decisions", "events")
    return {t: s._conn.execute(f"SELECT count(*) FROM {t} WHERE run_id = ?", (run_id,)).fetchone()[0] for t in tables}


def test_drop_run_removes_everything_of_that_run_only(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "a.db")) as s:
        fill(s, "gone")
        fill(s, "kept")
        before = count(s, "kept")
        assert all(before.values()) and count(s, "gone") == before
        [ack] = s.apply([DropRun(run_id="gone")])
        assert ack.ok
        assert set(count(s, "gone").values()) == {0}
        assert count(s, "kept") == before
        assert s.foreign_key_violations() == 0
        [again] = s.apply([DropRun(run_id="gone")])
        assert not again.ok and "no run 'gone' to drop" in (again.error or "")


def test_a_dropped_run_is_not_remembered(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "a.db")) as s:
        fill(s, "r", ("plan", "tasks"))
        # Read once: the store now remembers r's stages and root branch.
        assert [o.agent for o in s.lineage_outputs("r", "r-b", "plan")] == ["a"]
        assert s.apply([DropRun(run_id="r")])[0].ok
        # The same id again with other stages: "review" must not be judged
        # by the dropped run's pipeline (which had no such stage).
        fill(s, "r", ("review",))
        assert [o.agent for o in s.lineage_outputs("r", "r-b", "review")] == ["a"]
