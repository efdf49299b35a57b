"""The ``conclave`` command line.

Exit codes: 0 completed, 3 halted, 2 bad input or usage, 130 interrupted
(143 for SIGTERM, 129 for SIGHUP), 1 anything else.  ``--json`` prints exactly one JSON
object on stdout at the end; human output goes to stdout, errors to stderr
as one line ``conclave: error: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, TextIO, TypeVar

import trio
import trio.testing

from messages import (
    ZERO_USAGE,
    AgentFinished,
    AgentRetrying,
    CallWaiting,
    AuthError,
    BudgetAlert,
    FaultPlan,
    FaultPlanError,
    ProgressEvent,
    RunStarted,
    StageDecided,
    StageStarted,
    TokenUsage,
)
from store import BranchRow, EmptyDatabase, LockFileError, RunLocked, RunRow, Store, StoreError, preview_run

from ._gc import throughput_gc
from ._budget import usd, usd_of
from ._checks import DEFAULT_DB, add_db_argument, file_arg, nonempty_arg, positive_arg, seed_arg
from ._cli_auth import add_auth_commands, add_run_auth_option, login_auth
from ._token_source import AuthService
from ._cli_metrics import (
    MetricsUsageError,
    add_metrics_command,
    add_run_metrics_args,
    PRICES_OPTION,
    load_kept_prices,
    metrics_display,
)
from ._cli_providers import (
    add_provider_arguments,
    add_serve_mock_command,
    pipeline_from_args,
    provider_configs_from_args,
)
from ._footer import LiveFooter, Writer, show_metrics
from ._format import duration, shown, tokens, usage_line, verdict_line
from ._ids import id_problem, new_run_id, shell_word, short_branch_id
from ._pipeline import Pipeline, PipelineError, default_pipeline, load_pipeline
from ._provider_factory import ProviderConfig, ProviderConfigError
from ._runtime import ConfigError, Limits, Orchestrator, RunResult, fault_scope_problem, open_orchestrator

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_HALTED = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process it ended
# How a stop by each signal is reported: what happened, and the exit code a
# shell gives a process the signal ended (128 + its number).
_STOPPED_BY: dict[int, tuple[str, int]] = {
    signal.SIGINT: ("interrupted", EXIT_INTERRUPTED),
    signal.SIGTERM: ("terminated", EXIT_TERMINATED),
    signal.SIGHUP: ("hung up", 128 + signal.SIGHUP),
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a supervisor stopping us) or SIGHUP (the terminal
    closed), handled as Ctrl-C is: the work is cancelled cleanly, then the
    process exits 128 + the signal's number (143, 129)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum


class UsageError(Exception):
    """Bad input: reported as one line, exit 2."""


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    try:
        print(f"conclave: error: {message}", file=sys.stderr)
    except OSError:
        pass  # stderr gone (its terminal hung up): the exit code still says it
    return code


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _is_interrupt(exc: BaseException) -> bool:
    return any(isinstance(leaf, KeyboardInterrupt) for leaf in _leaves(exc))


def stopped_by(exc: BaseException) -> tuple[str, int] | None:
    """(what happened, exit code) if ``exc`` is a stop by a signal: Ctrl-C
    (KeyboardInterrupt) or :class:`Terminated`; None otherwise."""
    leaves = _leaves(exc)
    for leaf in leaves:
        if isinstance(leaf, Terminated):
            return _STOPPED_BY.get(leaf.signum, ("terminated", 128 + leaf.signum))
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        return _STOPPED_BY[signal.SIGINT]
    return None


# What a command says when stdout's reader went away ('conclave run | head').
PIPE_CLOSED = "the output pipe closed (its reader went away)"


def _is_broken_pipe(exc: BaseException) -> bool:
    """Whether ``exc`` is stdout's reader going away ('conclave run | head'),
    alone or in a group (from inside a run it comes wrapped in one)."""
    return all(isinstance(leaf, BrokenPipeError) for leaf in _leaves(exc))


def _interrupted(exc: BaseException, store: Store, run_id: str | None, db: str) -> int:
    """Report a run, resume or rerun stopped by a signal, or by its output
    pipe closing; its exit code.

    Names the command that continues the run when the run was stored
    before the stop (a user stopping a long run wants to know how to go
    on; the run id scrolled away with the progress)."""
    pipe = _is_broken_pipe(exc)
    if pipe:
        # 'conclave run | head -3': the reader stopped reading, and the
        # run with it.  It was left interrupted without a word (exit 1),
        # so nothing told the user the run had not finished, nor how to
        # finish it.  stdout is dropped so nothing more is written there;
        # the message goes to stderr, which still reaches the terminal.
        _drop_stdout()
        word, code = PIPE_CLOSED, EXIT_ERROR
    else:
        word, code = stopped_by(exc) or _STOPPED_BY[signal.SIGINT]
    message = f"{word}; the store is consistent"
    run = store.get_run(run_id) if run_id is not None else None
    if run is not None and run.status in ("completed", "halted"):
        # The signal came after the run had recorded its end, before its
        # summary was printed: "continues it" offered to go on with a
        # finished run.
        shown = with_db(f"'conclave status {shell_word(run.run_id)}'", db)
        message += f"; the run had already {run.status} ({shown} shows it)"
    elif run is not None:
        if pipe:
            message = f"{word}, so the run stopped before it finished; the store is consistent"
        message += "; " + with_db(f"'conclave resume {shell_word(run.run_id)}'", db) + " continues it"
    return _fail(message, code)


def _json_out(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def _id_arg(what: str, *, spaces: bool) -> Callable[[str], str]:
    """argparse type: an id as :func:`id_problem` allows it."""

    def check(text: str) -> str:
        problem = id_problem(text, what, spaces=spaces)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return text

    return check


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0 or math.isnan(value) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


# -- run -------------------------------------------------------------------


class ProgressPrinter:
    """Prints the run's progress as it happens (human output only)."""

    def __init__(self, out: Writer | TextIO, total_stages: int) -> None:
        self.out = out
        self.total = total_stages
        self.index = 0

    def __call__(self, event: ProgressEvent) -> None:
        w = self.out.write
        if isinstance(event, RunStarted):
            w(
                f"Run {event.run_id} (branch {short_branch_id(event.branch_id)}) "
                f"of {event.spec_id}: {' -> '.join(event.stages)}\n"
            )
        elif isinstance(event, StageStarted):
            self.index += 1
            w(
                f"\nSTAGE {self.index}/{self.total}: {event.key.stage.upper()} ({event.mode})\n"
                f"  agents: {', '.join(event.agents)}\n"
            )
        elif isinstance(event, AgentFinished):
            if event.ok:
                note = " (reused)" if event.replayed else ""
                w(f"    {event.key.agent}: answered after {event.attempts} attempt(s){note}\n")
            else:
                w(f"    {event.key.agent}: FAILED after {event.attempts} attempt(s): {shown(event.error)}\n")
        elif isinstance(event, AgentRetrying):
            w(
                f"    {event.key.agent}: attempt {event.attempt} failed ({shown(event.error)}); "
                f"retrying in {duration(event.delay)}\n"
            )
        elif isinstance(event, CallWaiting):
            w(
                f"    {event.key.agent}: attempt {event.attempt} waits {duration(event.delay)} "
                f"for {event.provider}'s rate-limit reset\n"
            )
        elif isinstance(event, StageDecided):
            d = event.decision
            w(verdict_line(d.key.stage, d.seq, d.status, d.verdict) + "\n")
        elif isinstance(event, BudgetAlert):
            spent = usd_of(event.spent_usd, event.budget_usd)
            if event.threshold >= 100:
                w(f"  ✗ budget EXCEEDED: {spent}; no further agent calls will be dispatched\n")
            else:
                w(f"  ⚠ budget warning: {event.threshold}% used ({spent})\n")
        self.out.flush()


