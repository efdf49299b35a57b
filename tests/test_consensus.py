"""Consensus computed for real: one test per status, plus unparseable output."""

from __future__ import annotations

import json
from typing import Any

import pytest

from actors import compute_verdict, parse_output, parse_pipeline
from messages import AgentKey, AgentOutput

PIPELINE = parse_pipeline(
    """
    [[stages]]
    name = "audit"
    agents = ["gemini", "claude", "gpt_pro"]
    mode = "parallel"
    """
)
STAGE = PIPELINE.stage("audit")


def out(agent: str, content: str) -> AgentOutput:
    return AgentOutput(
        key=AgentKey(run_id="r", branch_id="b", stage="audit", agent=agent),
        attempt=1,
        status="accepted",
        content=content,
        format="json",
        usage=None,
        model="m",
        provider="sim",
    )


def answer(agent: str, verdict: str = "pass", **extra: Any) -> AgentOutput:
    body = {"stage": "audit", "agent": agent, "audit_verdict": verdict, **extra}
    return out(agent, json.dumps(body))


def aggregator(verdict: str = "pass", conflicts: list[str] | None = None) -> AgentOutput:
    return answer(
        "gpt_pro",
        verdict,
        consensus={"agreements": ["security reviewed"], "conflicts": conflicts or []},
    )


def test_ok() -> None:
    v = compute_verdict(STAGE, {"gemini": answer("gemini"), "claude": answer("claude"), "gpt_pro": aggregator()})
    assert v.status == "ok" and v.advances
    assert v.missing_agents == () and v.conflicts == () and dict(v.invalid_agents) == {}
    assert "security reviewed" in v.agreements
    assert "audit_verdict: agreed by claude, gemini, gpt_pro" in v.agreements
    assert v.support == 3 and v.quorum_required == 2
    assert set(v.outputs) == {"gemini", "claude", "gpt_pro"}


def test_degraded_with_a_missing_agent() -> None:
    v = compute_verdict(STAGE, {"gemini": answer("gemini"), "gpt_pro": aggregator()})
    assert v.status == "degraded" and v.advances
    assert v.missing_agents == ("claude",)
    assert v.present_agents == ("gemini", "gpt_pro")
    assert v.conflicts == ()


def test_degraded_when_a_dissenter_is_outvoted() -> None:
    v = compute_verdict(STAGE, {"gemini": answer("gemini", "fail"), "claude": answer("claude"), "gpt_pro": aggregator()})
    assert v.status == "degraded"
    assert v.conflicts == ("audit_verdict: gemini disagree(s) with claude, gpt_pro",)


def test_conflict_when_no_group_reaches_quorum() -> None:
    v = compute_verdict(
        STAGE,
        {"gemini": answer("gemini", "fail"), "claude": answer("claude", "pass"), "gpt_pro": aggregator("unsure")},
    )
    assert v.status == "conflict" and not v.advances
    assert v.support == 1
    assert len(v.conflicts) == 2


def test_conflict_reported_by_the_aggregator() -> None:
    v = compute_verdict(
        STAGE,
        {"gemini": answer("gemini"), "claude": answer("claude"), "gpt_pro": aggregator(conflicts=["scope differs"])},
    )
    assert v.status == "conflict"
    assert v.conflicts == ("scope differs",)


def test_no_consensus_when_too_few_agents_answer() -> None:
    v = compute_verdict(STAGE, {"gemini": answer("gemini")})
    assert v.status == "no_consensus" and not v.advances
    assert v.missing_agents == ("claude", "gpt_pro")
    assert v.support == 1 and v.quorum_required == 2


def test_unparseable_output_is_text_and_missing_its_fields() -> None:
    v = compute_verdict(
        STAGE, {"gemini": out("gemini", "I think it passes, mostly."), "claude": answer("claude"), "gpt_pro": aggregator()}
    )
    assert v.status == "degraded"
    assert v.invalid_agents["gemini"] == STAGE.required_fields
    assert "gemini" in v.present_agents and v.missing_agents == ()


