"""The runtime: ``open_orchestrator`` wires the actors and runs pipelines.

Wiring, buffers and why nothing can deadlock
--------------------------------------------
Long-lived actors (started by ``open_orchestrator``)::

    gateway inbox   buffer limits.gateway_buffer  (interceptors: "gateway", faults)
    metrics inbox   buffer limits.metrics_buffer  (interceptors: "metrics")
    store inbox     buffer limits.store_buffer    (interceptors: "store")

Per run (started by ``Orchestrator.run``)::

    agent inbox     buffer 1 per agent            (interceptors: "agent")
    coordinator     buffer = largest panel        (interceptors: "coordinator")

Every reply to a request travels in a one-shot :class:`~messages.Reply`
slot, which holds its one value and therefore *never blocks*; the gateway,
metrics accumulator and store writer only ever block on their own inboxes.
So each request-reply cycle (agent <-> gateway, agent <-> store,
coordinator <-> store, anyone <-> metrics) has a reply edge that cannot
block, and none of these actors can wait on its callers.

The one cycle without a Reply slot is coordinator -> agent -> coordinator.
Its request edge cannot block: the coordinator gives each agent at most one
request at a time and the agent inbox holds one.  Its reply edge may block
only when the coordinator's inbox is full, and the coordinator is then
either receiving (draining it) or waiting on the store, which never waits
on agents.  Hence no load can deadlock; ``tests/test_scale.py`` runs 2,000
agents in one stage to keep that argument honest.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import attrs
import trio

from messages import (
    ActorStopped,
    AgentReply,
    AgentRequest,
    ConclaveError,
    Decision,
    FaultInterceptor,
    FaultPlan,
    Interceptor,
    MetricsQuery,
    Outbox,
    PersistEvent,
    PersistRun,
    ProgressEvent,
    RunFinished,
    RunStarted,
    RunUpdate,
    StoreAck,
    StoreWrite,
    TokenUsage,
    UsageTotals,
    open_channel,
    reply_pair,
)
from store import Store

from ._agent import Agent
from ._breaker import BreakerPolicy
from ._consensus import ADVANCING
from ._coordinator import Coordinator, RunContext
from ._digest import compute_digest
from ._gateway import Gateway
from ._health import HealthRegistry
from ._ids import new_branch_id, new_run_id
from ._metrics import MetricsAccumulator
from ._pipeline import Pipeline, default_pipeline
from ._provider import BaseProvider
from ._retry import RetryPolicy
from ._sequencer import DecisionSequencer
from ._simulator import SimulatedProvider
from ._store_writer import StoreWriter

EDGES = frozenset({"gateway", "metrics", "store", "agent", "coordinator"})


@contextmanager
def collapse_single() -> Iterator[None]:
    """Re-raise a lone exception from one of our internal nurseries as
    itself.  Those nurseries are implementation details: callers should see
    the typed error (or the KeyboardInterrupt, or trio.Cancelled), not a
    group around it.  Groups of several exceptions stay groups."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


class ConfigError(ConclaveError, ValueError):
    """The orchestrator was configured wrongly; nothing has run."""


class RunExists(ConclaveError, ValueError):
    """A run with that id is already in the store."""


@attrs.frozen(kw_only=True, slots=True)
class Limits:
    gateway_buffer: int = 256
    metrics_buffer: int = 4096
    store_buffer: int = 4096
    max_concurrency: int = 64
    progress_buffer: int = 1024


@attrs.frozen(kw_only=True, slots=True)
class StageResult:
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
            "digest": self.digest,
        }


