"""open_orchestrator(auth=...) runs the auth actor beside the gateway: the
providers' token sources ask it by message (the design's GetToken edge)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from actors import (
    AuthService,
    MockProvider,
    SimulatedProvider,
    TokenEntry,
    TokenManager,
    TokenStore,
    open_orchestrator,
)
from messages import Completion, CompletionRequest, Secret

TOKEN = "tok-runtime-test"


async def test_providers_get_tokens_from_the_auth_actor(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = TokenStore(tmp_path / "home")
    async with store.locked() as tokens:
        tokens.put(TokenEntry(provider="sim", access_token=Secret(TOKEN), stored_at=0.0))
    auth = AuthService(TokenManager(store), ["sim"])
    sim = SimulatedProvider(seed=1, disagreement_rate=0.0)
    seen: list[str] = []

    async def needs_a_token(request: CompletionRequest) -> Completion:
        seen.append(await auth.sources["sim"].bearer())
        return sim.answer(request)

    with trio.fail_after(600):  # virtual seconds: without the actor, bearer() never answers
        async with open_orchestrator(
            store=str(tmp_path / "c.db"), provider=MockProvider(needs_a_token, name="sim"), auth=auth
        ) as orch:
            result = await orch.run("SPEC-AUTH")
    assert result.completed
    assert seen and set(seen) == {TOKEN}
    assert TOKEN not in repr(auth.sources["sim"]) and TOKEN not in repr(result)
