"""Acceptance 1: parsing the fault plan - every format, the priority order,
count exhaustion, scope selection, and a clear error per malformed value."""

from __future__ import annotations

import collections
import itertools
import re
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from messages import (
    AgentKey,
    CompletionRequest,
    FaultInterceptor,
    FaultPlan,
    FaultPlanError,
    ResetHint,
    parse_reset_hint,
)
from messages._faults import scoped_panel

from .conftest import run_cli

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z: a fixed wall clock for RFC 3339 hints


def env(**values: str) -> dict[str, str]:
    return {f"CODEX_FAULTS{'_' + k if k else ''}": v for k, v in values.items()}


def request(agent: str = "gemini", attempt: int = 1, *, stage: str = "plan", panel: tuple[str, ...] = (),
            provider: str = "sim", spec: str = "SPEC-1", run: str = "r1") -> CompletionRequest:
    key = AgentKey(run_id=run, branch_id="b1", stage=stage, agent=agent)
    return CompletionRequest(key=key, attempt=attempt, spec_id=spec, provider=provider, model="m", prompt="p",
                             panel=panel or (agent,))


def test_off_unless_configured() -> None:
    assert not FaultPlan.from_env({}).enabled
    assert not FaultPlan().enabled
    assert not FaultPlan.from_env(env(SCOPE="spec_kit")).enabled
    assert not FaultPlan.from_env({"CODEX_FAULTS": " , "}).enabled


def test_reference_syntax_counts_and_alias() -> None:
    plan = FaultPlan.from_env({"CODEX_FAULTS": " disconnect:3, 429:1 ,timeout:2,"})
    assert plan.enabled and dict(plan.counts) == {"disconnect": 3, "rate_limit": 1, "timeout": 2}
    assert plan.sequence == ("disconnect",) * 3 + ("rate_limit",) + ("timeout",) * 2
    assert dict(FaultPlan.parse("rate_limit:4").counts) == {"rate_limit": 4}
    # A repeated kind: the last wins, as in the reference (429 and rate_limit are one kind).
    assert dict(FaultPlan.parse("429:1,rate_limit:5").counts) == {"rate_limit": 5}
    # ... whether it was a count or a rate: one kind, one entry.
    last_rate = FaultPlan.parse("disconnect:3,disconnect:5%")
    assert (dict(last_rate.counts), dict(last_rate.rates)) == ({}, {"disconnect": 0.05})
    last_count = FaultPlan.parse("disconnect:5%,disconnect:3")
    assert (dict(last_count.counts), dict(last_count.rates)) == ({"disconnect": 3}, {})


def test_rates_over_a_hundred_percent_are_refused_however_the_plan_is_built() -> None:
    with pytest.raises(FaultPlanError, match="add up to more than 100%"):
        FaultPlan.parse("disconnect:60%,timeout:70%")
    with pytest.raises(FaultPlanError, match="add up to more than 100%"):
        FaultPlan(rates={"disconnect": 0.6, "timeout": 0.7})
    assert FaultPlan(rates={"disconnect": 0.5, "timeout": 0.5}).enabled


@pytest.mark.parametrize("rate", [True, False, float("nan"), -0.1, 1.5, "5%"])
def test_a_rate_that_is_not_a_fraction_is_refused(rate: object) -> None:
    # True was taken as a 100 % rate, as a count refuses it.
    with pytest.raises(FaultPlanError, match=re.escape(f"fault rate for disconnect must be within [0, 1], got {rate!r}")):
        FaultPlan(rates={"disconnect": rate})
    assert FaultPlan(rates={"disconnect": 1}).rates["disconnect"] == 1


def test_a_providers_scope_keeps_the_providers_own_spelling() -> None:
    """Provider names are matched as written: a lower-cased scope never
    matched a provider named 'OpenAI'."""
    assert FaultPlan.parse("disconnect:1", scope="gateway:OpenAI").provider == "OpenAI"
    assert FaultPlan.parse("disconnect:1", scope="GATEWAY:OpenAI").provider == "OpenAI"


def test_rates_and_mixed() -> None:
    plan = FaultPlan.parse("disconnect:5%,429:2.5%,timeout:1")
    assert dict(plan.rates) == {"disconnect": 0.05, "rate_limit": 0.025}
    assert dict(plan.counts) == {"timeout": 1}
    assert plan.kinds == ("disconnect", "rate_limit", "timeout")


