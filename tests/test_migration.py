"""Acceptance 5: a database written by the walking skeleton (schema version
1) opens, migrates and resumes.

``fixtures/v1_interrupted.db`` was produced by that version's own code
(``fixtures/make_v1_fixture.py``): run SPEC-V1, seed 4, cut off mid-stage
"implement" with plan and tasks decided and two of implement's four
answers durable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import apsw
import pytest

from store import SCHEMA_VERSION, Store
from store._schema import MIGRATIONS, migrate

from .conftest import run_cli

FIXTURE = Path(__file__).parent / "fixtures" / "v1_interrupted.db"


def user_version(path: Path) -> int:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def test_fixture_is_version_1() -> None:
    assert user_version(FIXTURE) == 1 < SCHEMA_VERSION


def test_v1_database_opens_and_migrates(tmp_path: Path) -> None:
    db = tmp_path / "v1.db"
    shutil.copy(FIXTURE, db)
    with Store.open(str(db)) as s:
        assert s._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert s.integrity_check() == "ok" and s.foreign_key_violations() == 0
        run = s.get_run("V1RUN")
        assert run is not None and run.status == "running" and run.seed == 4
        [branch] = s.branches("V1RUN")
        assert branch.options == {} and branch.status == "running"
        assert [d.stage for d in s.lineage_decisions("V1RUN", branch.branch_id)] == ["plan", "tasks"]
        implement = s.lineage_outputs("V1RUN", branch.branch_id, "implement", accepted_only=True)
        assert {o.agent for o in implement} == {"gemini", "claude"}
        assert all(o.started_at is None for o in implement), "v1 rows keep NULL for new columns"


def test_v1_database_resumes_like_an_uninterrupted_run(tmp_path: Path) -> None:
    db = tmp_path / "v1.db"
    shutil.copy(FIXTURE, db)
    fresh = run_cli(["run", "SPEC-V1", "--goal", "migrate me", "--seed", "4", "--db", str(tmp_path / "fresh.db"), "--json"])
    expected = json.loads(fresh.stdout)
    resumed = run_cli(["resume", "V1RUN", "--db", str(db), "--json"])
    assert resumed.returncode == fresh.returncode, resumed.stderr
    got = json.loads(resumed.stdout)
    assert user_version(db) == SCHEMA_VERSION
    assert got["digest"] == expected["digest"]
    assert got["stages"] == expected["stages"]
    with Store.open(str(db)) as s:
        assert s.integrity_check() == "ok"
        events = s.events("V1RUN")
        [resume] = [e for e in events if e.kind == "resume"]
        called = {(e.stage, e.agent) for e in events if e.kind == "agent_call" and e.id > resume.id}
        assert ("implement", "gemini") not in called and ("implement", "claude") not in called
        assert {("implement", "gpt_codex"), ("implement", "gpt_pro")} <= called
        assert not {st for st, _ in called} & {"plan", "tasks"}
        assert [d.seq for d in s.decisions("V1RUN")] == [1, 2, 3, 4, 5, 6]


def test_each_migration_is_one_transaction(tmp_path: Path) -> None:
    """A step that fails leaves the database at the version before it."""
    path = tmp_path / "m.db"
    conn = apsw.Connection(str(path))
    migrate(conn, str(path), target=1)
    assert int(conn.execute("PRAGMA user_version").fetchone()[0]) == 1
    conn.execute("CREATE TABLE clash (x)")  # ...
    conn.execute("CREATE INDEX branches_parent ON clash (x)")  # v2 creates this name: it fails
    with pytest.raises(apsw.SQLError):
        migrate(conn, str(path))
    assert int(conn.execute("PRAGMA user_version").fetchone()[0]) == 1
    columns = {r[1] for r in conn.execute("PRAGMA table_info(agent_outputs)")}
    assert "started_at" not in columns, "the failed step's earlier statements were rolled back"
    conn.close()


def test_a_new_file_is_created_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step had its own transaction: a process killed while it created
    a new file left it at version 1 (or 2), which reading commands refuse
    ("needs migrating")."""
    import store._schema as schema

    # The last step fails (as a kill there would end it): nothing is kept.
    monkeypatch.setattr(schema, "MIGRATIONS", (*MIGRATIONS[:-1], "CREATE TABLE runs (x)"))
    path = tmp_path / "new.db"
    conn = apsw.Connection(str(path))
    with pytest.raises(apsw.SQLError):
        migrate(conn, str(path))
    assert int(conn.execute("PRAGMA user_version").fetchone()[0]) == 0
    assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    conn.close()


