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

import contextlib
import ctypes
import functools
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from multiprocessing.connection import Connection, wait
from types import FrameType
from typing import Any, cast

import trio
import trio.testing

from ._gc import throughput_gc
from ._soak import (
    OnBreach,
    Progress,
    ShardReport,
    SoakConfig,
    SoakReport,
    guarded,
    merge_shards,
    shard_breach,
    soak_shard,
)

# Test hook, read only in the worker process: "K" makes shard K raise,
# "K:exit" makes its process die without a word.
CRASH_ENV = "_CONCLAVE_SOAK_TEST_CRASH_SHARD"

DEFAULT_START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


# Progress messages a shard sends: about this many over its whole soak...
_PROGRESS_STEPS = 200
# ...but at least one per this many runs.  A share of the runs alone grew
# with the soak: 2,500 runs per message in a 1,000,000-run soak over 2
# workers, so its progress stood still for the first tens of seconds, and
# Ctrl-C - which reports the last count told - said "0/1,000,000 runs"
# checked.  A message is a few bytes on the shard's own pipe, and a run
# takes milliseconds: ten runs a message costs nothing that shows.
_PROGRESS_MAX_STEP = 10

# In a worker process: the write end of its own progress pipe, if any.
_progress_out: Connection | None = None

# Held while the workers start (see _signals_held).
_STOPPING = (signal.SIGINT, signal.SIGTERM, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))


def _init_worker(
    out: Connection | None, parent: int | None, ready: ctypes.Array[ctypes.c_byte] | None = None, shard: int = 0
) -> None:
    global _progress_out
    if ready is not None:
        # The process started: it got past importing the main module.  A
        # lock-free flag: a worker killed while setting an Event could die
        # holding its lock, and the parent then waited on it for ever.
        ready[shard] = 1
    _progress_out = out
    # A forked worker inherits the parent's handlers: SIGTERM and SIGHUP
    # raised Terminated inside the shard's trio run, and a worker told to
    # stop went on, idle, for ever.  A signal the parent ignores (nohup)
    # stays ignored.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) not in (signal.SIG_IGN, signal.SIG_DFL):
            signal.signal(signum, signal.SIG_DFL)
    # Ctrl-C is the parent's to act on (it kills its workers): a worker
    # interrupted on its own printed a KeyboardInterrupt traceback from
    # the pool's queue.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent is not None:
        _die_with(parent)