def halt_message(run_id: str, decision: Decision) -> str:
    verdict = decision.verdict
    detail = "; ".join(verdict.get("conflicts") or ()) or (
        f"only {verdict.get('support', 0)} agent(s) agree, quorum needs "
        f"{verdict.get('quorum_required')}"
    )
    return (
        f"halted at stage {decision.key.stage!r}: {decision.status} ({detail}). "
        f"Inspect with 'conclave decisions {run_id}'; once fixed, re-run from that stage "
        f"with 'conclave rerun {run_id} --from {decision.key.stage}'."
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
    ) -> None:
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
        self._subscribers: list[trio.MemorySendChannel[ProgressEvent]] = []

    def subscribe(self, max_buffer: int | None = None) -> trio.MemoryReceiveChannel[ProgressEvent]:
        """A channel of progress events.  Best effort: when the buffer is
        full, events are dropped rather than slowing any run."""
        send, receive = trio.open_memory_channel[ProgressEvent](
            max_buffer if max_buffer is not None else self._limits.progress_buffer
        )
        self._subscribers.append(send)
        return receive

    def _publish(self, event: ProgressEvent) -> None:
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(send)

    async def _write(self, item: StoreWrite) -> StoreAck:
        reply, pending = reply_pair(type(item).__name__)
        await self._store.send(attrs.evolve(item, reply_to=reply))
        ack: StoreAck = await pending.receive()
        return ack

    async def totals(self, run_id: str, *, forget: bool = False) -> UsageTotals:
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
    ) -> RunResult:
        """Run every stage of the pipeline; halt on conflict or no consensus.

        Cancellation: leaves the store consistent (every write is one
        transaction; decisions are written only after their outputs) and,
        if the store writer is still alive, marks the run interrupted.
        """
        pipeline = pipeline or self.pipeline
        run_id = run_id or new_run_id(spec_id)
        branch_id = new_branch_id(spec_id)
        ack = await self._write(
            PersistRun(
                run_id=run_id,
                branch_id=branch_id,
                spec_id=spec_id,
                goal=goal,
                seed=self.seed,
                pipeline=pipeline.canonical_json(),
            )
        )
        if not ack.ok:
            if ack.duplicate:
                raise RunExists(f"run {run_id!r} already exists in the store")
            raise ConclaveError(f"could not record run {run_id!r}: {ack.error}")
        ctx = RunContext(run_id=run_id, branch_id=branch_id, spec_id=spec_id, goal=goal)
        self._publish(RunStarted(run_id=run_id, branch_id=branch_id, spec_id=spec_id, stages=pipeline.stage_names))
        try:
            return await self._run_stages(ctx, pipeline)
        except BaseException:
            with trio.move_on_after(1.0) as cleanup:
                cleanup.shield = True
                try:
                    await self._write(RunUpdate(run_id=run_id, status="interrupted"))
                except ActorStopped:
                    pass
            raise

    async def _run_stages(self, ctx: RunContext, pipeline: Pipeline) -> RunResult:
        panel = max(len(s.agents) for s in pipeline.stages)
        replies_to, replies = open_channel(
            panel, name="coordinator", interceptors=self._interceptors.get("coordinator", ())
        )
        agent_inboxes: dict[str, Outbox[AgentRequest]] = {}
        decisions: list[Decision] = []
        halted: Decision | None = None
        with collapse_single():
            async with trio.open_nursery() as nursery:
                try:
                    for name, spec in pipeline.agents.items():
                        inbox, receive = open_channel(
                            1, name=f"agent {name}", interceptors=self._interceptors.get("agent", ())
                        )
                        agent_inboxes[name] = inbox
                        agent = Agent(
                            spec=spec,
                            pipeline=pipeline,
                            gateway=self._gateway,
                            metrics=self._metrics,
                            store=self._store,
                            retry=self.retry,
                            seed=self.seed,
                        )
                        nursery.start_soon(agent.run, receive)
                    coordinator = Coordinator(
                        ctx=ctx,
                        agents=agent_inboxes,
                        replies_to=replies_to,
                        replies=replies,
                        store=self._store,
                        sequencer=DecisionSequencer(),
                        publish=self._publish,
                    )
                    for stage in pipeline.stages:
                        decision, _ = await coordinator.run_stage(stage)
                        decisions.append(decision)
                        if decision.status not in ADVANCING:
                            halted = decision
                            break
                finally:
                    for inbox in agent_inboxes.values():
                        inbox.close()  # agents finish their current request, then stop
                    replies.close()  # late replies now fail fast instead of waiting

        totals = await self.totals(ctx.run_id, forget=True)
        digest = compute_digest(
            (d.verdict for d in decisions), totals.usage, totals.unknown_calls, totals.by_stage
        )
        status = "completed" if halted is None else "halted"
        halt_reason = None if halted is None else halted.status
        message = None if halted is None else halt_message(ctx.run_id, halted)
        if halted is not None:
            await self._store.send(
                PersistEvent(
                    run_id=ctx.run_id,
                    branch_id=ctx.branch_id,
                    kind="halt",
                    stage=halted.key.stage,
                    detail={"reason": halted.status},
                )
            )
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
            digest=digest,
        )


async def _shielded(fn: Callable[[Any], Awaitable[None]], arg: Any) -> None:
    with trio.CancelScope(shield=True):
        await fn(arg)


