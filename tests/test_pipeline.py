from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors import (
    AgentSpec,
    MockProvider,
    PipelineError,
    SimulatedProvider,
    canonical_agent,
    canonical_stage,
    compute_verdict,
    default_pipeline,
    open_orchestrator,
    parse_pipeline,
    pipeline_with_panel,
)
from messages import AgentKey, AgentOutput, Completion, CompletionRequest


def test_default_pipeline_matches_the_reference() -> None:
    p = default_pipeline()
    assert p.stage_names == ("plan", "tasks", "implement", "validate", "audit", "unlock")
    for name in ("plan", "tasks", "validate", "audit", "unlock"):
        assert p.stage(name).agents == ("gemini", "claude", "gpt_pro")
    assert p.stage("implement").agents == ("gemini", "claude", "gpt_codex", "gpt_pro")
    assert [p.stage(s).mode for s in p.stage_names] == ["sequential"] * 3 + ["parallel"] * 3
    assert all(p.stage(s).aggregator == "gpt_pro" for s in p.stage_names)
    assert p.stage("plan").required_fields == ("stage", "agent", "work_breakdown", "acceptance_mapping")
    assert p.stage("tasks").required_fields[-1] == "tasks"
    assert p.stage("implement").required_fields[-1] == "implementation"
    assert p.stage("validate").required_fields[-1] == "test_strategy"
    assert p.stage("audit").required_fields[-1] == "audit_verdict"
    assert p.stage("unlock").required_fields[-1] == "unlock_decision"


def test_name_normalisation_follows_the_reference() -> None:
    assert canonical_agent("Claude-Code") == "claude"
    assert canonical_agent("gpt-5-codex") == "gpt_codex"
    assert canonical_agent("GPT Pro") == "gpt_pro"
    assert canonical_agent("llama") is None
    assert canonical_stage("spec-plan") == "plan"
    assert canonical_stage("Review") == "audit"
    assert canonical_stage("deploy") is None


def test_toml_pipeline() -> None:
    p = parse_pipeline(
        """
        [defaults]
        quorum = "all"

        [agents.gemini]
        model = "gemini-2.5-flash"

        [[stages]]
        name = "plan"
        agents = ["gemini", "Claude"]
        mode = "parallel"
        aggregator = "claude"

        [[stages]]
        name = "deploy"
        agents = ["gemini", "claude", "gpt_pro"]
        required_fields = ["target"]
        quorum = 2
        """
    )
    assert p.stage_names == ("plan", "deploy")
    plan = p.stage("plan")
    assert plan.agents == ("gemini", "claude") and plan.mode == "parallel"
    assert plan.quorum_required == 2 and plan.aggregator == "claude"
    deploy = p.stage("deploy")
    assert deploy.required_fields == ("stage", "agent", "target")
    assert deploy.decision_field == "target" and deploy.quorum_required == 2
    assert p.agents["gemini"].model == "gemini-2.5-flash"
    assert p.resolve_stage("Spec-Plan") is plan


