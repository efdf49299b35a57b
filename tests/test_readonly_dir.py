"""Reading a database kept in a directory the reader cannot write (an
archive, a shared run history, a read-only mount).

A WAL database is read through a -shm file beside it, which such a reader
cannot create: every read command failed with "attempt to write a readonly
database".  When no -wal content is waiting, the file alone is the whole
database and is read as immutable; when some is, reading the file alone
would silently miss the last commits, so it is refused, saying why.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from messages import PersistRun
from store import Store, StoreError

NOBODY = 65534


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path, whose parents only their owner may enter.
    path = Path(tempfile.mkdtemp(prefix="conclave-ro-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        path.chmod(0o755)
        shutil.rmtree(path)


def as_a_reader_who_cannot_write(directory: Path, read: Callable[[], str]) -> str:
    """``read()`` with ``directory`` not writable to its caller: as user
    nobody in a forked child when we are root (root writes anywhere), else
    with the directory made read-only.  Returns what it returned, or
    'StoreError: <message>'."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            return _outcome(read)
        finally:
            directory.chmod(0o755)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(w, _outcome(read).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(pid, 0)
    return said


def _outcome(read: Callable[[], str]) -> str:
    try:
        return read()
    except StoreError as exc:
        return f"StoreError: {exc}"


def make_db(directory: Path, *, leave_wal: bool) -> str:
    path = str(directory / "runs.db")
    store = Store.open(path)
    store.apply([PersistRun(run_id="r1", branch_id="b1", spec_id="S", goal="g", seed=1, pipeline="{}")])
    if leave_wal:
        # Frames left in the -wal, as a writer that died leaves its last
        # commits (these were merged already; the reader cannot know).
        os.link(path + "-wal", str(directory / "kept-wal"))
        store.close()
        os.replace(str(directory / "kept-wal"), path + "-wal")
    else:
        store.close()
    for name in os.listdir(directory):
        os.chmod(directory / name, 0o644)
    return path


def test_a_database_in_a_directory_the_reader_cannot_write_is_read(shared_dir: Path) -> None:
    path = make_db(shared_dir, leave_wal=False)

    def read() -> str:
        with Store.open(path, readonly=True) as store:
            run = store.get_run("r1")
            return run.run_id if run is not None else "missing"

    assert as_a_reader_who_cannot_write(shared_dir, read) == "r1"
    assert sorted(os.listdir(shared_dir)) == ["runs.db"], "nothing was left beside it"


def test_unmerged_wal_content_in_such_a_directory_is_refused_not_missed(shared_dir: Path) -> None:
    path = make_db(shared_dir, leave_wal=True)
    assert os.path.getsize(path + "-wal") > 0 and not os.path.exists(path + "-shm")

    def read() -> str:
        with Store.open(path, readonly=True) as store:
            return str(store.get_run("r1"))

    said = as_a_reader_who_cannot_write(shared_dir, read)
    assert said.startswith(f"StoreError: {path}: cannot read it: its directory {shared_dir} is not writable")
    assert "copy the database with its -wal file to a writable directory" in said
