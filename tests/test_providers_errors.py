"""HTTP statuses, reset headers and transport failures map onto the typed
errors - through httpx.MockTransport (hand-made responses) and through
serve-mock's backend (the same faults a real socket would carry)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest

from actors._classify import classify
from actors._http_errors import parse_reset_hint, redact
from actors._mock_backend import MockBackend
from actors._mock_server import mock_transport
from actors._openai import OpenAIProvider
from messages import (
    NotFound,
    ZERO_USAGE,
    AuthenticationFailed,
    BadRequest,
    Disconnected,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    QuotaExceeded,
    RateLimited,
    is_retryable,
    parse_duration,
)

from tests._providers_support import SECRET, fixed, make_request, raising

WALL = 1_800_000_000.0  # a fixed wall clock for date-shaped hints


def provider(transport: httpx.AsyncBaseTransport, **kwargs: object) -> OpenAIProvider:
    return OpenAIProvider(
        base_url="http://mock.test/v1", api_key=SECRET, transport=transport, wall_now=lambda: WALL, **kwargs  # type: ignore[arg-type]
    )


async def failure(transport: httpx.AsyncBaseTransport, **kwargs: object) -> ProviderError:
    p = provider(transport, **kwargs)
    try:
        with pytest.raises(ProviderError) as info:
            await p.complete(make_request())
    finally:
        await p.aclose()
    return info.value


# -- one test per status -------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, BadRequest),
        (401, AuthenticationFailed),
        (403, AuthenticationFailed),
        (404, NotFound),  # a BadRequest, fixable outside the run
        (408, ProviderTimeout),
        (409, ProviderUnavailable),
        (422, BadRequest),
        (429, RateLimited),
        (500, ProviderUnavailable),
        (502, ProviderUnavailable),
        (503, ProviderUnavailable),
        (504, ProviderUnavailable),
        (529, ProviderUnavailable),
    ],
)
async def test_status_maps_to_typed_error(status: int, kind: type[ProviderError]) -> None:
    error = await failure(fixed(status, body=json.dumps({"error": {"message": f"status {status}"}})))
    assert type(error) is kind
    assert f"HTTP {status}" in str(error) and f"status {status}" in str(error)
    # An error status means the model produced nothing: usage is known zero.
    assert getattr(error, "usage", "absent") == ZERO_USAGE


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 429, 500, 502, 503, 504, 529])
async def test_status_from_serve_mock_fault(status: int) -> None:
    backend = MockBackend(seed=1)
    error = await failure(mock_transport(backend), headers={"x-mock-fault": str(status)})
    expected = {400: BadRequest, 404: NotFound, 422: BadRequest, 401: AuthenticationFailed,
                403: AuthenticationFailed, 429: RateLimited}.get(status, ProviderUnavailable)
    assert type(error) is expected
    assert backend.ledger.faults == {str(status): 1}


async def test_a_404_for_an_unknown_model_is_a_bad_request_not_a_wrong_url() -> None:
    # The run's pipeline names the model: no 'resume --retry-failed' mends
    # it, so it is decided, not left for a retry as a wrong base URL is.
    body = json.dumps({"error": {"message": "The model `gpt-9` does not exist", "code": "model_not_found"}})
    error = await failure(fixed(404, body=body))
    assert type(error) is BadRequest


async def test_quota_429_is_permanent() -> None:
    body = json.dumps({"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}})
    error = await failure(fixed(429, headers={"retry-after": "1"}, body=body))
    assert type(error) is QuotaExceeded and not is_retryable(error)


# -- x-should-retry ------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected", "kind"),
    [(503, ProviderUnavailable, "unavailable"), (500, ProviderUnavailable, "unavailable"),
     (408, ProviderTimeout, "timeout"), (429, RateLimited, "rate_limit")],
)
async def test_should_retry_false_stops_the_retries_but_keeps_the_kind(
    status: int, expected: type[ProviderError], kind: str
) -> None:
    """The server asks not to be called again at once; it does not say the
    request is wrong.  A 503 was a bare ProviderError, a 408 a bad request
    and a 429 a spent quota (its body said nothing of one): each was
    decided no_consensus for good, though it may pass like any outage.  Now
    it keeps its kind (so the stage halts undecided), is not retried, and
    says why; a 429 keeps its reset hint."""
    headers = {"x-should-retry": "false", "retry-after": "7"}
    error = await failure(fixed(status, headers=headers, body='{"error": {"message": "maintenance"}}'))
    assert type(error) is expected
    verdict = classify(error)
    assert (verdict.kind, verdict.retryable) == (kind, False) and not is_retryable(error)
    assert str(error).endswith("maintenance; not retried: the server sent x-should-retry: false")
    assert verdict.retry_after == (7.0 if status != 408 else None)
    assert getattr(error, "usage", "absent") == ZERO_USAGE
    # The class is untouched: the same status without the header is retried.
    assert classify(await failure(fixed(status))).retryable


async def test_should_retry_false_on_429_from_serve_mock_is_a_rate_limit_not_retried() -> None:
    error = await failure(mock_transport(MockBackend()), headers={"x-mock-fault": "429", "x-mock-should-retry": "false"})
    assert type(error) is RateLimited and not classify(error).retryable


async def test_should_retry_false_on_an_insufficient_quota_429_is_still_quota() -> None:
    body = json.dumps({"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}})
    error = await failure(fixed(429, headers={"x-should-retry": "false"}, body=body))
    assert type(error) is QuotaExceeded and classify(error).kind == "quota"


async def test_should_retry_true_makes_4xx_retryable() -> None:
    error = await failure(fixed(400, headers={"x-should-retry": "true"}))
    assert is_retryable(error)
    plain = await failure(fixed(400))
    assert not is_retryable(plain)


@pytest.mark.parametrize("status", [401, 403])
async def test_should_retry_true_overrides_an_authentication_status_too(status: int) -> None:
    # It was AuthenticationFailed, permanent, whatever the header said.
    error = await failure(fixed(status, headers={"x-should-retry": "true"}))
    assert is_retryable(error)
    assert type(await failure(fixed(status))) is AuthenticationFailed


# -- one test per reset-header form ---------------------------------------------


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "30"}, 30.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "2500"}, 2.5),
        ({"retry-after-ms": "2500", "retry-after": "9"}, 2.5),  # ms wins, as in the SDKs
        ({"retry-after": format_datetime(datetime.fromtimestamp(WALL + 42, UTC), usegmt=True)}, 42.0),
        ({"x-ratelimit-reset-requests": "6m0s"}, 360.0),
        ({"x-ratelimit-reset-tokens": "1.5s"}, 1.5),
        ({"x-ratelimit-reset-tokens": "20ms"}, 0.02),
        (
            {
                "x-ratelimit-reset-requests": "1s",
                "x-ratelimit-remaining-requests": "5",
                "x-ratelimit-reset-tokens": "6m0s",
                "x-ratelimit-remaining-tokens": "0",
            },
            360.0,
        ),
        (
            {
                "x-ratelimit-reset-requests": "2s",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-tokens": "6m0s",
                "x-ratelimit-remaining-tokens": "900",
            },
            2.0,
        ),
        (
            {"anthropic-ratelimit-requests-reset": datetime.fromtimestamp(WALL + 17, UTC).isoformat().replace("+00:00", "Z")},
            17.0,
        ),
        (
            {
                "anthropic-ratelimit-tokens-reset": datetime.fromtimestamp(WALL + 61, UTC).isoformat(),
                "anthropic-ratelimit-input-tokens-reset": datetime.fromtimestamp(WALL + 5, UTC).isoformat(),
            },
            61.0,
        ),
        ({}, None),
        ({"retry-after": "soon"}, None),
    ],
)
async def test_429_reset_hint_forms(headers: dict[str, str], seconds: float | None) -> None:
    error = await failure(fixed(429, headers=headers))
    assert isinstance(error, RateLimited)
    assert error.retry_after == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize(
    ("style", "seconds"),
    [("all", 30.0), ("retry-after", 30.0), ("retry-after-ms", 30.0), ("retry-after-date", 30.0),
     ("openai", 30.0), ("anthropic", 30.0), ("none", None)],
)
async def test_429_reset_forms_from_serve_mock(style: str, seconds: float | None) -> None:
    backend = MockBackend(wall_now=lambda: datetime.fromtimestamp(WALL, UTC))
    error = await failure(
        mock_transport(backend), headers={"x-mock-fault": "429", "x-mock-reset": "30", "x-mock-reset-style": style}
    )
    assert isinstance(error, RateLimited)
    assert error.retry_after == seconds


def test_past_dates_mean_now() -> None:
    past = format_datetime(datetime.fromtimestamp(WALL, UTC) - timedelta(seconds=10), usegmt=True)
    assert parse_reset_hint({"retry-after": past}, wall_now=lambda: WALL) == 0.0


@pytest.mark.parametrize("tz", ["America/Los_Angeles", "Asia/Tokyo", "UTC"])
def test_an_http_date_without_a_zone_is_gmt(tz: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The asctime form and "-0000" parse without a zone, and were read as
    local time: a 30 s hint became 8 hours under Los Angeles time, or 0."""
    import time

    monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        at = datetime.fromtimestamp(WALL + 30, UTC)
        for header in (at.strftime("%a %b %d %H:%M:%S %Y"), at.strftime("%a, %d %b %Y %H:%M:%S -0000")):
            assert parse_reset_hint({"retry-after": header}, wall_now=lambda: WALL) == 30.0, header
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


