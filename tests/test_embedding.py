"""Embedding: orchestrators are plain trio objects in the caller's nursery."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from actors import (
    BreakerPolicy,
    ConfigError,
    HealthRegistry,
    Latency,
    Limits,
    MockProvider,
    RunResult,
    SimulatedProvider,
    open_orchestrator,
    parse_pipeline,
)
from messages import FaultInterceptor, StageDecided
from store import Store


def assert_consistent(path: str, run_id: str) -> None:
    with Store.open(path) as s:
        assert s.integrity_check() == "ok"
        assert s.foreign_key_violations() == 0
        decisions = s.decisions(run_id)
        accepted = {(o.stage, o.agent) for o in s.outputs(run_id, accepted_only=True)}
        for d in decisions:
            for agent in d.verdict["present_agents"]:
                assert (d.stage, agent) in accepted, f"decision of {d.stage} without {agent}'s output"


async def test_two_orchestrators_side_by_side_one_cancelled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    kept_db, cancelled_db = str(tmp_path / "kept.db"), str(tmp_path / "cancelled.db")
    results: dict[str, RunResult] = {}
    decided_before_cancel: list[str] = []

    async def keeper() -> None:
        async with open_orchestrator(store=kept_db, seed=1) as orch:
            results["kept"] = await orch.run("SPEC-K", run_id="kept")

    async def victim(cancel_scope: trio.CancelScope) -> None:
        with cancel_scope:
            async with open_orchestrator(store=cancelled_db, seed=2) as orch:
                events = orch.subscribe()
                async with trio.open_nursery() as nursery:

                    async def watch() -> None:
                        async for event in events:
                            if isinstance(event, StageDecided):
                                decided_before_cancel.append(event.decision.key.stage)
                                if len(decided_before_cancel) == 2:
                                    cancel_scope.cancel()  # mid-run, mid-stage-3

                    nursery.start_soon(watch)
                    results["victim"] = await orch.run("SPEC-V", run_id="victim")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper)
        nursery.start_soon(victim, trio.CancelScope())

    assert results["kept"].completed and len(results["kept"].stages) == 6
    assert "victim" not in results
    assert decided_before_cancel == ["plan", "tasks"]
    assert_consistent(kept_db, "kept")
    assert_consistent(cancelled_db, "victim")
    with Store.open(cancelled_db) as s:
        assert [d.stage for d in s.decisions("victim")] == ["plan", "tasks"]
        victim = s.get_run("victim")
        assert victim is not None and victim.status == "interrupted"


async def test_cancelling_a_run_marks_it_interrupted(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    path = str(tmp_path / "i.db")
    async with open_orchestrator(store=path) as orch:
        with trio.move_on_after(10):  # simulated seconds: inside the plan stage
            await orch.run("SPEC-I", run_id="interrupted")
        # The orchestrator outlives the cancelled run and can run another.
        again = await orch.run("SPEC-I", run_id="again")
    assert again.completed
    with Store.open(path) as s:
        run = s.get_run("interrupted")
        assert run is not None and run.status == "interrupted"
    assert_consistent(path, "interrupted")


@pytest.mark.parametrize(
    ("build", "error", "needle"),
    [
        (lambda: Limits(max_concurrency=0), ValueError, "max_concurrency must be a whole number >= 1, got 0"),
        (lambda: Limits(store_buffer=-1), ValueError, "store_buffer must be a whole number >= 0, got -1"),
        (lambda: Limits(gateway_buffer=1.5), ValueError, "gateway_buffer must be a whole number >= 0, got 1.5"),
        (lambda: Limits(metrics_interval=0), ValueError, "metrics_interval must be a finite number of seconds > 0"),
        (lambda: Latency(median=-1), ValueError, "latency median must be a finite number of seconds >= 0"),
        (lambda: Latency(sigma=math.nan), ValueError, "latency sigma must be a finite number >= 0, got nan"),
        (lambda: Latency(cap=math.nan), ValueError, "latency cap must be"),
        (lambda: SimulatedProvider(seed="1"), TypeError, "seed must be a whole number, got '1'"),
        (lambda: SimulatedProvider(latency=2.0), TypeError, "latency must be a Latency, got 2.0"),
    ],
)
def test_settings_an_embedding_app_passes_are_checked_when_built(build: Any, error: type[Exception], needle: str) -> None:
    # Each used to be accepted and to fail later - half way through opening
    # the orchestrator's channels, or as a NaN sleep inside a provider call.
    with pytest.raises(error, match=re.escape(needle)):
        build()


def test_the_cli_runs_resumes_and_reruns_from_a_thread_of_an_embedding_app(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Signals reach only the main thread, and trio refuses a signal
    receiver anywhere else: main() from a thread used to fail every run,
    resume and rerun with RuntimeError (exit 1)."""
    import json
    import threading

    from actors._cli import main

    db = str(tmp_path / "t.db")
    codes: list[int] = []
    commands = [
        ["run", "--db", db, "--run-id", "T", "--json"],
        ["resume", "T", "--db", db, "--json"],
        ["rerun", "T", "--from", "audit", "--db", db, "--json"],
    ]
    for argv in commands:
        thread = threading.Thread(target=lambda argv=argv: codes.append(main(argv)))
        thread.start()
        thread.join()
    assert codes == [0, 0, 0], capsys.readouterr().err
    out = capsys.readouterr().out
    assert json.loads(out[: out.index("\n}\n") + 2])["status"] == "completed"


