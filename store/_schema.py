"""Schema and forward-only migrations, keyed on ``PRAGMA user_version``.

Every timestamp column holds integer **milliseconds since the Unix epoch,
UTC**; nothing else in the schema is a time.  Migration N is applied in one
transaction together with setting ``user_version = N``, so a crash leaves
the database at N-1 or N, never in between.
"""

from __future__ import annotations

import apsw

from ._errors import SchemaTooNew, StoreError
from ._migrations import LATER

_V1 = """
CREATE TABLE runs (
    run_id                  TEXT PRIMARY KEY,
    spec_id                 TEXT NOT NULL,
    goal                    TEXT NOT NULL DEFAULT '',
    seed                    INTEGER,
    pipeline                TEXT NOT NULL,
    status                  TEXT NOT NULL
        CHECK (status IN ('running', 'completed', 'halted', 'failed', 'interrupted')),
    halt_reason             TEXT,
    current_branch_id       TEXT,
    input_tokens            INTEGER NOT NULL DEFAULT 0,
    cached_input_tokens     INTEGER NOT NULL DEFAULT 0,
    output_tokens           INTEGER NOT NULL DEFAULT 0,
    reasoning_output_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens            INTEGER NOT NULL DEFAULT 0,
    digest                  TEXT,
    created_at              INTEGER NOT NULL,
    updated_at              INTEGER NOT NULL
) STRICT;

CREATE TABLE branches (
    branch_id        TEXT PRIMARY KEY,
    run_id           TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    parent_branch_id TEXT REFERENCES branches (branch_id),
    fork_stage       TEXT,
    created_at       INTEGER NOT NULL
) STRICT;
CREATE INDEX branches_run ON branches (run_id);

CREATE TABLE agent_outputs (
    id                      INTEGER PRIMARY KEY,
    run_id                  TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    branch_id               TEXT NOT NULL REFERENCES branches (branch_id),
    stage                   TEXT NOT NULL,
    agent                   TEXT NOT NULL,
    attempt                 INTEGER NOT NULL CHECK (attempt >= 1),
    status                  TEXT NOT NULL CHECK (status IN ('accepted', 'failed')),
    content                 TEXT NOT NULL,
    format                  TEXT NOT NULL CHECK (format IN ('json', 'text')),
    input_tokens            INTEGER,
    cached_input_tokens     INTEGER,
    output_tokens           INTEGER,
    reasoning_output_tokens INTEGER,
    total_tokens            INTEGER,
    usage_known             INTEGER NOT NULL CHECK (usage_known IN (0, 1)),
    model                   TEXT NOT NULL,
    provider                TEXT NOT NULL,
    cost_usd                TEXT,
    error                   TEXT,
    created_at              INTEGER NOT NULL,
    UNIQUE (run_id, branch_id, stage, agent, attempt)
) STRICT;
-- One accepted output per (run, branch, stage, agent): the key consensus reads.
CREATE UNIQUE INDEX agent_outputs_accepted
    ON agent_outputs (run_id, branch_id, stage, agent) WHERE status = 'accepted';

CREATE TABLE decisions (
    run_id     TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    branch_id  TEXT NOT NULL REFERENCES branches (branch_id),
    stage      TEXT NOT NULL,
    seq        INTEGER NOT NULL CHECK (seq >= 1),
    status     TEXT NOT NULL CHECK (status IN ('ok', 'conflict', 'degraded', 'no_consensus')),
    verdict    TEXT NOT NULL,
    decided_at INTEGER NOT NULL,
    PRIMARY KEY (run_id, branch_id, stage),
    UNIQUE (run_id, seq)
) STRICT;

CREATE TABLE events (
    id        INTEGER PRIMARY KEY,
    run_id    TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    branch_id TEXT NOT NULL,
    kind      TEXT NOT NULL,
    stage     TEXT,
    agent     TEXT,
    attempt   INTEGER,
    detail    TEXT NOT NULL DEFAULT '{}',
    at        INTEGER NOT NULL
) STRICT;
CREATE INDEX events_run ON events (run_id, id);
"""

# V1 is frozen: it is the walking skeleton's schema, and databases written
# by it are migrated forward by the steps in ``_migrations``.
V1 = _V1
MIGRATIONS: tuple[str, ...] = (_V1, *LATER)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: apsw.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0]) if row else 0


def user_tables(conn: apsw.Connection) -> list[str]:
    """The file's own tables.  At schema version 0 there are none in a file
    Conclave created (its first migration creates the tables and sets the
    version in one transaction): any there belong to another application."""
    return [
        str(row[0])
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite^_%' ESCAPE '^'"
            " ORDER BY name"
        )
    ]


def unversioned_problem(path: str, tables: list[str]) -> str:
    """What to say about a file at schema version 0 with these tables."""
    if tables:
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        return (
            f"{path}: an SQLite database of something else (tables: {shown}), not a Conclave "
            "database; give Conclave a file of its own"
        )
    return f"{path}: an empty database, with no Conclave runs in it yet"


def foreign_problem(conn: apsw.Connection, path: str, version: int) -> str | None:
    """What to say about a file that claims schema ``version`` >= 1 but
    lacks Conclave's ``runs`` table (another application sets
    ``user_version`` too), or None.  Before any pragma: WAL mode would be
    written into that application's file."""
    if version < 1:
        return None
    tables = user_tables(conn)
    if "runs" in tables:
        return None
    if tables:
        return unversioned_problem(path, tables)
    return f"{path}: schema version {version} but none of Conclave's tables; not a Conclave database"


def check_version(conn: apsw.Connection, path: str) -> int:
    """Return the file's schema version; refuse one newer than this code."""
    version = schema_version(conn)
    if version < 0:
        # No Conclave ever sets one; read as an index, it ran the last
        # migration on a newer file ("duplicate column name").
        raise StoreError(f"{path}: schema version {version} is not one Conclave writes; not a Conclave database")
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"{path}: database schema version {version} is newer than this Conclave "
            f"understands ({SCHEMA_VERSION}); upgrade Conclave to open it"
        )
    return version


def migrate(conn: apsw.Connection, path: str, *, target: int = SCHEMA_VERSION) -> int:
    """Bring the schema up to ``target`` (default :data:`SCHEMA_VERSION`):
    every step the file lacks, in one transaction, so a crash leaves it at
    the version it had (a new file killed while it was created was left at
    version 1, which reading commands refuse).  Returns the number of
    migrations applied."""
    version = check_version(conn, path)
    if version >= target:
        return 0
    # IMMEDIATE: take the write lock first, then re-read the version, so
    # two processes opening an old file at once migrate it only once.
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = check_version(conn, path)
        for step in range(version, target):
            conn.execute(MIGRATIONS[step])
        if version < target:
            conn.execute(f"PRAGMA user_version = {target}")
        conn.execute("COMMIT")
    except BaseException:
        # A Ctrl-C raised just after COMMIT returned (SIGINT during its
        # fsync) found no transaction: "cannot rollback" replaced the
        # KeyboardInterrupt, and the CLI exited 2, not 130.
        if not conn.getautocommit():
            conn.execute("ROLLBACK")
        raise
    return max(target - version, 0)
