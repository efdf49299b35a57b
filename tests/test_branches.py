"""Acceptance 2: rerun from each stage on a child branch; lineage-aware reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from actors import MockProvider, SimulatedProvider, default_pipeline, open_orchestrator
from messages import Completion, CompletionRequest
from store import Store

from .conftest import run_cli

STAGES = default_pipeline().stage_names


def branch_marking_provider(calls: list[tuple[str, str, str]]) -> MockProvider:
    """The simulator's answers, tagged with the branch that asked: an output
    of one branch can never pass for another's."""
    sim = SimulatedProvider(seed=3, disagreement_rate=0.0)

    def answer(request: CompletionRequest) -> Completion:
        calls.append((request.key.branch_id, request.key.stage, request.key.agent))
        base = sim.answer(request)
        body = json.loads(base.content)
        body["branch"] = request.key.branch_id
        return Completion(content=json.dumps(body, sort_keys=True), usage=base.usage, model=base.model)

    return MockProvider(answer, name="sim")


async def run_cut(path: str, spec_id: str, run_id: str, when: Any, provider: Any = None) -> None:
    """Run ``run_id`` and cancel it once an agent whose key ``when`` picks
    has finished: a run interrupted mid-way, some answers durable."""
    from messages import AgentFinished

    with trio.CancelScope() as scope:
        async with open_orchestrator(store=path, provider=provider, seed=3) as orch:
            events = orch.subscribe()

            async def cut() -> None:
                async for e in events:
                    if isinstance(e, AgentFinished) and when(e.key):
                        scope.cancel()

            async with trio.open_nursery() as n:
                n.start_soon(cut)
                await orch.run(spec_id, run_id=run_id)


def history(path: str, run_id: str, branch_id: str) -> tuple[Any, ...]:
    with Store.open(path) as s:
        return (
            [(d.stage, d.seq, d.status, json.dumps(d.verdict, sort_keys=True)) for d in s.decisions(run_id, branch_id)],
            [(o.stage, o.agent, o.attempt, o.content) for o in s.outputs(run_id, branch_id)],
        )


@pytest.mark.parametrize("fork", STAGES)
async def test_rerun_from_each_stage(tmp_path: Path, autojump_clock: trio.testing.MockClock, fork: str) -> None:
    path = str(tmp_path / "b.db")
    calls: list[tuple[str, str, str]] = []
    async with open_orchestrator(store=path, provider=branch_marking_provider(calls), seed=3) as orch:
        parent = await orch.run("SPEC-B", run_id="B")
        before = history(path, "B", parent.branch_id)
        calls.clear()
        child = await orch.rerun("B", fork)
    assert parent.completed and child.completed
    assert child.branch_id != parent.branch_id
    idx = STAGES.index(fork)

    # Decisions before the fork are the parent's own rows, inherited as is.
    assert [s.stage for s in child.stages] == list(STAGES)
    for p, c in zip(parent.stages[:idx], child.stages[:idx]):
        assert (c.stage, c.status, c.seq, dict(c.verdict)) == (p.stage, p.status, p.seq, dict(p.verdict))
    # From the fork on, only the child's outputs reached consensus: the
    # verdict hashes the child's own (branch-tagged) answers.
    with Store.open(path) as s:
        own = {(o.stage, o.agent): o.content for o in s.outputs("B", child.branch_id, accepted_only=True)}
        assert {st for st, _ in own} == set(STAGES[idx:])
        for o in s.lineage_outputs("B", child.branch_id, accepted_only=True):
            owner = child.branch_id if STAGES.index(o.stage) >= idx else parent.branch_id
            assert o.branch_id == owner
            assert json.loads(o.content)["branch"] == owner
        for stage in child.stages[idx:]:
            assert stage.seq > len(STAGES), "seqs are unique per run, so they continue"
            for agent, digest in stage.verdict["outputs"].items():
                import hashlib

                assert digest == hashlib.sha256(own[(stage.stage, agent)].encode()).hexdigest()
                parent_verdict = parent.stages[STAGES.index(stage.stage)].verdict
                assert digest != parent_verdict["outputs"][agent]
        run = s.get_run("B")
        assert run is not None and run.current_branch_id == child.branch_id
    # Only the stages from the fork were bought again, once each, on the child.
    assert {b for b, _, _ in calls} == {child.branch_id}
    assert sorted({st for _, st, _ in calls}, key=STAGES.index) == list(STAGES[idx:])
    # The parent's history is intact and still readable.
    assert history(path, "B", parent.branch_id) == before
    with Store.open(path) as s:
        assert [d.stage for d in s.lineage_decisions("B", parent.branch_id)] == list(STAGES)