def test_missing_required_field_makes_an_agent_invalid() -> None:
    body = json.dumps({"stage": "audit", "agent": "claude"})
    v = compute_verdict(STAGE, {"gemini": answer("gemini"), "claude": out("claude", body), "gpt_pro": aggregator()})
    assert v.invalid_agents == {"claude": ("audit_verdict",)}
    assert v.status == "degraded"


def test_quorum_all_turns_any_dissent_into_conflict() -> None:
    stage = parse_pipeline('[[stages]]\nname = "audit"\nquorum = "all"').stage("audit")
    v = compute_verdict(stage, {"gemini": answer("gemini", "fail"), "claude": answer("claude"), "gpt_pro": aggregator()})
    assert v.status == "conflict"


def test_two_answers_each_with_a_quorum_are_a_conflict_not_a_pick_by_name() -> None:
    """4 agents, quorum 2, answers A A B B: both groups reached the quorum
    and the one with the alphabetically first agents was "the" decision."""
    stage = parse_pipeline(
        '[[stages]]\nname = "audit"\nagents = ["gemini", "claude", "gpt_pro", "gpt_codex"]\nquorum = 2\naggregator = ""'
    ).stage("audit")
    for first, second in (("pass", "fail"), ("fail", "pass")):
        v = compute_verdict(stage, {
            "claude": answer("claude", first), "gemini": answer("gemini", first),
            "gpt_codex": answer("gpt_codex", second), "gpt_pro": answer("gpt_pro", second),
        })
        assert v.status == "conflict", (first, second)
    # Short of a tie, the larger group decides as before, even where the
    # smaller one reaches the quorum too (3 against 2 at quorum 2).
    five = parse_pipeline(
        '[[stages]]\nname = "audit"\nagents = ["gemini", "claude", "gpt_pro", "gpt_codex", "code"]\n'
        'quorum = 2\naggregator = ""'
    ).stage("audit")
    v = compute_verdict(five, {
        "claude": answer("claude"), "gemini": answer("gemini"), "code": answer("code"),
        "gpt_codex": answer("gpt_codex", "fail"), "gpt_pro": answer("gpt_pro", "fail"),
    })
    assert v.status == "degraded"


def test_two_agents_that_agree_are_recorded_as_agreeing() -> None:
    stage = parse_pipeline('[[stages]]\nname = "audit"\nagents = ["gemini", "claude"]').stage("audit")
    v = compute_verdict(stage, {"gemini": answer("gemini"), "claude": answer("claude")})
    assert v.status == "ok" and v.agreements == ("audit_verdict: agreed by claude, gemini",)


def test_a_tie_reads_the_same_whatever_order_the_answers_came_in() -> None:
    """The verdict (and so the digest) must not depend on the order the
    panel answered in: tied groups are ranked by their agents' names."""
    stage = parse_pipeline(
        '[[stages]]\nname = "audit"\nagents = ["gemini", "claude", "gpt_pro", "gpt_codex"]\nquorum = 2\naggregator = ""'
    ).stage("audit")
    answers = {
        "gpt_codex": answer("gpt_codex", "fail"), "gpt_pro": answer("gpt_pro", "fail"),
        "claude": answer("claude"), "gemini": answer("gemini"),
    }
    forward = compute_verdict(stage, answers)
    backward = compute_verdict(stage, dict(reversed(list(answers.items()))))
    assert forward.conflicts == backward.conflicts == (
        "audit_verdict: gpt_codex, gpt_pro disagree(s) with claude, gemini",
    )
    assert forward.to_json() == backward.to_json()


def test_a_null_decision_is_no_decision() -> None:
    # All three answering "audit_verdict": null "agreed": the stage was ok.
    v = compute_verdict(STAGE, {a: out(a, json.dumps({"stage": "audit", "agent": a, "audit_verdict": None}))
                                for a in ("gemini", "claude", "gpt_pro")})
    assert v.status == "no_consensus" and set(v.invalid_agents) == {"gemini", "claude", "gpt_pro"}


@pytest.mark.parametrize("conflicts", ["big disagreement", {"scope": "differs"}])
def test_an_aggregator_conflict_that_is_not_a_list_still_counts(conflicts: Any) -> None:
    agg = answer("gpt_pro", consensus={"agreements": [], "conflicts": conflicts})
    v = compute_verdict(STAGE, {"gemini": answer("gemini"), "claude": answer("claude"), "gpt_pro": agg})
    assert v.status == "conflict" and len(v.conflicts) == 1