def _die_with(parent: int) -> None:
    """End this worker when its parent dies.  A parent killed outright
    (SIGKILL, the OOM killer) cannot kill its workers, and they ran the
    whole soak to its end for nobody (two of a 100,000-run soak were still
    at it 12 minutes later)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            # PR_SET_PDEATHSIG: the kernel sends SIGKILL when the thread that
            # started this process ends (run_sharded's thread, which outlives
            # the shards).
            if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent:  # died before the request took
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass
    # Elsewhere: a daemon thread that notices the parent has gone.
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="soak parent watch", daemon=True).start()


def _run_shard(config: SoakConfig, shard: int) -> ShardReport:
    """Worker process entry point."""
    crash = os.environ.get(CRASH_ENV, "")
    if crash.split(":")[0] == str(shard):
        if crash.endswith(":exit"):
            os._exit(3)
        raise RuntimeError(f"{CRASH_ENV} asked shard {shard} to fail")
    progress: Progress | None = None
    on_breach: OnBreach | None = None
    out = _progress_out
    if out is not None:
        total = len(config.shard_indices(shard))
        step = max(1, min(total // _PROGRESS_STEPS, _PROGRESS_MAX_STEP))

        def send(runs: int, turns: int) -> None:
            if runs % step == 0 or runs == total:
                # A few bytes on a pipe of its own: atomic, and it never
                # fills (the parent reads as they come).
                out.send((runs, turns))

        def breach(text: str) -> None:
            out.send(shard_breach(config, shard, text))  # at most 50 per shard

        progress, on_breach = send, breach

    with throughput_gc():  # this process is the shard's alone
        return trio.run(
            functools.partial(soak_shard, config, shard, progress, on_breach=on_breach),
            clock=trio.testing.MockClock(autojump_threshold=0),
        )


def _relay(pipes: list[Connection], stop: Connection, progress: Progress | None, on_breach: OnBreach | None) -> None:
    """Parent thread: pass on each breach a shard finds, and sum the
    shards' latest (runs, turns) and report each change, until ``stop`` is
    readable; then what the shards sent before it is read and reported too."""
    latest: dict[Connection, tuple[int, int]] = {conn: (0, 0) for conn in pipes}
    report = guarded(progress) if progress is not None else None
    breach = guarded(on_breach) if on_breach is not None else None

    def read(conn: Connection) -> None:
        try:
            message = conn.recv()
        except EOFError:  # only once every write end is closed
            pipes.remove(conn)
            return
        if isinstance(message, str):
            if breach is not None:
                breach(message)
            return
        latest[conn] = message
        if report is not None:
            report(sum(r for r, _ in latest.values()), sum(t for _, t in latest.values()))

    while True:
        ready = wait([*pipes, stop])
        if stop in ready:
            for conn in list(pipes):
                while conn in pipes and conn.poll():
                    read(conn)
            return
        for each in ready:
            read(cast(Connection, each))


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


async def run_sharded_in_trio(
    config: SoakConfig,
    stopper: Stopper | None = None,
    progress: Progress | None = None,
    on_breach: OnBreach | None = None,
) -> SoakReport:
    """:func:`run_sharded` from inside a trio run: spawned workers, waited
    for in a thread.  Cancellation kills the workers and returns at once
    (the thread, left to finish, exits as soon as their futures fail)."""
    stopper = stopper if stopper is not None else Stopper()
    try:
        return await trio.to_thread.run_sync(
            run_sharded, config, "spawn", stopper, progress, on_breach, abandon_on_cancel=True
        )
    except BaseException:
        stopper.stop()
        raise


class _Held:
    """The stopping signals received while held (see :func:`_signals_held`)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def hold(self) -> None:
        with _blocked():
            for signum in _STOPPING:
                current = signal.getsignal(signum)
                # One the process ignores (nohup) stays ignored; one not set
                # from Python could not be given back.
                if current is not signal.SIG_IGN and current is not None:
                    self._previous[signum] = current
                    signal.signal(signum, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    def close(self) -> None:
        """Give every handler back, then raise what came meanwhile (the
        first signal whose handler raises ends it there).  Idempotent."""
        previous, self._previous = self._previous, {}
        with _blocked():
            # Blocked, a signal cannot land between two of these and leave
            # the rest of the app's handlers replaced for good.
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        received, self.received = self.received, []
        for signum in dict.fromkeys(received):
            if signum in previous:
                signal.raise_signal(signum)


@contextlib.contextmanager
def _blocked() -> Iterator[None]:
    # In the main thread, whose Python handlers these are.  (A signal the
    # OS hands another thread still runs its handler here, between two
    # statements: each step above leaves the handlers whole.)
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPPING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@contextlib.contextmanager
def _signals_held() -> Iterator[_Held]:
    """Hold SIGINT, SIGTERM and SIGHUP while the workers start, and raise
    them once every worker has started and is known to the stopper (or on
    the way out).  Raised inside a pool's start-up (its queue-management
    thread half started, a worker forked but not yet handed to the
    stopper), one was lost - the soak ran on to its end - or failed it
    with "cannot join thread before it is started", or left a worker that
    the exit then waited on for ever (--workers 40: most signals in the
    first seconds).  Python handlers run in the main thread whichever
    thread the signal reaches, so this holds them wherever it lands; off
    the main thread (the trio path) handlers cannot change, and the
    stopper covers the start-up instead."""
    held = _Held()
    try:
        if threading.current_thread() is threading.main_thread():
            held.hold()
        yield held
    finally:
        held.close()


def _why_not_started(method: str) -> str:
    # A worker that dies before its initializer runs has not run a line of
    # the soak.  Spawned (or forkserver) workers first import the main
    # module again: a script that starts the soak at its top level, with no
    # guard, starts it again in each worker, where multiprocessing refuses.
    if method == "fork":
        return " (its worker process died while starting)"
    return (
        f" (its worker process died while starting, likely while importing the main module: with the "
        f"{method!r} start method each worker imports it again, so a script that runs a soak with "
        "workers > 1 must start it under `if __name__ == \"__main__\":`, as multiprocessing requires)"
    )


def run_sharded(
    config: SoakConfig,
    start_method: str | None = None,
    stopper: Stopper | None = None,
    progress: Progress | None = None,
    on_breach: OnBreach | None = None,
) -> SoakReport:
    """Run ``config`` in ``config.shards`` processes and merge the reports.
    Call it outside any trio run (or with ``start_method="spawn"``).
    ``stopper`` lets another thread stop it (see :class:`Stopper`).
    ``progress`` gets the runs checked and their turns over all shards,
    and ``on_breach`` each breach a shard finds, from a thread of this
    process, as the shards report them."""
    started = time.perf_counter()  # reporting only
    shards = config.shards
    context = multiprocessing.get_context(start_method or DEFAULT_START_METHOD)
    parts: list[ShardReport] = []
    failures: list[str] = []
    stopper = stopper if stopper is not None else Stopper()
    # A forkserver's children are not ours: only the others can watch us.
    parent = None if context.get_start_method() == "forkserver" else os.getpid()
    with ExitStack() as stack:
        try:
            futures: list[Future[ShardReport]] = []
            pipes: list[Connection] = []
            held = stack.enter_context(_signals_held())
            ready = context.RawArray("b", shards)  # see _init_worker
            for shard in range(shards):
                out: Connection | None = None
                if progress is not None or on_breach is not None:
                    # A pipe per shard: no lock shared between worker processes
                    # that a killed worker could die holding.
                    into, out = context.Pipe(duplex=False)
                    stack.callback(into.close)
                    stack.callback(out.close)
                    pipes.append(into)
                pool = stack.enter_context(
                    ProcessPoolExecutor(
                        max_workers=1, mp_context=context, initializer=_init_worker, initargs=(out, parent, ready, shard)
                    )
                )
                futures.append(pool.submit(_run_shard, config, shard))
                stopper.add(pool)  # after submit: its worker process exists
            stopper.started.set()
            if pipes:
                # Started once every worker exists: nothing is forked while it runs.
                stop_out, stop_in = context.Pipe(duplex=False)
                relay = threading.Thread(
                    target=_relay, args=(pipes, stop_out, progress, on_breach), name="soak progress", daemon=True
                )
                relay.start()

                def stop_relay() -> None:
                    stop_in.send(None)
                    relay.join()
                    stop_out.close()
                    stop_in.close()

                # Runs before the pools shut down and the pipes close (LIFO):
                # every shard's last report is read first, as it was sent
                # before its result.
                stack.callback(stop_relay)
            # Every worker started: a signal held meanwhile is raised here,
            # and stops them all (below).
            held.close()
            for shard, future in enumerate(futures):
                try:
                    parts.append(future.result())
                except Exception as exc:
                    runs = len(config.shard_indices(shard))
                    why = ""
                    if isinstance(exc, BrokenProcessPool) and not ready[shard]:
                        why = _why_not_started(context.get_start_method())
                    failures.append(
                        f"shard {shard} of {shards} ({runs} run(s): index % {shards} == {shard}) "
                        f"failed: {type(exc).__name__}: {exc}{why}"
                    )
        except BaseException:
            # Interrupted (Ctrl-C, or a signal to this process alone): kill
            # the workers, or the pools' shutdown would wait for them to run
            # the whole soak to its end.
            stopper.stop()
            raise
    return merge_shards(config, parts, failures, wall_seconds=time.perf_counter() - started)
