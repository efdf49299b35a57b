"""Public auth names of the ``actors`` package (merged into its façade)."""

from ._auth_flow import DeviceAuthorization, DeviceFlow, TokenGrant, refresh_grant
from ._auth_login import device_login
from ._auth_login import logout as auth_logout
from ._auth_profiles import PROVIDERS as AUTH_PROVIDERS
from ._auth_profiles import AuthProfile, build_profile
from ._auth_profiles import discover as discover_auth_server
from ._cli_auth import add_auth_commands
from ._token_source import AuthActor, AuthService, TokenManager, TokenSource
from ._token_store import TokenEntry, TokenStatus, TokenStore, default_home

__all__ = [
    "AUTH_PROVIDERS",
    "AuthActor",
    "AuthService",
    "AuthProfile",
    "DeviceAuthorization",
    "DeviceFlow",
    "TokenEntry",
    "TokenGrant",
    "TokenManager",
    "TokenSource",
    "TokenStatus",
    "TokenStore",
    "add_auth_commands",
    "auth_logout",
    "build_profile",
    "default_home",
    "device_login",
    "discover_auth_server",
    "refresh_grant",
]
