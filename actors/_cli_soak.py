"""``conclave soak``: the deterministic fault soak from the command line.

Exit 0 when every invariant held, 1 on a breach (naming the seed, so the
failure can be replayed with ``--seed``) or when stdout closed before the
report was written (saying so, and whether the soak passed), 2 on bad
input, 130 on Ctrl-C and 143 on SIGTERM and 129 on SIGHUP (each after
saying how far the soak got).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import shutil
import sys
from typing import Any, TextIO

import trio
import trio.testing

from messages import FaultPlan, FaultPlanError, ResetHint
from messages._faultplan import DEFAULT_TIMEOUT_MS

from ._checks import positive_arg, seed_arg
from ._cli import EXIT_ERROR, PIPE_CLOSED, _drop_stdout, _fail, _flush_stdout, _is_interrupt, interruptible
from ._footer import ERASE, redraws_in_place
from ._retry import RetryPolicy
from ._soak import (
    DEFAULT_SOAK_FAULTS,
    DEFAULT_SOAK_RESET,
    OnBreach,
    Progress,
    SoakConfig,
    SoakReport,
    run_soak,
    soak,
    with_soak_reset,
)


class _BadInput(Exception):
    pass


AUTO = "auto"


def _workers(text: str) -> int | str:
    """argparse type: a positive whole number, or :data:`AUTO` (resolved
    once --concurrency is known: see :func:`auto_workers`)."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return positive_arg(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number or 'auto', got {text!r}") from None


def register(sub: Any) -> None:
    p = sub.add_parser(
        "soak",
        help="run many pipelines with injected faults on a virtual clock and check invariants",
        description=(
            "Run R pipelines on the simulated provider under a virtual clock with faults "
            "injected, and check that every agent call ends exactly once, retries stay within "
            "their limit, no call reaches a provider inside a 429 window or through an open "
            "breaker, every stage is decided exactly once and usage adds up. Exit 1 and the "
            "seed on any breach. The digest is the same for the same seed, fault plan, --runs, "
            "--concurrency and --workers, in any process."
        ),
    )
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of everything (default: 0)")
    p.add_argument("--runs", type=positive_arg, default=100, help="pipelines to run (default: 100)")
    p.add_argument("--agents", type=positive_arg, metavar="N", help="agents per stage (default: the default pipeline's roster)")
    p.add_argument(
        "--faults",
        metavar="SPEC",
        # argparse %-formats help: the default's "10%" must reach it as "10%%".
        help=f"faults to inject (default: CODEX_FAULTS, else {DEFAULT_SOAK_FAULTS.replace('%', '%%')}); "
        "a 429 gets a 5 s reset hint unless CODEX_FAULTS_429_RESET says otherwise (one later than the "
        f"{RetryPolicy().max_wait:g} s a retry waits, now+SECONDS or an RFC 3339 time included, is refused: "
        "exit 2); CODEX_FAULTS_SCOPE and CODEX_FAULTS_TIMEOUT_MS apply too, as for run",
    )
    p.add_argument(
        # CODEX_FAULTS_SEED is read by FaultPlan.from_env: "default: --seed"
        # hid it, and the banner then named a seed the help never mentioned.
        "--fault-seed", type=seed_arg, metavar="N", help="seed of fault placement (default: CODEX_FAULTS_SEED, else --seed)"
    )
    p.add_argument("--concurrency", type=positive_arg, default=16, help="runs in flight at once (default: 16)")
    p.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N|auto",
        help="processes to split the runs over (run i goes to worker i %% N, each with its own "
        "store, virtual clock and ceil(concurrency / N) runs in flight; at most --concurrency, as "
        "each runs at least one; auto: one per core, at most --concurrency; default: 1). More "
        "than the machine's cores is slower, not faster, and said on stderr, but allowed: runs in "
        "one process share a rate-limit gate and breaker, so the digest may depend on --workers "
        "as on --concurrency, and a replay needs the same N",
    )
    p.add_argument("--max-attempts", type=positive_arg, default=3, help="attempts per agent call (default: 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--check-determinism", action="store_true", help="run twice and fail if the digests or the fault digests differ"
    )
    p.set_defaults(handler=cmd_soak)


