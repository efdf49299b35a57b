"""Bad input: one clear line naming the problem, exit 2, nothing written."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import run_cli

PIPELINES: dict[str, tuple[str | bytes, str]] = {
    "invalid_toml": ("[[stages]\nname = 'plan'", "invalid TOML"),
    # It exited 1 with a bare UnicodeDecodeError naming no file.
    "not_utf8": (b'[[stages]]\nname = "pl\xe9an"\n', "not UTF-8 text (byte 0xe9 at offset 21)"),
    "unknown_stage": ('[[stages]]\nname = "deploy"', "unknown stage"),
    "unknown_agent": ('[[stages]]\nname = "plan"\nagents = ["gemini", "hal9000"]', "unknown agent 'hal9000'"),
    "quorum_too_large": ('[[stages]]\nname = "plan"\nquorum = 5', "quorum 5 is larger than the panel of 3"),
    # RecursionError and (from /dev/zero) MemoryError: exit 1, no file named.
    "nested_too_deeply": ("x = " + "[" * 5_000, "nested too deeply"),
    "endless": (b" " * (16 * 2**20 + 1), "at most 16 MiB"),
}


def assert_one_line_error(stderr: str, needle: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("conclave: error: ")
    assert needle in lines[0]


@pytest.mark.parametrize("case", sorted(PIPELINES))
def test_bad_pipeline(tmp_path: Path, case: str) -> None:
    text, needle = PIPELINES[case]
    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_bytes(text if isinstance(text, bytes) else text.encode())
    db = tmp_path / "new.db"
    proc = run_cli(["run", "--pipeline", str(pipeline), "--db", str(db)])
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, needle)
    assert str(pipeline) in proc.stderr
    assert not db.exists(), "nothing may be written"
    assert proc.stdout == ""


def test_missing_pipeline_file(tmp_path: Path) -> None:
    proc = run_cli(["run", "--pipeline", str(tmp_path / "nope.toml"), "--db", str(tmp_path / "x.db")])
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "no such pipeline file")
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("where", ["missing_dir", "parent_is_file", "is_dir"])
def test_unwritable_db_path(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("x")
    db = {
        "missing_dir": tmp_path / "no" / "such" / "dir" / "c.db",
        "parent_is_file": tmp_path / "file" / "c.db",
        "is_dir": tmp_path,
    }[where]
    before = sorted(os.listdir(tmp_path))
    proc = run_cli(["run", "--db", str(db)])
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, str(db))
    assert sorted(os.listdir(tmp_path)) == before


def test_read_only_db_file_is_refused_untouched(tmp_path: Path) -> None:
    db = tmp_path / "ro.db"
    assert run_cli(["run", "--db", str(db), "--disagreement-rate", "0"]).returncode == 0
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"ro.db{suffix}").unlink(missing_ok=True)
    db.chmod(0o444)
    before = db.read_bytes()
    proc = run_cli(["run", "--db", str(db)])
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "read-only")
    assert db.read_bytes() == before


def test_existing_run_id_is_refused(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    assert run_cli(["run", "--db", db, "--run-id", "R", "--disagreement-rate", "0"]).returncode == 0
    proc = run_cli(["run", "--db", db, "--run-id", "R"])
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "run id 'R' already exists")


def test_existing_run_id_in_an_older_schema_file_is_refused_untouched(tmp_path: Path) -> None:
    """The refusal came after the file was opened for writing: an older
    schema's file was migrated to the latest and switched to WAL first."""
    import hashlib
    import shutil

    db = tmp_path / "v1.db"
    shutil.copy(Path(__file__).parent / "fixtures" / "v1_interrupted.db", db)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    proc = run_cli(["run", "--db", str(db), "--run-id", "V1RUN"])
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "run id 'V1RUN' already exists")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert sorted(os.listdir(tmp_path)) == ["v1.db"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--seed", "abc"], "--seed: not a whole number: 'abc'"),
        (["run", "--disagreement-rate", "1.5"], "must be between 0 and 1"),
        (["run", "--sim-latency", "-1"], "must be a finite number >= 0"),
        (["frobnicate"], "invalid choice"),
        # 0 listed nothing and said "no runs"; a negative limit listed all.
        (["status", "--limit", "0"], "--limit: must be at least 1, got 0"),
        (["status", "--limit", "-3"], "--limit: must be at least 1, got -3"),
        (["status", "--limit", str(2**63)], "--limit: must be at most 9223372036854775807"),
        # Each opened a database deleted on exit: the run was lost.
        (["run", "--db", ""], "--db: an empty path"),
        (["run", "--db", ":memory:"], "--db: ':memory:' keeps nothing"),
        (["events", "r", "--db", ""], "--db: an empty path"),
        # Read as "not given": the default pipeline or prices were used.
        (["run", "--pipeline", ""], "--pipeline: an empty path"),
        (["metrics", "r", "--prices", ""], "--prices: an empty path"),
        # Taken as given: an empty model for every agent; a prefix of every branch.
        (["run", "--model", ""], "--model: must not be empty"),
        (["status", "r", "--branch", ""], "--branch: must not be empty"),
        # Ids are passed back on command lines and shown on one line.
        (["run", "--run-id", "a b"], "--run-id: a run id must be at most 200 printable characters without spaces"),
        (["run", "--run-id", " "], "--run-id: a run id must not be empty"),
        (["run", "SPEC\n1"], "SPEC_ID: a spec id must be at most 200 printable characters"),
        # A run's seed is stored in an SQLite INTEGER: it used to fail in the store writer.
        (["run", "--seed", str(2**63)], "--seed: the seed must fit in 64 bits"),
        (["soak", "--seed", str(-(2**63) - 1)], "--seed: the seed must fit in 64 bits"),
        # --fault-seed took any int, with argparse's own words for a bad one.
        (["run", "--fault-seed", str(2**70)], "--fault-seed: the seed must fit in 64 bits"),
        (["soak", "--fault-seed", "x"], "--fault-seed: not a whole number: 'x'"),
        (["run", "--max-retry-wait", "soon"], "--max-retry-wait: not a number: 'soon'"),
    ],
)
def test_bad_arguments_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert not (tmp_path / "conclave.db").exists()


