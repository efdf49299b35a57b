"""Soak throughput with 10 % mixed faults, against a raw-trio baseline.

    python bench/soak_bench.py [--runs 2000] [--turns N] [--concurrency 64] [--repeat 3] [--workers W]

Conclave's side is the real soak (``actors._soak``): full pipelines through
agents, the fault interceptor, gate and breaker, the simulator, metrics and
the store writer (group commit to the soak's in-memory scratch SQLite
database, each run dropped once checked), with every invariant checked.  The baseline is the same shape of work in raw trio -
the same number of turns, each a ``trio.sleep`` of the simulated latency,
10 % of them failing and retried - on the same virtual clock: the floor of
what trio itself costs.  Prints agent turns per wall second and virtual
seconds per wall second for both, and the ratio.

The soak ends simulated latencies, retry pauses and rate-limit releases on
a 1 s grid (``Latency(quantum=1.0)``, its default), so what ends in the same
tick wakes together (simulated calls on one shared timer); the baseline keeps continuous sleeps (one
batch per sleep), so it is, if anything, a slightly low estimate of trio's
floor.

With ``--workers W`` > 1 each repeat also runs both sides in W processes
with the soak's split (run i in process i % W, ceil(concurrency / W) in
flight in each), timed from the parent including process start, and prints
the single-process and the W-process figures and medians.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import trio
import trio.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors._soak import SoakConfig, default_soak_plan, run_soak  # noqa: E402
from bench._common import in_shards, machine, positive  # noqa: E402

TURNS_PER_RUN = 19  # the default pipeline: 3 + 3 + 4 + 3 + 3 + 3 agents


async def raw_pipeline(rng: random.Random, turns: list[int]) -> None:
    for panel, parallel in ((3, False), (3, False), (4, False), (3, True), (3, True), (3, True)):
        async def agent() -> None:
            while True:
                turns[0] += 1
                await trio.sleep(rng.lognormvariate(0.69, 0.5))
                if rng.random() >= 0.10:
                    return
                await trio.sleep(0.5)

        if parallel:
            async with trio.open_nursery() as nursery:
                for _ in range(panel):
                    nursery.start_soon(agent)
        else:
            for _ in range(panel):
                await agent()


async def raw_soak(runs: int, concurrency: int) -> tuple[int, float]:
    rng = random.Random(1)
    turns = [0]
    indices = iter(range(runs))

    async def worker() -> None:
        for _ in indices:
            await raw_pipeline(rng, turns)

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return turns[0], trio.current_time()


def _raw_shard(runs: int, concurrency: int) -> tuple[int, float]:
    return trio.run(raw_soak, runs, concurrency, clock=trio.testing.MockClock(autojump_threshold=0))


def baseline(runs: int, concurrency: int, workers: int = 1) -> tuple[float, float, int]:
    start = time.perf_counter()
    results = in_shards(_raw_shard, runs, concurrency, workers)  # the soak's split
    turns, virtual = sum(t for t, _ in results), max(v for _, v in results)
    wall = time.perf_counter() - start
    return turns / wall, virtual / wall, turns


def conclave(runs: int, concurrency: int, seed: int, workers: int = 1) -> tuple[float, float, int, bool]:
    report = run_soak(
        SoakConfig(
            seed=seed,
            runs=runs,
            concurrency=concurrency,
            workers=workers,
            faults=default_soak_plan("disconnect:4%,429:3%,timeout:3%"),
        )
    )
    if not report.ok:
        print(f"  soak seed {seed} broke an invariant: {report.breaches[0]}")
    wall = report.wall_seconds  # W > 1: the parent's, process start included
    return report.agent_turns / wall, report.virtual_seconds / wall, report.agent_turns, report.ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=positive, default=2000)
    parser.add_argument("--turns", type=positive, help="aim for about this many agent turns (overrides --runs)")
    parser.add_argument("--concurrency", type=positive, default=64)
    parser.add_argument("--repeat", type=positive, default=3)
    parser.add_argument("--workers", type=positive, default=1, help="also measure both sides in this many processes")
    args = parser.parse_args(argv)
    runs = max(1, args.turns // TURNS_PER_RUN) if args.turns else args.runs
    print(f"soak throughput on {machine()}: {runs} runs, concurrency {args.concurrency}, 10% mixed faults")
    counts = [1] if args.workers <= 1 else [1, args.workers]
    rates: dict[int, tuple[list[float], list[float]]] = {w: ([], []) for w in counts}
    ok = True
    for i in range(args.repeat):
        for workers in counts:
            b_rate, b_virtual, b_turns = baseline(runs, args.concurrency, workers)
            c_rate, c_virtual, c_turns, c_ok = conclave(runs, args.concurrency, seed=i, workers=workers)
            ok = ok and c_ok
            rates[workers][0].append(b_rate)
            rates[workers][1].append(c_rate)
            label = "1 process" if workers == 1 else f"{workers} processes"
            print(
                f"  #{i + 1} {label}: raw trio {b_rate:,.0f} turns/s ({b_virtual:,.0f} virtual s/s, {b_turns} turns) | "
                f"conclave {c_rate:,.0f} turns/s ({c_virtual:,.0f} virtual s/s, {c_turns} turns) | "
                f"ratio {c_rate / b_rate:.3f}x"
            )
            projected = 1_000_000 / c_rate
            print(f"      one million agent turns at this rate: {projected:,.0f} s wall (target < 60 s; target rate 20,000 turns/s)")
    if args.repeat > 1 or len(counts) > 1:
        print(f"medians of {args.repeat}:")
        for workers in counts:
            b, c = statistics.median(rates[workers][0]), statistics.median(rates[workers][1])
            label = "1 process" if workers == 1 else f"{workers} processes"
            print(
                f"  {label}: raw trio {b:,.0f} turns/s | conclave {c:,.0f} turns/s | ratio {c / b:.3f}x | "
                f"one million agent turns: {1_000_000 / c:,.0f} s wall"
            )
        if len(counts) > 1:
            one, many = (statistics.median(rates[w][1]) for w in counts)
            print(f"  conclave speed-up with {args.workers} processes: {many / one:.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    # As the CLI runs (actors/_gc.py), for the baseline and Conclave alike.
    from actors import throughput_gc

    with throughput_gc():
        sys.exit(main())
