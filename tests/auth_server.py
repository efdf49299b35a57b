"""A real RFC 8628 authorization server for tests, built from Authlib's
server classes (``DeviceAuthorizationEndpoint``, ``DeviceCodeGrant``,
``RefreshTokenGrant``, ``BearerTokenGenerator``).

The same :class:`FakeIdP` is served two ways:

* in-process, as an ASGI app behind ``httpx.ASGITransport`` (wrapped in a
  :class:`ScriptedTransport` that records requests on the trio clock and
  can inject 503s, garbage bodies and network errors) - for virtual time;
* over a real socket on 127.0.0.1 from a thread (:func:`serve_in_thread`)
  - for the real clock and subprocesses.

The server's clock is injected (``trio.current_time`` under the autojump
clock, ``time.monotonic`` in the thread), so Authlib's expiry and the
slow-down check agree with the client's notion of time.  Test hooks:
``approve``/``deny``/``revoke_access`` as methods, and as POST endpoints
``/test/approve`` etc. for out-of-process tests.
"""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import secrets
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import trio
from authlib.oauth2.rfc6749 import AuthorizationServer, ClientMixin, TokenMixin
from authlib.oauth2.rfc6749.grants import RefreshTokenGrant
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload, OAuth2Request
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc8628 import DeviceAuthorizationEndpoint, DeviceCodeGrant, DeviceCredentialDict

CLIENT_ID = "conclave-test"
DEVICE_PATH = "/oauth/device"
TOKEN_PATH = "/oauth/token"
API_PATH = "/api/complete"


class _Client(ClientMixin):
    def __init__(self, client_id: str, secret: str | None) -> None:
        self.client_id = client_id
        self.secret = secret

    def get_client_id(self) -> str:
        return self.client_id

    def get_allowed_scope(self, scope: str | None) -> str:
        return scope or ""  # never None (Authlib gotcha: invalid_scope)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == ("client_secret_post" if self.secret else "none")

    def check_client_secret(self, client_secret: str) -> bool:
        return self.secret is not None and secrets.compare_digest(client_secret, self.secret)

    def check_grant_type(self, grant_type: str) -> bool:
        return True


class _Token(TokenMixin):
    def __init__(self, data: dict[str, Any], client_id: str, user: str, issued: float) -> None:
        self.data = data
        self.client_id = client_id
        self.user = user
        self.issued = issued
        self.refresh_revoked = False
        self.access_revoked = False

    def check_client(self, client: Any) -> bool:
        return bool(client.get_client_id() == self.client_id)

    def get_scope(self) -> str:
        return str(self.data.get("scope", ""))

    def get_expires_in(self) -> int:
        return int(self.data.get("expires_in", 0))

    def is_expired(self) -> bool:
        return False

    def is_revoked(self) -> bool:
        return self.refresh_revoked


class _Request(OAuth2Request):
    def __init__(self, method: str, uri: str, headers: dict[str, str], form: dict[str, str]) -> None:
        super().__init__(method, uri, headers=headers)
        self._form = form
        self.payload = BasicOAuth2Payload(form)

    @property
    def form(self) -> dict[str, str]:
        return self._form

    @property
    def args(self) -> dict[str, str]:
        return {}