@pytest.mark.parametrize("form", ["%Y-%m-%dt%H:%M:%Sz", "%Y-%m-%d %H:%M:%S+00:00", "%Y-%m-%dT%H:%M:%SZ"])
def test_anthropic_reset_times_in_every_rfc3339_spelling(form: str) -> None:
    # Lowercase t/z were refused; a space for the T too (RFC 3339 5.6 allows both).
    at = datetime.fromtimestamp(WALL + 30, UTC).strftime(form)
    headers = {"anthropic-ratelimit-requests-reset": at, "anthropic-ratelimit-requests-remaining": "0"}
    assert parse_reset_hint(headers, wall_now=lambda: WALL) == 30.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("6m0s", 360.0), ("1h2m3s", 3723.0), ("1.5s", 1.5), ("250ms", 0.25), ("7", 7.0), ("", None), ("6 minutes", None)],
)
def test_go_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


# -- transport failures ----------------------------------------------------------


async def test_connection_refused_is_disconnect_costing_nothing() -> None:
    error = await failure(raising(lambda r: httpx.ConnectError("[Errno 111] Connection refused", request=r)))
    assert type(error) is Disconnected
    assert getattr(error, "usage") == ZERO_USAGE


async def test_connection_reset_while_waiting_is_disconnect_with_unknown_usage() -> None:
    error = await failure(raising(lambda r: httpx.ReadError("[Errno 104] Connection reset by peer", request=r)))
    assert type(error) is Disconnected
    assert getattr(error, "usage", "absent") is None


