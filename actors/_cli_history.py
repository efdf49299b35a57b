"""``conclave resume``, ``rerun`` and ``branches``: the run's history.

Same exit codes and final ``--json`` object as ``run``.  Bad input (an
unknown run, stage or branch, a file that is not a database, a newer
schema, a read-only file) is refused before anything is written, so the
file is left byte-for-byte as it was.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TextIO

import attrs
import httpx
import trio
import trio.testing

from messages import AuthError, FaultPlan, ProgressEvent, StageDecided, StageStarted
from messages._faultplan import DEFAULT_TIMEOUT_MS
from store import BranchRow, LockFileError, RunLocked, RunPreview, RunRow, Store, StoreError, preview_lineage, preview_run

from ._cli import (
    EXIT_OK,
    EXTRA_COMMANDS,
    ProgressPrinter,
    UsageError,
    _fail,
    _interrupted,
    _is_broken_pipe,
    _is_interrupt,
    _json_out,
    _leaves,
    _shown_status,
    _non_negative,
    _unit_interval,
    add_fault_options,
    check_fault_scope,
    fault_banner,
    fault_plan,
    fault_summary,
    interruptible,
    open_run,
    drain_progress,
    print_progress,
    report_result,
    given_sim_options,
    sim_only_problem,
    warn_unpriced_budget,
)
from ._checks import add_db_argument, nonempty_arg, positive_arg
from ._consensus import ADVANCING
from ._ids import shell_word, short_branch_id
from ._pipeline import PipelineError, pipeline_from_dict
from ._resume import ResumeError, pick_branch, resolve_branch
from ._cli_auth import add_run_auth_option, login_auth
from ._token_source import AuthService
from ._cli_metrics import (
    PRICES_OPTION,
    MetricsUsageError,
    add_run_metrics_args,
    given_prices,
    kept_prices,
    load_kept_prices,
)
from ._pricing import PriceTable
from ._cli_providers import add_provider_arguments, provider_configs_from_args
from ._pipeline import Pipeline
from ._provider import BaseProvider
from ._http_errors import redact
from ._provider_factory import BASE_URL_ENV, ProviderConfig, ProviderConfigError
from ._retry import RetryPolicy
from ._runtime import ConfigError, Limits, Orchestrator, RunResult, open_orchestrator

KILL_AFTER_WRITES = "CONCLAVE_TEST_KILL_AFTER_WRITES"
KILL_PHASE = "CONCLAVE_TEST_KILL_PHASE"

DEFAULT_OPTIONS: dict[str, float] = {"disagreement_rate": 0.03, "sim_latency": 2.0}
FAULT_SEED_OPTION = "fault_seed"


def install_test_kill_hook(store: Store, environ: Mapping[str, str]) -> None:
    """Test-only crash switch, read at the CLI edge: with
    ``CONCLAVE_TEST_KILL_AFTER_WRITES=N`` the process SIGKILLs itself once
    N writes are committed (``CONCLAVE_TEST_KILL_PHASE=after_commit``, the
    default), or inside the transaction that would commit the N-th write
    (``before_commit``: that batch is lost, as in a real crash)."""
    raw = environ.get(KILL_AFTER_WRITES)
    if not raw:
        return
    limit = int(raw)
    phase = environ.get(KILL_PHASE, "after_commit")
    committed = 0

    def hook(when: str, items: int) -> None:
        nonlocal committed
        if when == "before_commit" and phase == "before_commit" and committed + items >= limit:
            os.kill(os.getpid(), signal.SIGKILL)
        if when == "after_commit":
            committed += items
            if phase == "after_commit" and committed >= limit:
                os.kill(os.getpid(), signal.SIGKILL)

    store.commit_hook = hook


def branch_of(store: Store, run: RunRow, branch: str | None) -> BranchRow:
    """The branch ``--branch`` names (full or short id), or the current one.
    Raises :class:`UsageError` (one line, exit 2) naming the branch that is
    missing."""
    try:
        return resolve_branch(store, run, branch)
    except ResumeError as exc:
        raise UsageError(str(exc)) from None


def shown_branch_status(status: str | None, current: bool) -> str | None:
    """Only the current branch is ever resumed: another one left unfinished
    (a rerun forked the run away from it) is ``abandoned``, not running -
    its 'stalled' and 'resume' hint would have continued the wrong branch."""
    return "abandoned" if status in ("running", "interrupted") and not current else status


def simulator_options(args: argparse.Namespace) -> dict[str, float]:
    return {"disagreement_rate": args.disagreement_rate, "sim_latency": args.sim_latency}


def run_options(args: argparse.Namespace, plan: FaultPlan | None = None) -> dict[str, float | int]:
    """What ``run`` keeps with the branch for ``resume`` and ``rerun``: the
    simulator's settings, ``--max-attempts`` and ``--max-retry-wait`` when
    given, and the fault seed when faults are active with a seed of their
    own (each left out otherwise, so a default run's stored options are as
    they always were)."""
    options: dict[str, float | int] = dict(simulator_options(args))
    for name in RETRY_OPTIONS:
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if plan is not None and plan.enabled and plan.seed is not None:
        options[FAULT_SEED_OPTION] = plan.seed
    return options


# Branch option: the fault plan a run was made with (FaultPlan.to_json), so
# a resume given none can say what it leaves out.
FAULTS_OPTION = "faults"


def fault_options(plan: FaultPlan | None) -> dict[str, Any]:
    return {FAULTS_OPTION: plan.to_json()} if plan is not None and plan.enabled else {}


def note_faults_left_out(run_id: str, plan: FaultPlan, options: Mapping[str, Any], what: str) -> None:
    """Say on stderr when the run was made under faults and this resume or
    rerun is given none: it then gets none, and a crash-and-resume test
    gets another digest than the uninterrupted run, without a word."""
    kept = options.get(FAULTS_OPTION)
    if plan.enabled or not isinstance(kept, dict) or not kept.get("faults"):
        return
    env = [
        f"CODEX_FAULTS_{name}={shell_word(str(kept[key]))}"
        for name, key in (("429_RESET", "reset"), ("TIMEOUT_MS", "timeout_ms"))
        if kept.get(key) is not None and (key != "timeout_ms" or kept[key] != DEFAULT_TIMEOUT_MS)
    ]
    if kept.get("provider"):
        env.insert(0, f"CODEX_FAULTS_SCOPE=gateway:{shell_word(str(kept['provider']))}")
    again = " ".join([*env, f"--faults {shell_word(str(kept['faults']))}"])
    print(
        f"conclave: note: run {run_id} was made with faults ({kept['faults']}); this {what} injects none "
        f"(give {again} to go on under the same plan)",
        file=sys.stderr,
    )


def base_url_options(configs: Mapping[str, ProviderConfig]) -> dict[str, Any]:
    """The real providers' base URLs, kept with the run: a resume without
    --base-url went to the provider's public endpoint (with the key meant
    for the local server) and stored its failures as decisions.  A URL
    whose query holds anything but a version is not stored, only that it
    was given: the resume must then be told again, and is refused without
    it (it went to the public endpoint, the key with it)."""
    given = {
        name: config.base_url
        for name, config in sorted(configs.items())
        if config.remote and config.base_url is not None
    }
    urls = {name: url for name, url in given.items() if _storable_url(url)}
    withheld = sorted(given.keys() - urls.keys())
    return ({"base_urls": urls} if urls else {}) | ({WITHHELD_URLS: withheld} if withheld else {})


# Branch option: the providers whose --base-url was used but not kept.
WITHHELD_URLS = "base_urls_withheld"


# Query parameters that name a version, never a credential.
_SAFE_QUERY_KEYS = frozenset({"api-version"})


def _storable_url(url: str) -> bool:
    """Whether ``url`` may be kept in the database: its query holds nothing
    but a version.  Guessing credentials by name missed ``?key=``,
    ``?token=``, ``?sig=`` and ``?code=``, and those were stored in plain
    text; a URL with any other query is used, not kept (a resume must be
    given ``--base-url`` again)."""
    if redact(url) != url:
        return False
    try:
        params = httpx.URL(url).params
    except Exception:
        return False
    return all(key.lower() in _SAFE_QUERY_KEYS for key in params.keys())


# Stored option -> RetryPolicy field, for the retry settings a branch keeps.
RETRY_OPTIONS = {"max_attempts": "max_attempts", "max_retry_wait": "max_wait"}


def retry_of(options: Mapping[str, Any]) -> RetryPolicy | None:
    """The retry policy a branch's stored options ask for (None: the default)."""
    given = {field: options[name] for name, field in RETRY_OPTIONS.items() if options.get(name) is not None}
    return RetryPolicy(**given) if given else None


