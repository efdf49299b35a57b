"""The runtime: ``open_orchestrator`` wires the actors and runs pipelines.

Wiring, buffers and why nothing can deadlock
--------------------------------------------
Long-lived actors (started by ``open_orchestrator``)::

    gateway inbox   buffer limits.gateway_buffer  (interceptors: "gateway", faults)
    metrics inbox   buffer limits.metrics_buffer  (interceptors: "metrics")
    store inbox     buffer limits.store_buffer    (interceptors: "store")

Per run (started by ``Orchestrator.run``)::

    agent inbox     buffer 1 per agent            (interceptors: "agent")
    coordinator     unbounded                     (interceptors: "coordinator")

Every reply to a request travels in a one-shot :class:`~messages.Reply`
slot, which holds its one value and therefore *never blocks*; the metrics
accumulator and store writer only ever block on their own inboxes, and the
gateway on its own inbox or, logging a call it drops, on the store's inbox,
which the writer drains without waiting on anyone.  So each request-reply
cycle (agent <-> gateway, agent <-> store, coordinator <-> store, anyone <->
metrics) has a reply edge that cannot block, and none of these actors can
wait on its callers.

The one cycle without a Reply slot is coordinator -> agent -> coordinator.
Its reply edge cannot block: the coordinator's inbox is unbounded, and what
it holds is bounded by the requests made (one reply each; replies it no
longer waits for are dropped as it reads them).  Its request edge blocks
only when an agent's inbox already holds a request - never with the
coordinator's one request at a time, but an interceptor duplicating
requests (the fault model the coordinator's identity checks are built for)
can - and the agent is then working through its inbox, which never waits on
the coordinator.  (A bounded inbox, one slot per panel seat, closed that
cycle: three copies of each request hung the run.)  Hence no load can
deadlock; ``tests/test_scale.py`` runs 2,000 agents in one stage to keep
that argument honest.
"""

from __future__ import annotations

import collections
import json
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, nullcontext
from decimal import Decimal
from typing import Any

import attrs
import trio
import trio.testing

from messages import (
    Broadcast,
    ActorStopped,
    AgentOutput,
    AgentRequest,
    ConclaveError,
    Decision,
    DropRun,
    FaultInterceptor,
    FaultPlan,
    Interceptor,
    MetricsQuery,
    Outbox,
    PersistBranch,
    PersistEvent,
    PersistRun,
    ProgressEvent,
    RunFinished,
    RunStarted,
    RunUpdate,
    SetBudget,
    StageDecided,
    StageKey,
    StoreAck,
    StoreWrite,
    TokenUsage,
    UsageTotals,
    open_channel,
    reply_pair,
    request,
    storable_text,
)
from messages._faults import scoped_panel
from store import BranchRow, Store

from ._agent import Agent
from ._budget import HALT_REASON as BUDGET_HALT
from ._budget import BudgetExceeded, BudgetLike, budget_gate, budget_halt_message, parse_budget, stored_budget
from ._breaker import BreakerPolicy
from ._checks import check_number, check_seconds, check_whole
from ._consensus import ADVANCING
from ._coordinator import Coordinator, RunContext, StageUnanswered
from ._digest import compute_digest
from ._gateway import Gateway
from ._health import HealthRegistry
from ._ids import id_problem, new_branch_id, new_run_id, shell_word
from ._metrics import MetricsAccumulator
from ._metrics_report import exact_usd, totals_json, usd_number
from ._pipeline import Pipeline, default_pipeline
from ._pricing import PriceTable
from ._provider import BaseProvider
from ._resume import (
    UNANSWERED,
    CallLog,
    ResumeState,
    fired_faults,
    fork_stage,
    load_state,
    options_json,
    stage_outputs,
)
from ._retry import RetryPolicy
from ._rng import seed_problem
from ._sequencer import DecisionSequencer
from ._simulator import SimulatedProvider
from ._snapshots import MetricsHub, MetricsSubscription
from ._store_writer import StoreWriter
from ._token_source import AuthService

EDGES = frozenset({"gateway", "metrics", "store", "agent", "coordinator"})


@contextmanager
def collapse_single() -> Iterator[None]:
    """Re-raise a lone exception from one of our internal nurseries as
    itself.  Those nurseries are implementation details: callers should see
    the typed error (or the KeyboardInterrupt, or trio.Cancelled), not a
    group around it.  ActorStopped beside another failure is its consequence
    (the actors stopped because of it): a KeyboardInterrupt raised by a
    provider came out as a group of groups with an ActorStopped in it, so
    ``except KeyboardInterrupt`` missed it.  Groups of several failures of
    their own stay groups; a group of nothing but trio.Cancelled (each
    task of the nursery cancelled, as a cancelled run's are) is one
    cancellation."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        causes = [leaf for leaf in leaves if not isinstance(leaf, ActorStopped)]
        if len(causes) == 1:
            raise causes[0] from None
        if len(leaves) == 1:
            raise leaves[0] from None
        if causes and all(isinstance(leaf, trio.Cancelled) for leaf in causes):
            # Five agents' Cancelled came out as a group that
            # ``except trio.Cancelled`` missed.
            raise causes[0] from None
        raise


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


class ConfigError(ConclaveError, ValueError):
    """The orchestrator was configured wrongly; nothing has run."""


class RunExists(ConclaveError, ValueError):
    """A run with that id is already in the store."""


@attrs.frozen(kw_only=True, slots=True)
class Limits:
    """Sizes and pacing of an orchestrator's actors: channel buffers, the
    gateway's concurrent calls per provider, the progress buffer, how
    often (trio clock) a run's metrics are snapshotted, and how long the
    store writer may hold unawaited writes for a group commit.  Checked
    when built (a ValueError names the field)."""

    # The gateway moves its inbox into per-provider queues at every step, so
    # this buffer bounds nothing for long; a small one only makes a burst of
    # agents (a parallel stage's panel) wait a schedule point each to enter.
    gateway_buffer: int = 4096
    metrics_buffer: int = 4096
    store_buffer: int = 4096
    max_concurrency: int = 64
    progress_buffer: int = 1024
    metrics_interval: float = 0.25  # seconds (trio clock) between snapshots of a run
    # Seconds (trio clock) the store writer may hold writes nobody awaits
    # (events) for the next acknowledged one; 0: never.
    store_hold: float = 1.0

    def __attrs_post_init__(self) -> None:
        # Here rather than when open_orchestrator opens the channels, half set up.
        for name in ("gateway_buffer", "metrics_buffer", "store_buffer", "progress_buffer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        check_whole(self.max_concurrency, "max_concurrency")
        check_number(self.metrics_interval, "metrics_interval")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a whole number >= 1, got {self.max_concurrency!r}")
        if not 0 < self.metrics_interval < math.inf:
            raise ValueError(f"metrics_interval must be a finite number of seconds > 0, got {self.metrics_interval!r}")
        check_seconds(self.store_hold, "store_hold")


@attrs.frozen(kw_only=True, slots=True)
class StageResult:
    """One stage's decision in a :class:`RunResult`: its status and seq,
    the agents present and missing, and the stored verdict."""

    stage: str
    status: str
    seq: int
    agents: tuple[str, ...]
    missing_agents: tuple[str, ...]
    verdict: Mapping[str, Any] = attrs.field(eq=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "status": self.status,
            "seq": self.seq,
            "agents": list(self.agents),
            "missing_agents": list(self.missing_agents),
            "agreements": list(self.verdict.get("agreements", ())),
            "conflicts": list(self.verdict.get("conflicts", ())),
        }


@attrs.frozen(kw_only=True, slots=True)
class RunResult:
    """What a run, resume or rerun ended with: its status (``completed`` or
    ``halted``, with ``halt_reason`` and a ``halt_message`` saying how to go
    on), the decisions of this drive, usage and cost (unknown usage counted
    apart), turns, budget and alerts, and the digest that names the
    outcome (same seed and inputs, same digest).  ``to_json()`` is the
    CLI's ``--json`` object.  Immutable."""

    run_id: str
    branch_id: str
    spec_id: str
    status: str  # "completed" or "halted"
    halt_reason: str | None
    halt_message: str | None
    stages: tuple[StageResult, ...]
    usage: TokenUsage
    unknown_usage_calls: int
    turns: int
    digest: str
    cost_usd: Decimal = Decimal(0)
    # Stored answers this drive reused instead of calling (a resume's): with
    # ``turns``, what the usage beside them covers.
    replays: int = 0
    unpriced_calls: int = 0
    budget_usd: Decimal | None = None
    budget_alerts: tuple[int, ...] = ()

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "branch_id": self.branch_id,
            "spec_id": self.spec_id,
            "status": self.status,
            "halt_reason": self.halt_reason,
            "halt_message": self.halt_message,
            "stages": [s.to_json() for s in self.stages],
            "usage": self.usage.as_dict(),
            "unknown_usage_calls": self.unknown_usage_calls,
            "turns": self.turns,
            "replays": self.replays,
            "cost_usd": usd_number(self.cost_usd),
            "unpriced_calls": self.unpriced_calls,
            "budget_usd": None if self.budget_usd is None else exact_usd(self.budget_usd),
            "budget_alerts": list(self.budget_alerts),
            "digest": self.digest,
        }


