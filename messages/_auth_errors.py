"""Typed errors of device-code login, the token store and token refresh.

Messages name the provider and what to do next; they never contain token
text.  Errors a model provider can meet while asking for a bearer token are
also :class:`~messages.ProviderError` subclasses, so the gateway and the
agent's retry logic classify them like any other provider failure:
:class:`LoginRequired` is an :class:`~messages.AuthenticationFailed` (never
retried) and :class:`RefreshUnavailable` a
:class:`~messages.ProviderUnavailable` (retried with backoff).
"""

from __future__ import annotations

from typing import ClassVar

from ._errors import AuthenticationFailed, ConclaveError, ProviderUnavailable


class AuthError(ConclaveError):
    """Base of every auth failure.  ``exit_code`` is the CLI's exit status."""

    kind: ClassVar[str] = "auth_error"
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, provider: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class AuthConfigError(AuthError):
    """Bad input: an unknown provider, a missing client id or URL."""

    kind = "config"
    exit_code = 2


class LoginDenied(AuthError):
    """The user (or the server) refused the authorization request."""

    kind = "denied"
    exit_code = 4


class LoginExpired(AuthError):
    """The device code expired before the user approved it."""

    kind = "expired"
    exit_code = 5


class AuthProtocolError(AuthError):
    """The authorization server answered with an error the flow cannot
    continue from, or with a body that is not a valid OAuth response."""

    kind = "protocol"


class TokenStoreError(AuthError):
    """The token store is unsafe (symlink, readable by others), corrupt,
    written by a newer Conclave, or locked for too long."""

    kind = "token_store"


class LoginRequired(AuthError, AuthenticationFailed):
    """No usable token: never logged in, logged out, expired without a
    refresh token, or the refresh token was rejected (``invalid_grant``, the
    stored tokens were dropped).  Only a new ``conclave login`` helps."""

    kind = "login_required"


class RefreshUnavailable(AuthError, ProviderUnavailable):
    """A refresh failed for a reason that may pass (network error, 5xx);
    the stored tokens are kept and a later call may try again."""

    kind = "refresh_unavailable"


class CredentialsUnavailable(AuthError, AuthenticationFailed):
    """A bearer token could not be produced for a reason a new login does
    not obviously fix: the token store is unsafe or unreadable, a refreshed
    token could not be saved, or the server refused the refresh with an
    error other than ``invalid_grant``.  Not retried."""

    kind = "credentials"
