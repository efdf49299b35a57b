"""The OAuth 2.0 device authorization grant (RFC 8628) and refresh (RFC 6749 §6).

Everything goes through one ``httpx.AsyncClient`` (give it a
``MockTransport``/``ASGITransport`` in tests), every request is
form-encoded, and time is ``trio.current_time()``/``trio.sleep`` only, so
the whole flow runs on a virtual clock.

Decisions are made on the body's ``error`` field, not on the status (a
pending poll comes with 400, 428 or 200 depending on the server): a body
with ``access_token`` is a grant, a body with ``error`` is an OAuth error.
The one exception: a 5xx or 429 is transient whatever its body says (a
proxy's or gateway's 503 ``{"error": "server_error"}`` or 429
``{"error": "rate_limited"}`` ended the login and failed the refresh for
good); while polling, ``authorization_pending`` and ``slow_down`` keep their
meaning there.  A body with neither is judged by its status alone (5xx/429
transient, anything else a protocol error).

The poll loop is cancellable at every await and stores nothing: storing is
the caller's job, after :meth:`DeviceFlow.poll` has returned.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import attrs
import httpx
import trio

from messages._auth_errors import (
    AuthProtocolError,
    LoginDenied,
    LoginExpired,
    LoginRequired,
    RefreshUnavailable,
)
from messages._auth_messages import AuthEvent, AuthEventKind, Secret, optional_secret, secret

from ._auth_profiles import AuthProfile
from ._http_errors import redact

log = logging.getLogger("conclave.auth")

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_INTERVAL = 5.0
SLOW_DOWN_STEP = 5.0
TRANSIENT_ERRORS = frozenset({"temporarily_unavailable"})

EventSink = Callable[[AuthEvent], None]


@attrs.frozen(kw_only=True, slots=True)
class DeviceAuthorization:
    """The device authorization response (RFC 8628 §3.2)."""

    device_code: Secret = attrs.field(repr=False, converter=secret)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None = None
    expires_in: float
    interval: float = DEFAULT_INTERVAL
    message: str | None = None

    @property
    def display_uri(self) -> str:
        return self.verification_uri_complete or self.verification_uri


@attrs.frozen(kw_only=True, slots=True)
class TokenGrant:
    """A successful token response (RFC 6749 §5.1)."""

    access_token: Secret = attrs.field(converter=secret)
    refresh_token: Secret | None = attrs.field(default=None, converter=optional_secret)
    expires_in: float | None = None
    scope: str | None = None
    token_type: str = "Bearer"


def read_body(response: httpx.Response) -> dict[str, Any] | None:
    """The body as a dict (JSON, or form-encoded as GitHub does without
    ``Accept: application/json``), or ``None`` if it is neither."""
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    text = response.text
    if content_type == "application/x-www-form-urlencoded":
        try:
            pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            return None
        return dict(pairs)
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):  # deeply nested: ``[[[[...`` from a hostile server
        return None
    return body if isinstance(body, dict) else None


# The fastest polling a server can ask for: 0.001 s made thousands of
# token requests a minute.
MIN_INTERVAL = 1.0


def clamp_interval(interval: float, lifetime: float) -> float:
    """A polling interval between :data:`MIN_INTERVAL` and half the code's
    ``lifetime``, so at least one poll comes before the code expires (an
    interval clamped to the lifetime itself put the first poll at the
    deadline: the code expired without a single poll, approved or not).
    A code living under two seconds gets polled faster than the minimum,
    but at most twice."""
    return min(max(interval, MIN_INTERVAL), lifetime / 2)


# Ten years: beyond any real access token's lifetime.
MAX_TOKEN_LIFETIME = 10 * 365 * 86400.0


def _number(value: Any, default: float | None) -> float | None:
    if isinstance(value, bool):
        return default
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return default
        return number if math.isfinite(number) else default
    return default


def _shown(text: str, limit: int = 200) -> str:
    """A server's words as safe to print: an ESC or newline from the
    network must not drive the user's terminal or forge a line of output."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _overloaded(response: httpx.Response) -> bool:
    """A 5xx or 429: the server (or a proxy in front of it) cannot answer
    now, whatever error its body names; worth retrying."""
    return response.status_code >= 500 or response.status_code == 429


