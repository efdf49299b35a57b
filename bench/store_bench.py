"""Store benchmark: group commit through the store writer vs raw apsw.

In the same process and on the same kind of file (WAL, same pragmas), it
inserts the same agent-output rows twice:

* **writer**: ``producers`` trio tasks each send ``PersistOutput`` messages
  to a real :class:`actors.StoreWriter` and wait for every write's ack - an
  ack means committed - before sending the next (as agents do);
* **raw**: one ``executemany`` of the same rows in one transaction, with
  apsw directly (the baseline: no messages, no acks, one commit).  Both
  start from the same ``AgentOutput`` objects and stop when every row is
  committed.

Runs alternate (writer, raw, raw, writer, ...) to spread noise, and the
medians are compared.  Each timed run starts from a collected heap
(``gc.collect()`` before it, on both sides): otherwise a full collection of
garbage left by building the rows and by earlier runs lands inside whichever
run crosses the collector's threshold - always the writer, which allocates
per message - and the ratio measures the previous run.  Target: writer >=
0.5x raw.

    python bench/store_bench.py [--rows 20000] [--repeats 5] [--producers 1024] [--window 1]
                                 [--max-batch 4096] [--durability full|normal] [--content-bytes 300]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import StoreWriter  # noqa: E402
from bench._common import positive  # noqa: E402
from messages import (  # noqa: E402
    AgentKey,
    AgentOutput,
    PersistOutput,
    PersistRun,
    TokenUsage,
    open_channel,
    reply_pair,
    request,
)
from store import Durability, Store  # noqa: E402
from store._store import _INSERT_OUTPUT, output_params  # noqa: E402

RUN, BRANCH = "bench", "bench-branch"


def make_outputs(rows: int, content_bytes: int = 300) -> list[AgentOutput]:
    unit = '{"stage": "plan", "agent": "x", "work_breakdown": ["a", "b", "c"]}'
    content = (unit * (content_bytes // len(unit) + 1))[:content_bytes]
    return [
        AgentOutput(
            key=AgentKey(run_id=RUN, branch_id=BRANCH, stage="plan", agent=f"agent-{i}"),
            attempt=1,
            status="accepted",
            content=content,
            format="json",
            usage=TokenUsage.of(input_tokens=1000 + i % 97, cached_input_tokens=200, output_tokens=300),
            model="gpt-5",
            provider="sim",
            started_at=0.0,
            finished_at=1.5,
        )
        for i in range(rows)
    ]


def fresh_store(directory: Path, name: str, durability: Durability = "full") -> Store:
    store = Store.open(str(directory / name), durability=durability)
    [ack] = store.apply([PersistRun(run_id=RUN, branch_id=BRANCH, spec_id="B", goal="", seed=0, pipeline="{}")])
    assert ack.ok
    return store


async def _through_writer(
    store: Store, outputs: list[AgentOutput], producers: int, window: int, max_batch: int
) -> float:
    writer = StoreWriter(store, max_batch=max_batch)
    send, receive = open_channel(4096, name="store")
    todo = iter(outputs)
    failures = 0

    async def producer() -> None:
        # Up to ``window`` writes in flight, each acked only after commit
        # (window 1: send one, wait for its ack, as an agent does).
        nonlocal failures
        while True:
            pendings = []
            if window == 1:  # as an agent persists its answer: send, wait for the ack
                output = next(todo, None)
                if output is None:
                    return
                reply, pending = reply_pair("bench")
                if not (await request(send, PersistOutput(output=output, reply_to=reply), pending)).ok:
                    failures += 1
                continue
            for output in itertools.islice(todo, window):  # shared: each row written once
                reply, pending = reply_pair("bench")
                await send.send(PersistOutput(output=output, reply_to=reply))
                pendings.append(pending)
            if not pendings:
                return
            for pending in pendings:
                if not (await pending.receive()).ok:
                    failures += 1

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, receive)
        async with trio.open_nursery() as workers:
            for _ in range(producers):
                workers.start_soon(producer)
        elapsed = time.perf_counter() - started
        send.close()
    if failures:
        raise SystemExit(f"{failures} writes failed")
    return elapsed


def through_writer(
    directory: Path,
    name: str,
    outputs: list[AgentOutput],
    producers: int,
    window: int = 1,
    max_batch: int = 4096,
    durability: Durability = "full",
) -> float:
    store = fresh_store(directory, name, durability)
    try:
        return trio.run(_through_writer, store, outputs, producers, window, max_batch)
    finally:
        _check(store, len(outputs))
        store.close()


def raw_apsw(directory: Path, name: str, outputs: list[AgentOutput], durability: Durability = "full") -> float:
    store = fresh_store(directory, name, durability)
    try:
        conn = store._conn
        now = 1_700_000_000_000
        started = time.perf_counter()
        # Both sides start from the same AgentOutput objects and end with
        # the rows committed, so turning them into rows is timed here too.
        rows = [output_params(o, now) for o in outputs]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_INSERT_OUTPUT, rows)
        conn.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        _check(store, len(outputs))
        store.close()


def _check(store: Store, rows: int) -> None:
    count = store._conn.execute("SELECT count(*) FROM agent_outputs").fetchone()[0]
    if count != rows:
        raise SystemExit(f"expected {rows} rows, found {count}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=positive, default=20000)
    parser.add_argument("--repeats", type=positive, default=5)
    parser.add_argument("--producers", type=positive, default=1024, help="concurrent writer tasks")
    parser.add_argument("--window", type=positive, default=1, help="writes in flight per producer (1: send, await ack, repeat)")
    parser.add_argument("--content-bytes", type=positive, default=300, help="size of each output's content")
    parser.add_argument("--max-batch", type=positive, default=4096, help="the writer's largest group commit")
    parser.add_argument(
        "--durability",
        choices=("full", "normal"),
        default="full",
        help="synchronous=FULL (fsync every commit; the orchestrator's default) or NORMAL, for both sides",
    )
    args = parser.parse_args(argv)
    outputs = make_outputs(args.rows, args.content_bytes)
    writer_times: list[float] = []
    raw_times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="conclave-bench-") as tmp:
        directory = Path(tmp)
        for r in range(args.repeats):
            order = ("writer", "raw") if r % 2 == 0 else ("raw", "writer")
            for kind in order:
                name = f"{kind}-{r}.db"
                gc.collect()
                if kind == "writer":
                    writer_times.append(through_writer(
                            directory, name, outputs, args.producers, args.window, args.max_batch, args.durability
                        ))
                else:
                    raw_times.append(raw_apsw(directory, name, outputs, args.durability))
    writer_rate = args.rows / statistics.median(writer_times)
    raw_rate = args.rows / statistics.median(raw_times)
    ratio = writer_rate / raw_rate
    print(
        f"rows per run:         {args.rows} ({args.repeats} alternating runs each, medians;"
        f" synchronous={args.durability.upper()} on both sides)"
    )
    print(f"store writer (acked): {writer_rate:12,.0f} rows/s  ({args.producers} producers x {args.window} in flight, ack after commit)")
    print(f"raw apsw executemany: {raw_rate:12,.0f} rows/s  (one transaction)")
    print(f"content per row:      {args.content_bytes} bytes")
    print(f"ratio writer/raw:     {ratio:12.2f}x  (target >= 0.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
