"""The consensus coordinator: drives one run's stages, decides each once.

For each stage it dispatches :class:`~messages.AgentRequest`s (one after
another for a sequential stage, each later agent seeing the earlier
answers; all at once for a parallel stage), collects exactly one reply per
agent - dropping duplicates and late replies by identity - computes the
verdict, and makes the decision durable before the stage advances.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from messages import (
    AgentFinished,
    AgentOutput,
    AgentReply,
    AgentRequest,
    ConclaveError,
    Decision,
    Outbox,
    PersistDecision,
    PersistEvent,
    PriorOutput,
    ProgressEvent,
    ProviderError,
    StageDecided,
    StageKey,
    StageStarted,
    StoreWrite,
    reply_pair,
    request,
)

from ._agent import for_later_agents
from ._classify import classify
from ._consensus import ADVANCING, Verdict, compute_verdict
from ._pipeline import StageSpec
from ._resume import USER_FIXABLE, stored_error
from ._sequencer import DecisionSequencer

if TYPE_CHECKING:
    from ._resume import StageResume


class DecisionNotDurable(ConclaveError):
    """The store refused a decision: the stage cannot advance."""


class AnswerNotStored(ConclaveError):
    """An agent's reply carried an output the store does not hold: an
    interceptor answered its request (or rewrote its reply) with one.  A
    decision reads only stored outputs (a resume must decide alike), so
    deciding without it would contradict what the reply reported."""

    def __init__(self, stage: str, agents: Sequence[str]) -> None:
        self.stage = stage
        self.agents = tuple(agents)
        super().__init__(
            f"stage {stage!r}: the replies of {', '.join(self.agents)} carry outputs the store does not hold "
            "(made by an interceptor on the agent or coordinator channel?); a decision reads only stored "
            "outputs, so an interceptor may answer an agent's request with a failure, not with an output"
        )


class StageUnanswered(ConclaveError):
    """A stage could not be decided because agents failed on errors that
    may pass (a provider down, rate limits, timeouts) after their retries,
    or that the user can fix (a wrong key, a spent quota).  Deciding "no
    consensus" on their silence would be final - a resume could not ask
    them again - so the stage stays undecided and the run halts resumable,
    as with a spent budget."""

    def __init__(self, stage: str, failures: Mapping[str, str]) -> None:
        self.stage = stage
        self.failures = dict(failures)
        # A few named, not all: with a wide panel the one-line message ran to
        # 45 KB (every agent, each with its error); the halt event and the
        # gave_up events hold them all.
        named = list(self.failures.items())
        shown = "; ".join(f"{agent}: {error}" for agent, error in named[:SHOWN_FAILURES])
        if len(named) > SHOWN_FAILURES:
            shown += f"; and {len(named) - SHOWN_FAILURES} more (their gave_up events name them)"
        # Not "after their retries": a wrong key, a server's x-should-retry:
        # false, --max-attempts 1 or a reset past max_wait end on the first
        # attempt, and the words sent users looking for a retry limit to
        # raise.  The retry and gave_up events say how each ended.
        super().__init__(f"{len(self.failures)} agent(s) failed ({shown})")


SHOWN_FAILURES = 5


def _not_the_answers_fault(error: ProviderError) -> bool:
    """Whether a failed agent may answer once asked again: the error may
    pass, or the user can fix it outside the run.  A wrong API key was
    decided durably as no_consensus ("only 0 agent(s) agree"), naming no
    cause, and fixing the key could not resume the run."""
    verdict = classify(error)
    return verdict.retryable or verdict.kind in USER_FIXABLE


@attrs.frozen(kw_only=True, slots=True)
class RunContext:
    """Which run and branch a coordinator decides for, and the spec and
    goal its agents are asked about."""

    run_id: str
    branch_id: str
    spec_id: str
    goal: str


Publish = Callable[[ProgressEvent], None]
# Awaited before dispatching (the budget gate, issue 4); raises to stop the run.
DispatchGate = Callable[[StageKey, tuple[str, ...]], Awaitable[None]]


def _no_progress(event: ProgressEvent) -> None:
    pass


@attrs.define(kw_only=True, eq=False)
class Coordinator:
    """The consensus coordinator of one run (see the module docstring):
    one stage at a time, from one task; ``late_replies`` and
    ``duplicate_replies`` count the replies it dropped by identity."""

    ctx: RunContext
    agents: Mapping[str, Outbox[AgentRequest]]
    replies_to: Outbox[AgentReply]
    replies: trio.MemoryReceiveChannel[AgentReply]
    store: Outbox[StoreWrite]
    sequencer: DecisionSequencer = attrs.field(factory=DecisionSequencer)
    publish: Publish = _no_progress
    gate: DispatchGate | None = None
    # The lineage-aware read of a stage's accepted outputs (the runtime
    # passes the store's); None: decide on the replies as received.
    durable_outputs: Callable[[StageKey], Mapping[str, AgentOutput]] | None = None
    # False: a replay that must write nothing (a resume that can only halt
    # again the way the branch halted).
    record: bool = True
    # The gates and breakers as a resume or rerun would take them up (see
    # Orchestrator._health_snapshot), kept with each stage's start.
    health: Callable[[], dict[str, Any] | None] | None = None
    late_replies: int = 0
    duplicate_replies: int = 0
    # The current stage's agents that gave up, with their errors.
    _failures: dict[str, str] = attrs.field(factory=dict, init=False)

    def stage_key(self, stage: str) -> StageKey:
        return StageKey(run_id=self.ctx.run_id, branch_id=self.ctx.branch_id, stage=stage)

    async def run_stage(
        self, stage: StageSpec, resume: StageResume | None = None
    ) -> tuple[Decision, dict[str, AgentOutput]]:
        """Dispatch, collect, decide.  Returns the durable decision and the
        accepted outputs it was made on.  ``resume`` (after a crash) names
        the agents whose durable answers are replayed instead of bought
        again, and where the others' attempt numbering continues.

        A checkpoint.  Raises :class:`StageUnanswered` (nothing decided)
        when agents failed on errors that may pass, whatever the gate
        raises (:class:`BudgetExceeded`), :class:`DecisionNotDurable`, and
        :class:`~messages.ActorStopped` when an agent or the store writer
        has stopped.  Cancelled: see :meth:`collect` and :meth:`decide`; the
        stage may be decided durably or not - a retry recognises it."""
        key = self.stage_key(stage.name)
        self.publish(StageStarted(key=key, agents=stage.agents, mode=stage.mode))
        # Eager: no schedule point between starting the agents and handing
        # them their requests, so each finds its request on its first step.
        if self.record:
            detail: dict[str, Any] = {"agents": list(stage.agents), "mode": stage.mode}
            health = self.health() if self.health is not None else None
            if health is not None:
                detail["health"] = health
            await self.store.send_eager(
                PersistEvent(
                    run_id=key.run_id,
                    branch_id=key.branch_id,
                    kind="stage_start",
                    stage=stage.name,
                    detail=detail,
                )
            )
        self._failures = {}
        outputs = await self.collect(stage, key, resume)
        if self.durable_outputs is not None:
            # Consensus reads what is durable on this branch's lineage (every
            # reply's output was acked durable before it was sent).
            heard = outputs
            outputs = dict(self.durable_outputs(key))
            unstored = [agent for agent in heard if agent not in outputs]
            if unstored:
                # An interceptor's answer: the decision counted the agent
                # missing while progress said it had answered, without a word.
                raise AnswerNotStored(stage.name, unstored)
        verdict = compute_verdict(stage, outputs)
        if verdict.status not in ADVANCING:
            passing = {
                agent: error
                for agent, error in self._failures.items()
                if agent not in outputs and _not_the_answers_fault(stored_error(error))
            }
            if passing:
                raise StageUnanswered(stage.name, passing)
        return await self.decide(key, verdict), outputs

    async def collect(
        self, stage: StageSpec, key: StageKey, resume: StageResume | None = None
    ) -> dict[str, AgentOutput]:
        """Dispatch ``stage``'s agents (through the gate, before each
        sequential agent or once before a parallel batch) and wait for one
        reply from each: their accepted outputs, by agent.  Replayed agents
        of ``resume`` are not asked.

        A checkpoint.  Cancelled: requests already dispatched stay with
        their agents, which finish them (outputs stored); replies that
        come later are dropped as late.  Raises what the gate raises, and
        :class:`~messages.ActorStopped` when an agent has stopped."""
        outputs: dict[str, AgentOutput] = {}
        replay = resume.replay if resume is not None else {}
        first = resume.first_attempt if resume is not None else {}
        waits = resume.first_wait if resume is not None else {}
        if stage.mode == "parallel":
            live = [a for a in stage.agents if a not in replay]
            # Once: the batch goes out together.  A resumed stage with an
            # attempt on record went out before the crash, past its check:
            # checking again, against spend that now holds the answers
            # bought since, would stop what the uninterrupted run sent.
            if self.gate is not None and live and resume is None:
                await self.gate(key, tuple(live))
            for agent in live:
                await self._dispatch(key, agent, (), first.get(agent, 1), waits.get(agent, 0.0))
            for agent in stage.agents:
                if agent in replay:
                    self._accept(replay[agent], outputs)
            await self._await_replies(key, set(live), outputs)
        else:
            # Each agent is shown its predecessors' answers in panel order.
            # Outputs arrive in that order (one agent at a time), so the list
            # grows by one PriorOutput per answer: rebuilding it per agent
            # made an N-agent stage cost N**2 / 2 messages.
            priors: list[PriorOutput] = []
            for agent in stage.agents:
                if agent in replay:
                    self._accept(replay[agent], outputs)
                else:
                    if self.gate is not None:
                        await self.gate(key, (agent,))
                    await self._dispatch(key, agent, tuple(priors), first.get(agent, 1), waits.get(agent, 0.0))
                    await self._await_replies(key, {agent}, outputs)
                output = outputs.get(agent)
                if output is not None:
                    priors.append(PriorOutput(agent=agent, content=for_later_agents(output.content)))
        return outputs

    async def _dispatch(
        self,
        key: StageKey,
        agent: str,
        context: tuple[PriorOutput, ...],
        first_attempt: int = 1,
        first_wait: float = 0.0,
    ) -> None:
        request = AgentRequest(
            key=key.agent(agent),
            spec_id=self.ctx.spec_id,
            goal=self.ctx.goal,
            context=context,
            first_attempt=first_attempt,
            first_wait=first_wait,
            reply_to=self.replies_to,
        )
        # Each agent holds at most one request of ours, so its inbox (buffer
        # 1) always has room: this send never blocks, and needs no
        # scheduling round of its own.
        await self.agents[agent].send_eager(request)

    async def _await_replies(
        self, key: StageKey, waiting: set[str], outputs: dict[str, AgentOutput]
    ) -> None:
        while waiting:
            self._take(await self.replies.receive(), key, waiting, outputs)
            # Replies already queued are taken in the same step: a receive()
            # each would cost a scheduling round per agent.
            while waiting:
                try:
                    reply = self.replies.receive_nowait()
                except trio.WouldBlock:
                    break
                self._take(reply, key, waiting, outputs)

    def _take(
        self, reply: AgentReply, key: StageKey, waiting: set[str], outputs: dict[str, AgentOutput]
    ) -> None:
        agent = reply.key.agent
        if reply.key.stage_key != key:
            self.late_replies += 1  # a reply for a stage already decided
        elif agent not in waiting:
            self.duplicate_replies += 1
        else:
            waiting.discard(agent)
            self._accept(reply, outputs)

    def _accept(self, reply: AgentReply, outputs: dict[str, AgentOutput]) -> None:
        if reply.output is not None:
            outputs[reply.key.agent] = reply.output
        elif reply.error is not None:
            self._failures[reply.key.agent] = reply.error
        self.publish(
            AgentFinished(
                key=reply.key,
                attempts=reply.attempts,
                ok=reply.output is not None,
                error=reply.error,
                replayed=reply.replayed,
            )
        )

    async def decide(self, key: StageKey, verdict: Verdict) -> Decision:
        """Make the one decision of ``key`` durable.

        Exactly once: the sequencer refuses a decided key and serialises
        decisions; the ticket is acked only after the store's ack, and every
        other exit (halted store, error, cancellation) cancels it, so the
        next attempt - or the next stage - is never blocked.  A decision
        that reached the store before a cancellation is recognised on retry
        (same key, same seq) instead of being written twice.
        """
        with self.sequencer.deciding(key) as ticket:
            decision = Decision(key=key, seq=ticket.seq, status=verdict.status, verdict=verdict.to_json())
            reply, pending = reply_pair(f"decision of {key.stage}")
            ack = await request(self.store, PersistDecision(decision=decision, reply_to=reply), pending)
            if not ack.ok:
                raise DecisionNotDurable(f"decision of stage {key.stage!r} was not stored: {ack.error}")
            ticket.ack()
        self.publish(StageDecided(decision=decision))
        return decision
