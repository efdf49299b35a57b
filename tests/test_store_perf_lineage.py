"""The root-branch fast path of ``Store.lineage_outputs`` (remembered
root-ness and pipeline stages, one indexed query) must return what the
lineage CTE returns."""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from messages import AgentKey, PersistBranch, PersistOutput, PersistRun
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