def test_status_of_unknown_run_or_missing_db(tmp_path: Path) -> None:
    proc = run_cli(["status", "nope", "--db", str(tmp_path / "missing.db")])
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "no such database file")
    assert not (tmp_path / "missing.db").exists()
    db = str(tmp_path / "c.db")
    assert run_cli(["run", "--db", db, "--disagreement-rate", "0"]).returncode == 0
    proc = run_cli(["decisions", "nope", "--db", db])
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "no run 'nope'")


def test_help_explains_commands() -> None:
    proc = run_cli(["--help"])
    assert proc.returncode == 0
    for word in ("run", "status", "decisions", "Exit codes"):
        assert word in proc.stdout
    run_help = run_cli(["run", "--help"])
    assert "--seed" in run_help.stdout and "--json" in run_help.stdout and "--pipeline" in run_help.stdout


def test_version_names_the_installed_release() -> None:
    from importlib.metadata import version

    proc = run_cli(["--version"])
    assert proc.returncode == 0 and proc.stdout.strip() == f"conclave {version('trio-conclave')}"


def test_every_command_explains_itself() -> None:
    # `conclave soak --help` once crashed: argparse %-formats help strings,
    # and the default fault spec's "4%" was not escaped.
    from actors._cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"run", "soak", "resume", "rerun", "metrics", "login"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        assert text.startswith(f"usage: conclave {name}"), name
        for action in sub._actions:
            if action.help == argparse.SUPPRESS:
                continue
            for flag in action.option_strings:
                assert flag in text, (name, flag)
            # Every argument says what it is (RUN_ID was a bare name).
            assert action.help or isinstance(action, argparse._SubParsersAction), (name, action.dest)
    assert "disconnect:4%,429:3%,timeout:3%" in commands["soak"].format_help()
    # resume and rerun run the stored pipeline: offering --provider/--model,
    # which they always refuse, misled (a README walkthrough tripped on it).
    assert "--provider" in commands["run"].format_help() and "--model" in commands["run"].format_help()
    for name in ("resume", "rerun"):
        text = commands[name].format_help()
        assert "--provider" not in text and "--model" not in text and "--base-url" in text, name


def _into_a_closed_pipe(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``conclave ARGV`` with stdout a pipe whose reader has gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "actors", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env={**os.environ, **(env or {})},
        )
    finally:
        os.close(write_end)


