"""Schedule points per agent turn: the hot path's cost in trio's own unit.

Wall-clock speed is the benchmarks' business (bench/), but how many task
steps a turn takes is deterministic and a regression there is a regression
in throughput: every step is a trip round trio's run loop.  A turn needs
four (an agent starts and takes its request; its completion; its durable
ack; its inbox closing at the end of the run); the gateway, metrics
accumulator, store writer and coordinator work in batches.
"""

from __future__ import annotations

import collections
from pathlib import Path

import attrs
import trio

from actors import Gateway, Latency, MockProvider, SimulatedProvider, open_orchestrator, pipeline_with_panel
from messages import AgentKey, Completion, CompletionRequest, Interceptor, TokenUsage, open_channel, reply_pair


class StepCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps: collections.Counter[str] = collections.Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name.split(" ")[0]] += 1


async def test_a_parallel_turn_costs_about_four_task_steps(tmp_path: Path) -> None:
    n = 400
    agents = [f"a{i:03d}" for i in range(n)]
    counter = StepCounter()
    async with open_orchestrator(
        store=tmp_path / "steps.db",
        provider=SimulatedProvider(seed=1, disagreement_rate=0.0, latency=Latency(median=0)),
        pipeline=pipeline_with_panel("validate", agents),
        interceptors={"gateway": [Interceptor()]},
    ) as orch:
        trio.lowlevel.add_instrument(counter)
        try:
            result = await orch.run("SPEC-STEPS")
        finally:
            trio.lowlevel.remove_instrument(counter)
    assert result.completed and result.turns == n
    per_turn = sum(counter.steps.values()) / n
    agent_steps = counter.steps["actors._agent.Agent.run"] / n
    # Was 6.9: a receive() that yields though a request is queued, a gateway
    # buffer smaller than a panel, a checkpoint per zero-latency call, and a
    # stage_start event sent with a schedule point before the dispatch.
    assert agent_steps == 4.0, counter.steps
    assert per_turn < 4.5, counter.steps


class Instant:
    """A provider that answers without ever reaching a schedule point."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: CompletionRequest) -> Completion:
        self.calls += 1
        return Completion(content="{}", usage=TokenUsage.of(input_tokens=1), model="m")


def call(i: int) -> CompletionRequest:
    key = AgentKey(run_id="r", branch_id="b", stage="plan", agent=f"a{i}")
    return CompletionRequest(key=key, attempt=1, spec_id="S", provider="p", model="m", prompt="x", panel=(key.agent,))


async def test_a_worker_yields_during_a_burst_of_instant_answers() -> None:
    """Calls that never checkpoint are served back to back, but not
    unboundedly: other tasks (and cancellation) get a turn every 64."""
    provider = Instant()
    gateway = Gateway({"p": MockProvider(provider, name="p")}, max_concurrency=1)
    tx, rx = open_channel(1024, name="gateway")
    seen: list[int] = []
    pendings = []
    for i in range(640):
        reply, pending = reply_pair("test")
        tx.send_nowait(attrs.evolve(call(i), reply_to=reply))
        pendings.append(pending)

    async def watch() -> None:
        while provider.calls < 640:
            seen.append(provider.calls)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.run, rx)
        nursery.start_soon(watch)
        for pending in pendings:
            await pending.receive()
        tx.close()
    progress = sorted(set(seen) - {0})
    assert len(progress) >= 4, f"the watcher barely ran while the burst was served: {progress}"
    # trio runs each batch's tasks in a random order, so the watcher may miss
    # one of the worker's yields, never two in a row.
    assert all(b - a <= 128 for a, b in zip([0, *progress], progress)), progress


async def test_a_worker_in_a_burst_can_be_cancelled() -> None:
    provider = Instant()
    gateway = Gateway({"p": MockProvider(provider, name="p")}, max_concurrency=1)
    tx, rx = open_channel(1024, name="gateway")
    for i in range(1000):
        reply, _ = reply_pair("test")
        tx.send_nowait(attrs.evolve(call(i), reply_to=reply))
    with trio.move_on_after(0):
        await gateway.run(rx)
    assert provider.calls <= 64, "a cancelled worker stops at its next schedule point"

