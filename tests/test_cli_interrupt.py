"""Ctrl-C: exit 130, the store consistent, the run marked interrupted."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from store import Store

from .conftest import REPO

# SIGHUP (the terminal closed) ended the process at once, the run left
# marked running and its queued writes lost.
STOPS = [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated"), (signal.SIGHUP, 129, "hung up")]


def _signal_at_first_stage(argv: list[str], signum: int) -> tuple[int, str, str]:
    """Start ``conclave argv``, send ``signum`` once its first stage has
    started; (exit code, stderr, the run id its progress named)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "actors", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        run_id = ""
        for line in proc.stdout:  # wait for an event, not for time
            if line.startswith("Run "):
                run_id = line.split()[1]
            if line.startswith("STAGE 1/6"):
                break
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, run_id


@pytest.mark.parametrize(("signum", "code", "word"), STOPS)
def test_a_signal_exits_cleanly_and_keeps_the_store_consistent(tmp_path: Path, signum: int, code: int, word: str) -> None:
    """SIGTERM (kill, a supervisor) used to end the process at once: the run
    stayed marked running and its queued writes were lost.  The message
    names the command that continues the run (its generated id had
    scrolled away with the progress)."""
    db = tmp_path / "c.db"
    rc, err, run_id = _signal_at_first_stage(
        ["run", "--db", str(db), "--clock", "real", "--sim-latency", "60"], signum
    )
    assert rc == code, err
    assert run_id.startswith("run-SPEC-DEMO-"), run_id
    assert err.strip().endswith(
        f"conclave: error: {word}; the store is consistent; 'conclave resume {run_id} --db {db}' continues it"
    )
    with Store.open(str(db)) as s:
        assert s.integrity_check() == "ok"
        run = s.get_run(run_id)
        assert run is not None and run.status == "interrupted"
    # status says how to go on (only a stalled run's did).
    shown = subprocess.run([sys.executable, "-m", "actors", "status", run_id, "--db", str(db)],
                           capture_output=True, text=True, timeout=60)
    assert f"stopped before it finished: 'conclave resume {run_id} --db {db}' continues it" in shown.stdout