# A hint's words may be double-quoted (see shell_word), and a run id "it's"
# holds the quote that ends the hint: "conclave resume "it --db q.db's"".
_HINT = re.compile(r"""'(conclave (?:[^'"]|"(?:[^"\\]|\\.)*")*)'""")


def db_option(db: str) -> str:
    """`` --db DB`` for a suggested command, or "" for the default file."""
    if os.path.abspath(db) == os.path.abspath(DEFAULT_DB):
        return ""
    return f" --db {shell_word(db)}"


def with_db(text: str, db: str) -> str:
    """``text`` with ``--db DB`` added to each quoted ``'conclave ...'``
    command it suggests: a hint copied as printed must find the run (it
    said "no run 'h1' in conclave.db" for a run kept elsewhere)."""
    option = db_option(db)
    return _HINT.sub(lambda m: f"'{m.group(1)}{option}'", text) if option else text


def _summary(result: RunResult, db: str, virtual: bool, elapsed: float) -> str:
    decided = len(result.stages)
    clock = "simulated" if virtual else "wall"
    lines = [""]
    if result.completed:
        lines.append(f"Run {result.run_id} completed: {decided} stage(s) decided.")
    else:
        lines.append(f"Run {result.run_id} HALTED: {with_db(shown(result.halt_message or ''), db)}")
    lines.append(f"  usage: {usage_line(result.usage, result.unknown_usage_calls)}; {result.turns} turn(s)")
    cost = f"  cost: {usd(result.cost_usd, 4)}"
    if result.budget_usd is not None:
        cost = f"  cost: {usd_of(result.cost_usd, result.budget_usd, 4, joint=' of a ')} budget"
    if result.unpriced_calls:
        cost += f" (+{result.unpriced_calls} call(s) to unpriced models)"
    if result.unknown_usage_calls:
        # Their cost is unknown, so a budget could not count them: "$0.00
        # of a $0.01 budget" alone read as if the budget held.
        counted = "counted in neither cost nor budget" if result.budget_usd is not None else "not costed"
        cost += f" (+{result.unknown_usage_calls} call(s) of unknown usage, {counted})"
    lines.append(cost + f" | details: conclave metrics {shell_word(result.run_id)}{db_option(db)}")
    lines.append(f"  {clock} time: {elapsed:.1f}s | digest: {result.digest[:16]}… | db: {db}")
    return "\n".join(lines)


def fault_plan(args: argparse.Namespace) -> FaultPlan:
    """The fault plan of ``--faults``/``--fault-seed`` over the CODEX_FAULTS*
    environment; a malformed value raises :class:`UsageError` (exit 2)."""
    try:
        return FaultPlan.from_env(os.environ, faults=args.faults, seed=args.fault_seed)
    except FaultPlanError as exc:
        raise UsageError(str(exc)) from None


def check_fault_scope(plan: FaultPlan, providers: Iterable[str]) -> None:
    """The orchestrator's check, made here before the store is opened, as
    every usage error is."""
    problem = fault_scope_problem(plan, providers, "this run")
    if problem is not None:
        raise UsageError(problem)


def fault_banner(plan: FaultPlan, seed: int, whence: str = "from --seed") -> None:
    """Say on stderr that faults are active (stdout stays clean for --json)."""
    if plan.enabled:
        note = "" if plan.seed is not None else f"; fault seed {seed} ({whence})"
        print(f"conclave: {plan.describe()}{note}", file=sys.stderr)


