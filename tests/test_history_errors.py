"""Acceptance 4: bad input to resume / rerun is a clear one-line error,
exit 2, and the database file is left byte-for-byte untouched."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import apsw
import pytest

from store import SCHEMA_VERSION, Store
from store._schema import MIGRATIONS

from .conftest import run_cli
from .test_cli_errors import assert_one_line_error


@pytest.fixture(scope="module")
def good_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("good") / "good.db"
    assert run_cli(["run", "--db", str(db), "--run-id", "R", "--disagreement-rate", "0"]).returncode == 0
    return db


def v1_db(path: Path) -> None:
    conn = apsw.Connection(str(path))
    conn.execute(MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO runs (run_id, spec_id, pipeline, status, created_at, updated_at)"
        " VALUES ('OLD', 'S', '{\"stages\": []}', 'running', 0, 0)"
    )
    conn.close()


def make(case: str, tmp_path: Path, good_db: Path) -> tuple[Path, list[str], str]:
    db = tmp_path / "case.db"
    if case == "random_bytes":
        db.write_bytes(os.urandom(8192))
        return db, ["resume", "R"], "not an SQLite database"
    if case == "newer_schema":
        conn = apsw.Connection(str(db))
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.close()
        return db, ["resume", "R"], "newer than this Conclave"
    if case.startswith("foreign_db"):
        # Another application's SQLite file, given by mistake: a run used to
        # add Conclave's tables to it, switch it to WAL and set its version.
        conn = apsw.Connection(str(db))
        conn.execute("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('keep me')")
        conn.close()
        command = ["run", "--run-id", "X"] if case == "foreign_db_run" else ["resume", "R"]
        return db, command, "an SQLite database of something else (tables: notes)"
    if case.startswith("versioned_foreign_db"):
        # One that sets user_version too: taken for Conclave's, it was
        # switched to WAL for good and failed on "no such table: runs".
        conn = apsw.Connection(str(db))
        conn.execute("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('keep me'); PRAGMA user_version = 2")
        conn.close()
        command = {"run": ["run", "--run-id", "X"], "resume": ["resume", "R"], "status": ["status"]}[case.rsplit("_", 1)[1]]
        return db, command, "an SQLite database of something else (tables: notes)"
    if case == "versioned_without_tables_run":
        conn = apsw.Connection(str(db))
        conn.execute("PRAGMA user_version = 1")
        conn.close()
        return db, ["run", "--run-id", "X"], "schema version 1 but none of Conclave's tables"
    if case.startswith("empty_db"):
        # Left by a first run killed while creating it.
        db.write_bytes(b"")
        return db, ["status", "R"] if case == "empty_db_status" else ["resume", "R"], "an empty database"
    shutil.copy(good_db, db)
    if case == "unknown_run":
        return db, ["resume", "NOPE"], "no run 'NOPE'"
    if case == "unknown_run_rerun":
        return db, ["rerun", "NOPE", "--from", "plan"], "no run 'NOPE'"
    if case == "unknown_stage":
        return db, ["rerun", "R", "--from", "deploy"], "unknown stage 'deploy'"
    if case == "unknown_branch":
        return db, ["rerun", "R", "--from", "plan", "--branch", "ffffffff"], "run 'R' has no branch 'ffffffff'; its branches: "
    if case == "read_only":
        db.chmod(0o444)
        return db, ["resume", "R"], "read-only"
    if case == "read_only_rerun":
        db.chmod(0o444)
        return db, ["rerun", "R", "--from", "tasks"], "read-only"
    if case == "unknown_run_in_v1_db":
        db.unlink()
        v1_db(db)  # must not be migrated just to say the run is unknown
        return db, ["resume", "NOPE"], "no run 'NOPE'"
    raise AssertionError(case)


CASES = [
    "random_bytes",
    "newer_schema",
    "unknown_run",
    "unknown_run_rerun",
    "unknown_stage",
    "unknown_branch",
    "read_only",
    "read_only_rerun",
    "unknown_run_in_v1_db",
    "foreign_db_run",
    "foreign_db_resume",
    "empty_db_status",
    "empty_db_resume",
    "versioned_foreign_db_run",
    "versioned_foreign_db_resume",
    "versioned_foreign_db_status",
    "versioned_without_tables_run",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_untouched(tmp_path: Path, good_db: Path, case: str) -> None:
    db, args, needle = make(case, tmp_path, good_db)
    before = db.read_bytes()
    listing = sorted(os.listdir(tmp_path))
    proc = run_cli([*args, "--db", str(db), "--json"])
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc.stderr, needle)
    assert proc.stdout == ""
    assert db.read_bytes() == before, "the file must be left byte-for-byte untouched"
    # A read-only look at a WAL file may leave SQLite's empty side files.
    new = set(os.listdir(tmp_path)) - set(listing)
    assert new <= {"case.db-wal", "case.db-shm"}
    assert not (tmp_path / "case.db-wal").exists() or (tmp_path / "case.db-wal").stat().st_size == 0


def test_an_empty_file_lists_no_runs_and_is_left_untouched(tmp_path: Path) -> None:
    # It was refused ("an empty database"), while a database Conclave made
    # and never ran in listed none: a script reading 'status --json' had
    # to tell the two apart.
    db = tmp_path / "empty.db"
    db.write_bytes(b"")
    listed = run_cli(["status", "--db", str(db), "--json"])
    assert listed.returncode == 0 and json.loads(listed.stdout) == {"runs": []}, listed.stderr
    shown = run_cli(["status", "--db", str(db)])
    assert shown.returncode == 0 and shown.stdout.strip() == f"no runs in {db}", shown.stderr
    assert db.read_bytes() == b"" and os.listdir(tmp_path) == ["empty.db"]


def test_missing_db_is_not_created(tmp_path: Path) -> None:
    db = tmp_path / "missing.db"
    for args in (["resume", "R"], ["rerun", "R", "--from", "plan"], ["branches", "R"]):
        proc = run_cli([*args, "--db", str(db)])
        assert proc.returncode == 2
        assert_one_line_error(proc.stderr, "no such database file")
    assert os.listdir(tmp_path) == []


def test_rerun_past_a_halted_stage_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    assert run_cli(["run", "--db", str(db), "--run-id", "H", "--disagreement-rate", "1"]).returncode == 3
    before = db.read_bytes()
    proc = run_cli(["rerun", "H", "--from", "tasks", "--db", str(db)])
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "the earlier stage 'plan' ended in conflict")
    assert db.read_bytes() == before


@pytest.mark.parametrize("command", [["status"], ["run", "--run-id", "X"], ["resume", "R"], ["events", "R"]])
def test_a_pipe_or_device_is_refused_not_waited_on(tmp_path: Path, command: list[str]) -> None:
    """A FIFO given as --db blocked every command for ever (reading its
    header waits for a writer); /dev/null got a -journal file beside it."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for db in (str(fifo), os.devnull):
        proc = run_cli([*command, "--db", db], timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert_one_line_error(proc.stderr, f"{db}: not a regular file (a pipe, socket or device)")
    assert sorted(os.listdir(tmp_path)) == ["fifo"]


@pytest.mark.parametrize("command", [["events", "R"], ["metrics", "R"]])
def test_a_file_damaged_past_its_header_is_named(tmp_path: Path, good_db: Path, command: list[str]) -> None:
    """A database cut short (a copy interrupted, a full disk) opens fine and
    fails where a read meets the missing pages: that was 'error: IOError:
    disk I/O error', naming neither the file nor what to do."""
    db = tmp_path / "cut.db"
    whole = good_db.read_bytes()
    db.write_bytes(whole[: len(whole) - 592])
    before = db.read_bytes()
    proc = run_cli([*command, "--db", str(db)])
    assert proc.returncode == 1, proc.stderr
    assert_one_line_error(proc.stderr, f"{db}: the database file is damaged or unreadable (")
    assert "restore a copy, or give --db a new file" in proc.stderr
    assert "IOError:" not in proc.stderr
    assert db.read_bytes() == before


@pytest.mark.parametrize("command", [["run", "--run-id", "X"], ["resume", "R"], ["rerun", "R", "--from", "plan"]])
def test_a_lock_file_that_cannot_be_opened_is_bad_input(tmp_path: Path, good_db: Path, command: list[str]) -> None:
    # It was "error: StoreError: ...-lock: cannot open the run lock file", exit 1.
    db = tmp_path / "case.db"
    shutil.copy(good_db, db)
    (tmp_path / "case.db-lock").mkdir()
    proc = run_cli([*command, "--db", str(db)])
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc.stderr, f"{db}-lock: cannot open the run lock file: Is a directory")
    assert "StoreError" not in proc.stderr
    with Store.open(str(db), readonly=True) as s:
        assert s.get_run("X") is None and len(s.branches("R")) == 1, "nothing was written"
