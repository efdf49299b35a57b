"""Message identity: who a message is about, independent of when it arrived.

Identity is what makes exactly-once possible: a decision is keyed by
:class:`StageKey`, an agent output by :class:`AgentKey`, and one provider call
by an :class:`AgentKey` plus its attempt number.  Randomness in the simulator
and the fault interceptor is derived from identity, never from arrival order.
"""

from __future__ import annotations

import attrs


def _non_empty(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string, got {value!r}")


@attrs.frozen(kw_only=True, slots=True, order=True)
class StageKey:
    """One stage of one branch of one run: the key of a decision."""

    run_id: str = attrs.field(validator=_non_empty)
    branch_id: str = attrs.field(validator=_non_empty)
    stage: str = attrs.field(validator=_non_empty)

    def agent(self, agent: str) -> AgentKey:
        return AgentKey(run_id=self.run_id, branch_id=self.branch_id, stage=self.stage, agent=agent)


@attrs.frozen(kw_only=True, slots=True, order=True)
class AgentKey:
    """One agent's seat in one stage: the key of an accepted agent output."""

    run_id: str = attrs.field(validator=_non_empty)
    branch_id: str = attrs.field(validator=_non_empty)
    stage: str = attrs.field(validator=_non_empty)
    agent: str = attrs.field(validator=_non_empty)

    @property
    def stage_key(self) -> StageKey:
        return StageKey(run_id=self.run_id, branch_id=self.branch_id, stage=self.stage)