def add_fault_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--faults",
        metavar="SPEC",
        help="inject provider faults, e.g. 'disconnect:3,429:1,timeout:2' or 'disconnect:5%%' "
        "(overrides CODEX_FAULTS; see also CODEX_FAULTS_429_RESET, CODEX_FAULTS_TIMEOUT_MS)",
    )
    p.add_argument(
        "--fault-seed", type=seed_arg, metavar="N",
        help="seed of fault placement (default: CODEX_FAULTS_SEED; else, for resume and rerun, "
        "the run's own fault seed if it had one; else the run's --seed)",
    )


async def interruptible(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``fn(*args)``, turning Ctrl-C, SIGTERM and SIGHUP into a clean
    cancellation.

    trio's default raises KeyboardInterrupt wherever the signal lands - even
    inside the store writer between two statements - and SIGTERM would end
    the process with the run still marked running.  Instead, either signal
    cancels the work like any other cancellation (runs are marked
    interrupted, the store stays consistent) and *then* KeyboardInterrupt
    (SIGINT) or :class:`Terminated` (SIGTERM, SIGHUP) is raised here.
    SIGHUP by default ended the process at once: closing the terminal of a
    long run left it marked running, its queued writes lost.

    Signals reach only the main thread: from another (``main()`` called by
    an embedding app's thread) ``fn`` just runs.
    """
    if threading.current_thread() is not threading.main_thread():
        return await fn(*args)
    # A signal the process was started ignoring stays ignored: a shell
    # starts background jobs with SIGINT ignored (so the terminal's Ctrl-C
    # spares them, as with nohup for SIGHUP), and listening re-enabled it.
    watched = [s for s in _STOPPED_BY if signal.getsignal(s) is not signal.SIG_IGN]
    if not watched:
        return await fn(*args)
    received: int | None = None
    failure: BaseException | None = None
    with trio.open_signal_receiver(*watched) as signals:
        try:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    nonlocal received
                    async for signum in signals:
                        received = signum
                        _stop.under_way = True
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch)
                result = await fn(*args)
                nursery.cancel_scope.cancel()
        except BaseException as exc:
            # Work that failed while the signal was cancelling it failed
            # *because* of the signal: the user asked to stop, and that is
            # what they are told (a stray ActorStopped exited 1 instead).
            if received is None:
                raise
            failure = exc
    if received is not None and received != signal.SIGINT:
        raise Terminated(received) from failure
    if received is not None:
        raise KeyboardInterrupt from failure
    return result


def run_stoppable(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``trio.run(interruptible, fn, *args)`` for a command that reads its
    failures by type: one of ``fn``'s own is raised as itself, not in the
    group of the nursery that :func:`interruptible` runs it in."""
    try:
        return trio.run(interruptible, fn, *args)
    except BaseExceptionGroup as group:
        [leaf, *more] = group.exceptions
        if more or isinstance(leaf, BaseExceptionGroup):
            raise
        raise leaf from leaf.__cause__


def drain_progress(events: trio.MemoryReceiveChannel[ProgressEvent], printer: Callable[[ProgressEvent], None]) -> None:
    """Print what the run published but :func:`print_progress` had not
    reached when it was cancelled: a resume replaying a finished run
    published its six stages at once, and four or five were shown."""
    while True:
        try:
            printer(events.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return


async def print_progress(
    events: trio.MemoryReceiveChannel[ProgressEvent], printer: Callable[[ProgressEvent], None]
) -> None:
    """Feed ``printer`` every progress event until cancelled."""
    async for event in events:
        printer(event)


async def _run_pipeline(
    args: argparse.Namespace,
    store: Store,
    pipeline: Pipeline,
    virtual: bool,
    configs: dict[str, ProviderConfig],
    plan: FaultPlan | None = None,
    auth: AuthService | None = None,
) -> tuple[RunResult, float, dict[str, Any] | None]:
    """Run the pipeline; returns the result, the time it took (trio's
    clock) and, with faults active, what was injected (for ``--json``)."""
    providers = {name: config.build() for name, config in configs.items()}
    limits = Limits() if args.max_concurrency is None else Limits(max_concurrency=args.max_concurrency)
    display = None if args.json else metrics_display(sys.stdout)
    out = display if isinstance(display, LiveFooter) else sys.stdout
    printer = None if args.json else ProgressPrinter(out, len(pipeline.stages))
    started = trio.current_time()
    options = _history.run_options(args, plan) | _history.base_url_options(configs) | _history.fault_options(plan)
    if args.price_kept is not None:
        options[PRICES_OPTION] = args.price_kept
    async with open_orchestrator(
        store=store,
        provider=providers,
        pipeline=pipeline,
        seed=args.seed,
        limits=limits,
        prices=args.price_table,
        faults=plan,
        auth=auth,
        retry=_history.retry_of(options),
    ) as orch:
        progress = orch.subscribe() if printer is not None else None
        async with trio.open_nursery() as nursery:
            if display is not None:
                nursery.start_soon(show_metrics, orch.subscribe_metrics(), display)
            if progress is not None and printer is not None:
                nursery.start_soon(print_progress, progress, printer)
            try:
                result = await orch.run(
                    args.spec_id,
                    goal=args.goal,
                    run_id=args.run_id,
                    budget=args.budget,
                    options=options,
                )
            finally:
                nursery.cancel_scope.cancel()
                if isinstance(display, LiveFooter):
                    display.clear()
        if progress is not None and printer is not None:
            drain_progress(progress, printer)
        faults = fault_summary(orch, store, result, show=printer is not None)
    return result, trio.current_time() - started, faults


def fault_summary(orch: Orchestrator, store: Store, result: RunResult, *, show: bool) -> dict[str, Any] | None:
    """What the orchestrator's fault interceptor injected (None without
    one), for ``--json``; ``show``: also print it in a line.  A resume
    injects only what the run had still to get, so ``injected_in_run``
    counts the branch's faults from its event log (each call identity
    once: a fault whose attempt a crash lost fired again on resume)."""
    if orch.faults is None:
        return None
    left = orch.faults.remaining(result.run_id, result.branch_id)
    # Kinds with a budget: "429:0" has none, and listed a 0 left of it.
    counted = {kind for kind, count in orch.faults.plan.counts.items() if count}
    logged = {
        (e.stage, e.agent, e.attempt): str(e.detail.get("fault"))
        for e in store.events(result.run_id, "fault")
        if e.branch_id == result.branch_id
    }
    diagnostics = orch.faults.diagnostics()
    in_run = {k: sum(1 for kind in logged.values() if kind == k) for k in diagnostics["injected"]}
    faults = {
        **diagnostics,
        "injected_in_run": in_run,
        "left_in_run": {k: n for k, n in left.items() if k in counted},
    }
    if show:
        injected = ", ".join(f"{k} {n}" for k, n in faults["injected"].items())
        notes = []
        if in_run != faults["injected"]:
            notes.append("in the whole run: " + ", ".join(f"{k} {n}" for k, n in in_run.items()))
        budget = ", ".join(f"{k} {n}" for k, n in faults["left_in_run"].items())
        if budget:
            notes.append(f"left in this run's budget: {budget}")
        print(f"\nFaults injected: {injected}" + (f" ({'; '.join(notes)})" if notes else ""))
    return faults


def warn_unpriced_budget(args: argparse.Namespace, pipeline: Pipeline) -> None:
    """A budget counts priced calls only: say so up front for the models
    the price table does not know, rather than let the run go past its
    budget with no word until the cost line ("+N calls to unpriced")."""
    if getattr(args, "budget", None) is None:
        return
    unpriced = sorted(
        {spec.model for spec in pipeline.agents.values() if args.price_table.lookup(spec.model, spec.provider) is None}
    )
    if unpriced:
        print(
            f"conclave: warning: --budget counts priced calls only, and there is no price for "
            f"{', '.join(unpriced)}: give one with --prices FILE",
            file=sys.stderr,
        )


SIM_OPTIONS = {"--disagreement-rate": "disagreement_rate", "--sim-latency": "sim_latency"}


def given_sim_options(args: argparse.Namespace) -> list[str]:
    """The simulator's options given on the command line (their parsers
    default to None)."""
    return [option for option, dest in SIM_OPTIONS.items() if getattr(args, dest, None) is not None]


def sim_only_problem(given: Sequence[str], providers: Iterable[str], whose: str) -> str | None:
    """Why the simulator's options ``given`` cannot be used: no agent of the
    run uses the simulator (``providers``), so they were ignored without a
    word, as if they had shaped the run (``--base-url`` and friends on a
    simulator-only run are refused the same way).  None when none is given
    or an agent is simulated."""
    names = sorted(providers)
    if not given or "sim" in names:
        return None
    return (
        f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to the simulator; "
        f"{whose} {', '.join(names)}, not the simulator"
    )


def cmd_run(args: argparse.Namespace) -> int:
    sim_given = given_sim_options(args)
    # The simulator's settings are kept with the run, given or not (as they always were).
    for name, value in _history.DEFAULT_OPTIONS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        pipeline = (
            load_pipeline(args.pipeline, one_provider=args.provider is not None)
            if args.pipeline
            else default_pipeline()
        )
    except PipelineError as exc:
        return _fail(str(exc))
    plan = fault_plan(args)
    # Every provider is validated before the store opens or any agent starts.
    try:
        pipeline = pipeline_from_args(args, pipeline)
        auth = login_auth(args, {spec.provider for spec in pipeline.agents.values()})
        configs = provider_configs_from_args(
            args, pipeline, token_sources=auth.sources if auth is not None else None
        )
    except (ProviderConfigError, PipelineError, AuthError) as exc:
        return _fail(str(exc))
    problem = sim_only_problem(sim_given, configs, "this run's agents use")
    if problem is not None:
        return _fail(problem)
    check_fault_scope(plan, configs)
    remote = sorted(name for name, config in configs.items() if config.remote)
    if args.clock is None:
        args.clock = "real" if remote else "virtual"
    elif args.clock == "virtual" and remote:
        return _fail(
            f"--clock virtual works only with the simulator, not {', '.join(remote)} "
            "(real sockets on a virtual clock time out falsely); use --clock real"
        )
    try:
        args.price_table, args.price_kept = load_kept_prices(args.prices)
    except MetricsUsageError as exc:
        return _fail(str(exc))
    warn_unpriced_budget(args, pipeline)
    if args.run_id is not None and _run_exists(args.db, args.run_id):
        # Looked up without writing: opening for writing migrates an older
        # file (and switches it to WAL), and the refusal came after that.
        return _fail(f"run id {args.run_id!r} already exists in {args.db}")
    try:
        store = Store.open(args.db)
    except StoreError as exc:
        return _fail(str(exc))
    with store:
        if args.run_id is not None and store.get_run(args.run_id) is not None:
            # Made by another process since the look above.
            return _fail(f"run id {args.run_id!r} already exists in {args.db}")
        _history.install_test_kill_hook(store, os.environ)
        # Chosen here, not by the orchestrator, so that an interrupted run
        # can be named in the message that says how to continue it.
        args.run_id = args.run_id or new_run_id(args.spec_id)
        virtual = args.clock == "virtual"
        clock = trio.testing.MockClock(autojump_threshold=0) if virtual else None
        try:
            fault_banner(plan, args.seed)
            result, elapsed, faults = trio.run(
                interruptible, _run_pipeline, args, store, pipeline, virtual, configs, plan, auth, clock=clock
            )
        except (ConfigError, RunLocked, LockFileError) as exc:
            return _fail(str(exc))
        except BaseException as exc:
            if _is_interrupt(exc) or _is_broken_pipe(exc):
                return _interrupted(exc, store, args.run_id, args.db)
            if isinstance(exc, BaseExceptionGroup):
                # Raised inside interruptible()'s nursery: still bad input.
                bad, _ = exc.split((ConfigError, RunLocked, LockFileError))
                if bad is not None:
                    return _fail(str(_leaves(bad)[0]))
            raise
    return report_result(args, result, virtual, elapsed, faults)


def _run_exists(db: str, run_id: str) -> bool:
    """Whether ``db`` already holds ``run_id``, read without writing
    anything (no migration, no pragma).  A file that cannot be read so -
    none yet, empty, damaged - is left to :meth:`Store.open` to judge."""
    if not os.path.exists(db):
        return False
    try:
        preview_run(db, run_id, for_writing=False)
    except StoreError:  # UnknownRun among them
        return False
    return True


def report_result(
    args: argparse.Namespace, result: RunResult, virtual: bool, elapsed: float, faults: dict[str, Any] | None = None
) -> int:
    """Print a finished run (``--json`` object or summary; ``faults``: what
    was injected, a ``faults`` member of the object); its exit code."""
    if args.json:
        data = result.to_json() | ({"faults": faults} if faults is not None else {})
        if data.get("halt_message"):
            data["halt_message"] = with_db(data["halt_message"], args.db)  # as the summary says it
        _json_out(data)
    else:
        print(_summary(result, args.db, virtual, elapsed))
    return EXIT_OK if result.completed else EXIT_HALTED


# -- status / decisions ------------------------------------------------------


def _open_readonly(path: str) -> Store:
    return Store.open(path, readonly=True)


def open_run(db: str, run_id: str) -> tuple[Store, RunRow]:
    """Open ``db`` read-only and find ``run_id``; the caller closes the
    store.  Raises :class:`UsageError` (one line, exit 2) naming the file or
    the run that is missing."""
    try:
        store = _open_readonly(db)
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    run = store.get_run(run_id)
    if run is None:
        store.close()
        raise UsageError(f"no run {run_id!r} in {db}")
    return store, run


def cmd_status(args: argparse.Namespace) -> int:
    if args.run_id is None and args.branch is not None:
        # It listed the runs and ignored the branch asked for.
        return _fail(f"--branch {args.branch} needs a RUN_ID (the run whose branch to show)")
    if args.run_id is not None and args.limit is not None:
        return _fail(f"--limit {args.limit} lists the latest runs; it does not go with a RUN_ID")
    try:
        store = _open_readonly(args.db)
    except EmptyDatabase as exc:
        if args.run_id is not None:
            return _fail(str(exc))
        # A file with nothing in it yet (say, made by 'touch') lists no
        # runs, as a database Conclave created but never ran in does.
        if args.json:
            _json_out({"runs": []})
        else:
            print(f"no runs in {args.db}")
        return EXIT_OK
    except StoreError as exc:
        return _fail(str(exc))
    with store:
        if args.run_id is None:
            runs = store.list_runs(20 if args.limit is None else args.limit)
            if args.json:
                _json_out({"runs": [_run_json(store, r.run_id) for r in runs]})
            elif not runs:
                print(f"no runs in {args.db}")
            else:
                for listed in runs:
                    r, driven = store.run_state(listed.run_id)
                    if r is None:
                        continue  # deleted since it was listed
                    stages = len(store.lineage_decisions(r.run_id, r.current_branch_id or ""))
                    state = _shown_status(r.status, driven)
                    used = _usage(store, r)
                    print(
                        f"{r.run_id}  {state:<11} {r.spec_id}  {stages}/{len(r.pipeline['stages'])} "
                        f"stages  {tokens(used.input_tokens)} in / {tokens(used.output_tokens)} out"
                    )
            return EXIT_OK
        # Read once, after the claim (see Store.run_state): the halt reason,
        # hint and usage came from rows read before a run's end was.
        run, driven = store.run_state(args.run_id)
        if run is None:
            return _fail(f"no run {args.run_id!r} in {args.db}")
        branch = _history.branch_of(store, run, args.branch)
        info = _run_json(store, run.run_id, branch.branch_id, state=(run, driven))
        if args.json:
            _json_out(info)
            return EXIT_OK
        status = _shown_status(info["status"], info["driven"])
        reason = f" ({with_db(shown(branch.halt_reason), args.db)})" if branch.halt_reason else ""
        print(f"run {run.run_id}: {status}{reason}")
        current_branch = branch.branch_id == run.current_branch_id
        resume = with_db(f"'conclave resume {shell_word(run.run_id)}'", args.db)
        if status == STALLED:
            print(f"  no process is driving it (it was killed): {resume} continues it")
        elif status == "interrupted" and current_branch:
            print(f"  stopped before it finished: {resume} continues it")
        elif status == "halted" and current_branch and branch.halt_reason == "agents_failed":
            hint = with_db(f"'conclave resume {shell_word(run.run_id)} --retry-failed'", args.db)
            print(f"  a stage is left undecided: once the cause has passed, {hint} asks the failed agents again")
        elif status == "abandoned":
            print(f"  left unfinished when the run was rerun; the run goes on on branch"
                  f" {short_branch_id(run.current_branch_id or '')}")
        current = " (current)" if branch.branch_id == run.current_branch_id else ""
        print(f"  spec {run.spec_id} | seed {run.seed} | branch {short_branch_id(branch.branch_id)}{current}")
        # A goal may hold anything a user typed; shown, it must not drive
        # the terminal or forge a line of status.
        print(f"  goal: {shown(run.goal) or '-'}")
        for s in info["stages"]:
            print(f"  {s['stage']:<10} {s['status'] or 'pending'}")
        finished = info["status"] in ("completed", "halted")
        shown_usage = usage_line(_usage(store, run, branch))
        print(f"  usage: {shown_usage}" + ("" if finished else " so far (its stored attempts)"))
        if info["digest"]:
            print(f"  digest: {info['digest']}")
        return EXIT_OK


def _usage(store: Store, run: RunRow, branch: BranchRow | None = None) -> TokenUsage:
    """What ``branch`` (default: the current one) has used over its whole
    lineage: as recorded when the run finished on it, or - another branch,
    or a run still running, interrupted or killed - the sum of the
    attempts its lineage stored (status said "0 in / 0 out" while metrics
    showed the thousands of tokens already paid for).  Never the sum over
    every branch: a rerun's abandoned parent stages are not its usage."""
    branch_id = run.current_branch_id if branch is None else branch.branch_id
    if branch_id == run.current_branch_id and run.status in ("completed", "halted"):
        return run.usage
    if not branch_id:
        return ZERO_USAGE
    total = ZERO_USAGE
    for row in store.lineage_outputs(run.run_id, branch_id):
        if row.usage is not None:
            total = total + row.usage
    return total


# Shown for a run stored as running that no process holds: killed before
# it could record that it stopped.
STALLED = "stalled"


def _shown_status(status: str, driven: bool | None) -> str:
    return STALLED if status == "running" and driven is False else status


def _run_json(
    store: Store,
    run_id: str,
    branch_id: str | None = None,
    *,
    state: tuple[RunRow, bool | None] | None = None,
) -> dict[str, Any]:
    """``status --json``: the run as seen from ``branch_id`` (default: its
    current branch) - that branch's outcome, usage and digest.  ``state``:
    the run's row and whether it is driven, as already read by
    :meth:`~store.Store.run_state`."""
    run, driven = state if state is not None else store.run_state(run_id)
    assert run is not None
    branch_id = branch_id or run.current_branch_id or ""
    branch = store.get_branch(run_id, branch_id) if branch_id else None
    # The run row keeps the current branch's outcome; a branch row its own.
    owner: RunRow | BranchRow = run if branch is None or branch_id == run.current_branch_id else branch
    decided = {d.stage: d for d in store.lineage_decisions(run_id, branch_id)}
    return {
        "run_id": run.run_id,
        "branch_id": branch_id,
        "current_branch_id": run.current_branch_id,
        "spec_id": run.spec_id,
        "goal": run.goal,
        "seed": run.seed,
        "status": _history.shown_branch_status(owner.status, owner is run),
        "halt_reason": owner.halt_reason,
        # Whether a process is working on this branch now (null:
        # unknowable); only the current branch is ever driven, as
        # branches --json and metrics --json say.
        "driven": driven if owner is run else False,
        "stages": [
            {
                "stage": s["name"],
                "status": decided[s["name"]].status if s["name"] in decided else None,
                "seq": decided[s["name"]].seq if s["name"] in decided else None,
            }
            for s in run.pipeline["stages"]
        ],
        "usage": _usage(store, run, branch).as_dict(),
        "digest": owner.digest,
        "created_at": run.created_at,
        "updated_at": run.updated_at,
    }


def cmd_decisions(args: argparse.Namespace) -> int:
    store, run = open_run(args.db, args.run_id)
    with store:
        branch = _history.branch_of(store, run, args.branch)
        # What the branch sees: its own decisions and the ones it inherits.
        rows = store.lineage_decisions(run.run_id, branch.branch_id)
        if args.json:
            _json_out(
                {
                    "run_id": run.run_id,
                    "branch_id": branch.branch_id,
                    "current_branch_id": run.current_branch_id,
                    "decisions": [
                        {
                            "stage": d.stage,
                            "seq": d.seq,
                            "status": d.status,
                            "branch_id": d.branch_id,
                            "inherited": d.branch_id != branch.branch_id,
                            "decided_at": d.decided_at,
                            "verdict": d.verdict,
                        }
                        for d in rows
                    ],
                }
            )
            return EXIT_OK
        print(f"decisions of {run.run_id} (branch {short_branch_id(branch.branch_id)}):")
        if not rows:
            print("  none yet")
        for d in rows:
            inherited = d.branch_id != branch.branch_id
            print(
                verdict_line(d.stage, d.seq, d.status, d.verdict)
                + (f"  [inherited from {short_branch_id(d.branch_id)}]" if inherited else "")
            )
            for conflict in d.verdict.get("conflicts") or ():
                print(f"      conflict: {shown(conflict)}")
        return EXIT_OK


# -- parser ------------------------------------------------------------------


def _version() -> str:
    """The installed distribution's version (a source tree not installed
    says so)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trio-conclave")
    except PackageNotFoundError:
        return "(not installed)"


class _StdoutFailed(Exception):
    """Help or a version that stdout could not take (``error``)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


class _Parser(argparse.ArgumentParser):
    """argparse's parser, except that help or a version that stdout cannot
    take raises :class:`_StdoutFailed` for main() to report.  argparse
    drops a failed write in silence and exits 0: with stdout buffered the
    failure still came out at main()'s flush, but unbuffered
    (PYTHONUNBUFFERED=1) the write itself failed, and 'conclave --help >
    /dev/full' exited 0 saying nothing."""

    def _print_message(self, message: str, file: Any = None) -> None:
        if file is None or file is not sys.stdout or not message:
            # stderr (usage errors): if it cannot take them there is
            # nowhere to say so; the exit code still does.  (None: an
            # embedding app's closed stdout, which argparse passes over.)
            super()._print_message(message, file)
            return
        try:
            file.write(message)
        except OSError as exc:
            raise _StdoutFailed(exc) from None


def build_parser() -> argparse.ArgumentParser:
    # Subcommands' parsers are made with the same class (add_subparsers).
    parser = _Parser(
        prog="conclave",
        description=(
            "Run multi-agent LLM pipelines that must reach consensus. Every stage is "
            "answered by several agents and decided exactly once; state lives in SQLite."
        ),
        epilog="Exit codes: 0 completed, 3 halted, 2 bad input, 130 interrupted (143 for SIGTERM, 129 for SIGHUP), 1 other error.",
    )
    parser.add_argument("--version", action="version", version=f"conclave {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run a pipeline (default: the embedded simulated provider)",
        description=(
            "Run every stage of a pipeline and decide each by consensus. A stage that "
            "ends in conflict or no_consensus halts the run (exit 3)."
        ),
    )
    run.add_argument("spec_id", nargs="?", type=_id_arg("a spec id", spaces=True), default="SPEC-DEMO", metavar="SPEC_ID", help="spec to work on: at most 200 printable characters, not starting with - (default: SPEC-DEMO)")
    run.add_argument("--goal", default="", help="what the agents should achieve")
    run.add_argument("--pipeline", type=file_arg, metavar="FILE", help="pipeline definition (TOML); default: plan -> tasks -> implement -> validate -> audit -> unlock")
    add_db_argument(run)
    run.add_argument("--seed", type=seed_arg, default=0, help="seed of every random choice (default: 0); same seed, same digest")
    run.add_argument("--run-id", type=_id_arg("a run id", spaces=False), metavar="ID", help="use this run id instead of a generated one (at most 200 printable characters, no spaces, not starting with -)")
    # Default None, filled in by cmd_run: given with no simulator agent, they are refused.
    run.add_argument("--disagreement-rate", type=_unit_interval, default=None, metavar="P", help="simulator: chance that an agent dissents on a stage (default: 0.03)")
    run.add_argument("--sim-latency", type=_non_negative, default=None, metavar="SECONDS", help="simulator: median call latency (default: 2.0)")
    run.add_argument(
        "--max-attempts", type=positive_arg, default=None, metavar="N",
        help="attempts per agent call, retries included (default: 3); kept with the run for resume and rerun",
    )
    _history.add_max_retry_wait(run, "600; kept with the run for resume and rerun")
    run.add_argument(
        "--clock",
        choices=("virtual", "real"),
        default=None,
        help="virtual: simulated latencies take no wall time (default with the simulator); "
        "real: wall-clock time (default, and required, with real providers)",
    )
    add_run_metrics_args(run)
    add_fault_options(run)
    run.add_argument("--json", action="store_true", help="print one JSON object at the end instead of progress")
    add_provider_arguments(run)
    add_run_auth_option(run)
    run.set_defaults(handler=cmd_run)

    status = sub.add_parser("status", help="show a run, or list recent runs", description="Show a run's status, or list the most recent runs.")
    status.add_argument("run_id", nargs="?", metavar="RUN_ID", help="the run to show (default: list recent runs)")
    add_db_argument(status)
    status.add_argument("--limit", type=positive_arg, default=None, help="runs to list (default: 20)")
    status.add_argument("--branch", type=nonempty_arg, metavar="BRANCH", help="branch to show (full or short id; default: the current one)")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=cmd_status)

    decisions = sub.add_parser("decisions", help="show a run's decisions", description="Show every decision of a run with its verdict.")
    decisions.add_argument("run_id", metavar="RUN_ID", help="the run, as 'conclave status' lists it")
    add_db_argument(decisions)
    decisions.add_argument("--branch", type=nonempty_arg, metavar="BRANCH", help="branch to show (full or short id; default: the current one)")
    decisions.add_argument("--json", action="store_true", help="print JSON")
    decisions.set_defaults(handler=cmd_decisions)

    add_serve_mock_command(sub)
    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


# Later features register their subcommands here: f(subparsers) -> None.
EXTRA_COMMANDS: list[Callable[[Any], None]] = []
EXTRA_COMMANDS.append(add_metrics_command)  # conclave metrics (issue 4)
EXTRA_COMMANDS.append(add_auth_commands)  # login, logout, auth status (issue 6)


def _register_soak(sub: Any) -> None:
    from ._cli_soak import register

    register(sub)


EXTRA_COMMANDS.append(_register_soak)


def _register_events(sub: Any) -> None:
    from ._cli_events import add_events_command

    add_events_command(sub)


EXTRA_COMMANDS.append(_register_events)


def _not_utf8(args: argparse.Namespace, argv: Sequence[str]) -> str | None:
    """Why an argument cannot be used, if one holds bytes that are not
    UTF-8 (argv reaches Python surrogate-escaped): run ids, goals and paths
    go into SQLite, which holds UTF-8 only, and it failed mid-command with
    a UnicodeEncodeError (exit 1; a refused goal had created the database)."""
    for dest, value in sorted(vars(args).items()):
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and any("\ud800" <= c <= "\udfff" for c in item):
                option = f"--{dest.replace('_', '-')}"
                name = option if any(a.split("=", 1)[0] == option for a in argv) else dest.upper()
                return f"{name} {item!r} is not valid UTF-8 (nothing was read or written)"
    return None


def _tolerant_output() -> None:
    # A terminal that cannot show a mark (PYTHONIOENCODING=latin-1 and the
    # verdict's check mark) killed the run mid-stage, left interrupted.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            pass


def main(argv: Sequence[str] | None = None) -> int:
    # Started with stdout or stderr closed ('conclave run >&-'), Python
    # gives None: the first print killed the run, left interrupted.  What
    # would have gone there goes nowhere; the work is done and stored.
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        # Ctrl-C before the command's own handling begins (building the
        # parser takes a second on a loaded machine): Python's traceback
        # was printed.  Nothing has been done yet.
        print("conclave: interrupted before the command began; nothing was done", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (SystemExit, _StdoutFailed) as ended:
        # --help, --version, a usage error: argparse has printed.  Into a
        # pipe whose reader has gone ('conclave --help | head -1' when head
        # is quick), Python's flush at exit printed "Exception ignored ...
        # BrokenPipeError" and exited 120.
        try:
            if isinstance(ended, _StdoutFailed):
                raise ended.error  # unbuffered: the write itself failed
            _flush_stdout()
        except BrokenPipeError:
            _drop_stdout()
            return EXIT_ERROR
        except OSError as exc:  # a full disk: said, as for any command
            _drop_stdout()
            return _fail(f"{type(exc).__name__}: {exc}", EXIT_ERROR)
        raise
    problem = _not_utf8(args, sys.argv[1:] if argv is None else argv)
    if problem is not None:
        return _fail(problem)
    _tolerant_output()
    try:
        with throughput_gc(), _stopping_signals():  # the process is ours: see actors/_gc.py
            code: int = args.handler(args)
            # Flushed here, not at exit: a pipe holds the output in its
            # buffer, and a reader gone by then ('soak --json | head -c 10')
            # made Python's own flush fail - "Exception ignored ...
            # BrokenPipeError" and exit 120 - past the handling below.
            _flush_stdout()
    except UsageError as exc:
        return _fail(str(exc))
    except BaseException as exc:
        if _is_broken_pipe(exc):
            # stdout closed early (piped into head): not our error.  (A
            # run, resume or rerun stopped so says how to resume it: see
            # _interrupted.)
            _drop_stdout()
            return EXIT_ERROR
        stop = stopped_by(exc)
        if stop is not None:
            return _fail(*stop)
        if not isinstance(exc, Exception):
            raise  # SystemExit and friends
        # Anything else: one line per failure, exit 1, no traceback.
        db = getattr(args, "db", None)
        for leaf in _leaves(exc):
            _fail(_database_trouble(leaf, db) or f"{type(leaf).__name__}: {leaf}", EXIT_ERROR)
        try:
            _flush_stdout()
        except OSError:
            # stdout cannot take what is left (a full disk: 'status >
            # /dev/full'): said once above; Python's flush at exit would
            # say it again as "Exception ignored" and exit 120.
            _drop_stdout()
        return EXIT_ERROR
    return code


def _flush_stdout() -> None:
    """Flush stdout, raising OSError if it cannot take the output.  A
    stdout already closed (an embedding app's) has nothing to flush."""
    try:
        sys.stdout.flush()
    except ValueError:  # I/O operation on closed file
        pass


def _drop_stdout() -> None:
    """Send what stdout still holds, and anything later, nowhere (when it
    is a file descriptor: an embedding app's object is left as it is)."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@contextlib.contextmanager
def _stopping_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Terminated` for the command's
    whole life, as SIGINT raises KeyboardInterrupt: only trio's loop
    handled them (:func:`interruptible`), and one that came as a command
    opened its store or printed its result ended the process by the
    signal, without a word.  (A soak's parent waits for its workers in
    plain Python: this is what stops it.)  Only signals left at their default action are
    taken (not an embedding app's handlers, nor ``nohup``'s ignoring), and
    only in the main thread; they are given back on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        if trio.lowlevel.in_trio_run():
            # trio's machinery is not to be raised into (trio shields it
            # from SIGINT); the commands hand signals to interruptible()
            # inside their loop.  A second signal while it stops the work
            # (trio sends on what its receiver had not read) changes
            # nothing; one in the instants before it takes them, or
            # after, has the signal's own action, as before.
            if _stop.under_way:
                return
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated(signum)

    ours = {signal.SIGTERM, signal.SIGHUP}
    taken = {}
    _stop.under_way = False
    # Blocked while handlers change hands: a signal landing between two
    # changes would leave ours installed after main() returned.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ours)
    try:
        for signum in ours:
            if signal.getsignal(signum) is signal.SIG_DFL:
                taken[signum] = signal.signal(signum, terminate)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        yield
    finally:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, ours)
        try:
            for signum, previous in taken.items():
                signal.signal(signum, previous)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class _Stop:
    """Whether :func:`interruptible` has taken a stop signal (see
    :func:`_stopping_signals`)."""

    under_way = False


_stop = _Stop()


def _database_trouble(exc: BaseException, db: str | None) -> str | None:
    """Words for SQLite finding the file itself at fault (met only once a
    damaged page is read, so after opening), naming the file; else None."""
    import apsw

    cause = exc
    while not isinstance(cause, apsw.Error) and cause.__cause__ is not None:
        cause = cause.__cause__
    where = db or "the database"
    if isinstance(cause, apsw.FullError):
        return f"{where}: the disk is full ({cause}); free some space, then resume the run"
    if isinstance(cause, (apsw.CorruptError, apsw.IOError, apsw.NotADBError)):
        return (
            f"{where}: the database file is damaged or unreadable ({cause}); "
            "restore a copy, or give --db a new file (sqlite3's .recover may save what is left)"
        )
    return None


def console_main() -> None:
    sys.exit(main())


# resume / rerun / branches (and helpers used above); imported last because
# it registers itself in EXTRA_COMMANDS and uses this module's helpers.
from . import _cli_history as _history  # noqa: E402
