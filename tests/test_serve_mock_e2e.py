"""End to end, as a user runs it: ``conclave serve-mock`` and ``conclave
run --provider openai --base-url ...`` as subprocesses over a real socket
on 127.0.0.1, on the real clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from store import Store

from tests._providers_support import SECRET

SEED = 6
SPEC = "SPEC-E2E"


def conclave(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "actors", *argv], capture_output=True, text=True, env=full_env, timeout=120
    )


@contextmanager
def serve_mock(*argv: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, list[str]]]:
    """Start serve-mock on a free port; yield its base URL and, after the
    block, the lines it printed (appended to the list on exit)."""
    printed: list[str] = []
    proc = subprocess.Popen(
        [sys.executable, "-m", "actors", "serve-mock", "--port", "0", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("listening on http://127.0.0.1:"), first + (proc.stderr.read() if proc.stderr else "")
        yield first.split()[-1], printed
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
        printed += [first, out, err]


def ledger(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/mock/ledger").json()  # type: ignore[no-any-return]


def everything_written(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def test_run_against_serve_mock_matches_the_simulator_and_keeps_the_key_secret(tmp_path: Path) -> None:
    db, sim_db = tmp_path / "http.db", tmp_path / "sim.db"
    with serve_mock("--seed", str(SEED), "--require-key-env", "MOCK_KEY", env={"MOCK_KEY": SECRET}) as (url, printed):
        run = conclave(
            "run", SPEC, "--provider", "openai", "--base-url", url, "--seed", str(SEED), "--db", str(db), "--json",
            env={"OPENAI_API_KEY": SECRET},
        )
        sent = ledger(url)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    sim = conclave("run", SPEC, "--seed", str(SEED), "--db", str(sim_db), "--json", "--sim-latency", "0")
    assert sim.returncode == 0, sim.stderr
    expected = json.loads(sim.stdout)

    # The same consensus shape as the simulator: same decisions, same digest.
    assert result["status"] == "completed"
    assert [(s["stage"], s["status"], s["conflicts"]) for s in result["stages"]] == [
        (s["stage"], s["status"], s["conflicts"]) for s in expected["stages"]
    ]
    assert {s["status"] for s in result["stages"]} == {"ok", "degraded"}  # a shape worth comparing
    assert result["digest"] == expected["digest"]
    # The reported usage is what the server sent, token for token.
    assert result["usage"] == sent["usage"] and sent["usage"]["cached_input_tokens"] > 0
    assert result["unknown_usage_calls"] == 0 and sent["completions"] == result["turns"]

    # The key is in none of: run output, serve-mock output, status/decisions JSON, the database.
    status = conclave("status", result["run_id"], "--db", str(db), "--json")
    decisions = conclave("decisions", result["run_id"], "--db", str(db), "--json")
    captured = "".join([run.stdout, run.stderr, status.stdout, status.stderr, decisions.stdout, decisions.stderr, *printed])
    assert status.returncode == decisions.returncode == 0
    assert SECRET not in captured
    assert SECRET.encode() not in everything_written(db)


def test_rejected_key_fails_cleanly_without_echoing_it(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    # The server wants another key and echoes the one it got in its 401 body.
    with serve_mock("--require-key-env", "MOCK_KEY", env={"MOCK_KEY": "sk-the-right-one-000000"}) as (url, printed):
        human = conclave("run", SPEC, "--provider", "openai", "--base-url", url, "--db", str(db),
                         env={"OPENAI_API_KEY": SECRET})
        machine = conclave("run", SPEC, "--provider", "openai", "--base-url", url, "--db", str(db), "--json",
                           env={"OPENAI_API_KEY": SECRET})
    assert human.returncode != 0 and machine.returncode != 0
    assert "authentication" in human.stdout + human.stderr
    captured = "".join([human.stdout, human.stderr, machine.stdout, machine.stderr, *printed])
    assert SECRET not in captured and SECRET[:16] not in captured
    assert SECRET.encode() not in everything_written(db)


def test_faulty_server_run_still_completes(tmp_path: Path) -> None:
    """The first call's stream is cut mid-way, the retry gets a 429 with a
    1 s reset; the run completes with the simulator's decisions, the cut
    attempt's usage unknown and the rest exactly what the server sent."""
    db = tmp_path / "c.db"
    with serve_mock("--seed", str(SEED), "--fault", "disconnect:1", "--fault", "429:1", "--reset-seconds", "1") as (url, _):
        run = conclave("run", SPEC, "--provider", "openai", "--base-url", url, "--seed", str(SEED), "--db", str(db),
                       "--json", env={"OPENAI_API_KEY": SECRET})
        sent = ledger(url)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert sent["faults"] == {"429": 1, "disconnect": 1}
    assert result["unknown_usage_calls"] == 1
    assert result["usage"] == sent["usage"]
    sim = json.loads(conclave("run", SPEC, "--seed", str(SEED), "--db", str(tmp_path / "s.db"), "--json",
                              "--sim-latency", "0").stdout)
    assert [(s["stage"], s["status"]) for s in result["stages"]] == [(s["stage"], s["status"]) for s in sim["stages"]]
    with Store.open(str(db), readonly=True) as store:
        retries = [e.detail for e in store.events(result["run_id"]) if e.kind == "retry"]
        first = [o for o in store.outputs(result["run_id"]) if o.attempt == 1 and o.status == "failed"]
    assert [r["error"] for r in retries] == ["disconnect", "rate_limit"]
    assert retries[1]["delay_s"] >= 1.0  # the reset hint was honoured
    [cut] = first
    assert cut.usage is None


