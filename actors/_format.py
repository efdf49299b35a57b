"""Human-readable formatting shared by the CLI's commands."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from messages import TokenUsage

STATUS_MARK = {"ok": "✓", "degraded": "~", "conflict": "✗", "no_consensus": "✗"}


def shown(text: object) -> str:
    """``text`` safe to print on a terminal: a newline as ⏎, any other
    control character as ?.  For what came from a provider, a model or a
    user (error messages, conflicts, model names, goals): raw, an ESC drove
    the terminal and a newline forged a line of output ("✓ ... OK")."""
    value = str(text)
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else ("⏎" if c == "\n" else "?") for c in value)


def tokens(n: int) -> str:
    """12.5k, 1.5M, or the number itself (the reference's footer format)."""
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f}M"
    if n >= 1_000:
        return f"{n / 1_000:.1f}k"
    return str(n)


def duration(seconds: float) -> str:
    """0.25s, 30s, 6m0s, 1h2m: as long waits are written in reset hints."""
    if seconds < 10:
        return f"{seconds:.2f}".rstrip("0").rstrip(".") + "s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60}s"
    return f"{whole // 3600}h{whole % 3600 // 60}m"


def whole_seconds(seconds: float) -> str:
    """'42s': a reset hint or a wait in whole seconds; past 10^9 (31 years,
    only a server's nonsense) in three figures - a 'retry-after' of 10^300
    was printed in its 301 digits, in messages and in the event log."""
    return f"{seconds:.0f}s" if math.isfinite(seconds) and round(seconds) < 10**9 else f"{seconds:.3g}s"


def usage_line(usage: TokenUsage, unknown: int = 0) -> str:
    writes = f", {tokens(usage.cache_write_input_tokens)} cache writes" if usage.cache_write_input_tokens else ""
    text = (
        f"{tokens(usage.input_tokens)} in ({tokens(usage.cached_input_tokens)} cached{writes}) / "
        f"{tokens(usage.output_tokens)} out ({tokens(usage.reasoning_output_tokens)} reasoning)"
    )
    if unknown:
        text += f", {unknown} call(s) with unknown usage"
    return text


def verdict_line(stage: str, seq: int, status: str, verdict: Mapping[str, Any]) -> str:
    missing = shown(", ".join(verdict.get("missing_agents") or ())) or "-"
    invalid = shown(", ".join(sorted(verdict.get("invalid_agents") or {}))) or "-"
    return (
        f"  {STATUS_MARK.get(status, '?')} {stage}: {status.upper()} (seq {seq}) | "
        f"support {verdict.get('support')}/{len(verdict.get('expected_agents') or ())} "
        f"(quorum {verdict.get('quorum_required')}) | "
        f"agreements {len(verdict.get('agreements') or ())} | "
        f"conflicts {len(verdict.get('conflicts') or ())} | missing {missing} | invalid {invalid}"
    )

