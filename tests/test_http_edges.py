"""Edges of the HTTP provider layer that a mutation pass found unguarded:
how a 404 naming a model is classified, the usage of a pool timeout, a
CRLF split across stream chunks, and an empty bearer token; and JSON
nested past the parser's depth, which escaped as a RecursionError."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from actors._anthropic import AnthropicProvider
from actors._classify import classify
from actors._http_errors import body_excerpt, error_from_status, error_from_transport
from actors._http_provider import iter_sse
from actors._openai import OpenAIProvider
from messages import (
    ZERO_USAGE,
    AuthenticationFailed,
    BadRequest,
    NotFound,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from messages._auth_errors import CredentialsUnavailable

from ._providers_support import SECRET, fixed, make_request


def _streaming(chunks: list[bytes]) -> httpx.Response:
    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

    return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Body())


# -- error classification ------------------------------------------------------


def test_a_404_naming_the_model_in_any_case_is_a_bad_request() -> None:
    """A 404 whose body speaks of the model ("The Model x does not exist")
    is a model the provider does not know - a bad request, decided - not a
    wrong base URL (NotFound).  The match ignores case."""
    body = json.dumps({"error": {"message": "The Model x does not exist"}}).encode()
    error = error_from_status(404, {}, body, provider="openai", url="http://api.test/v1/chat/completions")
    assert isinstance(error, BadRequest) and not isinstance(error, NotFound)
    plain = error_from_status(404, {}, b"no such route", provider="openai")
    assert isinstance(plain, NotFound), "a 404 that names no model is still a wrong URL"


def test_a_pool_timeout_happened_before_sending_and_cost_nothing() -> None:
    """Waiting for a free connection timed out before the request left:
    the call cost nothing (usage zero), unlike a read timeout (unknown)."""
    request = httpx.Request("POST", "http://api.test/v1/chat/completions")
    pool = error_from_transport(httpx.PoolTimeout("pool full", request=request), provider="openai")
    assert isinstance(pool, ProviderTimeout)
    assert getattr(pool, "usage", "missing") == ZERO_USAGE
    assert "waiting for a free connection" in str(pool)
    read = error_from_transport(httpx.ReadTimeout("slow", request=request), provider="openai")
    assert getattr(read, "usage", "missing") is None


# -- the event stream ----------------------------------------------------------


async def test_a_crlf_split_across_chunks_keeps_the_event_type() -> None:
    """'event: x\\r' ending one chunk and '\\ndata: ...' opening the next is
    one CRLF line end: read as two, the blank line between them would end
    the event, dropping its type (the data would come as 'message')."""
    events = [item async for item in iter_sse(_streaming([b"event: delta\r", b"\ndata: 1\r\n\r\n"]))]
    assert events == [("delta", "1")]


# -- the provider --------------------------------------------------------------


async def test_an_empty_bearer_token_fails_before_any_request() -> None:
    """A token source that gives an empty token is an authentication
    failure naming it, raised before anything is sent: an empty bearer
    would reach the provider as 'Bearer ' and come back a confusing 401."""
    sent: list[httpx.Request] = []

    class Empty:
        async def bearer(self, *, force_refresh: bool = False) -> str:
            return ""

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(401, content=b"no")

    p = OpenAIProvider(base_url="http://api.test/v1", token_source=Empty(), stream=False,
                       transport=httpx.MockTransport(record))
    with pytest.raises(AuthenticationFailed, match="empty token"):
        await p.complete(make_request())
    assert sent == []


_TOKEN = "tok-SECRET-1234567890"


@pytest.mark.parametrize(
    ("token", "said"),
    [
        (_TOKEN.encode(), "returned bytes, not a str"),
        (1234567890, "returned int, not a str"),
        ("tok-SECRET\n-1234567890", "an HTTP header cannot carry"),
        ("tok-SECRET-\u00fc1234567890", "an HTTP header cannot carry"),
        (f" {_TOKEN} ", "an HTTP header cannot carry"),
    ],
    ids=["bytes", "int", "line-break", "non-ascii", "spaces"],
)
async def test_a_token_that_is_no_header_value_fails_before_any_request(token: object, said: str) -> None:
    """A token source returning bytes or an int had it sent as a malformed
    header, then failed as the provider's own bug ("replace() argument 1
    must be str, not bytes" from the redaction); a non-ASCII letter escaped
    as a UnicodeEncodeError.  It is a typed credentials failure raised
    before anything is sent, naming the type, never the value."""
    sent: list[httpx.Request] = []

    class Odd:
        async def bearer(self, *, force_refresh: bool = False) -> object:
            return token

    p = OpenAIProvider(base_url="http://api.test/v1", token_source=Odd(), stream=False,  # type: ignore[arg-type]
                       transport=fixed(401, record=sent))
    with pytest.raises(CredentialsUnavailable, match=said) as info:
        await p.complete(make_request())
    await p.aclose()
    assert sent == [] and classify(info.value).kind == "authentication"
    assert "1234567890" not in str(info.value) + repr(info.value)


# -- JSON nested past the parser's depth -----------------------------------------

# '[' * 100000: json.loads raises RecursionError (no ValueError) on it.
_DEEP = "[" * 100_000


def _provider(name: str, *, stream: bool, transport: httpx.MockTransport) -> OpenAIProvider | AnthropicProvider:
    if name == "openai":
        return OpenAIProvider(base_url="http://api.test/v1", api_key=SECRET, stream=stream, transport=transport)
    return AnthropicProvider(base_url="http://api.test", api_key=SECRET, stream=stream, transport=transport)


@pytest.mark.parametrize("name", ["openai", "anthropic"])
@pytest.mark.parametrize(
    ("stream", "response"),
    [
        (False, httpx.Response(200, headers={"content-type": "application/json"}, text=_DEEP)),
        (True, httpx.Response(200, headers={"content-type": "text/event-stream"}, text=f"data: {_DEEP}\n\n")),
    ],
)
async def test_an_answer_nested_too_deep_is_a_malformed_response(
    name: str, stream: bool, response: httpx.Response
) -> None:
    """A body (or an event's data) nested past the JSON parser's depth is
    one we cannot read, as invalid JSON is: malformed, retried, usage
    unknown.  Its RecursionError escaped the provider and was filed as the
    provider's own bug (``provider_bug``: never retried, blaming Conclave)."""
    p = _provider(name, stream=stream, transport=httpx.MockTransport(lambda r: response))
    with pytest.raises(ProviderUnavailable, match="malformed response") as info:
        await p.complete(make_request())
    assert classify(info.value).kind == "unavailable" and classify(info.value).retryable
    assert getattr(info.value, "usage", "absent") is None


@pytest.mark.parametrize("name", ["openai", "anthropic"])
async def test_a_429_with_a_body_nested_too_deep_keeps_its_reset_hint(name: str) -> None:
    """The status and headers say what happened whatever the body holds:
    a 429 is rate limited with its ``retry-after`` and zero usage.  Its
    body's RecursionError lost both (provider_bug, usage unknown)."""
    transport = fixed(429, headers={"retry-after": "5", "content-type": "application/json"}, body=_DEEP)
    p = _provider(name, stream=True, transport=transport)
    with pytest.raises(RateLimited) as info:
        await p.complete(make_request())
    assert info.value.retry_after == 5.0
    assert getattr(info.value, "usage", "absent") == ZERO_USAGE
    assert body_excerpt(_DEEP.encode()).startswith("[[[")
