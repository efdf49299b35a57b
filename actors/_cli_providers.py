"""The CLI's provider pieces: ``serve-mock`` and the ``run`` flags.

- :func:`add_serve_mock_command` registers ``serve-mock``;
- :func:`add_provider_arguments` adds ``--provider/--model/--base-url/...``
  to ``run``; :func:`pipeline_from_args` applies them to the pipeline and
  :func:`providers_from_args` validates and builds every provider the
  pipeline uses, raising :class:`ProviderConfigError` (exit 2) before any
  agent starts.

Runnable on its own: ``python -m actors._cli_providers serve-mock --port 0``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import trio

from ._checks import check_seconds, nonempty_arg, positive_arg, seed_arg
from ._http_provider import BearerSource
from ._mock_backend import RESET_STYLES, FaultRule, MockBackend, MockConfigError
from ._mock_server import serve_mock
from ._pipeline import Pipeline
from ._provider import BaseProvider
from ._provider_factory import PROVIDER_NAMES, ProviderConfig, ProviderConfigError, resolve_provider
from ._runtime import Limits, collapse_single

EXIT_OK = 0
EXIT_USAGE = 2

# -- serve-mock ----------------------------------------------------------------


def add_serve_mock_command(subparsers: Any) -> None:
    """Register ``serve-mock`` on an ``add_subparsers()`` object.  The
    handler is ``args.handler(args) -> int``."""
    parser = subparsers.add_parser(
        "serve-mock",
        help="serve an OpenAI-compatible mock model API for end-to-end runs",
        description=(
            "A local OpenAI-compatible Chat Completions server (plain and streaming; also "
            "Anthropic Messages at /v1/messages) with "
            "deterministic structured answers and usage from --seed, the same as the embedded "
            "simulator's.  Faults per request with the x-mock-fault header (429, disconnect, slow, "
            "500, 502, 503, 504, 529, 400, 401, 403, 404, 422), shaped by x-mock-reset: SECONDS "
            f"(a 429's reset hint), x-mock-reset-style: {'|'.join(RESET_STYLES)} (the headers "
            "that carry it; default all, anthropic on /v1/messages), x-mock-delay: SECONDS (a slow "
            "answer's wait) and x-mock-should-retry: true|false (sent back on an error status); or "
            "for the first N chat requests with --fault KIND[:N]."
        ),
    )
    parser.add_argument(
        "--host", type=nonempty_arg, default="127.0.0.1", help="address to bind (default: loopback only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default: 8000)")
    # Checked as run's --seed is: a seed past 64 bits cannot be run's, so
    # no run could match the server's answers.
    parser.add_argument("--seed", type=seed_arg, default=0, help="seed of the answers and usage (default: 0)")
    parser.add_argument(
        "--disagreement-rate", type=float, default=0.03, help="chance an agent dissents (as conclave run: 0.03)"
    )
    parser.add_argument(
        "--fault", action="append", default=[], metavar="KIND[:N]",
        help="answer the first N chat requests (all, without :N) with this fault; repeatable",
    )
    parser.add_argument("--reset-seconds", type=float, default=1.0, help="reset hint of a 429 (default: 1)")
    parser.add_argument("--slow-seconds", type=float, default=30.0, help="delay of a 'slow' fault (default: 30)")
    parser.add_argument(
        # An empty name was taken as not given: a server requiring no key.
        "--require-key-env", type=nonempty_arg, metavar="VAR", default=None,
        help="require 'Authorization: Bearer $VAR' (the key is read from the environment, never from argv)",
    )
    parser.set_defaults(handler=serve_mock_main)


def _check_host(host: str, port: int) -> None:
    """Raise :class:`MockConfigError` naming ``host`` unless it resolves to
    an address to bind: an unknown name exited 1 ("cannot listen on"), or
    with a bare UnicodeError for one that is not a host name at all."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise MockConfigError(f"--host {host!r}: cannot resolve it to an address ({exc.strerror})") from None
    except UnicodeError:
        raise MockConfigError(f"--host {host!r}: not a host name or address") from None


