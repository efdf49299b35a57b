"""Resume and rerun: continuing a run from what the store holds.

Everything a resume knows comes from one snapshot of the store, read
through the lineage-aware queries (``Store.lineage_decisions`` and
``Store.lineage_outputs``):

* stages with a durable decision on the lineage are not decided again -
  their decisions are restored into the coordinator's sequencer, and seqs
  continue after the run's highest;
* within the interrupted stage, an agent with a durable accepted output is
  not called again: its output is replayed (``AgentReply(replayed=True)``);
  an agent with only durable *failed* attempts continues its attempt
  numbering (so neither its retry budget nor its usage is spent twice), or
  is reported failed again if those attempts show it had given up;
* every durable attempt's usage is fed to the metrics accumulator once, as
  ``UsageRecorded(replay=True)`` - counted as a replay, not a turn - so the
  run's totals, and hence its digest, are those of an uninterrupted run.

Why this is exact: an agent's outputs go to the store (FIFO) before its
reply reaches the coordinator, and a decision is sent only after every
reply; so a durable decision implies every attempt of its stage is
durable, and an agent's durable attempts are always a prefix of its
attempts.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import attrs

from messages import (
    AgentKey,
    AgentOutput,
    AgentReply,
    CompletionRequest,
    ConclaveError,
    Decision,
    Forward,
    Interceptor,
    Outbox,
    PersistEvent,
    ProviderError,
    StageKey,
    StoreWrite,
    UsageRecorded,
)
from store import BranchRow, DecisionRow, OutputRow, RunRow, Store, branch_named

from ._classify import classify
from ._consensus import ADVANCING
from ._http_errors import NOT_RETRIED
from ._pipeline import Pipeline, PipelineError, StageSpec, pipeline_from_dict
from ._retry import RetryPolicy
from ._sequencer import DecisionSequencer
from ._store_writer import write_durably


# The halt reason of a stage left undecided for want of answers (see
# actors._coordinator.StageUnanswered).
UNANSWERED = "agents_failed"
# Errors no retry mends but the user can, outside the run: they leave a
# stage undecided too, for 'resume --retry-failed' once fixed.
USER_FIXABLE = frozenset({"authentication", "quota", "not_found", "provider_bug"})


class ResumeError(ConclaveError, ValueError):
    """The run, branch or stage asked for cannot be resumed or rerun."""


@attrs.frozen(kw_only=True, slots=True)
class StageResume:
    """What the coordinator reuses in the one stage a crash interrupted."""

    replay: Mapping[str, AgentReply] = attrs.field(factory=dict)
    first_attempt: Mapping[str, int] = attrs.field(factory=dict)
    # agent -> the pause its last failed attempt earned (a 429's reset),
    # waited before the first attempt the resume makes for it.
    first_wait: Mapping[str, float] = attrs.field(factory=dict)


def _error_classes() -> dict[str, type[ProviderError]]:
    found: dict[str, type[ProviderError]] = {}
    todo: list[type[ProviderError]] = [ProviderError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.kind, cls)
        todo.extend(cls.__subclasses__())
    return found


def stored_error(text: str | None) -> ProviderError:
    """Rebuild the error of a failed attempt from its stored ``kind: message``."""
    kind, _, message = (text or "").partition(": ")
    cls = _error_classes().get(kind, ProviderError)
    return cls(message or kind)


@attrs.frozen(kw_only=True, slots=True)
class ResumeState:
    run: RunRow
    branch: BranchRow
    pipeline: Pipeline
    decisions: Mapping[str, DecisionRow]  # stage -> decision on the lineage
    outputs: tuple[OutputRow, ...]  # every attempt on the lineage
    max_seq: int
    # stage -> how often this branch halted on it for want of answers: each
    # such halt grants its failed agents one more round of attempts.
    rounds: Mapping[str, int] = attrs.field(factory=dict)
    # (stage, agent, attempt) -> why, for each attempt this branch's agents
    # gave up after: a reset hint past max_wait is not in the stored error,
    # so judged again it read as one to retry.
    gave_up: Mapping[tuple[str, str, int], str] = attrs.field(factory=dict)
    # (stage, agent, attempt) -> the pause its retry event says the agent
    # took after it: the stored error keeps no reset hint, and a resume that
    # called at once, inside a 429's window, threw away an attempt.
    retry_waits: Mapping[tuple[str, str, int], float] = attrs.field(factory=dict)
    # A plain resume of a halt for want of answers: every agent whose last
    # attempt failed gave up, whatever rounds its events count (a resume
    # that granted one may have died before it marked the run running).
    replay_failures: bool = False

    @property
    def seed(self) -> int:
        return self.run.seed if self.run.seed is not None else 0

    def stage_key(self, stage: str) -> StageKey:
        return StageKey(run_id=self.run.run_id, branch_id=self.branch.branch_id, stage=stage)

    def decided(self, stage: str) -> Decision | None:
        row = self.decisions.get(stage)
        if row is None:
            return None
        key = StageKey(run_id=row.run_id, branch_id=row.branch_id, stage=row.stage)
        return Decision(key=key, seq=row.seq, status=row.status, verdict=row.verdict)  # type: ignore[arg-type]

    def sequencer(self) -> DecisionSequencer:
        """A sequencer that will never decide a lineage stage again and
        draws seqs after the run's highest (seqs are unique per run)."""
        return DecisionSequencer(
            start_seq=self.max_seq,
            decided=[(self.stage_key(stage), row.seq) for stage, row in self.decisions.items()],
        )

    def _requested_model(self, agent: str) -> str | None:
        spec = self.pipeline.agents.get(agent)
        return spec.model if spec is not None else None

    def usage_replays(self) -> list[UsageRecorded]:
        return [
            UsageRecorded(
                key=AgentKey(run_id=o.run_id, branch_id=o.branch_id, stage=o.stage, agent=o.agent),
                attempt=o.attempt,
                model=o.model,
                provider=o.provider,
                usage=o.usage,
                replay=True,
                requested_model=self._requested_model(o.agent),
            )
            for o in self.outputs
        ]

    def settled(self) -> bool:
        """Whether the branch ended (completed, or halted on a decision)
        and stored every decision a resume would reach: a resume can then
        only replay what is stored."""
        if self.branch.status not in ("completed", "halted"):
            return False  # it stopped before recording its end: a resume records it
        for stage in self.pipeline.stages:
            row = self.decisions.get(stage.name)
            if row is None:
                return False
            if row.status not in ADVANCING:
                return True
        return True

    def unanswered_stage(self) -> str | None:
        """The stage this branch halted on for want of answers, if that is
        how it ended (its first undecided stage), else None."""
        if self.branch.status != "halted" or self.branch.halt_reason != UNANSWERED:
            return None
        return next((s.name for s in self.pipeline.stages if s.name not in self.decisions), None)

    def with_new_round(self, stage: str) -> ResumeState:
        rounds = dict(self.rounds)
        rounds[stage] = rounds.get(stage, 0) + 1
        return attrs.evolve(self, rounds=rounds)

    def stage_resume(self, stage: StageSpec, retry: RetryPolicy) -> StageResume | None:
        rows = [o for o in self.outputs if o.stage == stage.name]
        if not rows:
            return None
        replay: dict[str, AgentReply] = {}
        first: dict[str, int] = {}
        waits: dict[str, float] = {}
        for agent in stage.agents:
            mine = sorted((o for o in rows if o.agent == agent), key=lambda o: o.attempt)
            if not mine:
                continue
            last = mine[-1]
            key = self.stage_key(stage.name).agent(agent)
            if last.status == "accepted":
                replay[agent] = AgentReply(
                    key=key, attempts=last.attempt, output=_output(last, key), replayed=True
                )
                continue
            error = stored_error(last.error)
            why = self.gave_up.get((stage.name, agent, last.attempt))
            gave_up_at = {at for (st, ag, at) in self.gave_up if st == stage.name and ag == agent}
            # The server said not to retry (x-should-retry: false): the
            # agent gave up there, whether or not its gave_up event, written
            # after the failure, outlived a crash.  Its kind alone (an
            # outage) read as one to ask again.
            refused = NOT_RETRIED in (last.error or "")
            if refused:
                gave_up_at.add(last.attempt)
            if self.replay_failures or (why is not None or refused) and len(gave_up_at) > self.rounds.get(
                stage.name, 0
            ):
                # It gave up there, and no round has been granted since: a
                # plain resume of its halt asked it again (a 429 reset past
                # max_wait), paid, and decided stages the run never stored
                # as decided.
                replay[agent] = AgentReply(
                    key=key,
                    attempts=last.attempt,
                    output=None,
                    error=f"{error.kind}: {error}" + (f" ({why})" if why else ""),
                    replayed=True,
                )
                continue
            if classify(error).kind in USER_FIXABLE:
                # It gave up at once (a wrong key, a spent quota), so rounds
                # of attempts do not measure it: each halt it caused and
                # each round granted since ('--retry-failed') is one ask.
                gave_up = sum(
                    1 for o in mine if o.status != "accepted" and classify(stored_error(o.error)).kind in USER_FIXABLE
                )
                if gave_up <= self.rounds.get(stage.name, 0):
                    first[agent] = last.attempt + 1
                    continue
            in_round = retry.round_attempt(last.attempt)
            granted = retry.max_attempts * (1 + self.rounds.get(stage.name, 0))
            if in_round == retry.max_attempts and last.attempt < granted:
                in_round = 0  # its round was spent, and a halt for want of answers granted another
            if retry.should_retry(error, in_round):
                first[agent] = last.attempt + 1
                # The whole pause again: how much of it passed before the
                # crash is wall-clock time, which no decision here reads.
                wait = self.retry_waits.get((stage.name, agent, last.attempt))
                if wait is None and in_round > 0 and why is None:
                    # Its retry event died with the process.  (Not a round
                    # granted since it gave up: that one starts afresh.)
                    wait = retry.delay(error, key, last.attempt, self.seed, spec_id=self.run.spec_id)
                if wait:
                    waits[agent] = wait
            else:  # it had given up: report that again, call nobody
                replay[agent] = AgentReply(
                    key=key,
                    attempts=last.attempt,
                    output=None,
                    error=f"{error.kind}: {error}",
                    replayed=True,
                )
        return StageResume(replay=replay, first_attempt=first, first_wait=waits)


