"""The embedded simulator's values, pinned: what it answers, bills and
waits is what every digest, soak and benchmark is made of, and a change to
any of them used to pass every test unseen (a mutation pass changed usage,
latency and digests silently)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from actors import Latency, SimulatedProvider, open_orchestrator
from messages import AgentKey, CompletionRequest

# `conclave run` on the embedded defaults (seed 0), as the README's first
# command prints it.  Change it only with a simulator change that means to
# change every digest, and say so in the commit.
DEFAULT_RUN_DIGEST = "077823c5a194a5179460682dde5961b21a6204757af655736901af1ea9a4ac1c"


def request(model: str = "gemini-2.5-flash", attempt: int = 1) -> CompletionRequest:
    return CompletionRequest(
        key=AgentKey(run_id="r", branch_id="b", stage="plan", agent="gemini"),
        attempt=attempt,
        spec_id="SPEC-1",
        provider="sim",
        model=model,
        prompt="plan the work " * 20,
        response_fields=("stage", "agent", "plan"),
        decision_field="plan",
    )


async def test_the_default_run_keeps_its_digest(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with open_orchestrator(store=str(tmp_path / "d.db")) as orch:
        result = await orch.run()
    assert result.completed and result.digest == DEFAULT_RUN_DIGEST


def test_an_answer_depends_on_its_identity_not_its_attempt() -> None:
    """A retried call is the same question: the same answer and usage (the
    content generator is seeded by identity; the attempt moves only the
    latency)."""
    sim = SimulatedProvider(seed=3)
    first, again = sim.answer(request(attempt=1)), sim.answer(request(attempt=2))
    assert (first.content, first.usage) == (again.content, again.usage)
    assert sim.answer(request()) == SimulatedProvider(seed=3).answer(request())
    assert SimulatedProvider(seed=4).answer(request()).content != first.content


def test_reasoning_models_report_reasoning_tokens_and_others_none() -> None:
    sim = SimulatedProvider(seed=0)
    for model in ("gpt-5", "o3-mini", "gemini-2.5-pro"):
        usage = sim.answer(request(model)).usage
        assert usage is not None and 0 < usage.reasoning_output_tokens < usage.output_tokens, model
    for model in ("gemini-2.5-flash", "claude-sonnet-4-5"):
        usage = sim.answer(request(model)).usage
        assert usage is not None and usage.reasoning_output_tokens == 0, model


def test_latency_rises_with_its_draw_and_never_passes_its_cap() -> None:
    latency = Latency(median=2.0, sigma=1.0, cap=30.0)
    draws = [latency.draw(u / 100) for u in range(1, 100)]
    assert draws == sorted(draws) and draws[0] < 2.0 < draws[-1]
    assert latency.draw(0.5) == 2.0  # the median
    assert latency.draw(1.0) == latency.draw(0.999999) == 30.0  # the tail is capped
    assert Latency(median=0.0).draw(0.9) == 0.0


async def test_a_retry_waits_its_own_latency(autojump_clock: trio.testing.MockClock) -> None:
    """The attempt is part of the latency's identity: a retry after a
    timeout is not bound to take exactly as long again."""
    sim = SimulatedProvider(seed=0, latency=Latency(median=2.0, sigma=1.0))
    took = []
    for attempt in (1, 2):
        start = trio.current_time()
        await sim.complete(request(attempt=attempt))
        took.append(trio.current_time() - start)
    assert took[0] != took[1] and all(t > 0 for t in took)
