"""The lineage query on its own, and busy handling on the read paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import apsw
import pytest

from messages import AgentKey, AgentOutput, Decision, PersistBranch, PersistDecision, PersistOutput, PersistRun, StageKey
from store import Store, StoreBusy, retry_busy

STAGES = ["a", "b", "c", "d"]


def seed_tree(s: Store) -> None:
    pipeline = json.dumps({"stages": [{"name": n} for n in STAGES]})
    assert s.apply([PersistRun(run_id="r", branch_id="root", spec_id="S", goal="", seed=0, pipeline=pipeline)])[0].ok
    writes = [
        PersistBranch(run_id="r", branch_id="kid", parent_branch_id="root", fork_stage="c"),
        PersistBranch(run_id="r", branch_id="grandkid", parent_branch_id="kid", fork_stage="b"),
        PersistBranch(run_id="r", branch_id="late", parent_branch_id="kid", fork_stage="d"),
    ]
    assert all(a.ok for a in s.apply(writes))
    seq = 0
    rows = []
    for branch in ("root", "kid", "grandkid", "late"):
        for stage in STAGES:
            seq += 1
            key = StageKey(run_id="r", branch_id=branch, stage=stage)
            rows.append(PersistDecision(decision=Decision(key=key, seq=seq, status="ok", verdict={})))
            rows.append(
                PersistOutput(
                    output=AgentOutput(
                        key=AgentKey(run_id="r", branch_id=branch, stage=stage, agent="x"),
                        attempt=1, status="accepted", content=f"{branch}/{stage}", format="text",
                        usage=None, model="m", provider="p",
                    )
                )
            )
    assert all(a.ok for a in s.apply(rows))


@pytest.mark.parametrize(
    ("branch", "owners"),
    [
        ("root", ["root", "root", "root", "root"]),
        ("kid", ["root", "root", "kid", "kid"]),
        # forked from kid at b: kid had inherited a from root
        ("grandkid", ["root", "grandkid", "grandkid", "grandkid"]),
        ("late", ["root", "root", "kid", "late"]),
    ],
)
def test_each_stage_has_one_owner(tmp_path: Path, branch: str, owners: list[str]) -> None:
    with Store.open(str(tmp_path / "l.db")) as s:
        seed_tree(s)
        assert [(d.stage, d.branch_id) for d in s.lineage_decisions("r", branch)] == list(zip(STAGES, owners))
        seen = s.lineage_outputs("r", branch)
        assert [o.content for o in seen] == [f"{o}/{st}" for st, o in zip(STAGES, owners)]
        assert [o.content for o in s.lineage_outputs("r", branch, "c")] == [f"{owners[2]}/c"]


def test_reads_retry_busy_then_report(tmp_path: Path) -> None:
    calls = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise apsw.BusyError("database is locked")
        return 7

    assert retry_busy(flaky, what="x", sleep=lambda _: None) == 7 and len(calls) == 3
    with pytest.raises(StoreBusy, match="stayed busy"):
        retry_busy(lambda: (_ for _ in ()).throw(apsw.BusyError("locked")), what="x", attempts=3, sleep=lambda _: None)
    with pytest.raises(apsw.SQLError):  # anything else is not retried
        retry_busy(lambda: (_ for _ in ()).throw(apsw.SQLError("no such table")), what="x", sleep=lambda _: None)


class BusyTwice:
    """A connection whose first two statements find the database locked."""

    def __init__(self, conn: apsw.Connection) -> None:
        self.conn = conn
        self.busy = 2

    def execute(self, *args: Any) -> Any:
        if self.busy:
            self.busy -= 1
            raise apsw.BusyError("database is locked")
        return self.conn.execute(*args)


def test_store_reads_retry_busy(tmp_path: Path) -> None:
    path = str(tmp_path / "x.db")
    with Store.open(path) as s:
        seed_tree(s)
    conn = apsw.Connection(path)
    flaky = BusyTwice(conn)
    store = Store(flaky, path)  # type: ignore[arg-type]
    assert len(store.lineage_decisions("r", "kid")) == 4
    assert flaky.busy == 0
    conn.close()
