"""Turn throughput: one stage with N agents through the full path, against
raw trio request-reply round trips, in the same process run.

    python bench/turns_bench.py [--agents 100,1000,10000] [--runs 5]

Conclave's path per turn: coordinator -> agent -> gateway (interceptors
installed) -> simulated provider (zero latency) -> agent -> metrics ->
store writer (group commit to a real SQLite file) -> coordinator, then
consensus and a durable decision.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors import Latency, SimulatedProvider, open_orchestrator, pipeline_with_panel  # noqa: E402
from bench._common import alternate, machine, positive, report, sizes  # noqa: E402
from messages import Interceptor  # noqa: E402


async def raw_round(n: int) -> float:
    """Scatter-gather: n worker tasks, each parked on its own channel; one
    request to each, one reply from each on a shared channel."""
    replies_tx, replies_rx = trio.open_memory_channel[int](n)
    inboxes = []
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            tx, rx = trio.open_memory_channel[int](1)
            inboxes.append(tx)

            async def worker(rx: trio.MemoryReceiveChannel[int] = rx) -> None:
                async for item in rx:
                    await replies_tx.send(item)

            nursery.start_soon(worker)
        start = time.perf_counter()
        for i, tx in enumerate(inboxes):
            await tx.send(i)
        for _ in range(n):
            await replies_rx.receive()
        elapsed = time.perf_counter() - start
        for tx in inboxes:
            tx.close()
    return n / elapsed


async def conclave_stage(n: int, db: str) -> float:
    agents = [f"a{i:05d}" for i in range(n)]
    pipeline = pipeline_with_panel("validate", agents)
    provider = SimulatedProvider(seed=1, disagreement_rate=0.0, latency=Latency(median=0))
    async with open_orchestrator(
        store=db,
        provider=provider,
        pipeline=pipeline,
        interceptors={"gateway": [Interceptor()]},  # the seam installed, pass-through
    ) as orch:
        start = time.perf_counter()
        result = await orch.run("SPEC-BENCH")
        elapsed = time.perf_counter() - start
    assert result.completed and result.turns == n, result
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=sizes, default="100,1000,10000")
    parser.add_argument("--runs", type=positive, default=5)
    args = parser.parse_args()
    print(f"turn throughput on {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(10**9))
        for n in args.agents:
            base, subj = alternate(
                args.runs,
                lambda: trio.run(raw_round, n),
                lambda: trio.run(conclave_stage, n, os.path.join(tmp, f"b{next(counter)}.db")),
            )
            report(f"N={n:>6}", "turns/s", base, subj)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
            print(f"          one stage of {n:,} agents completed; peak RSS so far {peak:.2f} GiB")


if __name__ == "__main__":
    # As the CLI runs (actors/_gc.py), for the baseline and Conclave alike.
    from actors import throughput_gc

    with throughput_gc():
        main()