@pytest.mark.parametrize("conflicts", [None, False, 0, "", "   ", {}, [], [""], ["  "], [None], [False], [0], [{}], [[]]])
def test_an_aggregator_saying_none_in_any_spelling_reports_no_conflict(conflicts: Any) -> None:
    agg = answer("gpt_pro", consensus={"agreements": [], "conflicts": conflicts})
    v = compute_verdict(STAGE, {"gemini": answer("gemini"), "claude": answer("claude"), "gpt_pro": agg})
    assert v.status == "ok" and v.conflicts == ()


def test_verdict_json_is_canonical() -> None:
    v = compute_verdict(STAGE, {"gemini": answer("gemini"), "claude": answer("claude"), "gpt_pro": aggregator()})
    data = v.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["status"] == "ok" and data["expected_agents"] == ["gemini", "claude", "gpt_pro"]


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1}',
        'Here you go:\n```json\n{"stage": "plan", "a": 1}\n```\nDone.',
        'prefix {"stage": "plan", "a": 1} suffix',
    ],
)
def test_parse_output_finds_the_object(text: str) -> None:
    body = parse_output(text)
    assert body is not None and body["a"] == 1


def test_an_object_in_prose_is_the_answer_only_if_it_reads_as_one() -> None:
    # As the reference: a raw object in prose is taken when it holds the
    # stage every answer names; '{"a": 1}' there is part of the prose.
    assert parse_output('prefix {"a": 1} suffix') is None
    # Nor a fenced example before an answer cut at its token limit: taken
    # for the answer, the cut answer looked complete.
    cut = 'For example:\n```json\n{"debug": true}\n```\n{"stage": "plan", "agent": "a", "work_breakdown": "1. sca'
    assert parse_output(cut) is None


@pytest.mark.parametrize("text", ["", "no json", "[1, 2]", "{broken", '"string"'])
def test_parse_output_rejects_non_objects(text: str) -> None:
    assert parse_output(text) is None


def test_later_agents_see_an_earlier_answers_json_in_full_and_raw_text_cut() -> None:
    """Every earlier answer was cut at 5,000 characters: a long plan reached
    the aggregator as JSON that no longer closed.  As the reference does,
    the JSON object an answer holds is passed in full (without the prose
    around it); only an answer without one is cut."""
    from actors._agent import build_prompt, for_later_agents
    from messages import AgentRequest, PriorOutput

    plan = {"stage": "plan", "agent": "gemini", "work_breakdown": "W" * 8000, "acceptance_mapping": "m"}
    long_json = "Here is my plan:\n" + json.dumps(plan) + "\nThanks."
    prose = "no JSON here " * 1000
    request = AgentRequest(
        key=AgentKey(run_id="r", branch_id="b", stage="plan", agent="claude"),
        spec_id="S",
        goal="g",
        context=tuple(
            PriorOutput(agent=a, content=for_later_agents(c)) for a, c in (("gemini", long_json), ("code", prose))
        ),
    )
    prompt = build_prompt(request, ("work_breakdown",), aggregate=False)
    assert f"Earlier answer from gemini:\n{json.dumps(plan)}\n" in prompt
    assert "Here is my plan" not in prompt
    assert f"Earlier answer from code:\n{prose[:5000]}" in prompt and prose[:5001] not in prompt


def test_a_halt_message_names_five_conflicts_each_cut() -> None:
    """30,000 reported conflicts made a 229 KB one-line halt message,
    stored with the run and printed whole; 'decisions' shows them all."""
    from actors._runtime import halt_message
    from messages import Decision, StageKey

    conflicts = [f"conflict {i} " + "x" * 1000 for i in range(30_000)]
    decision = Decision(
        key=StageKey(run_id="r", branch_id="b", stage="plan"), seq=1, status="conflict", verdict={"conflicts": conflicts}
    )
    message = halt_message("r", decision)
    assert len(message) < 2500
    assert "conflict 0 " in message and "conflict 4 " in message and "conflict 5 " not in message
    assert "and 29995 more" in message and "conclave rerun r --from plan" in message


