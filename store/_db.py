"""Opening a database file safely.

Every check that can refuse a file runs *before* anything is written to it,
so a refused file is left byte-for-byte as it was.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Literal

import apsw

from ._busy import retry_busy
from ._errors import EmptyDatabase, NotADatabase, StoreError
from ._migrations import READ_AS_LATEST
from ._schema import SCHEMA_VERSION, check_version, foreign_problem, migrate, unversioned_problem, user_tables

# "full": every commit is on disk when acknowledged (the default).
# "normal": WAL's NORMAL - a commit can be lost in a power cut, never in a
# crash of the process.  "scratch": synchronous=OFF and an exclusive lock for
# the connection's life - for a throwaway file only one process ever opens
# (the soak's temporary database), where durability buys nothing and every
# transaction's locking and syncing is pure cost.
Durability = Literal["full", "normal", "scratch"]

_SQLITE_HEADER = b"SQLite format 3\x00"
# Short on purpose: SQLite's busy handler blocks the calling thread (the trio
# loop, for the store writer); longer waits happen in the writer's retry
# loop, which sleeps on trio's clock instead.
BUSY_TIMEOUT_MS = 250


def _check_file(path: str, readonly: bool) -> bool:
    """Return whether the file exists; raise StoreError if it can't be used."""
    if os.path.isdir(path):
        raise StoreError(f"{path}: is a directory, not a database file")
    if os.path.exists(path) and not os.path.isfile(path):
        # A FIFO would block the header read below for ever; a device
        # (/dev/null) would get a -journal file created beside it.
        raise StoreError(f"{path}: not a regular file (a pipe, socket or device), not a database file")
    if os.path.exists(path):
        try:
            with open(path, "rb") as fh:
                header = fh.read(len(_SQLITE_HEADER))
        except OSError as exc:
            raise StoreError(f"{path}: cannot read database file: {exc.strerror}") from exc
        if header and header != _SQLITE_HEADER:
            raise NotADatabase(f"{path}: not an SQLite database (unrecognised file header)")
        # Mode bits too: root passes os.access() on a file nobody may write.
        if not readonly and (
            not os.access(path, os.W_OK) or not os.stat(path).st_mode & 0o222
        ):
            raise StoreError(f"{path}: database file is read-only; cannot write to it")
        return True
    if readonly:
        raise StoreError(f"{path}: no such database file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise StoreError(f"{path}: cannot create database: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"{path}: cannot create database: directory {parent} is not writable")
    return False


def open_connection(
    path: str,
    *,
    readonly: bool = False,
    durability: Durability = "full",
    busy_timeout_ms: int = BUSY_TIMEOUT_MS,
) -> apsw.Connection:
    """Open ``path``, refuse what we cannot use, then set pragmas and migrate.

    Read-only connections never migrate: a file one version behind is read
    through views that present it as the latest (``READ_AS_LATEST``); an
    older one is refused with a hint.
    """
    if durability not in ("full", "normal", "scratch"):
        raise ValueError(f"durability must be 'full', 'normal' or 'scratch', got {durability!r}")
    if not isinstance(path, str):
        raise TypeError(f"the database path must be a str, got {path!r}")
    if isinstance(busy_timeout_ms, bool) or not isinstance(busy_timeout_ms, int) or not 0 <= busy_timeout_ms < 2**31:
        raise ValueError(f"busy_timeout_ms must be a whole number of ms in [0, 2**31), got {busy_timeout_ms!r}")
    if not path:
        # SQLite would open a private temporary file, deleted on close:
        # everything written would be lost without a word.
        raise StoreError("an empty database path: give a file name (or ':memory:' for a database in memory)")
    memory = path == ":memory:"
    existed = True if memory else _check_file(path, readonly)
    if readonly and not memory:
        try:
            return _open(path, readonly, durability, busy_timeout_ms, existed, memory, immutable=False)
        except StoreError as exc:
            # A WAL database in a directory we cannot write (an archive, a
            # shared run history): reading needs a -shm file beside it.
            # With no -wal content, the file alone is the whole database
            # and can be read as immutable; with some, that would show it
            # without its last commits.
            if not isinstance(exc.__cause__, (apsw.ReadOnlyError, apsw.CantOpenError)):
                raise
            unwritten = _wal_bytes(path)
            if unwritten:
                raise StoreError(
                    f"{path}: cannot read it: its directory {os.path.dirname(os.path.abspath(path))} is not "
                    f"writable, and its -wal file holds {unwritten} bytes not yet in the database; "
                    "copy the database with its -wal file to a writable directory"
                ) from exc
            return _open(path, readonly, durability, busy_timeout_ms, existed, memory, immutable=True)
    return _open(path, readonly, durability, busy_timeout_ms, existed, memory, immutable=False)


