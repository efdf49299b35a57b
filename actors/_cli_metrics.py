"""The CLI's metrics pieces: ``run --budget/--prices``, the live footer
wiring, and ``conclave metrics RUN_ID [--by stage|agent|model] [--json]``."""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
from decimal import Decimal
from collections.abc import Mapping, Sequence
from typing import Any

from messages import ZERO_USAGE, UsageRecorded
from store import BranchRow, EventRow, OutputRow, Store

from ._budget import parse_budget, stored_budget, usd
from ._checks import add_db_argument, file_arg, nonempty_arg
from ._footer import LiveFooter, PlainMetrics, Writer, colour_allowed, redraws_in_place
from ._format import shown, tokens
from ._metrics import MetricsAccumulator
from ._metrics_report import exact_cost, totals_json
from ._pricing import PriceFileError, PriceTable

PRICES_ENV = "CONCLAVE_PRICES"


class MetricsUsageError(Exception):
    """Bad metrics input (budget, price file): exit 2 with one line."""


def _budget_arg(text: str) -> Decimal:
    try:
        budget = parse_budget(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    assert budget is not None
    return budget


def add_run_metrics_args(p: argparse.ArgumentParser) -> None:
    """``--budget`` and ``--prices`` for ``run`` (and ``resume``)."""
    p.add_argument(
        "--budget",
        type=_budget_arg,
        default=None,
        metavar="USD",
        help="stop dispatching agent calls once the run has cost this much (warns at 80%% and 90%%); "
        "the run halts with budget_exceeded (exit 3), resumable with a higher budget",
    )
    _add_prices(p)


def _add_prices(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prices",
        type=file_arg,
        metavar="FILE",
        default=None,
        help=f"price override file (LiteLLM JSON format, USD per token); default ${PRICES_ENV}",
    )


def load_prices(path: str | None) -> PriceTable:
    """The vendored table with the override from ``path`` or ``$CONCLAVE_PRICES``."""
    return load_kept_prices(path)[0]


# The branch option that keeps a run's price override: resume, rerun and
# metrics used the vendored prices again (a resumed run then spent past
# its budget at the user's prices, unwarned).
PRICES_OPTION = "prices"


def load_kept_prices(path: str | None) -> tuple[PriceTable, dict[str, str] | None]:
    """:func:`load_prices`, and what a run keeps of the override in its
    options (``None`` without one)."""
    named = path or os.environ.get(PRICES_ENV) or None
    try:
        table, text = PriceTable.load_kept(named)
    except PriceFileError as exc:
        where = f" (from ${PRICES_ENV})" if named is not None and not path else ""
        raise MetricsUsageError(f"{exc}{where}") from None
    return table, None if text is None or named is None else {"source": str(named), "text": text}


def kept_prices(options: Mapping[str, Any]) -> PriceTable | None:
    """The price table a branch's options keep, or None (vendored)."""
    kept = options.get(PRICES_OPTION)
    if not isinstance(kept, Mapping) or not isinstance(kept.get("text"), str):
        return None
    source = str(kept.get("source", "kept prices"))
    try:
        return PriceTable.from_kept(source, kept["text"])
    except PriceFileError as exc:  # the table itself changed under it
        raise MetricsUsageError(f"the run's kept price override no longer applies: {exc}") from None


def given_prices(path: str | None) -> bool:
    """Whether ``--prices`` or ``$CONCLAVE_PRICES`` names an override."""
    return bool(path or os.environ.get(PRICES_ENV))


def metrics_display(out: Writer, *, isatty: bool | None = None) -> LiveFooter | PlainMetrics:
    """A live footer on a terminal that can redraw a line, periodic plain
    lines elsewhere (see ``redraws_in_place``)."""
    tty = out.isatty() if isatty is None and hasattr(out, "isatty") else bool(isatty)
    if redraws_in_place(tty):
        return LiveFooter(
            out, colour=colour_allowed(), width=lambda: shutil.get_terminal_size((80, 24)).columns
        )
    return PlainMetrics(out)


# -- conclave metrics ----------------------------------------------------------


def _recompute(store: Store, run_id: str, branch: BranchRow | None, prices: PriceTable) -> dict[str, Any]:
    """Totals from the stored attempts (each once), priced with ``prices``,
    against the budget the run's current ``branch`` runs under (it was left
    out: "budget_usd": null for a run halted by its budget)."""
    acc = MetricsAccumulator(prices)
    from messages import AgentKey

    if branch is not None:
        acc.set_budget(run_id, stored_budget(store, branch))

    # The current branch's lineage: a rerun's abandoned parent stages (and
    # its siblings) are not what it used (they were summed in).
    rows = store.lineage_outputs(run_id, branch.branch_id) if branch is not None else []
    replayed = _replayed(store, run_id, branch, rows) if branch is not None else set()
    run = store.get_run(run_id)
    agents: dict[str, Any] = (run.pipeline.get("agents") or {}) if run is not None else {}
    # In the order they were stored, which is the order the run counted
    # them (an agent hands its usage and its output over in one step): the
    # next-prompt estimate is a mean of the latest turns, and the lineage
    # read's stage-and-agent order gave a stage of four agents another one.
    for row in sorted(rows, key=lambda r: r.id):
        spec = agents.get(row.agent)
        acc.record(
            UsageRecorded(
                key=AgentKey(run_id=run_id, branch_id=row.branch_id, stage=row.stage, agent=row.agent),
                attempt=row.attempt,
                model=row.model,
                provider=row.provider,
                usage=row.usage,
                replay=row.id in replayed,
                requested_model=spec.get("model") if isinstance(spec, dict) else None,
            )
        )
    return totals_json(acc.totals(run_id))


def _replayed(store: Store, run_id: str, branch: BranchRow, rows: list[OutputRow]) -> set[int]:
    """The ids of the rows the branch's last session counted as replays,
    as the run itself counted them: what its last resume found durable
    (the first ``durable_attempts`` of the lineage: rows are only ever
    added), else what a rerun inherited.  (Every row counted as a turn:
    ``--prices`` changed the calls, not just the prices.)"""
    resume = _last_resume(store, run_id, branch.branch_id)
    durable = resume.detail.get("durable_attempts") if resume is not None else None
    if isinstance(durable, int) and not isinstance(durable, bool):
        return {row.id for row in sorted(rows, key=lambda r: r.id)[:durable]}
    return {row.id for row in rows if row.branch_id != branch.branch_id}


def _last_resume(store: Store, run_id: str, branch_id: str) -> EventRow | None:
    """Where the branch's last session began, if a resume began it: its
    replays and its calls at work are counted from there."""
    resumes = [e for e in store.events(run_id, "resume") if e.branch_id == branch_id]
    return resumes[-1] if resumes else None


def run_metrics(
    store: Store, run_id: str, prices: PriceTable | None, branch_id: str | None = None
) -> dict[str, Any]:
    """The metrics of ``branch_id`` (default: the run's current branch): as
    persisted (its last ``metrics`` event) when the branch finished, or -
    for one that has not, or when ``prices`` is given - recomputed from its
    lineage's stored attempts.  (An interrupted rerun showed its parent's
    recorded table.)"""
    run = store.get_run(run_id)
    branch_id = branch_id or (run.current_branch_id if run is not None else None)
    branch = store.get_branch(run_id, branch_id) if branch_id else None
    # The run row keeps the current branch's outcome, a branch row its own.
    current = run is not None and branch_id == run.current_branch_id
    status = run.status if current and run is not None else (branch.status if branch is not None else None)
    if prices is None and status in ("completed", "halted"):
        recorded = [e for e in store.events(run_id, "metrics") if e.branch_id == branch_id]
        if recorded:
            return {"source": "recorded", **_current_usage_keys(recorded[-1].detail)}
    if prices is None and branch is not None:
        prices = kept_prices(branch.options)
    return {"source": "recomputed", **_recompute(store, run_id, branch, prices or PriceTable.vendored())}


def _current_usage_keys(value: Any) -> Any:
    """A report recorded before a usage count existed (cache writes, since
    schema 3) given every count today's have, as 0: a script reading
    ``usage["cache_write_input_tokens"]`` failed on older runs only."""
    if isinstance(value, dict):
        fixed = {k: _current_usage_keys(v) for k, v in value.items()}
        usage = fixed.get("usage")
        if isinstance(usage, dict) and "input_tokens" in usage:
            fixed["usage"] = {**ZERO_USAGE.as_dict(), **usage}
        return fixed
    return value


def interrupted_calls(store: Store, run_id: str, branch_id: str) -> int:
    """Calls ``branch_id`` handed to a provider that neither answered nor
    failed on record: cut off by an interruption (Ctrl-C, a crash) while
    the provider worked on them.  They may have been billed, and no usage
    was ever reported for them, so their cost is unknown.  Counted from the
    event log (``agent_call`` events less ``call_dropped`` ones) against
    the stored attempts; a resume numbers its first attempt as the one cut
    off, so identities are counted with multiplicity."""
    return unsettled_calls(store, run_id, branch_id)[0]


def unsettled_calls(store: Store, run_id: str, branch_id: str, *, at_work: bool = False) -> tuple[int, int]:
    """(cut off, in flight): the calls of :func:`interrupted_calls`, and -
    when ``at_work``, a process driving the branch now - those of them its
    current session made (after the branch's last ``resume`` event), which
    are at work rather than cut off.  A call cut off before a crash stays
    cut off while the resume that asks again is at work."""
    Identity = tuple[str | None, str | None, int | None]
    resume = _last_resume(store, run_id, branch_id)
    since = resume.id if resume is not None else -1
    calls: collections.Counter[Identity] = collections.Counter()
    current: collections.Counter[Identity] = collections.Counter()  # this session's, less its drops
    for event in store.events(run_id, kind="agent_call"):
        if event.branch_id == branch_id:
            calls[(event.stage, event.agent, event.attempt)] += 1
            if event.id > since:
                current[(event.stage, event.agent, event.attempt)] += 1
    for event in store.events(run_id, kind="call_dropped"):
        if event.branch_id == branch_id:
            calls[(event.stage, event.agent, event.attempt)] -= 1
            if event.id > since:
                current[(event.stage, event.agent, event.attempt)] -= 1
    stored: collections.Counter[Identity] = collections.Counter()
    for output in store.outputs(run_id, branch_id):
        stored[(output.stage, output.agent, output.attempt)] += 1
    cut_off = in_flight = 0
    for identity, n in calls.items():
        unsettled = n - stored[identity]
        if unsettled <= 0:
            continue
        # A stored answer settles this session's call first: a call cut off
        # before the crash was asked again, and answered, under its number.
        mine = min(unsettled, max(0, current[identity] - stored[identity])) if at_work else 0
        in_flight += mine
        cut_off += unsettled - mine
    return cut_off, in_flight


def _table(report: dict[str, Any], by: str, stages: Sequence[str] = ()) -> list[str]:
    """The report's groups along ``by``, one row each; stages in the
    pipeline's order (``stages``), not by name (audit before plan)."""
    groups: dict[str, Any] = report["by"].get(by, {})
    if by == "stage":
        order = {name: i for i, name in enumerate(stages)}
        groups = dict(sorted(groups.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))
    header = f"  {by:<20} {'calls':>5} {'reused':>6} {'in':>8} {'cached':>8} {'out':>8} {'reason':>8} {'cost':>12}"
    lines = [header]
    for name, g in groups.items():
        u = g["usage"]
        cost = usd(exact_cost(g), 4) if g["unpriced_calls"] == 0 else (
            f"{usd(exact_cost(g), 4)}+?" if exact_cost(g) else "unpriced"
        )
        lines.append(
            f"  {shown(name):<20} {g['turns']:>5} {g['replays']:>6} {tokens(u['input_tokens']):>8} "
            f"{tokens(u['cached_input_tokens']):>8} {tokens(u['output_tokens']):>8} "
            f"{tokens(u['reasoning_output_tokens']):>8} {cost:>12}"
        )
    u = report["usage"]
    total = usd(exact_cost(report), 4) + ("+?" if report["unpriced_calls"] else "")
    # A stage (or agent) may itself be named "total": the sum row must not
    # pass for it.
    label = "(total)" if any(shown(name).strip().casefold() == "total" for name in groups) else "total"
    lines.append(
        f"  {label:<20} {report['turns']:>5} {report['replays']:>6} {tokens(u['input_tokens']):>8} "
        f"{tokens(u['cached_input_tokens']):>8} {tokens(u['output_tokens']):>8} "
        f"{tokens(u['reasoning_output_tokens']):>8} {total:>12}"
    )
    return lines


def cmd_metrics(args: argparse.Namespace) -> int:
    from . import _cli_history as _history
    from ._cli import _fail, _json_out, _shown_status, open_run  # late: _cli imports this module
    from ._ids import short_branch_id

    try:
        prices = load_prices(args.prices) if given_prices(args.prices) else None
    except MetricsUsageError as exc:
        return _fail(str(exc))
    store, run = open_run(args.db, args.run_id)
    with store:
        fresh, driven = store.run_state(run.run_id)
        run = fresh or run
        branch = _history.branch_of(store, run, args.branch)
        current = branch.branch_id == run.current_branch_id
        status = _history.shown_branch_status(run.status if current else branch.status, current)
        try:
            report = {
                "run_id": run.run_id,
                "branch_id": branch.branch_id,
                "status": status,
                # As status --json and branches --json have it: the stored
                # status beside whether a process drives the branch now
                # (null: unknowable); a killed run read "running" alone.
                # Only the current branch is ever driven.
                "driven": driven if current else False,
                **run_metrics(store, run.run_id, prices, branch.branch_id),
            }
            # Calls a process driving the branch made are at work, not cut
            # off: they were reported as interrupted mid-run.
            at_work = current and status == "running" and driven is True
            report["interrupted_calls"], report["in_flight_calls"] = unsettled_calls(
                store, run.run_id, branch.branch_id, at_work=at_work
            )
        except MetricsUsageError as exc:
            return _fail(str(exc))
    if args.json:
        _json_out(report)
        return 0
    which = "" if current else f" branch {short_branch_id(branch.branch_id)}"
    if current and status is not None:
        # As 'status' shows it: "running" said someone was at work on it.
        status = _shown_status(status, driven)
    print(f"metrics of {run.run_id}{which} ({status}; {report['source']}; prices: {report['price_table']}), by {args.by}:")
    stages = [s.get("name") for s in run.pipeline.get("stages", ()) if isinstance(s, dict)]
    print("\n".join(_table(report, args.by, [s for s in stages if isinstance(s, str)])))
    if report["unpriced_models"]:
        print(f"  unpriced (not in the price table, not counted): {shown(', '.join(report['unpriced_models']))}")
    if report["unknown_usage_calls"]:
        print(f"  {report['unknown_usage_calls']} call(s) with unknown usage (cut off), not counted")
    if report["in_flight_calls"]:
        print(f"  {report['in_flight_calls']} call(s) in flight: cost not known yet")
    if report["interrupted_calls"]:
        print(
            f"  {report['interrupted_calls']} call(s) cut off by an interruption while a provider worked on them:"
            " cost unknown, not counted"
        )
    if report.get("budget_usd") is not None:
        alerts = ", ".join(f"{a}%" for a in report["budget_alerts"]) or "none"
        print(f"  budget {usd(Decimal(report['budget_usd']))}; warnings: {alerts}")
    return 0


def add_metrics_command(sub: Any) -> None:
    p = sub.add_parser(
        "metrics",
        help="show a run's tokens and cost by stage, agent or model",
        description="Show a run's token usage and cost, broken down by stage, agent or model.",
    )
    p.add_argument("run_id", metavar="RUN_ID", help="the run, as 'conclave status' lists it")
    p.add_argument("--by", choices=("stage", "agent", "model"), default="stage", help="breakdown (default: stage)")
    p.add_argument("--branch", type=nonempty_arg, metavar="BRANCH", help="a branch (full or short id; default: the current one)")
    add_db_argument(p)
    _add_prices(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_metrics)


def stdout_writer() -> Writer:
    return sys.stdout
