"""`conclave events` reads the log a page at a time and prints --json as it
goes: the whole log as a list held about 5 KB per event."""

from __future__ import annotations

import json

import pytest

from store import Store

from .conftest import run_cli


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A run with retries and faults, rerun once (two branches)."""
    db = str(tmp_path_factory.mktemp("ev") / "e.db")
    done = run_cli(["run", "--db", db, "--run-id", "E", "--seed", "4", "--faults", "disconnect:3,429:1,timeout:2"])
    assert done.returncode == 0, done.stderr
    again = run_cli(["rerun", "E", "--from", "audit", "--db", db])
    assert again.returncode == 0, again.stderr
    return db


def _whole(db: str, kinds: set[str], branch: str | None) -> dict[str, object]:
    """What `events --json` printed when it built the whole object."""
    with Store.open(db, readonly=True) as store:
        every = [e for e in store.events("E") if branch is None or e.branch_id == branch]
    counts: dict[str, int] = {}
    for e in every:
        counts[e.kind] = counts.get(e.kind, 0) + 1
    listed = [e for e in every if not kinds or e.kind in kinds]
    return {
        "run_id": "E",
        "branch_id": branch,
        "kinds": counts,
        "events": [
            {"id": e.id, "branch_id": e.branch_id, "kind": e.kind, "stage": e.stage, "agent": e.agent,
             "attempt": e.attempt, "detail": e.detail, "at_ms": e.at}
            for e in listed
        ],
    }


@pytest.mark.parametrize(
    ("kinds", "on_branch"), [((), False), (("fault", "retry"), False), (("budget_warning",), False), ((), True)]
)
def test_streamed_json_is_the_whole_object_byte_for_byte(logged: str, kinds: tuple[str, ...], on_branch: bool) -> None:
    branch = None
    argv = ["events", "E", "--db", logged, "--json"]
    for kind in kinds:
        argv += ["--kind", kind]
    if on_branch:
        with Store.open(logged, readonly=True) as store:
            run = store.get_run("E")
            assert run is not None
            branch = run.current_branch_id
        argv += ["--branch", str(branch)]
    done = run_cli(argv)
    assert done.returncode == 0, done.stderr
    expected = _whole(logged, set(kinds), branch)
    assert done.stdout == json.dumps(expected, indent=2) + "\n"
    assert expected["events"] or kinds == ("budget_warning",)


def test_events_are_read_in_pages_in_id_order(logged: str) -> None:
    with Store.open(logged, readonly=True) as store:
        every = store.events("E")
        assert [e.id for e in store.iter_events("E", page=3)] == [e.id for e in every]
        counts, last = store.event_counts("E")
        assert sum(counts.values()) == len(every) and last == every[-1].id
        # Bounded by the id read with the counts: a run still writing adds
        # none the counts did not see.
        assert [e.id for e in store.iter_events("E", up_to=every[5].id, page=2)] == [e.id for e in every[:6]]
        faults = [e.id for e in every if e.kind == "fault"]
        assert [e.id for e in store.iter_events("E", kinds=["fault"], page=2)] == faults


def test_a_page_size_must_be_a_count(logged: str) -> None:
    with Store.open(logged, readonly=True) as store:
        for page in (0, -1, True):
            with pytest.raises(ValueError, match="page must be a whole number >= 1"):
                list(store.iter_events("E", page=page))
