"""Auth messages: the gateway asks the auth actor for bearer tokens, and the
auth actor tells subscribers what login and refresh are doing.

    gateway/provider --GetToken--> auth actor --TokenReply--> (reply slot)
    auth actor --AuthEvent--> subscribers

Token text only ever travels inside a :class:`Secret`, whose ``repr`` and
``str`` are masked, so no message, log line or traceback shows it.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal, NoReturn, final

import attrs

from ._auth_errors import AuthError
from ._channel import Reply

@final
class Secret:
    """A string that does not show itself.

    ``repr``/``str``/``format`` print ``Secret('***')``; :meth:`reveal` is the
    one explicit way out.  Equality is constant-time; secrets cannot be
    pickled (so they cannot leak into caches or process pools by accident).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ValueError("a secret must be a non-empty string")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def fingerprint(self) -> str:
        """A short digest for logs: tells tokens apart without showing them."""
        return hashlib.sha256(self._value.encode()).hexdigest()[:8]

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> NoReturn:
        raise TypeError("secrets cannot be pickled")


def secret(value: Secret | str) -> Secret:
    """attrs converter for a secret field: a plain ``str`` given by mistake
    is wrapped, so it never shows in a repr (``Secret`` itself checks it)."""
    return value if isinstance(value, Secret) else Secret(value)


def optional_secret(value: Secret | str | None) -> Secret | None:
    """:func:`secret` for a field that may be ``None``."""
    return None if value is None else secret(value)


AuthEventKind = Literal[
    "code_issued",
    "pending",
    "slow_down",
    "backoff",
    "logged_in",
    "denied",
    "expired",
    "failed",
    "refreshed",
    "refresh_failed",
    "dropped",
    "logged_out",
]


@attrs.frozen(kw_only=True, slots=True)
class TokenReply:
    """Auth actor -> requester: a bearer token, or why there is none.
    Exactly one of ``token`` and ``error`` is set."""

    provider: str
    token: Secret | None = attrs.field(default=None, converter=optional_secret)
    error: AuthError | None = None

    def __attrs_post_init__(self) -> None:
        if (self.token is None) == (self.error is None):
            raise ValueError("exactly one of token and error must be set")


@attrs.frozen(kw_only=True, slots=True)
class GetToken:
    """Gateway/provider -> auth actor: a bearer token for ``provider``.

    ``force_refresh`` asks for a refresh even if the stored token looks
    valid: the provider just answered 401 with it.  Concurrent forced
    refreshes collapse into one."""

    provider: str
    force_refresh: bool = False
    #: The token the provider rejected, if known: a forced refresh is
    #: skipped when the stored token is already a different, valid one.
    stale: Secret | None = attrs.field(default=None, repr=False, converter=optional_secret)
    reply_to: Reply[TokenReply] | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(kw_only=True, slots=True)
class AuthEvent:
    """Auth actor/poller -> subscribers: what a login or refresh is doing.

    ``user_code`` and the URIs are set for ``code_issued`` (they are meant to
    be shown); ``interval`` is the current poll interval in seconds; ``at``
    is ``trio.current_time()``.  Never carries a token."""

    provider: str
    kind: AuthEventKind
    at: float
    detail: str = ""
    user_code: str | None = None
    verification_uri: str | None = None
    verification_uri_complete: str | None = None
    interval: float | None = None