class FakeIdP:
    """State of the authorization server plus its Authlib wiring."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        base_url: str = "https://idp.test",
        interval: int = 5,
        expires_in: int = 1800,
        token_expires_in: int = 3600,
        rotate: bool = True,
        client_secret: str | None = None,
        dialect: str = "rfc",
    ) -> None:
        self.clock = clock
        self.base_url = base_url
        self.token_expires_in = token_expires_in
        self.dialect = dialect
        self.clients = {CLIENT_ID: _Client(CLIENT_ID, client_secret)}
        self.devices: dict[str, DeviceCredentialDict] = {}
        self.grants: dict[str, tuple[str, bool]] = {}
        self.tokens: dict[str, _Token] = {}  # access token -> token
        self.refresh_tokens: dict[str, _Token] = {}
        self.force_slow_down = 0  # answer slow_down to the next N pending polls
        self.github_slow_down_interval = 12  # the interval GitHub's slow_down names
        self.expire_early: float | None = None  # real device-code lifetime, if shorter
        self.refresh_count = 0
        self.refresh_gate: threading.Event | None = None  # hold refreshes until set
        self.refresh_gate_timeout = 10.0
        self.gate_timed_out = False
        self.api_calls: list[tuple[float, int]] = []
        self.model_backend: Any = None  # a MockBackend: serve /v1/* to valid tokens only
        self._lock = threading.RLock()
        self._serial = itertools.count(1)
        self.server = self._build(interval, expires_in, rotate)

    # -- Authlib wiring -------------------------------------------------------

    def _build(self, interval: int, expires_in: int, rotate: bool) -> AuthorizationServer:
        idp = self

        class Server(AuthorizationServer):
            def query_client(self, client_id: str) -> _Client | None:
                return idp.clients.get(client_id)

            def save_token(self, token: dict[str, Any], request: Any) -> None:
                idp._save_token(token, request)

            def create_oauth2_request(self, request: Any) -> OAuth2Request:
                return request  # type: ignore[no-any-return]

            def create_json_request(self, request: Any) -> Any:
                raise NotImplementedError

            def handle_response(self, status: int, body: Any, headers: Any) -> tuple[int, Any, Any]:
                return status, body, headers

            def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
                pass

        class Endpoint(DeviceAuthorizationEndpoint):
            INTERVAL = interval
            EXPIRES_IN = expires_in

            def get_verification_uri(self) -> str:
                return idp.base_url + "/activate"

            def save_device_credential(self, client_id: str, scope: str, data: dict[str, Any]) -> None:
                now = idp.clock()
                lifetime = idp.expire_early if idp.expire_early is not None else data["expires_in"]
                cred = _DeviceCredential(
                    {**data, "client_id": client_id, "scope": scope, "expires_at": now + lifetime, "last_poll": now}
                )
                cred.clock = idp.clock
                idp.devices[data["device_code"]] = cred

        class DeviceGrant(DeviceCodeGrant):
            def query_device_credential(self, device_code: str) -> Any:
                return idp.devices.get(device_code)

            def query_user_grant(self, user_code: str) -> Any:
                return idp.grants.get(user_code)

            def should_slow_down(self, credential: Any) -> bool:
                now = idp.clock()
                elapsed = now - credential["last_poll"]
                credential["last_poll"] = now
                credential.setdefault("poll_times", []).append(now)
                if idp.force_slow_down > 0 or elapsed < credential["interval"] - 0.05:
                    idp.force_slow_down = max(0, idp.force_slow_down - 1)
                    credential["interval"] += 5  # what this server now expects
                    return True
                return False

        class Refresh(RefreshTokenGrant):
            INCLUDE_NEW_REFRESH_TOKEN = rotate
            TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_post", "none"]

            def authenticate_refresh_token(self, refresh_token: str) -> Any:
                token = idp.refresh_tokens.get(refresh_token)
                return token if token is not None and not token.refresh_revoked else None

            def authenticate_user(self, credential: Any) -> Any:
                return credential.user

            def revoke_old_credential(self, credential: Any) -> None:
                if rotate:
                    credential.refresh_revoked = True

        DeviceGrant.TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_post", "none"]
        Endpoint.CLIENT_AUTH_METHODS = ["client_secret_post", "none"]
        server = Server()
        server.register_token_generator(
            "default",
            BearerTokenGenerator(
                access_token_generator=lambda **kw: f"at-{next(self._serial)}-{secrets.token_urlsafe(16)}",
                refresh_token_generator=lambda **kw: f"rt-{next(self._serial)}-{secrets.token_urlsafe(16)}",
                expires_generator=lambda client, grant_type: self.token_expires_in,
            ),
        )
        server.register_endpoint(Endpoint)
        server.register_grant(DeviceGrant)
        server.register_grant(Refresh)
        return server

    def _save_token(self, token: dict[str, Any], request: Any) -> None:
        client_id = request.client.get_client_id()
        user = request.user if isinstance(request.user, str) else "user"
        record = _Token(dict(token), client_id, user, self.clock())
        self.tokens[token["access_token"]] = record
        if "refresh_token" in token:
            self.refresh_tokens[token["refresh_token"]] = record

    # -- test hooks -----------------------------------------------------------

    def approve(self, user_code: str, user: str = "alice") -> None:
        with self._lock:
            self.grants[user_code] = (user, True)

    async def approve_first_code(self) -> None:
        """The user, on trio's clock: once a device code has been issued
        (checked each second), approve it."""
        while not self.devices:
            await trio.sleep(1)
        self.approve(next(iter(self.devices.values()))["user_code"])

    def deny(self, user_code: str) -> None:
        with self._lock:
            self.grants[user_code] = ("alice", False)

    def revoke_access(self, access_token: str) -> None:
        with self._lock:
            self.tokens[access_token].access_revoked = True

    def valid_refresh_tokens(self) -> set[str]:
        with self._lock:
            return {rt for rt, tok in self.refresh_tokens.items() if not tok.refresh_revoked}

    def access_token_valid(self, access_token: str) -> bool:
        with self._lock:
            token = self.tokens.get(access_token)
            return (
                token is not None
                and not token.access_revoked
                and self.clock() < token.issued + token.get_expires_in()
            )

    def poll_times(self) -> list[float]:
        times: list[float] = []
        for cred in self.devices.values():
            times.extend(cred.get("poll_times", []))
        return sorted(times)

    def all_secrets(self) -> list[str]:
        """Every token and device code this server issued (for leak checks)."""
        with self._lock:
            return [*self.tokens, *self.refresh_tokens, *self.devices]

    # -- HTTP -----------------------------------------------------------------

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        if self.model_backend is not None and path.startswith("/v1/"):
            return self._model(method, path, headers, body)
        form = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        if method == "POST" and path == TOKEN_PATH and form.get("grant_type") == "refresh_token":
            gate = self.refresh_gate
            if gate is not None and not gate.wait(self.refresh_gate_timeout):
                self.gate_timed_out = True
        with self._lock:
            return self._handle(method, path, headers, form)

    def _handle(self, method: str, path: str, headers: dict[str, str], form: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
        uri = self.base_url + path
        if method == "POST" and path == DEVICE_PATH:
            status, payload, hdrs = self.server.create_endpoint_response("device_authorization", _Request(method, uri, headers, form))
            return self._reply(status, payload, hdrs, headers)
        if method == "POST" and path == TOKEN_PATH:
            if form.get("grant_type") == "refresh_token":
                self.refresh_count += 1
            status, payload, hdrs = self.server.create_token_response(_Request(method, uri, headers, form))
            return self._reply(status, payload, hdrs, headers)
        if method == "POST" and path in ("/test/approve", "/test/deny"):
            (self.approve if path.endswith("approve") else self.deny)(form["user_code"])
            return 204, [], b""
        if method == "GET" and path == "/.well-known/oauth-authorization-server":
            meta = {"issuer": self.base_url, "device_authorization_endpoint": self.base_url + DEVICE_PATH,
                    "token_endpoint": self.base_url + TOKEN_PATH}
            return 200, [("content-type", "application/json")], json.dumps(meta).encode()
        if path == API_PATH:
            auth = headers.get("authorization", "")
            token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
            ok = self.access_token_valid(token)
            self.api_calls.append((self.clock(), 200 if ok else 401))
            if not ok:
                return 401, [("content-type", "application/json")], b'{"error": "invalid_token"}'
            return 200, [("content-type", "application/json")], json.dumps({"content": '{"ok": true}'}).encode()
        return 404, [("content-type", "text/plain")], b"not found"

    def _model(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """A model API (serve-mock's backend) that takes only valid tokens."""
        from actors._mock_backend import MockRequest

        token = headers.get("authorization", "").removeprefix("Bearer ")
        ok = self.access_token_valid(token)
        with self._lock:
            self.api_calls.append((self.clock(), 200 if ok else 401))
        if not ok:
            echo = {"error": {"message": f"Incorrect API key provided: {token}.", "type": "invalid_request_error"}}
            return 401, [("content-type", "application/json")], json.dumps(echo).encode()
        assert self.model_backend is not None
        reply = self.model_backend.handle(MockRequest(method=method, path=path, headers=headers, body=body))
        out = [(k, v) for k, v in reply.headers if k.lower() not in ("content-length", "transfer-encoding")]
        return reply.status, out, b"".join(reply.chunks)

    def _reply(self, status: int, payload: Any, hdrs: Any, req_headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
        out = [(k.lower(), v) for k, v in (hdrs or []) if k.lower() != "content-type"]
        if self.dialect == "google" and isinstance(payload, dict) and "verification_uri" in payload:
            payload = dict(payload)
            payload["verification_url"] = payload.pop("verification_uri")
            payload.pop("verification_uri_complete", None)
        if self.dialect == "microsoft" and isinstance(payload, dict) and payload.get("error") == "access_denied":
            payload = {**payload, "error": "authorization_declined"}
        if self.dialect == "github" and isinstance(payload, dict) and payload.get("error") == "slow_down":
            payload = {**payload, "interval": self.github_slow_down_interval}
        if self.dialect == "github" and "json" not in req_headers.get("accept", ""):
            # GitHub answers form-encoded unless asked for JSON.
            out.append(("content-type", "application/x-www-form-urlencoded"))
            return status, out, urlencode(payload).encode()
        out.append(("content-type", "application/json"))
        return status, out, json.dumps(payload).encode()

    # -- ASGI -----------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        status, out, payload = self.handle(scope["method"], scope["path"], headers, body)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.encode(), v.encode()) for k, v in out]})
        await send({"type": "http.response.body", "body": payload})


class _DeviceCredential(DeviceCredentialDict):
    clock: Callable[[], float]

    def is_expired(self) -> bool:
        return bool(self["expires_at"] <= self.clock())


HANG = "hang"


class LateReply:
    """The server handles the request, but its reply arrives ``seconds``
    later; or, given a ``response``, that one arrives instead (a server
    that takes its time to fail)."""

    def __init__(self, seconds: float, response: httpx.Response | None = None) -> None:
        self.seconds = seconds
        self.response = response


Fault = httpx.Response | Exception | str | LateReply


class ScriptedTransport(httpx.AsyncBaseTransport):
    """Wraps a transport: records every request (time on the trio clock,
    path, form) and answers the n-th token-endpoint request (1-based) from
    ``faults[n]`` when present: a response, an exception to raise, or
    :data:`HANG` (never answers)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.faults: dict[int, Fault] = {}
        self.log: list[tuple[float, str, dict[str, str]]] = []
        self.token_requests = 0

    def token_polls(self) -> list[float]:
        return [t for t, path, form in self.log if path == TOKEN_PATH and form.get("grant_type", "").endswith("device_code")]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        form = dict(parse_qsl(body.decode(), keep_blank_values=True))
        self.log.append((trio.current_time(), request.url.path, form))
        if request.url.path == TOKEN_PATH:
            self.token_requests += 1
            fault = self.faults.pop(self.token_requests, None)
            if fault == HANG:
                await trio.sleep_forever()
            if isinstance(fault, Exception):
                raise fault
            if isinstance(fault, httpx.Response):
                return fault
            if isinstance(fault, LateReply):
                if fault.response is not None:
                    await trio.sleep(fault.seconds)
                    return fault.response
                response = await self.inner.handle_async_request(request)
                await trio.sleep(fault.seconds)
                return response
        return await self.inner.handle_async_request(request)


def asgi_client(idp: FakeIdP) -> tuple[httpx.AsyncClient, ScriptedTransport]:
    transport = ScriptedTransport(httpx.ASGITransport(app=idp))
    return httpx.AsyncClient(transport=transport, base_url=idp.base_url), transport


@contextlib.contextmanager
def serve_in_thread(idp: FakeIdP) -> Iterator[str]:
    """Serve ``idp`` on 127.0.0.1 (a free port) from a thread; yield the base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self._serve()

        def do_GET(self) -> None:
            self._serve()

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, out, payload = idp.handle(self.command, self.path.split("?")[0], headers, body)
            self.send_response(status)
            for k, v in out:
                self.send_header(k, v)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output free of request lines

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    idp.base_url = base
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield base
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