def serve_mock_main(args: argparse.Namespace, *, env: Mapping[str, str] | None = None) -> int:
    environ = os.environ if env is None else env
    try:
        faults = [FaultRule.parse(text) for text in args.fault]
        if not 0.0 <= args.disagreement_rate <= 1.0:
            raise MockConfigError(f"--disagreement-rate must be within [0, 1], got {args.disagreement_rate}")
        if not 0 <= args.port <= 65535:
            raise MockConfigError(f"--port must be within 0..65535, got {args.port}")
        for flag, value in (("--reset-seconds", args.reset_seconds), ("--slow-seconds", args.slow_seconds)):
            # NaN and inf passed "not negative" and crashed the server at its first fault.
            try:
                check_seconds(value, flag)
            except ValueError as exc:
                raise MockConfigError(str(exc)) from None
        _check_host(args.host, args.port)
        key = None
        if args.require_key_env is not None:
            key = environ.get(args.require_key_env)
            if not key:
                raise MockConfigError(f"--require-key-env: {args.require_key_env} is not set")
    except MockConfigError as exc:
        print(f"conclave serve-mock: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    backend = MockBackend(
        seed=args.seed,
        disagreement_rate=args.disagreement_rate,
        faults=faults,
        reset_seconds=args.reset_seconds,
        slow_seconds=args.slow_seconds,
        required_key=key,
    )

    async def main() -> None:
        # A failure to bind is the nursery's only exception: unwrapped, so
        # the OSError handler below names the address.
        with collapse_single():
            async with trio.open_nursery() as nursery:
                url = await nursery.start(lambda task_status: serve_mock(
                    backend, host=args.host, port=args.port, task_status=task_status
                ))
                if args.host not in ("127.0.0.1", "::1", "localhost"):
                    print(f"conclave serve-mock: warning: bound to {args.host}, not loopback only", file=sys.stderr)
                print(f"listening on {url}", flush=True)

    from ._cli import run_stoppable  # late: _cli imports this module

    try:
        run_stoppable(main)  # SIGTERM and SIGHUP stop it as Ctrl-C does
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        print(f"conclave serve-mock: error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return EXIT_OK


# -- run: provider flags -------------------------------------------------------


def add_provider_arguments(parser: argparse.ArgumentParser, *, stored: bool = False) -> None:
    """The provider flags; ``stored``: for a command that runs a stored
    pipeline (resume, rerun), whose providers and models it cannot change -
    there --provider and --model are refused with a word (and not offered
    in --help)."""
    group = parser.add_argument_group(
        "model providers" if not stored else "model providers (the run's own; these say only how to reach them)"
    )
    group.add_argument(
        "--provider", default=None, metavar="openai|anthropic|sim",
        help="use this provider for every agent (default: each agent's provider in the pipeline, else sim)"
        if not stored else argparse.SUPPRESS,
    )
    group.add_argument(
        "--model", type=nonempty_arg, default=None,
        help="use this model for every agent" if not stored else argparse.SUPPRESS,
    )
    group.add_argument(
        "--base-url", default=None,
        help="API base URL including the version path as the official clients take it, "
        "e.g. http://127.0.0.1:8000/v1 (OpenAI) or https://api.anthropic.com (Anthropic)",
    )
    group.add_argument(
        "--api-key-env", type=nonempty_arg, default=None, metavar="VAR",
        help="read the API key from VAR (default: OPENAI_API_KEY / ANTHROPIC_API_KEY)",
    )
    group.add_argument("--no-stream", dest="stream", action="store_false", help="do not stream responses")
    group.add_argument(
        "--no-json-mode", dest="json_mode", action="store_false",
        help="do not ask OpenAI-compatible servers for JSON output (response_format), for one that "
        "refuses it with a 400; the prompt still asks for a JSON object, and a stage still needs one",
    )
    group.add_argument(
        "--request-timeout", type=float, default=None, metavar="SECONDS",
        help="the longest wait for a connection or for the next bytes of an answer; a whole call, however "
        "steadily it streams, is cut at the agent's call timeout (600 s)",
    )
    group.add_argument(
        "--max-concurrency", type=positive_arg, default=None, metavar="N",
        # Said where the knob is: "same seed, same digest" does not hold
        # there (the README's Faults section says why).
        help=f"at most N calls in flight per provider (default: {Limits().max_concurrency}). A stage whose "
        "panel is wider than N queues its calls, and under timeout faults the digest can then differ "
        "between runs of the same seed",
    )


def pipeline_from_args(args: argparse.Namespace, pipeline: Pipeline) -> Pipeline:
    """``pipeline`` with ``--provider``/``--model`` applied to every agent."""
    provider = getattr(args, "provider", None)
    model = getattr(args, "model", None)
    if provider is None and model is None:
        return pipeline
    overrides = {
        name: attrs.evolve(
            spec,
            provider=provider if provider is not None else spec.provider,
            model=model if model is not None else spec.model,
        )
        for name, spec in pipeline.agents.items()
    }
    return pipeline.with_agents(overrides)


def provider_configs_from_args(
    args: argparse.Namespace,
    pipeline: Pipeline,
    *,
    env: Mapping[str, str] | None = None,
    token_sources: Mapping[str, BearerSource] | None = None,
    base_urls: Mapping[str, str] | None = None,
    stored: bool = False,
) -> dict[str, ProviderConfig]:
    """Validate the configuration of every provider the (overridden)
    pipeline uses; build nothing.  ``base_urls``: per provider, the URL to
    use when --base-url is not given (a resumed run's own).  ``stored``:
    the pipeline is a run's own (resume, rerun), which no option changes."""
    pipeline = pipeline_from_args(args, pipeline)
    max_concurrency = getattr(args, "max_concurrency", None)
    if max_concurrency is not None and max_concurrency < 1:
        raise ProviderConfigError(f"--max-concurrency must be at least 1, got {max_concurrency}")
    names = sorted({spec.provider for spec in pipeline.agents.values()})
    for name in names:
        if name not in PROVIDER_NAMES:
            # Name the agents: the bad name may sit in any of several
            # [agents] tables of the pipeline file.
            # (--provider names itself.)
            if getattr(args, "provider", None) == name:
                resolve_provider(name)  # raises the "unknown provider" error
            agents = sorted(a for a, spec in pipeline.agents.items() if spec.provider == name)
            source = getattr(args, "pipeline", None)
            where = f"{source}: " if source and not stored else ""
            raise ProviderConfigError(
                f"{where}unknown provider {name!r} (agent{'s' if len(agents) > 1 else ''} {', '.join(agents)}); "
                f"choose one of: {', '.join(PROVIDER_NAMES)}"
            )
    remote = [n for n in names if n != "sim"]
    chosen = getattr(args, "provider", None)
    base_url = getattr(args, "base_url", None)
    if not remote:
        # Silently ignored, they let a user believe a real API was called.
        given = [
            option
            for option, used in (
                ("--base-url", base_url is not None),
                ("--api-key-env", getattr(args, "api_key_env", None) is not None),
                ("--no-stream", getattr(args, "stream", True) is False),
                ("--no-json-mode", getattr(args, "json_mode", True) is False),
                ("--auth login", getattr(args, "auth", "key") == "login"),
                ("--request-timeout", getattr(args, "request_timeout", None) is not None),
            )
            if used
        ]
        if given:
            # (resume and rerun refuse --provider: naming it sent users
            # from one refusal to the next.)
            where = (
                "; this run's stored pipeline uses only the simulator"
                if stored
                else " (--provider openai or anthropic), not the simulator"
            )
            raise ProviderConfigError(
                f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} a real provider{where}"
            )
    if getattr(args, "json_mode", True) is False and remote and "openai" not in remote:
        # Said, not ignored: only the OpenAI API has the parameter.
        raise ProviderConfigError(
            f"--no-json-mode applies to OpenAI-compatible servers, and this pipeline uses {' and '.join(remote)}"
        )
    if base_url is not None and chosen is None and len(remote) > 1:
        raise ProviderConfigError(
            f"--base-url is ambiguous: the pipeline uses {' and '.join(remote)}; add --provider"
        )
    seed = getattr(args, "seed", None)
    configs = {}
    for name in names:
        configs[name] = resolve_provider(
            name,
            # --base-url, else the one the run was made with (resume, rerun).
            base_url=(base_url if base_url is not None else (base_urls or {}).get(name)) if name in remote else None,
            api_key_env=getattr(args, "api_key_env", None),
            token_source=(token_sources or {}).get(name),
            env=env,
            stream=getattr(args, "stream", True),
            json_mode=getattr(args, "json_mode", True),
            seed=seed if isinstance(seed, int) else 0,
            timeout=getattr(args, "request_timeout", None),
            disagreement_rate=getattr(args, "disagreement_rate", None),
            sim_latency=getattr(args, "sim_latency", None),
        )
    return configs


def providers_from_args(
    args: argparse.Namespace,
    pipeline: Pipeline,
    *,
    env: Mapping[str, str] | None = None,
    token_sources: Mapping[str, BearerSource] | None = None,
) -> dict[str, BaseProvider]:
    """Every provider the pipeline (with ``--provider``/``--model`` applied:
    see :func:`pipeline_from_args`) uses, keyed by provider name.  All are
    validated before any is built."""
    configs = provider_configs_from_args(args, pipeline, env=env, token_sources=token_sources)
    return {name: config.build() for name, config in configs.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conclave")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_serve_mock_command(subparsers)
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
