"""HTTP status, headers and transport failures -> Conclave's typed errors.

Real providers, serve-mock and the fault interceptor must look alike to an
agent, so every HTTP failure becomes one of :mod:`messages`' errors:

==========================================  ================================
429 (+ reset hint)                          RateLimited(retry_after=seconds)
429 with ``insufficient_quota``             QuotaExceeded
408, httpx timeouts                         ProviderTimeout
connect refused/reset, stream cut short     Disconnected
409, 500-504, 529                           ProviderUnavailable
401, 403                                    AuthenticationFailed
404 not naming a model, 3xx (not followed)  NotFound (a wrong base URL)
400, 422 (and other 4xx)                    BadRequest (short, redacted body)
==========================================  ================================

An error object sent with status 200 (mid-stream, or by a lax server) is
judged by its own kind by the provider that reads it.

``x-should-retry: true`` makes any status retryable, ``false`` stops the
retries of one that may pass (the official SDKs do the same); ``false`` keeps
a 408, 429 or 5xx the kind it is (see :func:`not_retried`).  Each error
carries ``.usage``: zero when the
server answered with an error status (nothing was generated), ``None``
(unknown) when the request may have reached the model and the answer was
lost - a read timeout or a stream cut short.

Reset hints, first found wins: ``retry-after-ms``; ``retry-after`` as
seconds or an HTTP-date; the OpenAI ``x-ratelimit-reset-{requests,tokens}``
Go durations (``6m0s``); the Anthropic ``anthropic-ratelimit-*-reset`` RFC
3339 timestamps.  Of several resets, the one whose ``remaining`` is 0 is
used, else the latest.  Dates are read against a wall clock the caller
passes (``wall_now``), since they are meaningless on trio's virtual clock.
"""

from __future__ import annotations

import functools
import json
import re
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from messages import (
    ZERO_USAGE,
    AuthenticationFailed,
    BadRequest,
    NotFound,
    Disconnected,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    QuotaExceeded,
    RateLimited,
    TokenUsage,
    parse_duration,
    parse_rfc3339,
    parse_seconds,
)

from ._format import shown

WallClock = Callable[[], float]

_EXCERPT = 200
_SECRET_PATTERNS = (
    re.compile(r"sk-[A-Za-z0-9_\-]{6,}"),  # OpenAI / Anthropic style keys
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=\-]{6,}"),
    re.compile(r'(?i)("?(?:api[_-]?key|x-api-key|authorization|access_token|refresh_token)"?\s*[:=]\s*"?)[^"\s,}]+'),
)


def _hex_digit(digit: str) -> str:
    return f"[{digit.upper()}{digit.lower()}]" if digit.isalpha() else digit


@functools.lru_cache(maxsize=64)
def _secret_pattern(secret: str) -> re.Pattern[str]:
    """``secret`` as it is, or percent-encoded in any part (either hex
    case; a space also as '+'): a server that echoes the key it was sent
    as a query parameter or form field quotes it URL-encoded, and
    'Xy9%2Fabc%2BDEF%3Dghij12345' passed for a key 'Xy9/abc+DEF=...'."""
    parts = []
    for char in secret:
        encoded = "".join("%" + "".join(map(_hex_digit, f"{byte:02X}")) for byte in char.encode())
        spellings = [re.escape(char), encoded] + ([r"\+"] if char == " " else [])
        parts.append("(?:" + "|".join(spellings) + ")")
    return re.compile("".join(parts))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with the given secrets (as they are or URL-encoded) and
    anything key-shaped masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[REDACTED]")
            if "%" in text or ("+" in text and " " in secret):
                # Only then can an encoded form be there; the pattern can
                # take seconds on contrived text, str.replace never does.
                text = _secret_pattern(secret).sub("[REDACTED]", text)
    for pattern in _SECRET_PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(1) + "[REDACTED]", text)
        else:
            text = pattern.sub("[REDACTED]", text)
    return text


