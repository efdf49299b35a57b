"""Device-code login and logout on top of the flow and the token store."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import trio

from messages._auth_messages import AuthEvent

from ._auth_flow import DeviceAuthorization, DeviceFlow
from ._auth_profiles import AuthProfile, discover
from ._token_store import TokenEntry, TokenStore, new_entry


async def device_login(
    profile: AuthProfile,
    client: httpx.AsyncClient,
    store: TokenStore,
    *,
    clock: Callable[[], float] = time.time,
    on_event: Callable[[AuthEvent], None] | None = None,
    on_code: Callable[[DeviceAuthorization], None] | None = None,
) -> TokenEntry:
    """Run the device flow for ``profile`` and store the tokens.

    ``on_code`` is called as soon as the user code is known (show it).
    Raises :class:`~messages.LoginDenied`, :class:`~messages.LoginExpired`,
    :class:`~messages.AuthProtocolError` or
    :class:`~messages.AuthConfigError`.  If cancelled - at any await,
    including while the user has not approved yet - nothing is stored: the
    only write happens after the grant arrived, with no await before it
    that could be cancelled halfway.  A store it could not write to
    (damaged, unsafe, an unusable directory) raises
    :class:`~messages.TokenStoreError` *before* the code is asked for: it
    used to fail only after the user had approved, wasting the approval.
    """
    async with store.locked() as tokens:
        tokens.load()
    profile = await discover(profile, client)
    flow = DeviceFlow(profile, client, on_event=on_event)
    auth = await flow.start()
    if on_code is not None:
        on_code(auth)
    grant = await flow.poll(auth)
    entry = new_entry(
        profile.name,
        access_token=grant.access_token,
        refresh_token=grant.refresh_token,
        expires_in=grant.expires_in,
        scope=grant.scope or profile.scope,
        token_type=grant.token_type,
        now=clock(),
        token_url=flow.token_url,
        client_id=profile.client_id,
        client_secret=profile.client_secret,
        accept_json=profile.accept_json,
    )
    async with store.locked() as tokens:
        tokens.put(entry)
    return entry


async def logout(store: TokenStore, provider: str) -> bool:
    """Forget ``provider``'s tokens; False if there were none.

    Nothing to forget writes nothing: no home directory or lock file is
    made for it (reads need no lock; the locked step checks again)."""
    if not store.holds(provider):
        await trio.lowlevel.checkpoint()
        return False
    async with store.locked() as tokens:
        return tokens.remove(provider)