def auto_workers(concurrency: int) -> int:
    """``--workers auto``: one per core, but no more than there are runs in
    flight (each worker runs at least one; more is refused)."""
    return max(1, min(os.cpu_count() or 1, concurrency))


def soak_config(args: argparse.Namespace) -> SoakConfig:
    env = dict(os.environ)
    spec = args.faults
    if spec is None and not env.get("CODEX_FAULTS", "").strip():
        spec = DEFAULT_SOAK_FAULTS
    try:
        plan = FaultPlan.from_env(env, faults=spec, seed=args.fault_seed)
    except FaultPlanError as exc:
        raise _BadInput(str(exc)) from None
    try:
        return SoakConfig(
            seed=args.seed,
            runs=args.runs,
            agents=args.agents,
            faults=with_soak_reset(plan),
            concurrency=args.concurrency,
            workers=auto_workers(args.concurrency) if args.workers == AUTO else args.workers,
            retry=RetryPolicy(max_attempts=args.max_attempts),
        )
    except ValueError as exc:  # a fault scope the soak never calls
        raise _BadInput(str(exc)) from None


class SoakProgress:
    """Shows a soak's progress on ``out``: redrawn in place on a terminal,
    else a line per tenth of the runs (a log stays short).  Called with the
    runs checked so far and their agent turns, and (:meth:`breach`) with
    each breach found; from another thread when the soak has workers, never
    from two at once.

    The first breach is shown at once, with the command that replays it: a
    long soak that has failed need not be waited for.  The progress line
    then says so; the report lists them (the first 50 of each worker)."""

    def __init__(
        self, out: TextIO, runs: int, label: str = "soak", *, seed: int = 0, replay: str = "", quiet: bool = False
    ) -> None:
        self.out = out
        # --json: nothing while it runs, but an interrupted soak still says
        # how far it got (it said only "interrupted").
        self.quiet = quiet
        self.runs = runs
        self.label = label
        self.seed = seed
        self.replay = replay
        self.tty = redraws_in_place(out.isatty())
        self.shown = -1
        self.breaches = 0
        self._last = (0, 0)
        self._open_line = False  # a redrawn line the cursor is still on

    def __call__(self, done: int, turns: int) -> None:
        self._last = (done, turns)
        if self.quiet:
            return
        step = done * (100 if self.tty else 10) // self.runs
        if step == self.shown:
            return
        self.shown = step
        self._show()

    def _show(self) -> None:
        done, turns = self._last
        line = f"{self.label}: {done:,}/{self.runs:,} runs ({done * 100 // self.runs}%), {turns:,} agent turns"
        if self.breaches:
            line += ", breaches found"
        if self.tty:
            self._open_line = done != self.runs
            # Cut to the terminal's width and erased first: a line that
            # wrapped left a copy per update, as "\r" goes back only to
            # the start of its last screen line.
            width = max(2, shutil.get_terminal_size((80, 24)).columns - 1)
            if len(line) > width:
                line = line[: width - 1] + "…"
            self.out.write(f"{ERASE}{line}" + ("" if self._open_line else "\n"))
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def _end_line(self) -> None:
        # A line of our own must not land on the end of a redrawn one.
        if self._open_line:
            self.out.write("\n")
            self._open_line = False

    def interrupted(self) -> None:
        """Say how far an interrupted soak got, and whether it had failed."""
        self._end_line()
        done, turns = self._last
        shown = "" if self.quiet else " (the first is shown above)"
        found = f"breaches found{shown}" if self.breaches else "no breach found so far"
        self.out.write(f"conclave: soak interrupted after {done:,}/{self.runs:,} runs ({turns:,} agent turns); {found}\n")
        self.out.flush()

    def breach(self, text: str) -> None:
        self.breaches += 1
        if self.quiet:
            return
        if self.breaches > 1:
            if self.tty:
                self._show()
            return
        self._end_line()
        self.out.write(
            f"conclave: soak seed {self.seed}: breach found, the soak goes on (Ctrl-C stops it): {text}\n"
            f"conclave: replay with: {self.replay}\n"
        )
        self.out.flush()


