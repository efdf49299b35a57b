"""Bad provider configuration fails before any agent starts: a clear
message, exit 2, and no store written."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import pytest

from actors._anthropic import AnthropicProvider
from actors._cli import main
from actors._cli_providers import (
    add_provider_arguments,
    pipeline_from_args,
    provider_configs_from_args,
    providers_from_args,
)
from actors._openai import OpenAIProvider
from actors._pipeline import default_pipeline, parse_pipeline
from actors._provider_factory import ProviderConfig, ProviderConfigError, build_provider
from actors._simulator import SimulatedProvider
from messages import BadRequest

from tests._providers_support import SECRET, make_request


def test_build_provider_reads_the_key_from_the_given_env() -> None:
    p = build_provider("openai", env={"OPENAI_API_KEY": SECRET})
    assert isinstance(p, OpenAIProvider)
    assert str(p.base_url) == "https://api.openai.com/v1"
    assert SECRET not in repr(p)
    a = build_provider("anthropic", env={"ANTHROPIC_API_KEY": SECRET, "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"})
    assert isinstance(a, AnthropicProvider) and str(a.endpoint()) == "http://127.0.0.1:9/v1/messages"
    assert isinstance(build_provider("sim", env={}), SimulatedProvider)


def test_api_key_env_names_another_variable() -> None:
    p = build_provider("openai", api_key_env="MY_KEY", env={"MY_KEY": SECRET})
    assert isinstance(p, OpenAIProvider)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "gemini"}, "unknown provider 'gemini'; choose one of: anthropic, openai, sim"),
        ({"name": "openai", "env": {}}, "provider 'openai' needs an API key: set OPENAI_API_KEY"),
        ({"name": "anthropic", "env": {"OPENAI_API_KEY": SECRET}}, "needs an API key: set ANTHROPIC_API_KEY"),
        ({"name": "openai", "env": {"OPENAI_API_KEY": ""}}, "needs an API key"),
        ({"name": "openai", "base_url": "127.0.0.1:8000/v1", "env": {"OPENAI_API_KEY": SECRET}}, "must start with http:// or https://"),
        ({"name": "openai", "base_url": "ftp://host/v1", "env": {"OPENAI_API_KEY": SECRET}}, "must start with http"),
        ({"name": "openai", "base_url": "http:///v1", "env": {"OPENAI_API_KEY": SECRET}}, "has no host"),
        ({"name": "openai", "base_url": "http://[::1/v1", "env": {"OPENAI_API_KEY": SECRET}}, "not a valid URL"),
        ({"name": "openai", "base_url": "", "env": {"OPENAI_API_KEY": SECRET}}, "base URL is empty"),
        # Set but empty, the variable was read as unset: the key and the
        # prompts went to the public API.  (White space alone was refused,
        # without naming the variable.)
        ({"name": "openai", "env": {"OPENAI_API_KEY": SECRET, "OPENAI_BASE_URL": ""}},
         "provider 'openai': OPENAI_BASE_URL is set but empty"),
        ({"name": "openai", "env": {"OPENAI_API_KEY": SECRET, "OPENAI_BASE_URL": " "}},
         "provider 'openai': OPENAI_BASE_URL is set but empty"),
        ({"name": "anthropic", "env": {"ANTHROPIC_API_KEY": SECRET, "ANTHROPIC_BASE_URL": ""}},
         "provider 'anthropic': ANTHROPIC_BASE_URL is set but empty"),
    ],
)
def test_bad_configuration_is_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ProviderConfigError, match=None) as info:
        build_provider(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # Each failed every call as a protocol error (a non-ASCII letter of the
        # key was quoted in the error, and stored) or a ConnectError per call.
        ({"env": {"OPENAI_API_KEY": f"{SECRET}\nX"}}, "OPENAI_API_KEY is not a usable API key"),
        ({"env": {"OPENAI_API_KEY": f"{SECRET}\u00dc"}}, "OPENAI_API_KEY is not a usable API key"),
        ({"env": {"OPENAI_API_KEY": f" {SECRET}"}}, "leading or trailing space"),
        ({"env": {"OPENAI_API_KEY": "   "}}, "OPENAI_API_KEY holds only white space"),
        ({"env": {"OPENAI_API_KEY": "k"}, "base_url": "http://127.0.0.1:99999/v1"}, "has a port outside 1-65535"),
        # A key given where the variable's name goes was echoed in "set sk-...".
        ({"env": {"OPENAI_API_KEY": "k"}, "api_key_env": SECRET}, "takes the name of an environment variable"),
    ],
)
def test_unusable_keys_and_ports_are_refused_without_showing_the_key(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ProviderConfigError) as info:
        build_provider("openai", **kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)
    assert SECRET not in str(info.value)


def test_credentials_in_the_base_url_are_refused_and_not_echoed() -> None:
    with pytest.raises(ProviderConfigError) as info:
        build_provider("openai", base_url=f"https://user:{SECRET}@api.test/v1", env={"OPENAI_API_KEY": "k"})
    assert "must not carry credentials" in str(info.value)
    assert SECRET not in str(info.value)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    add_provider_arguments(parser)
    return parser.parse_args(argv)


def test_flags_override_every_agent_and_build_one_provider() -> None:
    args = _args("--provider", "openai", "--model", "m1", "--base-url", "http://127.0.0.1:1/v1")
    pipeline = pipeline_from_args(args, default_pipeline())
    assert {(s.provider, s.model) for s in pipeline.agents.values()} == {("openai", "m1")}
    providers = providers_from_args(args, default_pipeline(), env={"OPENAI_API_KEY": SECRET})
    assert list(providers) == ["openai"]
    assert str(providers["openai"].base_url) == "http://127.0.0.1:1/v1"  # type: ignore[attr-defined]


TOML = """
[agents.claude]
provider = "anthropic"
model = "claude-sonnet-4-5"
[agents.gpt_pro]
provider = "openai"
model = "gpt-5"
[[stages]]
name = "plan"
agents = ["claude", "gpt_pro", "gemini"]
"""


def test_pipeline_providers_per_agent() -> None:
    pipeline = parse_pipeline(TOML)
    env = {"OPENAI_API_KEY": SECRET, "ANTHROPIC_API_KEY": SECRET}
    providers = providers_from_args(_args(), pipeline, env=env)
    assert sorted(providers) == ["anthropic", "openai", "sim"]
    with pytest.raises(ProviderConfigError, match="--base-url is ambiguous"):
        providers_from_args(_args("--base-url", "http://127.0.0.1:1/v1"), pipeline, env=env)
    with pytest.raises(ProviderConfigError, match="ANTHROPIC_API_KEY"):
        providers_from_args(_args(), pipeline, env={"OPENAI_API_KEY": SECRET})


# -- the CLI: exit 2 before any agent starts --------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--provider", "gemini"], "unknown provider 'gemini'; choose one of"),
        (["--provider", "openai"], "needs an API key: set OPENAI_API_KEY"),
        (["--provider", "anthropic", "--base-url", "http://127.0.0.1:1"], "needs an API key: set ANTHROPIC_API_KEY"),
        (["--provider", "openai", "--base-url", "localhost:8000/v1"], "must start with http:// or https://"),
        (["--provider", "openai", "--api-key-env", "NOPE_KEY"], "set NOPE_KEY"),
        (["--base-url", "http://127.0.0.1:1/v1"], "--base-url needs a real provider"),
        # Ignored without a word, they let a user believe a real API was called.
        (["--api-key-env", "MY_KEY"], "--api-key-env needs a real provider"),
        (["--no-stream", "--request-timeout", "5"], "--no-stream, --request-timeout need a real provider"),
        (["--auth", "login"], "--auth login needs a real provider"),
        (["--no-json-mode"], "--no-json-mode needs a real provider"),
        # Only the OpenAI API has response_format: said, not ignored.
        (["--provider", "anthropic", "--no-json-mode"],
         "--no-json-mode applies to OpenAI-compatible servers, and this pipeline uses anthropic"),
    ],
)
def test_cli_bad_configuration_exits_2_before_anything_runs(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    if "localhost:8000/v1" in argv:
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    db = tmp_path / "c.db"
    code = main(["run", "--db", str(db), "--json", *argv])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("conclave: error: ") and message in err
    assert out == ""  # no run started, no progress, no JSON
    assert not db.exists()  # nothing was written: the store was never opened
    assert SECRET not in out + err


def test_cli_unknown_provider_in_pipeline_toml_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text('[agents.claude]\nprovider = "bedrock"\n[[stages]]\nname = "plan"\nagents = ["claude"]\n')
    db = tmp_path / "c.db"
    code = main(["run", "--db", str(db), "--pipeline", str(toml)])
    _, err = capsys.readouterr()
    # Named with its file, as every other problem in a pipeline file is.
    assert code == 2 and f"{toml}: unknown provider 'bedrock' (agent claude)" in err and not db.exists()


def test_cli_refuses_virtual_clock_with_real_providers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    code = main(["run", "--db", str(tmp_path / "c.db"), "--provider", "openai", "--clock", "virtual"])
    _, err = capsys.readouterr()
    assert code == 2 and "--clock real" in err


def test_serve_mock_rejects_bad_faults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve-mock", "--fault", "teapot"]) == 2
    assert "unknown fault 'teapot'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
@pytest.mark.parametrize("flag", ["--reset-seconds", "--slow-seconds"])
def test_serve_mock_rejects_seconds_that_are_not_finite(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # NaN and inf were taken, and the server died at its first 429.
    assert main(["serve-mock", flag, value]) == 2
    assert f"{flag} must be a finite number of seconds >= 0, got" in capsys.readouterr().err


def test_cli_max_concurrency_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "c.db"
    with pytest.raises(SystemExit) as exited:  # refused as argparse refuses every count
        main(["run", "--db", str(db), "--max-concurrency", "0"])
    assert exited.value.code == 2
    assert "--max-concurrency: must be at least 1, got 0" in capsys.readouterr().err and not db.exists()


def test_reprs_and_constructors_keep_url_credentials_out() -> None:
    # build_provider refused them, but the public constructors took a
    # user:password@ URL and every repr, 404 error and stored error showed it.
    with pytest.raises(ProviderConfigError, match="must not carry credentials"):
        OpenAIProvider(api_key=SECRET, base_url=f"https://user:{SECRET}@api.test/v1")
    provider = OpenAIProvider(api_key="k", base_url=f"https://api.test/v1?api-key={SECRET}")
    config = ProviderConfig(name="openai", base_url=f"https://user:{SECRET}@api.test/v1?api-key={SECRET}")
    for shown in (repr(provider), repr(config)):
        assert SECRET not in shown and "https://api.test/v1" in shown


@pytest.mark.parametrize(
    ("query", "kept"),
    [("", True), ("?api-version=2024-10-21", True), ("?key=AIzaSyQUERYSECRET1", False), ("?token=t0k3n", False),
     ("?sig=abc%2Fdef&se=2030", False), ("?code=xyz", False), ("?api_key=sk-abcdefgh", False)],
)
def test_a_base_url_with_a_query_that_may_hold_a_credential_is_not_stored(query: str, kept: bool) -> None:
    # ?key=, ?token=, ?sig= (an Azure SAS) and ?code= were kept in the
    # branch options in plain text: only key-shaped names were caught.
    from actors._cli_history import base_url_options
    from actors._provider_factory import resolve_provider

    url = "http://127.0.0.1:8000/v1" + query
    config = resolve_provider("openai", base_url=url, env={"OPENAI_API_KEY": SECRET})
    assert base_url_options({"openai": config}) == (
        {"base_urls": {"openai": url}} if kept else {"base_urls_withheld": ["openai"]}
    )


@pytest.mark.parametrize("cls", [OpenAIProvider, AnthropicProvider])
@pytest.mark.parametrize("key", [SECRET[:18] + "é" + SECRET[18:], SECRET + "\n", f" {SECRET}", "   "])
def test_a_provider_built_directly_refuses_an_unusable_key_without_showing_it(
    cls: type[OpenAIProvider] | type[AnthropicProvider], key: str
) -> None:
    # Only build_provider checked the key: built directly, every call failed
    # as a provider_bug "'ascii' codec can't encode character '\xe9' in
    # position 18" - a letter of the key and where it is, stored and shown.
    with pytest.raises(ProviderConfigError, match="api_key") as info:
        cls(api_key=key, base_url="http://x.test/v1")
    message = str(info.value)
    assert SECRET[:6] not in message and "é" not in message and "position" not in message
    assert SECRET not in repr(info.value)


@pytest.mark.parametrize("cls", [OpenAIProvider, AnthropicProvider])
@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("127.0.0.1:8000/v1", "must start with http:// or https://"),
        ("ftp://x/v1", "must start with http:// or https://"),
        ("http:///v1", "has no host"),
        ("http://a b/v1", "a host name cannot hold"),
        ("http://x.test:99999/v1", "port outside 1-65535"),
    ],
)
def test_a_provider_built_directly_refuses_a_base_url_build_provider_refuses(
    cls: type[OpenAIProvider] | type[AnthropicProvider], url: str, problem: str
) -> None:
    # Each was accepted, and every call then failed as a retryable disconnect.
    with pytest.raises(ProviderConfigError, match=problem):
        cls(api_key=SECRET, base_url=url)


def test_a_provider_needs_exactly_one_credential_said_as_a_config_error() -> None:
    with pytest.raises(ProviderConfigError, match="give exactly one of api_key and token_source"):
        OpenAIProvider(base_url="http://x.test/v1")
    with pytest.raises(ProviderConfigError, match="api_key must be a non-empty string"):
        AnthropicProvider(api_key="", base_url="http://x.test")


@pytest.mark.parametrize("url", ["http://a b/v1", "http://a%20b/v1", "http://exa mple.com"])
def test_a_base_url_whose_host_has_a_space_is_refused(url: str) -> None:
    # httpx percent-encodes it (host 'a%20b'): no server has that name.
    with pytest.raises(ProviderConfigError, match="a host name cannot hold"):
        build_provider("openai", base_url=url, env={"OPENAI_API_KEY": SECRET})
    for fine in ("http://127.0.0.1:8000/v1", "http://[::1]:8000/v1", "http://my_host.internal/v1", "https://münchen.de/v1"):
        assert isinstance(build_provider("openai", base_url=fine, env={"OPENAI_API_KEY": SECRET}), OpenAIProvider)


async def test_no_json_mode_leaves_response_format_out_for_a_server_that_refuses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A server that refuses the parameter failed every call as a bad
    # request, and the stage was decided on it: no option let the user on.
    sent: list[dict[str, object]] = []

    def server(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        if "response_format" in body:
            return httpx.Response(400, json={"error": {"message": "response_format is not supported"}})
        answer = {"choices": [{"message": {"content": '{"a": 1}'}, "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 10, "completion_tokens": 2}}
        return httpx.Response(200, json=answer)

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    pipeline = default_pipeline()
    for given, refused in ((["--provider", "openai"], True), (["--provider", "openai", "--no-json-mode"], False)):
        configs = provider_configs_from_args(_args(*given, "--no-stream"), pipeline)
        provider = configs["openai"].build(transport=httpx.MockTransport(server))
        try:
            if refused:
                with pytest.raises(BadRequest, match="response_format is not supported"):
                    await provider.complete(make_request())
            else:
                completion = await provider.complete(make_request())
                assert completion.content == '{"a": 1}'
        finally:
            await provider.aclose()
    assert ["response_format" in body for body in sent] == [True, False]
