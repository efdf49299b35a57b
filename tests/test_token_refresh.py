"""Refresh against the real Authlib server under the autojump clock:
ahead of expiry, single-flight, rotation persisted first, invalid_grant
drops the tokens (acceptance 1, refresh part); the auth actor and
TokenSource."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from actors._auth_login import device_login, logout
from actors._auth_profiles import build_profile
from actors._token_source import OUTAGE_REUSE, AuthActor, AuthService, TokenManager, TokenSource
from actors._token_store import TokenStatus, TokenStore
from tests.auth_server import CLIENT_ID, DEVICE_PATH, TOKEN_PATH, FakeIdP, LateReply, asgi_client
from messages import ActorStopped, AuthenticationFailed, ProviderError, is_retryable, open_channel
from actors._auth_flow import refresh_grant
from messages._auth_api import AuthError, AuthEvent, CredentialsUnavailable, LoginRequired, RefreshUnavailable, Secret

BASE = 1_800_000_000.0


def wall() -> float:
    return BASE + trio.current_time()


async def logged_in(tmp_path: Path, **idp_kwargs: object):
    idp = FakeIdP(trio.current_time, **idp_kwargs)  # type: ignore[arg-type]
    client, transport = asgi_client(idp)
    profile = build_profile("generic", device_url=idp.base_url + DEVICE_PATH,
                            token_url=idp.base_url + TOKEN_PATH, client_id=CLIENT_ID, scope="read")
    store = TokenStore(tmp_path / "home")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(idp.approve_first_code)
        entry = await device_login(profile, client, store, clock=wall)
    events: list[AuthEvent] = []
    manager = TokenManager(store, client, clock=wall, on_event=events.append)
    return idp, client, transport, store, manager, entry, events


async def test_login_stores_a_valid_token(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, store, manager, entry, events = await logged_in(tmp_path)
    assert manager.status("generic") is TokenStatus.VALID
    assert entry.expires_at == pytest.approx(wall() + 3600 - 5, abs=10)
    token = await manager.bearer("generic")
    assert token == entry.access_token and manager.refresh_count == 0


async def test_refresh_ahead_of_expiry_with_rotation_then_reuse_of_the_old_token_drops_everything(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    assert first.expires_at is not None and first.refresh_token is not None
    await trio.sleep_until(first.expires_at - BASE - 299)  # inside the 5-minute margin
    assert manager.status("generic") is TokenStatus.NEEDS_REFRESH
    assert idp.access_token_valid(first.access_token.reveal())  # not expired yet: refreshed *ahead*

    token = await manager.bearer("generic")
    second = store.get("generic")
    assert second is not None and second.refresh_token is not None
    assert token == second.access_token != first.access_token
    assert second.refresh_token != first.refresh_token  # rotated, and persisted
    assert idp.valid_refresh_tokens() == {second.refresh_token.reveal()}
    assert idp.access_token_valid(token.reveal())
    assert manager.status("generic") is TokenStatus.VALID
    assert [e.kind for e in events] == ["refreshed"]

    # Someone restores the old (rotated-away) refresh token: the server
    # says invalid_grant, the tokens are dropped, a new login is needed.
    async with store.locked() as tokens:
        tokens.put(first)
    with pytest.raises(LoginRequired, match="invalid_grant") as info:
        await manager.bearer("generic", force_refresh=True)
    assert "conclave login generic" in str(info.value)
    assert isinstance(info.value, AuthenticationFailed) and not is_retryable(info.value)
    assert store.get("generic") is None
    assert manager.status("generic") is TokenStatus.NOT_AUTHENTICATED
    assert events[-1].kind == "dropped"


async def test_refresh_is_single_flight(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    assert first.expires_at is not None
    await trio.sleep_until(first.expires_at - BASE - 60)
    results: list[Secret] = []

    async def ask(force: bool) -> None:
        results.append(await manager.bearer("generic", force_refresh=force))

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(ask, i % 2 == 0)
    assert idp.refresh_count == 1 and manager.refresh_count == 1
    assert len(set(r.reveal() for r in results)) == 1
    # Forced refreshes that pile up after a 401 also collapse into one.
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(ask, True)
    assert idp.refresh_count == 2


async def test_new_access_token_is_not_used_unless_the_rotation_was_persisted(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)

    def disk_full(text: str) -> None:
        raise OSError(28, "No space left on device")

    store.backend.write = disk_full  # type: ignore[method-assign]
    with pytest.raises(CredentialsUnavailable, match="No space left") as info:
        await manager.bearer("generic", force_refresh=True)
    assert isinstance(info.value, AuthenticationFailed)
    assert idp.refresh_count == 1
    # The only token handed out so far is the old one.
    assert store.get("generic") == first


async def test_transient_refresh_failure_keeps_the_tokens(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    assert first.expires_at is not None
    n = transport.token_requests
    transport.faults = {n + 1: httpx.Response(503, text="busy"), n + 2: httpx.ConnectError("down")}
    await trio.sleep_until(first.expires_at - BASE - 100)
    # Ahead of expiry, a failed refresh still hands out the working token.
    assert await manager.bearer("generic") == first.access_token
    # Forced (after a 401), there is nothing to fall back on: retryable error.
    # At once, it is the same outage: no new request.
    with pytest.raises(RefreshUnavailable) as info:
        await manager.bearer("generic", force_refresh=True)
    assert is_retryable(info.value) and transport.token_requests == n + 1
    await trio.sleep(OUTAGE_REUSE)
    with pytest.raises(RefreshUnavailable):
        await manager.bearer("generic", force_refresh=True)
    assert store.get("generic") == first
    assert [e.kind for e in events] == ["refresh_failed", "refresh_failed"]
    # And the next attempt succeeds.
    await trio.sleep(OUTAGE_REUSE)
    assert await manager.bearer("generic") != first.access_token


async def test_without_refresh_token_expiry_needs_a_new_login(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    idp = FakeIdP(trio.current_time)
    idp.clients[CLIENT_ID].check_grant_type = lambda grant_type: grant_type != "refresh_token"  # type: ignore[method-assign]
    client, _ = asgi_client(idp)
    profile = build_profile("generic", device_url=idp.base_url + DEVICE_PATH,
                            token_url=idp.base_url + TOKEN_PATH, client_id=CLIENT_ID)
    store = TokenStore(tmp_path)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(idp.approve_first_code)
        entry = await device_login(profile, client, store, clock=wall)
    assert entry.refresh_token is None
    manager = TokenManager(store, client, clock=wall)
    await trio.sleep(3600 - 200)
    assert manager.status("generic") is TokenStatus.VALID  # as usable as it says, for 200 s
    assert await manager.bearer("generic") == entry.access_token
    await trio.sleep(300)
    assert manager.status("generic") is TokenStatus.EXPIRED
    with pytest.raises(LoginRequired, match="cannot be refreshed"):
        await manager.bearer("generic")


async def test_not_logged_in_and_logout(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    with pytest.raises(LoginRequired, match="not logged in to github"):
        await manager.bearer("github")
    assert await logout(store, "generic") is True
    assert await logout(store, "generic") is False
    with pytest.raises(LoginRequired):
        await manager.bearer("generic")


async def test_auth_actor_serves_get_token_and_token_source(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    outbox, inbox = open_channel(8, name="auth")
    actor = AuthActor(manager)
    subscription = actor.subscribe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor.run, inbox)
        source = TokenSource.from_inbox("generic", outbox)
        assert await source.bearer() == first.access_token.reveal()
        fresh = await source.bearer(force_refresh=True)
        assert fresh != first.access_token.reveal() and idp.access_token_valid(fresh)
        event = subscription.receive_nowait()
        assert (event.provider, event.kind) == ("generic", "refreshed") and fresh not in repr(event)
        with pytest.raises(LoginRequired):
            await TokenSource.from_inbox("github", outbox).bearer()
        assert repr(source) == "<TokenSource generic>"
        nursery.cancel_scope.cancel()
    # Once the actor is gone, asking fails loudly instead of hanging.
    with pytest.raises(ActorStopped):
        await source.bearer()
    with pytest.raises(trio.EndOfChannel):  # subscribers learn that the actor stopped
        subscription.receive_nowait()


async def test_direct_token_source(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    source = manager.source("generic")
    assert await source.bearer() == first.access_token.reveal()


async def test_a_late_forced_refresh_with_a_stale_token_takes_the_new_one(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    a, b = manager.source("generic"), manager.source("generic")
    token = await a.bearer()
    assert await b.bearer() == token
    idp.revoke_access(token)  # both callers get a 401, one after the other
    fresh = await a.bearer(force_refresh=True)
    assert await b.bearer(force_refresh=True) == fresh
    assert idp.refresh_count == 1
    # A 401 on the new token is a new problem: refresh again.
    assert await b.bearer(force_refresh=True) != fresh
    assert idp.refresh_count == 2


async def test_every_bearer_failure_is_a_provider_error(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    n = transport.token_requests
    transport.faults = {n + 1: httpx.Response(401, json={"error": "invalid_client"})}
    with pytest.raises(CredentialsUnavailable, match="invalid_client") as info:
        await manager.bearer("generic", force_refresh=True)
    assert isinstance(info.value, AuthenticationFailed) and store.get("generic") == first
    (tmp_path / "home" / "tokens.json").chmod(0o644)
    with pytest.raises(CredentialsUnavailable, match="chmod 600"):
        await manager.bearer("generic")


async def test_cancelling_during_a_refresh_does_not_lose_the_rotated_token(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    transport.faults = {transport.token_requests + 1: LateReply(10)}  # rotated at once, reply late
    start = trio.current_time()
    with trio.move_on_after(5):
        await manager.bearer("generic", force_refresh=True)
    assert trio.current_time() - start == pytest.approx(10)  # the cancel waited for the reply
    stored = store.get("generic")
    assert stored is not None and stored.refresh_token is not None
    assert stored.refresh_token != first.refresh_token
    assert idp.valid_refresh_tokens() == {stored.refresh_token.reveal()}
    assert await manager.bearer("generic") == stored.access_token


async def test_a_refresh_that_never_answers_times_out_retryably(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    transport.faults = {transport.token_requests + 1: "hang"}
    start = trio.current_time()
    with pytest.raises(RefreshUnavailable, match="longer than 60 s"):
        await manager.bearer("generic", force_refresh=True)
    assert trio.current_time() - start == pytest.approx(60)
    assert store.get("generic") == first


@pytest.mark.parametrize("lifetime", [300, 120])
async def test_a_short_lived_token_is_used_for_most_of_its_life(
    tmp_path: Path, autojump_clock: trio.abc.Clock, lifetime: int
) -> None:
    """Keycloak issues 300 s tokens by default: under the full 5-minute
    margin such a token was never valid, and every call refreshed it."""
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path, token_expires_in=lifetime)
    start = trio.current_time()
    tokens = []
    for _ in range(60):  # a call a second for a minute
        tokens.append(await manager.bearer("generic"))
        await trio.sleep(1)
    assert idp.refresh_count == 0 and set(tokens) == {first.access_token}
    # Refreshed once, ahead of expiry (within a tenth of its life), then
    # the new token is used just as long.
    await trio.sleep_until(start + lifetime * 0.95)
    second = await manager.bearer("generic")
    assert second != first.access_token and idp.access_token_valid(first.access_token.reveal())
    assert idp.refresh_count == 1
    for _ in range(10):
        assert await manager.bearer("generic") == second
        await trio.sleep(lifetime * 0.05)
    assert idp.refresh_count == 1 and manager.status("generic") is TokenStatus.VALID


async def test_a_failed_refresh_is_shared_by_everyone_waiting_for_it(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Each waiter used to refresh again in turn once the lock was free: 50
    callers made 50 requests to a server answering 500."""
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    assert first.expires_at is not None
    n = transport.token_requests
    transport.faults = {n + i: httpx.Response(500, text="down") for i in range(1, 60)}
    await trio.sleep_until(first.expires_at - BASE + 1)  # expired: nothing to fall back on
    outcomes: list[object] = []

    async def ask() -> None:
        try:
            outcomes.append(await manager.bearer("generic"))
        except RefreshUnavailable as error:
            outcomes.append(type(error))

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(ask)
    assert transport.token_requests - n == 1 and manager.refresh_count == 1
    assert outcomes == [RefreshUnavailable] * 50
    assert [e.kind for e in events] == ["refresh_failed"]
    assert store.get("generic") == first
    # A caller that just missed the attempt shares it too ...
    with pytest.raises(RefreshUnavailable):
        await manager.bearer("generic")
    assert transport.token_requests - n == 1
    # ... but a second later the outage may be over: the next caller tries again, and succeeds.
    transport.faults = {}
    await trio.sleep(OUTAGE_REUSE)
    assert idp.access_token_valid((await manager.bearer("generic")).reveal())