def add_max_retry_wait(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--max-retry-wait", type=_non_negative, default=None, metavar="SECONDS",
        help=(f"longest rate-limit reset an agent waits for before giving up (default: {default}); "
              "a provider's later reset ends its retries at once, named"),
    )


Action = Callable[[Orchestrator], Awaitable[RunResult]]


class HistoryPrinter(ProgressPrinter):
    """``run``'s progress lines, plus a line for each stage a resume or
    rerun takes from the store instead of running it again."""

    def __init__(self, out: TextIO, total_stages: int) -> None:
        super().__init__(out, total_stages)
        self._started: set[str] = set()

    def __call__(self, event: ProgressEvent) -> None:
        if isinstance(event, StageStarted):
            self._started.add(event.key.stage)
        elif isinstance(event, StageDecided) and event.decision.key.stage not in self._started:
            self.index += 1
            stage = event.decision.key.stage
            self.out.write(
                f"\nSTAGE {self.index}/{self.total}: {stage.upper()} "
                f"(decided on branch {short_branch_id(event.decision.key.branch_id)}; not run again)\n"
            )
        super().__call__(event)


async def _drive(
    args: argparse.Namespace,
    store: Store,
    providers: dict[str, BaseProvider],
    seed: int,
    stages: int,
    action: Action,
    auth: AuthService | None = None,
    retry: RetryPolicy | None = None,
    faults: FaultPlan | None = None,
    pipeline: Pipeline | None = None,
) -> tuple[RunResult, float, dict[str, Any] | None]:
    printer = None if args.json else HistoryPrinter(sys.stdout, stages)
    limits = Limits() if args.max_concurrency is None else Limits(max_concurrency=args.max_concurrency)
    started = trio.current_time()
    async with open_orchestrator(
        store=store,
        provider=providers,
        pipeline=pipeline,  # the stored one: the providers were built for it
        seed=seed,
        limits=limits,
        prices=args.price_table,
        auth=auth,
        retry=retry,
        faults=faults,
    ) as orch:
        progress = orch.subscribe() if printer is not None else None
        async with trio.open_nursery() as nursery:
            if progress is not None and printer is not None:
                nursery.start_soon(print_progress, progress, printer)
            try:
                result = await action(orch)
            finally:
                nursery.cancel_scope.cancel()
        if progress is not None and printer is not None:
            drain_progress(progress, printer)
        injected = fault_summary(orch, store, result, show=printer is not None)
    return result, trio.current_time() - started, injected


