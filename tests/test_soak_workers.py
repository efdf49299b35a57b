"""The soak over several processes (``--workers``): deterministic, merged
invariants, loud failure of a shard, bad input."""

from __future__ import annotations

import ast
import io
import json
import multiprocessing.connection
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trio

from actors._cli_soak import SoakProgress, _workers
from actors import SoakConfig, default_soak_plan, run_soak, soak
from actors._soak import ShardReport, merge_shards
from actors._soak_shards import CRASH_ENV, Stopper, run_sharded, run_sharded_in_trio

from .conftest import run_cli


class _Terminal(io.StringIO):
    """stderr as a terminal: progress is redrawn in place."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # Progress lines are cut to the terminal's width: the one pytest runs
    # in must not cut the lines these tests compare.
    monkeypatch.setenv("COLUMNS", "200")


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
    seen: list[tuple[int, int]] = []
    config = SoakConfig(seed=4, runs=6, workers=2, faults=default_soak_plan("disconnect:20%"))
    report = await soak(config, lambda runs, turns: seen.append((runs, turns)))
    assert report.ok, report.breaches
    assert report.workers == 2 and report.runs == 6
    assert seen[-1] == (6, report.agent_turns)  # spawned workers report progress too


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
            # Ended (its sentinel closes when it exits), well inside a soak
            # of minutes.  Not process.join(): the pool's own threads reap
            # it too, and whichever thread loses that race sees no exit code.
            await trio.to_thread.run_sync(multiprocessing.connection.wait, [process.sentinel])
            assert process.exitcode in (-signal.SIGKILL, None)


class _Stop(Exception):
    pass


def test_a_signal_while_the_workers_start_is_taken_once_all_have_started() -> None:
    """SIGTERM (or Ctrl-C) landing inside the pools' start-up was lost, or
    failed the soak with "cannot join thread before it is started", or left
    a worker that the exit then waited on for ever (--workers 40: most
    signals in the first seconds).  It is now held off until every worker
    has started and is known to the stopper, and then stops them all."""
    from actors._soak_shards import run_sharded

    class SignalAtFirstWorker(Stopper):
        def __init__(self) -> None:
            super().__init__()
            self.added = 0

        def add(self, pool: ProcessPoolExecutor) -> None:
            super().add(pool)
            self.added += 1
            if self.added == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    def stop(signum: int, frame: object) -> None:
        raise _Stop

    stopper = SignalAtFirstWorker()
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(_Stop):
            run_sharded(SoakConfig(seed=5, runs=100_000, workers=4), "fork", stopper)  # minutes of work
        assert signal.getsignal(signal.SIGTERM) is stop  # given back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(stopper.killed) == 4  # all four started, then all four stopped
    multiprocessing.connection.wait([p.sentinel for p in stopper.killed], timeout=60)
    assert all(p.exitcode is not None for p in stopper.killed)


def test_a_worker_leaves_ctrl_c_to_its_parent() -> None:
    """A forked worker inherits the parent's Python handlers: Ctrl-C, the
    parent's to act on (it kills its workers), printed a worker's
    KeyboardInterrupt traceback from the pool's queue.  Workers ignore it;
    SIGTERM keeps its default action."""
    code = (
        "import signal\n"
        "from actors._soak_shards import _init_worker\n"
        "signal.signal(signal.SIGINT, lambda *a: None)\n"
        "signal.signal(signal.SIGTERM, lambda *a: None)\n"
        "_init_worker(None, None)\n"
        "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True True"


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
    assert any(b.startswith("fault kind timeout was configured but never injected (") for b in lonely)
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


def test_workers_auto_is_one_per_core_within_the_concurrency() -> None:
    """auto was one per core whatever --concurrency said: '--concurrency 1
    --workers auto' ran a run in flight on every core."""
    from actors._cli_soak import auto_workers

    assert _workers("auto") == "auto" and _workers("3") == 3
    cores = os.cpu_count() or 1
    assert auto_workers(10_000) == cores and auto_workers(1) == 1
    proc = run_cli(["soak", "--runs", "4", "--concurrency", "1", "--workers", "auto", "--json"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["workers"] == 1


def test_more_workers_than_runs_in_flight_are_refused() -> None:
    """Each worker process runs at least one run at a time: 200 workers
    under --concurrency 16 (the default) ran 200 runs at once, without a
    word - and with a plan whose faults meet the breaker, a digest of its
    own."""
    with pytest.raises(ValueError, match=r"workers is 4 \(--workers 4\), more than concurrency 2 "):
        SoakConfig(workers=4, concurrency=2)
    assert SoakConfig(runs=2, workers=8, concurrency=2).shards == 2  # only 2 processes: 2 in flight
    proc = run_cli(["soak", "--runs", "200", "--workers", "200", "--json"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "conclave: error: workers is 200 (--workers 200), more than concurrency 16 (--concurrency 16): each "
        "worker process has at least one run in flight, so 200 runs would be in flight at once; give workers "
        "16 or fewer, or concurrency 200 or more\n"
    )


def test_more_workers_than_cores_are_run_but_said(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not refused (a soak replayed from a larger machine needs its
    --workers: the digest may depend on them), but they only take turns."""
    from actors._cli import main

    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert main(["soak", "--seed", "3", "--runs", "4", "--workers", "2", "--faults", "disconnect:10%", "--json"]) == 0
    err = capsys.readouterr().err
    assert "conclave: warning: 2 worker processes (--workers 2) on this machine's 1 core(s)" in err
    assert main(["soak", "--seed", "3", "--runs", "4", "--workers", "auto", "--faults", "disconnect:10%", "--json"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("crash", ["1", "1:exit"])
def test_a_failing_shard_fails_the_soak_with_the_seed_and_the_shard(crash: str) -> None:
    proc = run_cli(["soak", "--seed", "9", "--runs", "20", "--workers", "2"], env={CRASH_ENV: crash})
    assert proc.returncode == 1
    assert "shard 1 of 2 (10 run(s): index % 2 == 1) failed" in proc.stderr
    assert "died while starting" not in proc.stderr  # it had started: only a shard that had not is blamed on that
    assert "10 run(s) never finished" in proc.stderr
    assert "soak FAILED (seed 9); replay with: conclave soak --seed 9 --runs 20 --concurrency 16 " in proc.stderr
    assert proc.stderr.rstrip().endswith("--workers 2")


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_counts_every_run_and_turn(workers: int) -> None:
    seen: list[tuple[int, int]] = []
    config = SoakConfig(seed=3, runs=12, workers=workers, faults=default_soak_plan("disconnect:10%"))
    report = run_soak(config, lambda runs, turns: seen.append((runs, turns)))
    assert report.ok, report.breaches
    assert seen[-1] == (12, report.agent_turns)
    assert seen == sorted(seen) and len(set(seen)) == len(seen)  # it only ever moves on
    if workers == 1:
        assert [runs for runs, _ in seen] == list(range(1, 13))


def test_a_big_sharded_soak_tells_its_progress_every_few_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard told its progress once per 1/200 of its runs: 2,500 runs a
    message in a 1,000,000-run soak over 2 workers, so the progress stood
    still for tens of seconds.  Here one message per whole shard stands
    for that scale (the workers are forked: they carry the patch)."""
    from actors import _soak_shards

    monkeypatch.setattr(_soak_shards, "_PROGRESS_STEPS", 1)
    seen: list[tuple[int, int]] = [(0, 0)]
    config = SoakConfig(seed=3, runs=50, workers=2, faults=default_soak_plan("disconnect:10%"))
    report = run_sharded(config, "fork", progress=lambda runs, turns: seen.append((runs, turns)))
    assert report.ok, report.breaches
    assert seen[-1] == (50, report.agent_turns)
    steps = [after - before for (before, _), (after, _) in zip(seen, seen[1:])]
    assert 0 < max(steps) <= 10, steps  # each message moves one shard on by at most 10 runs


def test_an_interrupted_sharded_soak_says_how_many_runs_it_had_checked() -> None:
    """Ctrl-C on a 1,000,000-run soak over 2 workers said "interrupted
    after 0/1,000,000 runs": the count is the last one the shards told, and
    they told it every 2,500 runs.  Here Ctrl-C comes once shard 0 has
    checked 30 runs (sent by that shard itself: no waiting on the clock)."""
    script = (
        "import os, signal, sys\n"
        "from actors import _cli, _soak_shards\n"
        "real = _soak_shards.soak_shard\n"
        "async def soak_shard(config, shard, progress=None, **kw):\n"
        "    def told(runs, turns):\n"
        "        progress(runs, turns)\n"
        "        if shard == 0 and runs == 30:\n"
        "            os.kill(os.getppid(), signal.SIGINT)\n"
        "    return await real(config, shard, told, **kw)\n"
        "_soak_shards.soak_shard = soak_shard  # the workers are forked: they carry it\n"
        "sys.exit(_cli.main(['soak', '--seed', '42424', '--runs', '1000000', '--workers', '2']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    found = re.search(r"conclave: soak interrupted after ([\d,]+)/1,000,000 runs \(([\d,]+) agent turns\)", proc.stderr)
    assert found is not None, proc.stderr
    runs, turns = (int(n.replace(",", "")) for n in found.groups())
    assert runs >= 30 and turns >= runs, proc.stderr  # shard 0's 30 at least: told before the signal


@pytest.mark.parametrize("workers", [1, 2])
def test_a_progress_that_raises_does_not_stop_the_soak(workers: int) -> None:
    calls = []

    def broken(runs: int, turns: int) -> None:
        calls.append(runs)
        raise RuntimeError("display gone")

    report = run_soak(SoakConfig(seed=3, runs=8, workers=workers, faults=default_soak_plan("disconnect:10%")), broken)
    assert report.ok and report.runs == 8
    assert len(calls) == 1  # not called again once it failed


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_cli_shows_progress_but_not_with_json(workers: str) -> None:
    proc = run_cli(["soak", "--seed", "3", "--runs", "20", "--workers", workers])
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("soak: ")]
    assert lines[-1].startswith("soak: 20/20 runs (100%), ")
    assert 2 <= len(lines) <= 11  # a line per tenth when stderr is not a terminal
    quiet = run_cli(["soak", "--seed", "3", "--runs", "20", "--workers", workers, "--json"])
    assert quiet.returncode == 0 and "soak: " not in quiet.stderr
    assert json.loads(quiet.stdout)["agent_turns"] == int(lines[-1].split(", ")[-1].split()[0].replace(",", ""))


def test_on_a_terminal_progress_redraws_one_line() -> None:
    out = _Terminal()
    show = SoakProgress(out, 1000)
    for runs in range(1, 1001):
        show(runs, runs * 19)
    text = out.getvalue()
    assert text.count("\r") == 101 and text.count("\n") == 1 and text.endswith("1,000/1,000 runs (100%), 19,000 agent turns\n")


def test_on_a_narrow_terminal_progress_is_cut_to_its_width(monkeypatch: pytest.MonkeyPatch) -> None:
    # Wrapped at 30 columns, each redraw left a line behind ("\r" goes back
    # only to the start of the last screen line).
    from actors._footer import ERASE

    monkeypatch.setenv("COLUMNS", "30")
    out = _Terminal()
    show = SoakProgress(out, 40)
    for runs in range(1, 41):
        show(runs, runs * 19)
    redraws = out.getvalue().split(ERASE)[1:]
    assert len(redraws) == 40 and all(len(r.rstrip("\n")) <= 29 for r in redraws)
    assert redraws[0] == "soak: 1/40 runs (2%), 19 age…"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_cli_soak_runs_from_a_thread_of_an_embedding_app(capsys: pytest.CaptureFixture[str], workers: str) -> None:
    # Only the main thread may set the SIGTERM handler a sharded soak uses,
    # or receive signals in the trio run of a one-process soak.
    import threading

    from actors._cli import main

    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main(["soak", "--runs", "4", "--workers", workers, "--json"])))
    thread.start()
    thread.join()
    assert codes == [0]
    assert json.loads(capsys.readouterr().out)["runs"] == 4


def test_a_shard_reports_the_runs_it_really_had_in_flight() -> None:
    # 3 runs over 3 shards: one run each, not ceil(1000 / 3) = 334.
    report = run_soak(SoakConfig(seed=2, runs=3, workers=4, concurrency=1000, faults=default_soak_plan("disconnect:20%")))
    assert report.workers == 3 and [s.concurrency for s in report.shards] == [1, 1, 1]


def _gate_never_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    # Calls then reach the provider inside 429 windows: a breach the
    # checker finds while the runs go on.  (Forked workers inherit it.)
    from actors import RateLimitGate

    async def no_wait(self: RateLimitGate, *limits: float) -> float:  # (unit, until, max_wait)
        await trio.lowlevel.checkpoint()
        return 0.0

    monkeypatch.setattr(RateLimitGate, "wait", no_wait)


@pytest.mark.parametrize("workers", [1, 2])
def test_breaches_are_told_as_they_are_found(monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    """A breach used to surface only in the report: a soak of hours that
    failed in its first minute said so at its end."""
    _gate_never_waits(monkeypatch)
    told: list[tuple[str, object]] = []
    config = SoakConfig(seed=5, runs=40, workers=workers, faults=default_soak_plan("429:20%"))
    report = run_soak(config, lambda runs, turns: told.append(("runs", runs)), on_breach=lambda text: told.append(("breach", text)))
    assert not report.ok
    breaches = [text for kind, text in told if kind == "breach"]
    assert breaches and set(breaches) <= set(report.breaches)
    assert any("inside a 429 reset window" in str(b) for b in breaches)
    first = next(i for i, (kind, _) in enumerate(told) if kind == "breach")
    assert ("runs", 40) in told[first:] and told.index(("runs", 40)) > first  # told before the soak ended


def test_a_breach_callback_that_raises_does_not_stop_the_soak(monkeypatch: pytest.MonkeyPatch) -> None:
    _gate_never_waits(monkeypatch)
    calls = []

    def broken(text: str) -> None:
        calls.append(text)
        raise RuntimeError("display gone")

    report = run_soak(SoakConfig(seed=5, runs=20, faults=default_soak_plan("429:20%")), on_breach=broken)
    assert report.runs == 20 and not report.ok and len(calls) == 1


def test_the_cli_shows_the_first_breach_at_once_with_its_replay(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from actors._cli import main

    _gate_never_waits(monkeypatch)
    assert main(["soak", "--seed", "5", "--runs", "40", "--faults", "429:20%"]) == 1
    err = capsys.readouterr().err.splitlines()
    found = next(i for i, line in enumerate(err) if "breach found, the soak goes on (Ctrl-C stops it)" in line)
    assert err[found].startswith("conclave: soak seed 5: ")
    assert err[found + 1] == "conclave: replay with: conclave soak --seed 5 --runs 40 --concurrency 16 --faults 429:20%"
    later = [line for line in err[found:] if line.startswith("soak: ")]
    assert later and later[-1].startswith("soak: 40/40 runs (100%)") and later[-1].endswith(", breaches found")
    assert err[-1].startswith("conclave: error: soak FAILED (seed 5)")


def test_on_a_terminal_a_breach_gets_a_line_of_its_own() -> None:
    out = _Terminal()
    show = SoakProgress(out, 10, seed=4, replay="conclave soak --seed 4 --runs 10")
    show(1, 19)
    show.breach("a call reached sim inside a 429 reset window")
    show(2, 38)
    show.breach("another")  # no line of its own
    show(10, 190)
    lines = out.getvalue().split("\n")
    assert lines[0] == "\r\x1b[2Ksoak: 1/10 runs (10%), 19 agent turns"
    assert lines[1].startswith("conclave: soak seed 4: breach found") and lines[1].endswith("inside a 429 reset window")
    assert lines[2] == "conclave: replay with: conclave soak --seed 4 --runs 10"
    assert lines[3].endswith("\r\x1b[2Ksoak: 10/10 runs (100%), 190 agent turns, breaches found") and lines[4] == ""


def test_an_interrupted_soak_says_how_far_it_got_and_whether_it_had_failed() -> None:
    out = _Terminal()
    show = SoakProgress(out, 1000)
    show(7, 133)
    show.interrupted()
    assert out.getvalue().endswith(
        "\r\x1b[2Ksoak: 7/1,000 runs (0%), 133 agent turns\n"  # the redrawn line is ended first
        "conclave: soak interrupted after 7/1,000 runs (133 agent turns); no breach found so far\n"
    )
    show.breach("something")
    show(9, 171)
    show.interrupted()
    assert out.getvalue().endswith(
        "conclave: soak interrupted after 9/1,000 runs (171 agent turns); breaches found (the first is shown above)\n"
    )


def test_with_json_an_interrupted_soak_still_says_how_far_it_got() -> None:
    """--json ran without a progress tracker: Ctrl-C left only
    "conclave: error: interrupted" and an empty stdout."""
    out = _Terminal()
    show = SoakProgress(out, 1000, quiet=True)
    show(7, 133)
    show.breach("something")  # --json lists breaches in its document, not as they come
    show(9, 171)
    assert out.getvalue() == ""
    show.interrupted()
    assert out.getvalue() == "conclave: soak interrupted after 9/1,000 runs (171 agent turns); breaches found\n"


def _workers_of(parent: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                # "pid (comm) state ppid ...": comm may hold spaces
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            children.append(int(entry))
    return children


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="waits on pidfds (Linux)")
def test_workers_die_with_a_parent_killed_outright() -> None:
    """SIGKILL (or the OOM killer) gives a parent no chance to kill its
    workers: they ran the whole soak to its end for nobody, and a soak of
    100,000 runs kept two cores busy for hours."""
    import select
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "actors", "soak", "--seed", "31337", "--runs", "100000", "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    workers: list[int] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the workers report progress: they run
            if line.startswith("soak: "):
                break
        workers = _workers_of(proc.pid)
        assert len(workers) >= 2, workers  # (the pool's manager may add none)
        pidfds = [os.pidfd_open(pid) for pid in workers]
        proc.kill()
        proc.wait(timeout=60)
        try:
            pending = list(pidfds)
            while pending:  # a pidfd turns readable when its process ends
                ready, _, _ = select.select(pending, [], [], 30)
                assert ready, f"workers outlived their parent: {workers}"
                pending = [fd for fd in pending if fd not in ready]
        finally:
            for fd in pidfds:
                os.close(fd)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:  # never leave a soak running behind the tests
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_forked_worker_does_not_keep_its_parents_signal_handlers() -> None:
    """Forked from a parent whose SIGTERM and SIGHUP raise Terminated (the
    CLI's), a worker raised it inside its own trio run when told to stop,
    and went on, idle, for ever."""
    from concurrent.futures import ProcessPoolExecutor

    from actors._soak_shards import _init_worker

    def raise_(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, raise_) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(1, mp_context=context, initializer=_init_worker, initargs=(None, os.getpid())) as pool:
            assert pool.submit(_handlers).result(timeout=60) == [signal.SIG_DFL, signal.SIG_DFL]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _handlers() -> list[object]:
    return [signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)]


def test_a_script_with_no_main_guard_is_told_it_needs_one(tmp_path: Path) -> None:
    """Spawned workers import the main module again: a script starting the
    soak at its top level starts it again in each, multiprocessing refuses,
    and the soak failed with BrokenProcessPool and "never injected" lines
    ("give it more --runs") that pointed everywhere but at the cause."""
    script = tmp_path / "soak_script.py"
    script.write_text(
        "import trio, trio.testing, actors\n"
        "report = trio.run(actors.soak, actors.SoakConfig(runs=2, workers=2),\n"
        "                  clock=trio.testing.MockClock(autojump_threshold=0))\n"
        "print(repr(report.breaches))\n"
    )
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    breaches = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    hint = (
        "(its worker process died while starting, likely while importing the main module: with the 'spawn' "
        "start method each worker imports it again, so a script that runs a soak with workers > 1 must start "
        'it under `if __name__ == "__main__":`, as multiprocessing requires)'
    )
    assert [b.startswith(f"shard {k} of 2 ") and b.endswith(hint) for k, b in enumerate(breaches[:2])] == [True, True]
    assert breaches[2:] == ("2 run(s) never finished",)


def test_the_summary_groups_thousands_as_the_progress_does() -> None:
    """The summary said "6311 agent turns" under a progress line of
    "6,311 agent turns"."""
    from actors._cli_soak import _human

    report = run_soak(SoakConfig(seed=3, runs=60, faults=default_soak_plan("disconnect:4%,429:3%,timeout:3%")))
    assert report.agent_turns >= 1000
    assert f"60 run(s), {report.agent_turns:,} agent turns (" in _human(report)


def test_a_worker_killed_as_it_reports_its_start_cannot_hang_the_soak(tmp_path: Path) -> None:
    """The start flag was a multiprocessing Event, whose set() takes a lock
    shared with the parent: a worker killed inside it (by the stopper, the
    OOM killer) died holding the lock, and the parent, asking whether that
    worker had started, waited for ever.  Here every Event.set kills its
    process half-way; the soak must still end."""
    script = tmp_path / "killed.py"
    script.write_text(
        "import os, signal, multiprocessing.synchronize as sync\n"
        "def dying_set(self):\n"
        "    self._cond.acquire()\n"  # as Event.set does, then killed before releasing
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "sync.Event.set = dying_set\n"
        "from actors import SoakConfig, run_soak\n"
        "report = run_soak(SoakConfig(seed=1, runs=4, workers=2))\n"
        "print('ended', report.ok)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ended"), proc.stdout


@pytest.mark.parametrize("when", ["holding", "giving back"])
def test_a_signal_while_handlers_change_hands_leaves_the_apps_handlers_whole(
    when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hold swaps three handlers in turn, and gives them back in turn: a
    signal between two swaps, whose handler raised, left the rest of an
    embedding app's handlers replaced by the hold's recorder for good
    (every later Ctrl-C or SIGTERM swallowed)."""
    from actors._soak_shards import _signals_held

    def app_int(signum: int, frame: object) -> None:
        raise _Stop("int")

    def app_term(signum: int, frame: object) -> None:
        raise _Stop("term")

    real_signal = signal.signal
    sent = []

    def swapping(signum: int, handler: Any) -> Any:
        previous = real_signal(signum, handler)
        first_swap = when == "holding" and signum == signal.SIGINT and handler is not app_int
        first_back = when == "giving back" and signum == signal.SIGINT and handler is app_int
        if (first_swap or first_back) and not sent:
            sent.append(signum)
            os.kill(os.getpid(), signal.SIGTERM if when == "holding" else signal.SIGINT)
        return previous

    previous = real_signal(signal.SIGINT, app_int), real_signal(signal.SIGTERM, app_term)
    try:
        monkeypatch.setattr(signal, "signal", swapping)
        with pytest.raises(_Stop):
            with _signals_held():
                pass
        monkeypatch.undo()
        assert sent
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (app_int, app_term)
    finally:
        monkeypatch.undo()
        real_signal(signal.SIGINT, previous[0])
        real_signal(signal.SIGTERM, previous[1])