def test_a_halt_for_too_few_agreeing_names_who_failed_and_who_answered_without_fields() -> None:
    """Every agent failing (a bad request) or answering prose read
    'only 0 agent(s) agree, quorum needs 2', naming no cause."""
    from actors._runtime import halt_message
    from messages import Decision, StageKey

    key = StageKey(run_id="r", branch_id="b", stage="plan")
    failed = Decision(key=key, seq=1, status="no_consensus", verdict={
        "support": 0, "quorum_required": 2, "missing_agents": [f"a{i}" for i in range(7)],
    })
    message = halt_message("r", failed)
    assert "quorum needs 2; no answer from a0, a1, a2, a3, a4 and 2 more)" in message
    assert "'conclave events r --kind gave_up'" in message
    prose = Decision(key=key, seq=1, status="no_consensus", verdict={
        "support": 1, "quorum_required": 2, "missing_agents": [], "invalid_agents": {"claude": ["stage"]},
    })
    message = halt_message("r", prose)
    assert "quorum needs 2; answers without the stage's fields from claude)" in message
    assert "gave_up" not in message


def test_an_object_followed_by_a_stray_brace_is_still_read() -> None:
    """Prose, the JSON object, then '{:)}': the outermost span from the
    first '{' to the last '}' was no JSON, and a good answer counted as
    invalid.  The first whole object is read, as the reference matches
    braces by depth."""
    body = {"stage": "plan", "agent": "claude", "work_breakdown": "a {b} c", "acceptance_mapping": "m"}
    answer = "Here it is:\n" + json.dumps(body) + "\nHope that helps {:)}"
    assert parse_output(answer) == body
    assert parse_output("{:)} " + json.dumps(body)) == body
    assert parse_output("no object {:)} here") is None
    assert parse_output("{" * 100_000) is None  # gives up, without reading it 100,000 times


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_decision_is_no_decision(empty: Any) -> None:
    """Agents all answering "" "agreed", and the stage passed as ok; only
    null counted as no decision."""
    v = compute_verdict(
        STAGE, {"gemini": answer("gemini", empty), "claude": answer("claude", empty), "gpt_pro": aggregator(empty)}
    )
    assert v.status == "no_consensus" and set(v.invalid_agents) == {"gemini", "claude", "gpt_pro"}
    # false is a decision (an unlock_decision may well be false), and so is
    # an empty list ("issues": [] is analyze's "none found").
    for decided in (False, 0, [], {}):
        v = compute_verdict(
            STAGE, {"gemini": answer("gemini", decided), "claude": answer("claude", decided), "gpt_pro": aggregator(decided)}
        )
        assert v.status == "ok", decided


@pytest.mark.parametrize("nothing", ["none", "None", "N/A", "none."])
def test_an_aggregator_writing_none_for_its_conflicts_reports_none(nothing: str) -> None:
    body = {"stage": "audit", "agent": "gpt_pro", "audit_verdict": "pass",
            "consensus": {"agreements": ["x"], "conflicts": nothing}}
    v = compute_verdict(STAGE, {"gemini": answer("gemini"), "claude": answer("claude"), "gpt_pro": out("gpt_pro", json.dumps(body))})
    assert v.status == "ok" and v.conflicts == ()


@pytest.mark.parametrize("consensus", ["conflict: scope differs", ["scope differs"]])
def test_a_consensus_that_is_not_an_object_does_not_pass_as_ok(consensus: Any) -> None:
    """Ignored, it let the stage pass as ok whatever it said."""
    body = {"stage": "audit", "agent": "gpt_pro", "audit_verdict": "pass", "consensus": consensus}
    v = compute_verdict(STAGE, {"gemini": answer("gemini"), "claude": answer("claude"), "gpt_pro": out("gpt_pro", json.dumps(body))})
    assert v.status == "degraded"


def test_the_object_scan_takes_no_part_of_something_else_for_the_answer() -> None:
    """The scan for a whole object took any: an item of an answer cut at
    its token limit ({"id": 1, ...}) made the cut answer look complete, and
    a '{}' in prose made the prose a JSON answer."""
    cut = '{"stage": "tasks", "agent": "a", "tasks": [{"id": 1, "title": "scaffold"}, {"id": 2, "title": "wire the'
    assert parse_output(cut) is None
    assert parse_output("Set it up with cfg = {} and then run it.") is None


