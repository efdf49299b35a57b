"""The HTTP providers' connections, against serve-mock's real server on
127.0.0.1 (real clock), and the event-stream reader's bounds."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
import trio.testing

from actors import AnthropicProvider, OpenAIProvider
from actors._http_provider import DRAIN_SECONDS, MAX_ANSWER_BYTES, iter_sse
from actors._mock_backend import MockBackend
from actors._mock_server import base_url_of, serve_connection
from messages import ZERO_USAGE, Disconnected, ProviderUnavailable

from ._providers_support import SECRET, make_request



class Server:
    """serve-mock's connection handler on a real socket, counting the
    connections it accepts and the most open at once."""

    def __init__(self) -> None:
        self.backend = MockBackend(seed=1)
        self.accepted = 0
        self.open = 0
        self.most_open = 0
        self.url = ""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=512)
        self.url = base_url_of("127.0.0.1", listeners[0].socket.getsockname()[1])
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await serve_connection(self.backend, stream)
        finally:
            self.open -= 1


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_streamed_calls_reuse_one_connection(kind: str) -> None:
    # Each streamed call stopped reading at [DONE] (message_stop), before
    # the chunked body's end, so httpx threw its connection away: a new
    # TCP (and TLS) handshake per call.
    server = Server()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        if kind == "openai":
            provider: OpenAIProvider | AnthropicProvider = OpenAIProvider(base_url=server.url, api_key=SECRET)
        else:
            provider = AnthropicProvider(base_url=server.url.removesuffix("/v1"), api_key=SECRET)
        assert provider.stream
        try:
            for attempt in range(1, 6):
                completion = await provider.complete(make_request(attempt=attempt))
                assert completion.usage is not None
        finally:
            await provider.aclose()
        nursery.cancel_scope.cancel()
    assert server.accepted == 1


async def test_more_calls_at_once_than_httpx_pools_by_default_all_get_a_connection() -> None:
    # httpx caps a client at 100 connections: the 101st call waited for
    # one, timed out as if the provider had (opening the breaker), and its
    # agent was lost.  The gateway is what bounds calls in flight.
    server = Server()
    calls = 130
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        provider = OpenAIProvider(
            base_url=server.url,
            api_key=SECRET,
            timeout=httpx.Timeout(30.0, pool=0.2),
            headers={"x-mock-fault": "slow", "x-mock-delay": "1"},
        )
        failures: list[Exception] = []

        async def one(i: int) -> None:
            try:
                await provider.complete(make_request(agent=f"a{i}"))
            except Exception as exc:  # collected, asserted below
                failures.append(exc)

        try:
            async with trio.open_nursery() as callers:
                for i in range(calls):
                    callers.start_soon(one, i)
        finally:
            await provider.aclose()
        nursery.cancel_scope.cancel()
    assert failures == []
    assert server.most_open == calls


def _streaming(chunks: AsyncIterator[bytes]) -> httpx.Response:
    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for chunk in chunks:
                yield chunk

    return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Body())


async def test_a_line_without_end_is_refused_as_its_bytes_arrive() -> None:
    sent = 0
    chunk = b"x" * 2**20

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b"data: "
        while sent < MAX_ANSWER_BYTES + 8 * len(chunk):  # bounded, should the reader buffer it all
            sent += len(chunk)
            yield chunk
            await trio.lowlevel.checkpoint()

    provider = OpenAIProvider(
        base_url="http://test/v1", api_key=SECRET, transport=httpx.MockTransport(lambda r: _streaming(endless()))
    )
    with pytest.raises(ProviderUnavailable, match="larger than"):
        await provider.complete(make_request())
    # Refused at the cap, not after buffering the line (it read until a newline).
    assert sent <= MAX_ANSWER_BYTES + len(chunk)


async def test_sse_lines_end_only_at_cr_lf_or_crlf_across_chunks() -> None:
    parts = [
        b'data: {"a": "x\xe2\x80\xa8y\x0cz"}\r',  # U+2028 and a form feed inside the data
        b"\n\r\n",  # the CRLF ends split across chunks: one line end, then a blank line
        b"event: e2\rdata: 2\r\r",
        b"data: cut",  # the stream ends mid-event: dropped
    ]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    events = [item async for item in iter_sse(_streaming(body()))]
    assert events == [("message", '{"a": "x\u2028y\x0cz"}'), ("e2", "2")]


async def test_after_the_final_event_a_stalled_stream_costs_a_bounded_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def stalls_after_done() -> AsyncIterator[bytes]:
        yield (
            b'data: {"model": "gpt-5", "choices": [{"delta": {"content": "{}"}, "finish_reason": "stop"}]}\n\n'
            b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n\n'
            b"data: [DONE]\n\n"
        )
        await trio.sleep_forever()

    provider = OpenAIProvider(
        base_url="http://test/v1",
        api_key=SECRET,
        transport=httpx.MockTransport(lambda r: _streaming(stalls_after_done())),
    )
    start = trio.current_time()
    completion = await provider.complete(make_request(fields=(), decision_field=None))
    assert completion.content == "{}" and completion.usage is not None
    assert trio.current_time() - start == pytest.approx(DRAIN_SECONDS)


async def test_a_bare_cr_inside_a_chunk_does_not_swallow_the_next_chunks_lf() -> None:
    # SSE lets each line end as it likes; a proxy's "\r"-ended keep-alive
    # comment mid-chunk made the LF opening the next chunk read as the
    # second half of a CRLF, gluing two events into one.
    parts = [b": keep-alive\rdata: 1", b"\n\ndata: 2\n", b"\n"]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    events = [item async for item in iter_sse(_streaming(body()))]
    assert events == [("message", "1"), ("message", "2")]


async def test_https_to_a_plain_http_server_says_the_tls_handshake_failed() -> None:
    # Under trio httpx raises ConnectError('') for it, and the error said
    # only "cannot connect to 127.0.0.1:PORT": the SSLError (wrong version
    # number: the server answered the handshake in plain http) is only in
    # its chain.
    server = Server()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        provider = OpenAIProvider(base_url=server.url.replace("http://", "https://"), api_key=SECRET)
        try:
            with pytest.raises(Disconnected) as info:
                await provider.complete(make_request())
        finally:
            await provider.aclose()
        nursery.cancel_scope.cancel()
    message = str(info.value)
    assert "the TLS handshake failed with 127.0.0.1:" in message
    assert "WRONG_VERSION_NUMBER" in message or "RECORD_LAYER_FAILURE" in message
    assert message.endswith("the server may be speaking plain http: try http:// instead of https:// in the base URL")
    assert "cannot connect" not in message
    assert getattr(info.value, "usage", "absent") == ZERO_USAGE
