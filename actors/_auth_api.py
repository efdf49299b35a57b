"""Public auth names of the ``actors`` package (merged into its façade)."""

from ._auth_flow import DeviceAuthorization, DeviceFlow, TokenGrant, refresh_grant
from ._auth_login import device_login, logout
from ._auth_profiles import PROVIDERS, AuthProfile, build_profile, discover
from ._cli_auth import add_auth_commands
from ._token_source import AuthActor, TokenManager, TokenSource
from ._token_store import TokenEntry, TokenStatus, TokenStore, default_home

__all__ = [
    "PROVIDERS",
    "AuthActor",
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
    "build_profile",
    "default_home",
    "device_login",
    "discover",
    "logout",
    "refresh_grant",
]
