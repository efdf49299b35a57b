"""Message identity: who a message is about, independent of when it arrived.

Identity is what makes exactly-once possible: a decision is keyed by
:class:`StageKey`, an agent output by :class:`AgentKey`, and one provider call
by an :class:`AgentKey` plus its attempt number.  Randomness in the simulator
and the fault interceptor is derived from identity, never from arrival order.
"""

from __future__ import annotations

import attrs


def _refuse_part(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


# Each key checks its parts in one pass rather than with a validator per
# field (4 calls and 4 isinstance checks per AgentKey, and every message
# carries one): a plain non-empty str passes on one type test; anything
# else gets the full check, part by part in field order, so the first
# wrong one is named as before and str subclasses still pass.


@attrs.frozen(kw_only=True, slots=True, order=True)
class StageKey:
    """One stage of one branch of one run: the key of a decision."""

    run_id: str
    branch_id: str
    stage: str

    def __attrs_post_init__(self) -> None:
        if not (
            type(self.run_id) is str and self.run_id
            and type(self.branch_id) is str and self.branch_id
            and type(self.stage) is str and self.stage
        ):
            _refuse_part("run_id", self.run_id)
            _refuse_part("branch_id", self.branch_id)
            _refuse_part("stage", self.stage)

    def agent(self, agent: str) -> AgentKey:
        return AgentKey(run_id=self.run_id, branch_id=self.branch_id, stage=self.stage, agent=agent)


@attrs.frozen(kw_only=True, slots=True, order=True)
class AgentKey:
    """One agent's seat in one stage: the key of an accepted agent output."""

    run_id: str
    branch_id: str
    stage: str
    agent: str

    def __attrs_post_init__(self) -> None:
        if not (
            type(self.run_id) is str and self.run_id
            and type(self.branch_id) is str and self.branch_id
            and type(self.stage) is str and self.stage
            and type(self.agent) is str and self.agent
        ):
            _refuse_part("run_id", self.run_id)
            _refuse_part("branch_id", self.branch_id)
            _refuse_part("stage", self.stage)
            _refuse_part("agent", self.agent)

    @property
    def stage_key(self) -> StageKey:
        return StageKey(run_id=self.run_id, branch_id=self.branch_id, stage=self.stage)