@pytest.mark.parametrize(
    ("text", "mode", "seconds"),
    [
        ("120", "relative", 120.0),
        ("1.5", "relative", 1.5),
        ("90s", "relative", 90.0),
        ("1500ms", "relative", 1.5),
        ("6m0s", "relative", 360.0),
        ("now+90s", "anchored", 90.0),
        ("now+90", "anchored", 90.0),
        ("NOW+90s", "anchored", 90.0),
        ("2027-01-15T08:00:30Z", "anchored", 30.0),  # T0 + 30 s
        ("2027-01-15T09:00:30+01:00", "anchored", 30.0),
        ("2020-01-01T00:00:00Z", "anchored", 0.0),  # past: 0
    ],
)
def test_reset_hint_formats(text: str, mode: str, seconds: float) -> None:
    hint = parse_reset_hint(text, now=lambda: T0)
    assert (hint.mode, hint.seconds) == (mode, pytest.approx(seconds))


def test_env_knobs() -> None:
    plan = FaultPlan.from_env(
        env(**{"": "timeout:1,429:1", "429_RESET": "now+30s", "TIMEOUT_MS": "2500", "SEED": "42", "SCOPE": "speckit"})
    )
    assert plan.timeout_ms == 2500 and plan.seed == 42 and plan.provider is None
    assert plan.reset is not None and (plan.reset.mode, plan.reset.seconds) == ("anchored", 30.0)
    assert FaultPlan.from_env({"CODEX_FAULTS": "timeout:1"}).timeout_ms == 30_000
    # The CLI's --faults and --fault-seed override their variables.
    over = FaultPlan.from_env(env(**{"": "timeout:1", "SEED": "1"}), faults="disconnect:2", seed=9)
    assert dict(over.counts) == {"disconnect": 2} and over.seed == 9


@pytest.mark.parametrize("scope", ["spec_kit", "speckit", "auto_drive", "gateway", "SPEC_KIT", ""])
def test_scopes_selecting_every_provider(scope: str) -> None:
    assert FaultPlan.from_env(env(**{"": "disconnect:1", "SCOPE": scope})).provider is None