def test_stdout_closed_during_a_run_leaves_it_resumable_and_says_so(tmp_path: Path) -> None:
    """`conclave run | head -3`: every write after the reader is gone fails.
    The pipe's read end is closed before the run starts, so the first
    progress line - written from inside the run's nursery - fails.  The
    run was left interrupted without a word (exit 1): nothing said it had
    not finished, nor how to finish it, as Ctrl-C's message does."""
    db = tmp_path / "c.db"
    for argv in (["run", "--run-id", "r"], ["resume", "r"]):  # resume (and rerun) stop the same way
        proc = _into_a_closed_pipe([*argv, "--db", str(db)])
        assert proc.returncode == 1
        assert_one_line_error(proc.stderr, "the output pipe closed (its reader went away), so the run stopped")
        assert f"'conclave resume r --db {db}' continues it" in proc.stderr
        assert "Exception ignored" not in proc.stderr and "BrokenPipeError" not in proc.stderr
        status = json.loads(run_cli(["status", "r", "--db", str(db), "--json"]).stdout)
        assert status["status"] == "interrupted"
    resumed = run_cli(["resume", "r", "--db", str(db), "--json"])
    assert resumed.returncode == 0, resumed.stderr
    alone = run_cli(["run", "--db", str(tmp_path / "alone.db"), "--run-id", "r", "--json"])
    assert json.loads(resumed.stdout)["digest"] == json.loads(alone.stdout)["digest"]
    # A finished run whose summary finds the reader gone is not sent to resume.
    done = _into_a_closed_pipe(["resume", "r", "--db", str(db)])
    assert done.returncode == 1
    assert_one_line_error(done.stderr, "the run had already completed")
    assert "resume" not in done.stderr


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_soak_whose_report_finds_stdout_closed_says_so_and_whether_it_passed(json_flag: list[str]) -> None:
    """`conclave soak | head -1`: the soak passed, but its report met a
    closed pipe, and it exited 1 - the soak's breach code - with nothing
    on stderr to tell the two apart."""
    proc = _into_a_closed_pipe(["soak", "--seed", "5", "--runs", "4", "--faults", "disconnect:10%", *json_flag])
    assert proc.returncode == 1
    digest = json.loads(run_cli(["soak", "--seed", "5", "--runs", "4", "--faults", "disconnect:10%", "--json"]).stdout)["digest"]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("conclave: error: ")]
    assert errors == [
        "conclave: error: the output pipe closed (its reader went away) before the soak's report was written; "
        f"the soak itself passed: every invariant held (seed 5, digest {digest})"
    ], proc.stderr
    assert "Exception ignored" not in proc.stderr and "BrokenPipeError" not in proc.stderr


def test_a_failed_soak_whose_report_finds_stdout_closed_says_it_failed() -> None:
    from actors._soak_shards import CRASH_ENV

    proc = _into_a_closed_pipe(["soak", "--seed", "5", "--runs", "4", "--workers", "2"], env={CRASH_ENV: "1"})
    assert proc.returncode == 1
    assert "conclave: error: soak FAILED (seed 5); replay with: " in proc.stderr
    assert proc.stderr.rstrip().endswith(
        "conclave: error: the output pipe closed (its reader went away) before the soak's report was written; "
        "the soak itself failed (above)"
    )


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_failing_soak_whose_report_meets_a_full_disk_still_names_its_breaches() -> None:
    """Only a closed pipe was caught: a full disk ended the soak on 'No
    space left on device', its breaches and replay command never said."""
    argv = ["soak", "--seed", "3", "--runs", "3", "--faults", "disconnect:5,429:2,timeout:3"]
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "actors", *argv], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    assert proc.returncode == 1
    assert "conclave: soak seed 3: no agent ever recovered from a disconnect fault" in proc.stderr
    assert "conclave: error: soak FAILED (seed 3); replay with: conclave soak --seed 3" in proc.stderr
    assert proc.stderr.rstrip().endswith(
        "conclave: error: stdout could not be written (No space left on device) before the soak's report was "
        "written; the soak itself failed (above)"
    ), proc.stderr
    assert "Exception ignored" not in proc.stderr