def _network_trouble(exc: httpx.RequestError, secrets: Iterable[Secret | None] = ()) -> str:
    """What went wrong on the way, safe to show: the exception's kind and
    its words ("ConnectError: [Errno 111] Connection refused"); the kind
    alone left the user guessing between a refused port, DNS and TLS."""
    hidden = [value.reveal() for value in secrets if value is not None]
    words = _shown(redact(" ".join(str(exc).split()), hidden))[:200]
    return f"{type(exc).__name__}: {words}" if words else type(exc).__name__


def _describe(body: Mapping[str, Any], code: str, secrets: Iterable[Secret | None] = ()) -> str:
    """The server's error and its description, safe to show: servers echo
    what they were sent ("unknown device_code ...", "bad refresh_token ...
    for client ..."), and this text reaches the terminal, logs and the run
    database, so every secret of the request (``secrets``) and anything
    token-shaped is masked first, as the HTTP providers do."""
    hidden = [value.reveal() for value in secrets if value is not None]
    description = body.get("error_description")
    if isinstance(description, str) and description:
        return f"{_shown(redact(code, hidden))}: {_shown(redact(description, hidden))}"
    return _shown(redact(code, hidden))


def parse_grant(body: Mapping[str, Any], provider: str) -> TokenGrant:
    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        raise AuthProtocolError("the token response has no access_token", provider=provider)
    refresh = body.get("refresh_token")
    scope = body.get("scope")
    token_type = body.get("token_type")
    expires_in = _number(body.get("expires_in"), None)
    if expires_in is not None:
        # A negative lifetime is taken at its word (expired: refresh before
        # use), not as "never expires"; an absurd one is cut to what a date
        # can show (1e20 stored the tokens, then failed the login and every
        # later 'auth status' with OverflowError).
        expires_in = min(max(expires_in, 0.0), MAX_TOKEN_LIFETIME)
    return TokenGrant(
        access_token=Secret(access),
        refresh_token=Secret(refresh) if isinstance(refresh, str) and refresh else None,
        expires_in=expires_in,
        # Both are stored and shown by 'auth status': cleaned here, once,
        # as the server's error text is.
        scope=_shown(scope, 2000) if isinstance(scope, str) else None,
        token_type=_shown(token_type, 40) if isinstance(token_type, str) and token_type else "Bearer",
    )


def _client_auth(profile: AuthProfile) -> dict[str, str]:
    # client_secret_post: Google wants the secret on every token request.
    form = {"client_id": profile.client_id or ""}
    if profile.client_secret is not None:
        form["client_secret"] = profile.client_secret.reveal()
    return form


def _headers(profile: AuthProfile) -> dict[str, str]:
    return {"Accept": "application/json"} if profile.accept_json else {}


