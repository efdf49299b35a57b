"""OpenAI-compatible Chat Completions over httpx.

POSTs to ``{base_url}/chat/completions``, where ``base_url`` includes the
version path as the official client takes it (``https://api.openai.com/v1``,
``http://127.0.0.1:8000/v1``).  A query in the base URL is kept, so an
Azure OpenAI deployment works as
``https://RESOURCE.openai.azure.com/openai/deployments/NAME?api-version=...``
(Azure hosts get the ``api-key`` header instead of a bearer key).

Asks for JSON output (``response_format={"type": "json_object"}``) when the
request names response fields, and streams by default with
``stream_options={"include_usage": true}`` so the usage arrives as the
stream's last chunk.  A stream is complete at ``data: [DONE]``, or at a
clean end of body after the choice's ``finish_reason`` (llama.cpp builds and
other compatible servers never send ``[DONE]``).  One that ends before
either, or breaks off, was cut short: :class:`~messages.Disconnected` with
usage unknown unless its usage chunk had arrived.
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
from ._usage_normalise import usage_from_openai

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"


class OpenAIProvider(HttpProvider):
    """Chat Completions over httpx (see the module docstring).  ``complete``
    is a checkpoint and may be cancelled at any of its awaits (the call is
    then abandoned, usage unknown); failures are the typed errors of
    :mod:`actors._http_errors`.  The key never appears in its repr or errors."""

    name = "openai"

    def __init__(self, *, base_url: str = DEFAULT_OPENAI_BASE_URL, json_mode: bool = True, **kwargs: Any) -> None:
        super().__init__(base_url=base_url, **kwargs)
        self.json_mode = json_mode
        self._azure = (self.base_url.host or "").endswith(".azure.com")

    def endpoint(self) -> httpx.URL:
        return self.base_url.copy_with(path=self.base_url.path.rstrip("/") + "/chat/completions")

    def auth_headers(self, secret: str, *, is_token: bool) -> dict[str, str]:
        if self._azure and not is_token:
            return {"api-key": secret}
        return {"authorization": f"Bearer {secret}"}

    def request_body(self, request: CompletionRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [
                {"role": "system", "content": system_prompt(request)},
                {"role": "user", "content": request.prompt},
            ],
        }
        if self.json_mode and request.response_fields:
            body["response_format"] = {"type": "json_object"}
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def parse_body(self, request: CompletionRequest, data: Any) -> Completion:
        if isinstance(data, dict) and data.get("error") is not None and "choices" not in data:
            # An error sent with status 200 (some compatible servers do):
            # its own words and kind, not "no choices".
            raise self._error_object(data, where="in a 200 answer")
        try:
            message = data["choices"][0]["message"]
            content = message.get("content")
            if content is None:
                content = message.get("refusal") or ""
            content = _content_text(content)
            if content is None:
                raise TypeError("content is neither a string nor parts with text")
            stop = data["choices"][0].get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise with_stated_usage(
                malformed(self.name, "no choices[0].message.content"), data, usage_from_openai
            ) from None
        model = data.get("model") if isinstance(data.get("model"), str) else request.model
        completion = model_answer(content=content, usage=usage_from_openai(data.get("usage")), model=model)
        return self.finished(request, completion, stop)

    async def read_stream(self, request: CompletionRequest, response: httpx.Response) -> Completion:
        parts: list[str] = []
        usage: TokenUsage | None = None
        model = request.model
        done = False
        stop: object = None
        events = iter_sse(response)
        try:
            async for _event, data in events:
                if data.strip() == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
                    raise malformed(self.name, "a stream chunk is not JSON") from None
                if not isinstance(chunk, dict):
                    raise malformed(self.name, "a stream chunk is not an object")
                if chunk.get("error") is not None:
                    # An error event mid-stream: some tokens may have been billed.
                    raise self._error_object(chunk)
                if isinstance(chunk.get("model"), str):
                    model = chunk["model"]
                for choice in chunk.get("choices") or ():
                    if isinstance(choice, dict) and choice.get("index") not in (0, None):
                        # Only the first choice is the answer, as choices[0]
                        # is in a plain one: the texts of every index were
                        # run together into one answer that parsed as none.
                        continue
                    delta = (choice.get("delta") or {}) if isinstance(choice, dict) else {}
                    text = _content_text(delta.get("content")) if isinstance(delta, dict) else None
                    if text is not None:
                        parts.append(text)
                    if isinstance(choice, dict) and _ended(choice.get("finish_reason")):
                        stop = choice["finish_reason"]
                if chunk.get("usage") is not None:
                    usage = usage_from_openai(chunk["usage"])
        except httpx.TransportError as exc:
            raise self.cut_mid_stream(exc, usage, model) from None
        if not done and stop is None:
            # Usage stays unknown unless its chunk arrived before the cut.
            raise with_usage(
                stream_cut(self.name, "neither [DONE] nor a finish_reason before the stream ended"), usage, model=model
            )
        if done:
            await events.drain()
        # else: the body ended cleanly after the finish_reason, as servers
        # that never send [DONE] end it; a cut connection raised above.  It
        # failed every such call as cut short, retried, and billed each try.
        return self.finished(request, model_answer(content="".join(parts), usage=usage, model=model), stop)

    def _error_object(self, data: dict[str, Any], *, where: str = "mid-stream") -> ProviderError:
        """The typed error for an error object that came with status 200:
        judged by its ``code`` and ``type`` as the status would have been
        (a prompt too long for the model is permanent, not a provider
        outage to retry).  Usage unknown: some tokens may have been billed."""
        err = data.get("error")
        fields = err if isinstance(err, dict) else {}
        words = {str(fields.get(name) or "") for name in ("code", "type")} - {""}
        kind = "/".join(sorted(words))
        detail = f"{self.name}: error {where}" + (f" ({kind})" if kind else "")
        detail += f": {body_excerpt(json.dumps(data).encode(), self._secrets())}"
        error: ProviderError
        if words & _QUOTA:
            error = QuotaExceeded(detail)
        elif words & _RATE_LIMITED:
            error = RateLimited(detail)
        elif words & _AUTHENTICATION:
            error = AuthenticationFailed(detail)
        elif words & _BAD_REQUEST:
            error = BadRequest(detail)
        else:  # server_error, or nothing said: the provider's trouble
            error = ProviderUnavailable(detail)
        return with_usage(error, None)


def _ended(finish_reason: Any) -> bool:
    """Whether a streamed choice's ``finish_reason`` says it ended: a
    reason, not a placeholder.  Ollama and SGLang send ``""`` on every
    chunk, KoboldCpp ``"null"``; taken for an end, a stream its proxy cut
    halfway through was a complete answer (a stream without ``[DONE]`` is
    complete at a clean end of body after its finish_reason), stored and
    decided on."""
    return isinstance(finish_reason, str) and finish_reason.strip() not in ("", "null")


def _content_text(content: Any) -> str | None:
    """The text of a message's (or a delta's) ``content``: a string, or a
    list of parts (Mistral's Magistral sends ``[{"type": "thinking", ...},
    {"type": "text", "text": "..."}]``) whose ``text`` parts are joined and
    the rest (thinking, images) skipped; such an answer was refused as
    malformed on every attempt, its usage lost.  ``None`` when it holds no
    text part at all."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        ]
        return "".join(texts) if texts else None
    return None


# OpenAI's error ``code``s and ``type``s, by what they mean for a retry.
_QUOTA = frozenset({"insufficient_quota", "billing_hard_limit_reached"})
_RATE_LIMITED = frozenset({"rate_limit_exceeded", "rate_limit_error", "requests", "tokens"})
_AUTHENTICATION = frozenset({"invalid_api_key", "authentication_error", "permission_error"})
_BAD_REQUEST = frozenset(
    {
        "invalid_request_error",
        "context_length_exceeded",
        "content_filter",
        "content_policy_violation",
        "invalid_prompt",
        # A model it does not know: the run's pipeline names it, and no
        # resume can change it (not a NotFound, which a resume mends).
        "model_not_found",
        "not_found_error",
    }
)