MALFORMED = {
    "unknown kind": (env(**{"": "disconnect:1,explode:2"}), "unknown fault kind 'explode' in 'explode:2'"),
    "bad count (word)": (env(**{"": "disconnect:three"}), "bad count in 'disconnect:three'"),
    "bad count (negative)": (env(**{"": "timeout:-1"}), "bad count in 'timeout:-1'"),
    "bad count (missing)": (env(**{"": "429"}), "bad count in '429'"),
    "bad count (over 100%)": (env(**{"": "disconnect:150%"}), "bad count in 'disconnect:150%'"),
    "rates over 100%": (env(**{"": "disconnect:60%,timeout:50%"}), "more than 100%"),
    # Laid out fault by fault: ten billion exhausted memory.
    # Named as a malformed entry is (it said only "fault count for disconnect ...").
    "huge count": (
        env(**{"": "disconnect:10000000000"}),
        "CODEX_FAULTS: bad count in 'disconnect:10000000000': fault count for disconnect must be at most "
        "1,000,000, got 10,000,000,000",
    ),
    "bad reset hint": (env(**{"": "429:1", "429_RESET": "soon"}), "CODEX_FAULTS_429_RESET: cannot read 'soon'"),
    "bad reset hint (now+)": (env(**{"": "429:1", "429_RESET": "now+later"}), "cannot read 'now+later'"),
    "unknown scope": (env(**{"": "disconnect:1", "SCOPE": "tui"}), "unknown scope 'tui'"),
    "bad timeout": (env(**{"": "timeout:1", "TIMEOUT_MS": "30s"}), "CODEX_FAULTS_TIMEOUT_MS"),
    "zero timeout": (env(**{"": "timeout:1", "TIMEOUT_MS": "0"}), "CODEX_FAULTS_TIMEOUT_MS"),
    # Taken as written; past the agent's call timeout the agent gives up first anyway.
    "absurd timeout": (
        env(**{"": "timeout:1", "TIMEOUT_MS": "99999999999999999999999"}),
        "CODEX_FAULTS_TIMEOUT_MS: must be at most 86400000 (a day), got 99999999999999999999999",
    ),
    "bad seed": (env(**{"": "timeout:1", "SEED": "x"}), "CODEX_FAULTS_SEED"),
    "seed out of range": (
        env(**{"": "timeout:1", "SEED": "9223372036854775808"}),
        "CODEX_FAULTS_SEED: fault seed must fit in 64 bits, got 9223372036854775808",
    ),
    # int() reads other scripts' digits; they were taken, then echoed raw in the banner.
    "non-ASCII count": (env(**{"": "disconnect:\u0663"}), "bad count in 'disconnect:\u0663'"),
    "non-ASCII rate": (env(**{"": "disconnect:\uff15%"}), "bad count"),
    "non-ASCII reset": (env(**{"": "429:1", "429_RESET": "\u0661s"}), "CODEX_FAULTS_429_RESET"),
    "non-ASCII timeout": (env(**{"": "timeout:1", "TIMEOUT_MS": "\u0663"}), "CODEX_FAULTS_TIMEOUT_MS"),
    "non-ASCII seed": (env(**{"": "timeout:1", "SEED": "\u0663"}), "CODEX_FAULTS_SEED"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_values_name_the_entry(case: str) -> None:
    values, needle = MALFORMED[case]
    with pytest.raises(FaultPlanError) as info:
        FaultPlan.from_env(values)
    assert needle in str(info.value)


@pytest.mark.parametrize("timeout_ms", [0, 86_400_001, 10**23, True])
def test_a_plan_object_refuses_a_timeout_out_of_range(timeout_ms: int) -> None:
    with pytest.raises(FaultPlanError, match=re.escape("fault timeout must be a whole number of ms > 0 and at most 86,400,000")):
        FaultPlan(counts={"timeout": 1}, timeout_ms=timeout_ms)
    assert FaultPlan(counts={"timeout": 1}, timeout_ms=86_400_000).timeout_ms == 86_400_000


def test_a_count_out_of_range_names_where_it_came_from() -> None:
    with pytest.raises(FaultPlanError, match=re.escape("--faults: bad count in 'disconnect:2000000': fault count")):
        FaultPlan.from_env({}, faults="disconnect:2000000")
    with pytest.raises(FaultPlanError, match=re.escape("faults: bad count in '429:2000000': fault count for rate_limit")):
        FaultPlan.parse("429:2000000")
    # A seed the caller passes is the caller's argument, not the spec's.
    with pytest.raises(FaultPlanError, match=re.escape("fault seed must fit in 64 bits")) as info:
        FaultPlan.parse("disconnect:1", seed=2**63)
    assert not str(info.value).startswith("faults:")


def test_cli_refuses_a_malformed_plan_with_exit_2(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    proc = run_cli(["run", "--db", str(db)], env={"CODEX_FAULTS": "disconnect:1,boom:1"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "conclave: error: CODEX_FAULTS: unknown fault kind 'boom' in 'boom:1'; "
        "known: disconnect, 429 (or rate_limit), timeout"
    )
    assert not db.exists() and proc.stdout == ""
    flag = run_cli(["run", "--db", str(db), "--faults", "timeout:soon"])
    assert flag.returncode == 2 and "--faults: bad count in 'timeout:soon'" in flag.stderr


async def test_priority_order_and_exhaustion() -> None:
    plan = FaultPlan.parse("timeout:2,429:1,disconnect:3")
    faults = FaultInterceptor(plan)
    # One agent: its attempts are the only calls, in order.
    kinds = [faults.decide(request(attempt=a)) for a in range(1, 9)]
    assert [k[0] if k else None for k in kinds] == [
        "disconnect", "disconnect", "disconnect", "rate_limit", "timeout", "timeout", None, None,
    ]
    assert faults.remaining("r1") == {"disconnect": 0, "rate_limit": 0, "timeout": 0}
    assert faults.remaining("another-run") == {"disconnect": 3, "rate_limit": 1, "timeout": 2}
    # A later stage of the same run gets nothing: the budget is spent.
    assert faults.decide(request(stage="tasks")) is None


async def test_remaining_counts_each_branch_of_a_run_against_its_own_budget() -> None:
    """After a run and a rerun of it, ``remaining(run)`` took both branches'
    placements from one budget: {'disconnect': -3, 'rate_limit': -1, ...}."""
    faults = FaultInterceptor(FaultPlan.parse("disconnect:3,429:1"))
    for branch in ("root", "rerun"):
        key = AgentKey(run_id="r1", branch_id=branch, stage="plan", agent="gemini")
        for attempt in range(1, 6):
            faults.decide(CompletionRequest(key=key, attempt=attempt, spec_id="S", provider="sim", model="m",
                                            prompt="p", panel=("gemini",)))
        assert faults.remaining("r1", branch) == {"disconnect": 0, "rate_limit": 0, "timeout": 0}
    assert faults.remaining("r1") == {"disconnect": 0, "rate_limit": 0, "timeout": 0}
    # A branch that has placed one of its four: summed with the spent ones.
    key = AgentKey(run_id="r1", branch_id="third", stage="plan", agent="gemini")
    faults.decide(CompletionRequest(key=key, attempt=1, spec_id="S", provider="sim", model="m", prompt="p",
                                    panel=("gemini",)))
    assert faults.remaining("r1", "third") == {"disconnect": 2, "rate_limit": 1, "timeout": 0}
    assert faults.remaining("r1") == {"disconnect": 2, "rate_limit": 1, "timeout": 0}
    assert faults.remaining("r1", "not-seen") == {"disconnect": 3, "rate_limit": 1, "timeout": 0}
    assert faults.remaining("another-run") == {"disconnect": 3, "rate_limit": 1, "timeout": 0}


async def test_counts_spread_over_a_stage_whatever_the_arrival_order() -> None:
    panel = ("gemini", "claude", "gpt_pro")
    calls = [(agent, attempt) for attempt in (1, 2, 3) for agent in panel]
    placements = set()
    for order in itertools.islice(itertools.permutations(calls), 0, 720, 60):
        faults = FaultInterceptor(FaultPlan.parse("disconnect:3,429:1,timeout:2"))
        got = {}
        for agent, attempt in order:
            decision = faults.decide(request(agent, attempt, panel=panel))
            got[(agent, attempt)] = decision[0] if decision else None
        placements.add(tuple(sorted(got.items(), key=str)))
    assert len(placements) == 1, "placement must not depend on arrival order"
    (placement,) = placements
    got = dict(placement)
    # Every first attempt, in roster order, then second attempts: no agent
    # loses all three of its attempts.
    assert [got[(a, 1)] for a in panel] == ["disconnect"] * 3
    assert [got[(a, 2)] for a in panel] == ["rate_limit", "timeout", "timeout"]
    assert all(got[(a, 3)] is None for a in panel)


async def test_rates_depend_on_seed_and_identity_only() -> None:
    plan = FaultPlan.parse("disconnect:30%")
    calls = [request(f"a{i}", attempt, spec=f"S{i % 7}") for i in range(60) for attempt in (1, 2)]

    def placement(seed: int, order: list[CompletionRequest]) -> set[tuple[str, str, int]]:
        faults = FaultInterceptor(plan, seed=seed)
        return {(r.spec_id, r.key.agent, r.attempt) for r in order if faults.decide(r)}

    first = placement(1, calls)
    assert first == placement(1, list(reversed(calls)))
    assert 15 < len(first) < 60
    assert first != placement(2, calls), "a different seed places faults differently"
    # The plan's own seed wins over the orchestrator's.
    seeded = FaultInterceptor(FaultPlan.parse("disconnect:30%", seed=1), seed=99)
    assert {(r.spec_id, r.key.agent, r.attempt) for r in calls if seeded.decide(r)} == first


async def test_scope_selects_one_providers_calls(autojump_clock: trio.testing.MockClock) -> None:
    plan = FaultPlan.from_env(env(**{"": "disconnect:5", "SCOPE": "gateway:sim"}))
    assert plan.provider == "sim"
    faults = FaultInterceptor(plan)
    forwarded = []

    async def forward(item: object) -> None:
        forwarded.append(item)

    from messages import reply_pair

    for provider in ("openai", "sim"):
        reply, pending = reply_pair("x")
        await faults.send(attrs_evolve(request(provider=provider), reply), forward)
        if provider == "sim":
            result = await pending.receive()
            assert result.error is not None and result.error.kind == "disconnect"
    assert [r.provider for r in forwarded] == ["openai"]
    assert faults.injected["disconnect"] == 1


def attrs_evolve(req: CompletionRequest, reply: object) -> CompletionRequest:
    import attrs

    return attrs.evolve(req, reply_to=reply)


async def test_a_scope_naming_no_provider_of_the_orchestrator_is_refused(tmp_path: Path) -> None:
    """Its faults could never fire, so a run would pass as if it had
    survived them: refused before anything starts."""
    from actors import ConfigError, open_orchestrator

    plan = FaultPlan.from_env(env(**{"": "disconnect:2", "SCOPE": "gateway:nope"}))
    with pytest.raises(ConfigError, match=r"scoped to provider 'nope', .*\(its providers: sim\)"):
        async with open_orchestrator(store=str(tmp_path / "c.db"), faults=plan):
            pass  # pragma: no cover - never reached


def test_cli_refuses_a_scope_no_agent_calls(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    scoped = {"CODEX_FAULTS": "disconnect:2", "CODEX_FAULTS_SCOPE": "gateway:nope"}
    proc = run_cli(["run", "--db", str(db)], env=scoped)
    assert proc.returncode == 2, proc.stderr
    assert "conclave: error: faults are scoped to provider 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr and "ConfigError" not in proc.stderr
    assert not db.exists()  # refused before the store was opened, as every usage error
    assert run_cli(["run", "--db", str(db), "--run-id", "r"]).returncode == 0
    resumed = run_cli(["resume", "r", "--db", str(db)], env=scoped)
    assert resumed.returncode == 2 and "scoped to provider 'nope'" in resumed.stderr
    soak = run_cli(["soak", "--runs", "2", "--faults", "disconnect:50%"], env=scoped)
    assert soak.returncode == 2
    assert "scoped to provider 'nope', which the soak does not call (it calls: sim)" in soak.stderr
    from actors import SoakConfig

    with pytest.raises(ValueError, match="no fault would ever fire"):
        SoakConfig(faults=FaultPlan.parse("disconnect:5%", scope="gateway:nope"))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"seed": "7"}, "fault seed must be a whole number or None, got '7'"),
        ({"seed": True}, "fault seed must be a whole number"),
        ({"provider": ""}, "fault provider must be a provider name"),
        ({"provider": 3}, "fault provider must be a provider name"),
        # Accepted, then the printed replay's --fault-seed was refused.
        ({"seed": 2**63}, "fault seed must fit in 64 bits, got 9223372036854775808"),
    ],
)
def test_a_plan_object_refuses_a_bad_seed_or_provider(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(FaultPlanError, match=re.escape(needle)):
        FaultPlan(counts={"timeout": 1}, **kwargs)  # type: ignore[arg-type]


def test_a_kind_given_twice_takes_its_last_entry_as_in_the_reference() -> None:
    assert dict(FaultPlan.parse("disconnect:2,disconnect:3").counts) == {"disconnect": 3}


@pytest.mark.parametrize(
    ("reset", "expected"),
    [
        (30, ResetHint(mode="relative", seconds=30.0, text="30")),
        (2.5, ResetHint(mode="relative", seconds=2.5, text="2.5")),
        (0, ResetHint(mode="relative", seconds=0.0, text="0")),  # a reset that is already due
        ("90s", ResetHint(mode="relative", seconds=90.0, text="90s")),
        ("now+30s", ResetHint(mode="anchored", seconds=30.0, text="now+30s")),
        ("", None),
        (None, None),
    ],
)
def test_a_reset_given_as_a_number_or_string_becomes_a_hint(reset: object, expected: ResetHint | None) -> None:
    """``parse(..., reset=30)`` used to drop the hint without a word, and
    ``FaultPlan(reset="30")`` kept a str that failed at the first 429."""
    assert FaultPlan.parse("429:1", reset=reset).reset == expected  # type: ignore[arg-type]
    assert FaultPlan(counts={"rate_limit": 1}, reset=reset).reset == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("reset", [-1, float("nan"), float("inf"), True, "soon", object()])
def test_a_bad_reset_is_refused_when_the_plan_is_built(reset: object) -> None:
    with pytest.raises(FaultPlanError, match="reset"):
        FaultPlan(counts={"rate_limit": 1}, reset=reset)  # type: ignore[arg-type]
    with pytest.raises(FaultPlanError, match="reset"):
        FaultPlan.parse("429:1", reset=reset)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"seconds": float("nan")}, "fault reset seconds must be a finite number >= 0, got nan"),
        ({"seconds": -50.0}, "fault reset seconds must be a finite number >= 0, got -50.0"),
        # No hint string spells it (the farthest RFC 3339 time is finite).
        ({"seconds": float("inf")}, "fault reset seconds must be a finite number >= 0, got inf"),
        ({"seconds": True}, "fault reset seconds must be a finite number >= 0, got True"),
        ({"seconds": "5"}, "fault reset seconds must be a finite number >= 0, got '5'"),
        ({"mode": "sideways"}, "fault reset mode must be 'relative' or 'anchored', got 'sideways'"),
        ({"text": 5}, "fault reset text must be a string, got 5"),
    ],
)
def test_a_bad_reset_hint_object_is_refused_when_built(fields: dict[str, object], needle: str) -> None:
    """A NaN or negative ResetHint built a plan (banner ``429 reset nan``)
    whose injected 429s said "retry after nan seconds" and were then read
    as carrying no hint; an unknown mode was taken for "anchored"."""
    given: dict[str, object] = {"mode": "relative", "seconds": 5.0, "text": "5", **fields}
    with pytest.raises(FaultPlanError, match=re.escape(needle)):
        FaultPlan(counts={"rate_limit": 1}, reset=ResetHint(**given))  # type: ignore[arg-type]
    # The far future a hint string can name is a finite wait, and accepted.
    far = parse_reset_hint("9999-12-31T23:59:59Z", now=lambda: T0)
    assert far.mode == "anchored" and 0 < far.seconds < float("inf")
    assert FaultPlan(counts={"rate_limit": 1}, reset=far).reset == far