@pytest.mark.parametrize("exc", [httpx.ReadTimeout, httpx.ConnectTimeout, httpx.WriteTimeout, httpx.PoolTimeout])
async def test_httpx_timeouts_are_provider_timeouts(exc: type[httpx.TimeoutException]) -> None:
    error = await failure(raising(lambda r: exc("timed out", request=r)))
    assert type(error) is ProviderTimeout


async def test_stream_cut_short_is_disconnect_with_unknown_usage() -> None:
    backend = MockBackend(seed=3)
    error = await failure(mock_transport(backend), headers={"x-mock-fault": "disconnect"})
    assert type(error) is Disconnected and "cut short" in str(error)
    assert getattr(error, "usage", "absent") is None
    assert backend.ledger.usage == ZERO_USAGE  # the usage chunk never went out


async def test_stream_ending_without_done_is_disconnect() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "{\"a\""}, "finish_reason": None}]}
    body = f"data: {json.dumps(chunk)}\n\n"  # then a clean end of body, but no [DONE]
    error = await failure(fixed(200, headers={"content-type": "text/event-stream"}, body=body))
    assert type(error) is Disconnected
    assert getattr(error, "usage", "absent") is None


async def test_plain_request_dropped_before_response_is_disconnect() -> None:
    error = await failure(mock_transport(MockBackend()), headers={"x-mock-fault": "disconnect"}, stream=False)
    assert type(error) is Disconnected
    assert getattr(error, "usage", "absent") is None


