"""Consensus, computed for real.

A pure function of the stage's definition and the agents' accepted outputs,
so it is trivially deterministic and testable.  The rules (the reference's
intended "path B" verdict, plus quorum and the coordinator's own check of
the stage's decision field):

* present agents have an accepted output; missing agents do not;
* an agent is *valid* when its output parses as a JSON object holding every
  required field, its decision not empty (null or ""); an
  unparseable output is kept as text and counts as that agent missing its
  fields - never a crash;
* valid agents are grouped by their value of the decision field; the largest
  group's size is the stage's *support*; quorum needs support >= required;
* conflicts are the aggregator's reported conflicts plus every dissent from
  the largest group (named in full while it has at most
  ``SPELLED_OUT_TOP`` agents, else by its size and first agent: the
  agreements name it once).

Status, by precedence ok > conflict > degraded > no_consensus:

* ``ok``: every expected agent valid, one group, no reported conflicts, and
  the aggregator (if the stage has one) valid, its ``consensus`` (if any)
  an object;
* ``conflict``: the aggregator reported conflicts, or agents dissent and the
  largest group falls short of quorum;
* ``degraded``: quorum is met but something is missing, invalid or outvoted;
* ``no_consensus``: too few valid agents agree for quorum.

``ok`` and ``degraded`` advance the pipeline; the others halt it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from messages import AgentOutput, DecisionStatus

from ._pipeline import StageSpec

ADVANCING: frozenset[str] = frozenset({"ok", "degraded"})

# A conflict line names the largest group's agents only while it is this
# small: each dissenting group's line spelled it out again, so the text grew
# as the square of the panel (12,000 agents stored a 37 MB verdict).  Above
# it the line counts them; the agreements line lists them once.
SPELLED_OUT_TOP = 8

_FENCE = re.compile(r"```(?:json)?\s*\n(.*?)```", re.DOTALL)


def parse_output(content: str) -> dict[str, Any] | None:
    """The JSON object in an agent's answer, or ``None``.

    Tries the whole text, then a fenced ```json block, then the outermost
    ``{...}`` span, then the first whole object from each ``{``.  Only a
    JSON *object* counts, and out of prose (all but the first) only one
    holding ``stage``, as every answer does.
    """
    found = _extract(content)
    return found[1] if found is not None else None


def extract_json_text(content: str) -> str | None:
    """The text of the JSON object :func:`parse_output` reads in
    ``content`` (the whole answer when it is one), or ``None``."""
    found = _extract(content)
    return found[0] if found is not None else None


def _extract(content: str) -> tuple[str, dict[str, Any]] | None:
    for text, whole in _candidates(content):
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # nested past the parser's depth: text, not a crash
            continue
        # A part of the answer is the answer only if it reads as one (see
        # _first_object): "cfg = {}" made prose a JSON answer, and a fenced
        # example ({"debug": true}) an answer cut at its token limit whole.
        if isinstance(value, dict) and (whole or "stage" in value):
            return text, value
    return _first_object(content)


# How many '{' an answer may open before the object scan gives up: each try
# reads on from there (an answer of braces alone would be quadratic).
_OBJECT_STARTS = 32
_DECODER = json.JSONDecoder()


def _first_object(content: str) -> tuple[str, dict[str, Any]] | None:
    """The first whole JSON object in ``content`` that holds a ``stage``
    (every answer's does), read from each '{' on and ending where the
    object does: prose, JSON and then a stray brace (a smiley, '{:)}')
    spoilt the outermost span, and a good answer counted as invalid.  (The
    reference takes an object starting with ``"stage"``, matched by brace
    depth.)  Objects without one are parts of something else - an item of
    an answer cut short, a ``{}`` in prose - and are not the answer."""
    start = content.find("{")
    for _ in range(_OBJECT_STARTS):
        if start < 0:
            return None
        try:
            value, end = _DECODER.raw_decode(content, start)
        except (ValueError, RecursionError):
            pass
        else:
            if isinstance(value, dict) and "stage" in value:
                return content[start:end], value
        start = content.find("{", start + 1)
    return None


def _candidates(content: str) -> Iterator[tuple[str, bool]]:
    # Lazily, in order: an answer that is one JSON object (every agent's
    # and the simulator's, and read twice per turn) costs no regex scan.
    # (text, whether it is all the answer: a part of one - a fenced block,
    # a span - is the answer only if it reads as one)
    yield content, True
    for m in _FENCE.finditer(content):
        yield m.group(1), False
    start, end = content.find("{"), content.rfind("}")
    if 0 <= start < end:
        yield content[start : end + 1], False


# json.dumps with keyword arguments builds a JSONEncoder per call (once per
# agent per stage here); one built once encodes the same bytes.
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode


# What models write for "nothing" in a list they were asked for: "conflicts":
# "None" halted a stage as a conflict named "None".
_NOTHING_WORDS = frozenset({"none", "n/a", "na", "nil", "null", "-", "no conflicts", "nothing"})


def _none(value: Any) -> bool:
    # null, false, 0, "", "  ", {}, [] and "none": nothing reported
    if isinstance(value, str):
        return value.strip().lower().rstrip(".") in _NOTHING_WORDS or not value.strip()
    return not value


def _no_decision(value: Any) -> bool:
    # null, "" and "  ": no decision made (agents all answering "" "agreed"
    # and the stage passed).  false, 0, [] and {} are decisions: "issues":
    # [] is analyze's "none found".
    if isinstance(value, str):
        return not value.strip()
    return value is None


def _str_list(value: Any) -> list[str]:
    if _none(value):
        return []
    if not isinstance(value, list):
        # "conflicts": "big disagreement" is one conflict, not none: read
        # as an empty list, the stage passed as "ok".
        value = [value]
    # Items read alike: [""], [null] or [false] is none either.
    return [item if isinstance(item, str) else _canonical(item) for item in value if not _none(item)]


@attrs.frozen(kw_only=True, slots=True)
class Verdict:
    """What :func:`compute_verdict` found in a stage's accepted outputs:
    the status, who answered and who did not, agreements and conflicts,
    and the quorum's support; ``to_json`` is the form stored with the
    decision (and digested)."""

    stage: str
    status: DecisionStatus
    expected_agents: tuple[str, ...]
    present_agents: tuple[str, ...]
    missing_agents: tuple[str, ...]
    invalid_agents: Mapping[str, tuple[str, ...]]  # agent -> missing required fields
    agreements: tuple[str, ...]
    conflicts: tuple[str, ...]
    aggregator: str | None
    decision_field: str
    quorum: str
    quorum_required: int
    support: int
    outputs: Mapping[str, str]  # agent -> SHA-256 of the accepted content

    @property
    def advances(self) -> bool:
        return self.status in ADVANCING

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "status": self.status,
            "expected_agents": list(self.expected_agents),
            "present_agents": list(self.present_agents),
            "missing_agents": list(self.missing_agents),
            "invalid_agents": {a: list(f) for a, f in sorted(self.invalid_agents.items())},
            "agreements": list(self.agreements),
            "conflicts": list(self.conflicts),
            "aggregator": self.aggregator,
            "decision_field": self.decision_field,
            "quorum": self.quorum,
            "quorum_required": self.quorum_required,
            "support": self.support,
            "outputs": dict(sorted(self.outputs.items())),
        }


def compute_verdict(stage: StageSpec, outputs: Mapping[str, AgentOutput]) -> Verdict:
    """The verdict for ``stage`` given each agent's accepted output (agents
    absent from ``outputs`` are missing).  Outputs from agents outside the
    stage's panel are ignored."""
    expected = stage.agents
    present = tuple(a for a in expected if a in outputs)
    missing = tuple(a for a in expected if a not in outputs)

    parsed: dict[str, dict[str, Any]] = {}
    invalid: dict[str, tuple[str, ...]] = {}
    for agent in present:
        body = parse_output(outputs[agent].content)
        if body is None:
            invalid[agent] = stage.required_fields
            continue
        # An empty decision is none: agents all answering null "agreed".
        lacking = tuple(
            f for f in stage.required_fields if f not in body or (f == stage.decision_field and _no_decision(body[f]))
        )
        if lacking:
            invalid[agent] = lacking
        parsed[agent] = body
    valid = [a for a in present if a not in invalid]

    groups: dict[str, list[str]] = {}
    for agent in valid:
        groups.setdefault(_canonical(parsed[agent].get(stage.decision_field)), []).append(agent)
    ranked = sorted(groups.values(), key=lambda g: (-len(g), g))
    support = len(ranked[0]) if ranked else 0
    required = stage.quorum_required

    agreements: list[str] = []
    conflicts: list[str] = []
    aggregator_ok = True
    if stage.aggregator is not None:
        body = parsed.get(stage.aggregator)
        aggregator_ok = stage.aggregator in valid
        if body is not None:
            consensus = body.get("consensus")
            if isinstance(consensus, Mapping):
                agreements.extend(_str_list(consensus.get("agreements")))
                conflicts.extend(_str_list(consensus.get("conflicts")))
            elif not _none(consensus):
                # "consensus": "conflict: ..." or a list: not the object
                # asked for, so nothing it says can be read - ignored, the
                # stage passed as ok.  The aggregator has not done its part.
                aggregator_ok = False
    reported_conflicts = bool(conflicts)
    if len(ranked) > 1 or support >= 2:
        top = ranked[0]
        top_names = ", ".join(sorted(top))
        if len(top) >= 2:
            agreements.append(f"{stage.decision_field}: agreed by {top_names}")
        # Counted, the group is named by its first agent too: with two
        # groups of the same size (a tie at the top) "the 9 agents
        # agreeing" could be either, and `decisions` shows the conflicts
        # without the agreements that list them.
        against = (
            top_names
            if len(top) <= SPELLED_OUT_TOP
            else f"the {len(top):,} agents agreeing ({min(top)} and {len(top) - 1:,} more)"
        )
        for group in ranked[1:]:
            conflicts.append(f"{stage.decision_field}: {', '.join(sorted(group))} disagree(s) with {against}")
    dissent = len(ranked) > 1
    # Two answers tied at the top, each with the quorum behind it (a quorum
    # of half the panel or less): neither is the decision, whatever the
    # agents' names.  A larger group still outvotes a smaller one.
    contested = dissent and len(ranked[1]) == support >= required

    status: DecisionStatus
    if not missing and not invalid and not dissent and not reported_conflicts and aggregator_ok:
        status = "ok"
    elif reported_conflicts or contested or (dissent and support < required):
        status = "conflict"
    elif support >= required:
        status = "degraded"
    else:
        status = "no_consensus"

    return Verdict(
        stage=stage.name,
        status=status,
        expected_agents=expected,
        present_agents=present,
        missing_agents=missing,
        invalid_agents=invalid,
        agreements=tuple(sorted(set(agreements))),
        conflicts=tuple(sorted(set(conflicts))),
        aggregator=stage.aggregator,
        decision_field=stage.decision_field,
        quorum=stage.quorum.describe(),
        quorum_required=required,
        support=support,
        outputs={
            a: hashlib.sha256(outputs[a].content.encode()).hexdigest() for a in present
        },
    )