def _human(report: SoakReport) -> str:
    # Thousands grouped, as the progress line groups them.
    faults = ", ".join(f"{k} {v:,}" for k, v in report.faults.items())
    recovered = ", ".join(f"{k} {v:,}" for k, v in report.recovered.items())
    lines = [
        f"soak seed {report.seed}: {report.runs:,} run(s), {report.agent_turns:,} agent turns "
        f"({report.completed:,} completed, {report.halted:,} halted)",
        f"  faults injected: {faults}; recovered: {recovered}",
        f"  retries {report.retries:,} | lost {report.lost:,} | duplicate decisions {report.duplicate_decisions:,} "
        f"| breaker trips {report.breaker_trips:,} | gate waits {report.gate_waits:,}",
        f"  digest {report.digest}",
        f"  wall {report.wall_seconds:.2f}s | virtual {report.virtual_seconds:.1f}s "
        f"| {report.agent_turns / max(report.wall_seconds, 1e-9):,.0f} turns/s",
    ]
    if report.workers > 1:
        lines.append(
            f"  {report.workers} workers: "
            + "; ".join(
                f"shard {s.shard} {s.runs:,} run(s), {s.agent_turns:,} turns, wall {s.wall_seconds:.2f}s"
                for s in report.shards
            )
        )
    lines.append("  invariants: all held" if report.ok else "  invariants: BROKEN")
    return "\n".join(lines)


def _replayable(hint: ResetHint) -> str:
    # An RFC 3339 time was read against today's wall clock, and the same
    # moment tomorrow is a shorter wait (a past one none at all): what this
    # soak ran with is the anchored wait it was read as.
    if hint.mode == "anchored" and not hint.text.lower().startswith("now+"):
        return f"now+{hint.seconds!r}"
    return hint.text


def replay_command(config: SoakConfig) -> str:
    """The command that runs ``config`` again: every input of the digest the
    CLI can set, so a failing seed replays as it failed (the seed alone
    would run the default runs, faults and attempts)."""
    plan = config.faults
    env = []
    if plan.provider is not None:
        env.append(f"CODEX_FAULTS_SCOPE=gateway:{plan.provider}")
    if plan.reset is not None and plan.reset != DEFAULT_SOAK_RESET:
        env.append(f"CODEX_FAULTS_429_RESET={_replayable(plan.reset)}")
    if plan.timeout_ms != DEFAULT_TIMEOUT_MS:
        env.append(f"CODEX_FAULTS_TIMEOUT_MS={plan.timeout_ms}")
    argv = ["conclave", "soak", "--seed", str(config.seed), "--runs", str(config.runs)]
    argv += ["--concurrency", str(config.concurrency), "--faults", plan.describe_kinds()]
    if plan.seed is not None and plan.seed != config.seed:
        argv += ["--fault-seed", str(plan.seed)]
    if config.agents is not None:
        argv += ["--agents", str(config.agents)]
    if config.retry.max_attempts != RetryPolicy().max_attempts:
        argv += ["--max-attempts", str(config.retry.max_attempts)]
    if config.workers > 1:
        argv += ["--workers", str(config.workers)]
    return shlex.join([*env, *argv])


def _soak_until_signalled(config: SoakConfig, progress: Progress | None, on_breach: OnBreach | None) -> SoakReport:
    """The soak, stopped as Ctrl-C stops it by SIGTERM (``timeout``, a
    supervisor) and SIGHUP (its terminal closed) too, so that each says how
    far it got, and exits 130, 143 or 129.  By default either would end the
    process at once, without that summary, and leave any workers running
    the soak to its end."""
    if config.shards > 1:
        # The parent of the workers waits in plain Python, where main()'s
        # handlers (_stopping_signals) raise Terminated for SIGTERM and SIGHUP.
        return run_soak(config, progress, on_breach=on_breach)
    # One worker runs in this process's trio run: there the signals are
    # received by trio and cancel the soak (see interruptible).
    return trio.run(
        interruptible,
        functools.partial(soak, config, progress, on_breach=on_breach),
        clock=trio.testing.MockClock(autojump_threshold=0),
    )


