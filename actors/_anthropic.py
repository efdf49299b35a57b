"""Anthropic Messages over httpx.

Follows the official client's convention: ``base_url`` is the API root
*without* the version (``https://api.anthropic.com``) and the provider
POSTs to ``{base_url}/v1/messages``.  A base URL that already ends in
``/v1`` is accepted too (then ``/messages`` is appended), so
``--base-url`` works either way.

Sends ``x-api-key`` (or ``authorization: Bearer`` with a token source) and
``anthropic-version``.  Usage is normalised with cache reads and writes
added to the input (Anthropic's ``input_tokens`` excludes them); when
streaming, ``message_delta`` usage is cumulative and merged over
``message_start``'s.  A stream that ends before ``message_stop`` was cut
short: :class:`~messages.Disconnected` with usage unknown.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from messages import (
    AuthenticationFailed,
    BadRequest,
    Completion,
    CompletionRequest,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
    RateLimited,
    TokenUsage,
)

from ._http_errors import body_excerpt, malformed, stream_cut, with_stated_usage, with_usage
from ._http_provider import HttpProvider, iter_sse, model_answer, system_prompt
from ._usage_normalise import merge_anthropic_usage, usage_from_anthropic

DEFAULT_ANTHROPIC_BASE_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"


class AnthropicProvider(HttpProvider):
    """The Anthropic Messages API over httpx (see the module docstring).
    ``complete`` is a checkpoint and may be cancelled at any of its awaits
    (the call is then abandoned, usage unknown); failures are the typed
    errors of :mod:`actors._http_errors`.  The key never appears in its
    repr or errors."""

    name = "anthropic"

    def __init__(
        self, *, base_url: str = DEFAULT_ANTHROPIC_BASE_URL, max_tokens: int = 8192, **kwargs: Any
    ) -> None:
        super().__init__(base_url=base_url, **kwargs)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.max_tokens = max_tokens

    def endpoint(self) -> httpx.URL:
        path = self.base_url.path.rstrip("/")
        path += "/messages" if path.endswith("/v1") else "/v1/messages"
        return self.base_url.copy_with(path=path)

    def auth_headers(self, secret: str, *, is_token: bool) -> dict[str, str]:
        auth = {"authorization": f"Bearer {secret}"} if is_token else {"x-api-key": secret}
        return {**auth, "anthropic-version": ANTHROPIC_VERSION}

    def request_body(self, request: CompletionRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": self.max_tokens,
            "system": system_prompt(request),
            "messages": [{"role": "user", "content": request.prompt}],
        }
        if self.stream:
            body["stream"] = True
        return body

    def parse_body(self, request: CompletionRequest, data: Any) -> Completion:
        if isinstance(data, dict) and data.get("type") == "error":
            # An error sent with status 200 (some gateways do): its own
            # words, not "no content blocks".
            raise self._stream_error(data, where="in a 200 answer")
        blocks = data.get("content") if isinstance(data, dict) else None
        if not isinstance(blocks, list):
            raise with_stated_usage(malformed(self.name, "no content blocks"), data, usage_from_anthropic)
        text = "".join(
            b["text"] for b in blocks if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        )
        model = data["model"] if isinstance(data.get("model"), str) else request.model
        completion = model_answer(content=text, usage=usage_from_anthropic(data.get("usage")), model=model)
        return self.finished(request, completion, data.get("stop_reason"))

    def output_limit(self) -> str:
        return f"max_tokens is {self.max_tokens} (AnthropicProvider(max_tokens=...))"

    def _stream_error(self, data: dict[str, Any], *, where: str = "mid-stream") -> ProviderError:
        err = data.get("error") if isinstance(data.get("error"), dict) else {}
        kind = err.get("type", "") if isinstance(err, dict) else ""
        detail = f"{self.name}: error {where} ({kind}): {body_excerpt(json.dumps(data).encode(), self._secrets())}"
        error: ProviderError
        # Only what is known to be the request's fault is permanent; any
        # other type (internal_server_error, a new one) may pass, as the
        # README says and the OpenAI path does: it used to be a bad
        # request, decided durably as no_consensus with no retry.
        if kind == "rate_limit_error":
            error = RateLimited(detail)
        elif kind in ("invalid_request_error", "not_found_error", "request_too_large"):
            # (not_found_error mid-stream: a model it does not know, which
            # the run's pipeline names - no resume mends it.)
            error = BadRequest(detail)
        elif kind in ("authentication_error", "permission_error"):
            error = AuthenticationFailed(detail)
        elif kind == "billing_error":
            error = QuotaExceeded(detail)
        else:
            error = ProviderUnavailable(detail)
        return with_usage(error, None)

    async def read_stream(self, request: CompletionRequest, response: httpx.Response) -> Completion:
        parts: list[str] = []
        start_usage: Any = None
        delta_usage: Any = None
        model = request.model
        done = False
        stop: object = None
        events = iter_sse(response)
        try:
            async for event, data in events:
                try:
                    payload = json.loads(data)
                except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
                    raise malformed(self.name, "a stream event is not JSON") from None
                if not isinstance(payload, dict):
                    raise malformed(self.name, "a stream event is not an object")
                kind = payload.get("type", event)
                if kind == "message_start":
                    message = payload.get("message") or {}
                    start_usage = message.get("usage")
                    if isinstance(message.get("model"), str):
                        model = message["model"]
                elif kind == "content_block_delta":
                    delta = payload.get("delta") or {}
                    if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                        parts.append(delta["text"])
                elif kind == "message_delta":
                    delta_usage = merge_anthropic_usage(delta_usage, payload.get("usage"))
                    stop = (payload.get("delta") or {}).get("stop_reason", stop)
                elif kind == "message_stop":
                    done = True
                    break
                elif kind == "error":
                    raise self._stream_error(payload)
        except httpx.TransportError as exc:
            raise self.cut_mid_stream(exc, _cut_usage(start_usage, delta_usage), model) from None
        if not done:
            cut = stream_cut(self.name, "no message_stop before the stream ended")
            raise with_usage(cut, _cut_usage(start_usage, delta_usage), model=model)
        await events.drain()
        usage = usage_from_anthropic(merge_anthropic_usage(start_usage, delta_usage))
        return self.finished(request, model_answer(content="".join(parts), usage=usage, model=model), stop)


def _cut_usage(start: Any, delta: Any) -> TokenUsage | None:
    """A stream cut before message_stop: message_delta carries the final
    counts, so cut after it the call's usage is known (as an OpenAI
    stream's usage chunk); before it, unknown."""
    return None if delta is None else usage_from_anthropic(merge_anthropic_usage(start, delta))