def _configs(
    args: argparse.Namespace, pipeline: Pipeline, seed: int, options: Mapping[str, Any], tokens: Any
) -> dict[str, ProviderConfig]:
    """The run's providers, as ``run`` builds them: the stored pipeline
    names them, the branch's options hold the simulator's settings, and the
    command line gives only how to reach real ones (URL, key, auth)."""
    merged = {**DEFAULT_OPTIONS, **options}
    view = argparse.Namespace(**{
        **vars(args),
        "provider": None,
        "model": None,
        "seed": seed,
        "disagreement_rate": float(merged["disagreement_rate"]),
        "sim_latency": float(merged["sim_latency"]),
    })
    stored = options.get("base_urls")
    kept = {k: v for k, v in stored.items() if isinstance(v, str)} if isinstance(stored, dict) else {}
    withheld = options.get(WITHHELD_URLS)
    if isinstance(withheld, list) and getattr(args, "base_url", None) is None:
        # (Its provider's *_BASE_URL variable, given again, will do too.)
        missing = [str(n) for n in withheld if not os.environ.get(BASE_URL_ENV.get(str(n), ""), "")]
        if missing:
            raise ProviderConfigError(
                f"run {args.run_id} called {', '.join(missing)} at a base URL that was not kept "
                "(its query may hold a credential); give --base-url again (or "
                f"{', '.join(BASE_URL_ENV.get(n, n.upper() + '_BASE_URL') for n in missing)})"
            )
    return provider_configs_from_args(view, pipeline, token_sources=tokens, base_urls=kept, stored=True)