def _output(row: OutputRow, key: AgentKey) -> AgentOutput:
    return AgentOutput(
        key=key,
        attempt=row.attempt,
        status="accepted",
        content=row.content,
        format=row.format,  # type: ignore[arg-type]
        usage=row.usage,
        model=row.model,
        provider=row.provider,
    )


def stage_outputs(store: Store, key: StageKey) -> dict[str, AgentOutput]:
    """The accepted outputs consensus decides ``key`` on, through the one
    lineage-aware query: only the branch that owns the stage contributes."""
    return {
        row.agent: _output(row, key.agent(row.agent))
        for row in store.lineage_outputs(key.run_id, key.branch_id, key.stage, accepted_only=True)
    }


def load_state(store: Store, run_id: str, branch_id: str | None = None) -> ResumeState:
    """Snapshot what ``branch_id`` (default: the run's current branch) of
    ``run_id`` sees.  Raises :class:`ResumeError` naming what is missing."""
    run = store.get_run(run_id)
    if run is None:
        raise ResumeError(f"no run {run_id!r} in {store.path}")
    branch = resolve_branch(store, run, branch_id)
    try:
        pipeline = pipeline_from_dict(run.pipeline, source=f"run {run_id}'s stored pipeline", stored=True)
    except PipelineError as exc:
        raise ResumeError(str(exc)) from exc
    decisions = {d.stage: d for d in store.lineage_decisions(run_id, branch.branch_id)}
    outputs = tuple(store.lineage_outputs(run_id, branch.branch_id))
    # Rounds are granted by the resumes that began at such a halt (their
    # event names the stage): a halt event alone may be a crash's torn
    # end, which the uninterrupted run would have completed as a halt.
    rounds: collections.Counter[str] = collections.Counter(
        str(e.detail["new_round"])
        for e in store.events(run_id, "resume")
        if e.branch_id == branch.branch_id and e.detail.get("new_round") is not None
    )
    gave_up = {
        (e.stage, e.agent, e.attempt): str(e.detail.get("reason") or "")
        for e in store.events(run_id, "gave_up")
        if e.branch_id == branch.branch_id and e.stage is not None and e.agent is not None and e.attempt is not None
    }
    retry_waits = {
        (e.stage, e.agent, e.attempt): float(e.detail["delay_s"])
        for e in store.events(run_id, "retry")
        if e.branch_id == branch.branch_id and e.stage is not None and e.agent is not None
        and e.attempt is not None and isinstance(e.detail.get("delay_s"), (int, float))
    }
    return ResumeState(
        run=run,
        branch=branch,
        pipeline=pipeline,
        decisions=decisions,
        outputs=outputs,
        max_seq=store.max_seq(run_id),
        rounds=dict(rounds),
        gave_up=gave_up,
        retry_waits=retry_waits,
    )