async def test_garbage_2xx_body_is_retryable_unavailable() -> None:
    error = await failure(fixed(200, body="<html>gateway</html>"), stream=False)
    assert type(error) is ProviderUnavailable and is_retryable(error)


# -- secrets ---------------------------------------------------------------------


async def test_error_bodies_are_excerpted_and_redacted() -> None:
    body = json.dumps(
        {"error": {"message": f"Incorrect API key provided: {SECRET}. " + "x" * 1000, "type": "invalid_request_error"}}
    )
    error = await failure(fixed(401, body=body))
    text = str(error) + repr(error)
    assert SECRET not in text and SECRET[:12] not in text
    assert "[REDACTED]" in text
    assert len(str(error)) < 300


def _lower_hex(key: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), quote(key, safe=""))


@pytest.mark.parametrize(
    "encode", [quote_plus, lambda k: quote(k, safe=""), quote, _lower_hex], ids=["plus", "all", "path", "lower"]
)
async def test_a_key_echoed_url_encoded_is_redacted(encode: Callable[[str], str]) -> None:
    # Only the key as it is was masked: a 401 quoting it URL-encoded (as a
    # server does that read it from a query or a form) was stored and shown.
    key = "Xy9/abc+DEF=ghij12345"
    echoed = encode(key)
    assert echoed != key
    body = json.dumps({"error": {"message": f"Incorrect API key provided: {echoed}."}})
    p = OpenAIProvider(base_url="http://mock.test/v1", api_key=key, transport=fixed(401, body=body))
    with pytest.raises(AuthenticationFailed) as info:
        await p.complete(make_request())
    assert str(info.value) == "openai: HTTP 401: Incorrect API key provided: [REDACTED]."
    assert redact(f"a {key.replace('/', '%2f')} b {key} c", [key]) == "a [REDACTED] b [REDACTED] c"


def _echo(request: httpx.Request) -> httpx.Response:
    """A server that quotes what it was sent, as real ones do on a 401."""
    standard = {"host", "accept", "accept-encoding", "connection", "content-length", "content-type", "user-agent"}
    # The values alone, as in "Incorrect API key provided: ...": no name
    # next to them for the key-shape patterns to catch.
    sent = [value for name, value in request.headers.items() if name not in standard]
    message = "rejected: " + " / ".join([*request.url.params.values(), *sent])
    return httpx.Response(401, json={"error": {"message": message}})


async def _echoed(headers: Mapping[Any, Any], query: str = "") -> AuthenticationFailed:
    """The 401 of a server that quotes what it was sent, to a provider
    given ``headers`` and the base URL's ``query``."""
    p = OpenAIProvider(base_url=f"http://mock.test/v1{query}", api_key=SECRET, headers=headers,
                       transport=httpx.MockTransport(_echo))
    try:
        with pytest.raises(AuthenticationFailed) as info:
            await p.complete(make_request())
    finally:
        await p.aclose()
    return info.value