async def test_waiters_of_a_hanging_refresh_ahead_of_expiry_keep_the_old_token_after_one_timeout(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """With a refresh that never answers, the tenth caller waited ten 60 s
    timeouts (10 minutes) for the token it already had."""
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    assert first.expires_at is not None
    n = transport.token_requests
    transport.faults = {n + i: "hang" for i in range(1, 20)}
    await trio.sleep_until(first.expires_at - BASE - 200)  # inside the margin, 200 s left
    start = trio.current_time()
    sources = [manager.source("generic") for _ in range(10)]
    done: list[tuple[float, str]] = []
    failed: list[float] = []

    async def ask(source: TokenSource) -> None:
        token = await source.bearer()
        done.append((trio.current_time() - start, token))

    async def after_a_401(source: TokenSource) -> None:
        with pytest.raises(RefreshUnavailable):
            await source.bearer(force_refresh=True)
        failed.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        for source in sources:
            nursery.start_soon(ask, source)
        nursery.start_soon(after_a_401, sources[0])
    assert done == [(60.0, first.access_token.reveal())] * 10
    assert failed == [60.0]  # the rejected token is no fallback
    assert transport.token_requests - n == 1 and store.get("generic") == first


async def test_a_deeply_nested_refresh_answer_is_a_typed_error(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    deep = httpx.Response(400, text="[" * 100_000, headers={"content-type": "application/json"})
    transport.faults = {transport.token_requests + 1: deep}
    with pytest.raises(CredentialsUnavailable, match="not a valid token response"):
        await manager.bearer("generic", force_refresh=True)
    assert store.get("generic") == first


@pytest.mark.parametrize(
    "answer",
    [httpx.Response(503, json={"error": "server_error"}), httpx.Response(429, json={"error": "rate_limited"}),
     httpx.Response(500, json={"error": "invalid_grant"})],
)
async def test_a_5xx_or_429_naming_an_error_fails_a_refresh_retryably(
    tmp_path: Path, autojump_clock: trio.abc.Clock, answer: httpx.Response
) -> None:
    """These were final: CredentialsUnavailable, never retried (or, for a
    500 invalid_grant, the tokens dropped), though the same 503 with an
    HTML body was retried and the still-valid token kept."""
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    assert first.expires_at is not None
    n = transport.token_requests
    transport.faults = {n + 1: answer, n + 2: answer}
    await trio.sleep_until(first.expires_at - BASE - 100)
    assert await manager.bearer("generic") == first.access_token  # ahead of expiry: the old one still works
    await trio.sleep(OUTAGE_REUSE)
    with pytest.raises(RefreshUnavailable) as info:
        await manager.bearer("generic", force_refresh=True)
    assert is_retryable(info.value) and store.get("generic") == first
    await trio.sleep(OUTAGE_REUSE)
    fresh = await manager.bearer("generic")  # the server is back
    assert fresh != first.access_token and idp.access_token_valid(fresh.reveal())


async def test_secrets_a_server_echoes_on_refresh_are_masked(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    """"bad refresh_token RT-SECRET-123 for client CS-SECRET" reached the CLI
    and the run database as sent."""
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    assert first.refresh_token is not None
    secrets = [first.refresh_token.reveal(), first.access_token.reveal()]
    echoed = f"bad refresh_token {secrets[0]}, replacing {secrets[1]}"
    transport.faults = {transport.token_requests + 1: httpx.Response(400, json={
        "error": "invalid_client", "error_description": echoed})}
    with pytest.raises(CredentialsUnavailable) as info:
        await manager.bearer("generic", force_refresh=True)
    shown = [str(info.value), *(e.detail for e in events)]
    assert not any(secret in text for secret in secrets for text in shown)
    assert "bad refresh_token [REDACTED], replacing [REDACTED]" in str(info.value)

    def echo(request: httpx.Request) -> httpx.Response:
        form = dict(httpx.QueryParams(request.content.decode()))
        return httpx.Response(400, json={"error": "invalid_client", "error_description": f"client {form['client_secret']}"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(echo)) as echoing:
        with pytest.raises(AuthError) as direct:
            await refresh_grant(echoing, provider="generic", token_url="https://idp.test/token", client_id=CLIENT_ID,
                                refresh_token=Secret("RT-SECRET-123"), client_secret=Secret("CS-SECRET-123"))
    masked = "CS-SECRET-123" not in str(direct.value)  # a bool: a failure must not print it
    assert masked
    assert str(direct.value).endswith("invalid_client: client [REDACTED]")


async def test_requests_through_the_auth_actor_share_a_failed_refresh(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    assert first.expires_at is not None
    n = transport.token_requests
    transport.faults = {n + i: httpx.Response(500, text="down") for i in range(1, 60)}  # answered at once
    await trio.sleep_until(first.expires_at - BASE + 1)
    service = AuthService(manager, ["generic"])
    failed: list[bool] = []

    async def ask() -> None:
        with pytest.raises(RefreshUnavailable):
            await service.sources["generic"].bearer()
        failed.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.run)
        async with trio.open_nursery() as callers:
            for _ in range(50):
                callers.start_soon(ask)
        service.close()
    assert len(failed) == 50 and transport.token_requests - n == 1


async def _fail_together(manager: TokenManager, callers: int) -> list[AuthError]:
    """Ask for the token from ``callers`` tasks at once; the errors raised."""
    failures: list[AuthError] = []

    async def ask() -> None:
        try:
            await manager.bearer("generic")
        except AuthError as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(ask)
    return failures


@pytest.mark.parametrize("error", [["weird"], {"code": "x"}])
async def test_an_error_that_is_not_a_string_is_one_shared_protocol_error(
    tmp_path: Path, autojump_clock: trio.abc.Clock, error: object
) -> None:
    """A 400 whose "error" is a list or an object raised TypeError
    (unhashable), which killed the auth actor - and each waiter then
    refreshed again in turn (10 callers, 10 requests)."""
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    n = transport.token_requests
    transport.faults = {n + i: httpx.Response(400, json={"error": error}) for i in range(1, 20)}
    await trio.sleep_until(first.expires_at - BASE + 1)  # expired: every caller needs the refresh
    service = AuthService(manager, ["generic"])
    failures = await _fail_together(manager, 10)
    assert len(failures) == 10 and transport.token_requests - n == 1
    assert all("refreshing the generic token failed" in str(f) for f in failures)
    assert len({id(f) for f in failures}) == 10  # each its own copy, its own traceback
    # Through the auth actor: the caller gets the typed failure, and the
    # actor lives on to answer the next request.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.run)
        for _ in range(2):
            with pytest.raises(ProviderError, match="refreshing the generic token failed"):
                await service.sources["generic"].bearer()
        service.close()


async def test_an_unforeseen_refresh_failure_is_typed_and_shared(
    tmp_path: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Left without an outcome (as a cancelled owner's flight is), each
    # waiter refreshed again in turn, and the raw error reached the provider.
    idp, client, transport, store, manager, first, events = await logged_in(tmp_path)
    calls = 0

    async def broken(*args: object) -> None:
        nonlocal calls
        calls += 1
        await trio.sleep(1)
        raise RuntimeError("a bug")

    monkeypatch.setattr(manager, "_refresh", broken)
    await trio.sleep_until(first.expires_at - BASE + 1)
    failures = await _fail_together(manager, 5)
    assert calls == 1 and len(failures) == 5
    assert {str(f) for f in failures} == {"refreshing the generic token failed: RuntimeError"}
