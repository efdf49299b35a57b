"""A run's metrics as JSON: what the runtime persists and ``conclave
metrics`` prints.  Money is written as exact decimal strings
(``cost_usd_exact``) and as a number rounded to the micro-dollar
(``cost_usd``)."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from messages import GroupTotals, UsageTotals

MICRO = Decimal("0.000001")


def usd_number(amount: Decimal) -> float:
    return float(amount.quantize(MICRO, rounding=ROUND_HALF_EVEN))


def exact_usd(amount: Decimal) -> str:
    """An amount as its shortest exact decimal string: the budget "1.50"
    and "1.5" are one amount and read alike in every report."""
    return format(amount.normalize(), "f") if amount else "0"


def group_json(g: GroupTotals) -> dict[str, Any]:
    return {
        "usage": g.usage.as_dict(),
        "turns": g.turns,
        "replays": g.replays,
        "unknown_usage_calls": g.unknown_calls,
        "unpriced_calls": g.unpriced_calls,
        "cost_usd": usd_number(g.cost_usd),
        "cost_usd_exact": exact_usd(g.cost_usd),
        "estimated_next_prompt_tokens": g.estimated_next_prompt_tokens,
    }


def totals_json(t: UsageTotals) -> dict[str, Any]:
    """Everything the accumulator knows about a run, JSON-ready."""
    return {
        "usage": t.usage.as_dict(),
        "turns": t.turns,
        "replays": t.replays,
        "duplicates": t.duplicates,
        "unknown_usage_calls": t.unknown_calls,
        "unpriced_calls": t.unpriced_calls,
        "unpriced_models": list(t.unpriced_models),
        "cost_usd": usd_number(t.cost_usd),
        "cost_usd_exact": exact_usd(t.cost_usd),
        "budget_usd": None if t.budget_usd is None else exact_usd(t.budget_usd),
        "budget_alerts": list(t.alerts),
        "estimated_next_prompt_tokens": t.estimated_next_prompt_tokens,
        "price_table": t.price_table,
        "by": {dim: {name: group_json(g) for name, g in groups.items()} for dim, groups in t.groups.items()},
    }


def exact_cost(record: Mapping[str, Any]) -> Decimal:
    return Decimal(str(record.get("cost_usd_exact", record.get("cost_usd", 0))))