GIVEN = "Given0Secret1Value2xyz"  # key-shaped for no pattern: only being told masks it


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({"api-key": GIVEN}, ""),
        ({"X-Api-Key": GIVEN}, ""),
        ({"Proxy-Authorization": f"Token {GIVEN}"}, ""),
        ({"x-portkey-virtual-key": GIVEN}, ""),
        ({"x-vercel-protection-bypass": GIVEN}, ""),  # no credential name: masked for its length
        ({}, f"?key={GIVEN}"),
        ({}, f"?api-version=2024-10-21&sig={GIVEN}"),
    ],
    ids=["api-key", "x-api-key", "authorization", "named-key", "opaque", "query-key", "query-sig"],
)
async def test_secrets_given_in_headers_or_the_base_url_query_are_redacted(headers: dict[str, str], query: str) -> None:
    # Only api_key and the token were masked: a key given as a header (an
    # Azure 'api-key') or in the base URL's query ('?key=') came back in a
    # server's 401 and was shown, and stored with the run.
    error = await _echoed({**headers, "anthropic-beta": "prompt-caching-2024-07-31"}, query)
    text = str(error) + repr(error)
    assert GIVEN not in text and "[REDACTED]" in text
    # A value that is no credential is still quoted: it may be what was wrong.
    assert "prompt-caching-2024-07-31" in text
    if "api-version" in query:
        assert "2024-10-21" in text


async def test_a_credential_header_given_as_bytes_is_redacted() -> None:
    error = await _echoed({b"api-key": GIVEN.encode()})
    assert GIVEN not in str(error) and "[REDACTED]" in str(error)


@pytest.mark.parametrize(
    ("headers", "query", "quoted"),
    [
        ({"x-portkey-provider": "openai"}, "", "openai"),  # 'key' inside 'portkey'
        ({"x-session-affinity": "sticky"}, "", "sticky"),
        ({"x-model": "claude-3-5-sonnet-20241022"}, "", "claude-3-5-sonnet-20241022"),
        ({"openai-organization": "org-AbCdEfGhIjKlMnOpQrStUv12"}, "", "org-AbCdEfGhIjKlMnOpQrStUv12"),
        ({"x-request-id": "7f3c1c2e-9a4b-4b8e-8f2e-2b1d3c4e5f60"}, "", "7f3c1c2e-9a4b-4b8e-8f2e-2b1d3c4e5f60"),
        ({}, "?deployment=gpt-4o-2024-08-06-production", "gpt-4o-2024-08-06-production"),
    ],
    ids=["portkey-provider", "session-affinity", "model", "organization", "request-id", "deployment"],
)
async def test_values_that_are_no_credentials_are_still_quoted(headers: dict[str, str], query: str, quoted: str) -> None:
    # Names were searched for 'key', 'auth', 'sig' or 'session' anywhere,
    # and any 20 characters without a space were taken for a key: the value
    # an error was about read "[REDACTED]".
    error = await _echoed(headers, query)
    assert f"rejected: {quoted} / Bearer [REDACTED]" in str(error)  # the value, then the api_key


def test_redact_masks_key_shapes_it_was_not_told_about() -> None:
    text = redact('{"api_key": "abc123secret", "auth": "Bearer eyJhbGciOi.JIUzI1"} sk-ant-api03-AAAAAAAA')
    assert "abc123secret" not in text and "eyJhbGciOi" not in text and "sk-ant-api03" not in text


def test_provider_repr_hides_the_key() -> None:
    p = OpenAIProvider(base_url="http://mock.test/v1", api_key=SECRET)
    assert SECRET not in repr(p) and "hidden" in repr(p)


# -- what the server sends is read within bounds ------------------------------------


async def test_an_error_whose_body_cannot_be_decoded_keeps_its_status() -> None:
    # A 429 with a false gzip and 'retry-after: 5' was retried at once as
    # a malformed response, usage unknown; a 401 so sent became retryable.
    async def body():  # type: ignore[no-untyped-def]
        yield b"not gzip at all"  # streamed, as from a socket: decoded only when read

    transport = httpx.MockTransport(
        lambda request: httpx.Response(429, headers={"content-encoding": "gzip", "retry-after": "5"}, content=body())
    )
    error = await failure(transport, stream=False)
    assert isinstance(error, RateLimited) and error.retry_after == 5.0


