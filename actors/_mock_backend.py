"""serve-mock's brain: an OpenAI-compatible Chat Completions backend (and
an Anthropic Messages one at ``/v1/messages``), independent of how bytes
reach it.

:mod:`actors._mock_server` puts it behind a real HTTP/1.1 socket (trio +
h11); :func:`actors._mock_server.mock_transport` puts it behind an
``httpx.MockTransport`` for in-process, virtual-time tests.  Both send the
same bytes, cut streams at the same place, and keep the same ledger.

Outputs are the embedded simulator's: a request whose system message holds
the ``conclave-request:`` line (Conclave's providers send it) is answered
with :meth:`SimulatedProvider.answer` for the same seed, so a run against
serve-mock reaches the same decisions, with the same usage, as a run on the
simulator.  Other requests get a small deterministic reply.

Faults, per request header or for the first N chat requests (``--fault``):

``429``        429 with reset headers (``x-mock-reset`` seconds, in the
               form ``x-mock-reset-style`` says: ``all`` (default),
               ``retry-after``, ``retry-after-ms``, ``retry-after-date``,
               ``openai``, ``anthropic``, ``none``; on ``/v1/messages`` the
               default is ``anthropic``: ``retry-after`` plus the RFC 3339
               ``anthropic-ratelimit-requests-reset``)
``disconnect`` a stream cut in the middle (a plain request: the connection
               is dropped before the response)
``slow``       wait ``x-mock-delay`` (default ``slow_seconds``) seconds first
``500`` ``502`` ``503`` ``504`` ``529`` ``400`` ``401`` ``403`` ``404``
``422``        that status with an OpenAI-style error body
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import attrs

from messages import AgentKey, CompletionRequest, ConclaveError, TokenUsage

from ._rng import derive_token
from ._simulator import Latency, SimulatedProvider
from ._usage_normalise import usage_to_openai

FAULT_KINDS = frozenset(
    {"429", "disconnect", "slow", "500", "502", "503", "504", "529", "400", "401", "403", "404", "422"}
)
# In the order the help lists them.
RESET_STYLES = ("all", "retry-after", "retry-after-ms", "retry-after-date", "openai", "anthropic", "none")
_META = re.compile(r"^conclave-request: (\{.*\})\s*$", re.MULTILINE)
_CREATED = 1_700_000_000  # a fixed "created": outputs must not depend on the wall clock
_STREAM_PIECE = 24


class MockConfigError(ConclaveError, ValueError):
    """A bad ``--fault`` or other serve-mock setting."""


@attrs.frozen(kw_only=True, slots=True)
class FaultRule:
    """``kind`` for the first ``count`` chat requests (``None``: all)."""

    kind: str
    count: int | None = None

    @classmethod
    def parse(cls, text: str) -> FaultRule:
        kind, _, count = text.strip().partition(":")
        if kind not in FAULT_KINDS:
            raise MockConfigError(f"unknown fault {kind!r}; choose from {', '.join(sorted(FAULT_KINDS))}")
        if not count:
            return cls(kind=kind)
        if not count.isdigit() or int(count) < 1:
            raise MockConfigError(f"fault count must be a positive integer, got {count!r}")
        return cls(kind=kind, count=int(count))


@attrs.frozen(kw_only=True, slots=True)
class MockRequest:
    method: str
    path: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes


@attrs.frozen(kw_only=True, slots=True)
class MockReply:
    """What to send.  ``drop``: close the connection without answering.
    ``cut_after``: send that many body chunks, then drop the connection.
    Whoever sends it calls :meth:`MockBackend.delivered` once the last byte
    went out, so the ledger never counts what the client did not get."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    chunks: tuple[bytes, ...] = ()
    cut_after: int | None = None
    delay: float = 0.0
    drop: bool = False
    completion: bool = False  # a model answer: charged once delivered in full
    usage: TokenUsage | None = None  # the usage it reports (None: not sent)


@attrs.define
class Ledger:
    """What the server has sent: usage only counts once its bytes went
    out in full (a cut stream never sent its usage chunk)."""

    requests: int = 0
    completions: int = 0
    faults: dict[str, int] = attrs.field(factory=dict)
    usage: TokenUsage = TokenUsage()

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "completions": self.completions,
            "faults": dict(sorted(self.faults.items())),
            "usage": self.usage.as_dict(),
        }


