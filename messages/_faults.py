"""Fault injection: :class:`FaultPlan` (what to inject) and
:class:`FaultInterceptor` (injecting it on the provider gateway's inbox).

The interceptor sits on the send side of the gateway channel, so it runs in
the agent's task and installs through the ordinary interceptor seam; no
actor knows it is there.  Instead of forwarding a request it *answers* it
through the request's ``reply_to`` with the same typed errors a real
provider produces (:class:`~messages.Disconnected`,
:class:`~messages.RateLimited`, :class:`~messages.ProviderTimeout`), so an
injected fault takes exactly the path a real one does.

Placement is deterministic: it depends only on (seed, channel, message
identity), never on arrival order.  The identity of a call is
(spec, stage, agent, attempt) plus, for counts, the agent's seat in its
stage's panel; run and branch ids are random identifiers and never feed a
placement (they only scope the count budget, see below).

* **Rates** (``disconnect:5%``): a call faults when a uniform draw from
  SHA-256(seed, channel, spec, stage, agent, attempt) falls in the kind's
  slice of [0, 1); slices are laid out disconnect, 429, timeout.
* **Counts** (``disconnect:3,429:1,timeout:2``): the budget is *per run*
  (per run and branch), as the reference's was per process, which ran one
  pipeline.  The budget is laid out as a sequence in priority order
  (disconnect, then 429, then timeout).  Stages of a run never overlap, so
  when a stage's first call arrives the faults not yet placed (``left``, in
  sequence order) are fixed for it.  Within the stage the calls are
  numbered ``p = (attempt - 1) * panel_size + seat``: every first attempt
  before any second attempt, seats in roster order.  The call numbered
  ``p`` gets ``left[p]`` if ``p < len(left)``.  This is a pure function of
  identity, so the same calls get the same faults however trio interleaves
  a parallel stage; and a stage spreads its faults over its agents instead
  of burning one agent's every attempt.  A number no call takes (a seat a
  resume replays from the store, an attempt never made) leaves its fault
  to the next stage, so a run gets exactly its counts of each kind.  "In
  order" therefore means this canonical order (round by round of attempts,
  seats in order), not the order of arrival: in a sequential stage an
  agent's retries arrive before the next agent's first call, so there a
  429 placed on the first agent's second attempt fires before the
  disconnect on the second agent's first.  A resume in a new
  process takes the budget up from the faults the branch logged
  (:meth:`FaultInterceptor.restore`), so a crash does not refill it.

With a health port attached (the runtime attaches the gateway's), an
injected fault stands in for a provider call, so it is admitted exactly
like one: it waits at the provider's rate-limit gate, fails fast with
:class:`~messages.CircuitOpen` while the breaker is open, and reports its
outcome, so an injected 429 closes the gate for everyone and injected
disconnects count against the breaker.  A fault placed on a call that the
open breaker refuses is not injected (the call fails fast with
``CircuitOpen``, as a real one would); a counted one goes back to the run's
budget, for the stages after this one.
"""

from __future__ import annotations

import collections
import functools
import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import attrs
import trio

from ._channel import Forward, Interceptor, Outbox
from ._errors import ConclaveError, Disconnected, ProviderError, ProviderTimeout, RateLimited
from ._faultplan import CHANNEL, FAULT_KINDS, FaultKind, FaultPlan
from ._messages import CompletionRequest, CompletionResult, Injection, PersistEvent
from ._progress import CallWaiting, ProgressEvent
from ._usage import ZERO_USAGE

DISCONNECT_MESSAGE = "model stream error: stream disconnected before completion"


# -- the interceptor ----------------------------------------------------------------


class HealthPort(Protocol):
    """Admission control shared with the gateway (implemented in
    ``actors``): the rate-limit gate and the circuit breaker of each
    provider.  ``admit`` waits at the gate, then returns ``(permit, None)``
    or ``(None, error)`` (an open breaker, a gate closed too long); every
    permit is then reported or abandoned."""

    async def admit(
        self, provider: str, request: CompletionRequest | None = None
    ) -> tuple[Any, ProviderError | None]:
        """A permit, or the refusal (returned, not raised).  A checkpoint
        only when it waits; cancelled while waiting, no permit was taken."""
        ...

    def report(self, permit: Any, error: ProviderError | None) -> None: ...

    def abandon(self, permit: Any) -> None: ...


