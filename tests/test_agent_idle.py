"""An idle agent holds its task, its inbox and its state - nothing else.

Per-agent memory is a target (≤ 1.3x a raw trio task parked on a channel;
bench/memory_bench.py), and a stray object per parked agent is 1,000,000
stray objects at the scale the product promises.
"""

from __future__ import annotations

import gc

import trio
import trio.testing

from actors import Agent, AgentSpec, RetryPolicy, pipeline_with_panel
from messages import open_channel


async def test_a_parked_agent_keeps_no_caught_exception_alive() -> None:
    pipeline = pipeline_with_panel("validate", ["a0"])
    spec = AgentSpec(name="a0", model="sim-model")
    gateway, _g = open_channel(1, name="gateway")
    metrics, _m = open_channel(1, name="metrics")
    store, _s = open_channel(1, name="store")
    inboxes = []
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            inbox, receive = open_channel(1, name="agent")
            inboxes.append(inbox)
            agent = Agent(
                spec=spec, pipeline=pipeline, gateway=gateway, metrics=metrics, store=store, retry=RetryPolicy(), seed=0
            )
            nursery.start_soon(agent.run, receive)
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        # The agent tries receive_nowait() first; parking inside its
        # ``except WouldBlock`` block kept that exception and its traceback
        # alive for as long as the agent idled (+0.2 KiB per agent).
        stray = [o for o in gc.get_objects() if isinstance(o, trio.WouldBlock)]
        assert stray == []
        for inbox in inboxes:
            inbox.close()
