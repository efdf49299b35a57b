"""The soak over several processes (``--workers``): deterministic, merged
invariants, loud failure of a shard, bad input."""

from __future__ import annotations

import json
import os
import signal

import pytest
import trio

from actors._cli_soak import _workers
from actors import SoakConfig, default_soak_plan, run_soak, soak
from actors._soak import ShardReport, merge_shards
from actors._soak_shards import CRASH_ENV, Stopper, run_sharded_in_trio

from .conftest import run_cli


def test_two_workers_same_digest_across_processes_and_hash_seeds() -> None:
    seen = set()
    for hashseed in ("0", "4242"):
        proc = run_cli(["soak", "--seed", "8", "--runs", "20", "--workers", "2", "--json"], env={"PYTHONHASHSEED": hashseed})
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert data["ok"] and data["workers"] == 2 and len(data["shards"]) == 2
        seen.add((data["digest"], data["fault_digest"]))
    assert len(seen) == 1


def test_two_workers_hold_every_invariant_and_add_up_to_their_shards() -> None:
    config = SoakConfig(seed=2026, runs=20, workers=2, faults=default_soak_plan("disconnect:4%,429:3%,timeout:3%"))
    report = run_soak(config)
    assert report.ok, report.breaches
    assert report.workers == 2 and [s.shard for s in report.shards] == [0, 1]
    assert [s.runs for s in report.shards] == [10, 10]
    assert [s.concurrency for s in report.shards] == [8, 8]  # ceil(16 / 2): the total in flight stays 16
    assert report.runs == sum(s.runs for s in report.shards) == 20
    assert report.completed + report.halted == 20 and report.lost == 0
    assert report.agent_turns == sum(s.agent_turns for s in report.shards) >= 20 * 19
    assert report.wall_seconds >= max(s.wall_seconds for s in report.shards)
    assert report.virtual_seconds == max(s.virtual_seconds for s in report.shards)
    assert all(report.faults[k] and report.recovered[k] for k in ("disconnect", "rate_limit", "timeout"))


async def test_soak_from_inside_a_trio_run_spawns_its_workers() -> None:
    report = await soak(SoakConfig(seed=4, runs=6, workers=2, faults=default_soak_plan("disconnect:20%")))
    assert report.ok, report.breaches
    assert report.workers == 2 and report.runs == 6


async def test_cancelling_a_sharded_soak_kills_its_workers() -> None:
    """A soak embedded in a trio app must stop when cancelled: its workers
    are killed, not left running to the end of a long soak."""
    stopper = Stopper()
    config = SoakConfig(seed=5, runs=100_000, workers=2)  # minutes of work
    with trio.fail_after(60):  # the cancellation must not wait for the soak
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_sharded_in_trio, config, stopper)
            await trio.to_thread.run_sync(stopper.started.wait)  # both workers exist
            nursery.cancel_scope.cancel()
        assert len(stopper.killed) == 2
        for process in stopper.killed:
            await trio.to_thread.run_sync(process.join)
            assert process.exitcode == -signal.SIGKILL


def _part(shard: int, injected: dict[str, int], recovered: dict[str, int]) -> ShardReport:
    return ShardReport(
        shard=shard, shards=2, concurrency=1, outcomes=(), injected=injected, recovered=recovered,
        placement_rows=(), breaches=(), breaker_trips=0, gate_waits=0, wall_seconds=0.0, virtual_seconds=0.0,
    )


def test_fault_kinds_are_checked_on_the_merged_totals() -> None:
    """A kind injected and recovered in one shard only is no breach; a kind
    in none is, and so are runs that no shard reported."""
    config = SoakConfig(runs=4, workers=2, faults=default_soak_plan("disconnect:5%,timeout:5%"))
    parts = [_part(0, {"disconnect": 2}, {"disconnect": 1}), _part(1, {"timeout": 1}, {"timeout": 1})]
    breaches = merge_shards(config, parts, [], wall_seconds=0.0).breaches
    assert not any("disconnect" in b or "timeout" in b for b in breaches), breaches
    assert "4 run(s) never finished" in breaches
    lonely = merge_shards(config, parts[:1], ["shard 1 of 2 failed"], wall_seconds=0.0).breaches
    assert "fault kind timeout was configured but never injected" in lonely
    assert "shard 1 of 2 failed" in lonely


def test_workers_never_exceed_the_runs() -> None:
    config = SoakConfig(runs=3, workers=8, concurrency=16)
    assert config.shards == 3 and config.shard_concurrency == 6
    assert [list(config.shard_indices(k)) for k in range(3)] == [[0], [1], [2]]
    with pytest.raises(ValueError, match="workers"):
        SoakConfig(workers=0)


@pytest.mark.parametrize("value", ["0", "-2", "lots", "1.5", ""])
def test_bad_workers_exit_2_naming_the_value(value: str) -> None:
    proc = run_cli(["soak", "--runs", "2", "--workers", value])
    assert proc.returncode == 2
    assert f"argument --workers: expected a positive whole number or 'auto', got {value!r}" in proc.stderr


def test_workers_auto_is_one_per_core() -> None:
    assert _workers("auto") == (os.cpu_count() or 1)
    assert _workers("3") == 3


@pytest.mark.parametrize("crash", ["1", "1:exit"])
def test_a_failing_shard_fails_the_soak_with_the_seed_and_the_shard(crash: str) -> None:
    proc = run_cli(["soak", "--seed", "9", "--runs", "20", "--workers", "2"], env={CRASH_ENV: crash})
    assert proc.returncode == 1
    assert "shard 1 of 2 (10 run(s): index % 2 == 1) failed" in proc.stderr
    assert "10 run(s) never finished" in proc.stderr
    assert "soak FAILED (seed 9); replay with --seed 9 --workers 2" in proc.stderr