# apsw's statement cache puts a statement back in the next slot of a ring
# each time it is used, evicting that slot's statement: it keeps the last N
# *uses*, not the N statements most used.  At its default of 100, a soak
# (ten uses per agent turn) evicted each run's once-a-run statements (its
# row, its branch, its end, its drop, the check's reads) before the next
# run came to them, and compiled them again: 1,200 compiles in a 300-run
# soak.  apsw's largest, 512, keeps them (52); it holds each distinct
# statement once, and the store has a few dozen.
STATEMENT_CACHE = 512


def _wal_bytes(path: str) -> int:
    try:
        return os.path.getsize(path + "-wal")
    except OSError:
        return 0


def _open(
    path: str, readonly: bool, durability: Durability, busy_timeout_ms: int, existed: bool, memory: bool, *, immutable: bool
) -> apsw.Connection:
    flags = (
        apsw.SQLITE_OPEN_READONLY
        if readonly
        else apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
    )
    name = path
    if immutable:
        flags |= apsw.SQLITE_OPEN_URI
        name = f"file:{urllib.parse.quote(os.path.abspath(path))}?immutable=1"
    try:
        conn = apsw.Connection(name, flags=flags, statementcachesize=STATEMENT_CACHE)
    except apsw.CantOpenError as exc:
        raise StoreError(f"{path}: cannot open database: {exc}") from exc
    try:
        conn.setbusytimeout(busy_timeout_ms)
        try:
            version = retry_busy(lambda: check_version(conn, path), what=path)
        except apsw.NotADBError as exc:
            raise NotADatabase(f"{path}: not an SQLite database ({exc})") from exc
        if version == 0:
            tables = retry_busy(lambda: user_tables(conn), what=path)
            if tables:
                # Read again: a first run creating this file at the same
                # time commits its tables with the version.
                version = retry_busy(lambda: check_version(conn, path), what=path)
            if version == 0 and (readonly or tables):
                # Before any pragma: WAL mode and a schema version would be
                # written into another application's database.
                raise (NotADatabase if tables else EmptyDatabase)(unversioned_problem(path, tables))
        foreign = retry_busy(lambda: foreign_problem(conn, path, version), what=path)
        if foreign is not None:
            raise NotADatabase(foreign)
        if readonly:
            if version != SCHEMA_VERSION and version in READ_AS_LATEST:
                conn.execute(READ_AS_LATEST[version])
            elif version != SCHEMA_VERSION:
                raise StoreError(
                    f"{path}: database schema version {version} needs migrating to "
                    f"{SCHEMA_VERSION}; open it once with a command that writes"
                )
            conn.execute("PRAGMA query_only = ON")
        else:
            # Another process may be creating or migrating the same file:
            # busy here is retried with backoff, not reported.
            if durability == "scratch":
                conn.execute("PRAGMA locking_mode = EXCLUSIVE").fetchall()
            retry_busy(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchall(), what=path)
            conn.execute(f"PRAGMA synchronous = {'OFF' if durability == 'scratch' else durability.upper()}")
            retry_busy(lambda: migrate(conn, path), what=path)
        conn.execute("PRAGMA foreign_keys = ON")
    except apsw.Error as exc:
        conn.close()
        if not existed and not memory:
            _remove_new_file(path)
        raise StoreError(f"{path}: cannot use database: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _remove_new_file(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        try:
            os.remove(path + suffix)
        except OSError:
            pass