def test_a_panel_without_the_default_aggregator_has_none() -> None:
    # As the README says: its conflicts are only the coordinator's own.
    p = parse_pipeline('[[stages]]\nname = "plan"\nagents = ["gemini", "claude"]\n')
    assert p.stage("plan").aggregator is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[stages]\nname=", "invalid TOML"),
        ("stages = []", "at least one"),
        ('[[stages]]\nname = "deploy"', "unknown stage"),
        ('[[stages]]\nname = "plan"\nagents = ["llama"]', "unknown agent 'llama'"),
        ('[[stages]]\nname = "plan"\nquorum = 4', "quorum 4 is larger than the panel of 3"),
        ('[[stages]]\nname = "plan"\nquorum = 0', "at least 1"),
        ('[[stages]]\nname = "plan"\ndecision_field = "agent"', "decision_field 'agent' differs for every agent"),
        # At a quorum of 1 every answer tied with every other: always a conflict.
        ('[[stages]]\nname = "d"\nrequired_fields = ["x"]\ndecision_field = "agent"\nquorum = 1', "3 agents can never agree"),
        ('[[stages]]\nname = "d"\nrequired_fields = ["x"]\naggregator = 0', "aggregator must be an agent name"),
        ('[defaults]\naggregator = 0\n[[stages]]\nname = "plan"', "[defaults]: aggregator must be an agent name"),
        ('[agents.x]\nmodel = 5\n[[stages]]\nname = "plan"\nagents = ["x"]', "agent 'x': model must be a string, got 5"),
        ('[[stages]]\nname = "d"\nrequired_fields = ["t\\u001b[31m"]', "a field's name ('t\\x1b[31m') must be"),
        ('[[stages]]\nname = "d"\nrequired_fields = ["x"]\ndecision_field = "a\\nb"', "a field's name ('a\\nb') must be"),
        # The stage's own name: every agent "agreed", at any disagreement.
        ('[[stages]]\nname = "plan"\ndecision_field = "stage"', "decision_field 'stage' is the same for every agent"),
        ('[[stages]]\nname = "deploy"\nrequired_fields = []', "with no required_fields, the stage is the same"),
        # At a quorum of 1 as well: a dissent on the field it stands for passed as ok.
        ('[[stages]]\nname = "plan"\ndecision_field = "stage"\nquorum = 1', "decision_field 'stage' is the same for every agent"),
        ('[[stages]]\nname = "deploy"\nrequired_fields = []\nquorum = 1', "with no required_fields, the stage is the same"),
        ('[[stages]]\nname = "plan"\nquorum = "most"', "quorum must be"),
        ('[[stages]]\nname = "plan"\nquorum = 2.5', "or a whole number, got 2.5"),
        ('[[stages]]\nname = "plan"\nquorum = true', "or a whole number, got True"),
        # Printed as "datetime.date(1979, 5, 27)".
        ('[[stages]]\nname = "plan"\nquorum = 1979-05-27', "or a whole number, got 1979-05-27 (date)"),
        # Blamed on the stage, which set no quorum of its own.
        ('[defaults]\nquorum = 4\n[[stages]]\nname = "plan"', "stage 'plan': quorum 4 (from [defaults]) is larger"),
        # Printed in banners and put into prompts: ESC drove the terminal.
        ('[[stages]]\nname = "de\\u001bploy"\nrequired_fields = ["x"]', "a stage's name must be at most 100 printable"),
        ('[agents."a\\nb"]\nmodel = "m"\n[[stages]]\nname = "plan"\nagents = ["a\\nb"]', "an agent's name must be"),
        ('[agents.x]\nmodel = "  "\n[[stages]]\nname = "plan"\nagents = ["x"]', "agent 'x': needs a model"),
        ('[[stages]]\nname = "plan"\nmode = "async"', "mode must be"),
        ('[[stages]]\nname = "plan"\naggregator = "gpt_codex"', "not in the stage's agents"),
        ('[[stages]]\nname = "plan"\n[[stages]]\nname = "Plan"', "listed twice"),
        ('[[stages]]\nname = "plan"\nagents = ["gemini", "gemini"]', "listed twice"),
        ('[[stages]]\nname = "plan"\nagents = ["gpt", "gpt-5"]', "agent 'gpt_pro' is listed twice ('gpt', 'gpt-5')"),
        ('[defaults]\nagents = "claude"\n[[stages]]\nname = "plan"', "[defaults]: agents: must be a list"),
        ('[agents." "]\nmodel = "m"\n[[stages]]\nname = "plan"\nagents = [" "]', "not blank"),
        ('[[stages]]\nname = "plan"\ncolour = "blue"', "unknown key(s) colour"),
        (
            '[agents.Gemini]\nmodel = "gemini-2.5-flash"\n[[stages]]\nname = "plan"',
            "'Gemini' declared under [agents] but listed by no stage ([agents.gemini] sets gemini's model)",
        ),
        ('[agents.gemnii]\nmodel = "m"\n[[stages]]\nname = "plan"', "'gemnii' declared under [agents] but listed by no stage"),
        ('oops = 1\n[[stages]]\nname = "plan"', "unknown key(s) oops"),
        ('[defaults]\nagent = ["claude"]\n[[stages]]\nname = "plan"', "[defaults]: unknown key(s) agent"),
        # Checked even when every stage overrides them (they used to pass).
        ('[defaults]\nmode = "async"\n[[stages]]\nname = "plan"\nmode = "parallel"', "[defaults]: mode must be"),
        ('[defaults]\nquorum = "most"\n[[stages]]\nname = "plan"\nquorum = 2', "[defaults]: quorum must be"),
        ('[defaults]\naggregator = "llama"\n[[stages]]\nname = "plan"\naggregator = "claude"',
         "[defaults]: unknown agent 'llama'"),
        ('[defaults]\nagents = ["llama"]\n[[stages]]\nname = "plan"\nagents = ["claude"]',
         "[defaults]: unknown agent 'llama'"),
        ('[defaults]\nagents = []\n[[stages]]\nname = "plan"\nagents = ["claude"]',
         "[defaults]: agents must name at least one agent"),
        ('[defaults]\nagents = ["gpt", "GPT-5"]\n[[stages]]\nname = "plan"\nagents = ["claude"]',
         "[defaults]: agent 'gpt_pro' is listed twice ('gpt', 'GPT-5')"),
    ],
)
def test_invalid_pipelines_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text, source="p.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("p.toml")