@pytest.mark.parametrize("spec", [None, 3, ["disconnect:1"]])
def test_a_spec_that_is_not_a_string_is_named(spec: object) -> None:
    with pytest.raises(FaultPlanError, match=re.escape(f"expected a fault spec such as 'disconnect:3,429:1', got {spec!r}")):
        FaultPlan.parse(spec)  # type: ignore[arg-type]


def test_an_interceptor_takes_a_plan_or_a_spec_and_names_anything_else() -> None:
    assert FaultInterceptor("disconnect:3").plan == FaultPlan.parse("disconnect:3")
    with pytest.raises(TypeError, match="needs a FaultPlan or a spec such as 'disconnect:3', got 3"):
        FaultInterceptor(3)  # type: ignore[arg-type]
    with pytest.raises(FaultPlanError, match="unknown fault kind 'nope'"):
        FaultInterceptor("nope:1")


async def test_a_seat_no_call_takes_leaves_its_fault_to_the_next_stage() -> None:
    """On a resume, replayed seats make no call and attempts continue past
    1.  The next stage used to start at the count placed so far and give
    out again faults a later number had taken: the plan's 3/1/2 came out
    as disconnect 2, timeout 4."""
    panel = ("gemini", "claude", "gpt_pro")
    faults = FaultInterceptor(FaultPlan.parse("disconnect:3,429:1,timeout:2"))
    # plan: gemini replayed (no call); claude and gpt_pro fault, then retry.
    plan_calls = [("claude", 1), ("gpt_pro", 1), ("claude", 2), ("gpt_pro", 2), ("claude", 3), ("gpt_pro", 3)]
    got = [faults.decide(request(a, n, panel=panel)) for a, n in plan_calls]
    assert [d[0] if d else None for d in got] == ["disconnect", "disconnect", "timeout", "timeout", None, None]
    # tasks: the faults numbers 0 and 3 (disconnect, 429) were never taken.
    tasks = [faults.decide(request(a, 1, stage="tasks", panel=panel)) for a in panel]
    assert [d[0] if d else None for d in tasks] == ["disconnect", "rate_limit", None]
    assert faults.remaining("r1") == {"disconnect": 0, "rate_limit": 0, "timeout": 0}
    assert faults.injected == collections.Counter() and dict(faults.decided) == {"disconnect": 3, "rate_limit": 1, "timeout": 2}
    # The same call again spends nothing (a resume restores from the log first).
    assert faults.decide(request("claude", 1, panel=panel)) is None


