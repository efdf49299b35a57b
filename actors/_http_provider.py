"""What the HTTP providers share: one owned ``httpx.AsyncClient``,
credentials (an API key or a token source), the 401-refresh-once rule,
error mapping, and server-sent events.

Secrets: the key or token is only ever put in a request header.  It is not
in any repr, error message or log line; error bodies are redacted before
they are quoted (see :mod:`actors._http_errors`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import attrs
import httpx
import trio

from messages import (
    ActorStopped,
    AuthenticationFailed,
    BadRequest,
    Completion,
    ConclaveError,
    CompletionRequest,
    ProviderError,
    TokenUsage,
    storable_text,
)
from messages._auth_errors import AuthError, CredentialsUnavailable

from ._consensus import parse_output
from ._format import shown
from ._http_errors import (
    WallClock,
    error_from_redirect,
    error_from_status,
    error_from_transport,
    malformed,
    redact,
    with_usage,
)
from ._provider import BaseProvider, before_resend

DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)
UNCAPPED = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=5.0)
USER_AGENT = "conclave/0.1"


KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


class ProviderConfigError(ConclaveError, ValueError):
    """The provider configuration is invalid; the message says what to fix."""


def shown_url(url: str) -> str:
    """``url`` fit to quote in an error: no userinfo, no query (either may
    hold a secret), and not absurdly long."""
    try:
        parsed = httpx.URL(url)
        text = str(parsed.copy_with(userinfo=b"", query=None, fragment=None))
    except Exception:
        text = url.split("?", 1)[0]
        if "@" in text:
            text = "<redacted>@" + text.rsplit("@", 1)[1]
    return text if len(text) <= 120 else text[:119] + "…"


# What a host name (IDNA-encoded) or an IPv4 address is made of.  httpx
# percent-encodes anything else ('http://a b' became host 'a%20b'), and
# every call then failed as a retryable disconnect.
_HOST = re.compile(r"[A-Za-z0-9._-]+")


def validate_base_url(url: str, *, provider: str, key_hint: str | None = None) -> str:
    """``url`` if it is an absolute http(s) URL with a host, no credentials
    and no fragment; else :class:`ProviderConfigError`.  ``key_hint`` says
    where a key found in the URL belongs (default: the provider's variable)."""
    if not isinstance(url, str):
        raise ProviderConfigError(f"provider {provider!r}: the base URL must be a string, got {type(url).__name__}")
    if not url.strip():
        raise ProviderConfigError(f"provider {provider!r}: the base URL is empty")
    where = f"provider {provider!r}: base URL {shown_url(url)!r}"
    try:
        parsed = httpx.URL(url.strip())
    except Exception:
        raise ProviderConfigError(f"{where} is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise ProviderConfigError(
            f"{where} must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)"
        )
    if not parsed.host:
        raise ProviderConfigError(f"{where} has no host")
    if ":" not in parsed.host and not _HOST.fullmatch(parsed.raw_host.decode("ascii", "replace")):
        # (An IPv6 address, in brackets, has colons and was checked by httpx.)
        raise ProviderConfigError(
            f"{where} has a host name with a character a host name cannot hold (a space, say)"
        )
    if parsed.userinfo:
        hint = key_hint or KEY_ENV.get(provider, "the key variable")
        raise ProviderConfigError(f"{where} must not carry credentials; put the key in {hint}")
    if parsed.fragment:
        raise ProviderConfigError(f"{where} must not have a #fragment")
    try:
        port = parsed.port
    except Exception:
        port = -1
    if port is not None and not 0 < port < 65536:
        # httpx takes any number: 99999 failed only as a ConnectError, per call.
        raise ProviderConfigError(f"{where} has a port outside 1-65535")
    return url.strip()


def header_safe(credential: str) -> bool:
    """Whether ``credential`` can go in an HTTP header as it is: printable
    ASCII without leading or trailing space."""
    return credential.isascii() and credential.isprintable() and credential == credential.strip()


def key_problem(key: str, variable: str) -> str | None:
    """What is wrong with an API key (read from ``variable``), never quoting
    it; None if it can go in an HTTP header.  A newline, spaces only or a
    non-ASCII letter failed every call as an opaque protocol error (one of
    its letters quoted in the error and stored)."""
    if not key.strip():
        return f"{variable} holds only white space, not an API key"
    if not header_safe(key):
        return (
            f"{variable} is not a usable API key: it holds a line break, leading or trailing "
            "space, or a non-ASCII letter (its value is not shown)"
        )
    return None


# Words of header and query parameter names that carry credentials, as APIs
# and gateways spell them: authorization, api-key, x-api-key, x-goog-api-key,
# ocp-apim-subscription-key, x-auth-token, cf-access-client-secret, cookie,
# an Azure SAS 'sig', a '?key=' or '?access_token='.  Whole words of the
# name: searched inside it, 'portkey', 'author' and 'designated' masked a
# provider's, an author's and a model's name in the errors about them.
_CREDENTIAL_WORDS = frozenset({
    "key", "apikey", "token", "auth", "authorization", "secret", "sig", "signature",
    "password", "passwd", "pwd", "credential", "credentials", "cookie", "bearer",
})
_NAME_WORDS = re.compile(r"[-_.\s]+")
# Names whose values are descriptive, never credentials (content-type,
# anthropic-beta, api-version, an organisation or request id): masking
# their echo would hide what a server says was wrong with them.
_PLAIN_NAME = re.compile(
    r"(?i)user-agent|accept(-.*)?|content-.*|.*[-_]version|.*[-_]beta|openai-(organization|project)"
    r"|(x-)?(.*-)?request-id|idempotency-key"
)
# A credential-named value shorter than this is a word or a flag ("true",
# "1"), and masking every occurrence of it would mangle messages.
_MIN_NAMED_SECRET = 6
# A value under any other name is taken for an opaque credential (a key
# under a name we do not know, such as a bypass token) when it is one run
# of 20 or more base64 characters holding letters and digits: a model name,
# a UUID or an 'org-...' id has dashes, and masking those hid the very
# value an error was about.
_OPAQUE_SECRET = re.compile(r"(?=.*[A-Za-z])(?=.*[0-9])[A-Za-z0-9+/=_]{20,}")


def given_secrets(pairs: Iterable[tuple[str | bytes, str | bytes]]) -> list[str]:
    """The values among ``pairs`` (header or query parameter name, value)
    that may be credentials, to redact from error text.  An
    'authorization: Bearer X' also gives X: a server echoes the token alone."""
    found: list[str] = []
    for raw_name, raw_value in pairs:
        # httpx sends bytes names and values as they are: skipped, their
        # credentials were echoed unmasked.
        name = raw_name.decode("latin-1") if isinstance(raw_name, bytes) else raw_name
        value = raw_value.decode("latin-1") if isinstance(raw_value, bytes) else raw_value
        if not isinstance(name, str) or not isinstance(value, str) or _PLAIN_NAME.fullmatch(name):
            continue
        candidates = [value.strip()]
        credentials = value.strip().partition(" ")[2].strip()  # of "Scheme credentials"
        if credentials:
            candidates.append(credentials)
        named = not _CREDENTIAL_WORDS.isdisjoint(_NAME_WORDS.split(name.lower()))
        for candidate in candidates:
            if named and len(candidate) >= _MIN_NAMED_SECRET:
                found.append(candidate)
            elif _OPAQUE_SECRET.fullmatch(candidate):
                found.append(candidate)
    return found


# What reading a well-formed JSON document of the wrong shape raises.
_SHAPE_ERRORS = (AttributeError, TypeError, KeyError, IndexError)


@runtime_checkable
class BearerSource(Protocol):
    """Where a bearer token comes from: anything with this method (the
    device-code login's ``TokenSource`` is one).  ``force_refresh`` asks for
    a new token after the provider rejected the current one with 401."""

    async def bearer(self, *, force_refresh: bool = False) -> str: ...


class _Unauthorized(Exception):
    """Internal: a 401 the caller may answer by refreshing its token."""

    def __init__(self, error: ProviderError) -> None:
        self.error = error


def model_answer(*, content: str, usage: TokenUsage | None, model: str) -> Completion:
    """The :class:`Completion` of a model's reply.  Models do split a
    surrogate pair across JSON escapes ("\\ud83d" alone); such a half is
    shown as U+FFFD rather than failing the call, or the store later."""
    # The model's name is shown on terminals and priced: no control characters.
    return Completion(content=storable_text(content), usage=usage, model=storable_text(shown(model)))


def system_prompt(request: CompletionRequest) -> str:
    """The system message: the answer's shape in words, and once more in a
    machine-readable line (serve-mock reads it; a model may too)."""
    shape = {
        "spec_id": request.spec_id,
        "stage": request.key.stage,
        "agent": request.key.agent,
        "fields": list(request.response_fields),
        "decision_field": request.decision_field,
        "aggregate": request.aggregate,
    }
    return (
        "You are one agent of a Conclave consensus panel. "
        "Reply with exactly one JSON object and nothing else.\n"
        "conclave-request: " + json.dumps(shape, sort_keys=True, separators=(",", ":"))
    )


# No model answer comes near this (an output token limit of 128k tokens is
# about half a MiB); a server sending more is misbehaving, and reading it all
# took gigabytes of memory and stored them (300 MB: 4.4 GB RSS).
MAX_ANSWER_BYTES = 32 * 1024 * 1024
# An error body is read for a 200-character excerpt.
MAX_ERROR_BYTES = 64 * 1024


class _TooLarge(Exception):
    """The response outgrew :data:`MAX_ANSWER_BYTES`."""


async def _read_capped(response: httpx.Response, limit: int, *, cut: bool = False) -> bytes:
    """The body, up to ``limit`` bytes: past it, the first ``limit`` bytes
    if ``cut``, else :class:`_TooLarge`.  Undecodable (a false gzip):
    httpx.DecodingError, as ``aread`` raises it."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            if cut:
                chunks.append(chunk[: limit - (size - len(chunk))])
                break
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_to_cut(response: httpx.Response, limit: int) -> tuple[bytes, httpx.TransportError | None]:
    """The body up to ``limit`` bytes (past it :class:`_TooLarge`), and the
    transport error that cut it short, if one did: the bytes before a cut
    still say what the server said."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise _TooLarge
            chunks.append(chunk)
    except httpx.TransportError as exc:
        return b"".join(chunks), exc
    return b"".join(chunks), None


class _Replay(httpx.AsyncByteStream):
    """Bytes already read, then the cut that ended them, as a body: a stream
    read whole is parsed as it would have been as it arrived."""

    def __init__(self, data: bytes, cut: httpx.TransportError | None) -> None:
        self._data = data
        self._cut = cut

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._data:
            yield self._data
        if self._cut is not None:
            raise self._cut


# SSE ends a line at CRLF, LF or CR, and nowhere else: str.splitlines (and
# so httpx's aiter_lines) also split at U+2028, form feeds and the like,
# which a model's text may hold raw inside a data line's JSON.
_SSE_NEWLINE = re.compile(r"\r\n|\r|\n")
# After the final event, what is left of a stream (the chunked encoding's
# last chunk) is read so the connection goes back to the pool: each streamed
# call opened a new one (a new TLS handshake on a real provider).  Bounded,
# as a server may send [DONE] and then stall or keep talking.
DRAIN_SECONDS = 0.5
DRAIN_BYTES = 64 * 1024


class EventStream:
    """The server-sent events of ``response``: ``async for event, data in
    stream`` gives ``(event, data)`` for each complete event; an event the
    stream ended in the middle of is dropped, never half-delivered.  A
    stream past :data:`MAX_ANSWER_BYTES` raises :class:`_TooLarge` as the
    bytes arrive (a line without an end is not held whole first: 300 MB
    without a newline took 660 MB before it was refused).

    A reader that stops at the final event calls :meth:`drain` to hand the
    connection back for reuse."""

    def __init__(self, response: httpx.Response) -> None:
        self._text = response.aiter_text()
        self._size = 0

    def __aiter__(self) -> AsyncIterator[tuple[str, str]]:
        return self._events()

    async def _lines(self) -> AsyncIterator[str]:
        parts: list[str] = []  # the line in progress, unjoined (a long line is not copied per chunk)
        after_cr = False  # the last chunk ended in CR: a leading LF completes a CRLF
        async for text in self._text:
            self._size += len(text)
            if self._size > MAX_ANSWER_BYTES:
                raise _TooLarge
            if after_cr and text.startswith("\n"):
                text = text[1:]
            after_cr = False
            last = max(text.rfind("\n"), text.rfind("\r"))
            if last < 0:
                parts.append(text)
                continue
            head = "".join(parts) + text[: last + 1]
            parts = [text[last + 1 :]]
            # Only a CR that ends the chunk may be the first half of a CRLF
            # (one earlier, with text after it, is a line end of its own).
            after_cr = last == len(text) - 1 and text[last] == "\r"
            for line in _SSE_NEWLINE.split(head)[:-1]:
                yield line
        rest = "".join(parts)
        if rest:
            yield rest

    async def _events(self) -> AsyncIterator[tuple[str, str]]:
        event, data = "message", list[str]()
        async for line in self._lines():
            if not line:
                if data:
                    yield event, "\n".join(data)
                event, data = "message", list[str]()
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)

    async def drain(self) -> None:
        """Read the rest of the stream, for at most :data:`DRAIN_SECONDS`
        and :data:`DRAIN_BYTES`; anything wrong is ignored (the answer is
        complete; the connection is then closed, not reused)."""
        with trio.move_on_after(DRAIN_SECONDS):
            left = DRAIN_BYTES
            try:
                async for text in self._text:
                    left -= len(text)
                    if left < 0:
                        return
            except (httpx.HTTPError, httpx.StreamError):
                return