def _error_body(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()


def _error(
    status: int, message: str, kind: str, headers: Sequence[tuple[str, str]] = (), *, anthropic: bool = False
) -> MockReply:
    if anthropic:
        return _json(status, {"type": "error", "error": {"type": kind, "message": message}}, headers)
    return _json(status, json.loads(_error_body(status, message, kind)), headers)


def _json(status: int, payload: Any, headers: Sequence[tuple[str, str]] = ()) -> MockReply:
    body = json.dumps(payload).encode()
    return MockReply(
        status=status,
        headers=(("content-type", "application/json"), *headers),
        chunks=(body,),
    )


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _fmt_seconds(seconds: float) -> str:
    return str(int(seconds)) if seconds == int(seconds) else f"{seconds:g}"


class MockBackend:
    """serve-mock's backend (see the module docstring): answers each
    :class:`MockRequest` synchronously, as the simulator of ``seed`` would,
    injecting the configured faults, and keeps a ledger of the usage it
    sent in full."""

    def __init__(
        self,
        *,
        seed: int = 0,
        disagreement_rate: float = 0.03,
        faults: Sequence[FaultRule] = (),
        reset_seconds: float = 1.0,
        slow_seconds: float = 30.0,
        required_key: str | None = None,
        wall_now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.seed = seed
        self._required_key = required_key
        self._sim = SimulatedProvider(seed=seed, disagreement_rate=disagreement_rate, latency=Latency(median=0))
        self._faults = list(faults)
        self._fault_left = [rule.count for rule in self._faults]
        self.reset_seconds = reset_seconds
        self.slow_seconds = slow_seconds
        self._wall_now = wall_now
        self.ledger = Ledger()

    # -- routing ---------------------------------------------------------------

    def handle(self, request: MockRequest) -> MockReply:
        """The reply to ``request``.  A request the backend cannot read
        (a field of the wrong type, a fault header that is no number, text
        it cannot hash) is a 400 for that request alone: raised, it ended
        serve-mock for every client."""
        fired, left = dict(self.ledger.faults), list(self._fault_left)
        try:
            return self._route(request)
        except (ValueError, TypeError, AttributeError, KeyError, OverflowError, RecursionError) as exc:
            # No fault was served: a counted rule must fire on the next
            # request, and the ledger must not list it.
            self.ledger.faults, self._fault_left = fired, left
            anthropic = request.path.split("?", 1)[0].rstrip("/") == "/v1/messages"
            message = f"cannot serve this request: {type(exc).__name__}: {exc}"[:300]
            return _error(400, message, "invalid_request_error", anthropic=anthropic)

    def _route(self, request: MockRequest) -> MockReply:
        path = request.path.split("?", 1)[0].rstrip("/")
        if path in ("/v1/chat/completions", "/chat/completions"):
            if request.method != "POST":
                return _error(405, "use POST", "invalid_request_error")
            return self._chat(request)
        if path == "/v1/messages":
            if request.method != "POST":
                return _error(405, "use POST", "invalid_request_error", anthropic=True)
            return self._messages(request)
        if path in ("/v1/models", "/models") and request.method == "GET":
            return _json(200, {"object": "list", "data": [
                {"id": "mock-model", "object": "model", "created": _CREATED, "owned_by": "conclave"}
            ]})
        if path == "/v1/mock/ledger" and request.method == "GET":
            return _json(200, self.ledger.as_dict())
        return _error(404, f"no route {request.method} {path}", "invalid_request_error")

    def _next_fault(self, headers: Mapping[str, str]) -> str | None:
        asked = headers.get("x-mock-fault")
        if asked:
            return asked.strip()
        for i, rule in enumerate(self._faults):
            left = self._fault_left[i]
            if left is None:
                return rule.kind
            if left > 0:
                self._fault_left[i] = left - 1
                return rule.kind
        return None

    # -- chat completions ------------------------------------------------------

    def __repr__(self) -> str:
        return f"MockBackend(seed={self.seed}, faults={self._faults!r})"

    def _authorised(self, headers: Mapping[str, str]) -> bool:
        if self._required_key is None:
            return True
        given = headers.get("authorization", "")
        return (
            given == f"Bearer {self._required_key}"
            or headers.get("api-key") == self._required_key
            or headers.get("x-api-key") == self._required_key
        )

    def _prologue(self, request: MockRequest, *, anthropic: bool) -> MockReply | tuple[dict[str, Any], str, list[Any]]:
        """Authorise and parse a model request: the reply to send at once,
        or (body, model, messages)."""
        self.ledger.requests += 1
        if not self._authorised(request.headers):
            # Echo what was sent, as some servers do: clients must redact.
            given = (
                request.headers.get("authorization", "").removeprefix("Bearer ")
                or request.headers.get("api-key", "")
                or request.headers.get("x-api-key", "")
            )
            kind = "authentication_error" if anthropic else "invalid_request_error"
            return _error(401, f"Incorrect API key provided: {given}.", kind, anthropic=anthropic)
        try:
            body = json.loads(request.body)
        except ValueError:
            return _error(400, "body is not JSON", "invalid_request_error", anthropic=anthropic)
        messages = body.get("messages") if isinstance(body, dict) else None
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages or not isinstance(model, str) or not model:
            return _error(400, "model and messages are required", "invalid_request_error", anthropic=anthropic)
        return body, model, messages

    def _fault(self, request: MockRequest, *, stream: bool, anthropic: bool) -> tuple[MockReply | None, str | None, float]:
        """(a reply that replaces the answer, the fault, a delay first)."""
        fault = self._next_fault(request.headers)
        if fault is None:
            return None, None, 0.0
        self.ledger.faults[fault] = self.ledger.faults.get(fault, 0) + 1
        if fault == "slow":
            return None, fault, float(request.headers.get("x-mock-delay", self.slow_seconds))
        if fault == "429":
            return self._rate_limited(request.headers, anthropic=anthropic), fault, 0.0
        if fault == "disconnect":
            return (None if stream else MockReply(drop=True)), fault, 0.0
        if fault.isdigit():
            status = int(fault)
            if status == 529:
                kind = "overloaded_error"
            elif status >= 500:
                kind = "api_error" if anthropic else "server_error"
            else:
                kind = "invalid_request_error"
            extra = [("x-should-retry", v) for v in [request.headers.get("x-mock-should-retry")] if v]
            return _error(status, f"mock fault {status}", kind, extra, anthropic=anthropic), fault, 0.0
        return _error(400, f"unknown x-mock-fault {fault!r}", "invalid_request_error", anthropic=anthropic), fault, 0.0

    def _chat(self, request: MockRequest) -> MockReply:
        parsed = self._prologue(request, anthropic=False)
        if isinstance(parsed, MockReply):
            return parsed
        body, model, messages = parsed
        stream = body.get("stream") is True
        include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        replaced, fault, delay = self._fault(request, stream=stream, anthropic=False)
        if replaced is not None:
            return replaced

        content, usage = self._answer(model, messages, body)
        ident = "chatcmpl-" + derive_token(self.seed, "id", json.dumps(body, sort_keys=True), length=20)
        if not stream:
            reply = _json(200, {
                "id": ident,
                "object": "chat.completion",
                "created": _CREATED,
                "model": model,
                "system_fingerprint": "conclave-mock",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }],
                "usage": usage_to_openai(usage),
            })
            return attrs.evolve(reply, delay=delay, completion=True, usage=usage)

        def chunk(choices: list[Any], usage_payload: Any = None) -> bytes:
            data: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": _CREATED,
                "model": model,
                "system_fingerprint": "conclave-mock",
                "choices": choices,
            }
            if include_usage:
                data["usage"] = usage_payload
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        pieces = [content[i : i + _STREAM_PIECE] for i in range(0, len(content), _STREAM_PIECE)] or [""]
        chunks = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
        chunks += [chunk([{"index": 0, "delta": {"content": p}, "finish_reason": None}]) for p in pieces]
        chunks.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        if include_usage:
            chunks.append(chunk([], usage_to_openai(usage)))
        chunks.append(b"data: [DONE]\n\n")
        cut_after = None
        if fault == "disconnect":
            cut_after = 1 + max(1, len(pieces) // 2)  # the role chunk and half the content
        return MockReply(
            status=200,
            headers=(("content-type", "text/event-stream"), ("cache-control", "no-cache")),
            chunks=tuple(chunks),
            cut_after=cut_after,
            delay=delay,
            completion=True,
            usage=usage if include_usage else None,
        )

    # -- anthropic messages ----------------------------------------------------

    def _messages(self, request: MockRequest) -> MockReply:
        parsed = self._prologue(request, anthropic=True)
        if isinstance(parsed, MockReply):
            return parsed
        body, model, messages = parsed
        stream = body.get("stream") is True
        replaced, fault, delay = self._fault(request, stream=stream, anthropic=True)
        if replaced is not None:
            return replaced
        content, usage = self._answer(model, messages, body, system=_text_of(body.get("system")))
        ident = "msg_" + derive_token(self.seed, "id", json.dumps(body, sort_keys=True), length=24)
        # Anthropic's input_tokens exclude cache reads (and writes; the mock has none).
        wire_usage: dict[str, Any] = {
            "input_tokens": usage.input_tokens - usage.cached_input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": usage.cached_input_tokens,
            "output_tokens": usage.output_tokens,
            "output_tokens_details": {"thinking_tokens": usage.reasoning_output_tokens},
        }
        message: dict[str, Any] = {
            "id": ident, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": content}],
            "stop_reason": "end_turn", "stop_sequence": None, "usage": wire_usage,
        }
        if not stream:
            reply = _json(200, message)
            return attrs.evolve(reply, delay=delay, completion=True, usage=usage)

        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()

        start = {**message, "content": [], "stop_reason": None, "usage": {**wire_usage, "output_tokens": 1}}
        pieces = [content[i : i + _STREAM_PIECE] for i in range(0, len(content), _STREAM_PIECE)] or [""]
        chunks = [
            event("message_start", {"message": start}),
            event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            event("ping", {}),
        ]
        chunks += [
            event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": p}}) for p in pieces
        ]
        chunks += [
            event("content_block_stop", {"index": 0}),
            event("message_delta", {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": usage.output_tokens,
                          "output_tokens_details": {"thinking_tokens": usage.reasoning_output_tokens}},
            }),
            event("message_stop", {}),
        ]
        return MockReply(
            status=200,
            headers=(("content-type", "text/event-stream"), ("cache-control", "no-cache")),
            chunks=tuple(chunks),
            cut_after=3 + max(1, len(pieces) // 2) if fault == "disconnect" else None,
            delay=delay,
            completion=True,
            usage=usage,
        )

    def delivered(self, reply: MockReply) -> None:
        """``reply`` went out in full: charge its usage to the ledger."""
        if not reply.completion:
            return
        self.ledger.completions += 1
        if reply.usage is not None:
            self.ledger.usage = self.ledger.usage + reply.usage

    def _answer(
        self, model: str, messages: list[Any], body: dict[str, Any], *, system: str = ""
    ) -> tuple[str, TokenUsage]:
        system = "\n".join(
            [system]
            + [_text_of(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") in ("system", "developer")]
        ).strip()
        user = "\n".join(_text_of(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user")
        match = _META.search(system)
        meta: Any = None
        if match:
            try:
                meta = json.loads(match.group(1))
            except ValueError:
                meta = None
        if isinstance(meta, dict):
            try:
                request = CompletionRequest(
                    key=AgentKey(run_id="mock", branch_id="mock", stage=str(meta["stage"]), agent=str(meta["agent"])),
                    attempt=1,
                    spec_id=str(meta["spec_id"]),
                    provider="openai",
                    model=model,
                    prompt=user,
                    response_fields=tuple(str(f) for f in meta.get("fields") or ()),
                    decision_field=meta.get("decision_field"),
                    aggregate=bool(meta.get("aggregate")),
                )
            except (KeyError, TypeError, ValueError):
                request = None
            if request is not None:
                completion = self._sim.answer(request)
                assert completion.usage is not None
                return completion.content, completion.usage
        text = system + "\n" + user
        token = derive_token(self.seed, "generic", model, text)
        wants_json = (body.get("response_format") or {}).get("type") in ("json_object", "json_schema") or "JSON" in system
        content = json.dumps({"answer": f"mock-{token}"}) if wants_json else f"mock reply {token}"
        usage = TokenUsage.of(input_tokens=len(text) // 4 + 8, output_tokens=len(content) // 4 + 1)
        return content, usage

    def _rate_limited(self, headers: Mapping[str, str], *, anthropic: bool = False) -> MockReply:
        try:
            reset = float(headers.get("x-mock-reset", self.reset_seconds))
        except ValueError:
            reset = self.reset_seconds
        style = headers.get("x-mock-reset-style", "anthropic" if anthropic else "all").strip().lower()
        if style not in RESET_STYLES:
            # A typo ("retry_after") sent no reset at all, as "none" does,
            # and a test of reset handling passed for the wrong reason.
            raise ValueError(f"x-mock-reset-style {style!r} is none of {', '.join(RESET_STYLES)}")
        seconds = _fmt_seconds(reset)
        out: list[tuple[str, str]] = []
        if style in ("all", "retry-after") or (anthropic and style == "anthropic"):
            out.append(("retry-after", seconds))
        if style in ("all", "retry-after-ms"):
            out.append(("retry-after-ms", str(int(reset * 1000))))
        if style == "retry-after-date":
            out.append(("retry-after", format_datetime(self._wall_now() + timedelta(seconds=reset), usegmt=True)))
        if style in ("all", "openai"):
            out += [
                ("x-ratelimit-limit-requests", "60"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", f"{seconds}s"),
            ]
        if style == "anthropic":
            when = (self._wall_now() + timedelta(seconds=reset)).isoformat().replace("+00:00", "Z")
            out += [("anthropic-ratelimit-requests-remaining", "0"), ("anthropic-ratelimit-requests-reset", when)]
        if "x-mock-should-retry" in headers:
            out.append(("x-should-retry", headers["x-mock-should-retry"]))
        if anthropic:
            return _error(429, "Rate limit reached (mock)", "rate_limit_error", out, anthropic=True)
        return _error(429, "Rate limit reached (mock)", "requests", out)
