"""The device flow against a real Authlib RFC 8628 server, in-process,
under the autojump clock (acceptance 1 and 5)."""

from __future__ import annotations

from pathlib import Path

import attrs
import httpx
import pytest
import trio

from actors._auth_flow import DeviceFlow
from actors._auth_login import device_login
from actors._auth_profiles import AuthProfile, build_profile, discover
from actors._token_store import TokenStore
from tests.auth_server import CLIENT_ID, DEVICE_PATH, HANG, TOKEN_PATH, FakeIdP, asgi_client
from messages._auth_api import AuthConfigError, AuthEvent, AuthProtocolError, LoginDenied, LoginExpired, Secret


def make(idp_kwargs: dict | None = None, provider: str = "generic", **profile_kwargs: object):
    idp = FakeIdP(trio.current_time, **(idp_kwargs or {}))
    client, transport = asgi_client(idp)
    profile = build_profile(
        provider,
        device_url=idp.base_url + DEVICE_PATH,
        token_url=idp.base_url + TOKEN_PATH,
        client_id=CLIENT_ID,
        scope="read",
        **profile_kwargs,  # type: ignore[arg-type]
    )
    return idp, client, transport, profile


async def approve_at(idp: FakeIdP, when: float, user_code: str, deny: bool = False) -> None:
    await trio.sleep_until(when)
    (idp.deny if deny else idp.approve)(user_code)


async def run_flow(idp: FakeIdP, client: httpx.AsyncClient, profile: AuthProfile, *, decide_at: float | None,
                   deny: bool = False, events: list[AuthEvent] | None = None):
    flow = DeviceFlow(profile, client, on_event=None if events is None else events.append)
    auth = await flow.start()
    error: Exception | None = None
    async with trio.open_nursery() as nursery:
        if decide_at is not None:
            nursery.start_soon(approve_at, idp, decide_at, auth.user_code, deny)
        try:
            grant = await flow.poll(auth)
        except Exception as exc:  # re-raised bare, not in an exception group
            error = exc
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    return auth, grant


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in zip([0.0, *times], times)]