class DeviceFlow:
    """One device-code login against ``profile``.

    ``on_event`` is called (synchronously, from the flow's task) with an
    :class:`AuthEvent` for the user code, each poll outcome and the end.
    ``max_backoff`` caps the doubling wait after transient failures.
    ``start_timeout`` bounds the whole device authorization request, on
    trio's clock (httpx's timeouts are per read: a server sending a byte
    every few seconds never trips them).
    """

    def __init__(
        self,
        profile: AuthProfile,
        client: httpx.AsyncClient,
        *,
        on_event: EventSink | None = None,
        max_backoff: float = 60.0,
        start_timeout: float = 60.0,
    ) -> None:
        self.device_url, self.token_url, _ = profile.require_endpoints()
        self.profile = profile
        self._client = client
        self._on_event = on_event
        self._max_backoff = max_backoff
        self._start_timeout = start_timeout

    async def _post(self, url: str, form: Mapping[str, str], deadline: float) -> httpx.Response | None:
        """POST ``form``; ``None`` if the whole exchange, body included, is
        not over by ``deadline`` (trio's clock)."""
        with trio.move_on_at(deadline):
            return await self._client.post(url, data=form, headers=_headers(self.profile))
        return None

    def _emit(self, kind: AuthEventKind, detail: str = "", **fields: Any) -> None:
        log.debug("auth %s: %s %s", self.profile.name, kind, detail)
        if self._on_event is not None:
            self._on_event(
                AuthEvent(provider=self.profile.name, kind=kind, at=trio.current_time(), detail=detail, **fields)
            )

    async def start(self) -> DeviceAuthorization:
        """Ask for a device code and user code (RFC 8628 §3.1)."""
        form = _client_auth(self.profile)
        if self.profile.scope:
            form["scope"] = self.profile.scope
        name = self.profile.name
        try:
            response = await self._post(self.device_url, form, trio.current_time() + self._start_timeout)
        except httpx.RequestError as exc:  # a garbled body (DecodingError) too
            raise AuthProtocolError(
                f"could not reach the device authorization endpoint {self.device_url}: "
                f"{_network_trouble(exc, [self.profile.client_secret])}",
                provider=name,
            ) from None
        if response is None:
            raise AuthProtocolError(
                f"the device authorization endpoint {self.device_url} did not answer "
                f"within {self._start_timeout:g} s",
                provider=name,
            )
        body = read_body(response)
        if body is None:
            raise AuthProtocolError(
                f"the device authorization endpoint answered {response.status_code} with a body that is not valid JSON",
                provider=name,
            )
        if "error" in body:
            raise AuthProtocolError(
                "the device authorization request was refused: "
                f"{_describe(body, str(body['error']), [self.profile.client_secret])}",
                provider=name,
            )
        device_code = body.get("device_code")
        user_code = body.get("user_code")
        # Google says verification_url.
        uri = body.get("verification_uri") or body.get("verification_url")
        complete = body.get("verification_uri_complete")
        expires_in = _number(body.get("expires_in"), None)
        if not (isinstance(device_code, str) and device_code and isinstance(user_code, str) and user_code):
            raise AuthProtocolError("the device authorization response lacks device_code or user_code", provider=name)
        if not isinstance(uri, str) or not uri:
            raise AuthProtocolError("the device authorization response has no verification URI", provider=name)
        # Both are shown for the user to type: a control character in them
        # (an ESC sequence) would drive the terminal instead.
        if not user_code.isprintable():
            raise AuthProtocolError("the device authorization response's user_code has control characters", provider=name)
        for field, value in (("verification_uri", uri), ("verification_uri_complete", complete)):
            if isinstance(value, str) and not (value.isprintable() and value.split() == [value]):
                raise AuthProtocolError(
                    f"the device authorization response's {field} has spaces or control characters", provider=name
                )
        if expires_in is None or expires_in <= 0:
            raise AuthProtocolError("the device authorization response has no valid expires_in", provider=name)
        interval = _number(body.get("interval"), DEFAULT_INTERVAL)
        message = body.get("message")
        auth = DeviceAuthorization(
            device_code=Secret(device_code),
            user_code=user_code,
            verification_uri=uri,
            verification_uri_complete=complete if isinstance(complete, str) and complete else None,
            expires_in=expires_in,
            interval=clamp_interval(interval if interval is not None and interval > 0 else DEFAULT_INTERVAL, expires_in),
            message=_shown(message, 500) if isinstance(message, str) else None,
        )
        self._emit(
            "code_issued",
            f"enter {auth.user_code} at {auth.verification_uri}",
            user_code=auth.user_code,
            verification_uri=auth.verification_uri,
            verification_uri_complete=auth.verification_uri_complete,
            interval=auth.interval,
        )
        return auth

    async def poll(self, auth: DeviceAuthorization) -> TokenGrant:
        """Poll the token endpoint until the user decides or the code expires.

        The first poll comes one interval after the code was issued.
        Raises :class:`LoginDenied`, :class:`LoginExpired` or
        :class:`AuthProtocolError`; cancellation stops it at once.
        """
        name = self.profile.name
        interval = auth.interval
        deadline = trio.current_time() + auth.expires_in
        failures = 0  # consecutive transient failures
        form = {"grant_type": DEVICE_CODE_GRANT, "device_code": auth.device_code.reveal(), **_client_auth(self.profile)}
        expired_hint = f"run 'conclave login {name}' again to get a new code"
        secrets = (auth.device_code, self.profile.client_secret)
        while True:
            # The exponent is capped: 2**1024 does not fit a float, and a
            # login through a long outage crashed with OverflowError.
            wait = interval if failures == 0 else min(max(self._max_backoff, interval), interval * 2.0 ** min(failures, 32))
            await trio.sleep_until(min(trio.current_time() + wait, deadline))
            response: httpx.Response | None = None
            if trio.current_time() < deadline:
                try:
                    # Bounded by the code's deadline: a server trickling
                    # its answer a byte at a time kept the login waiting
                    # long after the code had expired.
                    response = await self._post(self.token_url, form, deadline)
                except httpx.RequestError as exc:  # a garbled body (DecodingError) too
                    failures += 1
                    self._emit("backoff", f"network error ({type(exc).__name__}); retrying", interval=interval)
                    continue
            if response is None:
                self._emit("expired", "the device code expired before it was approved")
                raise LoginExpired("the device code expired before it was approved", provider=name, hint=expired_hint)
            body = read_body(response)
            code = body.get("error") if body is not None else None
            if body is not None and code is None and "access_token" in body:
                grant = parse_grant(body, name)
                self._emit("logged_in", "authorization granted")
                return grant
            canonical = self.profile.canonical_error(code) if isinstance(code, str) else None
            if _overloaded(response) and canonical not in ("authorization_pending", "slow_down"):
                failures += 1
                self._emit("backoff", f"server answered {response.status_code}; retrying", interval=interval)
                continue
            if not isinstance(code, str):
                what = "a body that is not valid JSON" if body is None else "neither a token nor an error"
                self._emit("failed", f"the token endpoint answered {response.status_code} with {what}")
                raise AuthProtocolError(
                    f"the token endpoint answered {response.status_code} with {what}", provider=name
                )
            if canonical in TRANSIENT_ERRORS:
                failures += 1
                self._emit("backoff", f"{_describe({}, code, secrets)}; retrying", interval=interval)
                continue
            failures = 0
            if canonical == "authorization_pending":
                self._emit("pending", "waiting for the user", interval=interval)
                continue
            if canonical == "slow_down":
                # RFC 8628 §3.5: +5 s for this and every later poll; GitHub
                # sends the new interval itself, which we take if larger
                # than that (never less than +5 s).
                offered = _number(body.get("interval") if body else None, None)
                interval = clamp_interval(max(interval + SLOW_DOWN_STEP, offered or 0.0), auth.expires_in)
                self._emit("slow_down", f"polling every {interval:g} s", interval=interval)
                continue
            if canonical == "access_denied":
                self._emit("denied", _describe(body or {}, code, secrets))
                raise LoginDenied("the authorization request was denied", provider=name)
            if canonical == "expired_token":
                self._emit("expired", _describe(body or {}, code, secrets))
                raise LoginExpired("the device code expired before it was approved", provider=name, hint=expired_hint)
            self._emit("failed", _describe(body or {}, code, secrets))
            raise AuthProtocolError(
                f"the authorization server ended the login: {_describe(body or {}, code, secrets)}", provider=name
            )