def test_an_interrupted_resume_names_the_resume_again(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    common = ["--db", str(db), "--clock", "real"]
    rc, err, _ = _signal_at_first_stage(["run", "--run-id", "R1", "--sim-latency", "60", *common], signal.SIGINT)
    assert rc == 130, err
    rc, err, _ = _signal_at_first_stage(["resume", "R1", *common], signal.SIGINT)
    assert rc == 130, err
    assert err.strip().endswith(f"interrupted; the store is consistent; 'conclave resume R1 --db {db}' continues it")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_signal_after_the_run_finished_does_not_offer_to_continue_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM between the run recording its end and printing its summary
    said "'conclave resume R' continues it" of a completed run."""
    from actors._cli import _interrupted

    from .conftest import run_cli

    db = str(tmp_path / "f.db")
    assert run_cli(["run", "--db", db, "--run-id", "F", "--sim-latency", "0"]).returncode == 0
    with Store.open(db, readonly=True) as store:
        code = _interrupted(KeyboardInterrupt(), store, "F", db)
    err = capsys.readouterr().err
    assert code == 130 and "the run had already completed ('conclave status F --db" in err and "resume" not in err


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(("signum", "code", "word"), STOPS)
def test_a_signal_to_a_soak_alone_stops_it_and_says_how_far_it_got(
    signum: int, code: int, word: str, workers: int
) -> None:
    """A signal to the parent alone (a supervisor, ``timeout``), not its
    process group: the workers must not run the soak on to its end, while
    the parent waits for them (SIGINT) or after it has died (SIGTERM).
    SIGTERM used to end a one-process soak at once, without its summary,
    and to be reported as an interrupt (130) with workers."""
    marker = f"4242{signum}{workers}"  # the workers are forked: they carry the parent's argv
    proc = subprocess.Popen(
        [sys.executable, "-m", "actors", "soak", "--seed", marker, "--runs", "100000", "--workers", str(workers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the workers report progress: they run
            if line.startswith("soak: "):
                break
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)  # minutes if it waited for the soak
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert err.strip().endswith(f"conclave: error: {word}")
    # How far it got, and that nothing had broken by then.
    assert re.search(r"conclave: soak interrupted after [\d,]+/100,000 runs \([\d,]+ agent turns\); no breach found so far", err)
    left = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"soak" in argv and marker.encode() in argv:
            left.append(entry.name)
    assert not left, f"soak workers still running: {left}"


def test_readme_opens_with_the_two_commands() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    fence = lines.index("```sh")
    assert fence <= 2, "the commands come first"
    install_and_run, install_and_test = lines[fence + 1], lines[fence + 2]
    assert "pip install" in install_and_run and install_and_run.endswith("conclave run")
    assert "pip install" in install_and_test and "pytest" in install_and_test
    ci = (REPO / ".ci" / "run").read_text()
    assert install_and_test in ci.splitlines(), ".ci/run runs exactly the README's test command"
    json.dumps(lines)  # the file is text


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_a_run_started_ignoring_a_signal_keeps_ignoring_it(tmp_path: Path, signum: int) -> None:
    """A shell starts background jobs with SIGINT ignored, so the
    terminal's Ctrl-C spares them; conclave's signal handling re-enabled
    it, and a background run died with the foreground job.  Likewise
    SIGHUP under nohup: the run outlives its terminal."""
    db = str(tmp_path / "bg.db")
    proc = subprocess.Popen(
        [sys.executable, "-m", "actors", "run", "--db", db, "--clock", "real", "--sim-latency", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(signum, signal.SIG_IGN),
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("STAGE 1/6"):
            break
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "completed" in out


def test_a_stop_is_reported_by_its_exit_code_when_stderr_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """After SIGHUP the terminal is gone and writing to it fails (EIO): the
    message about the stop must not turn into a traceback and exit 1."""
    from actors._cli import Terminated, _fail, stopped_by

    class Gone(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sys, "stderr", Gone())
    assert stopped_by(BaseExceptionGroup("x", [ValueError(), Terminated(signal.SIGHUP)])) == ("hung up", 129)
    assert _fail("hung up", 129) == 129


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal that hangs up")
@pytest.mark.parametrize("argv", [["soak", "--seed", "4242129", "--runs", "100000"], ["run", "--clock", "real", "--sim-latency", "60"]])
def test_closing_the_terminal_stops_cleanly_with_129(tmp_path: Path, argv: list[str]) -> None:
    """The terminal really closing: SIGHUP, and stderr gone (EIO).  The
    soak's 'interrupted after ...' line then raised OSError, which replaced
    the stop: exit 1, not 129."""
    import pty
    import select

    pid, master = pty.fork()
    if pid == 0:  # the child: conclave on the pseudo-terminal
        os.chdir(tmp_path)
        os.execv(sys.executable, [sys.executable, "-m", "actors", *argv])
    seen = b""
    try:
        while b"soak: " not in seen and b"STAGE 1/6" not in seen:  # it runs: the terminal may close
            ready, _, _ = select.select([master], [], [], 60)
            assert ready, seen[-500:]
            seen += os.read(master, 4096)
    finally:
        os.close(master)  # the terminal hangs up: SIGHUP to its foreground job
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 129


# Sends the signal from inside `cmd_run`, before its loop starts (its store
# open) or after it ended (as the result is printed).
_SIGNAL_AT = """
import os, sys
import actors._cli as cli
where, signum = sys.argv[1], int(sys.argv[2])
real = getattr(cli, where)
def signalled(*args, **kwargs):
    os.kill(os.getpid(), signum)
    return real(*args, **kwargs)
setattr(cli, where, signalled)
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("where", ["fault_banner", "report_result"])
@pytest.mark.parametrize(("signum", "code", "word"), STOPS[1:])
def test_a_signal_outside_the_run_loop_still_exits_cleanly(
    tmp_path: Path, signum: int, code: int, word: str, where: str
) -> None:
    """Only trio's loop handled SIGTERM and SIGHUP: one that came while a
    command opened its store, or printed what it had found, ended the
    process by the signal (-15), with no word said."""
    db = str(tmp_path / "e.db")
    proc = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AT, where, str(int(signum)), "run", "--db", db, "--run-id", "E"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == code, proc.stderr
    assert word in proc.stderr and "Traceback" not in proc.stderr
    if where == "fault_banner":
        assert not os.path.exists(db) or Store.open(db, readonly=True).get_run("E") is None


# Sends the signal as the run starts, waits (shielded) until it has been
# taken, and sends it again.
_SIGNAL_TWICE = """
import os, sys
import trio
import actors._cli as cli
signum = int(sys.argv[1])
real = cli._run_pipeline
async def twice(*args, **kwargs):
    os.kill(os.getpid(), signum)
    with trio.CancelScope(shield=True):
        await trio.sleep(0.05)
    os.kill(os.getpid(), signum)
    return await real(*args, **kwargs)
cli._run_pipeline = twice
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize(("signum", "code", "word"), STOPS[1:])
def test_a_second_signal_while_the_first_stops_the_run_changes_nothing(
    tmp_path: Path, signum: int, code: int, word: str
) -> None:
    """trio sends on the signals its receiver had not read when it closes:
    a second SIGTERM ended the process by the signal, without a word."""
    db = str(tmp_path / "t.db")
    proc = subprocess.run(
        [sys.executable, "-c", _SIGNAL_TWICE, str(int(signum)), "run", "--db", db, "--run-id", "T"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == code, proc.stderr
    assert f"conclave: error: {word}" in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_while_the_command_line_is_read_exits_130_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Building the parser takes a second on a loaded machine, before any
    # signal handling of the command's: Python printed its traceback.
    from actors import _cli

    def interrupted() -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(_cli, "build_parser", interrupted)
    try:
        code = _cli.main(["status"])
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped main(), with its traceback")
    assert code == 130
    assert capsys.readouterr().err == "conclave: interrupted before the command began; nothing was done\n"