def test_one_agent_may_decide_on_its_stage_or_its_name() -> None:
    # Nobody to agree with: a custom stage with no fields of its own on one
    # agent stays valid, as its "stage" and "agent" cannot hide a dissent.
    p = parse_pipeline('[[stages]]\nname = "deploy"\nrequired_fields = []\nagents = ["claude"]\nquorum = 1')
    assert p.stages[0].decision_field == "stage"
    p = parse_pipeline('[[stages]]\nname = "plan"\ndecision_field = "agent"\nagents = ["claude"]')
    assert p.stages[0].decision_field == "agent"


def test_the_decision_field_is_required() -> None:
    p = parse_pipeline(
        '[[stages]]\nname = "review"\nrequired_fields = ["verdict"]\ndecision_field = "score"'
    )
    assert p.stages[0].required_fields == ("stage", "agent", "verdict", "score")
    # Three agents that all leave it out are invalid, not in agreement.
    outputs = {
        a: AgentOutput(
            key=AgentKey(run_id="r", branch_id="b", stage="audit", agent=a),
            attempt=1,
            status="accepted",
            content=json.dumps({"stage": "audit", "agent": a, "verdict": "pass"}),
            format="json",
            usage=None,
            model="m",
            provider="sim",
        )
        for a in p.stages[0].agents
    }
    verdict = compute_verdict(p.stages[0], outputs)
    assert verdict.status == "no_consensus"
    assert verdict.invalid_agents == {a: ("score",) for a in p.stages[0].agents}


def test_seat_providers_follow_the_agents() -> None:
    p = parse_pipeline(
        '[agents.claude]\nprovider = "b"\nmodel = "m"\n'
        '[[stages]]\nname = "plan"\nagents = ["gemini", "claude"]\n'
    )
    assert p.seat_providers("plan") == ("sim", "b")
    changed = p.with_agents({"gemini": AgentSpec(name="gemini", model="m", provider="c")})
    assert changed.seat_providers("plan") == ("c", "b") and p.seat_providers("plan") == ("sim", "b")
    assert changed == p  # derived, not part of the pipeline's identity (as its agents are not)


async def test_every_call_of_a_stage_carries_one_seat_provider_tuple(autojump_clock: object, tmp_path: Path) -> None:
    """Made once per pipeline: an agent deriving its own tuple each call was
    quadratic in the panel (a 1,000-agent stage built a million entries)."""
    sim = SimulatedProvider(seed=1)
    seen: list[tuple[str, ...]] = []

    def answer(request: CompletionRequest) -> Completion:
        seen.append(request.panel_providers)
        return sim.answer(request)

    pipeline = pipeline_with_panel("validate", [f"a{i}" for i in range(50)])
    async with open_orchestrator(store=str(tmp_path / "p.db"), provider=MockProvider(answer, name="sim"),
                                 pipeline=pipeline) as orch:
        assert (await orch.run()).completed
    assert len(seen) == 50 and seen[0] == ("sim",) * 50
    assert all(providers is seen[0] for providers in seen)


@pytest.mark.parametrize(
    "kwargs", [{"name": "claude", "model": None}, {"name": "", "model": "m"}, {"name": "a", "model": "m", "provider": 3}]
)
def test_an_agent_spec_is_checked_when_built(kwargs: dict[str, object]) -> None:
    # A model of None used to start a run and kill its metrics actor.
    with pytest.raises(PipelineError, match="must be a non-empty string"):
        AgentSpec(**kwargs)  # type: ignore[arg-type]


def test_a_panel_given_as_one_string_is_refused() -> None:
    # Iterated, "claude" was a panel of six agents: c, l, a, u, d, e.
    with pytest.raises(PipelineError, match="not the string 'claude'"):
        pipeline_with_panel("plan", "claude")


def test_pipeline_text_must_be_a_str() -> None:
    # tomllib's message for bytes said "a bytes-like object is required, not 'str'".
    with pytest.raises(PipelineError, match="must be TOML text"):
        parse_pipeline(b'[[stages]]\nname = "plan"')  # type: ignore[arg-type]


def test_a_pipeline_file_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    from actors._pipeline import load_pipeline

    path = tmp_path / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbf[[stages]]\nname = "plan"\n')
    assert load_pipeline(str(path)).stage_names == ("plan",)


def test_a_file_naming_the_known_stages_runs_the_default_pipeline() -> None:
    """Every stage a file named without agents or mode got gemini, claude
    and gpt_pro, sequential: the default pipeline written out by name ran
    another one (implement without gpt_codex - a quorum of 2 of 3 for 3 of
    4 - and validate, audit and unlock one agent after another)."""
    text = "".join(f'[[stages]]\nname = "{s}"\n' for s in ("plan", "tasks", "implement", "validate", "audit", "unlock"))
    assert parse_pipeline(text).canonical_json() == default_pipeline().canonical_json()
    quality = parse_pipeline('[[stages]]\nname = "checklist"\n[[stages]]\nname = "clarify"\n')
    assert quality.stage("checklist").agents == ("claude", "code")
    assert quality.stage("clarify").agents == ("gemini", "claude", "code")
    # What the file says still wins: [defaults], or the stage's own keys.
    chosen = parse_pipeline('[defaults]\nmode = "sequential"\nagents = ["gemini", "claude"]\n[[stages]]\nname = "audit"\n')
    assert chosen.stage("audit").mode == "sequential" and chosen.stage("audit").agents == ("gemini", "claude")


