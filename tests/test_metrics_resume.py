"""Acceptance 4 end to end: a run resumed after a crash reports the same
totals and cost as an uninterrupted one (replays do not double-count).

Needs ``Orchestrator.resume`` (issue 3); skipped until it is merged.  The
library-level property in test_metrics_accumulator.py shows the same for
the accumulator alone today.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from actors import MockProvider, Orchestrator, SimulatedProvider, open_orchestrator, pipeline_from_dict
from actors._pipeline import Pipeline
from messages import Completion, CompletionRequest, TokenUsage

AGENTS = ("gemini", "claude", "gpt_pro")
MODELS = {"gemini": "gemini-2.5-pro", "claude": "claude-sonnet-4-5", "gpt_pro": "gpt-4o"}


def pipeline() -> Pipeline:
    return pipeline_from_dict(
        {
            "agents": {a: {"provider": "sim", "model": MODELS[a]} for a in AGENTS},
            "stages": [{"name": s, "agents": list(AGENTS), "mode": "sequential"} for s in ("plan", "tasks", "implement")],
        },
        source="test",
    )


def provider(crash_on_call: int | None, scope: list[trio.CancelScope]) -> MockProvider:
    sim = SimulatedProvider(seed=9, disagreement_rate=0.0)
    calls = 0

    async def answer(request: CompletionRequest) -> Completion:
        nonlocal calls
        calls += 1
        if calls == crash_on_call:
            scope[0].cancel()  # the process "dies" mid-call
            await trio.sleep_forever()
        await trio.sleep(1.0)
        n = len(request.key.stage) * 1_000 + len(request.key.agent)
        return attrs.evolve(
            sim.answer(request),
            usage=TokenUsage.of(input_tokens=n, cached_input_tokens=n // 4, output_tokens=n // 10),
        )

    return MockProvider(answer, name="sim")


@pytest.mark.skipif(not hasattr(Orchestrator, "resume"), reason="Orchestrator.resume arrives with issue 3")
async def test_resume_after_a_crash_reports_the_same_totals(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_orchestrator(store=str(tmp_path / "a.db"), provider=provider(None, []), pipeline=pipeline()) as orch:
        whole = await orch.run("SPEC-R", run_id="R")

    scope: list[trio.CancelScope] = [trio.CancelScope()]
    with scope[0]:
        async with open_orchestrator(store=str(tmp_path / "b.db"), provider=provider(5, scope), pipeline=pipeline()) as orch:
            await orch.run("SPEC-R", run_id="R")
    assert scope[0].cancelled_caught
    async with open_orchestrator(store=str(tmp_path / "b.db"), provider=provider(None, []), pipeline=pipeline()) as orch:
        resumed = await orch.resume("R")  # type: ignore[attr-defined]

    assert whole.completed and resumed.completed
    assert resumed.usage == whole.usage
    assert resumed.cost_usd == whole.cost_usd > 0
    assert resumed.turns < whole.turns, "durable outputs were replayed, not bought again"
    assert resumed.digest == whole.digest