def _sequential_run(faults: FaultInterceptor, stages: list[tuple[str, tuple[str, ...]]]) -> list[tuple[str, str, int, str | None]]:
    """Every call of a run whose agents answer one after another and retry
    each fault: (stage, agent, attempt, the fault it got)."""
    calls = []
    for stage, panel in stages:
        for agent in panel:
            for attempt in (1, 2, 3):
                decision = faults.decide(request(agent, attempt, stage=stage, panel=panel))
                calls.append((stage, agent, attempt, decision[0] if decision else None))
                if decision is None:
                    break
    return calls


async def test_a_resume_takes_the_count_budget_up_where_the_crash_left_it() -> None:
    """A resume in a new process used to start the run's budget afresh: a
    crash after two disconnects gave the run 8 faults instead of 6, and a
    digest unlike the uninterrupted run's."""
    spec = "disconnect:3,429:1,timeout:2"
    panel = ("gemini", "claude", "gpt_pro")
    stages = [("plan", panel), ("tasks", panel), ("implement", panel)]
    whole = _sequential_run(FaultInterceptor(FaultPlan.parse(spec)), stages)
    assert sorted(str(c[3]) for c in whole if c[3]) == sorted(["disconnect"] * 3 + ["rate_limit"] + ["timeout"] * 2)
    for crash in range(len(whole) + 1):
        before, after = whole[:crash], whole[crash:]
        resumed = FaultInterceptor(FaultPlan.parse(spec))
        fired = [(s, a, n, k) for s, a, n, k in before if k is not None]
        assert resumed.restore("r1", "b1", stages=stages, fired=fired)
        got = [resumed.decide(request(a, n, stage=s, panel=dict(stages)[s])) for s, a, n, _ in after]
        assert [d[0] if d else None for d in got] == [k for *_, k in after], f"crash after call {crash}"
        assert resumed.remaining("r1") == {"disconnect": 0, "rate_limit": 0, "timeout": 0}


