"""Edges of the token store and the device flow that mutation testing found
unpinned.

What these tests pin:

* the token file is refused when its *group* alone may read or write it
  (not only "others"), and a pre-existing loose token directory is made
  private (0700) when tokens are written into it;
* a failed write leaves no temporary copy of the tokens behind;
* a token that cannot be refreshed is expired at its expiry instant;
* an older token file without ``accept_json`` still asks for JSON;
* logging in to one provider keeps the other providers' tokens;
* waiting for the cross-process lock reports the wait once and gives up
  after ``lock_timeout``, not later;
* RFC 8628: a device authorization without a usable ``interval`` is polled
  every 5 s (§3.2); a ``slow_down`` inside a 429 still adds 5 s for good
  (§3.5); backing off after a failure never polls faster than the interval,
  and keeps doubling while the server stays unavailable;
  a device code with ``expires_in`` 0 is refused;
* RFC 6749 refresh: ``temporarily_unavailable`` is retryable, and a profile
  that does not want JSON is not sent ``Accept: application/json``;
* store migrations: a version-1 run that was rerun keeps its outcome
  (status, halt reason, digest) on its current branch only, whether the
  file is migrated or read in place as the latest schema;
* the read-only preflight of ``rerun``: what a branch sees is its own
  lineage's decisions only (never another branch's decision of the same
  stage), and branches are listed oldest first.

Token values used here are fakes; none is printed by an assertion message.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import apsw
import httpx
import pytest
import trio

from actors._auth_flow import DeviceFlow, refresh_grant
from actors._token_store import FileBackend, TokenEntry, TokenStatus, TokenStore
from messages._auth_api import AuthProtocolError, RefreshUnavailable, Secret, TokenStoreError
from messages import Decision, DecisionStatus, PersistBranch, PersistDecision, PersistRun, StageKey
from store import Store, preview_lineage, preview_run
from tests.auth_server import DEVICE_PATH, TOKEN_PATH
from tests.test_auth_flow import _profile, gaps
from tests.test_token_store import entry, put

DEVICE = {"device_code": "dc", "user_code": "ABCD-EFGH", "verification_uri": "https://idp.test/device"}
GRANT = {"access_token": "at-granted", "token_type": "Bearer", "expires_in": 3600}


def oauth_error(code: str, status: int = 400) -> httpx.Response:
    return httpx.Response(status, json={"error": code})


async def _login(device: dict[str, Any], token_answers: list[httpx.Response], approved_at: float) -> list[float]:
    """A device login against an in-process server: the token endpoint gives
    ``token_answers`` in turn, then ``authorization_pending`` until
    ``approved_at``, then a grant.  Returns the token polls' times."""
    polls: list[float] = []
    answers = list(token_answers)

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == DEVICE_PATH:
            return httpx.Response(200, json=device)
        polls.append(trio.current_time())
        if answers:
            return answers.pop(0)
        if trio.current_time() < approved_at:
            return oauth_error("authorization_pending")
        return httpx.Response(200, json=GRANT)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        flow = DeviceFlow(_profile(), client)
        grant = await flow.poll(await flow.start())
    assert grant.access_token == Secret("at-granted")
    return polls


# -- the token file --------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o620, 0o660], ids=oct)
async def test_a_token_file_open_to_its_group_alone_is_refused(tmp_path: Path, mode: int) -> None:
    """Checking only the "others" bits let a group member read (or swap) the tokens."""
    store = TokenStore(tmp_path / "h")
    await put(store, entry())
    os.chmod(tmp_path / "h" / "tokens.json", mode)
    with pytest.raises(TokenStoreError, match="group or others") as info:
        store.load()
    assert "at-one" not in str(info.value) and "rt-one" not in str(info.value)


async def test_a_loose_token_directory_of_ours_is_made_private_when_written(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)  # whatever the umask
    await put(TokenStore(home), entry())
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(home / "tokens.json").st_mode) == 0o600