def iter_sse(response: httpx.Response) -> EventStream:
    """The events of ``response`` (see :class:`EventStream`)."""
    return EventStream(response)


# The stop reasons that mean the model ran into its output token limit
# (OpenAI's finish_reason, Anthropic's stop_reason).
_CUT = frozenset({"length", "max_tokens"})


class HttpProvider(BaseProvider):
    """Base of the HTTP providers.  Subclasses say where to POST, what to
    send, and how to read a plain or streamed answer."""

    name = "http"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None = None,
        token_source: BearerSource | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        stream: bool = True,
        headers: Mapping[str, str] | None = None,
        name: str | None = None,
        model: str | None = None,
        wall_now: WallClock = time.time,
        limits: httpx.Limits | None = None,
    ) -> None:
        # The checks build_provider makes, made here too: a provider built
        # directly took a key with a non-ASCII letter (every call then
        # failed naming one of its letters and its position) and a base URL
        # without a scheme (every call a retryable disconnect).
        label = name if name is not None else self.name
        if (api_key is None) == (token_source is None):
            raise ProviderConfigError(f"provider {label!r}: give exactly one of api_key and token_source")
        if api_key is not None:
            if not isinstance(api_key, str) or not api_key:
                raise ProviderConfigError(f"provider {label!r}: api_key must be a non-empty string")
            problem = key_problem(api_key, "api_key")
            if problem is not None:
                raise ProviderConfigError(f"provider {label!r}: {problem}")
        # Credentials in it would ride along in reprs, errors, progress
        # events and the database (a 404 names its URL).
        base_url = validate_base_url(base_url, provider=label, key_hint="api_key (or give a token_source)")
        self.base_url = httpx.URL(base_url)
        self.stream = stream
        self.model = model  # when set, every call uses this model, whatever the agent asked
        if name is not None:
            self.name = name
        self._api_key = api_key
        self._token_source = token_source
        self._last_token: str | None = None
        self._headers = {"user-agent": USER_AGENT, **(headers or {})}
        # Besides the key and the token: what the user gave in headers
        # (an Azure 'api-key', an 'authorization') or in the base URL's
        # query ('?key='), which a server echoing the request quotes in its
        # error - then shown, and stored with the run.
        self._given_secrets = given_secrets([*(headers or {}).items(), *self.base_url.params.multi_items()])
        self._wall_now = wall_now
        # No connection cap of httpx's own (100, and 20 kept idle): the
        # gateway bounds the calls in flight (Limits.max_concurrency), and
        # past httpx's cap the 101st call waited for a connection, timed
        # out as if the provider had, and opened the breaker.
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=timeout,
            limits=limits if limits is not None else UNCAPPED,
        )

    def __repr__(self) -> str:
        cred = "api_key=<hidden>" if self._api_key is not None else "token_source=<hidden>"
        shown = str(self.base_url.copy_with(query=None))  # a query may hold a key
        return f"{type(self).__name__}(name={self.name!r}, base_url={shown!r}, {cred})"

    # -- subclass hooks ------------------------------------------------------

    def endpoint(self) -> httpx.URL:
        raise NotImplementedError

    def auth_headers(self, secret: str, *, is_token: bool) -> dict[str, str]:
        return {"authorization": f"Bearer {secret}"}

    def request_body(self, request: CompletionRequest) -> dict[str, Any]:
        raise NotImplementedError

    def parse_body(self, request: CompletionRequest, data: Any) -> Completion:
        raise NotImplementedError

    async def read_stream(self, request: CompletionRequest, response: httpx.Response) -> Completion:
        raise NotImplementedError

    def output_limit(self) -> str:
        """How this provider's output token limit is set, for the error
        that says an answer hit it ("" when the server's default applies)."""
        return ""

    def finished(self, request: CompletionRequest, completion: Completion, stop: object) -> Completion:
        """``completion``, unless the model was stopped by its output token
        limit (``stop`` is ``length`` or ``max_tokens``) before the JSON
        object the request asks for was complete.  Such an answer counted
        as an agent without its fields, and nobody learnt why; a retry
        would be cut the same way and paid again.  So it is a permanent
        BadRequest that says so, carrying the usage (the tokens were billed)."""
        if stop not in _CUT or not request.response_fields or parse_output(completion.content) is not None:
            return completion
        limit = self.output_limit()
        raise with_usage(
            BadRequest(
                f"{self.name}: the answer was cut at the output token limit (stop reason {stop!r}) "
                f"after {len(completion.content)} characters, before its JSON object closed"
                + (f"; {limit}" if limit else "")
            ),
            completion.usage,
            model=completion.model,
        )

    def cut_mid_stream(self, exc: httpx.TransportError, usage: TokenUsage | None, model: str) -> ProviderError:
        """The error for a connection that failed while a stream was read:
        what the stream had said (its usage, the model it named) still
        counts.  A chunked body cut after the usage chunk lost it, while the
        same cut at a clean end of body kept it."""
        error = error_from_transport(exc, provider=self.name, streaming=True, secrets=self._secrets())
        return with_usage(error, usage if usage is not None else getattr(error, "usage", None), model=model)

    # -- the seam ------------------------------------------------------------

    def _secrets(self) -> list[str]:
        secrets = {s for s in (self._api_key, self._last_token, *self._given_secrets) if s}
        # Longest first: a secret holding a shorter one is masked whole,
        # not left in pieces around the shorter one's mask.
        return sorted(secrets, key=lambda s: (-len(s), s))

    def _source_failure(self, exc: Exception) -> str:
        """What the token source's ``exc`` may say in an error that is shown
        and stored.  An :class:`AuthError`'s text never holds a token (its
        contract), nor does Conclave's own ActorStopped ("the auth actor has
        stopped"); of an OS error, the system's words for its errno are
        said, not its text (a source can build one quoting anything).  Any
        other text is the user's source's own, and may quote the token it
        failed to refresh or a refresh token, which no known secret masks
        (only the tokens it handed out are known): "refresh failed for
        tok-..." was stored with the run.  So of that, only the type is
        said, as the token manager does for a failure it did not foresee."""
        name = type(exc).__name__
        if isinstance(exc, (AuthError, ActorStopped)):
            return f"{name}: {redact(str(exc), self._secrets())}"
        if isinstance(exc, OSError) and isinstance(exc.errno, int):
            return f"{name}: {os.strerror(exc.errno)}"
        return f"{name} (its message is not shown: it may hold a credential)"

    async def _credential(self, *, force_refresh: bool) -> tuple[str, bool]:
        if self._api_key is not None:
            return self._api_key, False
        assert self._token_source is not None
        try:
            token = await self._token_source.bearer(force_refresh=force_refresh)
        except ProviderError:
            raise
        except Exception as exc:
            raise AuthenticationFailed(f"{self.name}: no token: {self._source_failure(exc)}") from None
        # Checked before anything is sent or kept: bytes or an int went out
        # as a malformed header, then failed as the provider's own bug
        # (redact() given a non-str); a non-ASCII letter escaped as a
        # UnicodeEncodeError naming its position, a line break was sent.
        # The value is never quoted: it may be a token all the same.
        if token is not None and not isinstance(token, str):
            raise CredentialsUnavailable(
                f"{self.name}: the token source returned {type(token).__name__}, not a str token "
                "(its value is not shown)",
                provider=self.name,
            )
        if not token:
            raise AuthenticationFailed(f"{self.name}: the token source gave an empty token")
        if not header_safe(token):
            raise CredentialsUnavailable(
                f"{self.name}: the token source returned a token an HTTP header cannot carry: it holds "
                "a line break, leading or trailing space, or a non-ASCII letter (its value is not shown)",
                provider=self.name,
            )
        self._last_token = token
        return token, True

    async def complete(self, request: CompletionRequest) -> Completion:
        if self.model is not None and request.model != self.model:
            request = attrs.evolve(request, model=self.model)
            try:
                completion = await self._complete(request)
            except ProviderError as error:
                # A failed call that was billed is priced as its answer
                # would be: by the model asked for when the server's name
                # for it is unknown (it fell back to the agent's).
                setattr(error, "requested_model", self.model)  # noqa: B010
                raise
            return attrs.evolve(completion, requested_model=self.model)
        return await self._complete(request)

    async def _complete(self, request: CompletionRequest) -> Completion:
        body = self.request_body(request)
        secret, is_token = await self._credential(force_refresh=False)
        try:
            return await self._attempt(request, body, secret, is_token, may_refresh=is_token)
        except _Unauthorized:
            pass
        # One 401 with a token source: refresh once and try once more,
        # admitted afresh (the gate may have closed during the refresh).
        secret, is_token = await self._credential(force_refresh=True)
        await before_resend()
        try:
            return await self._attempt(request, body, secret, is_token, may_refresh=False)
        except _Unauthorized as unauthorized:  # pragma: no cover - may_refresh=False
            raise unauthorized.error from None

    async def _attempt(
        self,
        request: CompletionRequest,
        body: dict[str, Any],
        secret: str,
        is_token: bool,
        *,
        may_refresh: bool,
    ) -> Completion:
        headers = {**self._headers, **self.auth_headers(secret, is_token=is_token)}
        try:
            async with self._client.stream("POST", self.endpoint(), json=body, headers=headers) as response:
                if response.status_code >= 400:
                    try:
                        raw = await _read_capped(response, MAX_ERROR_BYTES, cut=True)
                    except (httpx.DecodingError, httpx.TransportError):
                        # The status still says what happened: a 429 with a
                        # false gzip was retried at once as "malformed", and
                        # one whose body broke off as a disconnect - its
                        # retry-after lost, the gate left open.
                        raw = b""
                    error = error_from_status(
                        response.status_code,
                        response.headers,
                        raw,
                        provider=self.name,
                        secrets=self._secrets(),
                        wall_now=self._wall_now,
                        url=str(self.endpoint().copy_with(query=None)),
                    )
                    if response.status_code == 401 and may_refresh:
                        raise _Unauthorized(error)
                    raise error
                if 300 <= response.status_code < 400:
                    # httpx does not follow redirects (they would carry the
                    # key elsewhere): say where, once, rather than "not JSON".
                    raise error_from_redirect(
                        response.status_code,
                        response.headers.get("location", ""),
                        provider=self.name,
                        base_url=self.base_url,
                        endpoint=self.endpoint(),
                        secrets=self._secrets(),
                    )
                kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if self.stream and kind == "text/html":
                    # A proxy's or portal's page: not a stream that was cut.
                    # (Other types are read as a stream: sloppy servers send
                    # events as text/plain.)
                    raise malformed(self.name, f"expected an event stream, got {kind}")
                whole: bytes | None = None
                # An event stream answers a plain request too: proxies that
                # always stream made every --no-stream call malformed, each
                # one billed, while the converse was already read.
                if (self.stream and kind != "application/json") or kind == "text/event-stream":
                    # (A server that ignores "stream": true answers with one
                    # JSON document: read below, as a plain answer.)
                    events = response
                    if kind != "text/event-stream":
                        # Sloppy servers label both events and a plain JSON
                        # answer text/plain (or nothing); the answer was
                        # read as a stream without events, "cut", retried
                        # and paid again.  Read it whole to tell them apart.
                        whole, cut = await _read_to_cut(response, MAX_ANSWER_BYTES)
                        if cut is not None and whole.lstrip().startswith(b"{"):
                            raise cut
                        # Events cut short are replayed with their cut, so
                        # the usage read before it counts, as it does for
                        # an event stream.
                        events = httpx.Response(
                            response.status_code, stream=_Replay(whole, cut), request=response.request
                        )
                    if whole is None or not whole.lstrip().startswith(b"{"):
                        try:
                            return await self.read_stream(request, events)
                        except _SHAPE_ERRORS:
                            # A chunk of JSON but not of the expected shape
                            # (a "delta" that is a string, "choices" a
                            # number): the provider misbehaved, as with
                            # invalid JSON.
                            raise malformed(self.name, "a stream event of an unexpected shape") from None
                raw = whole if whole is not None else await _read_capped(response, MAX_ANSWER_BYTES)
        except httpx.TransportError as exc:
            raise error_from_transport(exc, provider=self.name, streaming=self.stream, secrets=self._secrets()) from None
        except httpx.DecodingError:
            raise malformed(self.name, "undecodable body") from None
        except _TooLarge:
            raise malformed(self.name, f"the answer is larger than {MAX_ANSWER_BYTES // 2**20} MiB") from None
        # RecursionError: JSON nested past the parser's depth ("[" * 100000)
        # is a body we cannot read, as invalid JSON is; it escaped as the
        # provider's own bug, never retried.
        try:
            try:
                data = json.loads(raw)
            except UnicodeDecodeError:
                # Streamed, the same bytes were read with U+FFFD; plain, the
                # whole answer (and its usage) was lost.
                data = json.loads(raw.decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            raise malformed(self.name, f"body is not JSON: {kind or 'no content type'}, {len(raw)} bytes") from None
        try:
            return self.parse_body(request, data)
        except _SHAPE_ERRORS:
            raise malformed(self.name, "JSON of an unexpected shape") from None

    async def aclose(self) -> None:
        await self._client.aclose()