def test_a_ctrl_c_just_after_the_migration_commits_stays_a_keyboard_interrupt(tmp_path: Path) -> None:
    """SIGINT during COMMIT's fsync is raised as the C call returns: the
    rollback then found no transaction, and "cannot rollback" (a
    StoreError, exit 2) replaced the KeyboardInterrupt (exit 130)."""

    class InterruptedAtCommit:
        def __init__(self, conn: apsw.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str, *args: object) -> apsw.Cursor:
            cursor = self.conn.execute(sql, *args)
            if sql == "COMMIT":
                raise KeyboardInterrupt
            return cursor

        def __getattr__(self, name: str) -> object:
            return getattr(self.conn, name)

    path = tmp_path / "new.db"
    conn = apsw.Connection(str(path))
    with pytest.raises(KeyboardInterrupt):
        migrate(InterruptedAtCommit(conn), str(path))  # type: ignore[arg-type]
    # It had committed: the file is whole.
    assert int(conn.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION
    conn.close()


def test_migrations_are_append_only() -> None:
    # Version 1 is the skeleton's schema, frozen: databases in the wild have it.
    assert "CREATE TABLE runs" in MIGRATIONS[0] and "started_at" not in MIGRATIONS[0]
    assert len(MIGRATIONS) == SCHEMA_VERSION


def test_a_database_one_version_behind_is_read_without_migrating(tmp_path: Path) -> None:
    """Version 3 added cache-write counts; reading commands (which never
    migrate) still read a version-2 file, as if its rows had none."""
    db = tmp_path / "v2.db"
    shutil.copy(FIXTURE, db)
    conn = apsw.Connection(str(db))
    migrate(conn, str(db), target=2)
    conn.close()
    assert user_version(db) == 2 < SCHEMA_VERSION
    status = run_cli(["status", "V1RUN", "--db", str(db), "--json"])
    assert status.returncode == 0, status.stderr
    metrics = run_cli(["metrics", "V1RUN", "--db", str(db), "--json"])
    assert metrics.returncode == 0, metrics.stderr
    totals = json.loads(metrics.stdout)["usage"]
    assert totals["input_tokens"] > 0 and totals["cache_write_input_tokens"] == 0
    assert user_version(db) == 2, "a read never migrates"
    with Store.open(str(db), readonly=True) as s:
        run = s.get_run("V1RUN")
        assert run is not None and run.usage.cache_write_input_tokens == 0
        [branch] = s.branches("V1RUN")
        outputs = s.lineage_outputs("V1RUN", branch.branch_id)
        assert outputs and all(o.usage is None or o.usage.cache_write_input_tokens == 0 for o in outputs)
    # The first writing command brings it up to date; rows read the same.
    resumed = run_cli(["resume", "V1RUN", "--db", str(db), "--json"])
    assert resumed.returncode == 0, resumed.stderr
    assert user_version(db) == SCHEMA_VERSION


def test_a_metrics_report_recorded_before_cache_writes_has_their_keys(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    assert run_cli(["run", "--db", str(db), "--run-id", "R"]).returncode == 0
    with Store.open(str(db)) as s:
        # As version 2 recorded it: no cache-write counts anywhere.
        for event in s.events("R", "metrics"):
            detail = json.loads(json.dumps(event.detail).replace('"cache_write_1h_input_tokens": 0, ', "").replace('"cache_write_input_tokens": 0, ', ""))
            s._conn.execute("UPDATE events SET detail = ? WHERE id = ?", (json.dumps(detail), event.id))
        [event] = s.events("R", "metrics")
        assert "cache_write_input_tokens" not in json.dumps(event.detail)
    report = json.loads(run_cli(["metrics", "R", "--db", str(db), "--json"]).stdout)
    assert report["source"] == "recorded"
    assert report["usage"]["cache_write_input_tokens"] == 0
    for group in report["by"]["stage"].values():
        assert group["usage"]["cache_write_1h_input_tokens"] == 0


def test_cache_writes_are_stored_per_attempt_and_in_the_run_totals(tmp_path: Path) -> None:
    from messages import AgentKey, AgentOutput, PersistOutput, RunUpdate, TokenUsage

    db = tmp_path / "w.db"
    usage = TokenUsage.of(input_tokens=100, cache_write_input_tokens=40, cache_write_1h_input_tokens=15)
    fresh = run_cli(["run", "--db", str(db), "--run-id", "R", "--json"])
    assert fresh.returncode == 0, fresh.stderr
    with Store.open(str(db)) as s:
        run = s.get_run("R")
        assert run is not None and run.current_branch_id is not None
        key = AgentKey(run_id="R", branch_id=run.current_branch_id, stage="plan", agent="extra")
        out = AgentOutput(
            key=key, attempt=1, status="failed", content="", format="text", usage=usage, model="m", provider="p",
            error="x", started_at=0.0, finished_at=0.0,
        )
        assert s.apply([PersistOutput(output=out)])[0].ok
        assert s.apply([RunUpdate(run_id="R", status="completed", usage=usage)])[0].ok
    with Store.open(str(db), readonly=True) as s:
        [row] = [o for o in s.outputs("R", stage="plan") if o.agent == "extra"]
        assert row.usage == usage
        run = s.get_run("R")
        assert run is not None and run.usage == usage


def test_a_version_1_database_reads_as_its_migration_would(tmp_path: Path) -> None:
    """Reading commands refused a version-1 file ("needs migrating"): a
    user could not list its runs to resume one.  Read in place, each says
    what it says of the same file migrated, and the file stays version 1."""
    old, migrated = tmp_path / "old.db", tmp_path / "migrated.db"
    shutil.copy(FIXTURE, old)
    shutil.copy(FIXTURE, migrated)
    Store.open(str(migrated)).close()
    assert user_version(migrated) == SCHEMA_VERSION
    for command in (["status"], ["status", "V1RUN"], ["decisions", "V1RUN"], ["metrics", "V1RUN"],
                    ["events", "V1RUN"], ["branches", "V1RUN"]):
        before = run_cli([*command, "--db", str(old), "--json"])
        after = run_cli([*command, "--db", str(migrated), "--json"])
        assert before.returncode == after.returncode == 0, (command, before.stderr)
        assert before.stdout == after.stdout, command
    assert user_version(old) == 1, "a read never migrates"
