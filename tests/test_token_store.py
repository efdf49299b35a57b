"""The token file: private, atomic, refused when unsafe, and safe across
processes (acceptance 3)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from actors._token_store import TokenEntry, TokenStatus, TokenStore, default_home
from tests.auth_server import CLIENT_ID, TOKEN_PATH, FakeIdP, serve_in_thread
from messages._auth_api import Secret, TokenStoreError

ROOT = Path(__file__).resolve().parents[1]


def entry(provider: str = "generic", access: str = "at-one", refresh: str | None = "rt-one",
          expires_at: float | None = 2e9, token_url: str | None = None) -> TokenEntry:
    return TokenEntry(
        provider=provider,
        access_token=Secret(access),
        refresh_token=Secret(refresh) if refresh else None,
        expires_at=expires_at,
        scope="read",
        stored_at=1e9,
        token_url=token_url,
        client_id=CLIENT_ID,
    )


async def put(store: TokenStore, e: TokenEntry) -> None:
    async with store.locked() as tokens:
        tokens.put(e)


async def test_file_is_0600_dir_0700_and_versioned(tmp_path: Path) -> None:
    home = tmp_path / "conclave"
    store = TokenStore(home)
    await put(store, entry())
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(home / "tokens.json").st_mode) == 0o600
    document = json.loads((home / "tokens.json").read_text())
    assert document["version"] == 1
    saved = document["tokens"]["generic"]
    assert {"access_token", "refresh_token", "expires_at", "scope", "stored_at"} <= set(saved)
    assert store.get("generic") == entry()
    assert [p.name for p in home.iterdir() if p.name.endswith(".tmp")] == []


async def test_mode_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = TokenStore(tmp_path / "h")
        await put(store, entry())
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "h" / "tokens.json").st_mode) == 0o600


async def test_symlinked_file_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "h"
    store = TokenStore(home)
    await put(store, entry())
    real = tmp_path / "elsewhere.json"
    os.replace(home / "tokens.json", real)
    os.symlink(real, home / "tokens.json")
    with pytest.raises(TokenStoreError, match="symlink") as info:
        store.load()
    assert info.value.hint
    assert "at-one" not in str(info.value)


async def test_group_readable_file_is_refused_with_a_hint(tmp_path: Path) -> None:
    home = tmp_path / "h"
    store = TokenStore(home)
    await put(store, entry())
    os.chmod(home / "tokens.json", 0o644)
    with pytest.raises(TokenStoreError, match="group or others") as info:
        store.get("generic")
    assert "chmod 600" in str(info.value)
    # ...and it is not silently overwritten either.
    with pytest.raises(TokenStoreError):
        await put(store, entry(access="at-two"))


async def test_newer_format_and_garbage_are_refused(tmp_path: Path) -> None:
    home = tmp_path / "h"
    store = TokenStore(home)
    await put(store, entry())
    path = home / "tokens.json"
    path.write_text(json.dumps({"version": 99, "tokens": {}}))
    with pytest.raises(TokenStoreError, match="version 99"):
        store.load()
    path.write_text("{not json")
    with pytest.raises(TokenStoreError, match="not valid JSON"):
        store.load()
    # Without a version it is no file of ours: "upgrade Conclave" pointed
    # the wrong way.
    for document in ({"github": 5}, {"version": True, "tokens": {}}, {"version": 0, "tokens": {}}):
        path.write_text(json.dumps(document))
        with pytest.raises(TokenStoreError, match="unknown layout") as caught:
            store.load()
        assert "upgrade" not in str(caught.value)


def _with_expiry(document: str, value: str) -> bytes:
    return document.replace('"expires_at": 2000000000.0', f'"expires_at": {value}').encode()


@pytest.mark.parametrize(
    "damage",
    [
        lambda doc: b"\xff\xfe{",  # UnicodeDecodeError
        lambda doc: _with_expiry(doc, "NaN"),  # ValueError: Invalid value NaN
        lambda doc: _with_expiry(doc, "Infinity"),  # OverflowError
        lambda doc: _with_expiry(doc, "1e300"),  # OverflowError when shown
        lambda doc: b"[" * 100_000,  # RecursionError
    ],
    ids=["not-utf8", "nan", "infinity", "huge", "deep"],
)
async def test_a_damaged_file_is_a_token_store_error_not_a_crash(tmp_path: Path, damage: Any) -> None:
    """Each of these escaped as a raw Python error from 'auth status'; the
    others already said the file is damaged and how to recover."""
    home = tmp_path / "h"
    store = TokenStore(home)
    await put(store, entry())
    path = home / "tokens.json"
    document = path.read_text()
    assert '"expires_at": 2000000000.0' in document
    path.write_bytes(damage(document))
    with pytest.raises(TokenStoreError) as caught:
        store.load()
    assert "conclave log" in str(caught.value)  # it says how to recover


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys, trio
    from actors import _token_store
    from actors._token_store import TokenEntry, TokenStore
    from messages._auth_api import Secret

    def crash(src, dst):
        os._exit(9)   # the process dies after writing+fsync, before the rename

    _token_store.os.replace = crash
    store = TokenStore(sys.argv[1])
    new = TokenEntry(provider="generic", access_token=Secret("at-NEW"), refresh_token=Secret("rt-NEW"),
                     expires_at=2e9, scope="read", stored_at=1e9)

    async def main():
        async with store.locked() as tokens:
            tokens.put(new)

    trio.run(main)
""")


