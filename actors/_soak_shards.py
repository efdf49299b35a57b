"""The soak over several processes: one shard of the runs per process.

Run index ``i`` goes to shard ``i % W`` (round robin, so every shard gets a
like mix of early and late runs and their sizes differ by at most one).
Each shard runs :func:`actors._soak.soak_shard` in its own process - its
own trio run on its own ``MockClock``, its own orchestrator, simulator,
breaker, gate and SQLite file - with ``ceil(concurrency / W)`` runs in
flight, so the total in flight stays about the same.  The parent merges
the shards' reports (:func:`actors._soak.merge_shards`).

Each shard has a one-process pool of its own, so a process that dies
breaks only its own future and the failure names its shard; a shard that
raises or dies fails the soak (its runs count as never finished), it is
never dropped in silence.

Start method: on Linux the workers are forked.  The parent has no trio run
active on this path (:func:`actors._soak.run_soak` is synchronous), the soak
starts no threads, and trio clears its thread cache in a forked child
(``os.register_at_fork``), so nothing half-held crosses the fork.  Measured
on the 2-core CI machine, 50 runs over 2 workers: fork starts the shards
~0.02 s after the parent begins, forkserver ~0.5 s, spawn ~0.6 s (both
re-import trio, attrs, httpx and apsw in each child).  Elsewhere (macOS:
fork is unsafe there) and from inside a trio run (:func:`actors._soak.soak`)
the workers are spawned.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack

import trio
import trio.testing

from ._gc import throughput_gc
from ._soak import ShardReport, SoakConfig, SoakReport, merge_shards, soak_shard

# Test hook, read only in the worker process: "K" makes shard K raise,
# "K:exit" makes its process die without a word.
CRASH_ENV = "_CONCLAVE_SOAK_TEST_CRASH_SHARD"

DEFAULT_START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


def _run_shard(config: SoakConfig, shard: int) -> ShardReport:
    """Worker process entry point."""
    crash = os.environ.get(CRASH_ENV, "")
    if crash.split(":")[0] == str(shard):
        if crash.endswith(":exit"):
            os._exit(3)
        raise RuntimeError(f"{CRASH_ENV} asked shard {shard} to fail")
    with throughput_gc():  # this process is the shard's alone
        return trio.run(soak_shard, config, shard, clock=trio.testing.MockClock(autojump_threshold=0))


class Stopper:
    """Stops a sharded soak from another thread: kills its worker processes,
    whose futures then fail, so :func:`run_sharded` returns at once.
    Thread-safe; stopping before the workers exist kills each as it starts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: list[ProcessPoolExecutor] = []
        self._stopped = False
        self.killed: list[multiprocessing.process.BaseProcess] = []
        self.started = threading.Event()  # every shard's worker is running

    def add(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            self._pools.append(pool)
            if self._stopped:
                self._kill(pool)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for pool in self._pools:
                self._kill(pool)

    def _kill(self, pool: ProcessPoolExecutor) -> None:
        # No public way to stop a running worker before Python 3.14's
        # kill_workers(); the pool's process table is the only handle.
        processes = getattr(pool, "_processes", None) or {}
        for process in list(processes.values()):
            process.kill()
            self.killed.append(process)


async def run_sharded_in_trio(config: SoakConfig, stopper: Stopper | None = None) -> SoakReport:
    """:func:`run_sharded` from inside a trio run: spawned workers, waited
    for in a thread.  Cancellation kills the workers and returns at once
    (the thread, left to finish, exits as soon as their futures fail)."""
    stopper = stopper if stopper is not None else Stopper()
    try:
        return await trio.to_thread.run_sync(run_sharded, config, "spawn", stopper, abandon_on_cancel=True)
    except BaseException:
        stopper.stop()
        raise


def run_sharded(config: SoakConfig, start_method: str | None = None, stopper: Stopper | None = None) -> SoakReport:
    """Run ``config`` in ``config.shards`` processes and merge the reports.
    Call it outside any trio run (or with ``start_method="spawn"``).
    ``stopper`` lets another thread stop it (see :class:`Stopper`)."""
    started = time.perf_counter()  # reporting only
    shards = config.shards
    context = multiprocessing.get_context(start_method or DEFAULT_START_METHOD)
    parts: list[ShardReport] = []
    failures: list[str] = []
    with ExitStack() as stack:
        futures: list[Future[ShardReport]] = []
        for shard in range(shards):
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=1, mp_context=context))
            futures.append(pool.submit(_run_shard, config, shard))
            if stopper is not None:
                stopper.add(pool)  # after submit: its worker process exists
        if stopper is not None:
            stopper.started.set()
        for shard, future in enumerate(futures):
            try:
                parts.append(future.result())
            except Exception as exc:
                runs = len(config.shard_indices(shard))
                failures.append(
                    f"shard {shard} of {shards} ({runs} run(s): index % {shards} == {shard}) "
                    f"failed: {type(exc).__name__}: {exc}"
                )
    return merge_shards(config, parts, failures, wall_seconds=time.perf_counter() - started)