@settings(max_examples=150, deadline=None)
@given(
    counts=st.tuples(*[st.integers(0, 4)] * 3).filter(any),
    panels=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    crash=st.floats(0, 1),
)
def test_any_crash_point_resumes_to_the_uninterrupted_placement(
    counts: tuple[int, int, int], panels: list[int], crash: float
) -> None:
    spec = ",".join(f"{k}:{n}" for k, n in zip(("disconnect", "429", "timeout"), counts) if n)
    stages = [(f"s{i}", tuple(f"a{j}" for j in range(size))) for i, size in enumerate(panels)]

    async def main() -> None:
        whole = _sequential_run(FaultInterceptor(FaultPlan.parse(spec)), stages)
        cut = int(crash * len(whole))
        resumed = FaultInterceptor(FaultPlan.parse(spec))
        resumed.restore("r1", "b1", stages=stages, fired=[(s, a, n, k) for s, a, n, k in whole[:cut] if k])
        got = [resumed.decide(request(a, n, stage=s, panel=dict(stages)[s])) for s, a, n, _ in whole[cut:]]
        assert [d[0] if d else None for d in got] == [k for *_, k in whole[cut:]]

    trio.run(main)


async def test_restoring_a_budget_changes_nothing_it_should_not() -> None:
    stages = [("plan", ("gemini", "claude"))]
    fired = [("plan", "gemini", 1, "disconnect")]
    # No counts, nothing to restore.
    assert not FaultInterceptor(FaultPlan.parse("disconnect:50%")).restore("r1", "b1", stages=stages, fired=fired)
    # The interceptor that served the run takes the log over its memory:
    # claude's faulted attempt is not durable, so the resume's claude 1
    # gets its fault again, as in the uninterrupted run.
    served = FaultInterceptor(FaultPlan.parse("disconnect:2"))
    assert served.decide(request("gemini", 1, panel=("gemini", "claude"))) is not None
    assert served.decide(request("claude", 1, panel=("gemini", "claude"))) is not None
    assert served.remaining("r1") == {"disconnect": 0, "rate_limit": 0, "timeout": 0}
    assert served.restore("r1", "b1", stages=stages, fired=fired)
    assert served.remaining("r1") == {"disconnect": 1, "rate_limit": 0, "timeout": 0}
    again = served.decide(request("claude", 1, panel=("gemini", "claude")))
    assert again is not None and again[0] == "disconnect"
    # The plan changed between the crash and the resume: what the new plan
    # has is spent by kind, the rest ignored; other branches keep theirs.
    changed = FaultInterceptor(FaultPlan.parse("429:1,timeout:1"))
    fired += [("plan", "claude", 1, "timeout"), ("plan", "claude", 2, "timeout"), ("gone", "x", 1, "rate_limit")]
    assert changed.restore("r1", "b1", stages=stages, fired=fired)
    assert changed.remaining("r1", "b1") == {"disconnect": 0, "rate_limit": 0, "timeout": 0}
    assert changed.remaining("r1", "b2") == {"disconnect": 0, "rate_limit": 1, "timeout": 1}


