"""A run's digest: SHA-256 of its canonical decision log and usage totals.

It covers content - stage, status, agreements, conflicts, missing agents,
accepted outputs, token totals - and never identifiers, seqs, timestamps or
durations, so the same seed gives the same digest whatever the interleaving,
and a resumed run matches an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from messages import TokenUsage

_CONTENT_KEYS = (
    "stage",
    "status",
    "agreements",
    "conflicts",
    "missing_agents",
    "invalid_agents",
    "support",
    "outputs",
)


def decision_content(verdict: Mapping[str, Any]) -> dict[str, Any]:
    return {k: verdict.get(k) for k in _CONTENT_KEYS}


def compute_digest(
    verdicts: Iterable[Mapping[str, Any]],
    usage: TokenUsage,
    unknown_calls: int,
    by_stage: Mapping[str, TokenUsage],
) -> str:
    """The run's digest, as hex: SHA-256 of ``verdicts`` (stored verdict
    JSON; their order counts) with each stage's usage from ``by_stage``,
    the run's ``usage`` and its count of calls of unknown usage (see the
    module docstring for what it leaves out)."""
    log = []
    for verdict in verdicts:
        entry = decision_content(verdict)
        stage_usage = by_stage.get(str(verdict.get("stage")))
        entry["usage"] = stage_usage.digest_dict() if stage_usage is not None else None
        log.append(entry)
    document = {"decisions": log, "usage": usage.digest_dict(), "unknown_usage_calls": unknown_calls}
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
