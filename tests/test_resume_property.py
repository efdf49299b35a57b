"""A property of the whole orchestrator: whatever the pipeline, the fault
plan, the budget and where a run is cut off (once, or again during its resume), the
resumed run is the uninterrupted one - and it does not matter whether the
resume gets a fresh fault interceptor (a new process) or the one that
served the run (an embedding app resuming in the same process)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import attrs
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import RetryPolicy, SimulatedProvider, open_orchestrator, pipeline_from_dict
from messages import FaultInterceptor, FunctionInterceptor


MODELS = ("gpt-5", "claude-sonnet-4-5", "gemini-2.5-pro")  # in the price table


@attrs.frozen
class Scenario:
    agents: int
    stages: tuple[tuple[int, str, Any], ...]  # (panel size, mode, quorum)
    spec: str
    max_attempts: int
    disagreement: float
    budget: str | None  # USD; the models are priced, so it can run out
    seed: int
    cut: float  # where in the run's writes the first crash falls
    recut: float | None  # where in the resume's the second does (None: no second crash)
    same: tuple[bool, bool]  # each resume reuses the interceptor it follows


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    agents = draw(st.integers(1, 4))
    stages = draw(
        st.lists(
            st.tuples(st.integers(1, agents), st.sampled_from(["sequential", "parallel"]), st.sampled_from([1, "majority", "all"])),
            min_size=1,
            max_size=4,
        )
    )
    parts = []
    for kind in ("disconnect", "429", "timeout"):
        entry = draw(st.one_of(st.none(), st.integers(1, 3).map(str), st.sampled_from(["5%", "10%", "30%"])))
        if entry is not None:
            parts.append(f"{kind}:{entry}")
    return Scenario(
        agents=agents,
        stages=tuple(stages),
        spec=",".join(parts) or "disconnect:1",
        max_attempts=draw(st.integers(1, 4)),
        disagreement=draw(st.sampled_from([0.0, 0.3])),
        budget=draw(st.sampled_from([None, "0.001", "0.005", "0.02"])),
        seed=draw(st.integers(0, 99)),
        cut=draw(st.floats(0, 1)),
        recut=draw(st.one_of(st.none(), st.floats(0, 1))),
        same=(draw(st.booleans()), draw(st.booleans())),
    )


def _pipeline(s: Scenario) -> Any:
    names = [f"g{i}" for i in range(s.agents)]
    return pipeline_from_dict(
        {
            "agents": {n: {"provider": "sim", "model": MODELS[i % len(MODELS)]} for i, n in enumerate(names)},
            "stages": [
                {
                    "name": f"s{i}",
                    # Panels rotate, so sequential stages see different orders.
                    "agents": [names[(i + j) % s.agents] for j in range(size)],
                    "mode": mode,
                    "aggregator": "",
                    "required_fields": ["answer"],
                    "decision_field": "answer",
                    "quorum": quorum,
                }
                for i, (size, mode, quorum) in enumerate(s.stages)
            ],
        },
        source="property",
    )


async def _drive(s: Scenario, tmp: str) -> None:
    pipeline = _pipeline(s)
    retry = RetryPolicy(max_attempts=s.max_attempts)

    def orchestrator(path: str, faults: FaultInterceptor, cut: int | None = None) -> Any:
        writes = 0

        async def count(item: Any, forward: Any) -> None:
            nonlocal writes
            writes += 1
            if writes == cut:
                scope.cancel()
            await forward(item)

        def written() -> int:
            return writes

        scope = trio.CancelScope()
        orch = open_orchestrator(
            store=path,
            provider=SimulatedProvider(seed=s.seed, disagreement_rate=s.disagreement),
            pipeline=pipeline,
            seed=s.seed,
            retry=retry,
            faults=faults,
            interceptors={"store": [FunctionInterceptor(count)]},
        )
        return scope, orch, written

    whole = os.path.join(tmp, "whole.db")
    scope, orch, written = orchestrator(whole, FaultInterceptor(s.spec))
    async with orch as o:
        expected = await o.run("SPEC-P", run_id="P", budget=s.budget)
    total = written()

    path = os.path.join(tmp, "cut.db")
    faults = FaultInterceptor(s.spec)
    scope, orch, _ = orchestrator(path, faults, cut=2 + int(s.cut * (total - 2)))
    with scope:
        async with orch as o:
            await o.run("SPEC-P", run_id="P", budget=s.budget)
    if s.recut is not None:
        faults = faults if s.same[0] else FaultInterceptor(s.spec)
        scope, orch, _ = orchestrator(path, faults, cut=1 + int(s.recut * (total - 1)))
        with scope:
            async with orch as o:
                await o.resume("P")
    faults = faults if s.same[1] else FaultInterceptor(s.spec)
    scope, orch, _ = orchestrator(path, faults)
    async with orch as o:
        resumed = await o.resume("P")
    assert (resumed.status, resumed.halt_reason) == (expected.status, expected.halt_reason)
    assert resumed.unknown_usage_calls == expected.unknown_usage_calls
    assert resumed.usage == expected.usage
    assert resumed.digest == expected.digest


@settings(max_examples=100, deadline=None)
@given(s=scenarios())
def test_any_crash_and_resume_is_the_uninterrupted_run(s: Scenario) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(_drive, s, tmp, clock=trio.testing.MockClock(autojump_threshold=0))
