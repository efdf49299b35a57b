"""Public auth names of the ``messages`` package (merged into its façade)."""

from ._auth_errors import (
    AuthConfigError,
    AuthError,
    AuthProtocolError,
    CredentialsUnavailable,
    LoginDenied,
    LoginExpired,
    LoginRequired,
    RefreshUnavailable,
    TokenStoreError,
)
from ._auth_messages import AuthEvent, AuthEventKind, GetToken, Secret, TokenReply

__all__ = [
    "AuthConfigError",
    "AuthError",
    "AuthEvent",
    "AuthEventKind",
    "AuthProtocolError",
    "CredentialsUnavailable",
    "GetToken",
    "LoginDenied",
    "LoginExpired",
    "LoginRequired",
    "RefreshUnavailable",
    "Secret",
    "TokenReply",
    "TokenStoreError",
]