async def test_an_orchestrator_used_after_its_block_says_it_is_closed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """resume and rerun used to fail with apsw's ConnectionClosedError, run
    with 'the store actor has stopped'; nothing is written either way."""
    from messages import ActorStopped

    path = str(tmp_path / "c.db")
    async with open_orchestrator(store=path) as orch:
        await orch.run("SPEC-C", run_id="C")
    calls = [
        lambda: orch.run("SPEC-C", run_id="D"),
        lambda: orch.resume("C"),
        lambda: orch.rerun("C", "plan"),
        lambda: orch.totals("C"),
    ]
    for call in calls:
        with pytest.raises(ActorStopped, match=r"this orchestrator is closed: .*open_orchestrator"):
            await call()
    with Store.open(path) as s:
        assert [r.run_id for r in s.list_runs()] == ["C"] and len(s.branches("C")) == 1


async def test_forgetting_the_totals_of_a_run_being_driven_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A dashboard's totals(forget=True) mid-run dropped the run's budget
    and the usage so far: the run stored a wrong digest and overran its
    budget."""
    async with open_orchestrator(store=str(tmp_path / "ref.db"), seed=7) as orch:
        reference = await orch.run("SPEC-1", run_id="r")
    refusals: list[str] = []
    async with open_orchestrator(store=str(tmp_path / "f.db"), seed=7) as orch:

        async def dashboard() -> None:
            await trio.sleep(20)
            with pytest.raises(ConfigError, match="'r' is being driven") as info:
                await orch.totals("r", forget=True)
            refusals.append(str(info.value))
            assert (await orch.totals("r")).turns > 0  # reading alone is fine

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dashboard)
            result = await orch.run("SPEC-1", run_id="r")
        assert len(refusals) == 1
        assert (result.digest, result.turns) == (reference.digest, reference.turns)
        # Once its drive has ended, forgetting is allowed (and finds nothing).
        assert (await orch.totals("r", forget=True)).turns == 0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"run_id": ""}, "a run id must not be empty"),  # was replaced by a generated id
        ({"run_id": "two words"}, "without spaces"),
        ({"run_id": "-x"}, "not starting with '-'"),
        ({"spec_id": "line\nbreak"}, "a spec id must be at most 200 printable characters"),
        ({"spec_id": "  "}, "a spec id must not be empty"),
    ],
)
async def test_a_bad_run_or_spec_id_is_refused_before_anything_is_written(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, kwargs: dict[str, str], needle: str
) -> None:
    path = str(tmp_path / "c.db")
    async with open_orchestrator(store=path) as orch:
        with pytest.raises(ConfigError, match=needle):
            await orch.run(**kwargs)
    with Store.open(path) as s:
        assert s.list_runs() == []


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1])
async def test_a_seed_the_store_cannot_hold_is_refused_at_open(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    path = tmp_path / "c.db"
    with pytest.raises(ConfigError, match="must fit in 64 bits"):
        async with open_orchestrator(store=str(path), seed=seed) as orch:
            await orch.run()
    assert not path.exists()


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63)])
async def test_the_extreme_seeds_run_and_are_stored(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    path = str(tmp_path / "c.db")
    async with open_orchestrator(store=path, seed=seed) as orch:
        result = await orch.run(run_id="r")
    assert result.status == "completed"
    with Store.open(path) as s:
        run = s.get_run("r")
        assert run is not None and run.seed == seed


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"prices": {}}, "prices: expected PriceTable, got {}"),  # used to crash the metrics actor mid-run
        ({"retry": 3}, "retry: expected RetryPolicy, got 3"),
        ({"limits": {}}, "limits: expected Limits, got {}"),
        ({"pipeline": "plan"}, "pipeline: expected Pipeline, got 'plan'"),
        ({"provider": {"sim": "x"}}, "provider must be a BaseProvider or a mapping"),
        ({"provider": "sim"}, "provider must be a BaseProvider or a mapping"),
        # The registry's own breaker applied; the one given was dropped.
        ({"health": HealthRegistry(), "breaker": BreakerPolicy(min_calls=1)}, "give breaker= or health=, not both"),
    ],
)
async def test_a_wrong_kind_of_argument_is_refused_before_anything_starts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, kwargs: dict[str, Any], needle: str
) -> None:
    path = tmp_path / "c.db"
    with trio.fail_after(60):  # virtual: only a hang reaches it
        with pytest.raises(ConfigError, match=re.escape(needle)):
            async with open_orchestrator(store=str(path), **kwargs):
                pass  # pragma: no cover
    assert not path.exists()


@pytest.mark.parametrize("edge", ["agent", "coordinator", "metrics", "store"])
async def test_a_fault_interceptor_off_the_gateway_edge_is_refused_naming_the_edge(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, edge: str
) -> None:
    # Accepted, it never fired: the run "survived" faults never injected.
    path = tmp_path / "c.db"
    with pytest.raises(ConfigError, match=re.escape(f"interceptors[{edge!r}] holds a FaultInterceptor")) as info:
        async with open_orchestrator(store=str(path), interceptors={edge: [FaultInterceptor("disconnect:3")]}):
            pass  # pragma: no cover
    assert "could never fire" in str(info.value)
    assert not path.exists()


async def test_one_fault_interceptor_given_twice_is_a_config_error_before_anything_starts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # It was a plain RuntimeError from attach(), after the database was created.
    path = tmp_path / "c.db"
    faults = FaultInterceptor("disconnect:3")
    for kwargs in (
        {"faults": faults, "interceptors": {"gateway": [faults]}},
        {"interceptors": {"gateway": [faults, faults]}},
    ):
        with pytest.raises(ConfigError, match="the same FaultInterceptor is given twice"):
            async with open_orchestrator(store=str(path), **kwargs):  # type: ignore[arg-type]
                pass  # pragma: no cover
        assert not path.exists() and not faults.attached
    async with open_orchestrator(store=str(path), faults=faults) as orch:  # once is fine
        assert (await orch.run(run_id="r")).status == "completed"
    assert sum(faults.injected.values()) == 3


@pytest.mark.parametrize("max_buffer", [-1, "10", 1.5, True, float("inf")])
async def test_a_bad_progress_buffer_is_refused_naming_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, max_buffer: Any
) -> None:
    # trio's own refusal named max_buffer_size, and took inf: an unbounded
    # backlog for a subscriber that never reads.
    async with open_orchestrator(store=str(tmp_path / "c.db")) as orch:
        with pytest.raises(ConfigError, match=re.escape(f"max_buffer must be a whole number >= 0 (or None), got {max_buffer!r}")):
            orch.subscribe(max_buffer)
        events = orch.subscribe(0)  # events only while it waits: still allowed
        events.close()


@pytest.mark.parametrize("after", [0.001, 5.0])  # early, mid-stage
async def test_runs_started_outside_the_block_are_stopped_and_marked_when_it_ends(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, after: float
) -> None:
    """Runs started in a nursery outside the block, still going when it
    ended, failed on whichever actor stopped first ("the metrics actor has
    stopped") and stayed stored as running."""
    from messages import ActorStopped

    path = str(tmp_path / "c.db")
    async with open_orchestrator(store=str(tmp_path / "ref.db"), seed=7) as orch:
        expected = await orch.run("SPEC-E", run_id="ref")
    errors: list[BaseException] = []
    living = trio.lowlevel.current_statistics().tasks_living

    async def go(orch: Any, run_id: str) -> None:
        try:
            await orch.run("SPEC-E", run_id=run_id)
        except ActorStopped as exc:
            errors.append(exc)

    async with trio.open_nursery() as outer:
        async with open_orchestrator(store=path, seed=7) as orch:
            for i in range(3):
                outer.start_soon(go, orch, f"r{i}")
            await trio.sleep(after)
    assert trio.lowlevel.current_statistics().tasks_living == living
    assert sorted(str(e) for e in errors) == [
        f"run 'r{i}' was stopped: the 'async with open_orchestrator(...)' block it ran under ended "
        "(it is marked interrupted: resume continues it)"
        for i in range(3)
    ]
    with Store.open(path) as s:
        assert {r.run_id: r.status for r in s.list_runs()} == {f"r{i}": "interrupted" for i in range(3)}
    async with open_orchestrator(store=path, seed=7) as orch:
        for i in range(3):
            resumed = await orch.resume(f"r{i}")
            assert resumed.completed and resumed.digest == expected.digest


KI_AT_BLOCK_END = """
import sys, trio
from actors import open_orchestrator
from actors._runtime import Orchestrator

async def interrupted(self):
    raise KeyboardInterrupt  # as a Ctrl-C reaches the wait, shielded or not

Orchestrator._stop_drives = interrupted

async def main():
    async with open_orchestrator(store=sys.argv[1]):
        pass

try:
    trio.run(main)
except KeyboardInterrupt:
    print("interrupted")
"""


def test_a_ctrl_c_while_the_block_stops_its_runs_still_stops_the_actors(tmp_path: Path) -> None:
    """A Ctrl-C reaching the wait for the runs to stop skipped closing the
    actors' inboxes: the shielded store writer waited on its inbox for
    ever, and so did the process."""
    from .conftest import REPO

    done = subprocess.run(
        [sys.executable, "-c", KI_AT_BLOCK_END, str(tmp_path / "k.db")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.stdout == "interrupted\n", done.stderr


HANG_SCRIPT = """
import sys, trio, trio.testing
from actors import AuthService, ConfigError, TokenManager, TokenStore, open_orchestrator

class Broken(AuthService):
    def run(self):
        raise RuntimeError("auth actor cannot start")

async def main(home, db):
    try:
        async with open_orchestrator(store=db, auth="x"):
            pass
    except ConfigError as exc:
        assert "auth: expected AuthService, got 'x'" in str(exc), exc
    try:
        async with open_orchestrator(store=db, auth=Broken(TokenManager(TokenStore(home)), ["openai"])):
            pass
    except RuntimeError as exc:
        assert "auth actor cannot start" in str(exc), exc
    print("returned")

trio.run(main, sys.argv[1], sys.argv[2], clock=trio.testing.MockClock(autojump_threshold=0))
"""


def test_a_failure_while_starting_the_actors_does_not_hang(tmp_path: Path) -> None:
    # The shielded store writer waits on its inbox alone: a failure after it
    # started and before the block's try/finally (a wrong auth object's
    # missing run(), say) left it waiting for ever - no cancel scope in the
    # process could end it, hence a child process and a timeout.
    proc = subprocess.run(
        [sys.executable, "-c", HANG_SCRIPT, str(tmp_path / "home"), str(tmp_path / "c.db")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "returned"


async def test_a_run_whose_pipeline_names_a_missing_provider_is_refused_unwritten(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Every call of its claude would fail: the run used to be recorded and
    # halt on no_consensus, the cause only in the stored outputs.
    pipeline = parse_pipeline(
        '[agents.claude]\nprovider = "anthropic"\n[[stages]]\nname = "plan"\nagents = ["gemini", "claude"]'
    )
    path = str(tmp_path / "c.db")
    async with open_orchestrator(store=path, provider={"sim": SimulatedProvider(), "openai": SimulatedProvider()}) as orch:
        with pytest.raises(ConfigError, match=r"no provider configured for: anthropic \(this orchestrator has: openai, sim; "):
            await orch.run(run_id="r", pipeline=pipeline)
    with Store.open(path) as s:
        assert s.get_run("r") is None
    # Given at open, the same words (they named only what was missing).
    with pytest.raises(ConfigError, match=r"for: anthropic \(this orchestrator has: openai, sim; give provider a "):
        async with open_orchestrator(store=path, pipeline=pipeline,
                                     provider={"sim": SimulatedProvider(), "openai": SimulatedProvider()}):
            pass


async def test_misused_calls_name_the_argument(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    # Each used to fail as an AttributeError from the run lock, or an SQLite
    # constraint once the run was claimed.
    async with open_orchestrator(store=str(tmp_path / "c.db")) as orch:
        await orch.run(run_id="r")
        for call, needle in (
            (lambda: orch.run(goal=None), "goal must be a string, got None"),
            (lambda: orch.resume(None), "run_id must be a non-empty string, got None"),
            (lambda: orch.rerun("r", None), "from_stage must be a non-empty string, got None"),
            (lambda: orch.rerun("r", "plan", branch_id=""), "branch_id must be a non-empty string, got ''"),
        ):
            with pytest.raises(ConfigError, match=re.escape(needle)):
                await call()  # type: ignore[no-untyped-call]
    with Store.open(str(tmp_path / "c.db")) as s:
        assert [r.run_id for r in s.list_runs()] == ["r"]
        for limit in (-1, 0, 2**70):  # -1 used to list every run
            with pytest.raises(ValueError, match="limit must be a whole number >= 1"):
                s.list_runs(limit=limit)
    with pytest.raises(TypeError, match="MockProvider needs a function of the request, got None"):
        MockProvider(None)  # type: ignore[arg-type]
    for name in (3, "", "a\x1bb"):
        with pytest.raises(TypeError, match=re.escape(f"name must be a non-empty printable string, got {name!r}")):
            MockProvider(lambda request: None, name=name)  # type: ignore[arg-type]
    from actors._gateway import Gateway

    for bad in ("2", 1.5):
        with pytest.raises(TypeError, match=re.escape(f"max_concurrency must be a whole number, got {bad!r}")):
            Gateway({}, max_concurrency=bad)  # type: ignore[arg-type]


async def test_a_closed_or_read_only_store_is_refused(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    # Either used to fail in the store writer, every run then failing with
    # "no reply to PersistRun: the actor stopped".
    path = str(tmp_path / "c.db")
    closed = Store.open(path)
    closed.close()
    with pytest.raises(ConfigError, match="is closed: the orchestrator writes to it"):
        async with open_orchestrator(store=closed):
            pass  # pragma: no cover
    with Store.open(path, readonly=True) as read_only:
        with pytest.raises(ConfigError, match="is read-only: the orchestrator writes to it"):
            async with open_orchestrator(store=read_only):
                pass  # pragma: no cover


async def test_misuse_after_close_or_from_another_trio_run_is_a_typed_error(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from messages import ActorStopped

    async with open_orchestrator(store=str(tmp_path / "c.db")) as orch:
        # A dict for a pipeline was an AttributeError; a number for a run id
        # made a subscription that never delivered.
        with pytest.raises(ConfigError, match="pipeline must be a Pipeline"):
            await orch.run(pipeline={"stages": []})  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="run_id must be a non-empty string, got 5"):
            orch.subscribe_metrics(5)  # type: ignore[arg-type]

        # From another trio run: trio failed an internal assertion, and this
        # block never exited.
        def elsewhere() -> str:
            async def use() -> None:
                await orch.run("S")

            try:
                trio.run(use)
            except ConfigError as exc:
                return str(exc)
            return "no error"

        said = await trio.to_thread.run_sync(elsewhere)
        assert said.startswith("this orchestrator belongs to the trio run that opened it")
        assert (await orch.run("S")).completed  # the owner is unharmed
    # After the block: these returned channels that never ended.
    with pytest.raises(ActorStopped, match="this orchestrator is closed"):
        orch.subscribe()
    with pytest.raises(ActorStopped, match="this orchestrator is closed"):
        orch.subscribe_metrics()


def test_closed_metrics_subscriptions_are_let_go() -> None:
    from actors._snapshots import MetricsHub

    hub = MetricsHub()
    for _ in range(1000):
        hub.subscribe().close()
    kept = hub.subscribe()
    assert hub.listening()
    assert list(hub._subscriptions.values()) == [kept]  # each snapshot went through all 1,001
    kept.close()
    assert not hub.listening()


async def test_subscriptions_abandoned_unclosed_are_let_go(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A service's clients subscribe, read one event, then leave without
    # closing: kept, 20,000 of them held 1,300,000 events and made the next
    # run 4.9x slower (metrics: 4.5x).
    import gc

    async def progress_client(orch: Any) -> None:
        async for _ in orch.subscribe():
            break

    async def metrics_client(orch: Any) -> None:
        async for _ in orch.subscribe_metrics():
            break

    async with open_orchestrator(store=str(tmp_path / "a.db"), seed=7) as orch:
        kept = orch.subscribe()
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(progress_client, orch)
                nursery.start_soon(metrics_client, orch)
            await trio.testing.wait_all_tasks_blocked()
            assert len(orch._progress._subscribers) == 51
            assert len(orch._metrics_hub._subscriptions) == 50
            assert (await orch.run("SPEC-1", run_id="wake")).completed  # they read, then leave
        gc.collect()
        assert len(orch._progress._subscribers) == 1
        assert len(orch._metrics_hub._subscriptions) == 0
        assert not orch._metrics_hub.listening()
        assert (await orch.run("SPEC-1", run_id="after")).completed
        # The one still held still hears every run.
        assert kept.statistics().current_buffer_used > 0


async def test_a_metrics_subscription_closes_on_leaving_its_block(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_orchestrator(store=str(tmp_path / "a.db"), seed=7) as orch:
        with orch.subscribe_metrics() as sub:
            assert not sub.closed
        assert sub.closed
        async with orch.subscribe_metrics() as other:
            assert not other.closed
        assert other.closed
        with orch.subscribe_metrics() as read:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(orch.run, "SPEC-1")
                async for snapshot in read:
                    break  # stop early: the block closes it
        assert read.closed
        assert not orch._metrics_hub.listening()


class _Halt(BaseException):
    pass


@pytest.mark.parametrize("raised", [KeyboardInterrupt, _Halt])
async def test_a_base_exception_from_a_provider_comes_out_bare(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, raised: type[BaseException]
) -> None:
    # It came out as a group of groups beside an ActorStopped (the agents
    # stopping because of it), so 'except KeyboardInterrupt' missed it.
    sim = SimulatedProvider(seed=0)

    def handler(request: Any) -> Any:
        if request.key.stage == "tasks":
            raise raised()
        return sim.answer(request)

    with pytest.raises(raised) as info:
        async with open_orchestrator(store=str(tmp_path / "c.db"), provider=MockProvider(handler, name="sim")) as orch:
            await orch.run("S")
    assert type(info.value) is raised


async def test_a_mapping_of_one_provider_routes_by_name_too(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    # Its one provider served an agent the pipeline put on another, silently;
    # with two entries the same pipeline was refused.
    pipeline = parse_pipeline('[agents.gemini]\nprovider = "openai"\n[[stages]]\nname = "plan"\nagents = ["gemini", "claude", "gpt_pro"]')
    with pytest.raises(ConfigError, match=r"no provider configured for: openai \(this orchestrator has: sim;"):
        async with open_orchestrator(store=str(tmp_path / "c.db"), pipeline=pipeline, provider={"sim": SimulatedProvider()}):
            pass
    # A bare provider still serves every agent, whatever it is called.
    async with open_orchestrator(store=str(tmp_path / "d.db"), pipeline=pipeline, provider=SimulatedProvider()) as orch:
        assert (await orch.run("S")).completed


async def _run_intercepted(tmp_path: Path, edge: str, handler: Any) -> None:
    """One run with ``handler`` as the only interceptor on ``edge``; a hang
    (what each of these defects was) ends in TooSlowError (virtual)."""
    from messages import FunctionInterceptor

    with trio.fail_after(600):
        async with open_orchestrator(
            store=str(tmp_path / "c.db"), interceptors={edge: [FunctionInterceptor(handler)]}
        ) as orch:
            await orch.run("S")


async def test_an_interceptor_that_swallows_a_request_fails_it_loudly(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Returning without forwarding or answering hung the run for ever.
    from messages import ActorStopped

    async def swallow_decisions(item: Any, forward: Any) -> None:
        if type(item).__name__ != "PersistDecision":
            await forward(item)

    with pytest.raises(ActorStopped, match=r"interceptor FunctionInterceptor\(.*swallow_decisions\) neither forwarded nor answered it"):
        await _run_intercepted(tmp_path, "store", swallow_decisions)


async def test_an_item_the_metrics_accumulator_cannot_handle_fails_the_orchestrator_loudly(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The accumulator ignored what it did not know: the query an
    # interceptor replaced with a string was never answered, and the run
    # hung (the gateway and store writer fail on such an item).
    async def replace(item: Any, forward: Any) -> None:
        await forward("not a message")

    with pytest.raises(TypeError, match=r"the metrics accumulator got a str, which is no metrics message"):
        await _run_intercepted(tmp_path, "metrics", replace)


async def test_a_deeply_nested_answer_is_text_not_a_crash(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    # json.loads raised RecursionError, which the parser did not catch: the
    # agent died and the orchestrator with it, every run in it too.
    from messages import Completion, TokenUsage

    def handler(request: Any) -> Any:
        return Completion(content="[" * 5000 + "]" * 5000, usage=TokenUsage.of(input_tokens=3), model="m")

    path = str(tmp_path / "deep.db")
    async with open_orchestrator(store=path, provider=MockProvider(handler, name="sim")) as orch:
        result = await orch.run("S", run_id="deep")
    assert not result.completed
    with Store.open(path) as s:
        outputs = s.outputs("deep")
        assert outputs and all(o.format == "text" for o in outputs)


async def test_a_provider_errors_own_usage_attribute_is_unknown_usage(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A dict in ProviderError.usage reached the accumulator, whose
    # AttributeError stopped the orchestrator.
    from messages import Disconnected, TokenUsage

    sim = SimulatedProvider(seed=0)
    failed: list[str] = []

    def handler(request: Any) -> Any:
        if request.attempt == 1 and request.key.stage == "plan":
            failed.append(request.key.agent)
            error = Disconnected("stream broke")
            # A dict; then more tokens than SQLite's totals hold (the run ended 'interrupted').
            error.usage = {"input_tokens": 5} if request.key.agent == "gemini" else TokenUsage(input_tokens=2**70)  # type: ignore[attr-defined]
            raise error
        return sim.answer(request)

    async with open_orchestrator(store=str(tmp_path / "u.db"), provider=MockProvider(handler, name="sim")) as orch:
        result = await orch.run("S", run_id="u")
    assert failed and result.completed


async def test_resuming_with_another_seed_is_refused_when_the_seed_draws_the_answers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The embedded simulator answers from the orchestrator's seed: resumed
    # under seed 0, a seed-7 run got stages from two seeds - a digest and
    # usage neither run has - without a word.
    path = str(tmp_path / "s.db")
    with trio.move_on_after(20):
        async with open_orchestrator(store=path, seed=7) as orch:
            await orch.run("S", run_id="x")
    async with open_orchestrator(store=path) as orch:
        with pytest.raises(ConfigError, match=r"made with seed 7.*open_orchestrator\(seed=7"):
            await orch.resume("x")
        with pytest.raises(ConfigError, match="made with seed 7"):
            await orch.rerun("x", "plan")
    async with open_orchestrator(store=path, seed=7) as orch:
        assert (await orch.resume("x")).completed
    async with open_orchestrator(store=path) as orch:
        # Finished: a resume only replays the outcome and draws nothing.
        assert (await orch.resume("x")).completed


async def test_a_fault_interceptor_with_a_seed_of_its_own_lets_any_seed_resume(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Faults placed by the interceptor's own seed=5 draw nothing from the
    # orchestrator's; such a resume was refused all the same.
    path = str(tmp_path / "f.db")
    sim = SimulatedProvider(seed=3, disagreement_rate=0.0)
    with trio.move_on_after(20):
        async with open_orchestrator(
            store=path, seed=7, provider=sim, interceptors={"gateway": [FaultInterceptor("disconnect:20%", seed=5)]}
        ) as orch:
            await orch.run("S", run_id="x")
    for interceptor, refused in ((FaultInterceptor("disconnect:20%"), True), (FaultInterceptor("disconnect:20%", seed=5), False)):
        async with open_orchestrator(store=path, provider=sim, interceptors={"gateway": [interceptor]}) as orch:
            if refused:
                with pytest.raises(ConfigError, match="made with seed 7"):
                    await orch.resume("x")
            else:
                assert (await orch.resume("x")).completed


@pytest.mark.parametrize(("edge", "swallowed"), [("agent", "AgentRequest"), ("coordinator", "AgentReply")])
async def test_an_interceptor_swallowing_what_a_receiver_waits_for_fails_loudly(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, edge: str, swallowed: str
) -> None:
    # These items carry no reply slot to fail: the run hung for ever.
    from messages import ActorStopped, FunctionInterceptor

    async def drop(item: Any, forward: Any) -> None:
        if type(item).__name__ != swallowed:
            await forward(item)

    with pytest.raises(ActorStopped, match=rf"neither forwarded nor answered it \({swallowed}, which its receiver waits for\)"):
        with trio.fail_after(600):
            async with open_orchestrator(store=str(tmp_path / "c.db"), interceptors={edge: [FunctionInterceptor(drop)]}) as orch:
                await orch.run("S")


async def test_an_agent_edge_interceptor_may_still_answer_a_request_itself(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Answering through the request's reply channel is no swallow; the
    # Undelivered check (a927e5a) took it for one and failed the run.
    from messages import AgentReply, FunctionInterceptor

    async def vacate(request: Any, forward: Any) -> None:
        if request.key.agent == "gemini":
            await request.reply_to.send(AgentReply(key=request.key, attempts=0, output=None, error="seat vacated"))
            return
        await forward(request)

    with trio.fail_after(600):
        async with open_orchestrator(store=str(tmp_path / "v.db"), seed=1,
                                     interceptors={"agent": [FunctionInterceptor(vacate)]}) as orch:
            result = await orch.run("S")
    assert result.completed and {s.status for s in result.stages} == {"degraded"}


async def test_a_cancellation_landing_on_the_runs_last_write_leaves_it_completed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The host's deadline falls while the run's end is being acknowledged:
    the end is durable, and it used to be overwritten as 'interrupted' -
    after which a resume re-drove the completed run and wrote a second
    metrics event counting its 19 turns as 0."""
    from messages import FunctionInterceptor, RunUpdate

    db = str(tmp_path / "late.db")
    host = trio.CancelScope()

    async def cancel_after_the_end(item: Any, forward: Any) -> None:
        await forward(item)
        if isinstance(item, RunUpdate) and item.status == "completed":
            host.cancel()

    with host:
        async with open_orchestrator(
            store=db, seed=1, interceptors={"store": [FunctionInterceptor(cancel_after_the_end)]}
        ) as orch:
            await orch.run("SPEC-LATE", run_id="late")
    assert host.cancelled_caught
    with Store.open(db, readonly=True) as store:
        run = store.get_run("late")
        assert run is not None and run.status == "completed" and run.digest
        [branch] = store.branches("late")
        assert branch.status == "completed"
        metrics_events = len(store.events("late", "metrics"))
    async with open_orchestrator(store=db, seed=1) as orch:
        again = await orch.resume("late")
    assert again.status == "completed"
    with Store.open(db, readonly=True) as store:
        assert len(store.events("late", "metrics")) == metrics_events, "a replay writes nothing"
        assert not store.events("late", "resume")


async def _cancel_after(checkpoints: int, scope: trio.CancelScope) -> None:
    for _ in range(checkpoints):
        await trio.lowlevel.checkpoint()
    scope.cancel()


@pytest.mark.parametrize("checkpoints", range(1, 9))
async def test_a_run_cancelled_as_it_starts_is_left_interrupted_not_running(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, checkpoints: int
) -> None:
    """Cancelled while its row was being acknowledged (or its budget set),
    the run was left 'running': shown as killed, though nothing died."""
    db = str(tmp_path / f"early{checkpoints}.db")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_after, checkpoints, nursery.cancel_scope)
        async with open_orchestrator(store=db, seed=1) as orch:
            await orch.run("SPEC-EARLY", run_id="early", budget="5")
    with Store.open(db, readonly=True) as store:
        run = store.get_run("early")
        assert run is None or run.status == "interrupted", run.status


async def test_a_bad_budget_is_a_config_error(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with open_orchestrator(store=str(tmp_path / "b.db")) as orch:
        with pytest.raises(ConfigError, match="'abc'"):
            await orch.run(budget="abc")


class _Closing(SimulatedProvider):
    def __init__(self, how: str) -> None:
        super().__init__(seed=1)
        self.how = how
        self.closes = 0

    async def aclose(self) -> None:
        self.closes += 1
        if self.how == "raise":
            raise RuntimeError("provider close failed")
        if self.how == "hang":
            await trio.sleep_forever()


async def test_a_provider_serving_several_names_is_closed_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    provider = _Closing("ok")
    pipeline = parse_pipeline(
        "[agents.a]\nprovider = 'p1'\nmodel = 'm'\n[agents.b]\nprovider = 'p2'\nmodel = 'm'\n"
        "[[stages]]\nname = 'plan'\nagents = ['a', 'b']\n"
    )
    async with open_orchestrator(store=str(tmp_path / "o.db"), provider=provider, pipeline=pipeline) as orch:
        await orch.run()
    assert provider.closes == 1


async def test_a_provider_failing_to_close_leaves_no_store_open(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    provider = _Closing("raise")
    opened: list[Store] = []
    with pytest.raises(RuntimeError, match="provider close failed"):
        async with open_orchestrator(store=str(tmp_path / "r.db"), provider=provider) as orch:
            opened.append(orch._require_db())
    assert opened and opened[0].closed


async def test_a_provider_hanging_in_close_cannot_hang_a_cancellation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from actors._runtime import PROVIDER_CLOSE_SECONDS

    provider = _Closing("hang")
    start = trio.current_time()
    with trio.move_on_after(10.0):
        async with open_orchestrator(store=str(tmp_path / "h.db"), provider=provider):
            await trio.sleep_forever()
    assert provider.closes == 1
    assert trio.current_time() - start == pytest.approx(10.0 + PROVIDER_CLOSE_SECONDS)


def test_every_error_conclave_raises_on_purpose_is_a_conclave_error() -> None:
    """``except ConclaveError`` is documented to catch them (RunLocked,
    which run and resume raise, was a bare StoreError, and so on)."""
    from actors import PipelineError, PriceFileError, ProviderConfigError
    from actors._mock_backend import MockConfigError
    from messages import ConclaveError
    from store import NotADatabase, RunLocked, SchemaTooNew, StoreError

    for error in (RunLocked, StoreError, NotADatabase, SchemaTooNew, PipelineError, PriceFileError, ProviderConfigError, MockConfigError):
        assert issubclass(error, ConclaveError), error
    # ...and those that were ValueErrors still are.
    assert issubclass(PipelineError, ValueError) and issubclass(ProviderConfigError, ValueError)


def test_a_retryable_store_error_is_a_store_error() -> None:
    """Raised by the public Store.apply, it escaped ``except ConclaveError``."""
    from store import RetryableStoreError, StoreError

    assert issubclass(RetryableStoreError, StoreError)


def test_the_sequencer_and_gate_errors_are_conclave_errors_and_public() -> None:
    """AlreadyDecided, SequencerBusy and GateRefused (which the public
    RateLimitGate.wait raises) escaped ``except ConclaveError``, and
    GateRefused could not be imported from the façade."""
    import actors
    from actors import AlreadyDecided, SequencerBusy
    from messages import ConclaveError

    gate_refused = getattr(actors, "GateRefused", None)
    assert gate_refused is not None and "GateRefused" in actors.__all__
    for error in (AlreadyDecided, SequencerBusy, gate_refused):
        assert issubclass(error, ConclaveError), error
    assert issubclass(SequencerBusy, RuntimeError)  # and still what it was


def test_the_breaker_ticket_is_not_the_sequencer_ticket() -> None:
    """CircuitBreaker.acquire said it returns a Ticket, and actors.Ticket is
    the decision sequencer's: the breaker's has a name of its own."""
    import actors

    admitted = actors.CircuitBreaker(actors.BreakerPolicy()).acquire(0.0)
    breaker_ticket = getattr(actors, "BreakerTicket", None)
    assert breaker_ticket is not None and "BreakerTicket" in actors.__all__
    assert isinstance(admitted, breaker_ticket) and not isinstance(admitted, actors.Ticket)
    assert breaker_ticket is not actors.Ticket


async def test_options_that_are_not_json_are_refused(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    # NaN and Infinity were stored as NaN / Infinity, which JSON does not have.
    async with open_orchestrator(store=str(tmp_path / "n.db")) as orch:
        for value in (math.nan, math.inf):
            with pytest.raises(ConfigError, match="JSON"):
                await orch.run(options={"temperature": value})


async def test_a_run_stored_with_nan_options_still_reruns(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """Runs stored before NaN options were refused keep them; rerun copies
    them, and refusing them there made such runs impossible to rerun."""
    db = str(tmp_path / "nan.db")
    async with open_orchestrator(store=db) as orch:
        await orch.run(run_id="n")
    with Store.open(db) as store:
        store._conn.execute("UPDATE branches SET options = '{\"temperature\":NaN}' WHERE run_id = 'n'")
    async with open_orchestrator(store=db) as orch:
        result = await orch.rerun("n", "plan")
    assert result.completed



async def _halted_run(db: str) -> None:
    async with open_orchestrator(store=db, seed=1) as orch:
        r = await orch.run("SPEC-H", run_id="h", budget="0.000001")
    assert r.status == "halted", r.status


@pytest.mark.parametrize("checkpoints", range(1, 12))
async def test_a_resume_cancelled_as_it_starts_is_left_interrupted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, checkpoints: int
) -> None:
    db = str(tmp_path / "r.db")
    await _halted_run(db)
    async with open_orchestrator(store=db, seed=1) as orch:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_after, checkpoints, nursery.cancel_scope)
            await orch.resume("h", budget="100")
    with Store.open(db, readonly=True) as store:
        run = store.get_run("h")
        assert run is not None and run.status in ("halted", "interrupted"), run.status


@pytest.mark.parametrize("checkpoints", range(1, 14))
async def test_a_rerun_cancelled_as_it_starts_is_left_interrupted(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, checkpoints: int
) -> None:
    db = str(tmp_path / "r.db")
    async with open_orchestrator(store=db, seed=1) as orch:
        await orch.run("SPEC-H", run_id="h")
    async with open_orchestrator(store=db, seed=1) as orch:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_after, checkpoints, nursery.cancel_scope)
            await orch.rerun("h", "plan")
    with Store.open(db, readonly=True) as store:
        run = store.get_run("h")
        assert run is not None and run.status in ("completed", "interrupted"), run.status


async def test_a_provider_failing_to_close_does_not_replace_the_callers_error(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with pytest.raises(KeyError, match="the caller's own"):
        async with open_orchestrator(store=str(tmp_path / "m.db"), provider=_Closing("raise")):
            raise KeyError("the caller's own error")
    # Nor its cancellation: move_on_after must still catch its own.
    with trio.move_on_after(5.0) as scope:
        async with open_orchestrator(store=str(tmp_path / "c.db"), provider=_Closing("raise")):
            await trio.sleep_forever()
    assert scope.cancelled_caught


async def test_an_interceptor_answering_with_a_wrong_result_fails_the_run_resumably(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # usage="lots" reached the shared store writer, which died with an
    # AttributeError: a bare ExceptionGroup, and the run stayed 'running'.
    from messages import CompletionResult, Disconnected, FunctionInterceptor
    from store import Store

    async def answer(item: Any, forward: Any) -> None:
        item.reply_to.send(CompletionResult(key=item.key, attempt=item.attempt, error=Disconnected("cut"), usage="lots"))

    db = str(tmp_path / "w.db")
    with pytest.raises(ValueError, match="usage must be a TokenUsage or None, got str"):
        async with open_orchestrator(store=db, interceptors={"gateway": [FunctionInterceptor(answer)]}) as orch:
            await orch.run("S", run_id="w")
    with Store.open(db) as store:
        row = store.get_run("w")
        assert row is not None and row.status == "interrupted"
    async with open_orchestrator(store=db) as orch:
        assert (await orch.resume("w")).completed


async def test_a_cancelled_run_resumed_by_the_same_orchestrator_counts_as_by_another(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The metrics accumulator kept a cancelled run's state: resumed in the
    same orchestrator, its replays counted as duplicates and as new turns
    (19 turns, 0 replays, 8 duplicates where a new orchestrator, or the CLI,
    said 11 turns and 8 replays)."""
    from store import Store

    async def cancelled_then_resumed(path: str, same: bool) -> tuple[int, int, int]:
        async with open_orchestrator(store=path, seed=7) as orch:
            with trio.move_on_after(20):  # simulated seconds: some stages in
                await orch.run("SPEC-B", run_id="B")
            if same:
                result = await orch.resume("B")
        if not same:
            async with open_orchestrator(store=path, seed=7) as orch:
                result = await orch.resume("B")
        with Store.open(path) as store:
            (recorded,) = store.events("B", "metrics")[-1:]
        return result.turns, result.replays, recorded.detail["duplicates"]

    same = await cancelled_then_resumed(str(tmp_path / "same.db"), same=True)
    other = await cancelled_then_resumed(str(tmp_path / "other.db"), same=False)
    assert same == other
    assert other[1] > 0 and other[2] == 0


async def test_a_cancelled_run_or_block_raises_one_cancelled_not_a_group(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Each agent's and actor's Cancelled came out as (nested) groups of
    Cancelled, which ``except trio.Cancelled`` missed."""
    seen: list[str] = []
    async with open_orchestrator(store=str(tmp_path / "a.db"), seed=7) as orch:
        with trio.move_on_after(3):
            try:
                await orch.run("SPEC-1", run_id="r")
            except trio.Cancelled:
                seen.append("run")
                raise
    with trio.move_on_after(20):
        try:
            async with open_orchestrator(store=str(tmp_path / "b.db"), seed=7) as orch:
                await orch.run("SPEC-1", run_id="r")
        except trio.Cancelled:
            seen.append("block")
            raise
    assert seen == ["run", "block"]
    with Store.open(str(tmp_path / "b.db")) as s:
        run = s.get_run("r")
        assert run is not None and run.status == "interrupted"


async def test_an_interceptor_answering_an_agent_with_an_output_fails_the_run_loudly(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """An interceptor on the agent channel answered gemini's plan request
    with the very output the simulator gives: progress said gemini answered,
    the decision (which reads stored outputs) counted it missing, and the
    run halted on a conflict without a word."""
    from actors import AnswerNotStored
    from messages import AgentOutput, AgentReply, FunctionInterceptor

    async def answer(item: Any, forward: Any) -> None:
        if item.key.stage == "plan" and item.key.agent == "gemini":
            output = AgentOutput(key=item.key, attempt=1, status="accepted", content='{"x": 1}', format="json",
                                 usage=None, model="m", provider="sim")
            await item.reply_to.send(AgentReply(key=item.key, attempts=1, output=output))
            return
        await forward(item)

    path = str(tmp_path / "a.db")
    with pytest.raises(AnswerNotStored, match="stage 'plan': the replies of gemini carry outputs the store does not"):
        async with open_orchestrator(store=path, seed=7, interceptors={"agent": [FunctionInterceptor(answer)]}) as orch:
            await orch.run("SPEC-1", run_id="r")
    with Store.open(path) as s:
        run = s.get_run("r")
        assert run is not None and run.status == "interrupted"
        assert s.decisions("r") == []  # nothing decided on it