def test_a_write_that_fails_leaves_no_copy_of_the_tokens_behind(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    (home / "tokens.json").mkdir()  # os.replace onto a directory fails
    with pytest.raises(OSError):
        FileBackend(home).write('{"secret": "at-leftover"}')
    assert sorted(p.name for p in home.iterdir()) == ["tokens.json"]


def test_a_token_that_cannot_be_refreshed_is_expired_at_its_expiry_instant() -> None:
    now = 1_000_000.0
    assert entry(expires_at=now, refresh=None).status(now) is TokenStatus.EXPIRED
    assert entry(expires_at=now + 0.5, refresh=None).status(now) is TokenStatus.VALID
    # Refreshable: due exactly when the margin begins.
    assert entry(expires_at=now + 300, token_url="https://t").status(now) is TokenStatus.NEEDS_REFRESH


def test_an_entry_stored_without_accept_json_still_asks_for_json() -> None:
    """Entries written before ``accept_json`` existed lack the key."""
    stored = entry().to_json()
    del stored["accept_json"]
    assert TokenEntry.from_json("generic", stored).accept_json is True


async def test_logging_in_to_one_provider_keeps_the_others(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "h")
    await put(store, entry("github", access="at-gh"))
    await put(store, entry("google", access="at-go"))
    await put(store, entry("github", access="at-gh2"))
    tokens = store.load()
    assert sorted(tokens) == ["github", "google"]
    assert tokens["google"].access_token == Secret("at-go")
    assert tokens["github"].access_token == Secret("at-gh2")


async def test_a_lock_wait_is_reported_once_and_gives_up_after_its_timeout(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    waits: list[float] = []
    holder = TokenStore(tmp_path)
    waiter = TokenStore(tmp_path, lock_timeout=5.0, on_lock_wait=lambda: waits.append(trio.current_time()))
    async with holder.locked():
        start = trio.current_time()
        with pytest.raises(TokenStoreError, match="stayed locked for 5 s"):
            async with waiter.locked():
                pytest.fail("took a lock that is held")
        assert 5.0 <= trio.current_time() - start < 5.5
    assert waits == [start]


# -- RFC 8628 polling --------------------------------------------------------


@pytest.mark.parametrize("interval", [None, 0, -3, "soon"], ids=["absent", "zero", "negative", "text"])
async def test_without_a_usable_interval_polls_come_every_five_seconds(
    autojump_clock: trio.abc.Clock, interval: object
) -> None:
    """RFC 8628 §3.2: "If no value is provided, clients MUST use 5 as the default"."""
    device: dict[str, Any] = {**DEVICE, "expires_in": 600}
    if interval is not None:
        device["interval"] = interval
    assert await _login(device, [], approved_at=12) == [5, 10, 15]


async def test_slow_down_in_a_429_still_slows_every_later_poll(autojump_clock: trio.abc.Clock) -> None:
    """§3.5: slow_down adds 5 s for this and every later poll, whatever the
    status it comes with; taken as a transient failure, the polls went back
    to every 5 s after one longer wait."""
    polls = await _login({**DEVICE, "expires_in": 600, "interval": 5}, [oauth_error("slow_down", 429)], approved_at=32)
    assert gaps(polls) == [5, 10, 10, 10]


async def test_backing_off_never_polls_faster_than_a_long_interval(autojump_clock: trio.abc.Clock) -> None:
    """The backoff cap (60 s) is below a 90 s interval: one 503 must not make
    the next poll come after 60 s, sooner than the server allows."""
    down = httpx.Response(503, text="down")
    polls = await _login({**DEVICE, "expires_in": 1800, "interval": 90}, [down], approved_at=200)
    assert gaps(polls) == [90, 90, 90]


async def test_a_server_temporarily_unavailable_again_and_again_is_backed_off_further(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A 400 ``temporarily_unavailable`` in a row doubles the wait each time
    (5, 10, 20, 40), as 5xx and network errors do, then a pending answer
    brings the interval back."""
    answers = [oauth_error("authorization_pending")] + [oauth_error("temporarily_unavailable") for _ in range(3)]
    polls = await _login({**DEVICE, "expires_in": 600, "interval": 5}, answers, approved_at=82)
    assert gaps(polls) == [5, 5, 10, 20, 40, 5]


async def test_a_device_code_that_lives_zero_seconds_is_refused() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={**DEVICE, "expires_in": 0, "interval": 5})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(AuthProtocolError, match="no valid expires_in"):
            await DeviceFlow(_profile(), client).start()


# -- refresh -----------------------------------------------------------------


async def _refresh(answer: httpx.Response, *, accept_json: bool = True) -> tuple[list[httpx.Request], Any]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        try:
            result: Any = await refresh_grant(
                client, provider="generic", token_url="https://idp.test" + TOKEN_PATH, client_id="cid",
                refresh_token=Secret("rt-old"), accept_json=accept_json,
            )
        except Exception as exc:
            result = exc
    return seen, result


async def test_temporarily_unavailable_on_refresh_is_retryable() -> None:
    """A 400 ``temporarily_unavailable`` (RFC 6749 §5.2) may pass: the old
    token is kept and used while it lasts, not a hard protocol error."""
    _, outcome = await _refresh(oauth_error("temporarily_unavailable"))
    assert isinstance(outcome, RefreshUnavailable)
    assert "rt-old" not in str(outcome)


async def test_a_profile_that_does_not_want_json_is_not_sent_accept_json() -> None:
    form_reply = httpx.Response(
        200, text="access_token=at-new&token_type=bearer", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    seen, grant = await _refresh(form_reply, accept_json=False)
    assert seen[0].headers.get("accept") != "application/json"
    assert grant.access_token == Secret("at-new")
    seen, _ = await _refresh(form_reply, accept_json=True)
    assert seen[0].headers.get("accept") == "application/json"


# -- migrations ----------------------------------------------------------------

V1_FIXTURE = Path(__file__).parent / "fixtures" / "v1_interrupted.db"


def test_a_rerun_v1_run_keeps_its_outcome_on_its_current_branch_only(tmp_path: Path) -> None:
    """Version 1 kept one outcome per run; version 2 keeps one per branch.
    The run's outcome is the current branch's: the parent it was rerun from
    has none on record, rather than the child's halt and digest."""
    old = tmp_path / "old.db"
    shutil.copy(V1_FIXTURE, old)
    conn = apsw.Connection(str(old))
    try:
        [(stored,)] = conn.execute("SELECT branch_id FROM branches WHERE run_id = 'V1RUN'").fetchall()
        root = str(stored)
        child = root + "-rerun"
        conn.execute(
            "INSERT INTO branches (branch_id, run_id, parent_branch_id, fork_stage, created_at)"
            " VALUES (?, 'V1RUN', ?, 'tasks', 1795967485999)",
            (child, root),
        )
        conn.execute(
            "UPDATE runs SET current_branch_id = ?, status = 'halted', halt_reason = 'conflict', digest = ?"
            " WHERE run_id = 'V1RUN'",
            (child, "d" * 64),
        )
    finally:
        conn.close()
    migrated = tmp_path / "migrated.db"
    shutil.copy(old, migrated)
    expected = [(root, None, None, None), (child, "halted", "conflict", "d" * 64)]
    with Store.open(str(old), readonly=True) as store:  # read in place, as the latest schema
        assert [(b.branch_id, b.status, b.halt_reason, b.digest) for b in store.branches("V1RUN")] == expected
    with Store.open(str(migrated)) as store:
        assert [(b.branch_id, b.status, b.halt_reason, b.digest) for b in store.branches("V1RUN")] == expected
        assert [b.options for b in store.branches("V1RUN")] == [{}, {}]


# -- preflight ---------------------------------------------------------------


def test_the_rerun_preflight_sees_a_branchs_own_lineage_only(tmp_path: Path) -> None:
    """``rerun --from STAGE`` refuses (before writing) when an earlier stage
    of the branch did not advance, reading that from :func:`preview_lineage`.
    Another branch's decision of the same stage must not stand in for it:
    root approved ``c`` and ``d``, the rerun ``kid`` ended ``c`` in conflict
    and never reached ``d``."""
    db = str(tmp_path / "p.db")
    pipeline = json.dumps({"stages": [{"name": n} for n in "abcd"]})
    with Store.open(db) as s:
        assert s.apply([PersistRun(run_id="r", branch_id="root", spec_id="S", goal="", seed=0, pipeline=pipeline)])[0].ok
        assert s.apply([PersistBranch(run_id="r", branch_id="kid", parent_branch_id="root", fork_stage="c")])[0].ok
        decided: list[tuple[str, str, DecisionStatus]] = [("root", st, "ok") for st in "abcd"]
        decided.append(("kid", "c", "conflict"))
        writes = [
            PersistDecision(decision=Decision(key=StageKey(run_id="r", branch_id=b, stage=st), seq=i, status=status, verdict={}))
            for i, (b, st, status) in enumerate(decided, 1)
        ]
        assert all(a.ok for a in s.apply(writes))
    assert preview_lineage(db, "r", "kid") == {"a": "ok", "b": "ok", "c": "conflict"}
    assert preview_lineage(db, "r", "root") == {"a": "ok", "b": "ok", "c": "ok", "d": "ok"}
    preview = preview_run(db, "r")
    assert preview.branch_ids == ("root", "kid") and preview.current_branch_id == "kid"