async def refresh_grant(
    client: httpx.AsyncClient,
    *,
    provider: str,
    token_url: str,
    client_id: str | None,
    refresh_token: Secret,
    client_secret: Secret | None = None,
    accept_json: bool = True,
    also_hide: Iterable[Secret] = (),
) -> TokenGrant:
    """Exchange a refresh token (RFC 6749 §6).

    ``also_hide``: more secrets (the access token being replaced) to mask
    in the server's error text, besides the refresh token and client secret.

    ``invalid_grant`` raises :class:`LoginRequired` (terminal: the caller
    drops the tokens); network errors, 5xx and 429 (whatever the body
    says) and ``temporarily_unavailable`` raise :class:`RefreshUnavailable`;
    anything else :class:`AuthProtocolError`.
    """
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token.reveal()}
    if client_id:
        form["client_id"] = client_id
    if client_secret is not None:
        form["client_secret"] = client_secret.reveal()
    headers = {"Accept": "application/json"} if accept_json else {}
    try:
        response = await client.post(token_url, data=form, headers=headers)
    except httpx.RequestError as exc:  # a garbled body (DecodingError) too
        raise RefreshUnavailable(
            f"could not reach {token_url} to refresh the {provider} token: "
            f"{_network_trouble(exc, [refresh_token, client_secret])}",
            provider=provider,
        ) from None
    body = read_body(response)
    code = body.get("error") if body is not None else None
    if body is not None and code is None and "access_token" in body:
        return parse_grant(body, provider)
    if _overloaded(response) or (isinstance(code, str) and code in TRANSIENT_ERRORS):
        # (isinstance first: an "error" that is an object or a list is
        # unhashable, and the TypeError killed the auth actor.)
        raise RefreshUnavailable(
            f"refreshing the {provider} token failed with {response.status_code}; will retry", provider=provider
        )
    if code == "invalid_grant":
        raise LoginRequired(
            f"the {provider} refresh token was rejected (invalid_grant)",
            provider=provider,
            hint=f"run 'conclave login {provider}'",
        )
    what = _describe(body, code, [refresh_token, client_secret, *also_hide]) if body is not None and isinstance(code, str) else (
        f"{response.status_code} with a body that is not a valid token response"
    )
    raise AuthProtocolError(f"refreshing the {provider} token failed: {what}", provider=provider)
