"""Store durability settings: what each one sets, and "scratch" keeping
other connections out of a throwaway database."""

from __future__ import annotations

from pathlib import Path

import apsw
import pytest

from store import Store


@pytest.mark.parametrize(("durability", "synchronous"), [("full", 2), ("normal", 1), ("scratch", 0)])
def test_each_durability_sets_its_sync_level(tmp_path: Path, durability: str, synchronous: int) -> None:
    with Store.open(str(tmp_path / "a.db"), durability=durability) as store:  # type: ignore[arg-type]
        conn = store._conn
        assert conn.execute("PRAGMA synchronous").fetchall()[0][0] == synchronous
        assert conn.execute("PRAGMA journal_mode").fetchall()[0][0] == "wal"
        expected_lock = "exclusive" if durability == "scratch" else "normal"
        assert conn.execute("PRAGMA locking_mode").fetchall()[0][0] == expected_lock


def test_a_scratch_database_is_closed_to_other_connections(tmp_path: Path) -> None:
    path = str(tmp_path / "scratch.db")
    with Store.open(path, durability="scratch"):
        other = apsw.Connection(path)
        other.setbusytimeout(0)
        with pytest.raises(apsw.BusyError):
            other.execute("SELECT count(*) FROM runs").fetchall()
        other.close()
    # Once closed, the file is an ordinary database again.
    with Store.open(path) as store:
        assert store._conn.execute("SELECT count(*) FROM runs").fetchall() == [(0,)]


def test_an_unknown_durability_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'sometimes'"):
        Store.open(str(tmp_path / "a.db"), durability="sometimes")  # type: ignore[arg-type]
    assert not (tmp_path / "a.db").exists()