@asynccontextmanager
async def open_orchestrator(
    *,
    store: str | os.PathLike[str] | Store = "conclave.db",
    provider: BaseProvider | Mapping[str, BaseProvider] | None = None,
    pipeline: Pipeline | None = None,
    seed: int = 0,
    faults: FaultPlan | Interceptor[Any] | None = None,
    interceptors: Mapping[str, Sequence[Interceptor[Any]]] | None = None,
    retry: RetryPolicy | None = None,
    limits: Limits | None = None,
    breaker: BreakerPolicy | None = None,
    health: HealthRegistry | None = None,
) -> AsyncIterator[Orchestrator]:
    """Start the gateway, metrics accumulator and store writer, yield an
    :class:`Orchestrator`, and shut them down when the block exits.

    ``store`` is a path (opened, migrated, and closed on exit) or an open
    :class:`~store.Store` (left open).  ``provider`` defaults to the
    embedded :class:`SimulatedProvider` seeded with ``seed``; a mapping
    routes agents by their pipeline ``provider`` name.  ``faults`` is a
    :class:`~messages.FaultPlan` (wrapped in a
    :class:`~messages.FaultInterceptor`, seeded with ``seed`` unless the plan
    has its own) or any interceptor; a fault interceptor is attached to the
    gateway's provider health (``health``, or a fresh
    :class:`HealthRegistry` with ``breaker`` as its policy) and to the event
    log.  It is installed on the gateway's inbox, after any in
    ``interceptors["gateway"]``.

    On normal exit the actors drain their inboxes (every queued write is
    committed) before the block returns; on cancellation or error they are
    cancelled, and the store is left consistent.  Raises
    :class:`ConfigError` before starting anything if the configuration is
    invalid.
    """
    pipeline = pipeline or default_pipeline()
    limits = limits or Limits()
    retry = retry or RetryPolicy()
    interceptors = dict(interceptors or {})
    unknown_edges = set(interceptors) - EDGES
    if unknown_edges:
        raise ConfigError(
            f"unknown channel(s) for interceptors: {', '.join(sorted(unknown_edges))}; "
            f"known: {', '.join(sorted(EDGES))}"
        )
    health = health if health is not None else HealthRegistry(breaker)
    if isinstance(faults, FaultPlan):
        faults = FaultInterceptor(faults, seed=seed) if faults.enabled else None
    if faults is not None:
        interceptors["gateway"] = [*interceptors.get("gateway", ()), faults]
    if provider is None:
        providers: dict[str, BaseProvider] = {"sim": SimulatedProvider(seed=seed)}
    elif isinstance(provider, BaseProvider):
        providers = {provider.name: provider}
    else:
        providers = dict(provider)
    if len(providers) == 1:
        # One provider serves every agent, whatever the pipeline calls it.
        only = next(iter(providers.values()))
        providers = {spec.provider: only for spec in pipeline.agents.values()} | providers
    missing = sorted({s.provider for s in pipeline.agents.values()} - set(providers))
    if missing:
        raise ConfigError(f"no provider configured for: {', '.join(missing)}")

    own_store = not isinstance(store, Store)
    db = Store.open(os.fspath(store)) if not isinstance(store, Store) else store
    gateway = Gateway(providers, max_concurrency=limits.max_concurrency, health=health)
    metrics = MetricsAccumulator()
    writer = StoreWriter(db)
    gateway_tx, gateway_rx = open_channel(
        limits.gateway_buffer, name="gateway", interceptors=interceptors.get("gateway", ())
    )
    metrics_tx, metrics_rx = open_channel(
        limits.metrics_buffer, name="metrics", interceptors=interceptors.get("metrics", ())
    )
    store_tx, store_rx = open_channel(
        limits.store_buffer, name="store", interceptors=interceptors.get("store", ())
    )
    for interceptor in interceptors.get("gateway", ()):
        if isinstance(interceptor, FaultInterceptor):
            interceptor.attach(seed=seed, health=health, events=store_tx)
    try:
        with collapse_single():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(gateway.run, gateway_rx)
                nursery.start_soon(metrics.run, metrics_rx)
                # Shielded: the writer stops when its inbox closes, after
                # committing what is queued, so even a cancelled orchestrator
                # records its runs as interrupted.  It never waits on anyone
                # but its inbox (and a bounded busy-retry loop).
                nursery.start_soon(_shielded, writer.run, store_rx)
                orchestrator = Orchestrator(
                    gateway=gateway_tx,
                    metrics=metrics_tx,
                    store=store_tx,
                    pipeline=pipeline,
                    seed=seed,
                    retry=retry,
                    interceptors=interceptors,
                    limits=limits,
                )
                orchestrator.health = health
                orchestrator.faults = faults if isinstance(faults, FaultInterceptor) else None
                try:
                    yield orchestrator
                finally:
                    # Closing the inboxes lets each actor drain what is queued
                    # and stop; on cancellation the nursery cancels them anyway.
                    gateway_tx.close()
                    metrics_tx.close()
                    store_tx.close()
                    for send in orchestrator._subscribers:
                        send.close()
    finally:
        with trio.CancelScope(shield=True):
            await gateway.aclose()
        if own_store:
            db.close()