def test_anthropic_run_against_serve_mock_matches_the_simulator(tmp_path: Path) -> None:
    """The same through the Anthropic Messages provider; its base URL is the
    API root without /v1, as the official client takes it."""
    with serve_mock("--seed", str(SEED)) as (url, printed):
        root = url.removesuffix("/v1")
        run = conclave("run", SPEC, "--provider", "anthropic", "--base-url", root, "--seed", str(SEED),
                       "--db", str(tmp_path / "a.db"), "--json", env={"ANTHROPIC_API_KEY": SECRET})
        sent = ledger(url)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    sim = json.loads(conclave("run", SPEC, "--seed", str(SEED), "--db", str(tmp_path / "s.db"), "--json",
                              "--sim-latency", "0").stdout)
    assert result["digest"] == sim["digest"]
    assert result["usage"] == sent["usage"] == sim["usage"]
    assert SECRET not in run.stdout + run.stderr + "".join(printed)


def test_a_resume_reaches_the_server_its_run_used(tmp_path: Path) -> None:
    """Resumed without --base-url, a run made against a local server went to
    api.openai.com with the local key, and stored the failures as decisions."""
    db = tmp_path / "c.db"
    with serve_mock("--seed", str(SEED)) as (url, _):
        killed = conclave("run", SPEC, "--provider", "openai", "--base-url", url, "--seed", str(SEED), "--db", str(db),
                          "--run-id", "K", env={"OPENAI_API_KEY": SECRET, "CONCLAVE_TEST_KILL_AFTER_WRITES": "8"})
        assert killed.returncode == -9
        before = ledger(url)["completions"]
        resumed = conclave("resume", "K", "--db", str(db), "--json", env={"OPENAI_API_KEY": SECRET})
        after = ledger(url)["completions"]
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["status"] == "completed" and result["unknown_usage_calls"] == 0
    assert result["turns"] > 0 and after - before == result["turns"], "the resume's calls went to the local server"
    with Store.open(str(db), readonly=True) as store:
        run = store.get_run("K")
        assert run is not None and run.current_branch_id is not None
        branch = store.get_branch("K", run.current_branch_id)
        assert branch is not None and branch.options["base_urls"] == {"openai": url}


def test_a_resume_of_a_run_whose_base_url_was_not_kept_needs_it_again(tmp_path: Path) -> None:
    """A URL whose query may hold a credential is not stored; resumed or
    rerun without --base-url, the run went to the public endpoint with the
    key meant for the local server."""
    db = tmp_path / "q.db"
    with serve_mock("--seed", str(SEED)) as (url, _):
        secret_url = url + "?token=local-only"
        made = conclave("run", SPEC, "--provider", "openai", "--base-url", secret_url, "--seed", str(SEED),
                        "--db", str(db), "--run-id", "Q", env={"OPENAI_API_KEY": SECRET})
        assert made.returncode == 0, made.stderr
        before = ledger(url)["completions"]
        refused = conclave("rerun", "Q", "--from", "unlock", "--db", str(db), env={"OPENAI_API_KEY": SECRET})
        assert refused.returncode == 2
        assert "at a base URL that was not kept" in refused.stderr and "give --base-url again" in refused.stderr
        assert "local-only" not in refused.stderr
        given = conclave("rerun", "Q", "--from", "unlock", "--db", str(db), "--base-url", secret_url, "--json",
                         env={"OPENAI_API_KEY": SECRET})
        assert given.returncode == 0, given.stderr
        assert ledger(url)["completions"] > before
        # The provider's variable given again does as well as --base-url.
        by_env = conclave("rerun", "Q", "--from", "unlock", "--db", str(db), "--json",
                          env={"OPENAI_API_KEY": SECRET, "OPENAI_BASE_URL": secret_url})
        assert by_env.returncode == 0, by_env.stderr
    with Store.open(str(db), readonly=True) as store:
        assert len(store.branches("Q")) == 3, "the refused rerun made no branch"
        assert all("local-only" not in json.dumps(b.options) for b in store.branches("Q"))


