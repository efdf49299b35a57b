"""The public names of the model-provider layer (issue 7).

The ``actors`` façade re-exports ``__all__`` from here.
"""

from ._anthropic import DEFAULT_ANTHROPIC_BASE_URL, AnthropicProvider
from ._http_errors import error_from_status, error_from_transport, parse_reset_hint, redact
from ._http_provider import BearerSource, HttpProvider
from ._mock_backend import FaultRule, MockBackend, MockConfigError
from ._mock_server import mock_transport, serve_mock
from ._openai import DEFAULT_OPENAI_BASE_URL, OpenAIProvider
from ._provider_factory import (
    PROVIDER_NAMES,
    ProviderConfig,
    ProviderConfigError,
    build_provider,
    resolve_provider,
    validate_base_url,
)
from ._usage_normalise import usage_from_anthropic, usage_from_gemini, usage_from_openai

__all__ = [
    "DEFAULT_ANTHROPIC_BASE_URL",
    "DEFAULT_OPENAI_BASE_URL",
    "PROVIDER_NAMES",
    "AnthropicProvider",
    "BearerSource",
    "FaultRule",
    "HttpProvider",
    "MockBackend",
    "MockConfigError",
    "OpenAIProvider",
    "ProviderConfig",
    "ProviderConfigError",
    "build_provider",
    "error_from_status",
    "error_from_transport",
    "mock_transport",
    "parse_reset_hint",
    "redact",
    "resolve_provider",
    "serve_mock",
    "usage_from_anthropic",
    "usage_from_gemini",
    "usage_from_openai",
    "validate_base_url",
]
