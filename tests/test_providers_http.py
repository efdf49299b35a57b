"""The OpenAI-compatible and Anthropic providers speak their protocols:
request shape, plain and streamed answers, usage, and credentials."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from actors._anthropic import AnthropicProvider
from actors._mock_backend import MockBackend, MockRequest
from actors._mock_server import mock_transport
from actors._openai import OpenAIProvider
from actors._simulator import Latency, SimulatedProvider
from actors._usage_normalise import merge_anthropic_usage, usage_from_anthropic
from messages import (
    ActorStopped,
    AuthenticationFailed,
    BadRequest,
    Disconnected,
    NotFound,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
    RateLimited,
    TokenUsage,
)
from messages._auth_errors import AuthProtocolError

from tests._providers_support import SECRET, fixed, make_request


def recording(handler: Any, seen: list[httpx.Request]) -> httpx.MockTransport:
    async def wrapped(request: httpx.Request) -> httpx.Response:
        await request.aread()
        seen.append(request)
        result: httpx.Response = await handler(request) if callable(handler) else handler
        return result

    return httpx.MockTransport(wrapped)


# -- OpenAI-compatible ---------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_openai_answers_like_the_simulator(stream: bool) -> None:
    backend = MockBackend(seed=11)
    seen: list[httpx.Request] = []
    inner = mock_transport(backend)

    async def forward(request: httpx.Request) -> httpx.Response:
        return await inner.handle_async_request(request)

    p = OpenAIProvider(base_url="http://127.0.0.1:9/v1", api_key=SECRET, stream=stream, transport=recording(forward, seen))
    request = make_request()
    completion = await p.complete(request)
    await p.aclose()
    expected = SimulatedProvider(seed=11, latency=Latency(median=0)).answer(request)
    assert completion.content == expected.content
    assert completion.usage == expected.usage and completion.usage is not None
    assert completion.usage.cached_input_tokens > 0  # cached and reasoning tokens survive the wire
    assert backend.ledger.usage == completion.usage

    [sent] = seen
    assert sent.url == "http://127.0.0.1:9/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {SECRET}"
    body = json.loads(sent.content)
    assert body["model"] == "gpt-5"
    assert body["response_format"] == {"type": "json_object"}
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][1]["content"] == request.prompt
    if stream:
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    else:
        assert "stream" not in body


async def test_openai_stream_without_usage_chunk_reports_unknown_usage() -> None:
    chunks = [
        {"model": "local", "choices": [{"index": 0, "delta": {"content": "{\"ok\": "}, "finish_reason": None}]},
        {"model": "local", "choices": [{"index": 0, "delta": {"content": "true}"}, "finish_reason": "stop"}]},
    ]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    transport = httpx.MockTransport(lambda r: httpx.Response(200, headers={"content-type": "text/event-stream"}, text=body))
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, transport=transport)
    completion = await p.complete(make_request())
    assert completion.content == '{"ok": true}'
    assert completion.usage is None  # the server never said: unknown, not zero
    assert completion.model == "local"


async def test_openai_stream_ending_cleanly_after_finish_reason_without_done_is_an_answer() -> None:
    # llama.cpp builds and other compatible servers never send "data: [DONE]":
    # every call failed as "stream cut short", was retried and billed again.
    chunks = [
        {"model": "local", "choices": [{"index": 0, "delta": {"content": "{}"}, "finish_reason": None}]},
        {"model": "local", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"model": "local", "choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 100}},
    ]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks)
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, transport=fixed(
        200, headers={"content-type": "text/event-stream"}, body=body))
    completion = await p.complete(make_request())
    assert completion.content == "{}" and completion.model == "local"
    assert completion.usage == TokenUsage.of(input_tokens=1000, output_tokens=100)
    # The same bytes broken off by the connection are still a cut.
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, transport=httpx.MockTransport(
        lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_CutChunked(body))))
    with pytest.raises(Disconnected):
        await p.complete(make_request())


@pytest.mark.parametrize("placeholder", ["", "null", None])
async def test_openai_stream_cut_after_placeholder_finish_reasons_is_still_cut(placeholder: str | None) -> None:
    # Ollama and SGLang send finish_reason "" on every chunk, KoboldCpp
    # "null": taken for an end, a body a proxy closed halfway through an
    # answer was a complete one, stored and decided no_consensus for good.
    chunks = [{"model": "local", "choices": [{"index": 0, "delta": {"content": '{"stage": "pl'},
                                              "finish_reason": placeholder}]}]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks)
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, transport=fixed(
        200, headers={"content-type": "text/event-stream"}, body=body))
    with pytest.raises(Disconnected, match="neither \\[DONE\\] nor a finish_reason"):
        await p.complete(make_request())


@pytest.mark.parametrize("stream", [True, False])
async def test_openai_content_given_as_a_list_of_parts_is_read_for_its_text(stream: bool) -> None:
    # Mistral's Magistral answers with content parts (thinking, then text):
    # each attempt failed as malformed and its usage was thrown away.
    parts = [{"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]},
             {"type": "text", "text": "{\"a\": "}, {"type": "text", "text": "1}"}]
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}
    if stream:
        chunks = [
            {"model": "magistral", "choices": [{"index": 0, "delta": {"content": parts[:2]}, "finish_reason": None}]},
            {"model": "magistral", "choices": [{"index": 0, "delta": {"content": parts[2:]}, "finish_reason": "stop"}]},
            {"model": "magistral", "choices": [], "usage": usage},
        ]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        transport = fixed(200, headers={"content-type": "text/event-stream"}, body=body)
    else:
        answer = {"model": "magistral", "usage": usage,
                  "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": parts}}]}
        transport = fixed(200, headers={"content-type": "application/json"}, body=json.dumps(answer))
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, stream=stream, transport=transport)
    completion = await p.complete(make_request())
    assert completion.content == '{"a": 1}'
    assert completion.usage == TokenUsage.of(input_tokens=1000, output_tokens=100)
    # Parts without any text are still no answer.
    answer = {"choices": [{"index": 0, "message": {"content": parts[:1]}}], "usage": usage}
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, stream=False, transport=fixed(
        200, headers={"content-type": "application/json"}, body=json.dumps(answer)))
    with pytest.raises(ProviderUnavailable, match="malformed"):
        await p.complete(make_request())


async def test_openai_stream_takes_only_the_first_choice_as_the_plain_path_does() -> None:
    # A server answering with several choices (n > 1, or a proxy fanning
    # out): their texts were run together into one answer that parsed as none.
    chunks = [
        {"choices": [{"index": 0, "delta": {"content": "{\"a\": "}}, {"index": 1, "delta": {"content": "{\"b\": "}}]},
        {"choices": [{"index": 1, "delta": {"content": "2}"}, "finish_reason": "stop"}]},
        {"choices": [{"delta": {"content": "1}"}, "finish_reason": "stop"}]},  # no index: the first
        {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 8}},
    ]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, transport=fixed(
        200, headers={"content-type": "text/event-stream"}, body=body))
    completion = await p.complete(make_request())
    assert completion.content == '{"a": 1}'
    assert completion.usage == TokenUsage.of(input_tokens=10, output_tokens=8)


@pytest.mark.parametrize(("reported", "total"), [(3, 105), (0, 105), (105, 105), (120, 120)])
async def test_openai_total_below_input_plus_output_is_their_sum(reported: int, total: int) -> None:
    # A total smaller than its parts (prompt 100, completion 5, total 3) is
    # impossible, and was stored and summed into the run's totals as given;
    # a larger one may count tokens not broken out, and stands.
    usage = {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": reported}
    answer = {"choices": [{"index": 0, "message": {"content": "{}"}, "finish_reason": "stop"}], "usage": usage}
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, stream=False, transport=fixed(
        200, headers={"content-type": "application/json"}, body=json.dumps(answer)))
    completion = await p.complete(make_request())
    assert completion.usage is not None
    assert (completion.usage.input_tokens, completion.usage.output_tokens) == (100, 5)
    assert completion.usage.total_tokens == total


async def test_openai_error_event_mid_stream_is_unavailable_with_unknown_usage() -> None:
    body = 'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\ndata: {"error":{"message":"overloaded"}}\n\n'
    transport = httpx.MockTransport(lambda r: httpx.Response(200, headers={"content-type": "text/event-stream"}, text=body))
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, transport=transport)
    with pytest.raises(ProviderUnavailable) as info:
        await p.complete(make_request())
    assert getattr(info.value, "usage", "absent") is None



@pytest.mark.parametrize(
    ("error", "expected"),
    [
        # A prompt too long for the model was retried as an outage, three times.
        ({"message": "maximum context length is 8192 tokens", "type": "invalid_request_error",
          "code": "context_length_exceeded"}, BadRequest),
        ({"message": "You exceeded your current quota", "type": "insufficient_quota"}, QuotaExceeded),
        ({"message": "Rate limit reached", "type": "tokens", "code": "rate_limit_exceeded"}, RateLimited),
        ({"message": f"Incorrect API key provided: {SECRET}", "code": "invalid_api_key"}, AuthenticationFailed),
        ({"message": "The server had an error", "type": "server_error"}, ProviderUnavailable),
        ("something broke", ProviderUnavailable),
    ],
)
async def test_openai_error_event_mid_stream_is_judged_by_its_kind(error: Any, expected: type[Exception]) -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "x"}}]}
    body = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps({'error': error})}\n\n"
    transport = httpx.MockTransport(lambda r: httpx.Response(200, headers={"content-type": "text/event-stream"}, text=body))
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, transport=transport)
    with pytest.raises(expected) as info:
        await p.complete(make_request())
    assert type(info.value) is expected
    assert getattr(info.value, "usage", "absent") is None
    message = str(info.value)
    assert "mid-stream" in message and "HTTP 500" not in message  # no status was ever sent
    assert SECRET not in message
    if isinstance(error, dict):
        assert error["message"].split(":")[0] in message


async def test_openai_error_object_in_a_200_answer_keeps_its_words_and_kind() -> None:
    body = {"error": {"message": "This model's maximum context length is 8192 tokens", "code": "context_length_exceeded"}}
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json=body))
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, stream=False, transport=transport)
    with pytest.raises(BadRequest, match="in a 200 answer .context_length_exceeded.*maximum context length"):
        await p.complete(make_request())


@pytest.mark.parametrize(
    ("provider", "stream", "body"),
    [
        ("openai", True, 'data: {"choices": 5}\n\ndata: [DONE]\n\n'),
        ("openai", False, {"choices": [{"message": "oops"}]}),
        ("anthropic", True, 'event: content_block_delta\ndata: {"type": "content_block_delta", "delta": "text"}\n\n'),
        ("anthropic", True, 'event: message_start\ndata: {"type": "message_start", "message": "oops"}\n\n'),
    ],
)
async def test_json_of_the_wrong_shape_is_a_malformed_response(provider: str, stream: bool, body: Any) -> None:
    """Retryable, usage unknown, like invalid JSON: it used to fail as the
    provider's bug ("AttributeError: 'str' object has no attribute 'get'"),
    once, never retried."""
    with pytest.raises(ProviderUnavailable, match="malformed response") as info:
        await _answering(provider, stream, body).complete(make_request())
    assert getattr(info.value, "usage", "absent") is None


def _answering(provider: str, stream: bool, body: Any) -> Any:
    """``provider`` on a server answering every call 200 with ``body`` (a
    str: an event stream)."""
    if isinstance(body, str):
        transport = httpx.MockTransport(lambda r: httpx.Response(200, headers={"content-type": "text/event-stream"}, text=body))
    else:
        transport = httpx.MockTransport(lambda r: httpx.Response(200, json=body))
    if provider == "openai":
        return OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, stream=stream, transport=transport)
    return AnthropicProvider(api_key=SECRET, stream=stream, transport=transport)


@pytest.mark.parametrize(
    ("provider", "body"),
    [
        ("openai", {"model": "m-1", "choices": [], "usage": {"prompt_tokens": 900, "completion_tokens": 40}}),
        ("anthropic", {"model": "m-1", "content": None, "usage": {"input_tokens": 900, "output_tokens": 40}}),
    ],
)
async def test_a_malformed_answer_keeps_the_usage_it_states(provider: str, body: Any) -> None:
    # The call was billed: its stated usage was thrown away and the attempt
    # counted as unknown usage.  (Without one it stays unknown: above.)
    with pytest.raises(ProviderUnavailable, match="malformed response") as info:
        await _answering(provider, False, body).complete(make_request())
    assert getattr(info.value, "usage", None) == TokenUsage.of(input_tokens=900, output_tokens=40)
    assert getattr(info.value, "model", None) == "m-1"


async def test_openai_azure_deployment_url_and_api_key_header() -> None:
    seen: list[httpx.Request] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"model": "gpt-4o", "choices": [{"message": {"content": "{}"}}],
                                         "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    p = OpenAIProvider(
        base_url="https://res.openai.azure.com/openai/deployments/dep1?api-version=2024-10-21",
        api_key=SECRET, stream=False, transport=recording(answer, seen),
    )
    completion = await p.complete(make_request())
    assert completion.usage == TokenUsage.of(input_tokens=3, output_tokens=1)
    [sent] = seen
    assert sent.url.path == "/openai/deployments/dep1/chat/completions"
    assert sent.url.params["api-version"] == "2024-10-21"
    assert sent.headers["api-key"] == SECRET and "authorization" not in sent.headers


async def test_model_override_applies_to_every_call() -> None:
    backend = MockBackend()
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, transport=mock_transport(backend), model="local-7b")
    completion = await p.complete(make_request(model="gpt-5"))
    assert completion.model == "local-7b"


# -- token source: 401 -> one forced refresh -----------------------------------


class Tokens:
    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)
        self.calls: list[bool] = []

    async def bearer(self, *, force_refresh: bool = False) -> str:
        self.calls.append(force_refresh)
        if force_refresh:
            self.tokens.pop(0)
        return self.tokens[0]


async def test_401_with_token_source_refreshes_once_and_retries() -> None:
    tokens = Tokens("tok-old-AAAAAAAAAA", "tok-new-BBBBBBBBBB")
    backend = MockBackend(required_key="tok-new-BBBBBBBBBB")
    p = OpenAIProvider(base_url="http://x.test/v1", token_source=tokens, transport=mock_transport(backend))
    completion = await p.complete(make_request())
    assert completion.content.startswith("{")
    assert tokens.calls == [False, True]
    assert backend.ledger.requests == 2


async def test_401_twice_fails_after_one_refresh() -> None:
    tokens = Tokens("tok-one-AAAAAAAAAA", "tok-two-BBBBBBBBBB")
    backend = MockBackend(required_key="something-else")
    p = OpenAIProvider(base_url="http://x.test/v1", token_source=tokens, transport=mock_transport(backend))
    with pytest.raises(AuthenticationFailed) as info:
        await p.complete(make_request())
    assert tokens.calls == [False, True]
    assert "tok-" not in str(info.value)


async def test_401_with_api_key_is_not_retried() -> None:
    backend = MockBackend(required_key="other")
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, transport=mock_transport(backend))
    with pytest.raises(AuthenticationFailed):
        await p.complete(make_request())
    assert backend.ledger.requests == 1


async def test_failing_token_source_is_authentication_error_without_secrets() -> None:
    class Broken:
        async def bearer(self, *, force_refresh: bool = False) -> str:
            raise RuntimeError(f"refresh failed for refresh_token={SECRET}")

    p = OpenAIProvider(base_url="http://x.test/v1", token_source=Broken(), transport=mock_transport(MockBackend()))
    with pytest.raises(AuthenticationFailed) as info:
        await p.complete(make_request())
    assert SECRET not in str(info.value)


async def test_a_token_source_failure_does_not_quote_a_token_nobody_was_told() -> None:
    # Only the api key and the tokens the source handed out were masked
    # in its error text: a source failing with "refresh failed for <token>"
    # (a token it never returned, so unknown) had it shown and stored.
    token = "tok-SECRET-1234567890"  # no key shape the patterns know
    sent: list[httpx.Request] = []

    class Broken:
        async def bearer(self, *, force_refresh: bool = False) -> str:
            raise RuntimeError(f"refresh failed for {token}")

    p = OpenAIProvider(base_url="http://x.test/v1", token_source=Broken(), transport=fixed(200, record=sent))
    with pytest.raises(AuthenticationFailed) as info:
        await p.complete(make_request())
    await p.aclose()
    text = str(info.value) + repr(info.value)
    assert token not in text and "SECRET" not in text
    assert "no token: RuntimeError" in text and sent == []


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (AuthProtocolError("the token endpoint answered HTTP 500", provider="openai"), "answered HTTP 500"),
        (ConnectionRefusedError(111, "Connection refused"), "Connection refused"),
        # Conclave's own words, once the auth actor is gone.
        (ActorStopped("the auth actor has stopped"), "ActorStopped: the auth actor has stopped"),
        # The system's words for the errno, not the text a source gave it.
        (PermissionError(13, "denied tok-SECRET-1234567890"), "PermissionError: Permission denied$"),
    ],
)
async def test_a_token_source_failure_that_holds_no_token_is_quoted(error: Exception, said: str) -> None:
    # An AuthError never holds token text, nor does an OS error's reason:
    # they still say what went wrong.
    class Failing:
        async def bearer(self, *, force_refresh: bool = False) -> str:
            raise error

    p = OpenAIProvider(base_url="http://x.test/v1", token_source=Failing(), transport=fixed(200))
    with pytest.raises(AuthenticationFailed, match=said):
        await p.complete(make_request())
    await p.aclose()


# -- Anthropic -----------------------------------------------------------------

ANTHROPIC_USAGE = {"input_tokens": 12, "cache_creation_input_tokens": 30, "cache_read_input_tokens": 500, "output_tokens": 1}
# What STREAM_EVENTS' usage comes to: Anthropic's input excludes cache reads and writes.
STREAM_USAGE = TokenUsage(
    input_tokens=542,
    cached_input_tokens=500,
    output_tokens=40,
    reasoning_output_tokens=0,
    total_tokens=582,
    cache_write_input_tokens=30,
)


def anthropic_sse(events: list[tuple[str, dict[str, Any]]]) -> str:
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)


STREAM_EVENTS = [
    ("message_start", {"type": "message_start", "message": {"id": "msg_1", "model": "claude-sonnet-4-5", "usage": ANTHROPIC_USAGE}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "{\"a\": "}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "1}"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 40}}),
    ("message_stop", {"type": "message_stop"}),
]


@pytest.mark.parametrize(
    ("base_url", "url"),
    [
        ("https://api.anthropic.com", "https://api.anthropic.com/v1/messages"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/v1/messages"),
        ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1/messages"),
        ("https://proxy.test/anthropic", "https://proxy.test/anthropic/v1/messages"),
    ],
)
def test_anthropic_endpoint_follows_the_official_client(base_url: str, url: str) -> None:
    assert str(AnthropicProvider(base_url=base_url, api_key=SECRET).endpoint()) == url


async def test_anthropic_stream_text_and_cache_usage() -> None:
    seen: list[httpx.Request] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, text=anthropic_sse(STREAM_EVENTS))

    p = AnthropicProvider(api_key=SECRET, transport=recording(answer, seen))
    completion = await p.complete(make_request(model="claude-sonnet-4-5"))
    assert completion.content == '{"a": 1}'
    assert completion.usage == STREAM_USAGE
    [sent] = seen
    assert sent.headers["x-api-key"] == SECRET and sent.headers["anthropic-version"] == "2023-06-01"
    body = json.loads(sent.content)
    assert body["stream"] is True and body["max_tokens"] > 0 and "conclave-request:" in body["system"]


async def test_anthropic_plain_answer() -> None:
    payload = {"model": "claude-sonnet-4-5", "content": [{"type": "text", "text": "{}"}], "usage": ANTHROPIC_USAGE}
    p = AnthropicProvider(api_key=SECRET, stream=False, transport=httpx.MockTransport(lambda r: httpx.Response(200, json=payload)))
    completion = await p.complete(make_request())
    assert completion.content == "{}" and completion.usage is not None
    assert completion.usage.input_tokens == 542


async def test_anthropic_stream_cut_before_message_stop() -> None:
    body = anthropic_sse(STREAM_EVENTS[:4])
    p = AnthropicProvider(api_key=SECRET, transport=httpx.MockTransport(
        lambda r: httpx.Response(200, headers={"content-type": "text/event-stream"}, text=body)))
    with pytest.raises(Disconnected) as info:
        await p.complete(make_request())
    assert getattr(info.value, "usage", "absent") is None


async def test_anthropic_stream_cut_after_message_delta_keeps_its_usage() -> None:
    # message_delta carries the final counts; cut after it, they were thrown
    # away and the call counted as unknown (an OpenAI stream keeps its usage chunk).
    body = anthropic_sse(STREAM_EVENTS[:-1])
    p = AnthropicProvider(api_key=SECRET, transport=httpx.MockTransport(
        lambda r: httpx.Response(200, headers={"content-type": "text/event-stream"}, text=body)))
    with pytest.raises(Disconnected) as info:
        await p.complete(make_request())
    assert getattr(info.value, "usage", "absent") == STREAM_USAGE


async def test_anthropic_stream_delta_zeros_never_lower_message_start_counts() -> None:
    # SGLang's message_delta says "input_tokens": 0 (and may zero the cache
    # counts); the counts are cumulative, but that 0 replaced message_start's
    # and every call was recorded (and priced) as having had no input.
    zeroed = {"input_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "output_tokens": 40}
    events = [*STREAM_EVENTS[:-2], ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                                      "usage": zeroed}), STREAM_EVENTS[-1]]
    p = AnthropicProvider(api_key=SECRET, transport=httpx.MockTransport(
        lambda r: httpx.Response(200, headers={"content-type": "text/event-stream"}, text=anthropic_sse(events))))
    completion = await p.complete(make_request())
    assert completion.usage == STREAM_USAGE
    # A count the delta raises still wins, and one that is no count still
    # makes the usage unknown, never a figure.
    merged = merge_anthropic_usage({"input_tokens": 0, "output_tokens": 1}, {"input_tokens": 900, "output_tokens": 5})
    assert merged == {"input_tokens": 900, "output_tokens": 5}
    assert usage_from_anthropic(merge_anthropic_usage(ANTHROPIC_USAGE, {"input_tokens": -5, "output_tokens": 9})) is None


@pytest.mark.parametrize(("kind", "error"), [("overloaded_error", ProviderUnavailable), ("rate_limit_error", RateLimited)])
async def test_anthropic_error_event_mid_stream(kind: str, error: type[Exception]) -> None:
    body = anthropic_sse([STREAM_EVENTS[0], ("error", {"type": "error", "error": {"type": kind, "message": "Overloaded"}})])
    p = AnthropicProvider(api_key=SECRET, transport=httpx.MockTransport(
        lambda r: httpx.Response(200, headers={"content-type": "text/event-stream"}, text=body)))
    with pytest.raises(error):
        await p.complete(make_request())


async def test_anthropic_529_and_token_source_header() -> None:
    seen: list[httpx.Request] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(529, json={"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})

    p = AnthropicProvider(token_source=Tokens("tok-AAAAAAAAAAAA"), transport=recording(answer, seen))
    with pytest.raises(ProviderUnavailable, match="Overloaded"):
        await p.complete(make_request())
    assert seen[0].headers["authorization"] == "Bearer tok-AAAAAAAAAAAA" and "x-api-key" not in seen[0].headers


# -- Anthropic against serve-mock's /v1/messages ----------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_anthropic_against_serve_mock_matches_the_simulator(stream: bool) -> None:
    backend = MockBackend(seed=4)
    p = AnthropicProvider(base_url="http://127.0.0.1:9", api_key=SECRET, stream=stream, transport=mock_transport(backend))
    request = make_request(model="claude-sonnet-4-5")
    completion = await p.complete(request)
    expected = SimulatedProvider(seed=4, latency=Latency(median=0)).answer(request)
    assert completion.content == expected.content
    assert completion.usage == expected.usage  # cache reads re-added to the input
    assert backend.ledger.usage == expected.usage


async def test_anthropic_faults_from_serve_mock() -> None:
    backend = MockBackend(seed=4)

    async def fails(fault: str, **headers: str) -> Exception:
        p = AnthropicProvider(api_key=SECRET, transport=mock_transport(backend), headers={"x-mock-fault": fault, **headers})
        with pytest.raises(Exception) as info:
            await p.complete(make_request())
        return info.value

    cut = await fails("disconnect")
    assert type(cut) is Disconnected and getattr(cut, "usage", "absent") is None
    limited = await fails("429", **{"x-mock-reset": "8"})
    assert type(limited) is RateLimited and limited.retry_after == 8.0
    reply = backend.handle(MockRequest(method="POST", path="/v1/messages", body=json.dumps(
        {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"x-mock-fault": "429", "x-mock-reset": "8"}))
    headers = dict(reply.headers)
    assert reply.status == 429 and headers["retry-after"] == "8"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0" and "anthropic-ratelimit-requests-reset" in headers
    assert json.loads(reply.chunks[0])["error"]["type"] == "rate_limit_error"
    overloaded = await fails("529")
    assert type(overloaded) is ProviderUnavailable and "mock fault 529" in str(overloaded)
    assert backend.ledger.usage == TokenUsage()


async def test_a_streamed_call_answered_with_one_json_document_is_read_as_a_plain_answer() -> None:
    # A server that ignores "stream": true; the answer used to be reported as
    # a dropped connection ("stream cut short"), retried, usage unknown.
    payload = {
        "model": "local",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "{}"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3},
    }
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, transport=httpx.MockTransport(
        lambda r: httpx.Response(200, json=payload)))
    completion = await p.complete(make_request())
    assert completion.content == "{}" and completion.usage == TokenUsage.of(input_tokens=7, output_tokens=3)


@pytest.mark.parametrize("kind", ["text/plain", None])
async def test_a_streamed_call_answered_with_json_labelled_text_is_read_as_a_plain_answer(kind: str | None) -> None:
    # The answer was read as a stream without events: "cut short", retried
    # and paid again, its usage unknown.
    payload = {
        "model": "local",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "{}"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3},
    }
    headers = {} if kind is None else {"content-type": kind}
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, transport=fixed(
        200, headers=headers, body="\n " + json.dumps(payload)))
    completion = await p.complete(make_request())
    assert completion.content == "{}" and completion.usage == TokenUsage.of(input_tokens=7, output_tokens=3)


async def test_events_labelled_text_plain_are_still_read_as_a_stream() -> None:
    chunks = [
        {"model": "local", "choices": [{"index": 0, "delta": {"content": "{"}}]},
        {"choices": [{"index": 0, "delta": {"content": "}"}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 2, "completion_tokens": 1}},
    ]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, transport=fixed(
        200, headers={"content-type": "text/plain; charset=utf-8"}, body=body))
    completion = await p.complete(make_request())
    assert completion.content == "{}" and completion.usage == TokenUsage.of(input_tokens=2, output_tokens=1)


@pytest.mark.parametrize("kind", ["text/plain", None])
async def test_text_labelled_events_cut_after_done_are_an_answer_and_cut_json_a_disconnect(kind: str | None) -> None:
    # Events read whole are parsed as they arrived: a cut after [DONE]
    # loses nothing, as it does for an event stream.
    chunks = [
        {"model": "local", "choices": [{"index": 0, "delta": {"content": "{}"}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 2, "completion_tokens": 1}},
    ]
    events = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    headers = {} if kind is None else {"content-type": kind}
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, transport=httpx.MockTransport(
        lambda request: httpx.Response(200, headers=headers, stream=_CutChunked(events))))
    completion = await p.complete(make_request())
    assert completion.content == "{}" and completion.usage == TokenUsage.of(input_tokens=2, output_tokens=1)
    # A plain JSON answer cut short is a disconnect, its usage unknown.
    document = '{"model": "local", "choices": [{"index": 0, "message": {"content": "{}"'
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, transport=httpx.MockTransport(
        lambda request: httpx.Response(200, headers=headers, stream=_CutChunked(document))))
    with pytest.raises(Disconnected) as info:
        await p.complete(make_request())
    assert getattr(info.value, "usage", "absent") is None


async def test_a_plain_call_answered_with_an_event_stream_is_read_as_a_stream() -> None:
    # A proxy that always streams: every --no-stream call was malformed,
    # retried and billed again.
    chunks = [
        {"model": "local", "choices": [{"index": 0, "delta": {"content": "{}"}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 2, "completion_tokens": 1}},
    ]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, stream=False, transport=fixed(
        200, headers={"content-type": "text/event-stream"}, body=body))
    completion = await p.complete(make_request())
    assert completion.content == "{}" and completion.usage == TokenUsage.of(input_tokens=2, output_tokens=1)
    a = AnthropicProvider(api_key=SECRET, stream=False, transport=fixed(
        200, headers={"content-type": "text/event-stream"}, body=anthropic_sse(STREAM_EVENTS)))
    answer = await a.complete(make_request())
    assert answer.content == '{"a": 1}' and answer.usage is not None and answer.usage.output_tokens == 40


async def test_an_html_page_for_a_streamed_call_is_named() -> None:
    p = OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, transport=httpx.MockTransport(
        lambda r: httpx.Response(200, headers={"content-type": "text/html"}, text="<html>portal</html>")))
    with pytest.raises(ProviderUnavailable, match="expected an event stream, got text/html"):
        await p.complete(make_request())


async def test_an_anthropic_error_sent_with_status_200_keeps_its_words() -> None:
    # It was "malformed response (no content blocks)": "Overloaded" was lost.
    payload = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    p = AnthropicProvider(api_key=SECRET, stream=False, transport=httpx.MockTransport(
        lambda r: httpx.Response(200, json=payload)))
    with pytest.raises(ProviderUnavailable, match=r"error in a 200 answer \(overloaded_error\).*Overloaded"):
        await p.complete(make_request())


async def test_redirects_404s_and_non_json_bodies_say_what_the_server_did() -> None:
    # Each was "malformed response (body is not JSON)" (a redirect, retried),
    # or a 404 without the URL that a wrong --base-url gives.
    def server(request: httpx.Request) -> httpx.Response:
        scenario = request.url.path.split("/")[1]
        if scenario == "moved":
            return httpx.Response(307, headers={"location": "https://api.example.test/v1/chat/completions?k=1"})
        if scenario == "missing":
            return httpx.Response(404, text="not found")
        if scenario == "keyed":  # the key it was sent, put in the target's path
            return httpx.Response(307, headers={"location": f"https://api.example.test/{SECRET}/v1/chat/completions"})
        return httpx.Response(200, headers={"content-type": "text/html"}, text="<html>login</html>")

    transport = httpx.MockTransport(server)

    def provider(path: str) -> OpenAIProvider:
        return OpenAIProvider(base_url=f"http://x.test/{path}/v1", api_key=SECRET, stream=False, transport=transport)

    # The base URL to use is the target less the endpoint's path: pointed
    # at the target itself (as it said), every call 404'd at
    # .../chat/completions/chat/completions.
    with pytest.raises(NotFound, match=r"HTTP 307: the server redirects to https://api\.example\.test/v1/chat/completions; "
                       r"point --base-url at https://api\.example\.test/v1$"):
        await provider("moved").complete(make_request())
    # Never the key, though the server put it in the target (it was shown
    # twice: in the target and in the base URL to use).
    with pytest.raises(NotFound) as keyed:
        await provider("keyed").complete(make_request())
    assert SECRET not in str(keyed.value) and str(keyed.value).count("[REDACTED]") == 2
    with pytest.raises(BadRequest, match=r"HTTP 404 at http://x\.test/missing/v1/chat/completions: not found"):
        await provider("missing").complete(make_request())
    with pytest.raises(ProviderUnavailable, match=r"body is not JSON: text/html, 18 bytes"):
        await provider("portal").complete(make_request())


def _openai_answer(content: str, stop: str, stream: bool) -> httpx.Response:
    usage = {"prompt_tokens": 10, "completion_tokens": 4096, "total_tokens": 4106}
    if not stream:
        return httpx.Response(200, json={"model": "m", "usage": usage, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": stop}]})
    chunks = [
        {"model": "m", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]},
        {"model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": stop}]},
        {"model": "m", "choices": [], "usage": usage},
    ]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, text=body)


def _anthropic_answer(content: str, stop: str, stream: bool) -> httpx.Response:
    if not stream:
        return httpx.Response(200, json={"type": "message", "model": "claude", "stop_reason": stop,
                                         "content": [{"type": "text", "text": content}],
                                         "usage": {"input_tokens": 10, "output_tokens": 8192}})
    events = [*STREAM_EVENTS[:3],
              ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": content}}),
              STREAM_EVENTS[5],
              ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop}, "usage": {"output_tokens": 8192}}),
              STREAM_EVENTS[7]]
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, text=anthropic_sse(events))


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(
    ("provider", "stop", "answer"),
    [("openai", "length", _openai_answer), ("anthropic", "max_tokens", _anthropic_answer)],
)
async def test_an_answer_cut_at_the_output_token_limit_says_so(
    provider: str, stop: str, answer: Any, stream: bool
) -> None:
    """A JSON answer cut off by the output token limit counted as an agent
    that left out its fields - a degraded stage or no consensus, with no
    word of why - and a retry would be cut the same way."""
    cut = '{"stage": "plan", "agent": "claude", "work_breakdown": "1. scaffold the'

    def build(content: str, reason: str) -> Any:
        transport = httpx.MockTransport(lambda r: answer(content, reason, stream))
        if provider == "openai":
            return OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, stream=stream, transport=transport)
        return AnthropicProvider(api_key=SECRET, stream=stream, transport=transport)

    with pytest.raises(BadRequest) as info:
        await build(cut, stop).complete(make_request())
    message = str(info.value)
    assert f"cut at the output token limit (stop reason '{stop}') after {len(cut)} characters" in message
    if provider == "anthropic":
        assert "max_tokens is 8192" in message
    usage = getattr(info.value, "usage", None)
    assert usage is not None and usage.output_tokens > 0, "the cut answer's tokens were billed"
    # A complete object before the cut, a plain-text request, a normal stop: answers.
    whole = '{"stage": "plan", "agent": "claude", "work_breakdown": "x"} and then some'
    assert (await build(whole, stop).complete(make_request())).content == whole
    assert (await build(cut, stop).complete(make_request(fields=(), decision_field=None))).content == cut
    normal = "end_turn" if provider == "anthropic" else "stop"
    assert (await build(cut, normal).complete(make_request())).content == cut


@pytest.mark.parametrize(
    ("error_type", "expected"),
    [("internal_server_error", ProviderUnavailable), ("some_new_error", ProviderUnavailable),
     ("overloaded_error", ProviderUnavailable), ("rate_limit_error", RateLimited),
     ("invalid_request_error", BadRequest), ("authentication_error", AuthenticationFailed)],
)
async def test_anthropic_error_mid_stream_is_permanent_only_when_known_to_be(error_type: str, expected: type) -> None:
    # An unknown type was a bad request: the stage was decided no_consensus
    # for good, with no retry (the README says "else unavailable").
    events = [STREAM_EVENTS[0], ("error", {"type": "error", "error": {"type": error_type, "message": "boom"}})]

    async def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, text=anthropic_sse(events))

    p = AnthropicProvider(api_key=SECRET, transport=httpx.MockTransport(answer))
    with pytest.raises(ProviderError) as caught:
        await p.complete(make_request(model="claude-sonnet-4-5"))
    assert type(caught.value) is expected


class _CutChunked(httpx.AsyncByteStream):
    """A body that breaks off as an HTTP/1.1 chunked one does when the
    connection drops: httpx raises "incomplete chunked read"."""

    def __init__(self, text: str) -> None:
        self.text = text

    async def __aiter__(self) -> Any:
        yield self.text.encode()
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


@pytest.mark.parametrize("kind", ["text/event-stream", "text/plain", None])
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_connection_cut_after_the_usage_keeps_it_and_the_model(provider: str, kind: str | None) -> None:
    """Usage that arrived before the cut counted when the body ended
    cleanly, and was lost when the same cut broke a chunked body (as real
    providers send): the billed call became unknown usage.  The model the
    stream named goes with it, for pricing.  Events labelled text/plain (or
    not at all) are read whole first, and lost it there too."""
    if provider == "openai":
        body = "".join(
            f"data: {json.dumps(chunk)}\n\n"
            for chunk in (
                {"model": "gpt-4o-mini", "choices": [{"delta": {"content": "{}"}}]},
                {"model": "gpt-4o-mini", "choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 200}},
            )
        )
        expected = TokenUsage.of(input_tokens=1000, output_tokens=200)
        named = "gpt-4o-mini"
    else:
        body = anthropic_sse(STREAM_EVENTS[:-1])
        expected, named = STREAM_USAGE, "claude-sonnet-4-5"

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": kind} if kind else {}, stream=_CutChunked(body))

    transport = httpx.MockTransport(answer)
    p: Any = (
        OpenAIProvider(base_url="http://x.test/v1", api_key=SECRET, transport=transport)
        if provider == "openai"
        else AnthropicProvider(api_key=SECRET, transport=transport)
    )
    with pytest.raises(Disconnected) as info:
        await p.complete(make_request(model="asked-for"))
    assert getattr(info.value, "usage", "absent") == expected
    assert getattr(info.value, "model", "absent") == named
    assert SECRET not in str(info.value)
