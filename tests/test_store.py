"""The store on real SQLite files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import apsw
import pytest
import trio
import trio.testing

from actors import StoreWriter
from messages import (
    AgentKey,
    AgentOutput,
    Decision,
    PersistDecision,
    PersistOutput,
    PersistRun,
    StageKey,
    TokenUsage,
    open_channel,
    reply_pair,
)
from store import SCHEMA_VERSION, NotADatabase, SchemaTooNew, Store, StoreError


def new_run(s: Store, run_id: str = "r") -> None:
    [ack] = s.apply([PersistRun(run_id=run_id, branch_id="b", spec_id="S", goal="g", seed=1, pipeline="{}")])
    assert ack.ok


def output(agent: str = "gemini", attempt: int = 1, status: str = "accepted") -> AgentOutput:
    return AgentOutput(
        key=AgentKey(run_id="r", branch_id="b", stage="plan", agent=agent),
        attempt=attempt,
        status=status,  # type: ignore[arg-type]
        content="{}",
        format="json",
        usage=TokenUsage.of(input_tokens=10, output_tokens=5) if status == "accepted" else None,
        model="m",
        provider="sim",
    )


def test_pragmas_and_schema(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "a.db")) as s:
        conn = s._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"runs", "branches", "agent_outputs", "decisions", "events"} <= tables


def test_one_decision_per_stage_and_per_seq(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "a.db")) as s:
        new_run(s)
        key = StageKey(run_id="r", branch_id="b", stage="plan")
        d1 = Decision(key=key, seq=1, status="ok", verdict={"v": 1})
        assert s.apply([PersistDecision(decision=d1)])[0].ok
        # The same decision again is an idempotent success...
        again = s.apply([PersistDecision(decision=d1)])[0]
        assert again.ok and again.duplicate
        # ...a different decision for the same stage is refused...
        other = s.apply([PersistDecision(decision=Decision(key=key, seq=2, status="conflict", verdict={}))])[0]
        assert not other.ok and other.duplicate
        # ...and so is a second use of a seq.
        tasks = StageKey(run_id="r", branch_id="b", stage="tasks")
        clash = s.apply([PersistDecision(decision=Decision(key=tasks, seq=1, status="ok", verdict={}))])[0]
        assert not clash.ok
        assert [(d.stage, d.seq) for d in s.decisions("r")] == [("plan", 1)]


def test_bad_item_does_not_undo_its_batch(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "a.db")) as s:
        new_run(s)
        acks = s.apply([PersistOutput(output=output("gemini")), PersistOutput(output=output("gemini")), PersistOutput(output=output("claude"))])
        assert [a.ok for a in acks] == [True, False, True]
        assert {o.agent for o in s.outputs("r")} == {"gemini", "claude"}
        # One accepted output per agent, however many attempts failed.
        assert s.apply([PersistOutput(output=output("gemini", 2, "failed"))])[0].ok
        assert not s.apply([PersistOutput(output=output("gemini", 3))])[0].ok
        [unknown] = [o for o in s.outputs("r") if o.status == "failed"]
        assert unknown.usage is None


def test_mixed_batch_bad_item_fails_alone_and_replay_stays_idempotent(tmp_path: Path) -> None:
    # The optimistic path (no savepoint per item) must fall back item by
    # item: a duplicate decision in the middle of a mixed batch fails only
    # its own ack, and an identical replay in the same batch is a success.
    with Store.open(str(tmp_path / "a.db")) as s:
        new_run(s)
        key = StageKey(run_id="r", branch_id="b", stage="plan")
        d1 = Decision(key=key, seq=1, status="ok", verdict={"v": 1})
        clash = Decision(key=key, seq=2, status="conflict", verdict={})
        acks = s.apply(
            [
                PersistOutput(output=output("gemini")),
                PersistDecision(decision=d1),
                PersistDecision(decision=d1),
                PersistDecision(decision=clash),
                PersistOutput(output=output("claude")),
                PersistOutput(output=output("codex")),
            ]
        )
        assert [(a.ok, a.duplicate) for a in acks] == [
            (True, False), (True, False), (True, True), (False, True), (True, False), (True, False)
        ]
        assert {o.agent for o in s.outputs("r")} == {"gemini", "claude", "codex"}
        assert [(d.stage, d.seq) for d in s.decisions("r")] == [("plan", 1)]
        assert len(s.events("r", "decision")) == 1, "never a decision without its event, nor two events"


def test_output_needs_its_run(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "a.db")) as s:
        [ack] = s.apply([PersistOutput(output=output())])
        assert not ack.ok and "FOREIGN KEY" in (ack.error or "")


def test_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    conn = apsw.Connection(str(path))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(SchemaTooNew, match="newer than this Conclave"):
        Store.open(str(path))
    assert path.read_bytes() == before


def test_a_negative_schema_version_is_refused_untouched(tmp_path: Path) -> None:
    # Read as an index, -1 ran the newest migration on a current file: WAL
    # was switched on, then "duplicate column name".
    path = tmp_path / "neg.db"
    with Store.open(str(path)):
        pass
    conn = apsw.Connection(str(path))
    conn.execute("PRAGMA journal_mode = DELETE").fetchall()
    conn.execute("PRAGMA user_version = -1")
    conn.close()
    before = path.read_bytes()
    for readonly in (False, True):
        with pytest.raises(StoreError, match="schema version -1 is not one Conclave writes"):
            Store.open(str(path), readonly=readonly)
    assert path.read_bytes() == before


def test_random_bytes_are_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(os.urandom(4096))
    before = path.read_bytes()
    with pytest.raises(NotADatabase, match="not an SQLite database"):
        Store.open(str(path))
    assert path.read_bytes() == before


def test_an_empty_file_is_set_up_and_another_applications_database_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")  # e.g. left by a first run killed while creating it
    with pytest.raises(NotADatabase, match="an empty database"):
        Store.open(str(empty), readonly=True)
    with Store.open(str(empty)) as s:  # a command that writes sets it up
        assert s.list_runs() == []
    other = tmp_path / "other.db"
    conn = apsw.Connection(str(other))
    conn.execute("CREATE TABLE t1 (x); CREATE TABLE t2 (x); PRAGMA user_version = 0")
    conn.close()
    before = other.read_bytes()
    for readonly in (False, True):
        with pytest.raises(NotADatabase, match=r"something else \(tables: t1, t2\)"):
            Store.open(str(other), readonly=readonly)
    assert other.read_bytes() == before


def test_a_file_another_first_run_is_creating_is_not_taken_for_a_foreign_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two first runs on a new file: the second can read version 0, then
    see the tables the first has just committed with version 1."""
    from store import _db

    path = str(tmp_path / "new.db")
    Store.open(path).close()  # the first run's migration, committed
    real = _db.check_version
    reads: list[int] = []

    def stale_first_read(conn: apsw.Connection, where: str) -> int:
        reads.append(real(conn, where))
        return 0 if len(reads) == 1 else reads[-1]

    monkeypatch.setattr(_db, "check_version", stale_first_read)
    with Store.open(path) as s:
        assert s.list_runs() == []
    assert reads == [SCHEMA_VERSION, SCHEMA_VERSION]


