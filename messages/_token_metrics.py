"""Messages of the metrics accumulator: budgets, totals and snapshots.

Money is :class:`~decimal.Decimal` USD, exact; it is rounded only for
display.  ``None`` as a cost means "unpriced" (the model is not in the
price table), never zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

import attrs

from ._channel import Reply
from ._usage import ZERO_USAGE, TokenUsage

BUDGET_THRESHOLDS = (80, 90, 100)
"""Percentages of the budget at which the accumulator raises an alert, once each."""


@attrs.frozen(kw_only=True, slots=True)
class GroupTotals:
    """Totals of one run's calls grouped by stage, agent or model.

    ``usage`` sums every attempt whose usage is known, replays included (a
    replay is an output bought before a crash and reused on resume);
    ``turns`` counts calls made in this process, ``replays`` reused ones.
    ``cost_usd`` sums the priced calls; ``unpriced_calls`` were not priced.
    """

    usage: TokenUsage = ZERO_USAGE
    turns: int = 0
    replays: int = 0
    unknown_calls: int = 0
    unpriced_calls: int = 0
    cost_usd: Decimal = Decimal(0)
    estimated_next_prompt_tokens: int = 0


@attrs.frozen(kw_only=True, slots=True)
class SetBudget:
    """Runtime -> metrics accumulator: ``run_id``'s budget in USD (``None``:
    no budget).  Setting a higher budget re-arms the gate but not the
    warnings already given."""

    run_id: str
    budget_usd: Decimal | None


@attrs.frozen(kw_only=True, slots=True)
class BudgetStatus:
    """Metrics accumulator -> coordinator, the answer to a
    :class:`BudgetCheck`: the run's budget (``None``: none), its priced
    spend so far and its unpriced calls; ``exceeded`` once the spend has
    reached the budget."""

    run_id: str
    budget_usd: Decimal | None
    spent_usd: Decimal
    unpriced_calls: int

    @property
    def exceeded(self) -> bool:
        return self.budget_usd is not None and self.spent_usd >= self.budget_usd


@attrs.frozen(kw_only=True, slots=True)
class BudgetCheck:
    """Coordinator -> metrics accumulator: may another call be dispatched?
    Answered after every usage report queued before it."""

    run_id: str
    reply_to: Reply[BudgetStatus] | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(kw_only=True, slots=True)
class BudgetAlert:
    """Published once per run and threshold (80, 90, 100 % of the budget)."""

    run_id: str
    threshold: int
    spent_usd: Decimal
    budget_usd: Decimal


@attrs.frozen(kw_only=True, slots=True)
class StageTokens:
    """One stage's line in a :class:`TokenMetrics` snapshot: input
    (cached included) and output tokens, turns (calls made in this
    process) and priced cost."""

    stage: str
    input_tokens: int
    output_tokens: int
    turns: int
    cost_usd: Decimal


@attrs.frozen(kw_only=True, slots=True)
class TokenMetrics:
    """A snapshot of one run's metrics, published at a bounded rate.

    ``context_utilization`` (0-1) is the largest last prompt of any agent
    over its model's context window: the live context size, not the
    reference's cumulative figure.  ``final`` marks the run's last snapshot.
    """

    run_id: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    turns: int
    replays: int
    unknown_calls: int
    estimated_next_prompt_tokens: int
    context_utilization: float
    cost_usd: Decimal
    unpriced_calls: int
    budget_usd: Decimal | None
    alerts: tuple[int, ...]
    by_stage: tuple[StageTokens, ...]
    final: bool = False

    @property
    def budget_fraction(self) -> float | None:
        if self.budget_usd is None or self.budget_usd <= 0:
            return None
        return float(self.cost_usd / self.budget_usd)


GroupMap = Mapping[str, Mapping[str, GroupTotals]]
