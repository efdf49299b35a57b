"""Memory per idle agent, against a raw trio task parked on its own memory
channel; each measurement in a fresh process.

    python bench/memory_bench.py [--agents 10000,100000,1000000] [--runs 3]

"Idle agent" is what a run holds per agent while it waits for work: the
agent actor's task parked on its inbox (an intercepted channel of buffer 1)
plus its state.  The figure is peak RSS growth divided by the count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench._common import positive, sizes  # noqa: E402

CHILD = r"""
import gc, resource, sys, trio
sys.path.insert(0, {repo!r})
kind, n = sys.argv[1], int(sys.argv[2])

def rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

async def raw(n):
    async with trio.open_nursery() as nursery:
        keep = []
        for _ in range(n):
            tx, rx = trio.open_memory_channel(1)
            keep.append(tx)
            async def park(rx=rx):
                async for _ in rx:
                    pass
            nursery.start_soon(park)
        await trio.testing.wait_all_tasks_blocked()
        after = rss_kib()
        for tx in keep:
            tx.close()
    return after

async def conclave(n):
    from actors import Agent, AgentSpec, RetryPolicy, pipeline_with_panel
    from messages import open_channel
    pipeline = pipeline_with_panel("validate", ["a0"])
    spec = AgentSpec(name="a0", model="sim-model")
    gw, _g = open_channel(1, name="gateway")
    mx, _m = open_channel(1, name="metrics")
    st, _s = open_channel(1, name="store")
    retry = RetryPolicy()
    async with trio.open_nursery() as nursery:
        keep = []
        for i in range(n):
            inbox, receive = open_channel(1, name="agent")
            keep.append(inbox)
            agent = Agent(spec=spec, pipeline=pipeline, gateway=gw, metrics=mx, store=st, retry=retry, seed=0)
            nursery.start_soon(agent.run, receive)
        await trio.testing.wait_all_tasks_blocked()
        after = rss_kib()
        for inbox in keep:
            inbox.close()
    return after

import trio.testing
gc.collect()
before = rss_kib()
after = trio.run(raw if kind == "raw" else conclave, n)
print((after - before) * 1024 / n)
"""


def measure(kind: str, n: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(repo=REPO), kind, str(n)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=sizes, default="10000,100000,1000000")
    parser.add_argument("--runs", type=positive, default=3)
    args = parser.parse_args()
    for n in args.agents:
        raw, ours = [], []
        for _ in range(args.runs):
            raw.append(measure("raw", n))
            ours.append(measure("conclave", n))
        r, c = statistics.median(raw), statistics.median(ours)
        # RSS grows in pages and arenas: a small N can show no growth at all.
        ratio = f"ratio {c / r:.2f}x" if r > 0 else "ratio n/a (no RSS growth measured at this size; try 10,000+)"
        print(
            f"N={n:>8}: raw trio {r / 1024:.2f} KiB/task, conclave {c / 1024:.2f} KiB/agent, "
            f"{ratio} (medians of {args.runs}, fresh process each)"
        )


if __name__ == "__main__":
    main()