def test_a_declared_name_for_a_known_agent_beside_that_agent_is_refused() -> None:
    """[agents.GPT-5] beside gpt_pro in one stage: two gpt_pro seats."""
    text = (
        '[agents.GPT-5]\nmodel = "gpt-5"\n'
        '[[stages]]\nname = "plan"\nagents = ["gemini", "gpt_pro", "GPT-5"]\n'
    )
    with pytest.raises(PipelineError, match="'GPT-5' .* reads as the known agent 'gpt_pro'"):
        parse_pipeline(text)
    # Two declared variants of one model family are two agents of the file's own.
    two = parse_pipeline(
        '[agents.claude-opus]\nmodel = "claude-opus-4-1"\n[agents.claude-haiku]\nmodel = "claude-haiku-4-5"\n'
        '[[stages]]\nname = "plan"\nagents = ["claude-opus", "claude-haiku", "gpt_pro"]\n'
    )
    assert two.stage("plan").agents == ("claude-opus", "claude-haiku", "gpt_pro")


def test_a_default_roster_agent_the_file_never_set_up_is_not_simulated_beside_real_ones() -> None:
    """Implement's roster adds gpt_codex: in a file whose agents use a real
    provider, an undeclared gpt_codex would answer from the simulator."""
    text = "".join(f'[agents.{a}]\nprovider = "openai"\nmodel = "gpt-4o"\n' for a in ("gemini", "claude", "gpt_pro"))
    with pytest.raises(PipelineError, match="gpt_codex has no \\[agents\\] entry while others use openai"):
        parse_pipeline(text + '[[stages]]\nname = "implement"\n')
    listed = parse_pipeline(text + '[[stages]]\nname = "implement"\nagents = ["gemini", "claude", "gpt_pro"]\n')
    assert listed.stage("implement").agents == ("gemini", "claude", "gpt_pro")


def test_a_custom_stages_default_roster_is_not_simulated_beside_real_agents() -> None:
    """A custom stage that names no agents took gemini, claude and gpt_pro
    without the check a known stage gets: the undeclared two answered from
    the simulator, priced as real models."""
    text = '[agents.gemini]\nprovider = "openai"\nmodel = "gpt-4o-mini"\n[[stages]]\nname = "deploy"\nrequired_fields = ["t"]\n'
    with pytest.raises(PipelineError, match="stage 'deploy': .*claude, gpt_pro have no \\[agents\\] entry while others use openai"):
        parse_pipeline(text)
    assert parse_pipeline(text, one_provider=True).stage("deploy").agents == ("gemini", "claude", "gpt_pro")
    simulated = parse_pipeline('[[stages]]\nname = "deploy"\nrequired_fields = ["t"]\n')
    assert simulated.stage("deploy").agents == ("gemini", "claude", "gpt_pro")


def test_one_provider_for_every_agent_lifts_the_roster_refusal(tmp_path: Path) -> None:
    """--provider puts every agent on one provider: no agent can be left
    on the simulator, and a file the roster check refuses must still run."""
    from .conftest import run_cli

    text = '[agents.claude]\nprovider = "anthropic"\nmodel = "claude-sonnet-4-5"\n[[stages]]\nname = "plan"\n'
    with pytest.raises(PipelineError, match="no \\[agents\\] entry"):
        parse_pipeline(text)
    assert parse_pipeline(text, one_provider=True).stage("plan").agents == ("gemini", "claude", "gpt_pro")
    path = tmp_path / "p.toml"
    path.write_text(text)
    done = run_cli(["run", "--pipeline", str(path), "--provider", "sim", "--db", str(tmp_path / "p.db")])
    assert done.returncode == 0, done.stderr


def test_a_stage_name_has_one_spelling_whatever_its_unicode_form() -> None:
    """Precomposed and decomposed "café" print the same and were two
    stages; a --from in the other form missed the stage."""
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    with pytest.raises(PipelineError, match="listed twice"):
        parse_pipeline(
            f'[[stages]]\nname = "{composed}"\nrequired_fields = ["x"]\n'
            f'[[stages]]\nname = "{decomposed}"\nrequired_fields = ["x"]\n'
        )
    p = parse_pipeline(f'[[stages]]\nname = "{decomposed.upper()}"\nrequired_fields = ["x"]\n')
    assert p.stage_names == (composed,)
    assert p.resolve_stage(decomposed).name == p.resolve_stage(composed.upper()).name == composed