class _WaitingHealthPort(HealthPort, Protocol):
    """The orchestrator's own port (``actors.HealthRegistry``): ``admit``
    also calls ``on_wait(seconds)`` just before it waits at a closed gate.
    A port of the caller's need not take it."""

    async def admit(
        self,
        provider: str,
        request: CompletionRequest | None = None,
        on_wait: Callable[[float], object] | None = None,
    ) -> tuple[Any, ProviderError | None]: ...


@attrs.frozen(kw_only=True, slots=True)
class InjectedFault:
    """What the interceptor injected, for observers (the soak's checker)."""

    at: float  # trio clock, when the fault reached the (stand-in) provider
    request: CompletionRequest
    kind: FaultKind
    error: ProviderError
    retry_after: float | None


def _unit(*parts: object) -> float:
    text = "\x1f".join(map(str, parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


class _Sequence:
    """A plan's count budget in firing order (``FaultPlan.sequence``), read
    by index without being laid out: at the 1,000,000-per-kind cap the
    tuple was 3,000,000 entries per interceptor."""

    __slots__ = ("_runs", "_size")

    def __init__(self, plan: FaultPlan) -> None:
        runs: list[tuple[int, int, FaultKind]] = []  # (start, count, kind) in priority order
        start = 0
        for kind in FAULT_KINDS:
            count = plan.counts.get(kind, 0)
            if count:
                runs.append((start, count, kind))
                start += count
        self._runs = tuple(runs)
        self._size = start

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> FaultKind:
        for start, count, kind in self._runs:
            if start <= index < start + count:
                return kind
        raise IndexError(index)

    def first_free(self, kind: str, placed: set[int]) -> int | None:
        """The first index of ``kind`` not in ``placed``."""
        for start, count, planned in self._runs:
            if planned == kind:
                return next((i for i in range(start, start + count) if i not in placed), None)
        return None


@attrs.define(slots=True)
class _Stage:
    # The indices placed when the stage began, sorted: the stage's faults
    # are the others, in order.  Kept instead of that list itself, which
    # was as long as the whole budget for every stage of every run (30,000
    # counts: ~1 MB a run).
    before: tuple[int, ...]
    size: int  # of the sequence
    panel: tuple[str, ...]

    def left(self, position: int) -> int | None:
        """The ``position``-th index (from 0) not placed when the stage
        began, or None when there are not that many."""
        if position < 0:
            return None
        index = position
        for taken in self.before:
            if taken > index:
                break
            index += 1
        return index if index < self.size else None


@attrs.define(slots=True)
class _Bucket:
    anchor: float
    placed: set[int] = attrs.field(factory=set)  # indices into the sequence
    stages: dict[tuple[str, ...], _Stage] = attrs.field(factory=dict)

    def begin_stage(self, stage_key: tuple[str, ...], panel: tuple[str, ...], size: int) -> _Stage:
        """A stage's placements start from the faults not placed before it
        (of a sequence of ``size``): every earlier stage of the run is over."""
        stage = self.stages[stage_key] = _Stage(before=tuple(sorted(self.placed)), size=size, panel=panel)
        return stage


def scoped_panel(panel: Sequence[str], providers: Sequence[str], scope: str) -> tuple[str, ...]:
    """The seats of ``panel`` whose provider is ``scope``: the panel over
    which a fault plan scoped to that provider places its faults."""
    return tuple(agent for agent, provider in zip(panel, providers) if provider == scope)


class FaultInterceptor(Interceptor[Any]):
    """Injects a :class:`FaultPlan` on the provider gateway's inbox.

    Decide first, then answer or forward: the decision is synchronous, and
    ``forward`` (or the answer, which never blocks) comes last, so a
    cancelled send sent nothing.  ``events`` (attached by the runtime) gets
    a ``fault`` event per injected fault; ``health`` (attached by the
    runtime) is the gateway's gate and breaker; ``observer`` sees every
    injected fault.
    """

    def __init__(
        self,
        plan: FaultPlan | str,
        *,
        seed: int | None = None,
        health: HealthPort | None = None,
        events: Outbox[Any] | None = None,
        observer: Callable[[InjectedFault], None] | None = None,
    ) -> None:
        if isinstance(plan, str):
            plan = FaultPlan.parse(plan)
        elif not isinstance(plan, FaultPlan):
            raise TypeError(f"FaultInterceptor needs a FaultPlan or a spec such as 'disconnect:3', got {plan!r}")
        # Checked here, not at the first injected fault mid-run; a str seed
        # would place faults unlike the number it spells.
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(f"FaultInterceptor seed must be a whole number or None, got {seed!r}")
        if health is not None and not all(callable(getattr(health, m, None)) for m in ("admit", "report", "abandon")):
            raise TypeError(f"FaultInterceptor health must have admit, report and abandon (a HealthPort), got {health!r}")
        if events is not None and not isinstance(events, trio.abc.SendChannel):
            raise TypeError(f"FaultInterceptor events must be a send channel, got {events!r}")
        if observer is not None and not callable(observer):
            raise TypeError(f"FaultInterceptor observer must be callable, got {observer!r}")
        self.plan = plan
        self.seed = plan.seed if plan.seed is not None else (seed or 0)
        self.health = health
        self.events = events
        self.observer = observer
        # What the caller gave, kept apart from what an orchestrator
        # attaches, so the next orchestrator does not inherit the last one's
        # gate, breaker and (closed) event log.
        self._given = (seed, health, events)
        self._attached = False
        self._queued = False
        self._publish: Callable[[ProgressEvent], None] | None = None
        self._announcing: _WaitingHealthPort | None = None
        self._sequence = _Sequence(plan)
        self._rates = [(k, plan.rates[k]) for k in FAULT_KINDS if plan.rates.get(k)]
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self.injected: collections.Counter[str] = collections.Counter()
        self.decided: collections.Counter[str] = collections.Counter()

    # -- configuration and diagnostics --

    def attach(
        self,
        *,
        seed: int | None = None,
        health: _WaitingHealthPort | None = None,
        events: Outbox[Any] | None = None,
        queued: bool = False,
        publish: Callable[[ProgressEvent], None] | None = None,
    ) -> None:
        """Fill in what the orchestrator installing this interceptor knows;
        settings given to the constructor (and the plan's seed) win.  Until
        :meth:`detach`, the interceptor belongs to that orchestrator: a
        second ``attach`` raises RuntimeError, as two orchestrators at once
        would share one gate, breaker and event log.  ``queued``: the
        channel leads to a gateway that serves an :class:`Injection` (so a
        fault waits for a provider worker in turn, as the call it stands
        for would; fired at once, a burst of instant failures reached the
        breaker before the calls queued behind the workers, and opened it).
        ``publish``: the orchestrator's progress, told of a fault that waits
        at its rate-limit gate (:class:`~messages.CallWaiting`), as a real
        call's wait is; used only with the orchestrator's own ``health``."""
        if self._attached:
            raise RuntimeError("this FaultInterceptor is already attached to an open orchestrator")
        self._queued = queued
        given_seed, given_health, given_events = self._given
        if self.plan.seed is None and given_seed is None:
            self.seed = seed or 0
        self.health = given_health or health
        self.events = given_events or events
        # Waits are announced at the orchestrator's own gate only.
        self._announcing = health if given_health is None and publish is not None else None
        self._publish = publish
        self._attached = True

    def detach(self) -> None:
        """Forget what :meth:`attach` filled in (the orchestrator has
        closed); the interceptor can then be installed again, and its
        per-run budgets and counters carry on."""
        given_seed, given_health, given_events = self._given
        self.health, self.events = given_health, given_events
        self._announcing, self._publish = None, None
        self._attached = False
        self._queued = False

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def follows_attached_seed(self) -> bool:
        """Whether placement is drawn from the seed :meth:`attach` gives
        (neither the plan nor the constructor named one of its own)."""
        return self.plan.seed is None and self._given[0] is None

    @property
    def enabled(self) -> bool:
        return self.plan.enabled

    def run_ended(self, run_id: str, branch_id: str) -> None:
        """The orchestrator has stopped driving this branch of the run
        (completed, halted or interrupted).  A plan without counts forgets
        it: all it kept was the reset anchor, and a long-lived orchestrator
        would otherwise keep one per run for ever.  A count budget is kept
        for :meth:`remaining` until :meth:`forget`.  Not a checkpoint."""
        if not self._sequence:
            self._buckets.pop((run_id, branch_id), None)

    def forget(self, run_id: str) -> None:
        """Drop what this interceptor keeps of every branch of ``run_id``
        (count budgets, reset anchors), for a caller done with the run - the
        soak, which drops each run once checked: a count plan's budget is
        otherwise kept for :meth:`remaining` as long as the interceptor
        lives, and a long soak's memory grew with its runs.  Afterwards the
        run counts as not seen (a whole budget left).  Call it only once
        the run's drive has ended: a run still going would start its budget
        over.  (A later ``resume`` takes the budget up from the run's log,
        as in a new process.)  Not a checkpoint."""
        for key in [key for key in self._buckets if key[0] == run_id]:
            del self._buckets[key]

    def remaining(self, run_id: str | None = None, branch_id: str | None = None) -> dict[str, int]:
        """Count faults not yet placed, per kind: in the budget of branch
        ``branch_id`` of run ``run_id``, or, with ``branch_id`` omitted,
        summed over the budgets of every branch of the run this interceptor
        has seen (each ``rerun`` branch has a budget of its own, so a run
        with two branches that have both spent nothing has twice the counts
        left).  A run or branch not seen yet has one whole budget left.
        Never negative."""
        budget: dict[str, int] = {k: self.plan.counts.get(k, 0) for k in FAULT_KINDS}
        # One budget per branch: subtracting every branch's placements from
        # a single one went negative after a rerun (disconnect -3).
        buckets = [
            bucket
            for (run, branch), bucket in self._buckets.items()
            if run == run_id and branch_id in (None, branch)
        ]
        if not buckets:
            return budget
        left: dict[str, int] = {k: n * len(buckets) for k, n in budget.items()}
        for bucket in buckets:
            for index in bucket.placed:
                left[self._sequence[index]] -= 1
        return left

    def restore(
        self,
        run_id: str,
        branch_id: str,
        *,
        stages: Sequence[tuple[str, Sequence[str]]],
        fired: Iterable[tuple[str, str, int, str]],
    ) -> bool:
        """Take up a run's count budget where an earlier process left it
        (``resume`` after a crash), so a resumed run gets the faults an
        uninterrupted one would have and no count is spent twice.

        ``fired`` is what the branch logged: (stage, agent, attempt, kind)
        of each injected fault whose attempt the store holds.  ``stages``
        is the run's pipeline as (stage, panel) in order.  Each fault is put
        back where it was placed when it fired, stage after stage, so the
        interrupted stage goes on placing as it began; a fault that does not
        fit there (the plan changed, or the breaker had moved placements)
        takes the first free place of its kind.  Faults of kinds the plan no
        longer has, or beyond its counts, are ignored.

        The log is the budget's truth even when this interceptor served
        the run itself (an embedding app resuming in the same process):
        a fault placed on an attempt that never became durable must fire
        again when the resume makes that attempt again, as it fired in the
        uninterrupted run, so what this interceptor remembers of the branch
        is replaced, not kept.

        Changes nothing and returns False if the plan has no counts.  Not a
        checkpoint; call it inside trio (the budget's reset anchor is the
        current time).
        """
        if not self._sequence:
            return False
        bucket = self._buckets[(run_id, branch_id)] = _Bucket(anchor=trio.current_time())
        by_stage: dict[str, list[tuple[str, int, str]]] = collections.defaultdict(list)
        for stage, agent, attempt, kind in fired:
            by_stage[stage].append((agent, attempt, kind))
        for name, agents in stages:
            faults = by_stage.pop(name, None)
            if not faults:
                continue
            panel = tuple(agents)
            begun = bucket.begin_stage((name, *panel), panel, len(self._sequence))
            seats = {agent: seat for seat, agent in enumerate(panel)}
            spill = []
            for agent, attempt, kind in faults:
                seat = seats.get(agent)
                index = None if seat is None else begun.left((attempt - 1) * len(panel) + seat)
                if index is not None and self._sequence[index] == kind:
                    bucket.placed.add(index)
                else:
                    spill.append(kind)
            for kind in spill:
                self._place_first(bucket, kind)
        for faults in by_stage.values():  # stages the pipeline does not name
            for _agent, _attempt, kind in faults:
                self._place_first(bucket, kind)
        return True

    def _place_first(self, bucket: _Bucket, kind: str) -> None:
        index = self._sequence.first_free(kind, bucket.placed)
        if index is not None:
            bucket.placed.add(index)

    def diagnostics(self) -> dict[str, Any]:
        return {
            **self.plan.to_json(),
            "seed": self.seed,
            "injected": {k: self.injected.get(k, 0) for k in FAULT_KINDS},
            "budget_per_run": {k: self.plan.counts.get(k, 0) for k in FAULT_KINDS},
        }

    # -- the seam --

    async def send(self, item: Any, forward: Forward[Any]) -> None:
        if (
            not isinstance(item, CompletionRequest)
            or item.reply_to is None
            or item.injection is not None  # another fault interceptor answers for it already
            or (self.plan.provider is not None and item.provider != self.plan.provider)
        ):
            await forward(item)
            return
        decision = self._decide(item)
        if decision is None:
            await forward(item)
            return
        kind, anchor, placed = decision
        if self._queued:
            injection = Injection(
                run=functools.partial(self._inject, item, kind, anchor, placed),
                withdraw=functools.partial(self._unplace, kind, placed),
            )
            try:
                await forward(attrs.evolve(item, injection=injection))
            except BaseException:
                self._unplace(kind, placed)  # a cancelled send sent nothing
                raise
            return
        await self._inject(item, kind, anchor, placed)

    def decide(self, request: CompletionRequest) -> tuple[FaultKind, float] | None:
        """Which fault ``request`` gets, if any, and the anchor of its reset
        hint; records count placements.  Synchronous: no checkpoint between
        deciding and acting."""
        decision = self._decide(request)
        return None if decision is None else decision[:2]

    def _decide(self, request: CompletionRequest) -> tuple[FaultKind, float, tuple[_Bucket, int] | None] | None:
        """As :meth:`decide`, plus where a count fault was placed (None for
        a rate), so that a fault the breaker keeps from firing can be put
        back."""
        key = request.key
        bucket_key = (key.run_id, key.branch_id)
        bucket = self._buckets.get(bucket_key)
        if bucket is None:
            bucket = self._buckets[bucket_key] = _Bucket(anchor=trio.current_time())
        if self._sequence:
            # Without a panel naming the agent, the agent is a stage of its own.
            panel = request.panel if key.agent in request.panel else (key.agent,)
            scope = self.plan.provider
            if scope is not None and len(request.panel_providers) == len(panel) and scope in request.panel_providers:
                # Other providers' seats never reach this interceptor: a
                # fault placed on one would never fire.
                panel = scoped_panel(panel, request.panel_providers, scope)
            stage_key = (key.stage, *panel)
            stage = bucket.stages.get(stage_key)
            if stage is None:
                stage = bucket.begin_stage(stage_key, panel, len(self._sequence))
            size = len(panel)
            seat = panel.index(key.agent)
            position = (request.attempt - 1) * size + seat
            # Placed once: the same call sent again does not spend another
            # fault.  (A resume first rebuilds the budget from the log, so
            # an attempt made again because it was lost gets its fault.)
            index = stage.left(position)
            if index is not None and index not in bucket.placed:
                kind = self._sequence[index]
                bucket.placed.add(index)
                self.decided[kind] += 1
                return kind, bucket.anchor, (bucket, index)
        if self._rates:
            draw = _unit(self.seed, "fault", CHANNEL, request.spec_id, key.stage, key.agent, request.attempt)
            edge = 0.0
            for kind, rate in self._rates:
                edge += rate
                if draw < edge:
                    self.decided[kind] += 1
                    return kind, bucket.anchor, None
        return None

    def _retry_after(self, anchor: float, now: float) -> float | None:
        hint = self.plan.reset
        if hint is None:
            return None
        if hint.mode == "relative":
            return hint.seconds
        return max(0.0, anchor + hint.seconds - now)

    def _error(self, kind: FaultKind, retry_after: float | None) -> ProviderError:
        if kind == "disconnect":
            return Disconnected(DISCONNECT_MESSAGE)
        if kind == "timeout":
            return ProviderTimeout(f"operation timed out after {self.plan.timeout_ms}ms (fault injected)")
        if retry_after is None:
            return RateLimited("rate limit exceeded: 429 Too Many Requests (fault injected)")
        return RateLimited(
            f"rate limit exceeded: retry after {_seconds(retry_after)} seconds (fault injected)",
            retry_after=retry_after,
        )

    def _unplace(self, kind: FaultKind, placed: tuple[_Bucket, int] | None) -> None:
        self.decided[kind] -= 1
        if placed is not None:
            bucket, index = placed
            bucket.placed.discard(index)

    async def _inject(
        self, request: CompletionRequest, kind: FaultKind, anchor: float, placed: tuple[_Bucket, int] | None = None
    ) -> None:
        reply = request.reply_to
        assert reply is not None
        permit = None
        if self.health is not None:
            # The injected fault stands in for a provider call: admitted
            # through the same gate and breaker as a real one.
            try:
                if self._announcing is None or self._publish is None:
                    permit, blocked = await self.health.admit(request.provider, request)
                else:
                    publish = self._publish

                    def on_wait(left: float) -> None:
                        publish(CallWaiting(key=request.key, attempt=request.attempt, provider=request.provider, delay=left))

                    permit, blocked = await self._announcing.admit(request.provider, request, on_wait)
            except BaseException:
                self._unplace(kind, placed)  # cancelled at the gate: nothing fired
                raise
            if blocked is not None:
                # Refused as a real call would be: the fault never fired, so
                # a counted one goes back to the run's budget (to a later
                # stage), as the reference consumed a count only by firing.
                self._unplace(kind, placed)
                reply.send(
                    CompletionResult(key=request.key, attempt=request.attempt, error=blocked, usage=ZERO_USAGE)
                )
                return
        at = trio.current_time()
        retry_after = self._retry_after(anchor, at) if kind == "rate_limit" else None
        error = self._error(kind, retry_after)
        # Fired: counted now, as the observer sees it.
        self.injected[kind] += 1
        if self.observer is not None:
            self.observer(InjectedFault(at=at, request=request, kind=kind, error=error, retry_after=retry_after))
        if kind == "timeout":
            try:
                # Logged before the wait: a caller whose own call timeout
                # is shorter gives up during it, and the fault that made
                # its attempt fail must still be on record (the count it
                # spent stays spent, and a resume must see it so).
                await self._log(request, kind, error, retry_after, cut_at=request.deadline)
                await trio.sleep(self.plan.timeout_ms / 1000)
            except BaseException:
                if self.health is not None:
                    self.health.abandon(permit)
                raise
            if self.health is not None:
                self.health.report(permit, error)
        else:
            if self.health is not None:
                self.health.report(permit, error)  # a 429 closes the gate before anything awaits
            await self._log(request, kind, error, retry_after)
        # As the real error it stands for: a 429 is refused before the model
        # runs, so it costs nothing; a cut stream or a timeout may have been
        # billed, so its usage is unknown.
        usage = ZERO_USAGE if kind == "rate_limit" else None
        reply.send(CompletionResult(key=request.key, attempt=request.attempt, error=error, usage=usage))

    async def _log(
        self,
        request: CompletionRequest,
        kind: FaultKind,
        error: ProviderError,
        retry_after: float | None,
        *,
        cut_at: float = float("inf"),
    ) -> None:
        """Log the fault.  ``cut_at``: when the caller stops waiting (a
        timeout fault's call deadline)."""
        if self.events is None:
            return
        detail: dict[str, Any] = {"fault": kind, "message": str(error), "provider": request.provider}
        if retry_after is not None:
            detail["retry_after_s"] = round(retry_after, 3)
        left = cut_at - trio.current_time()
        if left < self.plan.timeout_ms / 1000:
            # The caller's own call timeout ends the call before this fault
            # would: "timed out after 700000ms" described a timeout that
            # never happened (the attempt failed with the caller's own).
            detail["message"] = (
                f"operation would time out after {self.plan.timeout_ms}ms (fault injected), "
                f"but the caller's own call timeout ends it after {int(left * 1000)}ms"
            )
            detail["cut_by_caller"] = True
        try:
            await self.events.send(PersistEvent.of_attempt(request.key, request.attempt, "fault", detail))
        except ConclaveError:
            pass  # the store has stopped: the fault still happens


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}".rstrip("0").rstrip(".")