def test_suggested_commands_carry_the_db_they_were_printed_for(tmp_path: Path) -> None:
    """A halted run kept in another file said to run 'conclave rerun h1
    --from plan', which, copied as printed, answered "no run 'h1' in
    conclave.db"."""
    import re
    import shlex

    db = str(tmp_path / "my runs.db")
    proc = run_cli(["run", "--db", db, "--run-id", "h1", "--disagreement-rate", "1"], cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    hints = re.findall(r"'(conclave [^']*)'", proc.stdout)
    assert [h.split()[1] for h in hints] == ["decisions", "rerun"], proc.stdout
    assert f"details: conclave metrics h1 --db {shlex.quote(db).replace(chr(39), chr(34))}" in proc.stdout
    for hint in hints:
        argv = shlex.split(hint)[1:]
        assert argv[-2:] == ["--db", db]
        follow = run_cli(argv, cwd=tmp_path)
        assert follow.returncode in (0, 3), follow.stderr
    again = run_cli(["run", "--db", db, "--run-id", "h3", "--disagreement-rate", "1", "--json"], cwd=tmp_path)
    message = json.loads(again.stdout)["halt_message"]
    hints = re.findall(r"'(conclave [^']*)'", message)
    assert len(hints) == 2 and all(shlex.split(h)[-2:] == ["--db", db] for h in hints), message
    default = run_cli(["run", "--run-id", "h2", "--disagreement-rate", "1"], cwd=tmp_path)
    assert "--db" not in default.stdout  # the default file needs no option


def test_the_rerun_hint_quotes_a_stage_name_the_shell_would_split() -> None:
    # '--from x y' ran 'conclave rerun R --from x' with a stray 'y'.
    import re
    import shlex

    from actors._runtime import halt_message
    from messages import Decision, StageKey

    decision = Decision(key=StageKey(run_id="R", branch_id="b", stage="x y"), seq=1,
                        status="conflict", verdict={"conflicts": ["a vs b"]})
    hints = re.findall(r"'(conclave [^']*)'", halt_message("R", decision))
    assert shlex.split(hints[-1]) == ["conclave", "rerun", "R", "--from", "x y"]


def test_suggested_commands_can_be_pasted_into_a_shell(tmp_path: Path) -> None:
    """A run id 'x;y' made the halt's hints run two commands when pasted;
    a database path with a space was quoted already.  Every hint must run
    as printed."""
    import re
    import shlex

    db = str(tmp_path / "my db.db")
    proc = run_cli(["run", "--db", db, "--run-id", "x;y", "--disagreement-rate", "1"])
    assert proc.returncode == 3, proc.stderr
    hints = re.findall(r"'(conclave (?:decisions|rerun) [^']*)'", proc.stdout)
    assert len(hints) == 2, proc.stdout
    for hint in hints:
        lexer = shlex.shlex(hint, posix=True, punctuation_chars=True)  # as a shell reads it
        lexer.whitespace_split = True
        argv = list(lexer)
        assert argv[2] == "x;y" and argv[argv.index("--db") + 1] == db, hint
    shown = run_cli(shlex.split(hints[0])[1:])
    assert shown.returncode == 0 and "decisions of x;y" in shown.stdout, shown.stderr


def test_status_with_a_branch_but_no_run_is_refused(tmp_path: Path) -> None:
    proc = run_cli(["status", "--db", str(tmp_path / "x.db"), "--branch", "abc"])
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "--branch abc needs a RUN_ID")
    assert not (tmp_path / "x.db").exists()
    # And --limit with one: it was ignored without a word.
    proc = run_cli(["status", "r", "--db", str(tmp_path / "x.db"), "--limit", "3"])
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "--limit 3 lists the latest runs; it does not go with a RUN_ID")


def test_a_resume_that_replays_a_finished_run_shows_every_stage(tmp_path: Path) -> None:
    # The printer was cancelled as soon as the replay returned: four or
    # five of the six stage banners were shown, under "6 stage(s) decided".
    db = str(tmp_path / "f.db")
    assert run_cli(["run", "--db", db, "--run-id", "F", "--sim-latency", "0"]).returncode == 0
    for _ in range(2):
        resumed = run_cli(["resume", "F", "--db", db])
        assert resumed.returncode == 0, resumed.stderr
        assert (resumed.stdout + resumed.stderr).count("STAGE ") == 6


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["status", "R\udcff"], "RUN_ID 'R\\udcff'"),
        (["events", "R\udcff", "--db", "c.db"], "RUN_ID"),
        (["run", "--db", "g\udcff.db"], "--db 'g\\udcff.db'"),
        (["run", "--db", "c.db", "--goal", "bad\udcff"], "--goal"),
    ],
)
def test_arguments_that_are_not_utf8_are_refused_before_anything_is_written(
    tmp_path: Path, args: list[str], named: str
) -> None:
    """Such bytes failed mid-command with a UnicodeEncodeError (exit 1); a
    refused goal had already created the database."""
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 2 and named in proc.stderr and "not valid UTF-8" in proc.stderr
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []


def test_a_terminal_that_cannot_show_the_marks_does_not_end_the_run(tmp_path: Path) -> None:
    # PYTHONIOENCODING=latin-1: the verdict's check mark killed the run after
    # its first stage, left interrupted.
    proc = run_cli(["run", "--db", str(tmp_path / "c.db")], env={"PYTHONIOENCODING": "latin-1"})
    assert proc.returncode == 0, proc.stderr
    assert "completed: 6 stage(s) decided" in proc.stdout


def test_a_hint_for_a_run_id_with_a_quote_keeps_the_whole_id(tmp_path: Path) -> None:
    # --db went inside the id: 'conclave resume "it --db q.db's" --budget USD'.
    import re
    import shlex

    db = str(tmp_path / "q.db")
    proc = run_cli(["run", "--db", db, "--run-id", "it's", "--budget", "0", "--json"])
    assert proc.returncode == 3, proc.stderr
    message = json.loads(proc.stdout)["halt_message"]
    [hint] = re.findall(r"""'(conclave (?:[^'"]|"[^"]*")*)'""", message)
    assert shlex.split(hint) == ["conclave", "resume", "it's", "--budget", "USD", "--db", db], message


def test_status_shows_a_goal_without_letting_it_drive_the_terminal(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    goal = "ship it\n  status: completed\x1b[2J"
    assert run_cli(["run", "--db", db, "--run-id", "g", "--goal", goal, "--sim-latency", "0"]).returncode == 0
    proc = run_cli(["status", "g", "--db", db])
    assert "  goal: ship it⏎  status: completed?[2J\n" in proc.stdout and "\x1b" not in proc.stdout
    assert json.loads(run_cli(["status", "g", "--db", db, "--json"]).stdout)["goal"] == goal  # kept as given


def test_text_from_models_and_servers_cannot_drive_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model's reported conflicts, a server's error message and the model
    name it gives reached the terminal raw: an ESC recoloured it, a BEL
    rang, and a newline forged a line ("  ✓ FORGED: OK").  Shown, each
    control character is ? and a newline ⏎; nothing is lost from the store."""
    import attrs
    import trio
    import trio.testing

    from actors import MockProvider, SimulatedProvider, open_orchestrator
    from actors._cli import main
    from actors._http_errors import body_excerpt
    from messages import Completion, CompletionRequest

    evil = "x \x1b[31mRED\x1b[0m\x07\n  ✓ FORGED: OK"
    sim = SimulatedProvider(seed=0)

    def answer(request: CompletionRequest) -> Completion:
        done = sim.answer(request)
        if not request.aggregate:
            return attrs.evolve(done, model="m\x1b[2J")
        body = json.loads(done.content)
        body["consensus"] = {"agreements": [], "conflicts": [evil]}
        return attrs.evolve(done, content=json.dumps(body))

    db = str(tmp_path / "e.db")

    async def build() -> None:
        async with open_orchestrator(store=db, provider=MockProvider(answer, name="sim")) as orch:
            await orch.run("S", run_id="E")

    trio.run(build, clock=trio.testing.MockClock(autojump_threshold=0))
    capsys.readouterr()
    for argv in (["decisions", "E"], ["status", "E"], ["metrics", "E", "--by", "model"], ["events", "E"]):
        main([*argv, "--db", db])
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x07" not in out, argv
        assert not any(line.lstrip().startswith("✓ FORGED") for line in out.splitlines()), argv
    main(["decisions", "E", "--db", db, "--json"])  # the record itself is whole
    assert json.dumps(evil)[1:-1] in capsys.readouterr().out
    assert body_excerpt(b'{"error": {"message": "bad\\nFORGED \\u001b[31mRED\\u0007"}}') == "bad FORGED ?[31mRED?"


def test_a_model_name_must_be_printable(tmp_path: Path) -> None:
    from actors import PipelineError, pipeline_from_dict

    bad = run_cli(["run", "--db", str(tmp_path / "m.db"), "--provider", "openai", "--model", "a\x1b[31m"])
    assert bad.returncode == 2 and "must be printable characters" in bad.stderr
    assert not (tmp_path / "m.db").exists()
    with pytest.raises(PipelineError, match="model must be printable"):
        pipeline_from_dict(
            {"agents": {"a": {"provider": "sim", "model": "m\x07"}}, "stages": [{"name": "plan", "agents": ["a"]}]},
            source="test",
        )


def test_soak_help_and_readme_name_the_settings_a_soak_takes_and_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """soak --help said --fault-seed defaults to --seed, but
    CODEX_FAULTS_SEED=9 placed the faults (the banner said "fault seed 9");
    --faults named neither CODEX_FAULTS_SCOPE nor CODEX_FAULTS_TIMEOUT_MS;
    the README listed two settings a soak refuses up front, not the third:
    a 429 reset later than a retry waits."""
    from actors._cli import build_parser

    monkeypatch.setenv("COLUMNS", "1000")  # no word broken across lines
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    soak = commands["soak"].format_help()
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    assert "seed of fault placement (default: CODEX_FAULTS_SEED, else --seed)" in soak
    assert "CODEX_FAULTS_SCOPE and CODEX_FAULTS_TIMEOUT_MS apply too" in soak
    assert "one later than the 600 s a retry waits, now+SECONDS or an RFC 3339 time included, is refused" in soak
    assert "or 429 faults with a reset later than a retry waits (`RetryPolicy.max_wait`, 600 s" in readme
    assert "`CODEX_FAULTS_TIMEOUT_MS` and `CODEX_FAULTS_SEED` apply to a soak as to `run`" in readme
    # What they say is what the soak does.
    seeded = run_cli(["soak", "--runs", "2", "--faults", "disconnect:10%", "--json"], env={"CODEX_FAULTS_SEED": "9"})
    assert seeded.returncode == 0, seeded.stderr
    assert seeded.stderr.splitlines()[0].endswith("; fault seed 9")
    assert json.loads(seeded.stdout)["plan"]["seed"] == 9
    overridden = run_cli(["soak", "--runs", "2", "--faults", "disconnect:10%", "--fault-seed", "3", "--json"],
                         env={"CODEX_FAULTS_SEED": "9"})
    assert json.loads(overridden.stdout)["plan"]["seed"] == 3
    refused = run_cli(["soak", "--runs", "2"], env={"CODEX_FAULTS_429_RESET": "now+700s"})
    assert refused.returncode == 2
    assert "a 429 reset of now+700s is later than the 600s a retry waits" in refused.stderr


def test_help_and_readme_say_the_same_true_things(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-concurrency said "default: the gateway's" (the README: 64);
    serve-mock --help left out x-mock-reset-style and x-mock-delay; events
    --help five of the kinds; the README the 200-character limit of ids and
    the fields of 'auth status --json'."""
    from actors._cli import build_parser
    from actors._cli_events import EVENT_KINDS
    from actors._runtime import Limits

    monkeypatch.setenv("COLUMNS", "1000")  # no word broken across lines
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert Limits().max_concurrency == 64 and "`--max-concurrency` (64)" in readme
    for name in ("run", "resume", "rerun"):
        assert "at most N calls in flight per provider (default: 64)" in commands[name].format_help(), name
        # As the README says: calls queued behind a timeout fault make the digest vary.
        assert "wider than N queues its calls, and under timeout faults the digest can then differ" in (
            commands[name].format_help()
        ), name
    assert "the digest can vary from run to run" in readme
    serve_mock = commands["serve-mock"].format_help()
    for header in ("x-mock-fault", "x-mock-reset:", "x-mock-reset-style: all|retry-after|", "x-mock-delay", "x-mock-should-retry"):
        assert header in serve_mock and header in readme, header
    events = commands["events"].format_help()
    assert all(kind in events for kind in EVENT_KINDS), sorted(k for k in EVENT_KINDS if k not in events)
    assert "at most 200 printable characters" in commands["run"].format_help()
    assert "at most 200 printable characters" in readme
    status = run_cli(["auth", "status", "--json"], env={"CONCLAVE_HOME": str(tmp_path), "CONCLAVE_TOKEN_BACKEND": "file"})
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    section = readme[readme.index("`auth status --json`"):]
    for key in [*shown, *shown["providers"][0]]:
        assert f"`{key}`" in section, key


def test_a_long_spec_id_still_gets_a_run_id_it_may_have(tmp_path: Path) -> None:
    """A spec id of 174 to 200 characters passed its check, then the run
    was refused for the run id generated from it."""
    from actors._ids import MAX_ID_LENGTH, id_problem, new_branch_id, new_run_id

    spec = "S" * MAX_ID_LENGTH
    assert id_problem(new_run_id(spec), "a run id", spaces=False) is None
    assert len(new_branch_id(spec)) <= MAX_ID_LENGTH
    done = run_cli(["run", "S" * 180, "--db", str(tmp_path / "l.db"), "--json"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["run_id"].startswith("run-SSS")


@pytest.mark.parametrize("spec", ["ü/..;$(x)", "ü", "--x", "/"])
def test_a_generated_id_never_starts_with_a_dash(tmp_path: Path, spec: str) -> None:
    """'conclave run "ü/..;$(x)"' made the branch '-..-x--2026...': ids may
    not start with '-' (a command line takes one for an option)."""
    from actors._ids import id_problem, new_branch_id, new_run_id

    for made in (new_branch_id(spec), new_run_id(spec)):
        assert not made.startswith("-") and id_problem(made, "an id", spaces=False) is None, made
    # An ordinary spec id's ids are as they always were.
    assert new_branch_id("SPEC-DEMO").startswith("SPEC-DEMO-2") and new_run_id("S.1_x").startswith("run-S.1_x-2")
    if spec == "ü/..;$(x)":
        done = run_cli(["run", spec, "--db", str(tmp_path / "d.db"), "--disagreement-rate", "0", "--json"])
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["branch_id"].startswith("..-x-")


def test_resume_does_not_send_users_to_an_option_it_refuses(tmp_path: Path) -> None:
    """'--no-stream needs a real provider (--provider openai or
    anthropic)' - and resume then refuses --provider."""
    db = str(tmp_path / "r.db")
    assert run_cli(["run", "--db", db, "--run-id", "R", "--json"]).returncode == 0
    for argv in (["resume", "R", "--no-stream"], ["rerun", "R", "--from", "audit", "--request-timeout", "5"]):
        refused = run_cli([*argv, "--db", db])
        assert refused.returncode == 2, refused.stderr
        assert "this run's stored pipeline uses only the simulator" in refused.stderr
        assert "--provider" not in refused.stderr


def test_a_run_with_stdout_closed_still_completes(tmp_path: Path) -> None:
    """'conclave run >&-': Python starts with sys.stdout None, and the
    first line of progress killed the run (AttributeError, exit 1, the run
    left interrupted)."""
    from store import Store

    db = str(tmp_path / "c.db")
    done = subprocess.run(
        [sys.executable, "-m", "actors", "run", "--db", db, "--run-id", "C"],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.close(1),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    with Store.open(db, readonly=True) as store:
        run = store.get_run("C")
        assert run is not None and run.status == "completed"


@pytest.mark.parametrize(
    "argv",
    [["serve-mock", "--host", ""], ["run", "--max-concurrency", str(2**63)]],
)
def test_more_bad_options_are_bad_input(argv: list[str], tmp_path: Path) -> None:
    bad = run_cli([*argv, "--db", str(tmp_path / "o.db")] if argv[0] == "run" else argv)
    assert bad.returncode == 2, bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_readme_names_every_key_of_each_reading_commands_json(tmp_path: Path) -> None:
    """The reading commands' --json objects were documented nowhere; the
    README's table must keep up with them."""
    import re

    from .conftest import REPO

    db = str(tmp_path / "j.db")
    assert run_cli(["run", "--db", db, "--run-id", "J"]).returncode == 0
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        match = re.match(r"\| `([a-z]+(?: RUN_ID)?)` \| (.*) \|$", line)
        if match:
            text = match.group(2)
            while re.search(r"\([^()]*\)", text):  # nested parts name inner keys
                text = re.sub(r"\([^()]*\)", "", text)
            rows[match.group(1)] = set(re.findall(r"`([a-z_]+)`", text))
    for command in ("status", "status RUN_ID", "decisions", "metrics", "events", "branches"):
        argv = command.replace(" RUN_ID", "").split() + ([] if command == "status" else ["J"])
        done = run_cli([*argv, "--db", db, "--json"])
        assert done.returncode == 0, done.stderr
        assert set(json.loads(done.stdout)) == rows[command], command


def test_the_unpriced_models_line_cannot_drive_the_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The table's rows were cleaned and the 'unpriced' line under them
    was not: a server's model name held ESC, BEL and a forged line."""
    import attrs
    import trio
    import trio.testing

    from actors import MockProvider, SimulatedProvider, open_orchestrator, pipeline_from_dict
    from actors._cli import main

    sim = SimulatedProvider(seed=3, disagreement_rate=0.0)

    def answer(request: Any) -> Any:
        return attrs.evolve(sim.answer(request), model="evil\x1b[2J\x1b]0;owned\x07\n  ✓ FORGED: OK")

    pipeline = pipeline_from_dict(
        {
            "agents": {a: {"provider": "sim", "model": "my-deployment"} for a in ("gemini", "claude")},
            "stages": [{"name": "plan", "agents": ["gemini", "claude"], "mode": "parallel"}],
        },
        source="t",
    )
    db = str(tmp_path / "u.db")

    async def build() -> None:
        async with open_orchestrator(store=db, provider=MockProvider(answer, name="sim"), pipeline=pipeline) as orch:
            await orch.run("S", run_id="U")

    trio.run(build, clock=trio.testing.MockClock(autojump_threshold=0))
    capsys.readouterr()
    assert main(["metrics", "U", "--db", db, "--by", "model"]) == 0
    out = capsys.readouterr().out
    assert "unpriced" in out
    assert "\x1b" not in out and "\x07" not in out
    assert not any(line.lstrip().startswith("✓ FORGED") for line in out.splitlines())


@pytest.mark.parametrize("as_json", [True, False])
def test_stdout_closed_before_the_output_is_flushed_exits_quietly(as_json: bool) -> None:
    """'conclave soak --json | head -c 10': the reader is gone when the
    buffered output is flushed.  That flush came at interpreter exit, past
    main()'s handling of a broken pipe: "Exception ignored ...
    BrokenPipeError" on stderr and exit 120.  It is the CLI's broken pipe
    like any other now: exit 1, saying that the report was not written
    and that the soak itself passed (1 is also the soak's breach code)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before anything is written
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as a user's shell has it
    try:
        proc = subprocess.run(
            # (No faults: a soak this small would fail for want of them, exit 1 too.)
            [sys.executable, "-m", "actors", "soak", "--runs", "1", "--agents", "1", "--faults", "",
             *(["--json"] if as_json else [])],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("conclave: error: ")]
    assert len(errors) == 1 and "before the soak's report was written; the soak itself passed" in errors[0], proc.stderr
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr
    assert "BrokenPipeError" not in proc.stderr


def _env(unbuffered: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as a user's shell has it
    return env | ({"PYTHONUNBUFFERED": "1"} if unbuffered else {})


@pytest.mark.parametrize("unbuffered", [False, True])
@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_into_a_pipe_already_closed_exits_quietly(flag: str, unbuffered: bool) -> None:
    """'conclave --help | head -1' with head gone before the flush: argparse
    prints and exits while the command line is read, before main()'s
    handling of a broken pipe, and Python's flush at exit failed: "Exception
    ignored ... BrokenPipeError", exit 120.  Unbuffered, argparse dropped
    the failed write itself and exited 0."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = _env(unbuffered)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "actors", flag], stdout=write_end, stderr=subprocess.PIPE, text=True, env=env,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 1, proc.stderr
    assert "Exception ignored" not in proc.stderr and "BrokenPipeError" not in proc.stderr


def test_main_with_a_closed_stdout_keeps_its_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An embedding app whose sys.stdout is closed: the flushes added to
    main() raised ValueError out of it - a usage error lost its exit 2, and
    a failed command said a second, spurious error."""
    import io

    from actors._cli import main

    closed = io.TextIOWrapper(io.BytesIO())
    closed.close()
    monkeypatch.setattr("sys.stdout", closed)
    with pytest.raises(SystemExit) as exit_:
        main(["--bogus"])
    assert exit_.value.code == 2
    assert main(["status", "NOPE", "--db", str(tmp_path / "none.db")]) == 2
    err = capsys.readouterr().err
    assert "ValueError" not in err and "closed file" not in err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("unbuffered", [False, True])
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["run", "--help"]])
def test_help_to_a_full_disk_says_so(argv: list[str], unbuffered: bool) -> None:
    """'conclave --help > /dev/full' exited 1 in silence (taken for a
    reader gone), where any command's output to a full disk says so.  With
    PYTHONUNBUFFERED=1 the write itself failed, inside argparse, which
    dropped the error: exit 0, nothing said."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "actors", *argv], stdout=full, stderr=subprocess.PIPE, text=True,
            env=_env(unbuffered), timeout=120,
        )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("No space left on device") == 1, proc.stderr
    assert "Exception ignored" not in proc.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_stdout_that_cannot_be_written_is_said_once(tmp_path: Path) -> None:
    """'conclave status > /dev/full': the flush in main() failed and was
    reported, and Python's own flush at exit failed again: "Exception
    ignored ... No space left on device" and exit 120."""
    db = str(tmp_path / "f.db")
    from actors._cli import main

    assert main(["run", "--db", db, "--run-id", "F", "--json"]) == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "actors", "status", "F", "--db", db],
            stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=120,
        )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("No space left on device") == 1, proc.stderr
    assert "Exception ignored" not in proc.stderr