def cmd_soak(args: argparse.Namespace) -> int:
    try:
        config = soak_config(args)
    except _BadInput as exc:
        print(f"conclave: error: {exc}", file=sys.stderr)
        return 2
    # On stderr with --json too, as `run` says it: stdout stays the object.
    note = "" if config.faults.seed is not None else f"; fault seed {config.seed} (from --seed)"
    print(f"conclave: {config.faults.describe()}{note}", file=sys.stderr)
    cores = os.cpu_count() or 1
    if config.shards > cores:
        # Said, not refused nor cut down: the digest may depend on the
        # workers, and a replay of a soak from a larger machine needs its N.
        print(
            f"conclave: warning: {config.shards} worker processes (--workers {config.workers}) on this "
            f"machine's {cores} core(s): they take turns, so the soak is slower, not faster "
            "(--workers auto: one per core)",
            file=sys.stderr,
        )

    def watched(label: str) -> SoakReport:
        shown = SoakProgress(
            sys.stderr, config.runs, label, seed=config.seed, replay=replay_command(config), quiet=args.json
        )
        try:
            return _soak_until_signalled(config, shown, shown.breach)
        except BaseException as exc:
            if _is_interrupt(exc):
                try:
                    shown.interrupted()
                except OSError:
                    pass  # its terminal hung up (SIGHUP): the exit code says it, 129
            raise

    reports = [watched("soak")]
    if args.check_determinism:
        # A failing seed too: that it replays the same is what makes it worth reporting.
        reports.append(watched("soak, second run"))
    report = reports[0]
    same_digest = len({r.digest for r in reports}) == 1
    same_faults = len({r.fault_digest for r in reports}) == 1
    deterministic = same_digest and same_faults
    passed = report.ok and deterministic
    try:
        if args.json:
            # What ran, and how to run it again: a script keeps both with the digest.
            data = report.to_json() | {"plan": config.faults.to_json(), "replay": replay_command(config)}
            if args.check_determinism:
                # "same" compares both: a script told only the digests saw
                # two equal ones beside "same": false.
                data["determinism"] = {
                    "runs": len(reports),
                    "digests": [r.digest for r in reports],
                    "fault_digests": [r.fault_digest for r in reports],
                    "same": deterministic,
                }
                # "ok" is the exit status's word: a script reading it took a
                # seed that replays differently for a pass.
                data["ok"] = passed
            print(json.dumps(data, indent=2))
        else:
            print(_human(report))
            if len(reports) > 1:
                verdict = "same" if deterministic else "DIFFERENT" if not same_digest else "same, fault placement DIFFERENT"
                print(f"  determinism: second run digest {reports[1].digest} - {verdict}")
        # Flushed here, not in main(): its reader gone, main() could only
        # exit 1 - the breach code - without a word.
        _flush_stdout()
        unwritten = None
    except OSError as exc:
        # 'conclave soak | head -1' (or a full disk): the report was cut
        # short.  Nothing more goes to stdout; what the soak found is said
        # on stderr - a full disk lost a failing soak's breaches before.
        _drop_stdout()
        unwritten = (
            PIPE_CLOSED
            if isinstance(exc, BrokenPipeError)
            else f"stdout could not be written ({exc.strerror or exc})"
        )
    if not report.ok:
        for breach in report.breaches:
            print(f"conclave: soak seed {report.seed}: {breach}", file=sys.stderr)
        print(f"conclave: error: soak FAILED (seed {report.seed}); replay with: {replay_command(config)}", file=sys.stderr)
    if not deterministic:
        differ = [] if same_digest else [f"digests {', '.join(r.digest for r in reports)}"]
        if not same_faults:
            differ.append(f"fault digests {', '.join(r.fault_digest for r in reports)}")
        print(f"conclave: error: soak seed {report.seed} is not deterministic: {'; '.join(differ)}", file=sys.stderr)
    if unwritten is not None:
        # Exit 1, as any command whose output pipe closes, but said, and
        # with the soak's own outcome: its exit 1 otherwise means a breach.
        outcome = (
            f"the soak itself passed: every invariant held (seed {report.seed}, digest {report.digest})"
            if passed
            else "the soak itself failed (above)"
        )
        return _fail(f"{unwritten} before the soak's report was written; {outcome}", EXIT_ERROR)
    return 0 if passed else 1