def _continue(args: argparse.Namespace, preview: RunPreview, fork: str | None) -> int:
    """Check everything else that can refuse, then open (migrating if
    needed) and resume or rerun."""
    if args.provider is not None or args.model is not None:
        return _fail("resume and rerun use the run's stored pipeline; --provider and --model cannot change it")
    # CODEX_FAULTS* and --faults apply here as to run: a crash-and-resume
    # test under faults used to get none after the resume, without a word.
    plan = fault_plan(args)
    try:
        pipeline = pipeline_from_dict(preview.pipeline, source=f"run {args.run_id}'s stored pipeline", stored=True)
        auth = login_auth(args, {spec.provider for spec in pipeline.agents.values()})
        tokens = auth.sources if auth is not None else None
        configs = _configs(args, pipeline, 0, {}, tokens)  # validated before anything writes
        # Given: this session's prices (and a rerun's branch keeps them);
        # else the ones the branch keeps, read below.
        given, kept = load_kept_prices(args.prices) if given_prices(args.prices) else (None, None)
    except (PipelineError, ProviderConfigError, AuthError, MetricsUsageError) as exc:
        return _fail(str(exc))
    problem = sim_only_problem(given_sim_options(args), configs, f"run {args.run_id}'s stored pipeline uses")
    if problem is not None:
        return _fail(problem)
    check_fault_scope(plan, configs)
    remote = sorted(name for name, config in configs.items() if config.remote)
    if args.clock is None:
        args.clock = "real" if remote else "virtual"
    elif args.clock == "virtual" and remote:
        return _fail(f"--clock virtual works only with the simulator, not {', '.join(remote)}; use --clock real")
    try:
        store = Store.open(args.db)
    except StoreError as exc:
        return _fail(str(exc))
    with store:
        install_test_kill_hook(store, os.environ)
        run = store.get_run(args.run_id)
        assert run is not None  # checked by the preview
        try:
            branch = resolve_branch(store, run, args.branch if fork is not None else None)
        except ResumeError as exc:
            return _fail(str(exc))
        options = dict(branch.options)  # the branch continued, or forked
        options.pop("budget_usd", None)  # the budget is not an option: rerun keeps it unless --budget
        try:
            args.price_table = given or kept_prices(options) or PriceTable.vendored()
        except MetricsUsageError as exc:
            return _fail(str(exc))
        if fork is not None and kept is not None:
            options[PRICES_OPTION] = kept
        warn_unpriced_budget(args, pipeline)
        if fork is not None:
            for name in ("disagreement_rate", "sim_latency", *RETRY_OPTIONS):
                value = getattr(args, name)
                if value is not None:
                    options[name] = value
        seed = run.seed if run.seed is not None else 0
        note_faults_left_out(args.run_id, plan, options, "resume" if fork is None else "rerun")
        kept_seed = options.get(FAULT_SEED_OPTION)
        if plan.enabled and plan.seed is None and isinstance(kept_seed, int):
            # The run's own fault seed (its --fault-seed or CODEX_FAULTS_SEED):
            # the run's seed placed the resume's faults elsewhere, so a
            # crash-and-resume mixed two placements.
            plan = attrs.evolve(plan, seed=kept_seed)
        if fork is not None and plan.enabled and plan.seed is not None:
            # The new branch keeps the seed it is run with, for its own resumes.
            options[FAULT_SEED_OPTION] = plan.seed
        try:
            configs = _configs(args, pipeline, seed, options, tokens)
            providers = {name: config.build() for name, config in configs.items()}
        except ProviderConfigError as exc:
            return _fail(str(exc))
        if fork is not None:
            # The new branch keeps what it runs with, not its parent's: its
            # resume went back to the parent's server, or offered the
            # parent's faults.
            for key in ("base_urls", WITHHELD_URLS, FAULTS_OPTION):
                options.pop(key, None)
            options.update(base_url_options(configs) | fault_options(plan))

        async def action(orch: Orchestrator) -> RunResult:
            if fork is None:
                return await orch.resume(args.run_id, budget=args.budget, retry_failed=args.retry_failed)
            return await orch.rerun(
                args.run_id, fork, branch_id=branch.branch_id, options=options, budget=args.budget
            )

        virtual = args.clock == "virtual"
        clock = trio.testing.MockClock(autojump_threshold=0) if virtual else None
        stages = len(preview.pipeline.get("stages", ()))
        try:
            fault_banner(plan, seed, "the run's seed")
            result, elapsed, faults = trio.run(
                interruptible, _drive, args, store, providers, seed, stages, action, auth, retry_of(options), plan,
                pipeline, clock=clock,
            )
        except (ConfigError, ResumeError, RunLocked, LockFileError) as exc:
            return _fail(str(exc))
        except BaseException as exc:
            if _is_interrupt(exc) or _is_broken_pipe(exc):
                return _interrupted(exc, store, args.run_id, args.db)
            if isinstance(exc, BaseExceptionGroup):
                bad, _ = exc.split((ConfigError, ResumeError, RunLocked, LockFileError))
                if bad is not None:
                    return _fail(str(_leaves(bad)[0]))
            raise
    return report_result(args, result, virtual, elapsed, faults)