def fired_faults(store: Store, state: ResumeState) -> list[tuple[str, str, int, str, str | None]]:
    """(stage, agent, attempt, kind, provider) of every fault injected on
    the resumed branch whose attempt is durable, for fault interceptors to
    take their count budgets up from (``FaultInterceptor.restore``, each
    given the faults of the providers it is scoped to).  A fault whose
    attempt is not durable is left out: the resume makes that attempt
    again, and it must get its fault again.  (The fault's event is written
    before the attempt's output, so a durable attempt's fault is logged.)"""
    branch = state.branch.branch_id
    durable = {(o.stage, o.agent, o.attempt) for o in state.outputs if o.branch_id == branch}
    fired = []
    for event in store.events(state.run.run_id, "fault"):
        if event.branch_id != branch or event.stage is None or event.agent is None or event.attempt is None:
            continue
        if (event.stage, event.agent, event.attempt) in durable:
            provider = event.detail.get("provider")
            fired.append((
                event.stage, event.agent, event.attempt, str(event.detail.get("fault")),
                None if provider is None else str(provider),
            ))
    return fired


def resolve_branch(store: Store, run: RunRow, branch_id: str | None) -> BranchRow:
    """The branch named by ``branch_id`` (full or short id), or the run's
    current branch."""
    if branch_id is None:
        if run.current_branch_id is None:
            raise ResumeError(f"run {run.run_id!r} has no current branch")
        branch = store.get_branch(run.run_id, run.current_branch_id)
        if branch is None:
            raise ResumeError(f"run {run.run_id!r}: its current branch is missing from {store.path}")
        return branch
    branches = store.branches(run.run_id)
    chosen = pick_branch(run.run_id, [b.branch_id for b in branches], branch_id)
    return next(b for b in branches if b.branch_id == chosen)


