"""Bearer tokens on demand: status, single-flight refresh, and the auth actor.

:class:`TokenManager` answers "give me a bearer token for provider P".  A
valid stored token is returned as is.  One that is within the expiry margin
(5 min, or a tenth of the token's lifetime if less) is refreshed first -
ahead of expiry - and a forced refresh (after a 401) refreshes even a
valid-looking one.  Refresh is single-flight twice over.  Within the
process, callers that need a refresh while one is under way wait for it
and share its outcome: the new token, or its error (those refreshing
ahead of time get the old token while it works); a failure that may pass
is shared with callers in the :data:`OUTAGE_REUSE` second after it too,
so a failing server is asked once per outage, not once per caller.
Across processes, the token store's ``flock``: whoever gets it second
re-reads the store and uses the token the first one obtained instead of
refreshing again (a rotated refresh token may be used only once).  The
rotated refresh token is written to the store *before* the new access
token is handed out.  ``invalid_grant`` drops the provider's tokens and
raises :class:`~messages.LoginRequired`.

:class:`AuthActor` serves :class:`~messages.GetToken` requests from an inbox
on top of a manager; :class:`TokenSource` is what a provider holds: one
provider's ``await source.bearer(force_refresh=...)``, backed either by the
actor's inbox or directly by a manager.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import httpx
import trio

from messages import Broadcast, Outbox, fail_pending, open_channel, reply_pair
from messages import ProviderError
from messages._auth_errors import (
    AuthError,
    AuthProtocolError,
    CredentialsUnavailable,
    LoginRequired,
    RefreshUnavailable,
)
from messages._auth_messages import AuthEvent, AuthEventKind, GetToken, Secret, TokenReply

from ._auth_flow import TokenGrant, refresh_grant
from ._token_store import EXPIRY_MARGIN, TokenEntry, TokenStatus, TokenStore

log = logging.getLogger("conclave.auth")
REFRESH_HTTP_TIMEOUT = httpx.Timeout(30.0)
#: For this long (trio's clock) after a refresh failed for a reason that may
#: pass, callers get that failure's outcome instead of refreshing again.
OUTAGE_REUSE = 1.0


class _Flight:
    """One refresh of one provider's token.  Every caller that needs a
    refresh while it runs waits for ``done`` and shares its ``outcome``:
    the token, the error, or ``None`` if its owner was cancelled before
    refreshing (a waiter then starts the next one).  ``entry`` is the
    stored entry it tried to refresh (the fallback while it still works)."""

    __slots__ = ("done", "entry", "outcome")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.entry: TokenEntry | None = None
        self.outcome: Secret | AuthError | None = None


def _unforeseen(provider: str, error: Exception) -> AuthError:
    """The typed failure for an error no refresh path foresaw."""
    if isinstance(error, OSError):
        return CredentialsUnavailable(
            f"the {provider} token store failed: {error.strerror or type(error).__name__}", provider=provider
        )
    return AuthProtocolError(f"refreshing the {provider} token failed: {type(error).__name__}", provider=provider)


class TokenManager:
    """Hands out bearer tokens from ``store``, refreshing through ``client``
    (``None``: a short-lived client for each refresh).

    ``clock`` is the wall clock in Unix seconds (tests pass one derived from
    ``trio.current_time()``); ``on_event`` receives ``refreshed``,
    ``refresh_failed`` and ``dropped`` events.  A refresh request is shielded
    from cancellation (for at most ``refresh_timeout`` seconds) so that a
    rotated refresh token is never lost.
    """

    def __init__(
        self,
        store: TokenStore,
        client: httpx.AsyncClient | None = None,
        *,
        clock: Callable[[], float] = time.time,
        margin: float = EXPIRY_MARGIN,
        on_event: Callable[[AuthEvent], None] | None = None,
        refresh_timeout: float = 60.0,
    ) -> None:
        self.store = store
        self._client = client
        self._clock = clock
        self._margin = margin
        self._refresh_timeout = refresh_timeout
        self._listeners: list[Callable[[AuthEvent], None]] = [on_event] if on_event is not None else []
        self._flights: dict[str, _Flight] = {}  # provider -> the refresh under way
        self._outage: dict[str, tuple[float, _Flight]] = {}  # provider -> (when, its last transient failure)
        self.refresh_count = 0  # HTTP refreshes made by this manager

    def __repr__(self) -> str:
        return f"<TokenManager {self.store!r}>"

    def status(self, provider: str) -> TokenStatus:
        entry = self.store.get(provider)
        if entry is None:
            return TokenStatus.NOT_AUTHENTICATED
        return entry.status(self._clock(), self._margin)

    def source(self, provider: str) -> TokenSource:
        """A :class:`TokenSource` calling this manager directly (no actor)."""

        async def fetch(name: str, *, force_refresh: bool = False, stale: Secret | None = None) -> Secret:
            return await self.bearer(name, force_refresh=force_refresh, stale=stale)

        return TokenSource(provider, fetch)

    def add_listener(self, listener: Callable[[AuthEvent], None]) -> None:
        """Also send events to ``listener`` (called synchronously; must not block)."""
        self._listeners.append(listener)

    def _emit(self, provider: str, kind: AuthEventKind, detail: str) -> None:
        log.info("auth %s: %s %s", provider, kind, detail)
        event = AuthEvent(provider=provider, kind=kind, at=trio.current_time(), detail=detail)
        for listener in self._listeners:
            listener(event)

    async def bearer(self, provider: str, *, force_refresh: bool = False, stale: Secret | None = None) -> Secret:
        """A bearer token for ``provider``; see the module docstring.

        ``stale`` is the token a forced refresh replaces (default: the one
        stored now); if the store already holds another valid token, that
        one is returned without a refresh.  Every failure is a
        :class:`~messages.ProviderError`, so the gateway classifies it like
        any provider failure: :class:`LoginRequired`,
        :class:`RefreshUnavailable` (retryable) or
        :class:`CredentialsUnavailable`.

        Not a checkpoint when the stored token is valid and no refresh is
        forced.  Otherwise a checkpoint; concurrent callers for one
        provider share one refresh (and its outcome).  Cancelled while
        waiting for another caller's refresh or for the store's lock:
        nothing was done.  Once the refresh request is out it is shielded,
        for at most ``refresh_timeout``: the cancellation waits for the
        answer, the rotated token is stored first, and the call may then
        return the new token rather than raise ``trio.Cancelled``.
        """
        try:
            return await self._bearer(provider, force_refresh=force_refresh, stale=stale)
        except ProviderError:
            raise
        except AuthError as error:
            raise CredentialsUnavailable(error.message, provider=provider, hint=error.hint) from None
        except OSError as error:
            raise _unforeseen(provider, error) from None

    async def _bearer(self, provider: str, *, force_refresh: bool, stale: Secret | None) -> Secret:
        entry = self.store.get(provider)
        if entry is None:
            raise LoginRequired(f"not logged in to {provider}", provider=provider, hint=f"run 'conclave login {provider}'")
        if not force_refresh and entry.status(self._clock(), self._margin) is TokenStatus.VALID:
            return entry.access_token
        seen = stale if force_refresh and stale is not None else entry.access_token
        while (flight := self._flights.get(provider)) is not None:
            # Someone is refreshing already: share that attempt's outcome
            # instead of queueing up to make the same request again (50
            # callers made 50 requests to a server answering 500, and with
            # a hanging one the last waited 10 refresh timeouts).
            await flight.done.wait()
            if flight.outcome is None:
                continue  # its caller was cancelled before refreshing
            if isinstance(flight.outcome, Secret):
                if not force_refresh or flight.outcome != seen:
                    return flight.outcome
                continue  # it handed out the very token that was rejected: refresh
            return self._after_failure(flight, flight.outcome, force_refresh)
        failed = self._outage.get(provider)
        if failed is not None and trio.current_time() < failed[0] + OUTAGE_REUSE:
            # It failed for a reason that may pass a moment ago: callers
            # that just missed that attempt share it too, rather than each
            # asking a struggling server again.
            await trio.lowlevel.checkpoint()
            assert isinstance(failed[1].outcome, AuthError)
            return self._after_failure(failed[1], failed[1].outcome, force_refresh)
        flight = _Flight()
        self._flights[provider] = flight
        try:
            # Let callers that arrive at the same moment join this flight
            # before it starts: a refresh can be over without a checkpoint
            # (an instant 500, an in-process server), and each of them
            # would then make one of its own.
            await trio.lowlevel.checkpoint()
            flight.outcome = await self._refresh_locked(provider, force_refresh, seen, flight)
        except AuthError as error:
            flight.outcome = error
            if isinstance(error, RefreshUnavailable):
                self._outage[provider] = (trio.current_time(), flight)
            return self._after_failure(flight, error, force_refresh)
        except Exception as error:
            # Unforeseen (a bug, a disk error): still one typed failure, and
            # shared - left without an outcome, as a cancelled owner's is,
            # each waiter refreshed again in turn.
            failure = _unforeseen(provider, error)
            flight.outcome = failure
            raise failure from error
        finally:
            del self._flights[provider]
            flight.done.set()
        self._outage.pop(provider, None)
        return flight.outcome

    def _after_failure(self, flight: _Flight, error: AuthError, force_refresh: bool) -> Secret:
        """What a caller of a failed refresh gets: the old token while it
        still works, if the failure may pass and the caller did not come
        because that token was rejected; else the error."""
        entry = flight.entry
        if (
            isinstance(error, RefreshUnavailable)
            and not force_refresh
            and entry is not None
            and entry.expires_at is not None
            and self._clock() < entry.expires_at
        ):
            return entry.access_token  # refresh ahead of time failed; the old one still works
        # A copy per caller: one object raised in every waiter gathered
        # all their frames in its traceback.
        raise copy.copy(error)

    async def _refresh_locked(self, provider: str, force_refresh: bool, seen: Secret, flight: _Flight) -> Secret:
        """The refresh itself, under the store's cross-process lock; only
        one task per provider runs it at a time (the ``flight``'s owner)."""
        async with self.store.locked() as tokens:
            entry = tokens.get(provider)
            if entry is None:
                raise LoginRequired(
                    f"not logged in to {provider}", provider=provider, hint=f"run 'conclave login {provider}'"
                )
            now = self._clock()
            valid = entry.status(now, self._margin) is TokenStatus.VALID
            if valid and (not force_refresh or entry.access_token != seen):
                # Valid, or another process refreshed while we waited for the lock.
                return entry.access_token
            if entry.refresh_token is None or entry.token_url is None:
                if not force_refresh and entry.expires_at is not None and now < entry.expires_at:
                    return entry.access_token  # still works, for a little while
                raise LoginRequired(
                    f"the {provider} token has expired and cannot be refreshed",
                    provider=provider,
                    hint=f"run 'conclave login {provider}'",
                )
            flight.entry = entry
            try:
                # Shielded: once the server may have rotated the refresh
                # token, cancelling would lose the only valid one.  The
                # deadline bounds how long a cancel can be held up.
                with trio.CancelScope(shield=True) as shield:
                    shield.deadline = trio.current_time() + self._refresh_timeout
                    grant = await self._refresh(entry, entry.token_url, entry.refresh_token)
                if shield.cancelled_caught:
                    raise RefreshUnavailable(
                        f"refreshing the {provider} token took longer than {self._refresh_timeout:g} s",
                        provider=provider,
                    )
            except LoginRequired:
                tokens.remove(provider)
                self._emit(provider, "dropped", "refresh token rejected; tokens dropped, log in again")
                raise
            except AuthError as error:
                self._emit(provider, "refresh_failed", error.message)
                raise
            finally:
                self.refresh_count += 1
            # No checkpoint from here to the write: a rotated refresh
            # token is always persisted once the server has sent it.
            now = self._clock()
            refreshed = TokenEntry(
                provider=provider,
                access_token=grant.access_token,
                # Rotation: a new refresh token replaces the old one; a
                # server that does not rotate leaves the old one valid.
                refresh_token=grant.refresh_token or entry.refresh_token,
                expires_at=now + grant.expires_in if grant.expires_in is not None else None,
                scope=grant.scope or entry.scope,
                stored_at=now,
                token_type=grant.token_type,
                token_url=entry.token_url,
                client_id=entry.client_id,
                client_secret=entry.client_secret,
                accept_json=entry.accept_json,
            )
            # Durable before anyone uses the new access token.
            tokens.put(refreshed)
            self._emit(provider, "refreshed", f"new token {refreshed.access_token.fingerprint()}")
            return refreshed.access_token

    async def _refresh(self, entry: TokenEntry, token_url: str, refresh_token: Secret) -> TokenGrant:
        async with contextlib.AsyncExitStack() as stack:
            client = self._client
            if client is None:  # refreshes are rare: a client for each one
                client = await stack.enter_async_context(httpx.AsyncClient(timeout=REFRESH_HTTP_TIMEOUT))
            return await refresh_grant(
                client,
                provider=entry.provider,
                token_url=token_url,
                client_id=entry.client_id,
                refresh_token=refresh_token,
                client_secret=entry.client_secret,
                accept_json=entry.accept_json,
                also_hide=[entry.access_token],
            )


Fetch = Callable[..., Awaitable[Secret]]


class TokenSource:
    """One provider's bearer tokens, for a model provider to hold.

    On a 401 the provider calls ``bearer(force_refresh=True)`` once and
    retries once; concurrent forced refreshes collapse into one."""

    __slots__ = ("_fetch", "_last", "provider")

    def __init__(self, provider: str, fetch: Fetch) -> None:
        self.provider = provider
        self._fetch = fetch
        self._last: Secret | None = None

    @classmethod
    def from_inbox(cls, provider: str, inbox: Outbox[GetToken]) -> TokenSource:
        """A source that asks the :class:`AuthActor` behind ``inbox``."""

        async def fetch(name: str, *, force_refresh: bool = False, stale: Secret | None = None) -> Secret:
            reply, pending = reply_pair(f"GetToken({name})")
            await inbox.send(GetToken(provider=name, force_refresh=force_refresh, stale=stale, reply_to=reply))
            answer: TokenReply = await pending.receive()
            if answer.error is not None:
                raise answer.error
            assert answer.token is not None
            return answer.token

        return cls(provider, fetch)

    async def bearer(self, *, force_refresh: bool = False) -> str:
        """The bearer token to send.  ``force_refresh=True`` after a 401:
        the token this source handed out last is treated as rejected.

        On a manager: :meth:`TokenManager.bearer`'s contract.  Through the
        actor: always a checkpoint; cancelled once the request is queued,
        only the answer is abandoned (the actor may still refresh); raises
        the :class:`~messages.AuthError` it answers with, or
        :class:`~messages.ActorStopped` once the actor is gone."""
        secret = await self._fetch(self.provider, force_refresh=force_refresh, stale=self._last if force_refresh else None)
        self._last = secret
        return secret.reveal()

    def __repr__(self) -> str:
        return f"<TokenSource {self.provider}>"


class AuthActor:
    """Serves :class:`GetToken` from an inbox, each request in a task of its
    own (a refresh for one provider never delays another's tokens), each
    answered exactly once: a token, a typed :class:`AuthError`, or - if the
    actor is cancelled first - a closed slot (``ActorStopped``)."""

    def __init__(self, manager: TokenManager, *, event_buffer: int = 64) -> None:
        self.manager = manager
        self._events: Broadcast[AuthEvent] = Broadcast(event_buffer)
        manager.add_listener(self._publish)

    def subscribe(self, max_buffer: int | None = None) -> trio.MemoryReceiveChannel[AuthEvent]:
        """A channel of :class:`AuthEvent` (refreshed, refresh_failed,
        dropped).  Best effort: a full subscriber misses events rather than
        slowing anyone's token request."""
        return self._events.subscribe(max_buffer)

    def _publish(self, event: AuthEvent) -> None:
        self._events.publish(event)

    async def run(self, inbox: trio.MemoryReceiveChannel[GetToken]) -> None:
        """Serve ``inbox`` until it closes and every request is answered.
        Cancelled: queued requests, and those in progress that the
        cancellation reaches, get a closed slot
        (:class:`~messages.ActorStopped`); one whose refresh is under way
        may still be answered (the refresh is shielded, see
        :meth:`TokenManager.bearer`).  The event subscriptions end."""
        try:
            async with trio.open_nursery() as nursery:
                async for request in inbox:
                    nursery.start_soon(self._serve, request)
        finally:
            fail_pending(inbox)
            self._events.close()

    async def _serve(self, request: GetToken) -> None:
        reply = request.reply_to
        try:
            token = await self.manager.bearer(
                request.provider, force_refresh=request.force_refresh, stale=request.stale
            )
        except AuthError as error:
            if reply is not None:
                reply.send(TokenReply(provider=request.provider, error=error))
            return
        except BaseException:
            if reply is not None:
                reply.close()
            raise
        if reply is not None:
            reply.send(TokenReply(provider=request.provider, token=token))


class AuthService:
    """An :class:`AuthActor` with its inbox, ready for
    ``open_orchestrator(auth=...)``: the design's gateway --GetToken--> auth
    poller edge.  ``sources`` are the providers' token sources; each asks
    the actor by message, so refreshes are single-flight through one actor
    however many calls need a token."""

    def __init__(self, manager: TokenManager, providers: Iterable[str], *, buffer: int = 64) -> None:
        self.actor = AuthActor(manager)
        self.inbox, self._receive = open_channel(buffer, name="auth")
        self.sources: dict[str, TokenSource] = {
            name: TokenSource.from_inbox(name, self.inbox) for name in providers
        }

    async def run(self) -> None:
        """Serve until :meth:`close` (or cancellation)."""
        await self.actor.run(self._receive)

    def close(self) -> None:
        self.inbox.close()

