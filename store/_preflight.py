"""Look before writing: inspect a database file without touching it.

``resume`` and ``rerun`` must refuse bad input (an unknown run, a file that
is not a database, a newer schema, a read-only file) with the file left
byte-for-byte as it was.  Opening for writing switches the journal mode
and migrates, both of which write; so those commands check here first,
through a read-only connection that sets no pragmas.  The queries only use
columns that exist since schema version 1, so an old file can be checked
before it is migrated.
"""

from __future__ import annotations

import json
import os
from typing import Any

import apsw
import attrs

from ._busy import retry_busy
from ._db import _check_file
from ._errors import NotADatabase, StoreError
from ._lineage import LINEAGE_CTE
from ._schema import check_version, foreign_problem, unversioned_problem, user_tables


class UnknownRun(StoreError):
    """No run with that id in the database."""


@attrs.frozen(kw_only=True, slots=True)
class RunPreview:
    """What :func:`preview_run` read of a run, without writing: the
    database's schema version, the run's stored pipeline, its current
    branch and every branch id (oldest first)."""

    run_id: str
    schema_version: int
    pipeline: dict[str, Any] = attrs.field(eq=False)
    current_branch_id: str | None
    branch_ids: tuple[str, ...]


def preview_run(path: str, run_id: str, *, for_writing: bool = True) -> RunPreview:
    """Check that ``path`` is a usable database holding ``run_id``, without
    writing anything.  Raises :class:`StoreError` naming the problem."""
    if path == ":memory:" or not os.path.exists(path):
        raise StoreError(f"{path}: no such database file")
    _check_file(path, readonly=not for_writing)
    try:
        conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    except apsw.Error as exc:
        raise StoreError(f"{path}: cannot open database: {exc}") from exc
    try:
        try:
            version = retry_busy(lambda: check_version(conn, path), what=path)
            if version < 1:
                raise NotADatabase(unversioned_problem(path, retry_busy(lambda: user_tables(conn), what=path)))
            foreign = retry_busy(lambda: foreign_problem(conn, path, version), what=path)
            if foreign is not None:
                raise NotADatabase(foreign)
            row = retry_busy(
                lambda: conn.execute(
                    "SELECT pipeline, current_branch_id FROM runs WHERE run_id = ?", (run_id,)
                ).fetchone(),
                what=path,
            )
            if row is None:
                raise UnknownRun(f"no run {run_id!r} in {path}")
            branches = retry_busy(
                lambda: conn.execute(
                    "SELECT branch_id FROM branches WHERE run_id = ? ORDER BY created_at, rowid",
                    (run_id,),
                ).fetchall(),
                what=path,
            )
            # What a branch sees is read for the one branch asked about
            # (see preview_lineage): read for every branch, each read
            # walking its whole chain, a run of 3,000 branches took 7 s.
        except apsw.NotADBError as exc:
            raise NotADatabase(f"{path}: not an SQLite database ({exc})") from exc
        except apsw.SQLError as exc:
            raise StoreError(f"{path}: not a Conclave database ({exc})") from exc
        except apsw.Error as exc:
            raise StoreError(f"{path}: cannot read database: {exc}") from exc
    finally:
        conn.close()
    try:
        pipeline = json.loads(row[0])
    except ValueError as exc:
        raise StoreError(f"{path}: run {run_id!r} has a corrupt stored pipeline") from exc
    return RunPreview(
        run_id=run_id,
        schema_version=version,
        pipeline=pipeline,
        current_branch_id=row[1],
        branch_ids=tuple(str(b[0]) for b in branches),
    )


def preview_lineage(path: str, run_id: str, branch_id: str) -> dict[str, str]:
    """``{stage: decision status}`` of what ``branch_id`` of ``run_id``
    sees (its own decisions and those it inherits), read without writing,
    from a database :func:`preview_run` accepted."""
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = retry_busy(
            lambda: conn.execute(
                LINEAGE_CTE
                + "SELECT d.stage, d.status FROM decisions d JOIN lineage l"
                " ON d.branch_id = l.branch_id AND d.stage = l.stage WHERE d.run_id = :run",
                {"run": run_id, "branch": branch_id},
            ).fetchall(),
            what=path,
        )
    except apsw.Error as exc:
        raise StoreError(f"{path}: cannot read database: {exc}") from exc
    finally:
        conn.close()
    return {str(stage): str(status) for stage, status in rows}
