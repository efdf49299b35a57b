"""A pipeline run whose provider needs a bearer token (acceptance 4).

The provider is issue 7's real :class:`OpenAIProvider` with a
:class:`TokenSource` that asks the :class:`AuthActor` through its inbox.
Its model API is serve-mock's backend behind a guard that accepts only
access tokens the Authlib test server issued and that are still valid
(401 otherwise, echoing the token as careless servers do).  The token lives
5.5 minutes and each call takes 40 s, so the run must refresh ahead of
expiry, and one token is revoked mid-run to exercise 401 -> forced refresh
-> one retry.  Everything is in-process on the autojump clock.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from actors import open_orchestrator
from actors._auth_login import device_login
from actors._auth_profiles import build_profile
from actors._mock_backend import MockBackend
from actors._mock_server import mock_transport
from actors._openai import OpenAIProvider
from actors._pipeline import default_pipeline
from actors._token_source import AuthActor, TokenManager, TokenSource
from actors._token_store import TokenStore
from messages import open_channel
from messages._auth_api import AuthEvent
from store import Store
from tests.auth_server import CLIENT_ID, DEVICE_PATH, TOKEN_PATH, FakeIdP, asgi_client

BASE = 1_800_000_000.0
CALL_SECONDS = 40.0


def wall() -> float:
    return BASE + trio.current_time()


class GuardedModelApi(httpx.AsyncBaseTransport):
    """The model API: a valid bearer token from the IdP, or 401."""

    def __init__(self, idp: FakeIdP, inner: httpx.AsyncBaseTransport) -> None:
        self.idp = idp
        self.inner = inner
        self.calls: list[tuple[float, int]] = []
        self.on_token = lambda token: None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        self.on_token(token)
        await trio.sleep(CALL_SECONDS)
        if not self.idp.access_token_valid(token):
            self.calls.append((trio.current_time(), 401))
            body = {"error": {"message": f"Incorrect API key provided: {token}.", "type": "invalid_request_error"}}
            return httpx.Response(401, json=body)
        self.calls.append((trio.current_time(), 200))
        return await self.inner.handle_async_request(request)


def openai_pipeline():  # every agent on the "openai" provider
    pipeline = default_pipeline()
    return pipeline.with_agents(
        {name: attrs.evolve(spec, provider="openai", model="mock-model") for name, spec in pipeline.agents.items()}
    )


async def login(idp: FakeIdP, client: httpx.AsyncClient, store: TokenStore, events: list[AuthEvent]) -> None:
    # The "openai" profile, pointed at the test server (profiles are overridable).
    profile = build_profile("openai", device_url=idp.base_url + DEVICE_PATH,
                            token_url=idp.base_url + TOKEN_PATH, client_id=CLIENT_ID, scope="model")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(idp.approve_first_code)
        await device_login(profile, client, store, clock=wall, on_event=events.append)


async def test_pipeline_gets_tokens_from_the_poller_and_survives_expiry(
    tmp_path: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    idp = FakeIdP(trio.current_time, token_expires_in=330)  # "needs refresh" after 30 s
    idp_client, _ = asgi_client(idp)
    store = TokenStore(tmp_path / "home")
    events: list[AuthEvent] = []
    await login(idp, idp_client, store, events)

    manager = TokenManager(store, idp_client, clock=wall, on_event=events.append)
    auth_outbox, auth_inbox = open_channel(16, name="auth")
    api = GuardedModelApi(idp, mock_transport(MockBackend(seed=3, disagreement_rate=0.0)))
    provider = OpenAIProvider(base_url="https://api.test/v1", token_source=TokenSource.from_inbox("openai", auth_outbox),
                              transport=api, stream=False, name="openai", wall_now=wall)
    revoked: list[str] = []

    def revoke_once(token: str) -> None:
        # Mid-run the server revokes a token just sent: the call gets a 401,
        # forces one refresh and retries once.
        if len(api.calls) >= 8 and not revoked and idp.access_token_valid(token):
            idp.revoke_access(token)
            revoked.append(token)

    api.on_token = revoke_once
    async with trio.open_nursery() as nursery:
        nursery.start_soon(AuthActor(manager).run, auth_inbox)
        async with open_orchestrator(store=str(tmp_path / "run.db"), provider={"openai": provider},
                                     pipeline=openai_pipeline(), seed=3) as orch:
            result = await orch.run("SPEC-AUTH", run_id="auth-run", goal="use the bearer token")
        nursery.cancel_scope.cancel()

    assert result.completed, result.halt_message
    assert len(result.stages) == 6
    assert trio.current_time() > 330 + 60, f"the run must outlive the first access token ({trio.current_time()})"
    statuses = [status for _, status in api.calls]
    assert len(revoked) == 1 and statuses.count(401) >= 1  # each holder of the revoked token: one 401
    assert statuses.count(200) >= 13  # every agent of every stage got through
    refreshes = [e for e in events if e.kind == "refreshed"]
    assert idp.refresh_count == len(refreshes) >= 2  # ahead of expiry, and after the 401
    stored = store.get("openai")
    assert stored is not None and stored.refresh_token is not None
    assert idp.valid_refresh_tokens() == {stored.refresh_token.reveal()}

    # No token text anywhere: logs, stdout/stderr, events, result, the run database.
    captured = capsys.readouterr()
    # Authlib is the test server, not Conclave: it logs what it issues.
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("authlib"))
    texts = [ours, captured.out, captured.err, repr(events), json.dumps(result.to_json()), repr(stored)]
    database = (tmp_path / "run.db").read_bytes()
    with Store.open(str(tmp_path / "run.db")) as db:
        texts += [repr(o) for o in db.outputs("auth-run")]
    for secret in idp.all_secrets():
        for text in texts:
            assert secret not in text
        assert secret.encode() not in database
    assert "openai: refreshed" in ours, "the refresh was logged (without the token)"


async def test_a_run_without_login_fails_fast_with_a_clear_error(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    idp = FakeIdP(trio.current_time)
    idp_client, _ = asgi_client(idp)
    manager = TokenManager(TokenStore(tmp_path / "home"), idp_client, clock=wall)
    api = GuardedModelApi(idp, mock_transport(MockBackend(seed=1)))
    provider = OpenAIProvider(base_url="https://api.test/v1", token_source=manager.source("openai"),
                              transport=api, stream=False, name="openai")
    async with open_orchestrator(store=str(tmp_path / "run.db"), provider={"openai": provider},
                                 pipeline=openai_pipeline(), seed=1) as orch:
        result = await orch.run("SPEC-NOAUTH", run_id="no-auth")
    assert not result.completed
    assert api.calls == []
    assert trio.current_time() < 1, "authentication failures are not retried with backoff"
    with Store.open(str(tmp_path / "run.db")) as db:
        errors = {o.error for o in db.outputs("no-auth")}
    assert errors and all(e and "not logged in to openai" in e and "conclave login openai" in e for e in errors)


async def test_a_wrong_api_key_halts_resumable_naming_the_cause(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    # It was decided durably as no_consensus ("only 0 agent(s) agree"),
    # naming no cause, and fixing the key could not resume the run.
    from actors import OpenAIProvider
    from actors._mock_backend import MockBackend
    from actors._mock_server import mock_transport

    backend = MockBackend(seed=1, disagreement_rate=0.0, required_key="sk-right-key-0000")
    path = str(tmp_path / "k.db")

    def provider(key: str) -> OpenAIProvider:
        return OpenAIProvider(base_url="https://api.test/v1", api_key=key, transport=mock_transport(backend),
                              stream=False, name="openai")

    async with open_orchestrator(store=path, provider={"openai": provider("sk-wrong-key-0000")},
                                 pipeline=openai_pipeline(), seed=1) as orch:
        halted = await orch.run("SPEC-KEY", run_id="key")
    assert (halted.status, halted.halt_reason) == ("halted", "agents_failed")
    assert "authentication" in (halted.halt_message or "") and "wrong-key" not in (halted.halt_message or "")
    asked = backend.ledger.requests
    async with open_orchestrator(store=path, provider={"openai": provider("sk-right-key-0000")},
                                 pipeline=openai_pipeline(), seed=1) as orch:
        plain = await orch.resume("key")  # without --retry-failed a halted stage stays as it was
        assert (plain.halt_reason, backend.ledger.requests) == ("agents_failed", asked)
        resumed = await orch.resume("key", retry_failed=True)
    assert resumed.completed
