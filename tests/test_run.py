"""`conclave run` end to end on the embedded defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
import trio.testing

from actors import SimulatedProvider, default_pipeline, open_orchestrator
from store import Store

from .conftest import run_cli

USAGE_FIELDS = {
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_output_tokens",
    "total_tokens",
    "cache_write_input_tokens",
    "cache_write_1h_input_tokens",
}


def test_run_on_defaults_completes_all_six_stages(tmp_path: Path) -> None:
    proc = run_cli(["run"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "conclave.db").exists(), "the default database is ./conclave.db"
    for stage in default_pipeline().stage_names:
        assert "STAGE" in proc.stdout and f": {stage.upper()} (" in proc.stdout
    assert "completed: 6 stage(s) decided" in proc.stdout


def test_run_json_has_the_documented_fields(tmp_path: Path) -> None:
    proc = run_cli(["run", "SPEC-42", "--goal", "demo", "--seed", "3", "--disagreement-rate", "0", "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {"run_id", "branch_id", "spec_id", "status", "halt_reason", "stages", "usage", "digest"} <= set(data)
    assert data["spec_id"] == "SPEC-42" and data["status"] == "completed" and data["halt_reason"] is None
    assert [s["stage"] for s in data["stages"]] == list(default_pipeline().stage_names)
    for s in data["stages"]:
        assert {"stage", "status", "seq", "agents", "missing_agents"} <= set(s)
    assert [s["seq"] for s in data["stages"]] == [1, 2, 3, 4, 5, 6]
    assert set(data["usage"]) == USAGE_FIELDS and data["usage"]["input_tokens"] > 0
    assert len(data["digest"]) == 64
    # What the CLI printed is what the store holds.
    with Store.open(str(tmp_path / "conclave.db")) as s:
        run = s.get_run(data["run_id"])
        assert run is not None and run.digest == data["digest"] and run.status == "completed"
        assert run.usage.as_dict() == data["usage"]
        assert [d.seq for d in s.decisions(data["run_id"])] == [1, 2, 3, 4, 5, 6]


def test_same_seed_same_digest_across_processes(tmp_path: Path) -> None:
    digests = []
    for hashseed in ("1", "2"):
        proc = run_cli(
            ["run", "--seed", "11", "--json", "--db", str(tmp_path / f"h{hashseed}.db")],
            env={"PYTHONHASHSEED": hashseed},
        )
        assert proc.returncode in (0, 3), proc.stderr
        digests.append(json.loads(proc.stdout)["digest"])
    assert digests[0] == digests[1]


async def test_different_seed_changes_simulated_outputs(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    results = {}
    for seed in (1, 2):
        async with open_orchestrator(store=str(tmp_path / f"s{seed}.db"), seed=seed) as orch:
            results[seed] = await orch.run("SPEC-S", run_id="same-id")
    a, b = results[1], results[2]
    assert a.digest != b.digest
    assert a.stages[0].verdict["outputs"] != b.stages[0].verdict["outputs"]


async def test_sequential_agents_see_earlier_outputs(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    from actors import MockProvider
    from messages import Completion, CompletionRequest

    sim = SimulatedProvider(seed=0)
    prompts: dict[tuple[str, str], str] = {}

    def record(request: CompletionRequest) -> Completion:
        prompts[(request.key.stage, request.key.agent)] = request.prompt
        return sim.answer(request)

    async with open_orchestrator(store=str(tmp_path / "p.db"), provider=MockProvider(record, name="sim")) as orch:
        await orch.run("SPEC-P")
    assert "Earlier answer from" not in prompts[("plan", "gemini")]
    assert "Earlier answer from gemini" in prompts[("plan", "claude")]
    assert "Earlier answer from claude" in prompts[("plan", "gpt_pro")]
    # Parallel stages see nobody's answer.
    assert "Earlier answer" not in prompts[("audit", "gpt_pro")]


async def test_sequential_context_grows_by_one_message_per_answer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from actors import MockProvider, pipeline_with_panel
    from messages import AgentRequest, Completion, CompletionRequest, FunctionInterceptor

    panel = [f"a{i}" for i in range(6)]
    requests: list[AgentRequest] = []
    sim = SimulatedProvider(seed=0)
    answers: dict[str, str] = {}

    def answer(request: CompletionRequest) -> Completion:
        completion = sim.answer(request)
        answers[request.key.agent] = completion.content
        return completion

    async def record(item: AgentRequest, forward: Any) -> None:
        requests.append(item)
        await forward(item)

    async with open_orchestrator(
        store=str(tmp_path / "seq.db"),
        provider=MockProvider(answer, name="sim"),
        pipeline=pipeline_with_panel("plan", panel, mode="sequential"),
        interceptors={"agent": [FunctionInterceptor(record)]},
    ) as orch:
        result = await orch.run("SPEC-SEQ")
    assert result.completed
    assert [r.key.agent for r in requests] == panel
    for k, req in enumerate(requests):
        assert [(p.agent, p.content) for p in req.context] == [(a, answers[a]) for a in panel[:k]]
    # Each answer becomes one PriorOutput, shared by every later request:
    # rebuilding them per agent made an N-agent stage quadratic.
    for earlier, later in zip(requests[1:], requests[2:]):
        assert all(a is b for a, b in zip(earlier.context, later.context))


async def test_halting_stage_stops_the_run(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    path = str(tmp_path / "halt.db")
    provider = SimulatedProvider(seed=0, disagreement_rate=1.0)
    async with open_orchestrator(store=path, provider=provider) as orch:
        result = await orch.run("SPEC-H", run_id="halt")
    assert result.status == "halted" and result.halt_reason == "conflict"
    assert [s.stage for s in result.stages] == ["plan"]
    assert result.halt_message is not None
    assert "'plan'" in result.halt_message and "conclave rerun halt --from plan" in result.halt_message
    with Store.open(path) as s:
        run = s.get_run("halt")
        assert run is not None and (run.status, run.halt_reason) == ("halted", "conflict")
        assert [e.kind for e in s.events("halt")][-1] == "halt"


def test_cli_halt_exits_3_and_status_decisions_show_it(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    proc = run_cli(["run", "--db", db, "--run-id", "R1", "--disagreement-rate", "1"])
    assert proc.returncode == 3
    assert "HALTED" in proc.stdout and "conclave rerun R1 --from plan" in proc.stdout
    status = run_cli(["status", "R1", "--db", db, "--json"])
    assert status.returncode == 0
    info: dict[str, Any] = json.loads(status.stdout)
    assert info["status"] == "halted" and info["halt_reason"] == "conflict"
    assert info["stages"][0] == {"stage": "plan", "status": "conflict", "seq": 1}
    assert info["stages"][1]["status"] is None
    decisions = run_cli(["decisions", "R1", "--db", db])
    assert decisions.returncode == 0 and "plan: CONFLICT (seq 1)" in decisions.stdout
    listing = run_cli(["status", "--db", db])
    assert "R1" in listing.stdout and "halted" in listing.stdout