def _preview(args: argparse.Namespace) -> RunPreview | int:
    try:
        return preview_run(args.db, args.run_id)
    except StoreError as exc:
        return _fail(str(exc))


def cmd_resume(args: argparse.Namespace) -> int:
    preview = _preview(args)
    if isinstance(preview, int):
        return preview
    return _continue(args, preview, None)


def cmd_rerun(args: argparse.Namespace) -> int:
    preview = _preview(args)
    if isinstance(preview, int):
        return preview
    try:
        pipeline = pipeline_from_dict(preview.pipeline, source=f"run {args.run_id}'s stored pipeline", stored=True)
        stage = pipeline.resolve_stage(args.from_stage)
    except PipelineError as exc:
        return _fail(f"cannot rerun run {args.run_id!r} from {args.from_stage!r}: {exc}")
    parent = preview.current_branch_id or ""
    if args.branch is not None:
        try:
            # Looked up in what preview_run read: rerun looks before it opens
            # the store for writing (which may migrate the file).
            parent = pick_branch(preview.run_id, preview.branch_ids, args.branch)
        except ResumeError as exc:
            return _fail(str(exc))
    # Refuse before anything writes: every earlier stage must have an
    # advancing decision for the child to inherit.
    try:
        seen = preview_lineage(args.db, args.run_id, parent) if parent else {}
    except StoreError as exc:
        return _fail(str(exc))
    for earlier in pipeline.stages:
        if earlier.name == stage.name:
            break
        status = seen.get(earlier.name)
        if status not in ADVANCING:
            what = "is undecided" if status is None else f"ended in {status}"
            return _fail(
                f"cannot rerun run {args.run_id!r} from {stage.name!r}: the earlier stage "
                f"{earlier.name!r} {what} on branch {short_branch_id(parent)}; rerun from "
                f"{earlier.name!r} instead"
            )
    return _continue(args, preview, stage.name)