def pick_branch(run_id: str, branch_ids: Sequence[str], given: str) -> str:
    """The one of ``branch_ids`` (``run_id``'s) that ``given`` names, a full
    or short id (see :func:`~store.branch_named`).  Raises
    :class:`ResumeError` when none or several match."""
    if given in branch_ids:
        return given
    found = [b for b in branch_ids if branch_named(b, given)]
    if len(found) == 1:
        return found[0]
    known = ", ".join(branch_ids)
    if not found:
        raise ResumeError(f"run {run_id!r} has no branch {given!r}; its branches: {known}")
    raise ResumeError(f"branch {given!r} of run {run_id!r} is ambiguous: {known}")


def fork_stage(state: ResumeState, name: str) -> StageSpec:
    """The stage to rerun from, checked: it exists, and every stage before
    it has an advancing decision on the parent's lineage to inherit."""
    try:
        stage = state.pipeline.resolve_stage(name)
    except PipelineError as exc:
        raise ResumeError(f"cannot rerun run {state.run.run_id!r} from {name!r}: {exc}") from exc
    for earlier in state.pipeline.stages:
        if earlier.name == stage.name:
            break
        row = state.decisions.get(earlier.name)
        if row is None or row.status not in ADVANCING:
            what = "is undecided" if row is None else f"ended in {row.status}"
            raise ResumeError(
                f"cannot rerun run {state.run.run_id!r} from {stage.name!r}: the earlier stage "
                f"{earlier.name!r} {what} on branch {state.branch.branch_id}; rerun from "
                f"{earlier.name!r} instead"
            )
    return stage


def options_json(options: Mapping[str, Any] | None) -> str:
    # NaN is allowed here: runs stored before options were checked for it
    # must still rerun (their options are copied).  New options are checked
    # strictly where they come in (Orchestrator._check_options).
    return json.dumps(dict(options or {}), sort_keys=True, separators=(",", ":"))


class CallLog(Interceptor[CompletionRequest]):
    """Records an ``agent_call`` event for every request that reaches the
    gateway, so the event log shows which model calls a run bought (the
    crash tests count re-bought outputs with it).  Installed last on the
    gateway edge: an injected fault answered before the gateway is not a
    provider call.

    For a provider in ``billed`` (one whose calls may cost money) the event
    is durable before the call goes on: held for group commit (up to a
    second), a crash in that second lost every trace of a call the
    provider may have charged for, and ``metrics`` could not count it as
    interrupted.  A checkpoint; cancelled while waiting for the write, the
    call is not forwarded (its event may stand: counted as possibly
    billed, never as not)."""

    def __init__(self, store: Outbox[StoreWrite], billed: Collection[str] = ()) -> None:
        self._store = store
        self._billed = frozenset(billed)

    async def send(self, item: CompletionRequest, forward: Forward[CompletionRequest]) -> None:
        if item.injection is None:  # a fault answering for the provider is no provider call
            event = PersistEvent.of_attempt(
                item.key, item.attempt, "agent_call", {"provider": item.provider, "model": item.model}
            )
            if item.provider in self._billed:
                await write_durably(
                    self._store, event, "logging a model call", "the store writer could not log a call before making it"
                )
            else:
                await self._store.send_eager(event)
        await forward(item)


def replayed_replies(resume: StageResume | None) -> Sequence[AgentReply]:
    return tuple(resume.replay.values()) if resume is not None else ()