async def test_a_plan_scoped_to_one_provider_places_over_its_seats() -> None:
    """A plan scoped to provider b used to place its faults over the whole
    panel: faults placed on a's seats never fired, so claude (b's only
    seat, seat 1) got a 429 and never the plan's disconnect."""
    panel, providers = ("gemini", "claude", "gpt_pro"), ("a", "b", "a")

    def call(agent: str, attempt: int, provider: str) -> CompletionRequest:
        return attrs.evolve(request(agent, attempt, panel=panel, provider=provider), panel_providers=providers)

    b_faults = FaultInterceptor(attrs.evolve(FaultPlan.parse("disconnect:1,429:1"), provider="b"))
    got = [b_faults.decide(call("claude", n, "b")) for n in (1, 2, 3)]
    assert [d[0] if d else None for d in got] == ["disconnect", "rate_limit", None]

    # A resume gives a scoped interceptor its own seats (as the runtime does):
    # gpt_pro's disconnect, durable before the crash, sits at a's seat 1.
    spec = attrs.evolve(FaultPlan.parse("disconnect:2,timeout:1"), provider="a")
    whole = FaultInterceptor(spec)
    calls = [("gpt_pro", 1), ("gemini", 1), ("gemini", 2), ("gpt_pro", 2)]
    expected = [whole.decide(call(agent, n, "a")) for agent, n in calls]
    assert [d[0] if d else None for d in expected] == ["disconnect", "disconnect", "timeout", None]
    resumed = FaultInterceptor(spec)
    assert resumed.restore(
        "r1", "b1", stages=[("plan", scoped_panel(panel, providers, "a"))], fired=[("plan", "gpt_pro", 1, "disconnect")]
    )
    got = [resumed.decide(call(agent, n, "a")) for agent, n in calls[1:]]
    assert [d[0] if d else None for d in got] == ["disconnect", "timeout", None]


@settings(max_examples=150, deadline=None)
@given(
    counts=st.tuples(*[st.integers(0, 4)] * 3).filter(any),
    panels=st.lists(st.lists(st.sampled_from("ab"), min_size=1, max_size=4), min_size=1, max_size=5),
    crash=st.floats(0, 1),
)
def test_a_scoped_plan_spends_its_budget_and_resumes_to_its_placement(
    counts: tuple[int, int, int], panels: list[list[str]], crash: float
) -> None:
    """Provider a's plan over panels mixing a's and b's seats: every count
    fault fires when a has a seat per fault, and any crash point resumes
    (given a's faults, over a's seats, as the runtime gives them) to the
    same placement."""
    spec = attrs.evolve(
        FaultPlan.parse(",".join(f"{k}:{n}" for k, n in zip(("disconnect", "429", "timeout"), counts) if n)),
        provider="a",
    )
    stages = [(f"s{i}", tuple(f"x{j}" for j in range(len(seats))), tuple(seats)) for i, seats in enumerate(panels)]
    seats_of = {stage: (panel, providers) for stage, panel, providers in stages}

    def call(stage: str, agent: str, attempt: int) -> CompletionRequest:
        panel, providers = seats_of[stage]
        made = request(agent, attempt, stage=stage, panel=panel, provider="a")
        return attrs.evolve(made, panel_providers=providers)

    async def main() -> None:
        faults = FaultInterceptor(spec)
        whole: list[tuple[str, str, int, str | None]] = []  # a's calls, each retried after a fault
        for stage, panel, providers in stages:
            for agent in scoped_panel(panel, providers, "a"):
                for attempt in (1, 2, 3):
                    decision = faults.decide(call(stage, agent, attempt))
                    whole.append((stage, agent, attempt, decision[0] if decision else None))
                    if decision is None:
                        break
        # Each stage places a fault on each of a's seats while any are left.
        if sum(p.count("a") for p in panels) >= sum(counts):
            assert sorted(k for *_, k in whole if k) == sorted(spec.sequence)
        cut = int(crash * len(whole))
        resumed = FaultInterceptor(spec)
        resumed.restore(
            "r1", "b1",
            stages=[(stage, scoped_panel(panel, providers, "a")) for stage, panel, providers in stages],
            fired=[(s, a, n, k) for s, a, n, k in whole[:cut] if k],
        )
        got = [resumed.decide(call(s, a, n)) for s, a, n, _ in whole[cut:]]
        assert [d[0] if d else None for d in got] == [k for *_, k in whole[cut:]]

    trio.run(main)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"seed": "7"}, "seed must be a whole number or None, got '7'"),  # placed faults unlike 7
        ({"seed": True}, "seed must be a whole number or None, got True"),
        ({"health": "gate"}, "health must have admit, report and abandon"),
        ({"events": "log"}, "events must be a send channel"),
        ({"observer": 5}, "observer must be callable"),
    ],
)
def test_a_fault_interceptor_checks_its_arguments_when_built(kwargs: dict[str, Any], needle: str) -> None:
    # Each used to be accepted and fail at the first injected fault, mid-run.
    with pytest.raises(TypeError, match=re.escape(needle)):
        FaultInterceptor("disconnect:1", **kwargs)


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        # Each failed as an AttributeError or TypeError naming nothing of ours.
        (lambda: FaultPlan.parse("disconnect:1", scope=123), "CODEX_FAULTS_SCOPE: expected a scope"),
        (lambda: FaultPlan.parse("timeout:1", timeout_ms=1.5), "CODEX_FAULTS_TIMEOUT_MS: expected a whole number"),
        (lambda: FaultPlan.parse("429:1", reset=["now+30s"]), "reset"),
        (lambda: FaultPlan.from_env("disconnect:3"), "from_env reads a mapping of environment variables"),
        (lambda: FaultPlan(counts="disconnect:3"), "counts and rates map a fault kind to a number"),
    ],
)
def test_fault_plan_helpers_name_a_wrong_argument(build: Any, needle: str) -> None:
    with pytest.raises((FaultPlanError, TypeError), match=re.escape(needle)):
        build()


@pytest.mark.parametrize("text", ["disconnect:0.00001%", "disconnect:99.99999%", "429:12.5%,timeout:0.3%", "timeout:100%",
                                  "disconnect:0.0000000000001%", "disconnect:12.345678901234567%"])
def test_a_plans_description_parses_back_to_the_same_plan(text: str) -> None:
    # %g printed 1e-05 (which the parser refuses) and cut 99.99999 to 100:
    # the banner, --json's plan and the soak's replay command showed a
    # different plan, or one that could not be run.
    plan = FaultPlan.parse(text)
    assert plan.describe_kinds() == text
    assert FaultPlan.parse(plan.describe_kinds()).rates == plan.rates


@settings(max_examples=300, deadline=None)
@given(whole=st.integers(0, 99), fraction=st.text(alphabet="0123456789", max_size=16))
def test_any_rate_describes_as_itself(whole: int, fraction: str) -> None:
    text = f"disconnect:{whole}.{fraction}%" if fraction else f"disconnect:{whole}%"
    plan = FaultPlan.parse(text)
    firing = {k: r for k, r in plan.rates.items() if r}  # a 0% entry fires nothing and is not described
    assert {k: r for k, r in FaultPlan.parse(plan.describe_kinds()).rates.items() if r} == firing


def test_a_bad_spec_given_in_code_is_not_blamed_on_the_environment() -> None:
    """An app's faults="boom:1" was refused as "CODEX_FAULTS: ...", a
    variable it never set."""
    from actors import SoakConfig

    with pytest.raises(FaultPlanError, match=r"^faults: unknown fault kind 'boom'"):
        SoakConfig(faults="boom:1")
    with pytest.raises(FaultPlanError, match=r"^faults: unknown fault kind 'boom'"):
        FaultPlan.parse("boom:1")
    with pytest.raises(FaultPlanError, match=r"^CODEX_FAULTS: unknown fault kind 'boom'"):
        FaultPlan.from_env({"CODEX_FAULTS": "boom:1"})