def body_excerpt(body: bytes, secrets: Iterable[str] = ()) -> str:
    """A short, one-line, redacted excerpt of an error body.  A JSON error
    object's ``message`` is preferred over the raw text."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        # Nested past the parser's depth: quoted as text.  Raised, it lost
        # a 429's reset hint and its zero usage (the call failed as the
        # provider's own bug).
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            text = err["message"]
        elif isinstance(err, str):
            text = err
    # One line, and no control character: it is shown on terminals (an
    # ESC in a server's message drove the user's).
    text = shown(" ".join(redact(text, secrets).split()))
    return text if len(text) <= _EXCERPT else text[: _EXCERPT - 1] + "…"


def _seconds(value: str | None) -> float | None:
    return None if value is None else parse_seconds(value)


def _http_date(value: str, wall_now: float) -> float | None:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # The asctime form and "-0000" come back without a zone; every
        # HTTP-date is GMT (RFC 9110 5.6.7).  Read as local time, a 30 s
        # hint was 8 hours under TZ=America/Los_Angeles, or nothing.
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - wall_now)


def _rfc3339(value: str, wall_now: float) -> float | None:
    when = parse_rfc3339(value)
    return None if when is None else max(0.0, when.timestamp() - wall_now)


def _pick(resets: list[tuple[float, str | None]]) -> float | None:
    if not resets:
        return None
    exhausted = [s for s, remaining in resets if remaining is not None and remaining.strip() == "0"]
    return max(exhausted) if exhausted else max(s for s, _ in resets)


def retry_after_hint(headers: Mapping[str, str], *, wall_now: WallClock = time.time) -> float | None:
    """``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date), in
    seconds; ``None`` without either.  (Not the ``x-ratelimit-reset-*``
    headers: those come on every answer and time the rate limit, not an
    outage.)"""
    ms = _seconds(headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000.0
    retry_after = headers.get("retry-after")
    if retry_after is not None:
        seconds = _seconds(retry_after)
        if seconds is None:
            seconds = _http_date(retry_after, wall_now())
        return seconds
    return None


def parse_reset_hint(headers: Mapping[str, str], *, wall_now: WallClock = time.time) -> float | None:
    """Seconds until the provider's rate limit resets, from whichever hint
    the response carries; ``None`` when it carries none."""
    seconds = retry_after_hint(headers, wall_now=wall_now)
    if seconds is not None:
        return seconds
    resets: list[tuple[float, str | None]] = []
    for kind in ("requests", "tokens"):
        raw = headers.get(f"x-ratelimit-reset-{kind}")
        seconds = parse_duration(raw) if raw is not None else None
        if seconds is not None:
            resets.append((seconds, headers.get(f"x-ratelimit-remaining-{kind}")))
    if resets:
        return _pick(resets)
    now = None
    for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
        raw = headers.get(f"anthropic-ratelimit-{kind}-reset")
        if raw is None:
            continue
        now = wall_now() if now is None else now
        seconds = _rfc3339(raw, now)
        if seconds is not None:
            resets.append((seconds, headers.get(f"anthropic-ratelimit-{kind}-remaining")))
    return _pick(resets)


def with_usage(error: ProviderError, usage: TokenUsage | None, *, model: str | None = None) -> ProviderError:
    """Attach what the failed call consumed (``None``: unknown) and, when
    the server named it, the model that answered (its usage is priced as
    that model's); the gateway reads them with ``getattr``."""
    setattr(error, "usage", usage)  # noqa: B010 - ProviderError declares no slot for it
    if model is not None:
        setattr(error, "model", model)  # noqa: B010
    return error


def with_stated_usage(
    error: ProviderError, data: Any, read_usage: Callable[[Any], TokenUsage | None]
) -> ProviderError:
    """``error`` for an answer ``data`` we could not use, with the usage
    (read by ``read_usage``) and model it still states: the call was
    billed all the same, and its usage was thrown away, counted as
    unknown.  Unknown when it states none."""
    if not isinstance(data, Mapping):
        return error
    model = data.get("model") if isinstance(data.get("model"), str) else None
    return with_usage(error, read_usage(data.get("usage")), model=model)


def _should_retry(headers: Mapping[str, str]) -> bool | None:
    value = headers.get("x-should-retry", "").strip().lower()
    return {"true": True, "false": False}.get(value)


def error_from_status(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    provider: str,
    secrets: Iterable[str] = (),
    wall_now: WallClock = time.time,
    url: str | None = None,
) -> ProviderError:
    """The typed error for an HTTP error response (status >= 400).  ``url``
    (without its query) is named for a 404: a wrong base URL is its usual
    cause."""
    excerpt = body_excerpt(body, secrets)
    where = f" at {url}" if status == 404 and url else ""
    detail = f"{provider}: HTTP {status}{where}" + (f": {excerpt}" if excerpt else "")
    override = _should_retry(headers)
    # "x-should-retry: false" on a status that may pass (408, 429, 5xx)
    # stops the retries, as the official SDKs do, but keeps the kind: the
    # server asks not to be called again at once, not that the request is
    # wrong.  Filed as a quota, a bad request or a bare ProviderError, it
    # was decided no_consensus for good, though a maintenance 503 passes
    # and the run could be resumed (--retry-failed) once it has.
    transient = detail + (f"; {NOT_RETRIED}" if override is False else "")
    error: ProviderError
    if status == 429:
        if "insufficient_quota" in body.decode("utf-8", "replace"):
            error = QuotaExceeded(detail)
        else:
            error = RateLimited(transient, retry_after=parse_reset_hint(headers, wall_now=wall_now))
    elif status in (401, 403):
        # The header overrides the status here too, as the official SDKs
        # obey it: a gateway's "401, x-should-retry: true" passes.
        error = ProviderUnavailable(detail) if override is True else AuthenticationFailed(detail)
    elif status == 408:
        error = ProviderTimeout(transient)
    elif status == 409 or 500 <= status <= 599:
        # A 503 or 529 may say when to come back, as the official SDKs honour.
        error = ProviderUnavailable(transient, retry_after=retry_after_hint(headers, wall_now=wall_now))
    elif override is True:
        error = ProviderUnavailable(detail)
    elif status == 404 and b"model" not in body.lower():
        # A wrong base URL: fixed outside the run.  (A model the provider
        # does not know is a 404 too, but the run's pipeline names it, and
        # no resume can change it: a bad request, decided.)
        error = NotFound(detail)
    else:
        error = BadRequest(detail)
    if override is False and error.retryable:
        not_retried(error)
    return with_usage(error, ZERO_USAGE)


# In the message of an error the server said not to retry: stored with the
# failed attempt, it is how a resume knows (see actors._resume).
NOT_RETRIED = "not retried: the server sent x-should-retry: false"


def not_retried(error: ProviderError) -> ProviderError:
    """``error``, not to be retried although its kind may pass (the
    classifier reads this).  Its kind is kept, so a stage whose agents
    failed with it is left undecided, as after any outage, for 'resume
    --retry-failed' (a resume rebuilds the error from its kind, and asks
    again only when granted a round)."""
    setattr(error, "retryable", False)  # noqa: B010 - an instance's answer over its class's
    return error


def error_from_redirect(
    status: int,
    location: str,
    *,
    provider: str,
    base_url: httpx.URL,
    endpoint: httpx.URL,
    secrets: Iterable[str] = (),
) -> ProviderError:
    """The error for a 3xx answer, which is not followed (it would carry
    the key elsewhere): a wrong base URL, fixed outside the run as a 404's
    is (:class:`NotFound`, so the stage is left undecided for ``resume
    --retry-failed``; as a bad request it was decided no_consensus).

    It names the base URL to use: the target less the path the provider
    appends to its base (``/chat/completions``).  Told to point
    --base-url at the target itself, the user got a 404 at
    ``.../chat/completions/chat/completions``.

    Redacted (``secrets``, and anything key-shaped): a server may put the
    key it was sent into the target's path, and it was printed and stored
    twice over."""
    where = f"{provider}: HTTP {status}"
    if not location.strip():
        return with_usage(NotFound(f"{where}: a redirect that says nowhere to go; check --base-url"), ZERO_USAGE)
    try:
        target = endpoint.join(location.strip())  # a relative Location is read against the request's URL
        shown_target = str(target.copy_with(query=None, fragment=None, userinfo=b""))  # a query may hold a token
    except Exception:
        # Unreadable: shown without its query, fragment or userinfo all the same.
        target, shown_target = None, re.sub(r"//[^/?#]*@", "//", location.split("?", 1)[0].split("#", 1)[0])
    detail = f"{where}: the server redirects to {shown_target}"
    suffix = endpoint.path[len(base_url.path.rstrip("/")) :]
    if target is not None and suffix and target.path.endswith(suffix):
        base = target.copy_with(path=target.path[: -len(suffix)] or "/", query=None, fragment=None, userinfo=b"")
        detail += f"; point --base-url at {str(base).rstrip('/')}"
    else:
        detail += "; fix --base-url"
    return with_usage(NotFound(shown(redact(detail, secrets))), ZERO_USAGE)


# What went wrong, in words: the class names (ConnectError, ...) meant
# nothing to a user, and "stream cut short" was said of a server never reached.
_TRANSPORT_WORDS: tuple[tuple[type[httpx.TransportError], str], ...] = (
    (httpx.ConnectTimeout, "timed out connecting to"),
    (httpx.PoolTimeout, "timed out waiting for a free connection to"),
    (httpx.WriteTimeout, "timed out sending the request to"),
    (httpx.ReadTimeout, "timed out waiting for the reply from"),
    (httpx.ConnectError, "cannot connect to"),
    (httpx.LocalProtocolError, "could not send the request (a header value it cannot carry?) to"),
    (httpx.RemoteProtocolError, "the connection broke off (the server broke the HTTP exchange) with"),
    (httpx.ReadError, "the connection failed while reading the reply from"),
    (httpx.WriteError, "the connection failed while sending the request to"),
)


def _where(exc: httpx.TransportError) -> str:
    try:
        url = exc.request.url
    except RuntimeError:  # raised without a request
        return "the server"
    port = f":{url.port}" if url.port is not None else ""
    return f"{url.host}{port}"


# What OpenSSL says when the server answers a TLS handshake in plain HTTP
# (3.2 renamed it; urllib3 reads both).
_PLAIN_HTTP_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE"})
_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)$")


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc``, if one is.  Under trio httpx raises a
    bare ConnectError('') for it: the SSLError is only in the chain (by way
    of trio's BrokenResourceError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def error_from_transport(
    exc: httpx.TransportError, *, provider: str, streaming: bool = False, secrets: Iterable[str] = ()
) -> ProviderError:
    """The typed error for an httpx transport failure.  Failures before the
    request was sent cost nothing (usage zero); after it, usage is unknown."""
    before_send = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    usage = ZERO_USAGE if before_send else None
    words = next((w for cls, w in _TRANSPORT_WORDS if isinstance(exc, cls)), "the connection failed with")
    # Our own request's fault quotes the offending header value: the key.
    detail = "" if isinstance(exc, httpx.LocalProtocolError) else shown(" ".join(redact(str(exc), secrets).split()))
    tls = _tls_failure(exc) if isinstance(exc, httpx.ConnectError) else None
    if tls is not None:
        # "cannot connect to 127.0.0.1:8000" and nothing more, for an
        # https:// base URL whose server speaks plain http.
        words = "the TLS handshake failed with"
        detail = shown(" ".join(_SSL_SOURCE.sub("", redact(str(tls), secrets)).split()))
    text = f"{provider}: {words} {_where(exc)}" + (f" ({detail[:200]})" if detail else "")
    if tls is not None and getattr(tls, "reason", None) in _PLAIN_HTTP_REASONS:
        text += "; the server may be speaking plain http: try http:// instead of https:// in the base URL"
    if streaming and not before_send and not isinstance(exc, httpx.TimeoutException):
        text += "; the stream was cut short"
    error: ProviderError
    if isinstance(exc, httpx.TimeoutException):
        error = ProviderTimeout(text)
    else:
        error = Disconnected(text)
    return with_usage(error, usage)


def stream_cut(provider: str, why: str) -> ProviderError:
    """A stream that ended before its end marker: usage unknown."""
    return with_usage(Disconnected(f"{provider}: stream cut short ({why})"), None)


def malformed(provider: str, why: str) -> ProviderError:
    """A 2xx answer we could not read: the provider misbehaved; retryable."""
    return with_usage(ProviderUnavailable(f"{provider}: malformed response ({why})"), None)
