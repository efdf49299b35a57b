"""Scale: a 2,000-agent stage completes without deadlock (see the buffer and
cycle argument in actors/_runtime.py)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from actors import Latency, SimulatedProvider, open_orchestrator, pipeline_with_panel
from store import Store


async def test_two_thousand_agents_in_one_stage(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    agents = [f"a{i:04d}" for i in range(2000)]
    pipeline = pipeline_with_panel("validate", agents)
    path = str(tmp_path / "scale.db")
    provider = SimulatedProvider(seed=5, disagreement_rate=0.0, latency=Latency(median=1.0))
    async with open_orchestrator(store=path, provider=provider, pipeline=pipeline, seed=5) as orch:
        result = await orch.run("SPEC-SCALE", run_id="scale")
    assert result.completed
    (stage,) = result.stages
    assert stage.status == "ok" and len(stage.agents) == 2000 and stage.missing_agents == ()
    assert result.turns == 2000
    with Store.open(path) as s:
        assert len(s.outputs("scale", accepted_only=True)) == 2000
        assert len(s.decisions("scale")) == 1
