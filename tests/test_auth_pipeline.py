"""A pipeline run whose provider needs a bearer token (acceptance 4).

The model provider of issue 7 is not on main yet, so the provider here is a
``BaseProvider`` that does what a real one must: ask its
:class:`TokenSource` for a bearer token, call the model API (here the fake
IdP's protected ``/api/complete``, in-process, virtual time) with it, and on
a 401 force one refresh and retry once.  The token source talks to the
:class:`AuthActor` through its inbox, as the gateway will.  The answer's
content comes from the simulator so the run reaches consensus.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import trio

from actors import open_orchestrator
from actors._auth_login import device_login
from actors._auth_profiles import build_profile
from actors._provider import BaseProvider
from actors._simulator import Latency, SimulatedProvider
from actors._token_source import AuthActor, TokenManager, TokenSource
from actors._token_store import TokenStore
from messages import AuthenticationFailed, Completion, CompletionRequest, open_channel
from messages._auth_api import AuthEvent
from store import Store
from tests.auth_server import API_PATH, CLIENT_ID, DEVICE_PATH, TOKEN_PATH, FakeIdP, asgi_client

BASE = 1_800_000_000.0


def wall() -> float:
    return BASE + trio.current_time()


class BearerProvider(BaseProvider):
    """What an OAuth-backed model provider does with its token source."""

    name = "sim"

    def __init__(self, client: httpx.AsyncClient, source: TokenSource, api_url: str, sim: SimulatedProvider) -> None:
        self._client = client
        self._source = source
        self._api_url = api_url
        self._sim = sim
        self.unauthorized = 0
        self.on_token = lambda request, token: None

    async def complete(self, request: CompletionRequest) -> Completion:
        for attempt in (1, 2):
            token = await self._source.bearer(force_refresh=attempt == 2)
            self.on_token(request, token)
            response = await self._client.post(self._api_url, headers={"Authorization": f"Bearer {token}"})
            if response.status_code != 401:
                break
            self.unauthorized += 1
        else:
            raise AuthenticationFailed("the model API rejected a freshly refreshed token")
        response.raise_for_status()
        return await self._sim.complete(request)


async def test_pipeline_gets_tokens_from_the_poller_and_survives_expiry(
    tmp_path: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    # Access tokens live 5.5 minutes: "needs refresh" after 30 s.
    idp = FakeIdP(trio.current_time, token_expires_in=330)
    client, transport = asgi_client(idp)
    profile = build_profile("generic", device_url=idp.base_url + DEVICE_PATH,
                            token_url=idp.base_url + TOKEN_PATH, client_id=CLIENT_ID, scope="model")
    store = TokenStore(tmp_path / "home")
    events: list[AuthEvent] = []

    async def approve() -> None:
        while not idp.devices:
            await trio.sleep(1)
        idp.approve(next(iter(idp.devices.values()))["user_code"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(approve)
        await device_login(profile, client, store, clock=wall, on_event=events.append)

    manager = TokenManager(store, client, clock=wall, on_event=events.append)
    auth_outbox, auth_inbox = open_channel(16, name="auth")
    provider = BearerProvider(
        client, TokenSource.from_inbox("generic", auth_outbox), idp.base_url + API_PATH,
        SimulatedProvider(seed=3, disagreement_rate=0.0, latency=Latency(median=40.0, sigma=0.1)),
    )
    revoked: list[str] = []

    def revoke_once(request: CompletionRequest, token: str) -> None:
        # Mid-run the server revokes the token just handed out: the call
        # gets a 401, forces a refresh and retries once.
        if request.key.stage == "validate" and not revoked:
            idp.revoke_access(token)
            revoked.append(request.key.agent)

    provider.on_token = revoke_once
    async with trio.open_nursery() as nursery:
        nursery.start_soon(AuthActor(manager).run, auth_inbox)
        async with open_orchestrator(store=str(tmp_path / "run.db"), provider=provider, seed=3) as orch:
            result = await orch.run("SPEC-AUTH", run_id="auth-run", goal="use the bearer token")
        nursery.cancel_scope.cancel()

    assert result.completed, result.halt_message
    assert len(result.stages) == 6
    assert trio.current_time() > 330 + 60, f"the run must outlive the first access token ({trio.current_time()})"
    calls = [status for _, status in idp.api_calls]
    # The revoked token was rejected (once per agent holding it), each
    # rejected call refreshed and retried once, and the run went on.
    assert calls.count(401) == provider.unauthorized >= 1 and len(revoked) == 1
    assert calls.count(200) >= 6 * 2
    refreshes = [e for e in events if e.kind == "refreshed"]
    assert idp.refresh_count == len(refreshes) >= 2  # ahead of expiry, and after the 401
    stored = store.get("generic")
    assert stored is not None and stored.refresh_token is not None
    assert idp.valid_refresh_tokens() == {stored.refresh_token.reveal()}

    # No token text anywhere: logs, stdout/stderr, events, the run database.
    captured = capsys.readouterr()
    # Authlib is the test server, not Conclave: it logs what it issues.
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("authlib"))
    texts = [ours, captured.out, captured.err, repr(events), repr(result.to_json()), repr(stored)]
    database = (tmp_path / "run.db").read_bytes()
    for secret in idp.all_secrets():
        for text in texts:
            assert secret not in text
        assert secret.encode() not in database
    assert "generic: refreshed" in ours, "the refresh was logged (without the token)"


async def test_a_run_without_login_fails_fast_with_a_clear_error(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    idp = FakeIdP(trio.current_time)
    client, _ = asgi_client(idp)
    manager = TokenManager(TokenStore(tmp_path / "home"), client, clock=wall)
    sim = SimulatedProvider(seed=1, disagreement_rate=0.0)
    provider = BearerProvider(client, manager.source("generic"), idp.base_url + API_PATH, sim)
    async with open_orchestrator(store=str(tmp_path / "run.db"), provider=provider, seed=1) as orch:
        result = await orch.run("SPEC-NOAUTH", run_id="no-auth")
    assert not result.completed
    assert sim.calls == 0 and idp.api_calls == []
    assert trio.current_time() < 1, "authentication failures are not retried with backoff"
    with Store.open(str(tmp_path / "run.db")) as db:
        errors = {o.error for o in db.outputs("no-auth")}
    assert errors and all(e and "not logged in to generic" in e and "conclave login generic" in e for e in errors)
