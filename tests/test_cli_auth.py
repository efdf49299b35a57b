"""``conclave login`` / ``logout`` / ``auth status`` (acceptance 2): the
real Authlib server on 127.0.0.1 with the real clock, the CLI in a
subprocess.  No sleeps: the test waits on the subprocess's output lines."""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from actors._cli import main as conclave_main
from actors._token_store import TokenEntry, TokenStore
from tests.auth_server import CLIENT_ID, DEVICE_PATH, TOKEN_PATH, FakeIdP, serve_in_thread
from messages._auth_api import AuthError, Secret

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 30


class Cli:
    """A ``conclave`` subprocess whose stdout lines arrive on a queue."""

    def __init__(self, args: list[str], home: Path) -> None:
        env = {**os.environ, "CONCLAVE_HOME": str(home), "CONCLAVE_TOKEN_BACKEND": "file"}
        self.proc = subprocess.Popen([sys.executable, "-m", "actors", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_json(self) -> dict[str, Any]:
        line = self.lines.get(timeout=TIMEOUT)
        assert line is not None, f"no more output; stderr: {self.stderr()}"
        self.seen.append(line)
        return json.loads(line)  # type: ignore[no-any-return]

    def finish(self) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=TIMEOUT)
        rest = []
        while (line := self.lines.get(timeout=TIMEOUT)) is not None:
            rest.append(line)
        self.seen.extend(rest)
        err = self.stderr()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return code, "".join(self.seen), err

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read() if self.proc.poll() is not None else ""


@pytest.fixture
def server() -> Iterator[tuple[FakeIdP, str]]:
    idp = FakeIdP(time.monotonic, interval=1)
    with serve_in_thread(idp) as base:
        yield idp, base


def login_args(base: str, *extra: str) -> list[str]:
    return ["login", "generic", "--device-url", base + DEVICE_PATH, "--token-url", base + TOKEN_PATH,
            "--client-id", CLIENT_ID, "--scope", "read", "--json", *extra]


def run_cli(args: list[str], home: Path) -> tuple[int, str, str]:
    return Cli(args, home).finish()


def assert_no_secrets(idp: FakeIdP, *texts: str) -> None:
    for secret in idp.all_secrets():
        for text in texts:
            assert secret not in text


def test_full_login_then_status_shows_valid(server: tuple[FakeIdP, str], tmp_path: Path) -> None:
    idp, base = server
    cli = Cli(login_args(base), tmp_path)
    code_line = cli.next_json()
    assert code_line["event"] == "device_code"
    assert code_line["verification_uri"] == base + "/activate"
    assert code_line["verification_uri_complete"].endswith("user_code=" + code_line["user_code"])
    httpx.post(base + "/test/approve", data={"user_code": code_line["user_code"]}, timeout=TIMEOUT)
    result = cli.next_json()
    code, out, err = cli.finish()
    assert code == 0, err
    assert result["event"] == "result" and result["outcome"] == "logged_in" and result["refreshable"] is True
    assert result["scope"] == "read"
    assert_no_secrets(idp, out, err)

    code, out, err = run_cli(["auth", "status", "--json"], tmp_path)
    assert code == 0, err
    status = json.loads(out)
    rows = {row["provider"]: row for row in status["providers"]}
    assert rows["generic"]["status"] == "valid" and rows["generic"]["symbol"] == "✓"
    assert rows["github"]["status"] == "not_authenticated"
    assert 3000 < rows["generic"]["expires_in"] <= 3600
    assert_no_secrets(idp, out, err)
    # The stored token works against the server.
    stored = TokenStore(tmp_path).get("generic")
    assert stored is not None and idp.access_token_valid(stored.access_token.reveal())


def test_login_denied_exits_4(server: tuple[FakeIdP, str], tmp_path: Path) -> None:
    idp, base = server
    cli = Cli(login_args(base), tmp_path)
    httpx.post(base + "/test/deny", data={"user_code": cli.next_json()["user_code"]}, timeout=TIMEOUT)
    result = cli.next_json()
    code, _, _ = cli.finish()
    assert (code, result["outcome"]) == (4, "denied")
    assert TokenStore(tmp_path).load() == {}


def test_login_expired_exits_5(tmp_path: Path) -> None:
    idp = FakeIdP(time.monotonic, interval=1, expires_in=2)
    with serve_in_thread(idp) as base:
        cli = Cli(login_args(base), tmp_path)
        cli.next_json()
        result = cli.next_json()
        code, _, _ = cli.finish()
        # Said in minutes, a short-lived code "expires in 0 min".
        human = [a for a in login_args(base) if a != "--json"]
        shown, out, err = run_cli(human, tmp_path)
    assert (code, result["outcome"]) == (5, "expired")
    assert "login generic" in result["message"]
    assert shown == 5 and "the code expires in 2s;" in out + err, out + err


@pytest.mark.parametrize(("signum", "expected"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_login_exits_130_and_stores_nothing(
    server: tuple[FakeIdP, str], tmp_path: Path, signum: int, expected: int
) -> None:
    # SIGTERM ended the process at once, without its --json result line.
    idp, base = server
    cli = Cli(login_args(base), tmp_path)
    user_code = cli.next_json()["user_code"]
    cli.proc.send_signal(signum)
    result = cli.next_json()
    code, _, _ = cli.finish()
    assert (code, result["outcome"]) == (expected, "cancelled")
    idp.approve(user_code)  # too late: nothing may be stored
    assert TokenStore(tmp_path).load() == {}


def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONCLAVE_CLIENT_SECRET", raising=False)
    assert conclave_main(["login", "generic", "--client-id", "x"]) == 2
    assert "device URL" in capsys.readouterr().err
    assert conclave_main(["login", "generic", "--device-url", "nope", "--token-url", "https://t", "--client-id", "x"]) == 2
    assert conclave_main(["login", "google", "--client-id", "x"]) == 2
    assert "client secret" in capsys.readouterr().err
    assert conclave_main(["login", "github", "--json"]) == 2
    result = json.loads(capsys.readouterr().out)
    assert (result["outcome"], result["exit_code"]) == ("bad_input", 2) and "client id" in result["message"]
    with pytest.raises(SystemExit) as info:
        conclave_main(["login", "myspace"])
    assert info.value.code == 2
    # A bad CONCLAVE_TOKEN_BACKEND is bad input to every command that reads
    # tokens, as it already was to 'run --auth login'.
    monkeypatch.setenv("CONCLAVE_HOME", str(tmp_path))
    monkeypatch.setenv("CONCLAVE_TOKEN_BACKEND", "bogus")
    capsys.readouterr()
    for argv in (["auth", "status"], ["logout", "github"], ["login", "generic", "--device-url", "https://d",
                                                             "--token-url", "https://t", "--client-id", "x"]):
        assert conclave_main(argv) == 2, argv
        assert "CONCLAVE_TOKEN_BACKEND must be auto, file or keyring, got 'bogus'" in capsys.readouterr().err


def test_login_json_ends_with_a_result_line_whatever_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception nobody foresaw (here a disk error while storing the
    tokens) left a --json reader with no result line: it waits for one."""
    import actors._cli_auth as cli_auth

    async def failing(*args: object, **kwargs: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setenv("CONCLAVE_HOME", str(tmp_path))
    monkeypatch.setenv("CONCLAVE_TOKEN_BACKEND", "file")
    monkeypatch.setattr(cli_auth, "device_login", failing)
    argv = ["login", "generic", "--device-url", "https://d", "--token-url", "https://t", "--client-id", "x"]
    assert conclave_main([*argv, "--json"]) == 1
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (result["event"], result["outcome"], result["exit_code"]) == ("result", "error", 1)
    assert result["message"] == "OSError: [Errno 5] Input/output error"
    assert conclave_main(argv) == 1
    assert "Input/output error" in capsys.readouterr().err


def test_status_lines_and_logout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CONCLAVE_HOME", str(tmp_path))
    monkeypatch.setenv("CONCLAVE_TOKEN_BACKEND", "file")
    now = time.time()

    def e(provider: str, expires_in: float, refresh: bool) -> TokenEntry:
        return TokenEntry(provider=provider, access_token=Secret(f"at-{provider}-SECRET"),
                          refresh_token=Secret(f"rt-{provider}-SECRET") if refresh else None,
                          expires_at=now + expires_in, scope=None, token_url="https://idp.test/token",
                          stored_at=now + expires_in - 3600)  # hour-long tokens

    async def fill() -> None:
        async with TokenStore(tmp_path).locked() as tokens:
            tokens.put(e("github", 3600, True))
            tokens.put(e("google", 60, True))
            tokens.put(e("openai", -60, False))
            # No refresh token, 239 s left: a run accepts it, so it is valid (it said "expired").
            tokens.put(e("anthropic", 239, False))

    trio.run(fill)
    assert conclave_main(["auth", "status"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[1]: line for line in out.splitlines()}
    assert lines["github"].startswith("✓") and "valid" in lines["github"]
    assert lines["google"].startswith("⚡") and "needs refresh" in lines["google"]
    assert lines["openai"].startswith("✗") and "expired" in lines["openai"]
    assert lines["anthropic"].startswith("✓") and "valid" in lines["anthropic"]
    assert lines["microsoft"].startswith("·") and "not authenticated" in lines["microsoft"]
    assert "SECRET" not in out
    # A refresh token without the URL to send it to refreshes nothing: it
    # said "refreshable": true beside "expired".
    async def no_url() -> None:
        async with TokenStore(tmp_path).locked() as tokens:
            tokens.put(attrs.evolve(e("gitlab", -60, True), token_url=None))

    trio.run(no_url)
    assert conclave_main(["auth", "status", "--json"]) == 0
    rows = {r["provider"]: r for r in json.loads(capsys.readouterr().out)["providers"]}
    assert (rows["gitlab"]["status"], rows["gitlab"]["refreshable"]) == ("expired", False)
    assert rows["github"]["refreshable"] is True

    assert conclave_main(["logout", "github"]) == 0
    assert "logged out" in capsys.readouterr().out
    assert TokenStore(tmp_path).get("github") is None

    os.chmod(tmp_path / "tokens.json", 0o644)
    assert conclave_main(["auth", "status"]) == 1
    captured = capsys.readouterr()
    assert "chmod 600" in captured.err and "SECRET" not in captured.err + captured.out


def test_logout_clears_a_damaged_entry_and_refuses_a_misspelt_provider(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONCLAVE_HOME", str(tmp_path))
    monkeypatch.setenv("CONCLAVE_TOKEN_BACKEND", "file")
    now = time.time()
    good = TokenEntry(provider="github", access_token=Secret("at-github-SECRET"), refresh_token=None,
                      expires_at=now + 3600, scope=None, stored_at=now)

    async def fill() -> None:
        async with TokenStore(tmp_path).locked() as tokens:
            tokens.put(good)

    trio.run(fill)
    path = tmp_path / "tokens.json"
    document = json.loads(path.read_text())
    document["tokens"]["google"] = {"nonsense": 1}
    path.write_text(json.dumps(document))

    assert conclave_main(["auth", "status"]) == 1
    assert "run 'conclave logout google'" in capsys.readouterr().err
    # The hint works: the damaged entry goes, the good one stays as it was.
    assert conclave_main(["logout", "google"]) == 0
    assert "google: logged out" in capsys.readouterr().out
    assert json.loads(path.read_text())["tokens"] == {"github": good.to_json()}
    assert conclave_main(["auth", "status"]) == 0
    capsys.readouterr()

    # "was not logged in" would read as if the github tokens were gone.
    assert conclave_main(["logout", "githbu"]) == 2
    captured = capsys.readouterr()
    assert "unknown provider 'githbu'" in captured.err and captured.out == ""
    assert TokenStore(tmp_path).get("github") is not None

    path.write_text("{not json")
    assert conclave_main(["logout", "github"]) == 1
    assert "remove it; every provider then needs 'conclave login' again" in capsys.readouterr().err


def test_logout_when_not_logged_in_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # It used to create $CONCLAVE_HOME and its lock file to say so.
    home = tmp_path / "home"
    monkeypatch.setenv("CONCLAVE_HOME", str(home))
    monkeypatch.setenv("CONCLAVE_TOKEN_BACKEND", "file")
    assert conclave_main(["logout", "github"]) == 0
    assert "github: was not logged in" in capsys.readouterr().out
    assert not home.exists()


def stored_login(idp: FakeIdP, base: str, home: Path, provider: str, expires_in: float) -> dict[str, Any]:
    """A real device-code grant from the server, stored for ``provider``."""
    device = httpx.post(base + DEVICE_PATH, data={"client_id": CLIENT_ID, "scope": "model"}, timeout=TIMEOUT).json()
    idp.approve(device["user_code"])
    idp.devices[device["device_code"]]["interval"] = 0
    grant = httpx.post(base + TOKEN_PATH, timeout=TIMEOUT, data={
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
        "device_code": device["device_code"], "client_id": CLIENT_ID}).json()
    entry = TokenEntry(provider=provider, access_token=Secret(grant["access_token"]),
                       refresh_token=Secret(grant["refresh_token"]), expires_at=time.time() + expires_in,
                       scope="model", token_url=base + TOKEN_PATH, client_id=CLIENT_ID,
                       stored_at=time.time() + expires_in - 3600)  # an hour-long token, expires_in left

    async def put() -> None:
        async with TokenStore(home).locked() as tokens:
            tokens.put(entry)

    trio.run(put)
    return grant  # type: ignore[no-any-return]


def test_run_with_auth_login_uses_and_refreshes_the_stored_token(tmp_path: Path) -> None:
    from actors._mock_backend import MockBackend

    idp = FakeIdP(time.monotonic)
    idp.model_backend = MockBackend(seed=5, disagreement_rate=0.0)
    with serve_in_thread(idp) as base:
        home = tmp_path / "home"
        first = stored_login(idp, base, home, "openai", expires_in=10)  # inside the margin: refresh first
        env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
        env.update(CONCLAVE_HOME=str(home), CONCLAVE_TOKEN_BACKEND="file")
        proc = subprocess.run(
            [sys.executable, "-m", "actors", "run", "SPEC-LOGIN", "--provider", "openai", "--base-url", base + "/v1",
             "--model", "mock-model", "--no-stream", "--auth", "login", "--json", "--db", str(tmp_path / "run.db")],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "completed"
    assert idp.refresh_count == 1  # single-flight across all agents of the run
    assert [status for _, status in idp.api_calls].count(401) == 0
    stored = TokenStore(home).get("openai")
    assert stored is not None and stored.refresh_token is not None
    assert stored.refresh_token.reveal() != first["refresh_token"]
    assert idp.valid_refresh_tokens() == {stored.refresh_token.reveal()}
    database = (tmp_path / "run.db").read_bytes()
    for secret in idp.all_secrets():
        assert secret not in proc.stdout and secret not in proc.stderr and secret.encode() not in database


def test_run_with_auth_login_and_only_dead_tokens_is_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Expired with no refresh token: every call would fail.  It used to start
    # the run, which halted "no_consensus" after the first stage.
    monkeypatch.setenv("CONCLAVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CONCLAVE_TOKEN_BACKEND", "file")
    now = time.time()

    async def fill() -> None:
        async with TokenStore(tmp_path / "home").locked() as tokens:
            tokens.put(TokenEntry(provider="openai", access_token=Secret("at-openai-SECRET"), refresh_token=None,
                                  expires_at=now - 60, scope=None, stored_at=now - 3600))
            tokens.put(TokenEntry(provider="anthropic", access_token=Secret("at-anthropic-SECRET"),
                                  refresh_token=Secret("rt-anthropic-SECRET"), expires_at=now - 60, scope=None,
                                  stored_at=now - 3600, token_url="https://idp.test/token"))
            # A refresh token with nowhere to send it cannot refresh either.
            tokens.put(TokenEntry(provider="github", access_token=Secret("at-github-SECRET"),
                                  refresh_token=Secret("rt-github-SECRET"), expires_at=now - 60, scope=None,
                                  stored_at=now - 3600))

    trio.run(fill)
    code = conclave_main(["run", "--provider", "openai", "--auth", "login", "--db", str(tmp_path / "x.db")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "tokens for openai have expired" in err and "conclave login openai" in err and "SECRET" not in err
    assert not (tmp_path / "x.db").exists()
    # Expired but refreshable is not refused here: the run refreshes first.
    from actors._cli_auth import login_auth

    args = argparse.Namespace(auth="login")
    assert login_auth(args, {"anthropic"}) is not None
    with pytest.raises(AuthError, match="tokens for github have expired"):
        login_auth(args, {"github"})


def test_run_with_auth_login_but_no_login_is_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CONCLAVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CONCLAVE_TOKEN_BACKEND", "file")
    code = conclave_main(["run", "--provider", "anthropic", "--auth", "login", "--db", str(tmp_path / "x.db")])
    assert code == 2
    assert "conclave login anthropic" in capsys.readouterr().err
    assert not (tmp_path / "x.db").exists()
