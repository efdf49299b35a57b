"""What `status` and `metrics` report for a run with several branches: the
chosen (or current) branch's lineage, never the sum over every branch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from actors import Latency, SimulatedProvider, open_orchestrator
from actors._cli import main
from store import Store


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def lineage_input_tokens(db: str, run_id: str, branch_id: str) -> int:
    with Store.open(db) as s:
        return sum(o.usage.input_tokens for o in s.lineage_outputs(run_id, branch_id) if o.usage is not None)


def test_a_rerun_is_measured_over_its_own_lineage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`metrics --prices` summed the parent's abandoned attempts in (38
    calls for a 19-call branch), and `status --branch` of an older branch
    showed the current branch's usage and digest, and in JSON its status."""
    db = str(tmp_path / "b.db")
    prices = tmp_path / "p.json"
    prices.write_text("{}")  # the vendored prices, recomputed

    async def history() -> tuple[str, str]:
        async with open_orchestrator(store=db, provider=SimulatedProvider(seed=1, disagreement_rate=1.0)) as orch:
            halted = await orch.run("SPEC-B", run_id="B")
        async with open_orchestrator(store=db, provider=SimulatedProvider(seed=1, disagreement_rate=0.0)) as orch:
            done = await orch.rerun("B", "plan")
        assert halted.status == "halted" and done.completed
        return halted.branch_id, done.branch_id

    old, new = trio.run(history, clock=trio.testing.MockClock(autojump_threshold=0))

    recorded = cli_json(capsys, "metrics", "B", "--db", db)
    recomputed = cli_json(capsys, "metrics", "B", "--db", db, "--prices", str(prices))
    assert recorded["source"] == "recorded" and recomputed["source"] == "recomputed"
    assert recomputed["usage"] == recorded["usage"]
    # --prices changes prices only: the rerun's inherited stages stay replays.
    assert (recomputed["turns"], recomputed["replays"]) == (recorded["turns"], recorded["replays"])
    for by in ("stage", "agent", "model"):
        for name, group in recorded["by"][by].items():
            again = recomputed["by"][by][name]
            assert (again["turns"], again["replays"]) == (group["turns"], group["replays"]), (by, name)

    current = cli_json(capsys, "status", "B", "--db", db)
    assert current["usage"]["input_tokens"] == recorded["usage"]["input_tokens"]
    assert current["usage"]["input_tokens"] == lineage_input_tokens(db, "B", new)

    with Store.open(db) as s:
        branch = s.get_branch("B", old)
    assert branch is not None
    older = cli_json(capsys, "status", "B", "--db", db, "--branch", old)
    assert (older["status"], older["halt_reason"]) == ("halted", branch.halt_reason)
    assert older["digest"] == branch.digest != current["digest"]
    assert older["usage"]["input_tokens"] == lineage_input_tokens(db, "B", old)

    assert main(["status", "B", "--db", db, "--branch", old]) == 0
    text = capsys.readouterr().out
    assert f"digest: {branch.digest}" in text and f"digest: {current['digest']}" not in text

    # metrics --branch: the older branch's own recorded table (it had none).
    mine = cli_json(capsys, "metrics", "B", "--db", db, "--branch", old)
    assert (mine["branch_id"], mine["status"], mine["source"]) == (old, "halted", "recorded")
    assert mine["usage"]["input_tokens"] == lineage_input_tokens(db, "B", old) != recorded["usage"]["input_tokens"]
    assert cli_json(capsys, "metrics", "B", "--db", db)["branch_id"] == new
    from actors._ids import short_branch_id

    assert main(["metrics", "B", "--db", db, "--branch", short_branch_id(old)]) == 0
    assert f"metrics of B branch {short_branch_id(old)} (halted; recorded" in capsys.readouterr().out
    # Hex digits, in either case ("no branch" for the upper-case ones).
    assert main(["metrics", "B", "--db", db, "--branch", short_branch_id(old).upper()]) == 0
    assert f"metrics of B branch {short_branch_id(old)} (halted; recorded" in capsys.readouterr().out


async def test_an_interrupted_rerun_is_recomputed_not_its_parents_record(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """`metrics` showed the parent's recorded six-stage table, headed
    "(interrupted; recorded)", for a rerun cut off in its first stage."""
    db = str(tmp_path / "i.db")
    async with open_orchestrator(store=db, provider=SimulatedProvider(seed=1)) as orch:
        await orch.run("SPEC-I", run_id="I")
    slow = SimulatedProvider(seed=1, latency=Latency(median=10.0))
    async with open_orchestrator(store=db, provider=slow) as orch:
        with trio.move_on_after(25):
            await orch.rerun("I", "tasks")
            pytest.fail("the rerun should have been cut off")
    with Store.open(db) as s:
        run = s.get_run("I")
        assert run is not None and run.status == "interrupted"
        branch = run.current_branch_id
        assert branch is not None
        lineage = [o for o in s.lineage_outputs("I", branch)]
        everything = s.outputs("I")
    assert len(lineage) < len(everything)
    report = cli_json(capsys, "metrics", "I", "--db", db)
    assert report["source"] == "recomputed"
    assert report["turns"] + report["replays"] == len(lineage)
    assert report["usage"]["input_tokens"] == lineage_input_tokens(db, "I", branch)


async def test_prices_leave_a_resumed_runs_turns_and_replays_as_recorded(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """`metrics --prices` counted every stored attempt as a call: a run
    resumed after an interruption showed its replays as turns it made."""
    db = str(tmp_path / "r.db")
    slow = SimulatedProvider(seed=1, disagreement_rate=0.0, latency=Latency(median=10.0))
    async with open_orchestrator(store=db, provider=slow) as orch:
        with trio.move_on_after(45):
            await orch.run("SPEC-R", run_id="R")
            pytest.fail("the run should have been cut off")
    async with open_orchestrator(store=db, provider=SimulatedProvider(seed=1, disagreement_rate=0.0)) as orch:
        assert (await orch.resume("R")).completed
    prices = tmp_path / "p.json"
    prices.write_text("{}")
    recorded = cli_json(capsys, "metrics", "R", "--db", db)
    recomputed = cli_json(capsys, "metrics", "R", "--db", db, "--prices", str(prices))
    assert recorded["source"] == "recorded" and recomputed["source"] == "recomputed"
    assert recorded["replays"] > 0 and recorded["turns"] > 0
    assert (recomputed["turns"], recomputed["replays"]) == (recorded["turns"], recorded["replays"])
    counts = ("usage", "turns", "replays", "unknown_usage_calls")
    for name, group in recorded["by"]["stage"].items():
        assert {k: recomputed["by"]["stage"][name][k] for k in counts} == {k: group[k] for k in counts}, name


async def test_prices_leave_a_reruns_inherited_stages_replays(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "f.db")
    async with open_orchestrator(store=db, provider=SimulatedProvider(seed=1, disagreement_rate=0.0)) as orch:
        await orch.run("SPEC-F", run_id="F")
        assert (await orch.rerun("F", "validate")).completed
    prices = tmp_path / "p.json"
    prices.write_text("{}")
    recorded = cli_json(capsys, "metrics", "F", "--db", db)
    recomputed = cli_json(capsys, "metrics", "F", "--db", db, "--prices", str(prices))
    assert recorded["replays"] > 0 and recorded["turns"] > 0
    assert (recomputed["turns"], recomputed["replays"]) == (recorded["turns"], recorded["replays"])
    for name, group in recorded["by"]["agent"].items():
        assert (recomputed["by"]["agent"][name]["turns"], recomputed["by"]["agent"][name]["replays"]) == (
            group["turns"],
            group["replays"],
        ), name
