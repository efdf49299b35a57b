"""serve-mock over a real socket on 127.0.0.1 (real clock: sockets and an
autojumping clock make false timeouts), and the official openai client
against it - proof that it speaks the real protocol."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import trio
import trio.testing

from actors._mock_backend import MockBackend
from actors._mock_server import serve_mock
from actors._openai import OpenAIProvider
from actors._simulator import Latency, SimulatedProvider
from messages import Disconnected, ProviderTimeout, RateLimited, TokenUsage

from tests._providers_support import SECRET, make_request


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, MockBackend]]:
    backend = MockBackend(seed=7)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_mock, backend)
        yield url, backend
        nursery.cancel_scope.cancel()


async def test_binds_loopback_and_reports_the_real_port(served: tuple[str, MockBackend]) -> None:
    url, _ = served
    parsed = httpx.URL(url)
    assert parsed.host == "127.0.0.1" and parsed.port not in (None, 0) and parsed.path == "/v1"


async def test_plain_streaming_models_and_errors_over_http(served: tuple[str, MockBackend]) -> None:
    url, backend = served
    request = make_request()
    expected = SimulatedProvider(seed=7, latency=Latency(median=0)).answer(request)
    async with httpx.AsyncClient() as client:
        models = await client.get(f"{url}/models")
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "mock-model"
        missing = await client.get(f"{url}/nope")
        assert missing.status_code == 404 and "error" in missing.json()
        bad = await client.post(f"{url}/chat/completions", json={"messages": []})
        assert bad.status_code == 400

        provider = OpenAIProvider(base_url=url, api_key=SECRET, stream=True)
        streamed = await provider.complete(request)
        await provider.aclose()
        provider = OpenAIProvider(base_url=url, api_key=SECRET, stream=False)
        plain = await provider.complete(request)
        await provider.aclose()
    assert streamed.content == plain.content == expected.content
    assert streamed.usage == plain.usage == expected.usage
    assert backend.ledger.completions == 2 and backend.ledger.usage == expected.usage + expected.usage  # type: ignore[operator]


async def test_cut_stream_over_a_socket_is_a_disconnect(served: tuple[str, MockBackend]) -> None:
    url, backend = served
    provider = OpenAIProvider(base_url=url, api_key=SECRET, headers={"x-mock-fault": "disconnect"})
    with pytest.raises(Disconnected) as info:
        await provider.complete(make_request())
    await provider.aclose()
    assert getattr(info.value, "usage", "absent") is None
    assert backend.ledger.usage == TokenUsage()


async def test_429_over_a_socket_carries_its_reset(served: tuple[str, MockBackend]) -> None:
    url, _ = served
    provider = OpenAIProvider(base_url=url, api_key=SECRET, headers={"x-mock-fault": "429", "x-mock-reset": "12"})
    with pytest.raises(RateLimited) as info:
        await provider.complete(make_request())
    await provider.aclose()
    assert info.value.retry_after == 12.0


async def test_slow_answer_hits_the_provider_timeout(served: tuple[str, MockBackend]) -> None:
    url, _ = served
    provider = OpenAIProvider(
        base_url=url, api_key=SECRET, timeout=httpx.Timeout(0.3), headers={"x-mock-fault": "slow", "x-mock-delay": "20"}
    )
    with trio.fail_after(10):
        with pytest.raises(ProviderTimeout):
            await provider.complete(make_request())
    await provider.aclose()


async def test_connection_refused_is_a_disconnect() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = OpenAIProvider(base_url=f"http://127.0.0.1:{port}/v1", api_key=SECRET)
    with pytest.raises(Disconnected):
        await provider.complete(make_request())
    await provider.aclose()


async def test_malformed_http_gets_400(served: tuple[str, MockBackend]) -> None:
    port = httpx.URL(served[0]).port
    assert port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        reply = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(4096):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 400")


GOOD = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("path", "headers", "body"),
    [
        ("/chat/completions", {"x-mock-fault": "slow", "x-mock-delay": "abc"}, GOOD),
        ("/chat/completions", {"x-mock-fault": "429", "x-mock-reset": "inf"}, GOOD),
        # A typo sent no reset at all, as "none" does.
        ("/chat/completions", {"x-mock-fault": "429", "x-mock-reset-style": "retry_after"}, GOOD),
        ("/messages", {"x-mock-fault": "429", "x-mock-reset-style": "openia"},
         {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]}),
        ("/chat/completions", {"x-mock-fault": "429", "x-mock-reset": "1e300", "x-mock-reset-style": "retry-after-date"},
         GOOD),
        ("/chat/completions", {}, {**GOOD, "stream": True, "stream_options": 1}),
        ("/chat/completions", {}, {**GOOD, "response_format": "json"}),
        ("/chat/completions", {}, {"model": "m", "messages": [{"role": "user", "content": [{"text": 5}]}]}),
        ("/chat/completions", {}, {"model": "m", "messages": [{"role": "user", "content": "\ud800"}]}),
        ("/messages", {}, {"model": "m", "max_tokens": 9, "system": [{"text": None}],
                           "messages": [{"role": "user", "content": "hi"}]}),
    ],
)
async def test_a_request_the_backend_cannot_read_fails_alone(
    served: tuple[str, MockBackend], path: str, headers: dict[str, str], body: dict[str, object]
) -> None:
    """Each of these ended serve-mock for every client (exit 1, later
    connections refused); now each is a 400, and the server serves on."""
    url, _ = served
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        bad = await client.post(path, headers=headers, content=json.dumps(body).encode())
        assert bad.status_code == 400, bad.text
        assert "cannot serve this request" in bad.text
        assert (await client.post("/chat/completions", json=GOOD)).status_code == 200


def test_a_request_refused_as_unreadable_spends_no_fault() -> None:
    """The ledger counted a fault that never fired, and a counted rule was
    spent on the refused request: the next good one was not cut."""
    from actors._mock_backend import FaultRule, MockRequest

    backend = MockBackend(seed=7, faults=[FaultRule(kind="disconnect", count=1)])

    def post(body: dict[str, object]) -> Any:
        return backend.handle(MockRequest(method="POST", path="/v1/chat/completions", headers={},
                                          body=json.dumps({**body, "stream": True}).encode()))

    bad = post({"model": "m", "messages": [{"role": "user", "content": [{"text": 5}]}]})
    assert bad.status == 400 and backend.ledger.faults == {}
    assert post(GOOD).cut_after is not None, "the counted fault cuts the next stream"
    assert post(GOOD).cut_after is None and backend.ledger.faults == {"disconnect": 1}


# -- the official openai client (acceptance 2) -----------------------------------


async def test_official_openai_client_plain(served: tuple[str, MockBackend]) -> None:
    url, backend = served

    def call() -> tuple[object, object]:
        with openai.OpenAI(base_url=url, api_key=SECRET, max_retries=0) as client:
            listed = [m.id for m in client.models.list()]
            reply = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "Say something as JSON."}],
                response_format={"type": "json_object"},
            )
            return listed, reply

    listed, reply = await trio.to_thread.run_sync(call)
    assert listed == ["mock-model"]
    assert reply.object == "chat.completion"  # type: ignore[attr-defined]
    content = reply.choices[0].message.content  # type: ignore[attr-defined]
    assert json.loads(content)["answer"].startswith("mock-")
    usage = reply.usage  # type: ignore[attr-defined]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 0
    assert backend.ledger.usage.total_tokens == usage.total_tokens


async def test_official_openai_client_streaming_with_usage(served: tuple[str, MockBackend]) -> None:
    url, _ = served
    request = make_request()
    expected = SimulatedProvider(seed=7, latency=Latency(median=0)).answer(request)
    body = OpenAIProvider(base_url=url, api_key=SECRET).request_body(request)

    def call() -> tuple[str, object, list[str | None]]:
        with openai.OpenAI(base_url=url, api_key=SECRET, max_retries=0) as client:
            stream = client.chat.completions.create(
                model=body["model"], messages=body["messages"], stream=True,
                stream_options={"include_usage": True}, response_format={"type": "json_object"},
            )
            text, usage, finishes = "", None, []
            for chunk in stream:
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    finishes.append(choice.finish_reason)
                if chunk.usage is not None:
                    usage = chunk.usage
            return text, usage, finishes

    text, usage, finishes = await trio.to_thread.run_sync(call)
    assert text == expected.content
    assert finishes[-1] == "stop"
    assert expected.usage is not None
    assert usage.prompt_tokens == expected.usage.input_tokens  # type: ignore[attr-defined]
    assert usage.completion_tokens_details.reasoning_tokens == expected.usage.reasoning_output_tokens  # type: ignore[attr-defined]
    assert usage.prompt_tokens_details.cached_tokens == expected.usage.cached_input_tokens  # type: ignore[attr-defined]


async def test_official_openai_client_sees_429_with_retry_after(served: tuple[str, MockBackend]) -> None:
    url, _ = served

    def call() -> openai.RateLimitError:
        with openai.OpenAI(base_url=url, api_key=SECRET, max_retries=0) as client:
            with pytest.raises(openai.RateLimitError) as info:
                client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}],
                    extra_headers={"x-mock-fault": "429", "x-mock-reset": "3"},
                )
            return info.value

    error = await trio.to_thread.run_sync(call)
    assert error.status_code == 429
    assert error.response.headers["retry-after"] == "3"
    assert error.response.headers["x-ratelimit-reset-requests"] == "3s"


async def test_cancelled_call_releases_its_connection() -> None:
    """Cancel a call mid-flight; with a one-connection pool the next call
    can only succeed if the cancelled one gave its connection back."""
    from actors._mock_backend import FaultRule

    backend = MockBackend(seed=7, faults=[FaultRule(kind="slow", count=1)], slow_seconds=30)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_mock, backend)
        provider = OpenAIProvider(
            base_url=url, api_key=SECRET, timeout=httpx.Timeout(10.0),
            transport=httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1)),
        )
        # Cancel once the server holds the call, not after a fixed 0.2 s: on
        # a loaded machine the call had not reached it yet, the slow fault
        # went to the next call, and that one timed out.
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:

                async def cancel_once_held() -> None:
                    while not backend.ledger.faults.get("slow"):
                        await trio.testing.wait_all_tasks_blocked(cushion=0.01)
                    scope.cancel()

                inner.start_soon(cancel_once_held)
                await provider.complete(make_request())
        assert scope.cancelled_caught
        with trio.fail_after(5):
            completion = await provider.complete(make_request())
        assert completion.usage is not None
        await provider.aclose()
        nursery.cancel_scope.cancel()


def test_a_port_in_use_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    from actors._cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve-mock", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    # Not "error: OSError: [Errno 98] ...": the start-up failure came
    # wrapped in the server's nursery's exception group.
    assert err.startswith(f"conclave serve-mock: error: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in err


@pytest.mark.parametrize("stream", [True, False])
async def test_a_refused_connection_names_the_server_in_words(stream: bool) -> None:
    # It said "stream cut short (ConnectError)" of a server it never reached.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = OpenAIProvider(base_url=f"http://127.0.0.1:{port}/v1", api_key=SECRET, stream=stream)
    with pytest.raises(Disconnected) as info:
        await provider.complete(make_request())
    await provider.aclose()
    message = str(info.value)
    assert message.startswith(f"openai: cannot connect to 127.0.0.1:{port}")
    assert "cut short" not in message and "Error" not in message.split("(")[0]
    assert "ConnectError" not in message


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        # Accepted, though run --seed refuses it: no run could match the answers.
        (["--seed", str(2**64)], "argument --seed: the seed must fit in 64 bits"),
        # Taken as not given: a server that required no key.
        (["--require-key-env", ""], "argument --require-key-env: must not be empty"),
    ],
)
def test_serve_mock_refuses_what_run_would_refuse(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    from actors._cli import build_parser

    # Parsed only: accepted, the server would start (and serve on).
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve-mock", "--port", "0", *argv])
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    ("host", "needle"),
    [
        ("no-such-host.invalid", "--host 'no-such-host.invalid': cannot resolve it to an address"),
        ("a..b", "--host 'a..b': not a host name or address"),  # a bare UnicodeError, exit 1
    ],
)
def test_an_unresolvable_host_is_bad_input_named(capsys: pytest.CaptureFixture[str], host: str, needle: str) -> None:
    from actors._cli import main

    assert main(["serve-mock", "--port", "0", "--host", host]) == 2
    err = capsys.readouterr().err
    assert err.startswith("conclave serve-mock: error: ") and needle in err and err.count("\n") == 1
