"""The batch write path (one savepoint per batch, executemany per run of
outputs or events) must give the same acks and the same rows as applying
every item on its own."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from messages import (
    Decision,
    PersistBranch,
    PersistDecision,
    PersistEvent,
    PersistOutput,
    PersistRun,
    RunUpdate,
    StageKey,
    StoreWrite,
)
from store import Store

from .test_store import output


def _output(agent: str, attempt: int = 1, status: str = "accepted") -> PersistOutput:
    return PersistOutput(output=output(agent, attempt, status))


def _event(kind: str, run: str = "r", **detail: Any) -> PersistEvent:
    return PersistEvent(run_id=run, branch_id="b", kind=kind, stage="plan", agent="a", attempt=1, detail=detail)


def _decision(stage: str, seq: int, status: str = "ok") -> PersistDecision:
    key = StageKey(run_id="r", branch_id="b", stage=stage)
    return PersistDecision(decision=Decision(key=key, seq=seq, status=status, verdict={"z": 1, "a": [seq]}))  # type: ignore[arg-type]


def _dump(s: Store) -> dict[str, list[Any]]:
    conn = s._conn
    return {
        table: conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
        for table in ("runs", "branches", "agent_outputs", "decisions", "events")
    }


def _open(path: Path) -> Store:
    s = Store.open(str(path), clock=lambda: 1_000)
    [ack] = s.apply([PersistRun(run_id="r", branch_id="b", spec_id="S", goal="g", seed=1, pipeline="{}")])
    assert ack.ok
    return s


def _random_batch(rng: random.Random) -> list[StoreWrite]:
    pool: list[StoreWrite] = []
    for _ in range(rng.randint(1, 12)):
        roll = rng.random()
        if roll < 0.35:
            pool.append(_output(rng.choice("abcd"), rng.randint(1, 3), rng.choice(["accepted", "failed"])))
        elif roll < 0.7:
            # An event of an unknown run breaks its foreign key: fails alone.
            pool.append(_event(rng.choice(["agent_call", "fault", "retry"]), run=rng.choice(["r", "r", "r", "nope"]), n=rng.randint(0, 9)))
        elif roll < 0.85:
            pool.append(_decision(rng.choice(["plan", "tasks", "impl"]), rng.randint(1, 4), rng.choice(["ok", "conflict"])))
        elif roll < 0.93:
            pool.append(RunUpdate(run_id=rng.choice(["r", "gone"]), status="running"))
        else:
            # Its second statement (the branch) clashes with branch "b":
            # the run row must be undone with it.
            pool.append(PersistRun(run_id=f"r{rng.randint(0, 2)}", branch_id=rng.choice(["b", "x"]), spec_id="S", goal="", seed=None, pipeline="{}"))
    return pool


def test_batches_match_item_by_item(tmp_path: Path) -> None:
    rng = random.Random(7)
    with _open(tmp_path / "batch.db") as batched, _open(tmp_path / "single.db") as single:
        for _ in range(60):
            batch = _random_batch(rng)
            acks = batched.apply(batch)
            expected = [single.apply([item])[0] for item in batch]
            assert acks == expected, batch
        assert _dump(batched) == _dump(single)
        assert batched.integrity_check() == "ok" and batched.foreign_key_violations() == 0


def test_interleaved_runs_keep_event_order_and_fail_alone(tmp_path: Path) -> None:
    with _open(tmp_path / "a.db") as s:
        acks = s.apply(
            [
                _event("e1"),
                _event("e2", b=1, a=2),
                _output("x"),
                _output("x"),  # duplicate key: fails alone
                _event("e3"),
                _event("bad", run="nope"),  # foreign key: fails alone
                _event("e4"),
                _decision("plan", 1),
                _decision("plan", 1),  # identical replay: a duplicate success
                PersistBranch(run_id="r", branch_id="c", parent_branch_id="missing", fork_stage="plan", options="{}"),
                _event("e5"),
            ]
        )
        assert [(a.ok, a.duplicate) for a in acks] == [
            (True, False), (True, False), (True, False), (False, True), (True, False), (False, False),
            (True, False), (True, False), (True, True), (False, False), (True, False),
        ]
        kinds = [e.kind for e in s.events("r")]
        assert kinds == ["e1", "e2", "e3", "e4", "decision", "e5"]
        assert s.events("r", "e2")[0].detail == {"a": 2, "b": 1}
        # Detail bytes stay canonical (sorted keys, no spaces).
        raw = s._conn.execute("SELECT detail FROM events WHERE kind = 'e2'").fetchone()[0]
        assert raw == '{"a":2,"b":1}'
        assert [b.branch_id for b in s.branches("r")] == ["b"]


def test_clean_batch_takes_one_savepoint(tmp_path: Path) -> None:
    # The point of the fast path: no savepoint per item when nothing fails.
    with _open(tmp_path / "a.db") as s:
        seen: list[str] = []
        s._conn.setprofile(lambda sql, ns: seen.append(sql))
        batch: list[StoreWrite] = [_event("e", n=i) for i in range(5)]
        batch += [_output(agent) for agent in "abc"]
        batch += [_decision("plan", 1), _event("done")]
        assert all(a.ok for a in s.apply(batch))
        s._conn.setprofile(None)
        assert sum(sql.startswith("SAVEPOINT") for sql in seen) == 1
        assert [e.kind for e in s.events("r")] == ["e"] * 5 + ["decision", "done"]


def test_json_columns_keep_their_canonical_bytes() -> None:
    from store._store import _json

    values: list[Any] = [
        {},
        {"b": 1, "a": [1, 2.5, None, True, False], "c": {"z": "é\n\"", "y": []}},
        {"seq": 3, "status": "ok"},
        [1, "x", {"k": -0.0}],
        "plain",
        12345678901234567890,
        1e300,
        None,
        {"nan": float("nan"), "inf": float("inf")},
        {2: "int keys", 1: "sort as ints", 10: ""},
        ({"t": (1, 2)}),
    ]
    for value in values:
        assert _json(value) == json.dumps(value, sort_keys=True, separators=(",", ":"))
    with pytest.raises(TypeError):
        _json({"x": object()})