async def test_an_error_whose_body_breaks_off_keeps_its_status() -> None:
    # The status and retry-after had arrived; the broken body made it a
    # disconnect: hint lost, gate left open, usage unknown, the breaker told.
    async def body():  # type: ignore[no-untyped-def]
        yield b'{"error": {"message": "Rate limit'
        raise httpx.ReadError("connection reset")

    transport = httpx.MockTransport(
        lambda request: httpx.Response(429, headers={"retry-after": "30"}, content=body())
    )
    error = await failure(transport, stream=False)
    assert isinstance(error, RateLimited) and error.retry_after == 30.0
    assert getattr(error, "usage", None) == ZERO_USAGE


async def test_only_the_head_of_a_huge_error_body_is_read() -> None:
    # A 300 MB error body was read whole (1.3 GB RSS, 59 s) to quote 200 characters.
    sent = [0]

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(10_000):
            sent[0] += 1
            yield b"x" * 4096

    transport = httpx.MockTransport(lambda request: httpx.Response(500, content=chunks()))
    error = await failure(transport, stream=False)
    assert error.kind == "unavailable" and sent[0] <= 20


@pytest.mark.parametrize("stream", [True, False])
async def test_an_answer_past_the_size_limit_is_malformed_not_stored(monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    # 300 MB of streamed content was taken as the answer: 4.4 GB RSS, a 5.7 GB database.
    import actors._http_provider as http

    monkeypatch.setattr(http, "MAX_ANSWER_BYTES", 10_000)
    if stream:
        delta = json.dumps({"choices": [{"delta": {"content": "y" * 1000}}]})
        body = ("".join(f"data: {delta}\n\n" for _ in range(50)) + "data: [DONE]\n\n").encode()
        headers = {"content-type": "text/event-stream"}
    else:
        body = json.dumps({"choices": [{"message": {"content": "y" * 50_000}}]}).encode()
        headers = {"content-type": "application/json"}
    error = await failure(fixed(200, headers=headers, body=body), stream=stream)
    assert "larger than" in str(error) and error.retryable


async def test_a_plain_answer_with_invalid_utf8_is_read_with_replacements() -> None:
    # Streamed, such bytes became U+FFFD; plain, the answer and its usage were lost.
    body = b'{"model": "m", "choices": [{"message": {"content": "caf\xe9"}, "finish_reason": "stop"}],' \
           b' "usage": {"prompt_tokens": 3, "completion_tokens": 2}}'
    p = provider(fixed(200, headers={"content-type": "application/json"}, body=body), stream=False)
    try:
        completion = await p.complete(make_request())
    finally:
        await p.aclose()
    assert completion.content == "caf\ufffd" and completion.usage is not None


@pytest.mark.parametrize(
    ("headers", "hint"),
    [({"retry-after": "4"}, 4.0), ({"retry-after-ms": "1500"}, 1.5),
     ({"x-ratelimit-reset-tokens": "6m0s"}, None), ({}, None)],
)
async def test_a_5xx_retry_after_is_honoured(headers: dict[str, str], hint: float | None) -> None:
    # A 503 asking for 4 s was retried 0.4 s later.  (The rate limit's own
    # reset headers come on every answer: they time no outage.)
    from actors import RetryPolicy
    from messages import AgentKey

    error = await failure(fixed(503, headers=headers), stream=False)
    assert isinstance(error, ProviderUnavailable) and error.retry_after == hint
    delay = RetryPolicy().delay(error, AgentKey(run_id="r", branch_id="b", stage="plan", agent="claude"), 1, 0)
    assert delay >= (hint or 0.0)
