"""The auth API modules export exactly what their ``__all__`` says (the
lead merges them into the ``actors`` and ``messages`` façades)."""

from __future__ import annotations

import importlib
import types

import pytest


@pytest.mark.parametrize("name", ["actors._auth_api", "messages._auth_api"])
def test_auth_api_matches_all(name: str) -> None:
    module = importlib.import_module(name)
    exported = set(module.__all__)
    assert len(exported) == len(module.__all__)
    public = {n for n, v in vars(module).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public == exported


def test_a_plain_string_given_for_a_secret_is_wrapped_and_never_shown() -> None:
    # TokenGrant(access_token="sk-...") kept the str, and its repr showed it.
    from actors._auth_flow import DeviceAuthorization, TokenGrant
    from actors._auth_profiles import build_profile
    from actors._token_store import TokenEntry
    from messages._auth_messages import GetToken, Secret, TokenReply

    raw = "sk-live-DoNotShowMe"
    made = [
        TokenGrant(access_token=raw, refresh_token=raw),  # type: ignore[arg-type]
        TokenEntry(provider="github", access_token=raw, refresh_token=raw, client_secret=raw, stored_at=0.0),  # type: ignore[arg-type]
        DeviceAuthorization(device_code=raw, user_code="AB", verification_uri="https://x", expires_in=5),  # type: ignore[arg-type]
        TokenReply(provider="github", token=raw),  # type: ignore[arg-type]
        GetToken(provider="github", stale=raw),  # type: ignore[arg-type]
        build_profile("generic", device_url="https://d", token_url="https://t", client_id="c", client_secret=raw),
    ]
    for thing in made:
        assert raw not in repr(thing) and raw not in str(thing), thing
    grant = made[0]
    assert isinstance(grant.access_token, Secret) and grant.access_token.reveal() == raw  # type: ignore[union-attr]