async def test_crash_between_write_and_replace_leaves_the_previous_file(tmp_path: Path) -> None:
    home = tmp_path / "h"
    store = TokenStore(home)
    await put(store, entry())
    before = (home / "tokens.json").read_bytes()
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(home)], cwd=ROOT, capture_output=True, timeout=60)
    assert proc.returncode == 9, proc.stderr.decode()
    assert (home / "tokens.json").read_bytes() == before
    leftovers = [p for p in home.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the crash should have happened after the temporary file was written"
    assert b"at-NEW" in leftovers[0].read_bytes()
    assert store.get("generic") == entry()
    # The next write works and leaves a good file.
    await put(store, entry(access="at-two"))
    assert store.get("generic").access_token == Secret("at-two")  # type: ignore[union-attr]


def test_status_thresholds() -> None:
    now = 1_000_000.0
    assert entry(expires_at=now + 301).status(now) is TokenStatus.VALID
    assert entry(expires_at=now + 299, token_url="https://t").status(now) is TokenStatus.NEEDS_REFRESH
    # Not refreshable: valid until it expires (there is nothing to do ahead of time), then expired.
    assert entry(expires_at=now + 299, refresh=None, token_url="https://t").status(now) is TokenStatus.VALID
    assert entry(expires_at=now - 1, refresh=None, token_url="https://t").status(now) is TokenStatus.EXPIRED
    # Nowhere to send the refresh token: 'needs refresh' promised a refresh that every call then failed.
    assert entry(expires_at=now - 1).status(now) is TokenStatus.EXPIRED
    assert entry(expires_at=None, refresh=None).status(now) is TokenStatus.VALID
    assert [s.symbol for s in TokenStatus] == ["✓", "⚡", "✗", "·"]


def test_reprs_hide_tokens() -> None:
    e = entry(access="at-VISIBLE?", refresh="rt-VISIBLE?")
    assert "VISIBLE" not in repr(e) and "VISIBLE" not in str(e) and "VISIBLE" not in f"{e.access_token}"
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(e.access_token)


def test_default_home_is_explicit_or_the_platform_config_dir(tmp_path: Path) -> None:
    assert default_home({"CONCLAVE_HOME": str(tmp_path)}) == tmp_path
    assert default_home({"XDG_CONFIG_HOME": "/x"}, platform="linux") == Path("/x/conclave")
    assert default_home({}, platform="linux") == Path.home() / ".config" / "conclave"
    assert default_home({}, platform="darwin") == Path.home() / "Library" / "Application Support" / "conclave"


async def test_lock_is_released_when_cancelled_while_waiting(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    store = TokenStore(tmp_path / "h")
    async with store.locked():
        with trio.move_on_after(5) as scope:
            async with store.locked():  # same process, another fd: flock blocks
                pytest.fail("got a lock that is held")
        assert scope.cancelled_caught
    async with store.locked() as tokens:  # and nothing was left held
        tokens.put(entry())


REFRESH_SCRIPT = textwrap.dedent("""
    import os, sys, httpx, trio
    from actors._token_source import TokenManager
    from actors._token_store import TokenStore

    def waiting():
        print("lock-wait", flush=True)

    async def main():
        store = TokenStore(sys.argv[1], on_lock_wait=waiting)
        async with httpx.AsyncClient(timeout=30) as client:
            manager = TokenManager(store, client)
            print("ready", flush=True)
            token = await manager.bearer("generic")
            print("token " + token.fingerprint() + " refreshes " + str(manager.refresh_count), flush=True)

    trio.run(main)
""")


def test_two_processes_refreshing_at_once_end_with_one_valid_refresh_token(tmp_path: Path) -> None:
    idp = FakeIdP(time.monotonic)
    with serve_in_thread(idp) as base:
        # Log in for real to get a genuine refresh token from the server.
        with httpx_client() as client:
            device = client.post(base + "/oauth/device", data={"client_id": CLIENT_ID, "scope": "read"}).json()
            idp.approve(device["user_code"])
            idp.devices[device["device_code"]]["interval"] = 0
            grant = client.post(base + TOKEN_PATH, data={
                "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
                "device_code": device["device_code"], "client_id": CLIENT_ID}).json()
        home = tmp_path / "h"
        # Stored as nearly expired, so both processes want to refresh.
        trio.run(put, TokenStore(home), entry(access=grant["access_token"], refresh=grant["refresh_token"],
                                              expires_at=time.time() + 10, token_url=base + TOKEN_PATH))
        # The first refresh is held at the server until the other process
        # is seen waiting for the lock: without the lock both would reach
        # the server, and the second would burn the rotated refresh token.
        contended = threading.Event()
        idp.refresh_gate = contended
        procs = [subprocess.Popen([sys.executable, "-c", REFRESH_SCRIPT, str(home)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outputs: list[list[str]] = [[], []]

        def read(i: int) -> None:
            assert procs[i].stdout is not None
            for line in procs[i].stdout:
                outputs[i].append(line.strip())
                if line.strip() == "lock-wait":
                    contended.set()

        readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(2)]
        for t in readers:
            t.start()
        for p in procs:
            assert p.wait(timeout=60) == 0, p.stderr.read() if p.stderr else ""
        for t in readers:
            t.join(timeout=10)
        for p in procs:
            for pipe in (p.stdout, p.stderr):
                if pipe is not None:
                    pipe.close()
    assert not idp.gate_timed_out, "the second process never waited for the lock"
    assert idp.refresh_count == 1
    tokens = [line for out in outputs for line in out if line.startswith("token ")]
    assert len(tokens) == 2 and tokens[0].split()[1] == tokens[1].split()[1]
    assert sorted(line.split()[-1] for line in tokens) == ["0", "1"]
    stored = TokenStore(home).get("generic")
    assert stored is not None and stored.refresh_token is not None
    assert idp.valid_refresh_tokens() == {stored.refresh_token.reveal()}
    assert idp.access_token_valid(stored.access_token.reveal())


def httpx_client():  # sync client for test set-up only
    import httpx

    return httpx.Client(timeout=30)


def fake_keyring(monkeypatch: pytest.MonkeyPatch, priority: float = 5) -> dict[tuple[str, str], str]:
    import types

    data: dict[tuple[str, str], str] = {}
    backend = type("FakeBackend", (), {"priority": priority})()
    module = types.ModuleType("keyring")
    module.get_keyring = lambda: backend  # type: ignore[attr-defined]
    module.get_password = lambda service, user: data.get((service, user))  # type: ignore[attr-defined]
    module.set_password = lambda service, user, secret: data.__setitem__((service, user), secret)  # type: ignore[attr-defined]
    errors = types.ModuleType("keyring.errors")
    errors.KeyringError = type("KeyringError", (Exception,), {})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "keyring", module)
    monkeypatch.setitem(sys.modules, "keyring.errors", errors)
    return data


async def test_keyring_is_used_when_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = fake_keyring(monkeypatch)
    store = TokenStore(tmp_path / "h", backend="auto")
    assert "keyring" in repr(store)
    await put(store, entry())
    assert not (tmp_path / "h" / "tokens.json").exists()
    assert json.loads(data[("conclave", "device-tokens")])["tokens"]["generic"]["refresh_token"] == "rt-one"
    assert store.get("generic") == entry()


async def test_file_is_used_without_a_usable_keyring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_keyring(monkeypatch, priority=0)  # like keyring's "fail" backend on headless Linux
    assert "file" in repr(TokenStore(tmp_path, backend="auto"))
    monkeypatch.setitem(sys.modules, "keyring", None)  # not installed
    assert "file" in repr(TokenStore(tmp_path, backend="auto"))
    with pytest.raises(TokenStoreError, match="no usable OS keyring"):
        TokenStore(tmp_path, backend="keyring")


def test_the_margin_is_at_most_a_tenth_of_the_tokens_lifetime() -> None:
    stored = 1e9
    keycloak = attrs.evolve(entry(expires_at=stored + 300, token_url="https://t"), stored_at=stored)
    assert keycloak.status(stored + 269) is TokenStatus.VALID
    assert keycloak.status(stored + 271) is TokenStatus.NEEDS_REFRESH
    # Long-lived tokens keep the full 5 minutes.
    hour = attrs.evolve(entry(expires_at=stored + 3600, token_url="https://t"), stored_at=stored)
    assert hour.status(stored + 3299) is TokenStatus.VALID
    assert hour.status(stored + 3301) is TokenStatus.NEEDS_REFRESH