def _panel(names: list[str]) -> Any:
    from actors._pipeline import pipeline_from_dict

    return pipeline_from_dict(
        {
            "agents": {n: {"provider": "sim", "model": "sim-model"} for n in names},
            "stages": [{"name": "audit", "agents": names, "mode": "parallel", "aggregator": ""}],
        },
        source="a test panel",
    ).stage("audit")


def test_a_wide_panels_conflict_text_grows_linearly() -> None:
    """Every dissenting group's line named the whole top group again: the
    text grew as the square of the panel (12,000 agents stored a 37 MB
    verdict).  A large top group is named once, in the agreements."""
    names = [f"a{i:04d}" for i in range(2_000)]
    stage = _panel(names)
    top, lone, crowd = names[:1_100], names[1_100:1_600], names[1_600:]
    outputs = {a: answer(a, "pass") for a in top}
    outputs |= {a: answer(a, f"fail {a}") for a in lone}  # 500 groups of one
    outputs |= {a: answer(a, "maybe") for a in crowd}  # one group of 400
    v = compute_verdict(stage, outputs)
    assert v.status == "degraded" and v.support == 1_100
    assert len(v.conflicts) == 501
    against = "the 1,100 agents agreeing (a0000 and 1,099 more)"
    assert f"audit_verdict: a1100 disagree(s) with {against}" in v.conflicts
    assert f"audit_verdict: {', '.join(crowd)} disagree(s) with {against}" in v.conflicts
    assert f"audit_verdict: agreed by {', '.join(top)}" in v.agreements
    # Quadratic text was about 3.3 MB here: 501 lines of 1,100 names.
    text = sum(map(len, v.conflicts)) + sum(map(len, v.agreements))
    assert text < 30 * len(names)


@pytest.mark.parametrize("agreeing", [2, 8])
def test_a_small_panels_conflicts_still_name_the_agreeing_agents(agreeing: int) -> None:
    names = [f"a{i}" for i in range(agreeing)] + ["z"]
    v = compute_verdict(_panel(names), {a: answer(a, "fail" if a == "z" else "pass") for a in names})
    assert v.conflicts == (f"audit_verdict: z disagree(s) with {', '.join(names[:-1])}",)


def test_nine_agreeing_are_counted_in_a_conflict() -> None:
    names = [f"a{i}" for i in range(9)] + ["z"]
    v = compute_verdict(_panel(names), {a: answer(a, "fail" if a == "z" else "pass") for a in names})
    assert v.conflicts == ("audit_verdict: z disagree(s) with the 9 agents agreeing (a0 and 8 more)",)
    assert v.agreements == (f"audit_verdict: agreed by {', '.join(names[:-1])}",)


def test_two_large_groups_tied_at_the_top_can_be_told_apart() -> None:
    """Two groups of nine tied at the top (and a lone dissenter): every
    line read "... disagree(s) with the 9 agents agreeing", which could be
    either group - the one listed in the agreements, or the nine the line
    had just named."""
    first, second = [f"a{i}" for i in range(9)], [f"b{i}" for i in range(9)]
    outputs = {a: answer(a, "pass") for a in first} | {b: answer(b, "fail") for b in second}
    v = compute_verdict(_panel([*first, *second, "z"]), outputs | {"z": answer("z", "maybe")})
    assert v.status == "conflict"
    against = "the 9 agents agreeing (a0 and 8 more)"
    assert v.conflicts == (
        f"audit_verdict: {', '.join(second)} disagree(s) with {against}",
        f"audit_verdict: z disagree(s) with {against}",
    )


def test_decision_values_group_by_the_canonical_json_dumps_gives() -> None:
    # _canonical is a prebuilt encoder now; its bytes must stay json.dumps'.
    import datetime
    import decimal
    import json

    from actors._consensus import _canonical

    for value in (None, "x", "é\u2028", 1, 1.5, [1, {"b": 2, "a": [True, None]}], ("t",),
                  {"z": decimal.Decimal("1.2"), "a": datetime.date(2020, 1, 1)}, {2: 1, 1: 2}):
        assert _canonical(value) == json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
