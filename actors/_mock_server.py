"""``conclave serve-mock``: :class:`~actors._mock_backend.MockBackend`
behind a real HTTP/1.1 server (trio sockets + h11, keep-alive, chunked
streaming), or behind an ``httpx.MockTransport`` for in-process tests.

h11 is a sans-IO HTTP/1.1 parser: it does the framing (content-length,
chunked, keep-alive, pipelining rules) so this module only moves bytes.
A "cut" stream sends part of a chunked body and closes the socket, which a
client sees exactly as a real dropped connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import h11
import httpx
import trio

from ._mock_backend import MockBackend, MockReply, MockRequest

MAX_BODY = 8 * 1024 * 1024
_SERVER = ("server", "conclave-serve-mock")


def base_url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


async def _read_request(
    conn: h11.Connection, stream: trio.abc.Stream
) -> tuple[h11.Request, bytes] | None:
    """The next request and its body, or ``None`` when the client is done."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


async def _send_reply(conn: h11.Connection, stream: trio.abc.Stream, reply: MockReply) -> bool:
    """Send ``reply``; ``False`` when the connection must now be dropped."""
    headers = [_SERVER, *reply.headers]
    streaming = any(k == "content-type" and v.startswith("text/event-stream") for k, v in reply.headers)
    if not streaming:
        headers.append(("content-length", str(sum(len(c) for c in reply.chunks))))
    await stream.send_all(conn.send(h11.Response(status_code=reply.status, headers=headers)))
    for index, chunk in enumerate(reply.chunks):
        if reply.cut_after is not None and index >= reply.cut_after:
            return False
        data = conn.send(h11.Data(data=chunk))
        if data:
            await stream.send_all(data)
    await stream.send_all(conn.send(h11.EndOfMessage()))
    return True


async def serve_connection(backend: MockBackend, stream: trio.abc.Stream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            try:
                received = await _read_request(conn, stream)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    body = f"bad request: {exc}\n".encode()
                    status = exc.error_status_hint
                    headers = [_SERVER, ("content-length", str(len(body))), ("connection", "close")]
                    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
                    await stream.send_all(conn.send(h11.Data(data=body)) or b"")
                    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                return
            if received is None:
                return
            request, body = received
            target = request.target.decode("latin-1")
            fields = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
            try:
                reply = backend.handle(
                    MockRequest(method=request.method.decode("ascii"), path=target, headers=fields, body=body)
                )
            except Exception as exc:  # a bug: this request fails, the server serves on
                message = f"internal error: {type(exc).__name__}"
                reply = MockReply(
                    status=500,
                    headers=(("content-type", "text/plain"), ("connection", "close")),
                    chunks=(message.encode(),),
                )
            if reply.delay > 0:
                await trio.sleep(reply.delay)
            if reply.drop or not await _send_reply(conn, stream, reply):
                return
            backend.delivered(reply)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        return
    finally:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.aclose()


async def serve_mock(
    backend: MockBackend,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``task_status.started`` gets the base URL
    with the real port (``port=0`` picks a free one)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    try:
        real_port = listeners[0].socket.getsockname()[1]
        task_status.started(base_url_of(host, real_port))

        async def handler(stream: trio.SocketStream) -> None:
            await serve_connection(backend, stream)

        await trio.serve_listeners(handler, listeners)
    finally:
        for listener in listeners:
            with contextlib.suppress(trio.ClosedResourceError):
                await listener.aclose()


class _ReplyStream(httpx.AsyncByteStream):
    def __init__(self, backend: MockBackend, reply: MockReply, request: httpx.Request) -> None:
        self._backend = backend
        self._reply = reply
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        last = len(self._reply.chunks) - 1
        for index, chunk in enumerate(self._reply.chunks):
            if self._reply.cut_after is not None and index >= self._reply.cut_after:
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body", request=self._request
                )
            await trio.lowlevel.checkpoint()
            if index == last:  # handed over in full (the reader may stop right after it)
                self._backend.delivered(self._reply)
            yield chunk


def mock_transport(backend: MockBackend) -> httpx.MockTransport:
    """``backend`` as an in-process httpx transport: same replies, same
    cuts, delays on trio's clock (virtual under ``autojump_clock``)."""

    async def handler(request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        reply = backend.handle(
            MockRequest(
                method=request.method,
                path=request.url.raw_path.decode("ascii"),
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
            )
        )
        if reply.delay > 0:
            await trio.sleep(reply.delay)
        if reply.drop:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return httpx.Response(reply.status, headers=list(reply.headers), stream=_ReplyStream(backend, reply, request))

    return httpx.MockTransport(handler)
