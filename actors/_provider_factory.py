"""Provider configuration: validated in full before anything runs.

``build_provider("openai" | "anthropic" | "sim", ...)`` is the one way the
CLI (and embedders) make providers.  Everything that can be wrong - an
unknown provider, a missing key, a malformed base URL - raises
:class:`ProviderConfigError` here, before any agent starts, with a message
that names the problem and never the secret.

Environment variables are read only here, at the edge, and only from the
``env`` mapping given (``os.environ`` by default): ``OPENAI_API_KEY`` /
``ANTHROPIC_API_KEY`` (or the variable ``api_key_env`` names) and, as the
official clients do, ``OPENAI_BASE_URL`` / ``ANTHROPIC_BASE_URL``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import attrs
import httpx

from ._anthropic import DEFAULT_ANTHROPIC_BASE_URL, AnthropicProvider
from ._http_provider import (
    DEFAULT_TIMEOUT,
    KEY_ENV,
    BearerSource,
    ProviderConfigError,
    key_problem,
    shown_url,
    validate_base_url,
)
from ._openai import DEFAULT_OPENAI_BASE_URL, OpenAIProvider
from ._provider import BaseProvider
from ._simulator import Latency, SimulatedProvider

PROVIDER_NAMES = ("anthropic", "openai", "sim")
BASE_URL_ENV = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL"}
DEFAULT_BASE_URL = {"openai": DEFAULT_OPENAI_BASE_URL, "anthropic": DEFAULT_ANTHROPIC_BASE_URL}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@attrs.frozen(kw_only=True)
class ProviderConfig:
    """A validated provider configuration; :meth:`build` makes the provider.
    Secrets are kept out of the repr."""

    name: str
    # Shown without userinfo or query: either may hold a secret.
    base_url: str | None = attrs.field(default=None, repr=lambda url: repr(url if url is None else shown_url(url)))
    api_key: str | None = attrs.field(default=None, repr=False)
    token_source: BearerSource | None = attrs.field(default=None, repr=False)
    model: str | None = None
    stream: bool = True
    # OpenAI only: ask for JSON output (response_format) when a stage names
    # fields.  Off for servers that refuse the parameter with a 400.
    json_mode: bool = True
    seed: int = 0
    timeout: float | None = None
    disagreement_rate: float | None = None  # sim only; None: the simulator's default
    sim_latency: float | None = None  # sim only: median seconds; None: the simulator's default

    @property
    def remote(self) -> bool:
        """Whether calls leave the process (and so need the real clock)."""
        return self.name != "sim"

    def build(self, *, transport: httpx.AsyncBaseTransport | None = None) -> BaseProvider:
        if self.name == "sim":
            options: dict[str, Any] = {}
            if self.disagreement_rate is not None:
                options["disagreement_rate"] = self.disagreement_rate
            if self.sim_latency is not None:
                options["latency"] = Latency(median=self.sim_latency)
            return SimulatedProvider(seed=self.seed, **options)
        timeout = DEFAULT_TIMEOUT if self.timeout is None else httpx.Timeout(self.timeout, connect=min(5.0, self.timeout))
        common = dict(
            api_key=self.api_key,
            token_source=self.token_source,
            transport=transport,
            timeout=timeout,
            stream=self.stream,
            model=self.model,
        )
        assert self.base_url is not None
        if self.name == "openai":
            return OpenAIProvider(base_url=self.base_url, json_mode=self.json_mode, **common)
        return AnthropicProvider(base_url=self.base_url, **common)  # type: ignore[arg-type]


def resolve_provider(
    name: str,
    *,
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    api_key_env: str | None = None,
    token_source: BearerSource | None = None,
    env: Mapping[str, str] | None = None,
    stream: bool = True,
    json_mode: bool = True,
    seed: int = 0,
    timeout: float | None = None,
    disagreement_rate: float | None = None,
    sim_latency: float | None = None,
) -> ProviderConfig:
    """Validate a provider's configuration without building anything."""
    if name not in PROVIDER_NAMES:
        raise ProviderConfigError(f"unknown provider {name!r}; choose one of: {', '.join(PROVIDER_NAMES)}")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise ProviderConfigError(f"provider {name!r}: the model name is empty")
    if timeout is not None and not timeout > 0:
        raise ProviderConfigError(f"provider {name!r}: the request timeout must be positive, got {timeout!r}")
    if name == "sim":
        return ProviderConfig(
            name=name, seed=seed, model=model, disagreement_rate=disagreement_rate, sim_latency=sim_latency
        )
    environ: Mapping[str, str] = os.environ if env is None else env
    url = base_url
    if url is None:
        variable = BASE_URL_ENV[name]
        url = environ.get(variable)
        if url is not None and not url.strip():
            # Set but empty ('export OPENAI_BASE_URL=' meant for a local
            # server) fell back to the public API, sending the key and the
            # prompts there; only white space was refused.
            raise ProviderConfigError(
                f"provider {name!r}: {variable} is set but empty; give the server's base URL, "
                f"or unset it to use {DEFAULT_BASE_URL[name]}"
            )
        if url is None:
            url = DEFAULT_BASE_URL[name]
    url = validate_base_url(url, provider=name)
    if api_key_env is not None and not _ENV_NAME.fullmatch(api_key_env):
        # Never echoed: a key given here by mistake would be printed.
        raise ProviderConfigError(
            f"provider {name!r}: --api-key-env takes the name of an environment variable "
            "(letters, digits and _), not the key itself"
        )
    variable = "the API key"
    if token_source is None and not api_key:
        variable = api_key_env or KEY_ENV[name]
        api_key = environ.get(variable) or None
        if api_key is None:
            raise ProviderConfigError(
                f"provider {name!r} needs an API key: set {variable} "
                f"(any non-empty value for a local server such as serve-mock)"
            )
    if token_source is None and api_key is not None:
        problem = key_problem(api_key, variable)
        if problem is not None:
            raise ProviderConfigError(f"provider {name!r}: {problem}")
    return ProviderConfig(
        name=name,
        base_url=url,
        api_key=None if token_source is not None else api_key,
        token_source=token_source,
        model=model,
        stream=stream,
        json_mode=json_mode,
        seed=seed,
        timeout=timeout,
    )


def build_provider(
    name: str,
    *,
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    api_key_env: str | None = None,
    token_source: BearerSource | None = None,
    env: Mapping[str, str] | None = None,
    stream: bool = True,
    seed: int = 0,
    timeout: float | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> BaseProvider:
    """Validate, then build, one provider.  ``model`` (optional) forces the
    model of every call; otherwise each agent's model is used."""
    config = resolve_provider(
        name,
        model=model,
        base_url=base_url,
        api_key=api_key,
        api_key_env=api_key_env,
        token_source=token_source,
        env=env,
        stream=stream,
        seed=seed,
        timeout=timeout,
    )
    return config.build(transport=transport)