def test_readonly_open_of_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such database file"):
        Store.open(str(tmp_path / "missing.db"), readonly=True)
    assert not (tmp_path / "missing.db").exists()


async def test_group_commit_acks_after_commit(tmp_path: Path) -> None:
    path = str(tmp_path / "g.db")
    s = Store.open(path)
    new_run(s)
    writer = StoreWriter(s)
    send, receive = open_channel(1000, name="store")
    pendings = []
    for i in range(200):
        reply, pending = reply_pair(str(i))
        send.send_nowait(PersistOutput(output=output(f"agent{i}"), reply_to=reply))
        pendings.append(pending)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, receive)
        for pending in pendings:
            assert (await pending.receive()).ok
            # Acked means durable: another connection already sees it.
        with Store.open(path, readonly=True) as reader:
            assert len(reader.outputs("r")) == 200
        send.close()
    assert writer.items == 200 and writer.batches < 10, "queued writes share transactions"
    s.close()


async def test_busy_database_is_retried(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    path = str(tmp_path / "busy.db")
    s = Store.open(path, busy_timeout_ms=1)
    new_run(s)
    blocker = apsw.Connection(path)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    writer = StoreWriter(s)
    send, receive = open_channel(10, name="store")
    reply, pending = reply_pair("busy write")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, receive)
        await send.send(PersistOutput(output=output(), reply_to=reply))
        await trio.testing.wait_all_tasks_blocked()
        assert writer.busy_waits >= 1
        blocker.execute("COMMIT")
        ack = await pending.receive()
        assert ack.ok
        send.close()
    assert len(s.outputs("r")) == 1
    blocker.close()
    s.close()


async def test_an_orchestrator_closing_on_a_locked_database_gives_up_within_its_grace(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Cancelled while another connection held the write lock, an app waited
    # 42 s for its 'async with open_orchestrator' to end: the writer ran
    # every one of its 60 busy retries for the writes still queued.
    from actors import open_orchestrator

    path = str(tmp_path / "locked.db")
    async with open_orchestrator(store=path, seed=1) as orch:
        await orch.run("S", run_id="first")
    blocker = apsw.Connection(path)
    blocker.execute("BEGIN EXCLUSIVE")
    start = trio.current_time()
    with trio.move_on_after(3):
        async with open_orchestrator(store=path, seed=1) as orch:
            await orch.run("S", run_id="second")
    assert trio.current_time() - start < 6, "the close waited out the busy database"
    blocker.execute("ROLLBACK")
    blocker.close()


def test_an_empty_path_is_refused_not_opened_as_a_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite opens "" as a private temporary database deleted on close.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match="an empty database path"):
        Store.open("")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"path": b"c.db"}, TypeError, "the database path must be a str, got b'c.db'"),
        ({"path": None}, TypeError, "must be a str, got None"),  # was "an empty database path"
        ({"path": "c.db", "busy_timeout_ms": -5}, ValueError, "busy_timeout_ms must be"),  # was accepted
        ({"path": "c.db", "busy_timeout_ms": 2**40}, ValueError, "busy_timeout_ms must be"),  # overflowed a C int
    ],
)
def test_open_checks_its_arguments_before_touching_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, object], error: type[Exception], needle: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=re.escape(needle)):
        Store.open(**kwargs)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []
