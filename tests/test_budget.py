"""Acceptance 3: a run whose budget runs out halts with budget_exceeded
before dispatching another call, warns once per threshold, and can go on
with a higher budget."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from actors import (
    ConfigError,
    MockProvider,
    Orchestrator,
    SimulatedProvider,
    open_orchestrator,
    parse_budget,
    pipeline_from_dict,
)
from actors._pipeline import Pipeline
from messages import BudgetAlert, Completion, CompletionRequest, ProgressEvent, TokenUsage
from store import Store

# gpt-4o: 10,000 in x 2.5e-6 + 1,000 out x 1e-5 = $0.035 a call.
CALL = TokenUsage.of(input_tokens=10_000, output_tokens=1_000)
AGENTS = ("gemini", "claude", "gpt_pro")


def pipeline(mode: str = "sequential") -> Pipeline:
    return pipeline_from_dict(
        {
            "agents": {a: {"provider": "sim", "model": "gpt-4o"} for a in AGENTS},
            "stages": [{"name": s, "agents": list(AGENTS), "mode": mode} for s in ("plan", "tasks", "implement")],
        },
        source="test",
    )


def provider() -> MockProvider:
    sim = SimulatedProvider(seed=5, disagreement_rate=0.0)

    async def answer(request: CompletionRequest) -> Completion:
        await trio.sleep(1.0)
        return attrs.evolve(sim.answer(request), usage=CALL)

    return MockProvider(answer, name="sim")


async def run_with_budget(
    db_path: str, budget: str | None, mode: str = "sequential"
) -> tuple[object, MockProvider, list[ProgressEvent]]:
    mock = provider()
    events: list[ProgressEvent] = []
    async with open_orchestrator(store=db_path, provider=mock, pipeline=pipeline(mode)) as orch:
        progress = orch.subscribe()
        result = await orch.run("SPEC-B", budget=budget)
        while True:
            try:
                events.append(progress.receive_nowait())
            except trio.WouldBlock:
                break
    return result, mock, events


async def test_a_spent_budget_halts_before_the_next_call_and_warns_once_each(
    db_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    # $0.035 a call, budget $0.16: the 4th call reaches $0.14 (87.5 %: the
    # 80 % warning); the 5th (tasks' claude) $0.175 (90 % and 100 %), so the
    # 6th (tasks' gpt_pro) is never dispatched.
    result, mock, events = await run_with_budget(db_path, "0.16")
    assert result.status == "halted" and result.halt_reason == "budget_exceeded"  # type: ignore[attr-defined]
    assert len(mock.calls) == 5, "no call after the budget was spent"
    assert result.cost_usd == Decimal("0.175")  # type: ignore[attr-defined]
    assert "resume" in result.halt_message and "--budget" in result.halt_message  # type: ignore[attr-defined]
    alerts = [e.threshold for e in events if isinstance(e, BudgetAlert)]
    assert alerts == [80, 90, 100]
    with Store.open(db_path, readonly=True) as s:
        run = s.get_run(result.run_id)  # type: ignore[attr-defined]
        assert run is not None and run.status == "halted" and run.halt_reason == "budget_exceeded"
        stored = s.events(run.run_id)
        assert [e.detail["threshold"] for e in stored if e.kind == "budget_warning"] == [80, 90, 100]
        halts = [e for e in stored if e.kind == "halt"]
        assert len(halts) == 1 and halts[0].detail["reason"] == "budget_exceeded" and halts[0].stage == "tasks"
        # plan was decided; tasks was not (gemini, claude answered and are durable).
        assert [d.stage for d in s.decisions(run.run_id)] == ["plan"]
        durable = [(o.stage, o.agent) for o in s.outputs(run.run_id, accepted_only=True)]
        assert sorted(durable) == sorted([("plan", a) for a in AGENTS] + [("tasks", "claude"), ("tasks", "gemini")])


async def test_a_parallel_stage_is_gated_as_a_batch(
    db_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    # Budget $0.10: plan's three calls spend $0.105 together; tasks never starts.
    result, mock, events = await run_with_budget(db_path, "0.10", mode="parallel")
    assert result.halt_reason == "budget_exceeded"  # type: ignore[attr-defined]
    assert len(mock.calls) == 3
    assert [e.threshold for e in events if isinstance(e, BudgetAlert)] == [80, 90, 100]


async def test_a_large_enough_budget_changes_nothing(
    db_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    result, mock, events = await run_with_budget(db_path, "10")
    assert result.completed and len(mock.calls) == 9  # type: ignore[attr-defined]
    assert not [e for e in events if isinstance(e, BudgetAlert)]
    assert result.budget_usd == Decimal("10") and result.cost_usd == Decimal("0.315")  # type: ignore[attr-defined]


async def test_without_a_budget_nothing_is_checked(db_path: str, autojump_clock: trio.testing.MockClock) -> None:
    result, mock, _ = await run_with_budget(db_path, None)
    assert result.completed and result.budget_usd is None  # type: ignore[attr-defined]


async def test_a_budget_run_has_the_same_digest_as_an_unbudgeted_one(
    tmp_path: object, autojump_clock: trio.testing.MockClock
) -> None:
    a, _, _ = await run_with_budget(str(tmp_path) + "/a.db", "10")
    b, _, _ = await run_with_budget(str(tmp_path) + "/b.db", None)
    assert a.digest == b.digest  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", ["-1", "abc", "nan", "inf", "1e13", "1e999999"])
def test_bad_budgets_are_refused(bad: str) -> None:
    # 1e999999 used to pass, then overflow Decimal in the metrics actor mid-run.
    with pytest.raises(ValueError, match="budget"):
        parse_budget(bad)


def test_budgets_are_exact() -> None:
    assert parse_budget("0.1") == Decimal("0.1") and parse_budget("$2") == Decimal("2")
    assert str(parse_budget("-0")) == "0"  # it was kept as -0, shown "$-0.0000"
    assert parse_budget(None) is None


async def test_resume_with_a_higher_budget_finishes_the_run(
    db_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    """End to end once resume exists (issue 3); until then the library-level
    tests in test_metrics_accumulator show the gate reopening after replays."""
    resume = getattr(Orchestrator, "resume", None)
    if resume is None:
        pytest.skip("Orchestrator.resume arrives with issue 3")
    halted, _, _ = await run_with_budget(db_path, "0.16")
    mock = provider()
    async with open_orchestrator(store=db_path, provider=mock, pipeline=pipeline()) as orch:
        result = await orch.resume(halted.run_id, budget="1.00")  # type: ignore[attr-defined]
    assert result.completed
    assert len(mock.calls) == 4, "only the 4 calls never made are bought"
    assert result.cost_usd == Decimal("0.315")


def test_the_cli_warns_when_a_budget_cannot_see_some_models(tmp_path: Path) -> None:
    from .conftest import run_cli

    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        '[agents.llama]\nmodel = "llama-3-70b"\n'
        '[[stages]]\nname = "plan"\nagents = ["llama", "claude"]\nquorum = 1\n'
    )
    db = str(tmp_path / "c.db")
    warning = "--budget counts priced calls only, and there is no price for llama-3-70b"
    proc = run_cli(["run", "--db", db, "--run-id", "r", "--pipeline", str(pipeline), "--budget", "5"])
    assert proc.returncode == 0 and warning in proc.stderr
    assert "claude-sonnet-4-5" not in proc.stderr  # priced: not named
    resumed = run_cli(["resume", "r", "--db", db, "--budget", "6"])
    assert resumed.returncode == 0 and warning in resumed.stderr
    # No budget, or every model priced: no warning.
    assert "warning" not in run_cli(["run", "--db", db, "--pipeline", str(pipeline)]).stderr
    assert "warning" not in run_cli(["run", "--db", db, "--budget", "5"]).stderr


async def test_options_are_checked_and_a_rerun_keeps_its_budget(
    db_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_orchestrator(store=db_path, provider=provider(), pipeline=pipeline("sequential")) as orch:
        # The budget's own key: a resume took it for the budget of a run
        # that had none (or failed on it, after marking the run running).
        with pytest.raises(ConfigError, match="options may not hold 'budget_usd': pass budget= instead"):
            await orch.run("SPEC-B", run_id="x", options={"budget_usd": "abc"})
        with pytest.raises(ConfigError, match="options must be JSON-ready"):
            await orch.run("SPEC-B", run_id="x", options={"f": object()})
        result = await orch.run("SPEC-B", run_id="r", budget="10", options={"note": "n"})
        assert result.budget_usd == Decimal("10")
        # Options given to rerun used to drop the parent's budget.
        child = await orch.rerun("r", "tasks", options={"note": "m"})
    assert child.budget_usd == Decimal("10")
    with Store.open(db_path) as s:
        assert s.get_run("x") is None


def test_a_budget_below_a_hundredth_of_a_cent_is_shown_as_given(tmp_path: Path) -> None:
    """A budget of $0.00001 read "$0.0065 spent of $0.0000" in the very
    message that it was spent."""
    from .conftest import run_cli

    proc = run_cli(["run", "--db", str(tmp_path / "c.db"), "--budget", "0.00001"])
    assert proc.returncode == 3, proc.stderr
    assert "spent of $0.000010 before dispatching" in proc.stdout
    assert "of a $0.000010 budget" in proc.stdout
    assert "$0.0000 " not in proc.stdout


def test_sub_cent_amounts_keep_two_significant_digits() -> None:
    from actors._budget import usd

    assert usd(Decimal("0.0042")) == "$0.0042"
    assert usd(Decimal("0.000012")) == "$0.000012"
    assert usd(Decimal("0.5")) == "$0.50"
    assert usd(Decimal("0")) == "$0.00"
    assert usd(Decimal("-0.00003")) == "$-0.000030"


def test_spend_and_budget_are_shown_to_the_same_places(tmp_path: Path) -> None:
    """A spend over a cent beside a budget under one read "$0.02 of
    $0.0090": as if it were twice the budget, or rounded to a whole cent."""
    from .conftest import run_cli

    proc = run_cli(["run", "--db", str(tmp_path / "c.db"), "--budget", "0.009"])
    assert proc.returncode == 3, proc.stderr
    assert "budget warning: 80% used ($0.0163 of $0.0090)" in proc.stdout
    assert "budget EXCEEDED: $0.0163 of $0.0090;" in proc.stdout
    assert "cost: $0.0163 of a $0.0090 budget" in proc.stdout


def test_a_runs_price_override_is_kept_for_resume_rerun_and_metrics(tmp_path: Path) -> None:
    """resume, rerun and metrics went back to the vendored prices: a run
    halted at its budget at the user's prices resumed with a higher budget
    at the vendored ones and spent past it, unwarned."""
    from .conftest import run_cli

    db = str(tmp_path / "c.db")
    prices = tmp_path / "pricey.json"
    prices.write_text(json.dumps({"gpt-5": {"input_cost_per_token": 1e-3, "output_cost_per_token": 1e-3}}))
    first = run_cli(["run", "--db", db, "--run-id", "P", "--prices", str(prices), "--budget", "2", "--json"])
    assert first.returncode == 3 and json.loads(first.stdout)["halt_reason"] == "budget_exceeded", first.stderr
    prices.unlink()  # kept with the run: the file is not needed again

    resumed = run_cli(["resume", "P", "--db", db, "--budget", "3", "--json"])
    result = json.loads(resumed.stdout)
    assert resumed.returncode == 3 and result["halt_reason"] == "budget_exceeded", resumed.stderr
    assert Decimal(str(result["cost_usd"])) > 3

    rerun = run_cli(["rerun", "P", "--from", "plan", "--db", db, "--budget", "100", "--json"])
    assert rerun.returncode == 0, rerun.stderr
    recorded = json.loads(run_cli(["metrics", "P", "--db", db, "--json"]).stdout)
    assert Decimal(recorded["cost_usd_exact"]) > 3 and "pricey.json" in recorded["price_table"]

    env_prices = tmp_path / "cheap.json"
    env_prices.write_text("{}")
    explicit = json.loads(run_cli(["metrics", "P", "--db", db, "--json", "--prices", str(env_prices)]).stdout)
    assert Decimal(explicit["cost_usd_exact"]) < 1  # the vendored prices, as asked


def test_a_bad_price_file_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    from .conftest import run_cli

    proc = run_cli(["run", "--db", str(tmp_path / "c.db")], env={"CONCLAVE_PRICES": str(tmp_path / "nope.json")})
    assert proc.returncode == 2
    assert "nope.json: cannot read price file" in proc.stderr and "(from $CONCLAVE_PRICES)" in proc.stderr
    assert not (tmp_path / "c.db").exists()


def test_the_cost_line_says_calls_of_unknown_usage_escaped_the_budget() -> None:
    """A server that never reports usage left "$0.00 of a $0.01 budget",
    as if the budget held, with no word that its calls went uncounted."""
    from actors._cli import _summary
    from actors._runtime import RunResult

    def summary(budget: Decimal | None) -> str:
        result = RunResult(
            run_id="r", branch_id="b", spec_id="S", status="completed", halt_reason=None, halt_message=None,
            stages=(), usage=TokenUsage.of(), unknown_usage_calls=4, turns=4, digest="0" * 64,
            budget_usd=budget,
        )
        return _summary(result, "conclave.db", True, 1.0)

    assert "cost: $0.0000 of a $0.0100 budget (+4 call(s) of unknown usage, counted in neither cost nor budget)" in summary(
        Decimal("0.01")
    )
    assert "cost: $0.0000 (+4 call(s) of unknown usage, not costed)" in summary(None)


async def test_a_model_the_server_renames_is_priced_as_the_one_asked_for(
    db_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    """A local server naming gpt-4o "my-vllm-model" left every call unpriced:
    the run "cost" $0 and the budget never stopped it."""
    from actors._cli_metrics import run_metrics
    from actors._pricing import PriceTable

    sim = SimulatedProvider(seed=5, disagreement_rate=0.0)

    async def answer(request: CompletionRequest) -> Completion:
        await trio.sleep(1.0)
        return attrs.evolve(sim.answer(request), usage=CALL, model="my-vllm-model")

    mock = MockProvider(answer, name="sim")
    async with open_orchestrator(store=db_path, provider=mock, pipeline=pipeline()) as orch:
        result = await orch.run("SPEC-B", budget="0.16")
    assert result.halt_reason == "budget_exceeded" and len(mock.calls) == 5
    assert result.cost_usd == Decimal("0.175") and result.unpriced_calls == 0
    with Store.open(db_path) as s:
        recomputed = run_metrics(s, result.run_id, PriceTable.vendored())
    assert recomputed["source"] == "recomputed" and Decimal(recomputed["cost_usd_exact"]) == Decimal("0.175") and recomputed["unpriced_calls"] == 0
    async with open_orchestrator(store=db_path, provider=mock, pipeline=pipeline()) as orch:
        resumed = await orch.resume(result.run_id, budget="10")
    assert resumed.completed and resumed.cost_usd == Decimal("0.315")  # 9 calls, the 5 replayed priced alike


async def test_a_call_cut_off_by_an_interruption_is_reported_not_lost(
    db_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    """A call handed to the provider when the run was interrupted left no
    row: 'metrics' accounted 9 calls for the 10 the provider saw."""
    from actors._cli_metrics import interrupted_calls

    mock = provider()
    with trio.move_on_after(4.5):  # tasks' claude is in flight (a call takes 1 s)
        async with open_orchestrator(store=db_path, provider=mock, pipeline=pipeline()) as orch:
            await orch.run("SPEC-B", run_id="i")
    assert len(mock.calls) == 5
    with Store.open(db_path) as s:
        branch = s.get_run("i").current_branch_id  # type: ignore[union-attr]
        assert interrupted_calls(s, "i", branch) == 1
    again = provider()
    async with open_orchestrator(store=db_path, provider=again, pipeline=pipeline()) as orch:
        assert (await orch.resume("i")).completed
    assert len(mock.calls) + len(again.calls) == 10
    with Store.open(db_path) as s:
        assert len(s.outputs("i")) == 9
        assert interrupted_calls(s, "i", branch) == 1, "the 10th call the provider saw"
    from .conftest import run_cli

    proc = run_cli(["metrics", "i", "--db", db_path, "--json"])
    assert proc.returncode == 0 and json.loads(proc.stdout)["interrupted_calls"] == 1
    assert "1 call(s) cut off by an interruption" in run_cli(["metrics", "i", "--db", db_path]).stdout