async def test_rerun_after_interrupted_stage_ignores_abandoned_outputs(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The parent was cut off mid-stage with some answers durable: a rerun
    from that stage must not reuse them (a resume would)."""
    path = str(tmp_path / "i.db")
    calls: list[tuple[str, str, str]] = []
    provider = branch_marking_provider(calls)
    await run_cut(path, "SPEC-I", "I", lambda key: key.stage == "implement" and key.agent == "claude", provider)
    with Store.open(path) as s:
        run = s.get_run("I")
        assert run is not None and run.status in ("running", "interrupted")
        parent = run.current_branch_id
        assert parent is not None
        abandoned = {o.agent for o in s.outputs("I", parent, "implement", accepted_only=True)}
        assert {"gemini", "claude"} <= abandoned
    calls.clear()
    async with open_orchestrator(store=path, provider=provider, seed=3) as orch:
        child = await orch.rerun("I", "implement")
    implement = child.stages[STAGES.index("implement")]
    assert implement.status == "ok"
    assert {a for b, st, a in calls if st == "implement"} == set(implement.agents), "every agent asked again"
    with Store.open(path) as s:
        seen = s.lineage_outputs("I", child.branch_id, "implement")
        assert seen and all(o.branch_id == child.branch_id for o in seen)
        # ...while the parent keeps its abandoned answers in its history.
        assert {o.agent for o in s.outputs("I", parent, "implement", accepted_only=True)} == abandoned


async def test_lineage_of_a_grandchild(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    path = str(tmp_path / "g.db")
    calls: list[tuple[str, str, str]] = []
    async with open_orchestrator(store=path, provider=branch_marking_provider(calls), seed=3) as orch:
        root = await orch.run("SPEC-G", run_id="G")
        child = await orch.rerun("G", "validate")
        grand = await orch.rerun("G", "tasks", branch_id=child.branch_id)
        cousin = await orch.rerun("G", "unlock", branch_id=child.branch_id)
    with Store.open(path) as s:
        owners = {d.stage: d.branch_id for d in s.lineage_decisions("G", grand.branch_id)}
        assert owners == {"plan": root.branch_id, **{st: grand.branch_id for st in STAGES[1:]}}
        owners = {d.stage: d.branch_id for d in s.lineage_decisions("G", cousin.branch_id)}
        assert owners == {
            **{st: root.branch_id for st in STAGES[:3]},
            "validate": child.branch_id,
            "audit": child.branch_id,
            "unlock": cousin.branch_id,
        }


def test_cli_rerun_branches_status_decisions(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    halted = run_cli(["run", "--db", db, "--run-id", "R", "--seed", "2", "--disagreement-rate", "1", "--json"])
    assert halted.returncode == 3
    parent = json.loads(halted.stdout)
    # The fix: rerun the halted stage with a panel that agrees.
    rerun = run_cli(["rerun", "R", "--from", "Plan", "--db", db, "--disagreement-rate", "0", "--json"])
    assert rerun.returncode == 0, rerun.stderr
    child = json.loads(rerun.stdout)
    assert child["status"] == "completed" and child["branch_id"] != parent["branch_id"]
    assert [s["seq"] for s in child["stages"]] == [2, 3, 4, 5, 6, 7]

    listing = json.loads(run_cli(["branches", "R", "--db", db, "--json"]).stdout)
    assert [b["branch_id"] for b in listing["branches"]] == [parent["branch_id"], child["branch_id"]]
    root, kid = listing["branches"]
    assert (root["status"], root["halt_reason"], root["current"]) == ("halted", "conflict", False)
    assert (kid["status"], kid["fork_stage"], kid["parent_branch_id"], kid["current"]) == (
        "completed", "plan", parent["branch_id"], True,
    )
    human = run_cli(["branches", "R", "--db", db])
    assert kid["short_id"] in human.stdout and "from" in human.stdout

    old = json.loads(run_cli(["decisions", "R", "--db", db, "--branch", root["short_id"], "--json"]).stdout)
    assert [(d["stage"], d["status"]) for d in old["decisions"]] == [("plan", "conflict")]
    status = json.loads(run_cli(["status", "R", "--db", db, "--branch", root["short_id"], "--json"]).stdout)
    assert status["branch_id"] == parent["branch_id"] and status["stages"][0]["status"] == "conflict"
    now = json.loads(run_cli(["status", "R", "--db", db, "--json"]).stdout)
    assert now["branch_id"] == child["branch_id"] and now["digest"] == child["digest"]
    text = run_cli(["decisions", "R", "--db", db]).stdout
    assert f"branch {kid['short_id']}" in text
    bad = run_cli(["status", "R", "--db", db, "--branch", "nope"])
    assert bad.returncode == 2 and "no branch 'nope'" in bad.stderr


def test_rerun_takes_a_short_branch_id_in_either_case_as_status_does(tmp_path: Path) -> None:
    """'status --branch EC6B49EB' found the branch; 'rerun --branch
    EC6B49EB' said "unknown branch" (its own matcher, case-sensitive)."""
    db = str(tmp_path / "c.db")
    first = run_cli(["run", "--db", db, "--run-id", "R", "--disagreement-rate", "0", "--json"])
    assert first.returncode == 0, first.stderr
    root = json.loads(first.stdout)["branch_id"]
    short = root.rsplit("-", 1)[-1][:8].upper()
    shown = run_cli(["status", "R", "--db", db, "--branch", short, "--json"])
    assert json.loads(shown.stdout)["branch_id"] == root, shown.stderr
    rerun = run_cli(["rerun", "R", "--from", "tasks", "--branch", short, "--db", db, "--json"])
    assert rerun.returncode == 0, rerun.stderr
    [_, kid] = json.loads(run_cli(["branches", "R", "--db", db, "--json"]).stdout)["branches"]
    assert (kid["parent_branch_id"], kid["fork_stage"]) == (root, "tasks")
    # A branch that is not there is refused in the words the other commands use.
    for command in (["status", "R"], ["rerun", "R", "--from", "tasks"]):
        bad = run_cli([*command, "--db", db, "--branch", "nope"])
        assert bad.returncode == 2 and "run 'R' has no branch 'nope'; its branches: " in bad.stderr, bad.stderr


async def test_consensus_reads_the_durable_lineage_not_the_message(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Garble every reply in flight: the decision is still made on what is
    durable on the branch (the lineage query), so nothing changes."""
    import attrs

    from messages import AgentReply, Forward, FunctionInterceptor

    async def garble(reply: AgentReply, forward: Forward[AgentReply]) -> None:
        if reply.output is not None:
            reply = attrs.evolve(reply, output=attrs.evolve(reply.output, content="garbage"))
        await forward(reply)

    plain_calls: list[tuple[str, str, str]] = []
    async with open_orchestrator(store=str(tmp_path / "a.db"), provider=branch_marking_provider(plain_calls), seed=3) as orch:
        plain = await orch.run("SPEC-D", run_id="D")
    calls: list[tuple[str, str, str]] = []
    async with open_orchestrator(
        store=str(tmp_path / "b.db"),
        provider=branch_marking_provider(calls),
        seed=3,
        interceptors={"coordinator": [FunctionInterceptor(garble)]},
    ) as orch:
        garbled = await orch.run("SPEC-D", run_id="D")
    assert garbled.completed and [s.status for s in garbled.stages] == [s.status for s in plain.stages]
    with Store.open(str(tmp_path / "b.db")) as s:
        for stage in garbled.stages:
            durable = {o.agent: o.content for o in s.lineage_outputs("D", garbled.branch_id, stage.stage, accepted_only=True)}
            import hashlib

            assert stage.verdict["outputs"] == {a: hashlib.sha256(c.encode()).hexdigest() for a, c in durable.items()}


def test_a_parent_left_unfinished_by_a_rerun_is_abandoned_not_stalled(tmp_path: Path) -> None:
    """Its status said "stalled ... 'conclave resume R' continues it", but a
    resume continues the current branch - the rerun's child, not it."""
    db = str(tmp_path / "a.db")

    async def interrupted() -> str:
        await run_cut(db, "SPEC-A", "A", lambda key: key.stage == "tasks")
        with Store.open(db) as s:
            run = s.get_run("A")
            assert run is not None and run.current_branch_id is not None
            return run.current_branch_id

    parent = trio.run(interrupted, clock=trio.testing.MockClock(autojump_threshold=0))
    assert json.loads(run_cli(["status", "A", "--db", db, "--json"]).stdout)["status"] in ("running", "interrupted")
    rerun = run_cli(["rerun", "A", "--from", "plan", "--db", db, "--json"])
    assert rerun.returncode in (0, 3), rerun.stderr
    child = json.loads(rerun.stdout)["branch_id"]

    listing = json.loads(run_cli(["branches", "A", "--db", db, "--json"]).stdout)
    assert {b["branch_id"]: b["status"] for b in listing["branches"]}[parent] == "abandoned"
    assert [b["driven"] for b in listing["branches"]] == [False, False], "as status --json says, per branch"
    shorts = {b["branch_id"]: b["short_id"] for b in listing["branches"]}
    short = shorts[parent]
    shown = json.loads(run_cli(["status", "A", "--db", db, "--branch", short, "--json"]).stdout)
    assert shown["status"] == "abandoned" and shown["branch_id"] == parent
    text = run_cli(["status", "A", "--db", db, "--branch", short]).stdout
    assert "run A: abandoned" in text and "resume" not in text and "stalled" not in text
    assert f"goes on on branch {shorts[child]}" in text
    assert json.loads(run_cli(["status", "A", "--db", db, "--json"]).stdout)["status"] in ("completed", "halted")


@pytest.mark.parametrize("seed", range(4))
async def test_every_branchs_lineage_read_at_once_is_each_ones_lineage(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    """`conclave branches` reads all lineages at once (one lineage query
    per branch, each walking its chain, was quadratic: 3,000 branches took
    15 s); it must see exactly what the lineage query sees, branch by
    branch, over a tree of reruns from random stages and branches."""
    import random

    draw = random.Random(seed)  # explicit seed: the tree's shape only
    path = str(tmp_path / "tree.db")
    async with open_orchestrator(store=path, seed=3) as orch:
        first = await orch.run("SPEC-T", run_id="T")
        branches = [first.branch_id]
        for _ in range(8):
            parent = draw.choice(branches)
            fork = draw.choice(STAGES)
            try:
                child = await orch.rerun("T", fork, branch_id=parent)
            except Exception:
                continue  # the parent has no advancing decision before that stage
            branches.append(child.branch_id)
    with Store.open(path, readonly=True) as s:
        every = s.lineage_decisions_by_branch("T")
        assert set(every) == {b.branch_id for b in s.branches("T")}
        for branch_id, seen in every.items():
            assert seen == s.lineage_decisions("T", branch_id), branch_id
            # Who owns each stage, as a rerun's health snapshot is looked up.
            owners = {d.stage: d.branch_id for d in seen}
            for stage in STAGES:
                if stage in owners:
                    assert s.stage_owner("T", branch_id, stage) == owners[stage]
        assert s.stage_owner("T", first.branch_id, "no-such-stage") is None


def test_status_of_a_branch_not_current_is_never_driven(tmp_path: Path) -> None:
    # It reported the run's "driven" for every branch, where branches --json
    # and metrics --json say false for any but the current one.
    db = str(tmp_path / "d.db")
    assert run_cli(["run", "--run-id", "R", "--db", db, "--disagreement-rate", "0"]).returncode == 0
    rerun = run_cli(["rerun", "R", "--from", "tasks", "--db", db, "--json"])
    assert rerun.returncode == 0, rerun.stderr
    listing = json.loads(run_cli(["branches", "R", "--db", db, "--json"]).stdout)["branches"]
    (old,) = [b["short_id"] for b in listing if not b["current"]]
    with Store.open(db) as store, store.claim_run("R"):  # as a process driving it would
        current = json.loads(run_cli(["status", "R", "--db", db, "--json"]).stdout)
        parent = json.loads(run_cli(["status", "R", "--db", db, "--branch", old, "--json"]).stdout)
    assert (current["driven"], parent["driven"]) == (True, False)
