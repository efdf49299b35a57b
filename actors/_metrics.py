"""The metrics accumulator actor.

Charges each attempt once, by identity (key, attempt): a duplicate or late
report of the same attempt is counted as a duplicate, never charged twice.
Usage reported as unknown (a call cut off mid-stream) is counted apart, not
summed as zero.  A replay (an output bought before a crash and reused on
resume) adds its usage and cost to the totals - it was paid for, once - but
counts as a replay, not a turn; so a resumed run ends with the same totals
as an uninterrupted one.

Each run keeps :class:`SessionMetrics` for the run and for every stage,
agent and model, an exact :class:`~decimal.Decimal` cost from the
:class:`PriceTable`, and its budget.  Crossing 80, 90 and 100 % of the
budget raises one :class:`~messages.BudgetAlert` each; :class:`~messages.
BudgetCheck` answers whether another call may be dispatched.

Snapshots (:class:`~messages.TokenMetrics`) are handed to ``publish`` at
most once per ``interval`` seconds of trio time per run, plus a final one
when the run is forgotten.  ``publish`` must not block (the runtime's
publishes into latest-value cells), so subscribers can never slow the
accumulator.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import attrs
import trio

from messages import (
    BUDGET_THRESHOLDS,
    AgentKey,
    BudgetAlert,
    BudgetCheck,
    BudgetStatus,
    GroupTotals,
    MetricsMessage,
    MetricsQuery,
    SetBudget,
    StageTokens,
    TokenMetrics,
    UsageRecorded,
    UsageTotals,
    fail_pending,
)

from ._context_window import context_window
from ._pricing import PriceTable
from ._session_metrics import SessionMetrics, Tally

DIMENSIONS = ("stage", "agent", "model")

PublishMetrics = Callable[[TokenMetrics], None]
PublishAlert = Callable[[BudgetAlert], None]


@attrs.define(slots=True)
class _Group:
    session: SessionMetrics = attrs.field(factory=SessionMetrics)
    tally: Tally = attrs.field(factory=Tally)  # known usage, replays included
    turns: int = 0
    replays: int = 0
    unknown_calls: int = 0
    unpriced_calls: int = 0
    cost: Decimal = Decimal(0)

    def add(self, event: UsageRecorded, cost: Decimal | None) -> None:
        if event.replay:
            self.replays += 1
            self.session.record_replay()
        else:
            self.turns += 1
        usage = event.usage
        if usage is None:
            self.unknown_calls += 1
            return
        self.tally.add(usage)
        if not event.replay:
            self.session.record_turn(usage)
        if cost is None:
            self.unpriced_calls += 1
        else:
            self.cost += cost

    def totals(self) -> GroupTotals:
        return GroupTotals(
            usage=self.tally.usage(),
            turns=self.turns,
            replays=self.replays,
            unknown_calls=self.unknown_calls,
            unpriced_calls=self.unpriced_calls,
            cost_usd=self.cost,
            estimated_next_prompt_tokens=self.session.estimated_next_prompt_tokens(),
        )


@attrs.define(slots=True)
class _RunMetrics:
    run: _Group = attrs.field(factory=_Group)
    duplicates: int = 0
    groups: dict[str, dict[str, _Group]] = attrs.field(factory=lambda: {d: {} for d in DIMENSIONS})
    unpriced_models: set[str] = attrs.field(factory=set)
    # agent -> (model, input tokens of its last known call): context in use.
    last_prompt: dict[str, tuple[str, int]] = attrs.field(factory=dict)
    seen: set[tuple[AgentKey, int]] = attrs.field(factory=set)
    budget: Decimal | None = None
    alerts: list[int] = attrs.field(factory=list)


class MetricsAccumulator:
    """The metrics accumulator actor (see the module docstring): charges
    attempts by identity, keeps each run's totals, cost and budget, and
    publishes snapshots at most every ``interval`` seconds per run."""

    def __init__(
        self,
        prices: PriceTable | None = None,
        *,
        publish: PublishMetrics | None = None,
        alert: PublishAlert | None = None,
        interval: float = 0.25,
        listening: Callable[[], bool] | None = None,
    ) -> None:
        self.prices = prices if prices is not None else PriceTable.vendored()
        self._publish = publish
        # Snapshots nobody would receive are not built ("is anyone
        # subscribed?"; None: always assume so).
        self._listening = listening
        self._alert = alert
        self._interval = interval
        self._runs: dict[str, _RunMetrics] = {}
        self._dirty: dict[str, None] = {}  # insertion-ordered set
        self._wake = trio.Event()

    # -- synchronous core (not a checkpoint; tests and benches call it) ------

    def record(self, event: UsageRecorded) -> None:
        run = self._runs.get(event.key.run_id)
        if run is None:
            run = self._runs[event.key.run_id] = _RunMetrics()
        ident = (event.key, event.attempt)
        if ident in run.seen:
            run.duplicates += 1
            run.run.session.record_duplicate_items(1)
            return
        run.seen.add(ident)
        cost: Decimal | None = None
        if event.usage is not None:
            cost = self.prices.cost(event.usage, event.model, event.provider)
            if cost is None and event.requested_model not in (None, event.model):
                # A local server's own name for the model ("my-vllm-model")
                # left a known model's calls unpriced and outside the budget.
                cost = self.prices.cost(event.usage, event.requested_model, event.provider)
            if cost is None:
                run.unpriced_models.add(event.model)
            if not event.replay:
                run.last_prompt[event.key.agent] = (event.model, event.usage.input_tokens)
        run.run.add(event, cost)
        key = event.key
        for dim, name in (("stage", key.stage), ("agent", key.agent), ("model", event.model)):
            groups = run.groups[dim]
            group = groups.get(name)
            if group is None:
                group = groups[name] = _Group()
            group.add(event, cost)
        if cost:
            self._check_budget(event.key.run_id, run)
        if self._publish is not None and (self._listening is None or self._listening()):
            self._dirty[event.key.run_id] = None
            self._wake.set()

    def set_budget(self, run_id: str, budget: Decimal | None) -> None:
        run = self._runs.setdefault(run_id, _RunMetrics())
        run.budget = budget
        self._check_budget(run_id, run)

    def _check_budget(self, run_id: str, run: _RunMetrics) -> None:
        budget = run.budget
        if budget is None:
            return
        spent = run.run.cost
        for threshold in BUDGET_THRESHOLDS:
            if threshold in run.alerts:
                continue
            if spent * 100 >= budget * threshold:
                run.alerts.append(threshold)
                if self._alert is not None:
                    self._alert(
                        BudgetAlert(run_id=run_id, threshold=threshold, spent_usd=spent, budget_usd=budget)
                    )

    def budget_status(self, run_id: str) -> BudgetStatus:
        run = self._runs.get(run_id) or _RunMetrics()
        return BudgetStatus(
            run_id=run_id,
            budget_usd=run.budget,
            spent_usd=run.run.cost,
            unpriced_calls=run.run.unpriced_calls,
        )

    def totals(self, run_id: str) -> UsageTotals:
        run = self._runs.get(run_id) or _RunMetrics()
        r = run.run
        return UsageTotals(
            run_id=run_id,
            usage=r.tally.usage(),
            unknown_calls=r.unknown_calls,
            turns=r.turns,
            replays=r.replays,
            duplicates=run.duplicates,
            # Stages with some known usage (the digest's by_stage, as before).
            by_stage={
                name: g.tally.usage()
                for name, g in run.groups["stage"].items()
                if g.turns + g.replays > g.unknown_calls
            },
            cost_usd=r.cost,
            unpriced_calls=r.unpriced_calls,
            unpriced_models=tuple(sorted(run.unpriced_models)),
            budget_usd=run.budget,
            alerts=tuple(run.alerts),
            price_table=f"{self.prices.source} #{self.prices.version}",
            estimated_next_prompt_tokens=r.session.estimated_next_prompt_tokens(),
            groups={
                dim: {name: g.totals() for name, g in sorted(groups.items())}
                for dim, groups in run.groups.items()
            },
        )

    def snapshot(self, run_id: str, *, final: bool = False) -> TokenMetrics:
        run = self._runs.get(run_id) or _RunMetrics()
        r = run.run
        usage = r.tally
        utilisation = max(
            (tokens / context_window(model) for model, tokens in run.last_prompt.values()),
            default=0.0,
        )
        return TokenMetrics(
            run_id=run_id,
            input_tokens=usage.input,
            output_tokens=usage.output,
            cached_input_tokens=usage.cached,
            turns=r.turns,
            replays=r.replays,
            unknown_calls=r.unknown_calls,
            estimated_next_prompt_tokens=r.session.estimated_next_prompt_tokens(),
            context_utilization=utilisation,
            cost_usd=r.cost,
            unpriced_calls=r.unpriced_calls,
            budget_usd=run.budget,
            alerts=tuple(run.alerts),
            by_stage=tuple(
                StageTokens(
                    stage=name,
                    input_tokens=g.tally.input,
                    output_tokens=g.tally.output,
                    turns=g.turns,
                    cost_usd=g.cost,
                )
                for name, g in run.groups["stage"].items()
            ),
            final=final,
        )

    def forget(self, run_id: str) -> None:
        if self._publish is not None and run_id in self._runs:
            self._dirty.pop(run_id, None)
            if self._listening is None or self._listening():
                self._publish(self.snapshot(run_id, final=True))
        self._runs.pop(run_id, None)

    def handle(self, message: MetricsMessage) -> None:
        if isinstance(message, UsageRecorded):
            self.record(message)
        elif isinstance(message, BudgetCheck):
            if message.reply_to is not None:
                message.reply_to.send(self.budget_status(message.run_id))
        elif isinstance(message, SetBudget):
            self.set_budget(message.run_id, message.budget_usd)
        elif isinstance(message, MetricsQuery):
            totals = self.totals(message.run_id)
            if message.forget:
                self.forget(message.run_id)
            if message.reply_to is not None:
                message.reply_to.send(totals)
        else:
            # Ignored, it hung the run: an interceptor that forwarded a
            # string in place of a query left the query's requester waiting
            # for ever.  (The gateway and store writer fail on such an item
            # too.)
            raise TypeError(
                f"the metrics accumulator got a {type(message).__name__}, which is no metrics message"
                " (UsageRecorded, MetricsQuery, SetBudget or BudgetCheck); did an interceptor forward it?"
            )

    # -- the actor -------------------------------------------------------------

    async def _publisher(self) -> None:
        assert self._publish is not None
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            dirty, self._dirty = self._dirty, {}
            for run_id in dirty:
                if run_id in self._runs:
                    self._publish(self.snapshot(run_id))
            await trio.sleep(self._interval)  # the rate bound

    # KI-protected like the store writer: Ctrl-C goes to the main task, so
    # the accumulator survives to answer the interrupted run's cleanup.
    @trio.lowlevel.enable_ki_protection
    async def run(self, inbox: trio.MemoryReceiveChannel[MetricsMessage]) -> None:
        """Handle messages from ``inbox`` until it closes, each in the step
        it is received (handling never awaits, so a message taken is fully
        counted).  Protected from KeyboardInterrupt.  Cancelled, or once the
        inbox closes: queries still queued get a closed reply slot
        (:class:`~messages.ActorStopped`)."""
        try:
            async with trio.open_nursery() as nursery:
                if self._publish is not None:
                    nursery.start_soon(self._publisher)
                async for message in inbox:
                    self.handle(message)
                    # Whatever else is queued is handled in the same step:
                    # each receive() would cost a scheduling round.
                    while True:
                        try:
                            message = inbox.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        self.handle(message)
                nursery.cancel_scope.cancel()
        finally:
            fail_pending(inbox)
