"""Claims on runs: at most one orchestrator drives a run at a time.

Two ``conclave resume`` processes on one run would both call every agent the
run still needs (the store's unique constraints keep one output and one
decision each, but both calls are paid for), so a run is claimed for as
long as an orchestrator runs, resumes or reruns it, and a second claim is
refused with :class:`RunLocked` before anything is written.

Across processes a claim is an OS record lock (``fcntl.lockf``) on one byte
of a lock file beside the database (``<db>-lock``), at an offset derived
from the run id: the kernel drops it when the process dies, so a run killed
with SIGKILL can be resumed at once, with no stale lease to expire and no
wall clock involved.  POSIX record locks belong to the process, not to the
file descriptor (a second descriptor would be granted the same byte, and
closing any descriptor of the file drops them all), so this module keeps
one descriptor per lock file for the whole process and refuses a second
claim within the process itself.  A database in memory is private to its
connection: its claims are only checked within the process.  Without
``fcntl`` (Windows) claims are checked within the process only.

Offsets are 56 bits of SHA-256 of the run id, so two different runs of one
database share a byte with negligible probability (a collision would make
one wait for the other, never let two drive one run).
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from ._errors import StoreError

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_SUFFIX = "-lock"


class RunLocked(StoreError):
    """The run is being driven by another orchestrator (in this process or
    another); nothing was written."""


class LockFileError(StoreError):
    """The run lock file beside the database cannot be opened (a directory
    or an unwritable file in its place); nothing was written."""


class _LockFile:
    __slots__ = ("fd", "held")

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.held: set[str] = set()


_guard = threading.Lock()
_files: dict[str, _LockFile] = {}


def _offset(run_id: str) -> int:
    return int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:7], "big")


def lock_path(db_path: str) -> str | None:
    """The lock file of the database at ``db_path``; None for one in memory."""
    if db_path in ("", ":memory:"):
        return None
    return os.path.realpath(db_path) + LOCK_SUFFIX


@contextmanager
def claim_run(db_path: str, run_id: str, *, scope: object = None) -> Iterator[None]:
    """Hold ``run_id`` of the database at ``db_path`` for the block.

    Raises :class:`RunLocked` at once (never waits) if another holder has
    it.  ``scope`` tells databases in memory apart (pass the store: each
    is its own database).  Synchronous and quick: call it outside any
    database transaction; the claim is released in ``finally``, so a
    cancelled block releases it too."""
    path = lock_path(db_path)
    key = f":memory:{id(scope)}" if path is None else path
    _acquire(key, path, run_id, db_path)
    try:
        yield
    finally:
        _release(key, run_id)


def is_claimed(db_path: str, run_id: str) -> bool | None:
    """Whether some orchestrator holds ``run_id`` of the file database at
    ``db_path`` now; None if that cannot be known (a database in memory,
    or no ``fcntl``).  Creates nothing.  On 64-bit Linux it locks
    nothing (``F_GETLK``); elsewhere the probe takes a shared lock on the
    run's byte for an instant, so a claim made in that same instant is
    refused as if the run were held (retrying it succeeds)."""
    path = lock_path(db_path)
    if path is None or fcntl is None:
        return None
    with _guard:
        entry = _files.get(path)
        if entry is not None and run_id in entry.held:
            return True
        if entry is not None and entry.fd is not None:
            return _probe(entry.fd, run_id)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return False  # never claimed
        except OSError:
            return None
        try:
            return _probe(fd, run_id)
        finally:
            # This process holds no lock on the file (it has no entry), so
            # closing drops nothing but the probe's.
            os.close(fd)


# ``struct flock`` where its layout is known (64-bit Linux: short l_type,
# short l_whence, off_t l_start, off_t l_len, pid_t l_pid, padded to 32).
_FLOCK = "hhqqi4x" if sys.platform.startswith("linux") and struct.calcsize("P") == 8 else None


def _probe(fd: int, run_id: str) -> bool | None:
    assert fcntl is not None
    offset = _offset(run_id)
    if _FLOCK is not None:
        # F_GETLK asks without locking anything.  Taking a shared lock for
        # an instant, as below, made a claim in that instant fail: a resume
        # beside a dashboard polling `status` was refused as "being run".
        try:
            answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, offset, 1, 0))
        except OSError:
            return None
        return bool(struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK)
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, offset, os.SEEK_SET)
    except OSError as exc:
        return True if exc.errno in (errno.EACCES, errno.EAGAIN) else None
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset, os.SEEK_SET)
    return False


def _acquire(key: str, path: str | None, run_id: str, db_path: str) -> None:
    with _guard:
        entry = _files.get(key)
        if entry is not None and run_id in entry.held:
            raise _busy(run_id, db_path)
        if entry is None:
            fd = None
            if path is not None and fcntl is not None:
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
                except OSError as exc:
                    raise LockFileError(f"{path}: cannot open the run lock file: {exc.strerror}") from exc
            entry = _LockFile(fd)
        if entry.fd is not None and fcntl is not None:
            try:
                fcntl.lockf(entry.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _offset(run_id), os.SEEK_SET)
            except OSError as exc:
                if not entry.held:
                    os.close(entry.fd)
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    raise _busy(run_id, db_path) from None
                raise StoreError(f"{path}: cannot lock run {run_id!r}: {exc.strerror}") from exc
        entry.held.add(run_id)
        _files[key] = entry


def _busy(run_id: str, db_path: str) -> RunLocked:
    return RunLocked(
        f"run {run_id!r} in {db_path} is being run by another process or orchestrator; "
        "wait for it to finish (or stop it), then try again"
    )


def _release(key: str, run_id: str) -> None:
    with _guard:
        entry = _files[key]
        entry.held.discard(run_id)
        if entry.fd is None:
            if not entry.held:
                del _files[key]
            return
        if entry.held:
            assert fcntl is not None
            fcntl.lockf(entry.fd, fcntl.LOCK_UN, 1, _offset(run_id), os.SEEK_SET)
        else:
            os.close(entry.fd)  # drops the process's last lock on the file
            del _files[key]
