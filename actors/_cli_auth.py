"""``conclave login``, ``conclave logout`` and ``conclave auth status``.

Exit codes: 0 success, 4 denied, 5 expired, 2 bad input, 130 cancelled,
1 anything else.  ``login --json`` prints two JSON lines: ``{"event":
"device_code", "user_code", "verification_uri", "verification_uri_complete",
"expires_in", "interval"}`` as soon as the code is known, then ``{"event":
"result", "outcome", "exit_code", "message", ...}`` where ``outcome`` is
``logged_in``, ``denied``, ``expired``, ``cancelled``, ``bad_input`` or
``error``.  Tokens are never printed: not in human output, not in
``--json``, not in error messages.  Environment variables are read here,
at the edge: ``CONCLAVE_HOME`` (token directory), ``CONCLAVE_TOKEN_BACKEND``
(``auto``/``file``/``keyring``, default ``auto``) and
``CONCLAVE_CLIENT_SECRET`` (instead of ``--client-secret``, which other
users can see in the process list).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

import httpx
import trio

from messages._auth_errors import AuthConfigError, AuthError

from ._auth_flow import DeviceAuthorization
from ._auth_login import device_login, logout
from ._auth_profiles import PROVIDERS, build_profile
from ._format import duration
from ._token_source import AuthService, TokenManager
from ._token_store import TokenStatus, TokenStore, default_home

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DENIED = 4
EXIT_EXPIRED = 5
EXIT_CANCELLED = 130

HTTP_TIMEOUT = httpx.Timeout(30.0)


def _store(env: Mapping[str, str]) -> TokenStore:
    backend = env.get("CONCLAVE_TOKEN_BACKEND", "auto")
    if backend not in ("auto", "file", "keyring"):
        # Bad input, as a bad option is: exit 2 from every command.
        raise AuthConfigError(f"CONCLAVE_TOKEN_BACKEND must be auto, file or keyring, got {backend!r}")
    return TokenStore(default_home(env), backend=backend)


def _error(message: str) -> None:
    print(f"conclave: error: {message}", file=sys.stderr)


def _emit_json(out: TextIO, obj: Mapping[str, Any]) -> None:
    out.write(json.dumps(obj, sort_keys=False) + "\n")
    out.flush()


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(timespec="seconds")


# -- login --------------------------------------------------------------------


def cmd_login(args: argparse.Namespace) -> int:
    env = os.environ
    out = sys.stdout
    provider = args.provider
    as_json: bool = args.json

    def finish(outcome: str, code: int, message: str, **extra: Any) -> int:
        if as_json:
            _emit_json(out, {"event": "result", "provider": provider, "outcome": outcome,
                             "exit_code": code, "message": message, **extra})
        elif code == EXIT_OK:
            print(message, file=out)
        else:
            _error(message)
        return code

    try:
        profile = build_profile(
            provider,
            device_url=args.device_url,
            token_url=args.token_url,
            client_id=args.client_id,
            scope=args.scope,
            issuer=args.issuer,
            client_secret=args.client_secret or env.get("CONCLAVE_CLIENT_SECRET") or None,
            tenant=args.tenant,
        )
        if not profile.issuer:
            profile.require_endpoints()
        store = _store(env)
    except AuthError as error:
        if error.exit_code == EXIT_USAGE:
            return finish("bad_input", EXIT_USAGE, str(error))
        return finish("error", EXIT_ERROR, str(error))
    provider = profile.name

    def show_code(auth: DeviceAuthorization) -> None:
        if as_json:
            _emit_json(out, {
                "event": "device_code",
                "provider": provider,
                "user_code": auth.user_code,
                "verification_uri": auth.verification_uri,
                "verification_uri_complete": auth.verification_uri_complete,
                "expires_in": auth.expires_in,
                "interval": auth.interval,
            })
            return
        if profile.experimental:
            print(f"note: the {profile.display_name} endpoints are experimental; override them with "
                  "--device-url/--token-url/--client-id if they fail", file=out)
        print(f"To sign in to {profile.display_name}, open {auth.verification_uri}", file=out)
        print(f"and enter the code: {auth.user_code}", file=out)
        if auth.verification_uri_complete:
            print(f"(or open {auth.verification_uri_complete})", file=out)
        # (In minutes, a 30 s code "expires in 0 min".)
        print(f"Waiting for approval (the code expires in {duration(auth.expires_in)}; Ctrl-C cancels)...",
              file=out, flush=True)

    async def run() -> Any:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
            return await device_login(profile, client, store, clock=time.time, on_code=show_code)

    from ._cli import run_stoppable, stopped_by  # late: _cli imports this module

    try:
        entry = run_stoppable(run)  # SIGTERM and SIGHUP cancel it as Ctrl-C does
    except KeyboardInterrupt as stop:
        _, code = stopped_by(stop) or ("", EXIT_CANCELLED)
        return finish("cancelled", code, "login cancelled; nothing was stored")
    except AuthError as error:
        outcomes = {EXIT_USAGE: "bad_input", EXIT_DENIED: "denied", EXIT_EXPIRED: "expired"}
        code = error.exit_code if error.exit_code in outcomes else EXIT_ERROR
        return finish(outcomes.get(code, "error"), code, str(error))
    except Exception as error:
        if not as_json:
            raise  # main() prints it as one line, exit 1
        # A script reading --json waits for its result line, whatever failed.
        return finish("error", EXIT_ERROR, f"{type(error).__name__}: {error}")
    return finish(
        "logged_in",
        EXIT_OK,
        f"Logged in to {profile.display_name}; tokens stored in the {store.backend.description}",
        expires_at=_iso(entry.expires_at),
        scope=entry.scope,
        refreshable=entry.refreshable,
    )


# -- logout -------------------------------------------------------------------


def cmd_logout(args: argparse.Namespace) -> int:
    provider = args.provider.strip().lower()
    try:
        store = _store(os.environ)
        removed = trio.run(logout, store, provider)
    except AuthError as error:
        _error(str(error))
        return error.exit_code
    if not removed and provider not in PROVIDERS:
        # A misspelt name must not read as "your tokens are gone".
        _error(f"unknown provider {args.provider!r}; choose one of: {', '.join(PROVIDERS)}")
        return EXIT_USAGE
    print(f"{provider}: {'logged out' if removed else 'was not logged in'}")
    return EXIT_OK


# -- auth status ----------------------------------------------------------------


def status_rows(store: TokenStore, now: float) -> list[dict[str, Any]]:
    entries = store.load()
    rows = []
    for provider in [*PROVIDERS, *sorted(set(entries) - set(PROVIDERS))]:
        entry = entries.get(provider)
        status = entry.status(now) if entry is not None else TokenStatus.NOT_AUTHENTICATED
        rows.append({
            "provider": provider,
            "status": status.label,
            "symbol": status.symbol,
            "expires_at": _iso(entry.expires_at) if entry else None,
            "expires_in": round(entry.expires_at - now) if entry and entry.expires_at is not None else None,
            "scope": entry.scope if entry else None,
            "refreshable": entry.refreshable if entry else False,
        })
    return rows


def cmd_auth_status(args: argparse.Namespace) -> int:
    try:
        store = _store(os.environ)
        rows = status_rows(store, time.time())
    except AuthError as error:
        _error(str(error))
        return error.exit_code
    if args.json:
        _emit_json(sys.stdout, {"store": store.backend.description, "providers": rows})
        return EXIT_OK
    for row in rows:
        detail = ""
        if row["expires_in"] is not None:
            detail = f"  (expires {row['expires_at']})"
        label = row["status"].replace("_", " ")
        print(f"{row['symbol']} {row['provider']:<10} {label}{detail}")
    return EXIT_OK


# -- conclave run --auth login ---------------------------------------------------


def add_run_auth_option(parser: argparse.ArgumentParser) -> None:
    """``--auth key|login`` for ``conclave run``."""
    parser.add_argument(
        "--auth",
        choices=("key", "login"),
        default="key",
        help="key: API keys from the environment (default); login: the tokens of "
        "'conclave login PROVIDER', refreshed automatically",
    )


def login_auth(
    args: argparse.Namespace, providers: Iterable[str], env: Mapping[str, str] | None = None
) -> AuthService | None:
    """With ``--auth login``: an :class:`AuthService` whose ``sources`` give
    each remote provider in ``providers`` its tokens through the auth actor
    (``None`` otherwise; run it with ``open_orchestrator(auth=...)``).
    Raises :class:`AuthError` naming the ``conclave login`` to run when a
    provider has no stored tokens, or only expired ones that cannot be
    refreshed: every call would fail, so the run is not started."""
    if getattr(args, "auth", "key") != "login":
        return None
    store = _store(os.environ if env is None else env)
    stored = store.load()
    remote = sorted(set(providers) - {"sim"})
    missing = [name for name in remote if name not in stored]
    if missing:
        raise AuthConfigError(
            f"--auth login: not logged in to {', '.join(missing)}",
            hint="; ".join(f"run 'conclave login {name}'" for name in missing),
        )
    now = time.time()  # token expiry times are wall-clock Unix seconds
    expired = [name for name in remote if stored[name].status(now, margin=0) is TokenStatus.EXPIRED]
    if expired:
        raise AuthConfigError(
            f"--auth login: the tokens for {', '.join(expired)} have expired and cannot be refreshed",
            hint="; ".join(f"run 'conclave login {name}'" for name in expired),
        )
    manager = TokenManager(store)  # one short-lived HTTP client per refresh
    return AuthService(manager, remote)


# -- registration -----------------------------------------------------------------


def add_auth_commands(subparsers: Any) -> None:
    """Register ``login``, ``logout`` and ``auth status`` on ``subparsers``
    (from ``ArgumentParser.add_subparsers``); each sets ``handler``."""
    login = subparsers.add_parser(
        "login",
        help="log in to a model provider with a device code (RFC 8628)",
        description=(
            "Log in with the OAuth device authorization grant: shows a code to enter in a "
            "browser (on any device), then waits for approval and stores the tokens (0600). "
            "Exit codes: 0 logged in, 4 denied, 5 expired, 2 bad input, 130 cancelled, 1 other."
        ),
    )
    login.add_argument("provider", choices=PROVIDERS, metavar="PROVIDER", help=f"one of: {', '.join(PROVIDERS)}")
    login.add_argument("--device-url", metavar="URL", help="device authorization endpoint")
    login.add_argument("--token-url", metavar="URL", help="token endpoint")
    login.add_argument("--client-id", metavar="ID", help="OAuth client id")
    login.add_argument("--scope", metavar="S", help="space-separated scopes")
    login.add_argument("--issuer", metavar="URL", help="issuer whose RFC 8414 metadata names the endpoints")
    login.add_argument("--client-secret", metavar="SECRET", help="client secret (Google); prefer $CONCLAVE_CLIENT_SECRET")
    login.add_argument("--tenant", metavar="TENANT", help="Microsoft Entra tenant (default: organizations)")
    login.add_argument("--json", action="store_true", help="print the code and the outcome as JSON lines")
    login.set_defaults(handler=cmd_login)

    out = subparsers.add_parser("logout", help="forget a provider's tokens", description="Remove a provider's stored tokens.")
    out.add_argument("provider", metavar="PROVIDER", help=f"one of: {', '.join(PROVIDERS)}")
    out.set_defaults(handler=cmd_logout)

    auth = subparsers.add_parser("auth", help="show login status", description="Device-code login status.")
    auth_sub = auth.add_subparsers(dest="auth_command", metavar="SUBCOMMAND", required=True)
    status = auth_sub.add_parser(
        "status",
        help="one line per provider: ✓ valid, ⚡ needs refresh, ✗ expired, · not authenticated",
        description="One line per provider: ✓ valid, ⚡ needs refresh, ✗ expired, · not authenticated.",
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=cmd_auth_status)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m actors._cli_auth``)."""
    parser = argparse.ArgumentParser(prog="conclave")
    add_auth_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