def test_a_rerun_keeps_the_server_and_faults_it_ran_with_not_its_parents(tmp_path: Path) -> None:
    """A rerun copied its parent's options: its resume went back to the
    parent's server, and one made without faults was said to have the
    parent's plan."""
    db = tmp_path / "r.db"
    with serve_mock("--seed", str(SEED)) as (first, _), serve_mock("--seed", str(SEED)) as (second, _):
        made = conclave("run", SPEC, "--provider", "openai", "--base-url", first, "--seed", str(SEED),
                        "--db", str(db), "--run-id", "P", "--faults", "disconnect:1", env={"OPENAI_API_KEY": SECRET})
        assert made.returncode == 0, made.stderr
        forked = conclave("rerun", "P", "--from", "audit", "--db", str(db), "--base-url", second,
                          env={"OPENAI_API_KEY": SECRET})
        assert forked.returncode == 0, forked.stderr
    with Store.open(str(db), readonly=True) as store:
        run = store.get_run("P")
        assert run is not None and run.current_branch_id is not None
        child = store.get_branch("P", run.current_branch_id)
        assert child is not None and child.options["base_urls"] == {"openai": second}
        assert "faults" not in child.options


def test_simulator_options_are_refused_for_a_run_without_the_simulator(tmp_path: Path) -> None:
    """--disagreement-rate and --sim-latency were accepted, and ignored,
    by run and rerun with real providers only (--base-url on a simulator
    run is refused): refused, exit 2, naming the option, nothing written."""
    db = tmp_path / "c.db"
    key = {"OPENAI_API_KEY": SECRET}
    with serve_mock("--seed", str(SEED)) as (url, _):
        base = ["--provider", "openai", "--base-url", url, "--seed", str(SEED), "--db", str(db)]
        for extra, named in (
            (["--disagreement-rate", "0.5", "--sim-latency", "9"], "--disagreement-rate and --sim-latency apply"),
            (["--sim-latency", "9"], "--sim-latency applies"),
        ):
            refused = conclave("run", SPEC, *base, "--run-id", "X", *extra, env=key)
            assert refused.returncode == 2 and not db.exists(), refused.stderr
            assert refused.stderr == (
                f"conclave: error: {named} only to the simulator; "
                "this run's agents use openai, not the simulator\n"
            )
        made = conclave("run", SPEC, *base, "--run-id", "R", env=key)
        assert made.returncode == 0, made.stderr
        before = db.read_bytes()
        refused = conclave("rerun", "R", "--from", "audit", "--db", str(db), "--disagreement-rate", "0.5", env=key)
        assert refused.returncode == 2
        assert "--disagreement-rate applies only to the simulator; run R's stored pipeline uses openai" in refused.stderr
        assert db.read_bytes() == before
        with Store.open(str(db), readonly=True) as store:
            assert len(store.branches("R")) == 1, "no branch was made"
    # With the simulator they are taken, as always.
    sim = conclave("run", "--db", str(tmp_path / "sim.db"), "--disagreement-rate", "0.5", "--sim-latency", "9")
    assert sim.returncode in (0, 3), sim.stderr


def test_serve_mock_stopped_by_sigterm_exits_0_as_by_ctrl_c() -> None:
    # A supervisor's stop ended the server by the signal (-15), while
    # Ctrl-C closed it cleanly and exited 0.
    proc = subprocess.Popen(
        [sys.executable, "-m", "actors", "serve-mock", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("listening on ")
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and err == "", err
