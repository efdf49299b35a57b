"""Shared helpers of the provider and serve-mock tests."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from messages import AgentKey, CompletionRequest

SECRET = "sk-test-Zq8Xw3Vn5Lp0Rt7Ys2Ku"  # looks like a real key; must never leak


def make_request(
    *,
    stage: str = "plan",
    agent: str = "claude",
    model: str = "gpt-5",
    fields: tuple[str, ...] = ("stage", "agent", "work_breakdown"),
    decision_field: str | None = "work_breakdown",
    prompt: str = "Plan the work.",
    attempt: int = 1,
) -> CompletionRequest:
    return CompletionRequest(
        key=AgentKey(run_id="run-1", branch_id="br-1", stage=stage, agent=agent),
        attempt=attempt,
        spec_id="SPEC-1",
        provider="openai",
        model=model,
        prompt=prompt,
        response_fields=fields,
        decision_field=decision_field,
    )


def fixed(
    status: int, *, headers: dict[str, str] | None = None, body: bytes | str = b"", record: list[httpx.Request] | None = None
) -> httpx.MockTransport:
    """A transport answering every request with the same response."""
    content = body.encode() if isinstance(body, str) else body

    def handler(request: httpx.Request) -> httpx.Response:
        if record is not None:
            record.append(request)
        return httpx.Response(status, headers=headers or {}, content=content)

    return httpx.MockTransport(handler)


def raising(exc: Callable[[httpx.Request], Exception]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc(request)

    return httpx.MockTransport(handler)
