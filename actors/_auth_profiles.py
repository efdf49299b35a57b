"""Provider profiles for device-code login.

A profile names a provider's endpoints and absorbs its deviations from
RFC 8628 (see the protocol facts): GitHub answers form-encoded unless asked
for JSON and sends a new ``interval`` with ``slow_down``; Microsoft says
``authorization_declined`` for ``access_denied`` and has a tenant in its
URLs; Google says ``verification_url`` and wants the client secret on every
token request.  The OpenAI and Anthropic endpoints are the reference's
("discovered", not documented) and are marked experimental; every field can
be overridden.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs
import httpx

from messages._auth_errors import AuthConfigError, AuthProtocolError
from messages._auth_messages import Secret, optional_secret

PROVIDERS = ("generic", "github", "microsoft", "google", "openai", "anthropic")

#: Error-code aliases every profile understands (harmless where unused).
COMMON_ERROR_ALIASES: Mapping[str, str] = MappingProxyType(
    {"authorization_declined": "access_denied"}
)


@attrs.frozen(kw_only=True, slots=True)
class AuthProfile:
    """Everything the device flow and refresh need to talk to one server."""

    name: str
    display_name: str
    device_url: str | None = None
    token_url: str | None = None
    client_id: str | None = None
    scope: str | None = None
    client_secret: Secret | None = attrs.field(default=None, repr=False, converter=optional_secret)
    issuer: str | None = None
    experimental: bool = False
    #: Send ``Accept: application/json`` (GitHub replies form-encoded otherwise).
    accept_json: bool = True
    #: Provider-specific error codes mapped onto RFC 8628 ones.
    error_aliases: Mapping[str, str] = COMMON_ERROR_ALIASES
    #: Google's device flow needs the client secret on every token request.
    requires_secret: bool = False
    #: Documentation hint shown when the client id is missing.
    client_id_hint: str = "pass --client-id"

    def canonical_error(self, code: str) -> str:
        return self.error_aliases.get(code, COMMON_ERROR_ALIASES.get(code, code))

    def require_endpoints(self) -> tuple[str, str, str]:
        """(device_url, token_url, client_id), or a clear config error."""
        if not self.client_id:
            raise AuthConfigError(
                f"{self.display_name} login needs a client id", provider=self.name, hint=self.client_id_hint
            )
        if self.requires_secret and self.client_secret is None:
            raise AuthConfigError(
                f"{self.display_name} login needs the client secret",
                provider=self.name,
                hint="set CONCLAVE_CLIENT_SECRET or pass --client-secret",
            )
        if not self.device_url or not self.token_url:
            raise AuthConfigError(
                f"{self.display_name} login needs a device URL and a token URL",
                provider=self.name,
                hint="pass --device-url and --token-url, or --issuer with RFC 8414 metadata",
            )
        return self.device_url, self.token_url, self.client_id


_BUILTIN: dict[str, AuthProfile] = {
    "generic": AuthProfile(name="generic", display_name="Generic RFC 8628 server"),
    "github": AuthProfile(
        name="github",
        display_name="GitHub",
        device_url="https://github.com/login/device/code",
        token_url="https://github.com/login/oauth/access_token",
        client_id_hint="pass --client-id of your GitHub OAuth app (device flow enabled)",
    ),
    "microsoft": AuthProfile(
        name="microsoft",
        display_name="Microsoft Entra ID",
        device_url="https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode",
        token_url="https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
        scope="openid profile offline_access",
        error_aliases=MappingProxyType(
            {"authorization_declined": "access_denied", "bad_verification_code": "bad_verification_code"}
        ),
        client_id_hint="pass --client-id of your Entra app registration",
    ),
    "google": AuthProfile(
        name="google",
        display_name="Google",
        device_url="https://oauth2.googleapis.com/device/code",
        token_url="https://oauth2.googleapis.com/token",
        scope="openid email",
        requires_secret=True,
        client_id_hint="pass --client-id (and --client-secret) of a 'TVs and Limited Input' client from console.cloud.google.com",
    ),
    "openai": AuthProfile(
        name="openai",
        display_name="OpenAI (experimental)",
        device_url="https://auth.openai.com/oauth/device",
        token_url="https://auth.openai.com/oauth/token",
        client_id="app_EMoamEEZ73f0CkXaXp7hrann",
        scope="openid profile email offline_access",
        experimental=True,
    ),
    "anthropic": AuthProfile(
        name="anthropic",
        display_name="Anthropic (experimental)",
        device_url="https://claude.ai/oauth/device",
        token_url="https://console.anthropic.com/v1/oauth/token",
        client_id="9d1c250a-e61b-44d9-88ed-5944d1962f5e",
        scope="org:create_api_key user:profile user:inference",
        experimental=True,
    ),
}


def build_profile(
    provider: str,
    *,
    device_url: str | None = None,
    token_url: str | None = None,
    client_id: str | None = None,
    scope: str | None = None,
    issuer: str | None = None,
    client_secret: str | None = None,
    tenant: str | None = None,
) -> AuthProfile:
    """The built-in profile for ``provider`` with the given overrides."""
    name = provider.strip().lower()
    base = _BUILTIN.get(name)
    if base is None:
        raise AuthConfigError(
            f"unknown provider {provider!r}", hint=f"choose one of {', '.join(PROVIDERS)}"
        )
    for label, url in (("--device-url", device_url), ("--token-url", token_url), ("--issuer", issuer)):
        if url is not None and not _is_http_url(url):
            raise AuthConfigError(f"{label} must be an http(s) URL, got {url!r}", provider=name)
    if issuer is not None and (device_url is None or token_url is None):
        # Metadata discovery fills in what was not given explicitly.
        base = attrs.evolve(base, device_url=None, token_url=None)
    profile = attrs.evolve(
        base,
        device_url=device_url or base.device_url,
        token_url=token_url or base.token_url,
        client_id=client_id or base.client_id,
        scope=scope if scope is not None else base.scope,
        issuer=issuer,
        client_secret=Secret(client_secret) if client_secret else None,
    )
    if name == "microsoft":
        tenant = tenant or "organizations"
        if "/" in tenant or not tenant.strip():
            raise AuthConfigError(f"invalid tenant {tenant!r}", provider=name)
        profile = attrs.evolve(
            profile,
            device_url=profile.device_url.replace("{tenant}", tenant) if profile.device_url else None,
            token_url=profile.token_url.replace("{tenant}", tenant) if profile.token_url else None,
        )
    return profile


def _is_http_url(url: str) -> bool:
    try:
        parsed = httpx.URL(url)
    except Exception:
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.host)


async def discover(profile: AuthProfile, client: httpx.AsyncClient) -> AuthProfile:
    """Fill missing endpoints from the issuer's RFC 8414 metadata
    (``/.well-known/oauth-authorization-server``, then OpenID discovery)."""
    if profile.issuer is None or (profile.device_url and profile.token_url):
        return profile
    issuer = profile.issuer.rstrip("/")
    parsed = httpx.URL(issuer)
    path = parsed.path.rstrip("/")
    candidates = [
        # RFC 8414 §3: the well-known segment goes between host and path.
        str(parsed.copy_with(path="/.well-known/oauth-authorization-server" + path)),
        issuer + "/.well-known/openid-configuration",
    ]
    last = "no metadata document"
    for url in candidates:
        try:
            response = await client.get(url, headers={"Accept": "application/json"})
        except httpx.RequestError as exc:  # a garbled body (DecodingError) too
            raise AuthProtocolError(
                f"could not fetch metadata from {url}: {type(exc).__name__}", provider=profile.name
            ) from None
        if response.status_code != 200:
            last = f"{url} answered {response.status_code}"
            continue
        try:
            metadata: Any = response.json()
        except (ValueError, RecursionError):  # RecursionError: deeply nested ``[[[[...``
            last = f"{url} is not JSON"
            continue
        if not isinstance(metadata, dict):
            last = f"{url} is not a JSON object"
            continue
        named = metadata.get("issuer")
        if isinstance(named, str) and named.rstrip("/") != issuer:
            # RFC 8414 §3.3: metadata for another issuer must not be used
            # (a mix-up: this issuer's users would log in elsewhere).
            raise AuthConfigError(
                f"the metadata at {url} is for issuer {named!r}, not {issuer!r}", provider=profile.name
            )
        found = {
            "device_authorization_endpoint": profile.device_url or metadata.get("device_authorization_endpoint"),
            "token_endpoint": profile.token_url or metadata.get("token_endpoint"),
        }
        for field, value in found.items():
            # It said "no device authorization endpoint" when the token
            # endpoint was the one missing, and a relative or file: URL
            # failed later as "could not reach".  A control character
            # (httpx refuses only ASCII ones: a C1 CSI or a bidi override
            # passed) reached the terminal raw in that message and others.
            if not isinstance(value, str) or not _is_http_url(value) or not value.isprintable():
                raise AuthConfigError(
                    f"the metadata at {url} names no usable {field} (got {value!r})",
                    provider=profile.name,
                    hint="pass --device-url and --token-url",
                )
        return attrs.evolve(
            profile, device_url=found["device_authorization_endpoint"], token_url=found["token_endpoint"]
        )
    raise AuthConfigError(
        f"no authorization server metadata for issuer {issuer} ({last})", provider=profile.name
    )
