"""The metrics accumulator actor.

Charges each attempt once, by identity (key, attempt): a duplicate or late
report of the same attempt is counted as a duplicate, never charged twice.
Usage reported as unknown (a call cut off mid-stream) is counted apart, not
summed as zero.
"""

from __future__ import annotations

import attrs
import trio

from messages import (
    ZERO_USAGE,
    AgentKey,
    MetricsMessage,
    MetricsQuery,
    TokenUsage,
    UsageRecorded,
    UsageTotals,
    fail_pending,
)


@attrs.define(slots=True)
class _RunMetrics:
    usage: TokenUsage = ZERO_USAGE
    unknown_calls: int = 0
    turns: int = 0
    replays: int = 0
    duplicates: int = 0
    by_stage: dict[str, TokenUsage] = attrs.field(factory=dict)
    seen: set[tuple[AgentKey, int]] = attrs.field(factory=set)


class MetricsAccumulator:
    def __init__(self) -> None:
        self._runs: dict[str, _RunMetrics] = {}

    def record(self, event: UsageRecorded) -> None:
        """Not a checkpoint; safe to call directly (tests, benchmarks)."""
        run = self._runs.setdefault(event.key.run_id, _RunMetrics())
        ident = (event.key, event.attempt)
        if ident in run.seen:
            run.duplicates += 1
            return
        run.seen.add(ident)
        if event.replay:
            run.replays += 1
        else:
            run.turns += 1
        if event.usage is None:
            run.unknown_calls += 1
            return
        run.usage = run.usage + event.usage
        stage = event.key.stage
        run.by_stage[stage] = run.by_stage.get(stage, ZERO_USAGE) + event.usage

    def totals(self, run_id: str) -> UsageTotals:
        run = self._runs.get(run_id) or _RunMetrics()
        return UsageTotals(
            run_id=run_id,
            usage=run.usage,
            unknown_calls=run.unknown_calls,
            turns=run.turns,
            replays=run.replays,
            duplicates=run.duplicates,
            by_stage=dict(run.by_stage),
        )

    async def run(self, inbox: trio.MemoryReceiveChannel[MetricsMessage]) -> None:
        try:
            async for message in inbox:
                if isinstance(message, UsageRecorded):
                    self.record(message)
                elif isinstance(message, MetricsQuery):
                    totals = self.totals(message.run_id)
                    if message.forget:
                        self._runs.pop(message.run_id, None)
                    if message.reply_to is not None:
                        message.reply_to.send(totals)
        finally:
            fail_pending(inbox)
