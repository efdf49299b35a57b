"""``conclave events``: a run's event log, as stored.

The log is where a run's history beyond its outputs and decisions lives:
each model call handed to a provider (``agent_call``) or dropped unmade
(``call_dropped``), each injected ``fault`` and the ``retry`` that followed
it, stage starts, decisions, budget warnings, the final ``metrics``.  Read
only; the store is opened read-only.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

from store import EventRow

from ._checks import add_db_argument, nonempty_arg
from ._format import shown
from ._ids import short_branch_id

# A detail longer than this is cut in the human listing (--json has it all).
_DETAIL_WIDTH = 100

# Every kind Conclave writes.  A --kind outside these and the run's own
# (an embedding app may log kinds of its own) is a typo, and a silent empty
# answer would tell a script "none happened".
EVENT_KINDS = frozenset(
    {
        "agent_call",
        "budget_warning",
        "call_cancelled",
        "call_dropped",
        "decision",
        "fault",
        "gate_wait",
        "gave_up",
        "halt",
        "metrics",
        "rerun",
        "resume",
        "retry",
        "stage_start",
    }
)


def add_events_command(sub: Any) -> None:
    p = sub.add_parser(
        "events",
        help="show a run's event log (calls, faults, retries, decisions)",
        description=(
            "Show a run's event log in order: model calls handed to a provider (agent_call), "
            "dropped unmade (call_dropped) or cancelled while a provider worked on it (call_cancelled), "
            "injected faults and the retries that followed, agents that gave up (gave_up), "
            "stage starts, decisions, halts, budget warnings, resumes and reruns, and the final "
            "metrics.  Kinds: " + ", ".join(sorted(EVENT_KINDS)) + "."
        ),
    )
    p.add_argument("run_id", metavar="RUN_ID", help="the run, as 'conclave status' lists it")
    p.add_argument(
        "--kind",
        action="append",
        metavar="KIND",
        help="only events of this kind (repeat for several; the kinds are listed above), e.g. --kind fault --kind retry",
    )
    p.add_argument("--branch", type=nonempty_arg, help="only this branch's events (full or short id; default: every branch)")
    add_db_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_events)


def _detail(detail: dict[str, Any]) -> str:
    """``key=value ...``; nested values are named, not spelled out."""
    parts = []
    for key, value in detail.items():
        if isinstance(value, dict):
            text = "{...}"
        elif isinstance(value, list):
            text = ",".join(str(v) for v in value) if all(not isinstance(v, (dict, list)) for v in value) else "[...]"
        else:
            text = str(value)
        parts.append(f"{key}={text}")
    line = shown(" ".join(parts))  # error messages come from providers
    return line if len(line) <= _DETAIL_WIDTH else line[: _DETAIL_WIDTH - 1] + "…"


def _json(event: EventRow) -> dict[str, Any]:
    return {
        "id": event.id,
        "branch_id": event.branch_id,
        "kind": event.kind,
        "stage": event.stage,
        "agent": event.agent,
        "attempt": event.attempt,
        "detail": event.detail,
        "at_ms": event.at,
    }


def cmd_events(args: argparse.Namespace) -> int:
    from ._cli import UsageError, open_run  # late: _cli imports this module
    from ._cli_history import branch_of

    store, run = open_run(args.db, args.run_id)
    with store:
        # Read as they are written out, a page at a time: the whole log as
        # a list held about 5 KB per event.
        branch_id = None if args.branch is None else branch_of(store, run, args.branch).branch_id
        kinds, last = store.event_counts(run.run_id, branch_id)
        wanted = set(args.kind or ())
        unknown = wanted - EVENT_KINDS - set(kinds)
        if unknown:
            raise UsageError(
                f"unknown event kind {', '.join(repr(k) for k in sorted(unknown))}; "
                f"kinds: {', '.join(sorted(EVENT_KINDS | set(kinds)))}"
            )
        events = store.iter_events(run.run_id, branch_id=branch_id, kinds=sorted(wanted), up_to=last)
        if args.json:
            _json_stream({"run_id": run.run_id, "branch_id": branch_id, "kinds": kinds}, "events", map(_json, events))
            return 0
        scope = f" on branch {short_branch_id(branch_id)}" if branch_id else ""
        summary = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        print(f"events of {run.run_id}{scope}: {sum(kinds.values())} ({summary or 'none'})")
        if wanted and not any(kinds.get(k) for k in wanted):
            print(f"  none of kind {', '.join(sorted(wanted))}; this run has: {', '.join(sorted(kinds)) or 'none'}")
            return 0
        many_branches = branch_id is None and len(store.branches(run.run_id)) > 1
        for e in events:
            where = f"{e.stage or '-':<10} {e.agent or '-':<10} {e.attempt if e.attempt is not None else '-':>3}"
            branch = f" {short_branch_id(e.branch_id)}" if many_branches else ""
            print(f"  {e.id:>6}{branch} {where}  {e.kind:<13} {_detail(e.detail)}")
    return 0


def _json_stream(head: dict[str, Any], key: str, items: Iterator[dict[str, Any]]) -> None:
    """Print ``head`` with ``key`` holding ``items``, exactly as
    ``json.dumps(..., indent=2)`` prints the whole object, one item at a
    time (never the whole list in memory)."""
    text = json.dumps({**head, key: []}, indent=2)
    opening = text[: -len("[]\n}")]  # ends '"events": '
    out = sys.stdout
    out.write(opening + "[")
    first = True
    for item in items:
        out.write(("" if first else ",") + "\n" + textwrap.indent(json.dumps(item, indent=2), "    "))
        first = False
    out.write(("]" if first else "\n  ]") + "\n}\n")