def cmd_branches(args: argparse.Namespace) -> int:
    store, run = open_run(args.db, args.run_id)
    with store:
        rows: list[dict[str, Any]] = []
        fresh, driven = store.run_state(run.run_id)  # only the current branch is ever driven
        run = fresh or run
        every = store.lineage_decisions_by_branch(run.run_id)
        made: dict[str, int] = {}
        for d in store.decisions(run.run_id):
            made[d.branch_id] = made.get(d.branch_id, 0) + 1
        for b in store.branches(run.run_id):
            own_count = made.get(b.branch_id, 0)
            seen = every.get(b.branch_id, [])
            rows.append(
                {
                    "branch_id": b.branch_id,
                    "short_id": short_branch_id(b.branch_id),
                    "parent_branch_id": b.parent_branch_id,
                    "fork_stage": b.fork_stage,
                    "current": b.branch_id == run.current_branch_id,
                    "status": shown_branch_status(b.status, b.branch_id == run.current_branch_id),
                    "driven": driven if b.branch_id == run.current_branch_id else False,
                    "halt_reason": b.halt_reason,
                    "decided": [d.stage for d in seen],
                    "own_decisions": own_count,
                    "inherited_decisions": len(seen) - own_count,
                    "digest": b.digest,
                    "created_at": b.created_at,
                }
            )
        if args.json:
            _json_out({"run_id": run.run_id, "current_branch_id": run.current_branch_id, "branches": rows})
            return EXIT_OK
        print(f"branches of {run.run_id} ({len(rows)}):")
        for r in rows:
            mark = "*" if r["current"] else " "
            origin = (
                f"from {short_branch_id(r['parent_branch_id'])} at {r['fork_stage']}"
                if r["parent_branch_id"]
                else "root"
            )
            # As 'status' shows it (JSON keeps the stored status beside "driven").
            shown = _shown_status(r["status"], r["driven"]) if r["current"] else r["status"]
            print(
                f" {mark} {r['short_id']}  {shown or '-':<11} {origin:<28} "
                f"{len(r['decided'])} decided ({r['inherited_decisions']} inherited)  {r['branch_id']}"
            )
        return EXIT_OK


def _add_common(p: argparse.ArgumentParser) -> None:
    add_db_argument(p)
    p.add_argument(
        "--clock",
        choices=("virtual", "real"),
        default=None,
        help="virtual: simulated latencies take no wall time (default with the simulator); real: wall-clock time",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of progress")
    # How to reach the run's providers (its pipeline says which they are).
    add_provider_arguments(p, stored=True)
    add_run_auth_option(p)
    add_run_metrics_args(p)  # --budget (replaces the run's) and --prices
    add_fault_options(p)


def register(sub: Any) -> None:
    resume = sub.add_parser(
        "resume",
        help="continue an interrupted run on its current branch",
        description=(
            "Continue RUN_ID's current branch with its stored pipeline, seed, spec and goal. "
            "Decided stages are not decided again; agents whose answers are already stored "
            "are not called again."
        ),
    )
    resume.add_argument("run_id", metavar="RUN_ID", help="the run to continue")
    resume.add_argument(
        "--retry-failed", action="store_true",
        help=("a run halted for want of answers (agents_failed: a provider outage, rate limits or "
              "timeouts outlasted their retries, or a wrong key or spent quota): ask those agents again, "
              "with a new round of attempts"),
    )
    _add_common(resume)
    resume.set_defaults(handler=cmd_resume)

    rerun = sub.add_parser(
        "rerun",
        help="re-run a run from a stage on a new branch",
        description=(
            "Fork a child branch of RUN_ID's current branch (or --branch) at STAGE and run it: "
            "it inherits the decisions before STAGE and nothing of the parent from STAGE on. "
            "The child becomes the run's current branch; the parent's history is kept."
        ),
    )
    rerun.add_argument("run_id", metavar="RUN_ID", help="the run to fork")
    rerun.add_argument("--from", dest="from_stage", required=True, metavar="STAGE", help="first stage to run again")
    rerun.add_argument("--branch", type=nonempty_arg, metavar="BRANCH", help="branch to fork (full or short id; default: the current one)")
    rerun.add_argument("--disagreement-rate", type=_unit_interval, default=None, metavar="P", help="simulator: override the parent's dissent chance")
    rerun.add_argument("--sim-latency", type=_non_negative, default=None, metavar="SECONDS", help="simulator: override the parent's median latency")
    rerun.add_argument(
        "--max-attempts", type=positive_arg, default=None, metavar="N",
        help="attempts per agent call, retries included (default: the parent's; 3 if it had none)",
    )
    add_max_retry_wait(rerun, "the parent's; 600 if it had none")
    _add_common(rerun)
    rerun.set_defaults(handler=cmd_rerun)

    branches = sub.add_parser("branches", help="list a run's branches", description="List every branch of RUN_ID: its parent, fork stage, status and decisions.")
    branches.add_argument("run_id", metavar="RUN_ID", help="the run, as 'conclave status' lists it")
    add_db_argument(branches)
    branches.add_argument("--json", action="store_true", help="print JSON")
    branches.set_defaults(handler=cmd_branches)


EXTRA_COMMANDS.append(register)