# A halt message names at most this many conflicts, each cut to this length
# ('conclave decisions' shows them all): 30,000 conflicts made a 229 KB
# one-line message, stored with the run and printed in full.
_SHOWN_CONFLICTS = 5
_CONFLICT_CHARS = 300


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN_CONFLICTS])
    return shown + (f" and {len(names) - _SHOWN_CONFLICTS} more" if len(names) > _SHOWN_CONFLICTS else "")


def halt_message(run_id: str, decision: Decision) -> str:
    verdict = decision.verdict
    conflicts = [str(c) for c in verdict.get("conflicts") or ()]
    shown = [c if len(c) <= _CONFLICT_CHARS else c[: _CONFLICT_CHARS - 1] + "…" for c in conflicts[:_SHOWN_CONFLICTS]]
    if len(conflicts) > _SHOWN_CONFLICTS:
        shown.append(f"and {len(conflicts) - _SHOWN_CONFLICTS} more")
    detail = "; ".join(shown) or (
        f"only {verdict.get('support', 0)} agent(s) agree, quorum needs "
        f"{verdict.get('quorum_required')}"
    )
    why = ""
    if not conflicts:
        # Too few agreeing named nobody: when every agent failed (a bad
        # request, a provider's own bug) or answered prose, the cause was
        # only in events and the verdict.
        missing = [str(a) for a in verdict.get("missing_agents") or ()]
        invalid = [str(a) for a in verdict.get("invalid_agents") or ()]
        if missing:
            detail += f"; no answer from {_some(missing)}"
            why = f" and why they gave up with 'conclave events {shell_word(run_id)} --kind gave_up'"
        if invalid:
            detail += f"; answers without the stage's fields from {_some(invalid)}"
    return (
        f"halted at stage {decision.key.stage!r}: {decision.status} ({detail}). "
        f"Inspect with 'conclave decisions {shell_word(run_id)}'{why}; once fixed, re-run from that stage "
        f"with 'conclave rerun {shell_word(run_id)} --from {shell_word(decision.key.stage)}'."
    )