async def test_approval_after_several_pending_polls(autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, profile = make()
    events: list[AuthEvent] = []
    auth, grant = await run_flow(idp, client, profile, decide_at=22, events=events)
    # First poll one interval after the code; default interval 5 s.
    assert transport.token_polls() == [5, 10, 15, 20, 25]
    assert [e.kind for e in events] == ["code_issued", "pending", "pending", "pending", "pending", "logged_in"]
    assert events[0].user_code == auth.user_code
    assert idp.access_token_valid(grant.access_token.reveal())
    assert grant.refresh_token is not None and grant.expires_in == 3600 and grant.scope == "read"
    # Form-encoded requests carrying the RFC 8628 fields.
    _, path, form = transport.log[1]
    assert path == TOKEN_PATH
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:device_code"
    assert form["device_code"] == auth.device_code.reveal() and form["client_id"] == CLIENT_ID
    assert auth.device_code.reveal() not in repr(auth)


async def test_slow_down_twice_adds_five_seconds_for_good(autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, profile = make()
    idp.force_slow_down = 2
    events: list[AuthEvent] = []
    await run_flow(idp, client, profile, decide_at=40, events=events)
    # 5 -> slow_down -> 10 -> slow_down -> 15, and it stays 15.
    assert gaps(transport.token_polls()) == [5, 10, 15, 15]
    assert [e.interval for e in events if e.kind == "slow_down"] == [10, 15]
    assert idp.force_slow_down == 0


async def test_slow_down_takes_a_larger_server_interval_github(autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, profile = make({"dialect": "github"}, provider="github")
    profile = attrs.evolve(profile, accept_json=False)  # GitHub then answers form-encoded
    idp.force_slow_down = 1
    _, grant = await run_flow(idp, client, profile, decide_at=20)
    assert gaps(transport.token_polls()) == [5, 12, 12]
    assert idp.access_token_valid(grant.access_token.reveal())


async def test_slow_down_adds_five_seconds_even_when_the_server_names_less(autojump_clock: trio.abc.Clock) -> None:
    """RFC 8628 §3.5: +5 s for this and every later poll.  A slow_down
    naming 6 s after 5 s polls was taken as is (a 1 s slowdown)."""
    idp, client, transport, profile = make({"dialect": "github"}, provider="github")
    profile = attrs.evolve(profile, accept_json=False)
    idp.github_slow_down_interval = 6
    idp.force_slow_down = 1
    await run_flow(idp, client, profile, decide_at=20)
    assert gaps(transport.token_polls()) == [5, 10, 10]


@pytest.mark.parametrize(("issued", "expected"), [(0.001, 1.0), (1e300, 900.0), (1800, 900.0)])
def test_an_issued_interval_is_kept_between_a_second_and_half_the_codes_lifetime(issued: float, expected: float) -> None:
    """0.001 s made thousands of polls a minute against the server; 1e300
    meant never polling at all until the code expired, and so did the
    code's lifetime itself (the first poll fell on the deadline)."""
    from actors._auth_flow import clamp_interval

    assert clamp_interval(issued, 1800.0) == expected


async def test_denied(autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, profile = make()
    with pytest.raises(LoginDenied) as info:
        await run_flow(idp, client, profile, decide_at=12, deny=True)
    assert info.value.exit_code == 4
    assert transport.token_polls() == [5, 10, 15]


async def test_microsoft_authorization_declined_is_denied(autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, profile = make({"dialect": "microsoft"}, provider="microsoft")
    with pytest.raises(LoginDenied):
        await run_flow(idp, client, profile, decide_at=7, deny=True)


async def test_expired_token_from_the_server(autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, profile = make()
    idp.expire_early = 12  # the server lets the code die before the advertised expires_in
    with pytest.raises(LoginExpired) as info:
        await run_flow(idp, client, profile, decide_at=None)
    assert "login generic" in str(info.value) and info.value.exit_code == 5
    assert transport.token_polls() == [5, 10, 15]


async def test_expires_in_reached_without_an_answer(autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, profile = make()
    flow = DeviceFlow(profile, client)
    auth = await flow.start()
    auth = attrs.evolve(auth, expires_in=18)
    with pytest.raises(LoginExpired):
        await flow.poll(auth)
    assert trio.current_time() == 18
    assert transport.token_polls() == [5, 10, 15]


async def test_503_and_network_error_in_the_middle_back_off_and_survive(autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, profile = make()
    transport.faults = {
        2: httpx.Response(503, text="<html>Service Unavailable</html>"),
        3: httpx.Response(503, json={"error": "temporarily_unavailable"}),
        4: httpx.ConnectError("connection refused"),
    }
    events: list[AuthEvent] = []
    _, grant = await run_flow(idp, client, profile, decide_at=82, events=events)
    # pending at 5; then three transient failures: waits double 10, 20, 40;
    # the next answer (pending) resets the wait to the interval.
    assert gaps(transport.token_polls()) == [5, 5, 10, 20, 40, 5]
    assert sum(e.kind == "backoff" for e in events) == 3
    assert idp.access_token_valid(grant.access_token.reveal())


async def test_a_body_that_cannot_be_decoded_is_backed_off_like_a_network_error(autojump_clock: trio.abc.Clock) -> None:
    """A token reply claiming gzip that was not ended the login with a raw
    DecodingError (and `login --json` with no result line)."""
    idp, client, transport, profile = make()
    transport.faults = {2: httpx.Response(200, headers={"content-encoding": "gzip"}, stream=httpx.ByteStream(b"not gzip"))}
    events: list[AuthEvent] = []
    _, grant = await run_flow(idp, client, profile, decide_at=12, events=events)
    assert [e.kind for e in events if e.kind == "backoff"] == ["backoff"]
    assert idp.access_token_valid(grant.access_token.reveal())


@pytest.mark.parametrize("status", [200, 400])
async def test_garbage_body_ends_with_a_clear_error(autojump_clock: trio.abc.Clock, status: int) -> None:
    idp, client, transport, profile = make()
    transport.faults = {2: httpx.Response(status, text="<html>surprise</html>")}
    with pytest.raises(AuthProtocolError) as info:
        await run_flow(idp, client, profile, decide_at=None)
    assert "not valid JSON" in str(info.value)
    assert transport.token_polls() == [5, 10]


async def test_unknown_error_stops_polling(autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, profile = make()
    transport.faults = {1: httpx.Response(400, json={"error": "bad_verification_code", "error_description": "nope"})}
    with pytest.raises(AuthProtocolError, match="bad_verification_code: nope"):
        await run_flow(idp, client, profile, decide_at=None)
    assert transport.token_polls() == [5]


async def test_error_field_wins_over_status(autojump_clock: trio.abc.Clock) -> None:
    # Google-style: pending with an odd status is still pending.
    idp, client, transport, profile = make()
    transport.faults = {1: httpx.Response(428, json={"error": "authorization_pending"})}
    await run_flow(idp, client, profile, decide_at=7)
    assert transport.token_polls() == [5, 10]


async def test_google_dialect_verification_url_and_secret_on_poll(autojump_clock: trio.abc.Clock) -> None:
    idp, client, transport, profile = make({"dialect": "google", "client_secret": "g-secret"}, provider="google",
                                           client_secret="g-secret")
    auth, grant = await run_flow(idp, client, profile, decide_at=7)
    assert auth.verification_uri.endswith("/activate") and auth.verification_uri_complete is None
    assert all(form.get("client_secret") == "g-secret" for _, path, form in transport.log)
    # Without the secret the confidential client is refused up front.
    with pytest.raises(AuthConfigError, match="client secret"):
        DeviceFlow(attrs.evolve(profile, client_secret=None), client)
    bare = attrs.evolve(profile, client_secret=None, requires_secret=False)
    with pytest.raises(AuthProtocolError, match="invalid_client"):
        await DeviceFlow(bare, client).start()


async def test_issuer_metadata_names_the_endpoints(autojump_clock: trio.abc.Clock, tmp_path: Path) -> None:
    idp = FakeIdP(trio.current_time)
    client, transport = asgi_client(idp)
    profile = build_profile("generic", issuer=idp.base_url, client_id=CLIENT_ID)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(idp.approve_first_code)
        entry = await device_login(profile, client, TokenStore(tmp_path), clock=lambda: 1e9 + trio.current_time())
    assert entry.token_url == idp.base_url + TOKEN_PATH
    assert transport.log[0][1] == "/.well-known/oauth-authorization-server"


def test_profiles_reject_bad_input() -> None:
    with pytest.raises(AuthConfigError, match="unknown provider"):
        build_profile("myspace")
    with pytest.raises(AuthConfigError, match="must be an http"):
        build_profile("generic", device_url="ftp://x", token_url="https://t", client_id="c")
    with pytest.raises(AuthConfigError, match="client id"):
        build_profile("github").require_endpoints()
    with pytest.raises(AuthConfigError, match="client secret"):
        build_profile("google", client_id="c").require_endpoints()
    ms = build_profile("microsoft", tenant="contoso", client_id="c")
    assert ms.device_url == "https://login.microsoftonline.com/contoso/oauth2/v2.0/devicecode"
    assert build_profile("openai").experimental and build_profile("anthropic").experimental
    custom = build_profile("openai", token_url="https://example.test/token")
    assert custom.token_url == "https://example.test/token" and custom.client_id


async def test_cancelling_mid_poll_stops_requests_at_once_and_stores_nothing(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    idp, client, transport, profile = make()
    transport.faults = {3: HANG}  # the poll at t=15 is in flight when we cancel
    store = TokenStore(tmp_path / "home")
    with trio.move_on_after(17) as scope:
        async with trio.open_nursery() as nursery:
            async def approve_soon() -> None:
                while not idp.devices:
                    await trio.sleep(0.5)
                await trio.sleep_until(12)
                idp.approve(next(iter(idp.devices.values()))["user_code"])

            nursery.start_soon(approve_soon)
            await device_login(profile, client, store, clock=lambda: 1e9 + trio.current_time())
    assert scope.cancelled_caught
    assert trio.current_time() == 17  # the hanging request did not delay the cancel
    seen = len(transport.log)
    await trio.sleep(600)  # nothing keeps polling in the background
    assert len(transport.log) == seen
    assert transport.token_polls() == [5, 10, 15]
    assert store.load() == {}
    assert not (tmp_path / "home" / "tokens.json").exists()


@pytest.mark.parametrize(("given", "kept"), [(1e20, 10 * 365 * 86400.0), (-5, 0.0), (3600, 3600.0), (None, None)])
def test_a_grant_lifetime_is_kept_within_what_a_date_can_show(given: float | None, kept: float | None) -> None:
    """expires_in 1e20 stored the tokens, then failed the login and every
    later 'auth status' with OverflowError; a negative one was stored as
    "never expires"."""
    from actors._auth_flow import parse_grant

    body = {"access_token": "at", "token_type": "Bearer"} | ({} if given is None else {"expires_in": given})
    assert parse_grant(body, "generic").expires_in == kept


def test_a_grants_scope_and_token_type_cannot_drive_the_terminal() -> None:
    """'auth status' printed the server's scope and token_type as sent: an
    ESC sequence in either drove the user's terminal every time."""
    from actors._auth_flow import parse_grant

    body = {"access_token": "at", "token_type": "Bearer\x1b[2J", "scope": "openid\n\x1b]0;owned\x07 email"}
    grant = parse_grant(body, "generic")
    assert grant.scope == "openid??]0;owned? email"
    assert grant.token_type == "Bearer?[2J"


@pytest.mark.parametrize("problem", ["damaged", "group_readable", "home_is_a_file", "lock_is_a_symlink"])
async def test_a_store_that_cannot_take_the_tokens_fails_before_the_code(
    problem: str, autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    """Each of these failed only after the user had approved the code (the
    approval wasted), some as raw FileExistsError or OSError."""
    from messages._auth_api import TokenStoreError

    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    if problem == "damaged":
        (home / "tokens.json").write_text('{"version": 1, "tokens": {"github": {"access_token": ""}}}')
        (home / "tokens.json").chmod(0o600)
    elif problem == "group_readable":
        (home / "tokens.json").write_text('{"version": 1, "tokens": {}}')
        (home / "tokens.json").chmod(0o644)
    elif problem == "home_is_a_file":
        home.rmdir()
        home.write_text("not a directory")
    else:
        (home / "tokens.lock").symlink_to(tmp_path / "elsewhere")
    idp, client, transport, profile = make()
    with pytest.raises(TokenStoreError):
        await device_login(profile, client, TokenStore(home / "sub" if problem == "home_is_a_file" else home))
    assert transport.log == [], "no device code may be asked for"


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        # It said "names no device authorization endpoint".
        ({"issuer": "https://idp.test", "device_authorization_endpoint": "https://idp.test/dev"},
         "names no usable token_endpoint (got None)"),
        # These failed later as "could not reach ... UnsupportedProtocol", exit 1.
        ({"issuer": "https://idp.test", "device_authorization_endpoint": "relative/dev",
          "token_endpoint": "https://idp.test/tok"}, "names no usable device_authorization_endpoint (got 'relative/dev')"),
        ({"issuer": "https://idp.test", "device_authorization_endpoint": "https://idp.test/dev",
          "token_endpoint": "file:///etc/passwd"}, "names no usable token_endpoint (got 'file:///etc/passwd')"),
        # The server's words, shown raw: U+009B is a terminal's CSI, U+202E
        # turns the text around (httpx refuses only ASCII controls).
        ({"issuer": "https://idp.test", "device_authorization_endpoint": "https://idp.test/\u009b2J",
          "token_endpoint": "https://idp.test/tok"},
         "names no usable device_authorization_endpoint (got 'https://idp.test/\\x9b2J')"),
        ({"issuer": "https://idp.test", "device_authorization_endpoint": "https://idp.test/dev",
          "token_endpoint": "https://idp.test/\u202etok"},
         "names no usable token_endpoint (got 'https://idp.test/\\u202etok')"),
        # RFC 8414 3.3: it was used silently.
        ({"issuer": "https://evil.example", "device_authorization_endpoint": "https://evil.example/dev",
          "token_endpoint": "https://evil.example/tok"}, "is for issuer 'https://evil.example', not 'https://idp.test'"),
    ],
)
async def test_issuer_metadata_that_cannot_be_used_is_refused_naming_why(metadata: dict, message: str) -> None:

    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(200, json=metadata)

    profile = build_profile("generic", issuer="https://idp.test", client_id=CLIENT_ID)
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(AuthConfigError) as caught:
            await discover(profile, client)
    assert message in str(caught.value) and str(caught.value).isprintable()
    assert asked == ["/.well-known/oauth-authorization-server"]


ESCAPES = "\x1b]0;owned\x07\x1b[2J"


def _device_answer(body: dict, token_body: dict | None = None):
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == DEVICE_PATH:
            return httpx.Response(200 if "error" not in body else 400, json=body)
        return httpx.Response(400, json=token_body or {"error": "authorization_pending"})

    return answer


def _profile() -> AuthProfile:
    return build_profile("generic", device_url="https://idp.test" + DEVICE_PATH,
                         token_url="https://idp.test" + TOKEN_PATH, client_id=CLIENT_ID)


async def test_a_servers_error_text_cannot_drive_the_terminal() -> None:
    """The refusal's error and error_description were printed as sent: an
    ESC sequence retitled or cleared the user's terminal, a newline forged
    a line of output."""
    answer = _device_answer({"error": "invalid_client" + ESCAPES, "error_description": ESCAPES + "\nlogged in: ok"})
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(AuthProtocolError) as caught:
            await DeviceFlow(_profile(), client).start()
    text = str(caught.value)
    assert "refused: invalid_client?" in text and "\x1b" not in text and "\x07" not in text and "\n" not in text


async def test_a_denial_reason_is_shown_without_control_characters(autojump_clock: trio.abc.Clock) -> None:
    good = {"device_code": "dc", "user_code": "ABCD-EFGH", "verification_uri": "https://idp.test/device",
            "expires_in": 600, "interval": 5}
    answer = _device_answer(good, {"error": "access_denied", "error_description": "no" + ESCAPES})
    events: list[AuthEvent] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        flow = DeviceFlow(_profile(), client, on_event=events.append)
        with pytest.raises(LoginDenied):
            await flow.poll(await flow.start())
    denied = [e.detail for e in events if e.kind == "denied"]
    assert denied and denied[0].startswith("access_denied: no?") and "\x1b" not in denied[0]


@pytest.mark.parametrize(
    ("field", "value"),
    [("user_code", "AB" + ESCAPES), ("verification_uri", "https://idp.test/device" + ESCAPES),
     ("verification_uri", "https://idp.test/device please-visit-evil.example"),
     ("verification_uri_complete", "https://idp.test/device?code=\x1b[8m")],
)
async def test_a_code_or_uri_to_show_with_control_characters_is_refused(field: str, value: str) -> None:
    body = {"device_code": "dc", "user_code": "ABCD-EFGH", "verification_uri": "https://idp.test/device",
            "expires_in": 600, field: value}
    async with httpx.AsyncClient(transport=httpx.MockTransport(_device_answer(body))) as client:
        with pytest.raises(AuthProtocolError, match=field):
            await DeviceFlow(_profile(), client).start()


DEEP = "[" * 100_000  # json.loads raises RecursionError, not ValueError


async def test_deeply_nested_json_from_the_server_is_a_protocol_error(autojump_clock: trio.abc.Clock) -> None:
    """It escaped as an unhandled RecursionError from start, poll and discover."""
    deep = httpx.Response(200, text=DEEP, headers={"content-type": "application/json"})
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda request: deep)) as client:
        with pytest.raises(AuthProtocolError, match="not valid JSON"):
            await DeviceFlow(_profile(), client).start()
        with pytest.raises(AuthConfigError, match="is not JSON"):
            await discover(build_profile("generic", issuer="https://idp.test", client_id=CLIENT_ID), client)

    idp, client, transport, profile = make()
    transport.faults = {1: httpx.Response(400, text=DEEP, headers={"content-type": "application/json"})}
    with pytest.raises(AuthProtocolError, match="400 with a body that is not valid JSON"):
        await run_flow(idp, client, profile, decide_at=None)


class Trickle(httpx.AsyncByteStream):
    """A body that never ends: one byte every 5 s (no per-read timeout trips)."""

    async def __aiter__(self):  # type: ignore[override]
        while True:
            await trio.sleep(5)
            yield b" "


def trickling(status: int) -> httpx.Response:
    return httpx.Response(status, headers={"content-type": "application/json", "content-length": "100000"},
                          stream=Trickle())


@pytest.mark.parametrize("fault", ["trickle", HANG])
async def test_a_server_that_never_finishes_answering_ends_the_login_when_the_code_expires(
    autojump_clock: trio.abc.Clock, fault: str
) -> None:
    """A token endpoint sending a byte every 5 s kept the login waiting
    past the code's expiry, for as long as the server kept going."""
    idp, client, transport, profile = make({"expires_in": 60})
    transport.faults = {2: trickling(400) if fault == "trickle" else HANG}
    events: list[AuthEvent] = []
    error: Exception | None = None
    with trio.move_on_after(3600):  # the old code never returned
        try:
            await run_flow(idp, client, profile, decide_at=None, events=events)
        except LoginExpired as exc:
            error = exc
    assert error is not None and trio.current_time() == 60
    assert transport.token_polls() == [5, 10] and events[-1].kind == "expired"


async def test_a_device_authorization_that_never_finishes_answering_fails_in_time(
    autojump_clock: trio.abc.Clock
) -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda request: trickling(200))) as client:
        with trio.move_on_after(3600):
            with pytest.raises(AuthProtocolError, match="did not answer within 60 s"):
                await DeviceFlow(_profile(), client).start()
    assert trio.current_time() == 60


async def test_a_device_endpoint_out_of_reach_is_named_with_what_went_wrong() -> None:
    # It said only "ConnectError": a refused port, DNS and TLS read alike.
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(AuthProtocolError) as info:
            await DeviceFlow(_profile(), client).start()
    assert str(info.value).endswith(": ConnectError: [Errno 111] Connection refused")


async def test_a_5xx_or_429_naming_an_error_is_backed_off_not_the_end_of_the_login(
    autojump_clock: trio.abc.Clock
) -> None:
    """A gateway's 503 {"error": "server_error"} or 429 {"error":
    "rate_limited"} ended the login as a protocol error."""
    idp, client, transport, profile = make()
    transport.faults = {
        2: httpx.Response(503, json={"error": "server_error", "error_description": "try later"}),
        3: httpx.Response(429, json={"error": "rate_limited"}),
        4: httpx.Response(502, json={"error": "access_denied"}),  # a proxy's, not the user's, answer
    }
    events: list[AuthEvent] = []
    _, grant = await run_flow(idp, client, profile, decide_at=60, events=events)
    assert gaps(transport.token_polls()) == [5, 5, 10, 20, 40]
    assert [e.kind for e in events].count("backoff") == 3
    assert idp.access_token_valid(grant.access_token.reveal())


def _shows_none_of(secrets: list[str], *texts: str) -> bool:
    # A bool, so that a failing assert does not print the secrets.
    return not any(secret in text for secret in secrets for text in texts)


async def test_secrets_a_server_echoes_are_masked_in_errors_and_events(autojump_clock: trio.abc.Clock) -> None:
    """"invalid_request: unknown device_code DEVCODE-SECRET" reached the
    terminal and the run database as sent."""
    secrets = ["DEVCODE-SECRET-42", "CLIENT-SECRET-42"]

    def echo(request: httpx.Request) -> httpx.Response:
        form = dict(httpx.QueryParams(request.content.decode()))
        if request.url.path == DEVICE_PATH and "scope" in form:
            return httpx.Response(400, json={"error": "invalid_scope",
                                             "error_description": f"no scope for secret {form['client_secret']}"})
        if request.url.path == DEVICE_PATH:
            return httpx.Response(200, json={"device_code": secrets[0], "user_code": "ABCD-EFGH",
                                             "verification_uri": "https://idp.test/device", "expires_in": 600})
        echoed = f"unknown device_code {form['device_code']} (client {form['client_secret']})"
        return httpx.Response(400, json={"error": f"invalid_request {form['device_code']}", "error_description": echoed})

    profile = attrs.evolve(_profile(), client_secret=Secret(secrets[1]))
    events: list[AuthEvent] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(echo)) as client:
        with pytest.raises(AuthProtocolError) as refused:
            await DeviceFlow(attrs.evolve(profile, scope="read"), client).start()
        flow = DeviceFlow(profile, client, on_event=events.append)
        with pytest.raises(AuthProtocolError) as ended:
            await flow.poll(await flow.start())
    shown = [str(refused.value), str(ended.value), *(e.detail for e in events)]
    assert _shows_none_of(secrets, *shown)
    assert "unknown device_code [REDACTED] (client [REDACTED])" in str(ended.value)
    assert "no scope for secret [REDACTED]" in str(refused.value)


async def test_a_long_outage_backs_off_at_the_cap_without_overflowing(autojump_clock: trio.abc.Clock) -> None:
    """interval * 2**failures raised OverflowError after 1024 failures in a row."""
    idp, client, transport, profile = make({"expires_in": 10**6})
    outage = 1100
    transport.faults = {i: httpx.Response(503, text="down") for i in range(1, outage + 1)}
    _, grant = await run_flow(idp, client, profile, decide_at=outage * 60)
    polls = transport.token_polls()
    # Doubling from the 5 s interval up to the 60 s cap, and there it stays.
    assert gaps(polls)[: outage + 1] == [5, 10, 20, 40] + [60] * (outage - 3)
    assert idp.access_token_valid(grant.access_token.reveal())


@pytest.mark.parametrize("interval", [60, 1e9])
async def test_an_interval_as_long_as_the_codes_life_still_polls_before_it_expires(
    autojump_clock: trio.abc.Clock, interval: float
) -> None:
    """The interval was clamped to the lifetime: the first poll fell on the
    deadline and the login expired without a single poll, though approved."""
    approved_at = 20.0
    polls: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == DEVICE_PATH:
            return httpx.Response(200, json={"device_code": "dc", "user_code": "ABCD-EFGH", "expires_in": 60,
                                             "verification_uri": "https://idp.test/device", "interval": interval})
        polls.append(trio.current_time())
        if trio.current_time() < approved_at:
            return httpx.Response(400, json={"error": "authorization_pending"})
        return httpx.Response(200, json={"access_token": "at", "expires_in": 3600})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        flow = DeviceFlow(_profile(), client)
        grant = await flow.poll(await flow.start())
    assert polls == [30.0] and grant.access_token == Secret("at")
