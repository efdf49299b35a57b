"""Metrics benchmarks: not timed tests, scripts that print ratios.

1. Usage events per second through the metrics accumulator actor (charge
   once by identity, SessionMetrics per run/stage/agent/model, Decimal
   pricing, budget check, snapshot marking) against a raw trio channel
   consumer doing the same token sums, in the same process, alternating,
   medians of ``--repeats`` runs.  Also with a subscriber that never reads.
2. Wall time of a whole run on the simulator (virtual clock, so the time
   is the orchestrator's own work) with and without a metrics subscriber
   that never reads: the ratio should be 1 within noise.

    python bench/metrics_bench.py [--events N] [--repeats R] [--agents A]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import (  # noqa: E402
    Latency,
    Limits,
    MetricsAccumulator,
    MetricsHub,
    SimulatedProvider,
    open_orchestrator,
    pipeline_with_panel,
)
from bench._common import positive  # noqa: E402
from store import Store  # noqa: E402
from messages import (  # noqa: E402
    AgentKey,
    MetricsQuery,
    TokenUsage,
    UsageRecorded,
    open_channel,
    reply_pair,
)

MODELS = ("gpt-4o", "claude-sonnet-4-5", "gemini-2.5-pro")
STAGES = ("plan", "tasks", "implement", "validate")


def make_events(n: int) -> list[UsageRecorded]:
    events = []
    for i in range(n):
        key = AgentKey(run_id="bench", branch_id="b", stage=STAGES[i % 4], agent=f"agent{i % 16}")
        usage = TokenUsage.of(
            input_tokens=1_000 + i % 977, cached_input_tokens=i % 300, output_tokens=200 + i % 311
        )
        events.append(UsageRecorded(key=key, attempt=1 + i // 16, model=MODELS[i % 3], provider="sim", usage=usage))
    return events


async def through_accumulator(events: list[UsageRecorded], silent_subscriber: bool) -> float:
    hub = MetricsHub()
    if silent_subscriber:
        hub.subscribe()  # never read
    acc = MetricsAccumulator(publish=hub.publish if silent_subscriber else None)
    tx, rx = open_channel(4096, name="metrics")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(acc.run, rx)
        start = time.perf_counter()
        for e in events:
            await tx.send(e)
        reply, pending = reply_pair("totals")
        await tx.send(MetricsQuery(run_id="bench", reply_to=reply))
        totals = await pending.receive()
        elapsed = time.perf_counter() - start
        tx.close()
    assert totals.turns == len(events) and totals.cost_usd > 0
    return len(events) / elapsed


async def through_raw_channel(events: list[UsageRecorded]) -> float:
    send, receive = trio.open_memory_channel[UsageRecorded](4096)
    sums: dict[str, list[int]] = {}
    done = trio.Event()

    async def consume() -> None:
        async for e in receive:
            u = e.usage
            assert u is not None
            for bucket in (e.key.run_id, e.key.stage):
                s = sums.setdefault(bucket, [0, 0, 0, 0, 0])
                s[0] += u.input_tokens
                s[1] += u.cached_input_tokens
                s[2] += u.output_tokens
                s[3] += u.reasoning_output_tokens
                s[4] += u.total_tokens
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        start = time.perf_counter()
        async with send:
            for e in events:
                await send.send(e)
        await done.wait()
        elapsed = time.perf_counter() - start
    assert sums["bench"][0] > 0
    return len(events) / elapsed


async def one_run(agents: int, db: str, silent_subscriber: bool) -> float:
    provider = SimulatedProvider(seed=1, disagreement_rate=0.0, latency=Latency(median=1.0))
    pipeline = pipeline_with_panel("plan", [f"a{i}" for i in range(agents)])
    # durability "normal": no fsync per commit, so disk noise does not
    # drown what is measured (the orchestrator's own work).
    store = Store.open(db, durability="normal")
    async with open_orchestrator(
        store=store, provider=provider, pipeline=pipeline, limits=Limits(max_concurrency=agents)
    ) as orch:
        if silent_subscriber:
            orch.subscribe_metrics()  # never read
        start = time.perf_counter()
        result = await orch.run("BENCH", budget=Decimal("1000"))
        elapsed = time.perf_counter() - start
    store.close()
    assert result.turns == agents
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=positive, default=100_000)
    parser.add_argument("--repeats", type=positive, default=5)
    parser.add_argument("--agents", type=positive, default=300)
    args = parser.parse_args()

    events = make_events(args.events)
    raw, acc, acc_sub = [], [], []
    for _ in range(args.repeats):  # alternate, so drift hits all equally
        raw.append(trio.run(through_raw_channel, events))
        acc.append(trio.run(through_accumulator, events, False))
        acc_sub.append(trio.run(through_accumulator, events, True))
    r, a, s = statistics.median(raw), statistics.median(acc), statistics.median(acc_sub)
    print(f"usage events: {args.events} x {args.repeats} repeats (medians)")
    print(f"  raw trio channel, sums only      {r:>12,.0f} events/s")
    print(f"  metrics accumulator              {a:>12,.0f} events/s   ratio {a / r:.3f} of raw")
    print(f"  accumulator + silent subscriber  {s:>12,.0f} events/s   ratio {s / r:.3f} of raw")

    with tempfile.TemporaryDirectory() as tmp:
        plain, silent = [], []
        warm = trio.testing.MockClock(autojump_threshold=0)
        trio.run(one_run, args.agents, str(Path(tmp) / "warm.db"), True, clock=warm)  # imports, caches
        for i in range(args.repeats):
            order = ((False, plain), (True, silent)) if i % 2 == 0 else ((True, silent), (False, plain))
            for flag, bucket in order:  # ABBA: drift hits both alike
                db = str(Path(tmp) / f"run{i}{int(flag)}.db")
                clock = trio.testing.MockClock(autojump_threshold=0)
                bucket.append(trio.run(one_run, args.agents, db, flag, clock=clock))
        p, q = statistics.median(plain), statistics.median(silent)
        spread = (max(plain) - min(plain)) / p if p else 0.0
        print(f"run of {args.agents} agents (virtual clock), wall time medians of {args.repeats}")
        print(f"  no metrics subscriber            {p * 1000:>10.1f} ms")
        print(f"  a subscriber that never reads    {q * 1000:>10.1f} ms   ratio {q / p:.3f} (run-to-run spread {spread:.1%})")


if __name__ == "__main__":
    main()