class Orchestrator:
    """Runs pipelines on the actors started by :func:`open_orchestrator`.
    Several runs may proceed at once; each has its own agents and
    coordinator and shares the gateway, metrics accumulator and store."""

    def __init__(
        self,
        *,
        gateway: Outbox[Any],
        metrics: Outbox[Any],
        store: Outbox[StoreWrite],
        pipeline: Pipeline,
        seed: int,
        retry: RetryPolicy,
        interceptors: Mapping[str, Sequence[Interceptor[Any]]],
        limits: Limits,
        metrics_hub: MetricsHub | None = None,
        db: Store | None = None,
    ) -> None:
        self._db = db  # read-only use: resume snapshots, consensus input (never inside a write)
        self._gateway = gateway
        self._metrics = metrics
        self._store = store
        self.pipeline = pipeline
        self.seed = seed
        self.retry = retry
        self._interceptors = interceptors
        self._limits = limits
        self.health: HealthRegistry | None = None  # the gateway's gates and breakers
        self.faults: FaultInterceptor | None = None  # diagnostics of injected faults
        # Every fault interceptor on the gateway edge: a resume hands each
        # the faults its run already spent.
        self._fault_interceptors: tuple[FaultInterceptor, ...] = ()
        self._progress: Broadcast[ProgressEvent] = Broadcast(limits.progress_buffer)
        self._metrics_hub = metrics_hub or MetricsHub()
        self._closed = False  # its open_orchestrator block has ended
        # The runs being driven now, by id (health snapshots are one run's
        # only while it is driven alone).
        self._driven: collections.Counter[str] = collections.Counter()
        # Their cancel scopes: a block that ends while runs started elsewhere
        # (an outer nursery) are still being driven stops them first.
        self._drives: set[trio.CancelScope] = set()
        self._drives_done = trio.Event()
        # The trio run its actors live in (None: not made by open_orchestrator).
        self._token: trio.lowlevel.TrioToken | None = None
        self.provider_names: frozenset[str] | None = None  # the gateway's; None: not known
        # The providers whose calls may cost money (BaseProvider.bills): their
        # agents make each failed attempt durable before going on.
        self.billed: frozenset[str] = frozenset()
        # Whether answers or faults are drawn from ``seed`` (the embedded
        # simulator, a fault plan without its own seed): then only a run of
        # the same seed can be continued here.
        self.seed_draws = False

    def _check_seed(self, run_id: str, run_seed: int | None) -> None:
        # Resumed with another seed, the embedded simulator answered the
        # remaining stages as another run would: a digest and usage that
        # neither run would have, without a word.
        if self.seed_draws and run_seed is not None and run_seed != self.seed:
            raise ConfigError(
                f"run {run_id!r} was made with seed {run_seed}, and this orchestrator draws answers or faults from"
                f" seed {self.seed}; open_orchestrator(seed={run_seed}, ...) to continue it"
            )

    def _check_providers(self, pipeline: Pipeline) -> None:
        # Every call of an agent without a provider fails: the run would
        # halt on no_consensus, with the cause only in its stored outputs
        # (and a resume would store those failures over its good state).
        if self.provider_names is None:
            return
        problem = missing_providers(
            pipeline, self.provider_names, "give open_orchestrator this pipeline, or a provider mapping that names them"
        )
        if problem is not None:
            raise ConfigError(problem)

    def subscribe_metrics(self, run_id: str | None = None) -> MetricsSubscription:
        """Live :class:`~messages.TokenMetrics` snapshots (of every run, or
        of ``run_id``), at most one per ``limits.metrics_interval`` per run.
        Latest value, not a backlog: a subscriber that never reads costs
        the runs nothing.  Not a checkpoint.  Raises ActorStopped once the
        orchestrator has closed (a subscription made then never ended)."""
        self._check_open()
        if run_id is not None:
            _check_names(run_id=run_id)
        return self._metrics_hub.subscribe(run_id)

    def subscribe(self, max_buffer: int | None = None) -> trio.MemoryReceiveChannel[ProgressEvent]:
        """A channel of progress events.  Best effort: when the buffer is
        full, events are dropped rather than slowing any run.  Not a
        checkpoint.  Raises ActorStopped once the orchestrator has closed,
        ConfigError for a ``max_buffer`` that is no whole number >= 0."""
        self._check_open()
        if max_buffer is not None and (isinstance(max_buffer, bool) or not isinstance(max_buffer, int) or max_buffer < 0):
            # (trio's own refusal named max_buffer_size, and took math.inf:
            # a backlog without bound for a subscriber that never reads.)
            raise ConfigError(f"max_buffer must be a whole number >= 0 (or None), got {max_buffer!r}")
        return self._progress.subscribe(max_buffer)

    def _publish(self, event: ProgressEvent) -> None:
        self._progress.publish(event)

    async def _write(self, item: StoreWrite) -> StoreAck:
        reply, pending = reply_pair(type(item).__name__)
        ack: StoreAck = await request(self._store, attrs.evolve(item, reply_to=reply), pending)
        return ack

    async def _drop_run(self, run_id: str) -> StoreAck:
        """Delete a finished run from the store, after whatever the writer
        still holds for it (the soak's scratch store; see DropRun)."""
        return await self._write(DropRun(run_id=run_id))

    async def totals(self, run_id: str, *, forget: bool = False) -> UsageTotals:
        """The metrics accumulator's live totals of ``run_id`` while it runs
        (``forget``: and drop them).  A run whose drive has ended -
        completed, halted, cancelled or failed - is forgotten (its totals
        are in its :class:`RunResult` or in the store), so this is all
        zeros for it, as for an id the accumulator never saw.
        A checkpoint: waits for the accumulator's reply.  Raises
        ConfigError for ``forget`` while this orchestrator drives the run:
        a dashboard's forget dropped its budget and half its usage, and
        the run stored a wrong digest."""
        if not isinstance(run_id, str):
            raise ConfigError(f"run_id must be a string, got {run_id!r}")
        if forget and run_id in self._driven:
            raise ConfigError(
                f"run {run_id!r} is being driven: its totals are forgotten when its drive ends, "
                "and forgetting them now would lose its usage and budget"
            )
        self._check_open()
        return await self._totals(run_id, forget=forget)

    async def _totals(self, run_id: str, *, forget: bool) -> UsageTotals:
        reply, pending = reply_pair("usage totals")
        await self._metrics.send(MetricsQuery(run_id=run_id, forget=forget, reply_to=reply))
        totals: UsageTotals = await pending.receive()
        return totals

    async def run(
        self,
        spec_id: str = "SPEC-DEMO",
        *,
        goal: str = "",
        run_id: str | None = None,
        pipeline: Pipeline | None = None,
        budget: BudgetLike | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> RunResult:
        """Run every stage of the pipeline; halt on conflict or no consensus.

        ``budget`` (USD) stops dispatching once the run's priced spend
        reaches it: the run halts with ``budget_exceeded`` (see ``_budget``).
        ``options`` (JSON-ready) are stored with the run's branch, with the
        budget, for a later resume to act alike (the CLI keeps its
        simulator settings there).

        Cancellation: leaves the store consistent (every write is one
        transaction; decisions are written only after their outputs) and,
        if the store writer is still alive, marks the run interrupted.

        The run is claimed while it runs (as by :meth:`resume` and
        :meth:`rerun`): :class:`~store.RunLocked` if another orchestrator,
        in this process or another, is driving ``run_id``.
        """
        for problem in (
            id_problem(spec_id, "a spec id", spaces=True),
            None if run_id is None else id_problem(run_id, "a run id", spaces=False),
            None if isinstance(goal, str) else f"goal must be a string, got {goal!r}",
            None if not isinstance(goal, str) or storable_text(goal) == goal
            else "goal is not valid Unicode (it has a lone surrogate; was it decoded with the wrong encoding?)",
        ):
            if problem is not None:
                raise ConfigError(problem)
        _check_options(options)
        if pipeline is not None and not isinstance(pipeline, Pipeline):
            raise ConfigError(f"pipeline must be a Pipeline (see parse_pipeline, pipeline_from_dict), got {pipeline!r}")
        pipeline = pipeline or self.pipeline
        self._check_providers(pipeline)
        budget_usd = _budget_of(budget)
        run_id = run_id or new_run_id(spec_id)
        with self._claim(run_id):
            branch_id = new_branch_id(spec_id)
            try:
                ack = await self._write(
                    PersistRun(
                        run_id=run_id,
                        branch_id=branch_id,
                        spec_id=spec_id,
                        goal=goal,
                        seed=self.seed,
                        pipeline=pipeline.canonical_json(),
                        options=options_json(_with_budget(options, budget_usd)),
                    )
                )
            except BaseException:
                # Cancelled while the writer committed the run (it is
                # shielded): the run is there, running, and nobody drives it.
                await self._mark_interrupted(run_id)
                raise
            if not ack.ok:
                if ack.duplicate:
                    raise RunExists(f"run {run_id!r} already exists in the store")
                raise ConclaveError(f"could not record run {run_id!r}: {ack.error}")
            ctx = RunContext(run_id=run_id, branch_id=branch_id, spec_id=spec_id, goal=goal)
            return await self._drive(ctx, pipeline, self.seed, None, budget_usd)

    async def resume(self, run_id: str, *, budget: BudgetLike | None = None, retry_failed: bool = False) -> RunResult:
        """Continue ``run_id``'s current branch after a crash or halt, with
        the run's stored pipeline, seed, spec and goal: decided stages are
        not decided again and durable agent outputs are not bought again
        (see ``actors._resume``).  The provider should be the one the run
        used (the CLI rebuilds it from the branch's stored options).
        ``budget`` replaces the run's budget (e.g. to finish a run halted
        with ``budget_exceeded``); by default the run keeps its own.
        ``retry_failed``: a run that halted for want of answers (agents
        failed on a provider outage, rate limits or timeouts after their
        retries: halt reason ``agents_failed``) gives those agents a new
        round of attempts; without it - or for a run that halted otherwise -
        a halted stage stays as it was, as a plain resume after a budget halt.
        Raises :class:`~store.RunLocked`, having written nothing, while
        another orchestrator drives the run.

        Also raises, before writing anything, :class:`ResumeError` for an
        unknown run or branch and :class:`ConfigError` for bad arguments, a
        provider the pipeline names but the orchestrator lacks, a seed
        other than the run's (when anything is left to decide) or an
        orchestrator without a store.
        Cancellation: as :meth:`run` - the store stays consistent and the
        run is marked interrupted (resume continues it) - except for a
        branch that has nothing left to decide (completed, or halted with
        nothing new granted), whose replay writes nothing and leaves its
        stored status as it was."""
        _check_names(run_id=run_id)
        budget_usd = _budget_of(budget)
        if not isinstance(retry_failed, bool):
            raise ConfigError(f"retry_failed must be True or False, got {retry_failed!r}")
        with self._claim(run_id):
            state = load_state(self._require_db(), run_id)
            ended = state.settled()
            if not ended:  # a settled branch only replays its outcome: no answer is drawn
                self._check_seed(run_id, state.seed)
            self._check_providers(state.pipeline)
            if self._fault_interceptors:
                # A count budget is the run's, not the process's: what fired
                # before the crash stays spent.
                fired = fired_faults(self._require_db(), state)
                pipeline = state.pipeline
                for interceptor in self._fault_interceptors:
                    # One scoped to a provider spent only that provider's,
                    # over that provider's seats.
                    scope = interceptor.plan.provider
                    mine = [(s, a, n, k) for s, a, n, k, p in fired if scope is None or p == scope]
                    stages = [
                        (
                            stage.name,
                            stage.agents if scope is None else
                            scoped_panel(stage.agents, pipeline.seat_providers(stage.name), scope),
                        )
                        for stage in pipeline.stages
                    ]
                    interceptor.restore(run_id, state.branch.branch_id, stages=stages, fired=mine)
            # Nothing left to decide: the resume replays the outcome and
            # writes nothing (it rewrote the metrics event with 0 calls, and
            # a Ctrl-C during the replay marked a completed run interrupted).
            # So does one halted in a way only a new grant can change: a
            # spent budget resumed without a new one, agents_failed without
            # --retry-failed.  They would halt the same way again, and each
            # plain resume wrote a second set of budget warnings, a metrics
            # event and a halt for nothing.
            halted = state.branch.halt_reason if state.branch.status == "halted" else None
            kept_budget = stored_budget(self._require_db(), state.branch)
            settled = ended or (
                # (The budget it halted on, given again, is no new grant.)
                (halted == "budget_exceeded" and budget_usd in (None, kept_budget))
                or (halted == UNANSWERED and not retry_failed)
            )
            if settled and halted == UNANSWERED:
                state = attrs.evolve(state, replay_failures=True)
            if not settled:
                detail: dict[str, Any] = {"decided": sorted(state.decisions), "durable_attempts": len(state.outputs)}
                fresh = state.unanswered_stage() if retry_failed else None
                if fresh is not None:
                    # Its failed agents get a new round of attempts: kept here,
                    # so a crash during this resume does not lose the grant.
                    detail["new_round"] = fresh
                    state = state.with_new_round(fresh)
                if budget_usd is not None:
                    # Kept with the branch: the next plain resume (after this
                    # one halts or is interrupted) must not fall back to the
                    # budget this one replaced.
                    detail["budget_usd"] = str(budget_usd)
                try:
                    await self._write(
                        PersistEvent(run_id=run_id, branch_id=state.branch.branch_id, kind="resume", detail=detail)
                    )
                    if halted == BUDGET_HALT:
                        # Where the run stopped for want of budget, it goes on
                        # as if it never had.  (Not after agents_failed: the
                        # new round must not meet the gate that failed them.)
                        self._take_up_health(run_id, state.branch, stage=None)
                    await self._write(RunUpdate(run_id=run_id, status="running"))
                except BaseException:
                    # Cancelled once it may be marked running: nobody drives it now.
                    await self._mark_interrupted(run_id)
                    raise
            if budget_usd is None:
                budget_usd = kept_budget
            return await self._drive(
                self._context(state), state.pipeline, state.seed, state, budget_usd, record=not settled
            )

    async def rerun(
        self,
        run_id: str,
        from_stage: str,
        *,
        branch_id: str | None = None,
        options: Mapping[str, Any] | None = None,
        budget: BudgetLike | None = None,
    ) -> RunResult:
        """Fork a child of ``branch_id`` (default: the current branch) at
        ``from_stage`` and run it: it inherits the parent's decisions before
        that stage and nothing of the parent from it on.  The child becomes
        the run's current branch.  ``options`` default to the parent's, and
        so does the budget unless ``budget`` is given.  Raises
        :class:`~store.RunLocked`, having written nothing, while another
        orchestrator drives the run.

        Also raises, before writing anything, :class:`ResumeError` for an
        unknown run, branch or stage (or one whose predecessors have not
        advanced) and :class:`ConfigError` as :meth:`resume` does.
        Cancellation: as :meth:`run`; a child branch already written stays
        the run's current branch, marked interrupted, and :meth:`resume`
        continues it."""
        _check_names(run_id=run_id, from_stage=from_stage, **({} if branch_id is None else {"branch_id": branch_id}))
        _check_options(options)
        budget_usd = _budget_of(budget)
        with self._claim(run_id):
            parent = load_state(self._require_db(), run_id, branch_id)
            self._check_seed(run_id, parent.seed)
            self._check_providers(parent.pipeline)
            stage = fork_stage(parent, from_stage)
            child = new_branch_id(parent.run.spec_id)
            if budget_usd is None:
                budget_usd = stored_budget(self._require_db(), parent.branch)  # kept, whether options are given or not
            if options is None:
                options = {k: v for k, v in parent.branch.options.items() if k != "budget_usd"}
            try:
                ack = await self._write(
                    PersistBranch(
                        run_id=run_id,
                        branch_id=child,
                        parent_branch_id=parent.branch.branch_id,
                        fork_stage=stage.name,
                        options=options_json(_with_budget(options, budget_usd)),
                    )
                )
                if not ack.ok:
                    raise ConclaveError(f"could not create a branch of run {run_id!r}: {ack.error}")
                await self._write(
                    PersistEvent(
                        run_id=run_id,
                        branch_id=child,
                        kind="rerun",
                        stage=stage.name,
                        detail={"parent_branch_id": parent.branch.branch_id},
                    )
                )
            except BaseException:
                # The new branch may be written, current and running: nobody drives it now.
                await self._mark_interrupted(run_id)
                raise
            self._take_up_health(run_id, parent.branch, stage=stage.name)
            state = load_state(self._require_db(), run_id, child)
            return await self._drive(
                self._context(state), state.pipeline, state.seed, state, stored_budget(self._require_db(), state.branch)
            )

    @contextmanager
    def _claim(self, run_id: str) -> Iterator[None]:
        """Hold ``run_id`` for the block (a run, resume or rerun of it).
        Raises ActorStopped at its end if the orchestrator's block ended
        meanwhile (see :meth:`_stop_drives`)."""
        # Taken before the first write and held to the last: a second
        # orchestrator on the run would buy every missing output again.
        self._check_open()
        scope = trio.CancelScope()
        self._drives.add(scope)
        try:
            with nullcontext() if self._db is None else self._db.claim_run(run_id), scope:
                yield
        finally:
            self._drives.discard(scope)
            if not self._drives:
                self._drives_done.set()
        if scope.cancelled_caught:  # only _stop_drives cancels it
            # Said as the store has it: a replay marks nothing, an end
            # written before the ack came back stands, a mark may time out.
            row = self._db.get_run(run_id) if self._db is not None else None
            if row is None:
                where = "before it was recorded"
            elif row.status == "interrupted":
                where = "(it is marked interrupted: resume continues it)"
            elif row.status == "running":
                where = "(it could not be marked interrupted; resume continues it)"
            else:
                where = f"(it is stored as {row.status})"
            raise ActorStopped(
                f"run {run_id!r} was stopped: the 'async with open_orchestrator(...)' block it ran under ended {where}"
            )

    def _check_open(self) -> None:
        # Its actors have stopped and its store may be closed: say so,
        # rather than fail on whichever of them is asked first.
        if self._closed:
            raise ActorStopped(
                "this orchestrator is closed: its 'async with open_orchestrator(...)' block has ended"
            )
        if self._token is not None:
            try:
                here = trio.lowlevel.current_trio_token()
            except RuntimeError:
                here = None
            if here is not self._token:
                # Its actors are tasks of that run: used from another, trio
                # failed an internal assertion and the owner's block hung.
                raise ConfigError(
                    "this orchestrator belongs to the trio run that opened it; "
                    "use it from that run (open one per trio.run)"
                )

    def _health_snapshot(self) -> dict[str, Any] | None:
        """The gates and breakers now, for a resume or a rerun to take up
        (see :meth:`_take_up_health`); None when they are not this run's
        alone (the orchestrator drives others too) or cannot be taken up."""
        if self.health is None or self._driven.total() != 1:
            return None
        return self.health.snapshot(trio.current_time())

    def _take_up_health(self, run_id: str, branch: BranchRow, *, stage: str | None) -> None:
        """Restore the gates and breakers as they stood when ``branch``
        halted (``stage`` None), or when ``stage`` started on the branch of
        its lineage that ran it (a rerun forking there), if that was recorded.  Only on a virtual clock
        (on the real one time has passed since: a provider's reset or a
        breaker's cooldown from then means nothing now) and only into gates
        and breakers this orchestrator has not used: the run then goes on
        exactly as its uninterrupted self would (a breaker open at a budget
        halt is still open for the resume)."""
        if self.health is None or not self.health.fresh:
            return
        if not isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
            return
        store = self._require_db()
        # For a stage, only the branch that ran it (if it never started
        # the stage, nothing is taken up).
        owner = branch.branch_id if stage is None else store.stage_owner(run_id, branch.branch_id, stage)
        if owner is None:
            return
        kind = "halt" if stage is None else "stage_start"
        mine = [
            e
            for e in store.iter_events(run_id, branch_id=owner, kinds=(kind,))
            if stage is None or e.stage == stage
        ]
        if mine:
            # A halt: the last one; a stage: its first start (a resumed
            # stage starts again, later).
            taken = mine[-1 if stage is None else 0].detail.get("health")
            if isinstance(taken, dict):
                self.health.restore(taken, trio.current_time())

    async def _log_halt(self, ctx: RunContext, stage: str, detail: dict[str, Any]) -> None:
        health = self._health_snapshot()
        if health is not None:
            detail = {**detail, "health": health}
        await self._store.send(
            PersistEvent(run_id=ctx.run_id, branch_id=ctx.branch_id, kind="halt", stage=stage, detail=detail)
        )

    def _durable_outputs(self, key: StageKey) -> dict[str, AgentOutput]:
        return stage_outputs(self._require_db(), key)

    def _require_db(self) -> Store:
        if self._db is None:
            raise ConfigError("resume and rerun need the orchestrator's store")
        return self._db

    @staticmethod
    def _context(state: ResumeState) -> RunContext:
        return RunContext(
            run_id=state.run.run_id,
            branch_id=state.branch.branch_id,
            spec_id=state.run.spec_id,
            goal=state.run.goal,
        )

    async def _drive(
        self,
        ctx: RunContext,
        pipeline: Pipeline,
        seed: int,
        state: ResumeState | None,
        budget_usd: Decimal | None,
        *,
        record: bool = True,
    ) -> RunResult:
        """Run ``pipeline``'s stages (see :meth:`_run_stages`).  ``record``
        False: a replay of a settled branch, which writes nothing."""
        self._driven[ctx.run_id] += 1
        try:
            if budget_usd is not None:
                await self._metrics.send(SetBudget(run_id=ctx.run_id, budget_usd=budget_usd))
            self._publish(
                RunStarted(run_id=ctx.run_id, branch_id=ctx.branch_id, spec_id=ctx.spec_id, stages=pipeline.stage_names)
            )
            return await self._run_stages(ctx, pipeline, budget_usd, seed=seed, state=state, record=record)
        except BaseException:
            if record:
                await self._mark_interrupted(ctx.run_id)
            await self._forget_metrics(ctx.run_id)
            raise
        finally:
            self._driven[ctx.run_id] -= 1
            if not self._driven[ctx.run_id]:
                del self._driven[ctx.run_id]
            for interceptor in self._fault_interceptors:
                interceptor.run_ended(ctx.run_id, ctx.branch_id)

    async def _stop_drives(self) -> None:
        """The block is ending while runs started outside it are still
        being driven: stop them, and wait (shielded, bounded) until each has
        marked itself interrupted - with the store writer still there to
        write it.  They failed on whichever actor stopped first ("the
        metrics actor has stopped"), and stayed stored as running."""
        if not self._drives:
            return
        self._drives_done = trio.Event()
        for scope in list(self._drives):
            scope.cancel()
        with trio.move_on_after(_DRIVES_STOP_SECONDS) as waiting:
            waiting.shield = True
            await self._drives_done.wait()

    async def _forget_metrics(self, run_id: str) -> None:
        """Drop the accumulator's state of a drive that failed or was
        cancelled, as one that ends drops it (:meth:`totals`), shielded and
        bounded.  Kept, it outlived the drive: a resume by this orchestrator
        counted each replayed answer as a duplicate and a new turn.  (The
        drive's agents have stopped: nothing of it reaches the accumulator
        after this.)"""
        with trio.move_on_after(1.0) as cleanup:
            cleanup.shield = True
            try:
                await self._metrics.send(MetricsQuery(run_id=run_id, forget=True))
            except (ActorStopped, trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    async def _mark_interrupted(self, run_id: str) -> None:
        """Mark ``run_id`` interrupted if it is still running (the store
        leaves a run's written end as it is), shielded and bounded: the
        caller is being cancelled or failing."""
        with trio.move_on_after(1.0) as cleanup:
            cleanup.shield = True
            try:
                await self._write(RunUpdate(run_id=run_id, status="interrupted"))
            except ActorStopped:
                pass

    async def _run_stages(
        self,
        ctx: RunContext,
        pipeline: Pipeline,
        budget_usd: Decimal | None = None,
        *,
        seed: int | None = None,
        state: ResumeState | None = None,
        record: bool = True,
    ) -> RunResult:
        seed = self.seed if seed is None else seed
        # Unbounded: see the module docstring (a duplicating agent-edge
        # interceptor deadlocked a bounded one at three copies).
        replies_to, replies = open_channel(
            math.inf, name="coordinator", interceptors=self._interceptors.get("coordinator", ()), awaited=True
        )
        agent_inboxes: dict[str, Outbox[AgentRequest]] = {}
        decisions: list[Decision] = []
        halted: Decision | None = None
        over_budget: BudgetExceeded | None = None
        unanswered: StageUnanswered | None = None
        with collapse_single():
            async with trio.open_nursery() as nursery:
                try:
                    for name, spec in pipeline.agents.items():
                        inbox, receive = open_channel(
                            1, name=f"agent {name}", interceptors=self._interceptors.get("agent", ()), awaited=True
                        )
                        agent_inboxes[name] = inbox
                        agent = Agent(
                            spec=spec,
                            pipeline=pipeline,
                            gateway=self._gateway,
                            metrics=self._metrics,
                            store=self._store,
                            retry=self.retry,
                            seed=seed,
                            publish=self._publish,
                            durable_failures=spec.provider in self.billed,
                        )
                        nursery.start_soon(agent.run, receive)
                    coordinator = Coordinator(
                        ctx=ctx,
                        agents=agent_inboxes,
                        replies_to=replies_to,
                        replies=replies,
                        store=self._store,
                        sequencer=DecisionSequencer() if state is None else state.sequencer(),
                        publish=self._publish,
                        gate=None if budget_usd is None else budget_gate(self._metrics),
                        durable_outputs=self._durable_outputs,
                        record=record,
                        health=self._health_snapshot,
                    )
                    if state is not None:
                        # Durable attempts count once, as replays, never as turns.
                        for usage in state.usage_replays():
                            await self._metrics.send(usage)
                    for stage in pipeline.stages:
                        prior = state.decided(stage.name) if state is not None else None
                        if prior is not None:  # durable (or inherited): never decided again
                            decisions.append(prior)
                            self._publish(StageDecided(decision=prior))
                            if prior.status not in ADVANCING:
                                halted = prior
                                break
                            continue
                        resume = state.stage_resume(stage, self.retry) if state is not None else None
                        try:
                            decision, _ = await coordinator.run_stage(stage, resume)
                        except BudgetExceeded as exc:
                            over_budget = exc  # the stage stays undecided
                            break
                        except StageUnanswered as exc:
                            unanswered = exc  # undecided too: a resume asks the failed agents again
                            break
                        decisions.append(decision)
                        if decision.status not in ADVANCING:
                            halted = decision
                            break
                finally:
                    for inbox in agent_inboxes.values():
                        inbox.close()  # agents finish their current request, then stop
                    replies.close()  # late replies now fail fast instead of waiting

        totals = await self._totals(ctx.run_id, forget=True)
        digest = compute_digest(
            (d.verdict for d in decisions), totals.usage, totals.unknown_calls, totals.by_stage
        )
        status = "completed" if halted is None and over_budget is None and unanswered is None else "halted"
        halt_reason: str | None = None if halted is None else halted.status
        message = None if halted is None else halt_message(ctx.run_id, halted)
        if record:
            await self._persist_metrics(ctx, totals)
        # A replay (record False) halts as its branch did, writing nothing.
        if unanswered is not None:
            halt_reason = UNANSWERED
            message = (
                f"halted at stage {unanswered.stage!r}: too few answers to decide: {unanswered}. "
                "The stage is left undecided; once the cause has passed, "
                f"'conclave resume {shell_word(ctx.run_id)} --retry-failed' asks the failed agents again."
            )
            if record:
                await self._log_halt(ctx, unanswered.stage, {"reason": UNANSWERED, "failed": unanswered.failures})
        if over_budget is not None:
            halt_reason = BUDGET_HALT
            message = budget_halt_message(ctx.run_id, over_budget)
            if record:
                await self._log_halt(ctx, over_budget.stage, {
                    "reason": BUDGET_HALT,
                    "spent_usd": str(over_budget.status.spent_usd),
                    "budget_usd": str(over_budget.status.budget_usd),
                })
        if record:
            if halted is not None:
                await self._log_halt(ctx, halted.key.stage, {"reason": halted.status})
            ack = await self._write(
                RunUpdate(
                    run_id=ctx.run_id,
                    status=status,
                    halt_reason=halt_reason,
                    usage=totals.usage,
                    digest=digest,
                )
            )
            if not ack.ok:
                raise ConclaveError(f"could not record the end of run {ctx.run_id!r}: {ack.error}")
        self._publish(RunFinished(run_id=ctx.run_id, status=status, halt_reason=halt_reason))
        return RunResult(
            run_id=ctx.run_id,
            branch_id=ctx.branch_id,
            spec_id=ctx.spec_id,
            status=status,
            halt_reason=halt_reason,
            halt_message=message,
            stages=tuple(
                StageResult(
                    stage=d.key.stage,
                    status=d.status,
                    seq=d.seq,
                    agents=tuple(d.verdict["present_agents"]),
                    missing_agents=tuple(d.verdict["missing_agents"]),
                    verdict=d.verdict,
                )
                for d in decisions
            ),
            usage=totals.usage,
            unknown_usage_calls=totals.unknown_calls,
            turns=totals.turns,
            replays=totals.replays,
            digest=digest,
            cost_usd=totals.cost_usd,
            unpriced_calls=totals.unpriced_calls,
            budget_usd=totals.budget_usd,
            budget_alerts=totals.alerts,
        )

    async def _persist_metrics(self, ctx: RunContext, totals: UsageTotals) -> None:
        """The run's cost and per-stage/agent/model breakdown, as one
        ``metrics`` event (read back by ``conclave metrics``), and one
        ``budget_warning`` event per threshold crossed."""
        for threshold in totals.alerts:
            await self._store.send(
                PersistEvent(
                    run_id=ctx.run_id,
                    branch_id=ctx.branch_id,
                    kind="budget_warning",
                    detail={"threshold": threshold, "budget_usd": str(totals.budget_usd)},
                )
            )
        await self._store.send(
            PersistEvent(
                run_id=ctx.run_id, branch_id=ctx.branch_id, kind="metrics", detail=totals_json(totals)
            )
        )


def fault_scope_problem(plan: FaultPlan, providers: Iterable[str], whom: str) -> str | None:
    """Why ``plan`` cannot serve ``whom``, which calls ``providers``: it is
    scoped to another provider, so its faults could never fire and a run
    would pass as if it had survived them.  ``None`` if it can."""
    names = sorted(providers)
    if not plan.enabled or plan.provider is None or plan.provider in names:
        return None
    return (
        f"faults are scoped to provider {plan.provider!r}, which {whom} does not call "
        f"(its providers: {', '.join(names)})"
    )


def fault_edge_problem(interceptor: object, edge: str) -> str | None:
    """Why ``interceptor`` cannot go on ``edge``: a :class:`FaultInterceptor`
    fails provider calls, which only the gateway edge carries; elsewhere its
    faults could never fire and a run would pass as if it had survived
    them.  ``None`` if it can."""
    if edge == "gateway" or not isinstance(interceptor, FaultInterceptor):
        return None
    return (
        f"interceptors[{edge!r}] holds a FaultInterceptor: faults are injected only on the 'gateway' "
        "channel (give it as faults= or in interceptors['gateway']); on "
        f"{edge!r} its faults could never fire"
    )


def _check_names(**names: object) -> None:
    """Names that look a run up: strings, or a ConfigError naming them (not
    an AttributeError from the run lock)."""
    for what, value in names.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{what} must be a non-empty string, got {value!r}")


def _check_options(options: Mapping[str, Any] | None) -> None:
    """Options are stored as JSON with the branch, beside the budget."""
    if options is None:
        return
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise ConfigError(f"options must be a mapping with string keys, got {options!r}")
    if "budget_usd" in options:
        # The budget's own key: a resume would take this value for the
        # budget (or fail on it) while the run itself had none.
        raise ConfigError("options may not hold 'budget_usd': pass budget= instead")
    try:
        json.dumps(dict(options), allow_nan=False)  # NaN and Infinity are not JSON
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"options must be JSON-ready: {exc}") from None


# How long closing the providers may take when the orchestrator closes.
PROVIDER_CLOSE_SECONDS = 5.0
# How long runs still driven when the block ends may take to stop (each
# marks itself interrupted: one write, itself bounded by a second).
_DRIVES_STOP_SECONDS = 5.0


def _budget_of(budget: BudgetLike | None) -> Decimal | None:
    """A ConfigError, as for every other bad argument (it was a bare ValueError)."""
    try:
        return parse_budget(budget)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _with_budget(options: Mapping[str, Any] | None, budget_usd: Decimal | None) -> dict[str, Any]:
    merged = dict(options or {})
    if budget_usd is not None:
        merged["budget_usd"] = str(budget_usd)
    return merged


async def _shielded(fn: Callable[[Any], Awaitable[None]], arg: Any) -> None:
    with trio.CancelScope(shield=True):
        await fn(arg)


def missing_providers(pipeline: Pipeline, names: Iterable[str], hint: str) -> str | None:
    """What is wrong when ``pipeline`` names providers outside ``names``
    (every call of such an agent would fail), or None."""
    have = set(names)
    missing = sorted({spec.provider for spec in pipeline.agents.values()} - have)
    if not missing:
        return None
    return f"no provider configured for: {', '.join(missing)} (this orchestrator has: {', '.join(sorted(have))}; {hint})"


@asynccontextmanager
async def open_orchestrator(
    *,
    store: str | os.PathLike[str] | Store = "conclave.db",
    provider: BaseProvider | Mapping[str, BaseProvider] | None = None,
    pipeline: Pipeline | None = None,
    seed: int = 0,
    faults: FaultPlan | str | Interceptor[Any] | None = None,
    interceptors: Mapping[str, Sequence[Interceptor[Any]]] | None = None,
    retry: RetryPolicy | None = None,
    limits: Limits | None = None,
    prices: PriceTable | None = None,
    breaker: BreakerPolicy | None = None,
    health: HealthRegistry | None = None,
    auth: AuthService | None = None,
) -> AsyncIterator[Orchestrator]:
    """Start the gateway, metrics accumulator and store writer, yield an
    :class:`Orchestrator`, and shut them down when the block exits.

    ``store`` is a path (opened, migrated, and closed on exit) or an open
    :class:`~store.Store` (left open).  ``provider`` defaults to the
    embedded :class:`SimulatedProvider` seeded with ``seed``; one provider
    serves every agent of ``pipeline``, whatever providers it names (a
    run or resume of another pipeline that names others is a ConfigError
    naming them: give that pipeline here); a mapping routes agents by
    their pipeline ``provider`` name (even a mapping of one: a name it
    lacks is a ConfigError).  Bound to the trio run that
    opens it: use it from that run only.  ``faults`` is a
    :class:`~messages.FaultPlan` or a spec as ``CODEX_FAULTS`` takes it
    (``"disconnect:3"``; wrapped in a
    :class:`~messages.FaultInterceptor`, seeded with ``seed`` unless the plan
    has its own) or any interceptor; a fault interceptor is attached to the
    gateway's provider health (``health``, or a fresh
    :class:`HealthRegistry` with ``breaker`` as its policy and
    ``retry.max_wait`` as its gates' longest wait; a registry given carries
    its own of both, so ``breaker`` with it is a ConfigError) and to the
    event log.  It is installed on the gateway's inbox, after any in
    ``interceptors["gateway"]``.  ``prices`` is the price table (default:
    the vendored LiteLLM one; :meth:`PriceTable.load` adds an override file).
    ``auth`` is an :class:`AuthService` whose token sources the providers
    were built with: its auth actor runs here, beside the gateway, and
    answers their ``GetToken`` requests.

    On normal exit the actors drain their inboxes (every queued write is
    committed) before the block returns; runs still driven then (started
    from tasks outside the block) are stopped first, marked interrupted,
    and raise :class:`~messages.ActorStopped`; on cancellation or error they are
    cancelled, and the store is left consistent.  Raises
    :class:`ConfigError` before starting anything if the configuration is
    invalid.
    """
    problem = seed_problem(seed)
    if problem is not None:
        raise ConfigError(problem)  # before anything starts, not in the store writer
    # A wrong kind of object fails here, naming the argument - not as an
    # AttributeError in an actor half way through a run (the auth actor's
    # even before the inboxes could be closed: the block never returned).
    for name, value, kinds in (
        ("store", store, (str, os.PathLike, Store)),
        ("pipeline", pipeline, (Pipeline, type(None))),
        ("retry", retry, (RetryPolicy, type(None))),
        ("limits", limits, (Limits, type(None))),
        ("prices", prices, (PriceTable, type(None))),
        ("breaker", breaker, (BreakerPolicy, type(None))),
        ("health", health, (HealthRegistry, type(None))),
        ("auth", auth, (AuthService, type(None))),
    ):
        if not isinstance(value, kinds):
            wanted = " or ".join(k.__name__ for k in kinds if k is not type(None))
            raise ConfigError(f"{name}: expected {wanted}, got {value!r}")
    if health is not None and breaker is not None:
        # The registry's own policy applied, and the one given was dropped
        # without a word.
        raise ConfigError(
            "give breaker= or health=, not both: a HealthRegistry carries its own BreakerPolicy "
            "(HealthRegistry(breaker))"
        )
    if isinstance(store, Store) and (store.closed or not store.writable):
        # Else the store writer fails on its first write, and every run
        # with "no reply to PersistRun".
        state = "closed" if store.closed else "read-only"
        raise ConfigError(f"store {store.path!r} is {state}: the orchestrator writes to it")
    if provider is not None and not isinstance(provider, BaseProvider):
        if not isinstance(provider, Mapping) or not all(
            isinstance(k, str) and isinstance(v, BaseProvider) for k, v in provider.items()
        ):
            raise ConfigError(
                f"provider must be a BaseProvider or a mapping of provider name to BaseProvider, got {provider!r}"
            )
    pipeline = pipeline or default_pipeline()
    limits = limits or Limits()
    retry = retry or RetryPolicy()
    if interceptors is not None and not isinstance(interceptors, Mapping):
        raise ConfigError(
            f"interceptors must map a channel ({', '.join(sorted(EDGES))}) to a list of Interceptors, "
            f"got {interceptors!r}"
        )
    interceptors = dict(interceptors or {})
    unknown_edges = set(interceptors) - EDGES
    if unknown_edges:
        raise ConfigError(
            f"unknown channel(s) for interceptors: {', '.join(sorted(unknown_edges))}; "
            f"known: {', '.join(sorted(EDGES))}"
        )
    for edge, chain in interceptors.items():
        if isinstance(chain, (str, bytes, Interceptor)) or not isinstance(chain, Sequence):
            raise ConfigError(f"interceptors[{edge!r}] must be a list of Interceptors, got {chain!r}")
        for interceptor in chain:
            if not isinstance(interceptor, Interceptor):
                raise ConfigError(f"interceptors[{edge!r}] holds {interceptor!r}, which is not an Interceptor")
            problem = fault_edge_problem(interceptor, edge)
            if problem is not None:
                raise ConfigError(problem)
    health = health if health is not None else HealthRegistry(breaker, max_wait=retry.max_wait)
    if isinstance(faults, str):
        faults = FaultPlan.parse(faults)  # a FaultPlanError names a bad entry
    if isinstance(faults, FaultPlan):
        faults = FaultInterceptor(faults, seed=seed) if faults.enabled else None
    elif faults is not None and not isinstance(faults, Interceptor):
        raise ConfigError(
            f"faults must be a FaultPlan, a spec such as 'disconnect:3' or an Interceptor, got {faults!r}"
        )
    if faults is not None:
        interceptors["gateway"] = [*interceptors.get("gateway", ()), faults]
    if provider is None or isinstance(provider, BaseProvider):
        # One provider serves every agent, whatever the pipeline calls it.
        only = provider if provider is not None else SimulatedProvider(seed=seed)
        providers: dict[str, BaseProvider] = {spec.provider: only for spec in pipeline.agents.values()}
        providers[only.name] = only
    else:
        # A mapping routes by name, even with one entry: it used to serve
        # an agent the pipeline puts on another provider without a word.
        providers = dict(provider)
    problem = missing_providers(pipeline, providers, "give provider a mapping that names them")
    if problem is not None:
        raise ConfigError(problem)
    seen: set[int] = set()
    for interceptor in interceptors.get("gateway", ()):
        if isinstance(interceptor, FaultInterceptor) and id(interceptor) in seen:
            # attach() refused the second with a RuntimeError, after the
            # database file was created.
            raise ConfigError(
                "the same FaultInterceptor is given twice (as faults= and in interceptors['gateway'], "
                "or twice in that list); give it once"
            )
        seen.add(id(interceptor))
        if isinstance(interceptor, FaultInterceptor) and interceptor.attached:
            # Sharing it would share its gate, breaker and event log too.
            raise ConfigError(
                "this FaultInterceptor is installed in another orchestrator that is still open; "
                "give each orchestrator its own (or pass the FaultPlan)"
            )
        if isinstance(interceptor, FaultInterceptor):
            problem = fault_scope_problem(interceptor.plan, providers, "this orchestrator")
            if problem is not None:
                raise ConfigError(problem)

    own_store = not isinstance(store, Store)
    db = Store.open(os.fspath(store)) if not isinstance(store, Store) else store
    hub = MetricsHub()
    writer = StoreWriter(db, hold=limits.store_hold)
    store_tx, store_rx = open_channel(
        limits.store_buffer, name="store", interceptors=interceptors.get("store", ())
    )
    # The gateway logs the calls it drops unmade (gateway -> store: the
    # writer never sends to the gateway, so this edge closes no cycle), on
    # a clone it closes when it stops: the writer outlives its last drop.
    gateway = Gateway(
        providers, max_concurrency=limits.max_concurrency, health=health, events=store_tx.clone()
    )
    # Providers whose calls may cost money: logged durably before each call.
    billed = frozenset(name for name, p in providers.items() if p.bills)
    # Last on the gateway edge: every call that reaches the gateway is
    # logged as an agent_call event (after faults: an injected fault is not
    # a provider call).
    gateway_tx, gateway_rx = open_channel(
        limits.gateway_buffer,
        name="gateway",
        interceptors=[
            *interceptors.get("gateway", ()),
            CallLog(store_tx, billed=billed),
        ],
    )
    metrics_tx, metrics_rx = open_channel(
        limits.metrics_buffer, name="metrics", interceptors=interceptors.get("metrics", ())
    )
    attached = [i for i in interceptors.get("gateway", ()) if isinstance(i, FaultInterceptor)]
    failing = False
    try:
        for interceptor in attached:
            interceptor.attach(seed=seed, health=health, events=store_tx, queued=True, publish=gateway.relay)
        with collapse_single():
            async with trio.open_nursery() as nursery:
                orchestrator: Orchestrator | None = None
                # From the first task started, every exit closes the inboxes:
                # the shielded writer waits on its inbox alone, and a failure
                # between starting it and the yield left it waiting for ever.
                try:
                    orchestrator = Orchestrator(
                        gateway=gateway_tx,
                        metrics=metrics_tx,
                        store=store_tx,
                        pipeline=pipeline,
                        seed=seed,
                        retry=retry,
                        interceptors=interceptors,
                        limits=limits,
                        metrics_hub=hub,
                        db=db,
                    )
                    gateway.publish = orchestrator._publish
                    metrics = MetricsAccumulator(
                        prices,
                        publish=hub.publish,
                        alert=orchestrator._publish,
                        interval=limits.metrics_interval,
                        listening=hub.listening,
                    )
                    nursery.start_soon(gateway.run, gateway_rx)
                    nursery.start_soon(metrics.run, metrics_rx)
                    # Shielded: the writer stops when its inbox closes, after
                    # committing what is queued, so even a cancelled orchestrator
                    # records its runs as interrupted.  It never waits on anyone
                    # but its inbox (and a bounded busy-retry loop).
                    nursery.start_soon(_shielded, writer.run, store_rx)
                    if auth is not None:
                        nursery.start_soon(auth.run)
                    orchestrator.health = health
                    orchestrator.provider_names = frozenset(providers)
                    orchestrator.billed = billed
                    orchestrator.faults = faults if isinstance(faults, FaultInterceptor) else None
                    orchestrator._fault_interceptors = tuple(attached)
                    orchestrator.seed_draws = provider is None or any(f.follows_attached_seed for f in attached)
                    orchestrator._token = trio.lowlevel.current_trio_token()
                    yield orchestrator
                finally:
                    try:
                        if orchestrator is not None:
                            orchestrator._closed = True  # no run starts now
                            await orchestrator._stop_drives()
                    finally:
                        # Whatever ends the wait above (a Ctrl-C reaches it
                        # even shielded): skipped, the shielded writer waited
                        # on its inbox for ever.
                        # Closing the inboxes lets each actor drain what is queued
                        # and stop; on cancellation the nursery cancels them anyway.
                        gateway_tx.close()
                        metrics_tx.close()
                        store_tx.close()
                        writer.close_soon()
                        if auth is not None:
                            auth.close()
                        if orchestrator is not None:
                            orchestrator._progress.close()
                        hub.close()
    except BaseException:
        failing = True
        raise
    finally:
        try:
            for interceptor in attached:
                interceptor.detach()
            # Shielded, so providers close even when the caller is cancelled;
            # bounded, so a provider that hangs in aclose cannot make the
            # caller's cancellation hang with it.
            with trio.move_on_after(PROVIDER_CLOSE_SECONDS) as closing:
                closing.shield = True
                try:
                    await gateway.aclose()
                except Exception:
                    # Not in place of what is already propagating (a
                    # cancellation among them: move_on_after would no
                    # longer catch its own, and Ctrl-C became a traceback).
                    if not failing:
                        raise
        finally:
            if own_store:
                db.close()


