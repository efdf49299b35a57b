"""The deterministic fault soak: many pipelines on the simulator, under a
virtual clock, with faults injected, and the invariants checked.

Everything runs in-process under ``trio.testing.MockClock`` with autojump,
so simulated latencies, 30 s timeout faults and 429 reset windows cost no
wall time.  Placement of every fault and every simulated answer is derived
from (seed, identity), so the same seed gives the same digest in any
process whatever trio's scheduling order.

Invariants (any breach fails the soak, naming the seed):

* every agent call (an ``AgentRequest``) ends in exactly one terminal
  state (one ``AgentReply``); none lost, none doubled;
* no call makes more attempts than the retry policy allows, counted where
  calls arrive (at the provider and at injection): each attempt arrives
  once, none beyond what the agent's reply says, and each is stored once;
* no call reaches a provider - a real call or an injected fault standing in
  for one - inside a 429's reset window or while its breaker is open
  (checked online, from records taken at the provider and at injection, not
  from the gate's own state);
* exactly one decision per (run, branch, stage), and as many as the run
  reports; none counts an agent that answered as missing;
* a run's usage totals equal the sum of its per-attempt usage in the store,
  with unknown usage counted apart and never as zero, and each stored
  attempt's usage is what the provider (or the injected fault) reported;
* the event log has a retry per failed attempt but the last, and a
  gave_up per agent that never answered;
* no task is left running once the orchestrator has closed;
* every configured fault kind was injected, and recovered from (the agent
  later answered), at least once.

With ``workers`` W > 1 the runs are split into W shards (run ``i`` goes to
shard ``i % W``), each run in its own process with its own orchestrator,
store file and virtual clock (see ``_soak_shards``); every shard reports a
:class:`ShardReport` and :func:`merge_shards` checks the global invariants
(every kind injected and recovered, every run finished) on the merged
totals.  W = 1 runs the single shard in this process through the same two
functions, so its digest is what it always was.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import attrs
import trio
import trio.testing

from messages import (
    FAULT_KINDS,
    AgentKey,
    AgentReply,
    AgentRequest,
    Completion,
    CompletionRequest,
    FaultInterceptor,
    FaultKind,
    FaultPlan,
    Forward,
    InjectedFault,
    Interceptor,
    RateLimited,
    ResetHint,
    TokenUsage,
    ZERO_USAGE,
)
from messages._faultplan import RATE_SLACK
from store import Store

from ._breaker import BreakerPolicy
from ._checks import check_number, check_whole
from ._health import HealthRegistry
from ._pipeline import Pipeline, default_pipeline, pipeline_from_dict
from ._provider import BaseProvider
from ._retry import RetryPolicy
from ._rng import seed_problem
from ._runtime import ConfigError, Limits, open_orchestrator
from ._simulator import Latency, SimulatedProvider

DEFAULT_SOAK_FAULTS = "disconnect:4%,429:3%,timeout:3%"
DEFAULT_SOAK_RESET = ResetHint(mode="relative", seconds=5.0, text="5")


def default_soak_plan(spec: str | None = None, *, seed: int | None = None) -> FaultPlan:
    """The soak's plan: ``spec`` (default: 10 % mixed faults); a 429 without
    a configured reset hint gets a 5 s one, so the gate is exercised."""
    plan = FaultPlan.parse(spec if spec is not None else DEFAULT_SOAK_FAULTS, seed=seed)
    return with_soak_reset(plan)


def with_soak_reset(plan: FaultPlan) -> FaultPlan:
    if plan.reset is None and "rate_limit" in plan.kinds:
        return attrs.evolve(plan, reset=DEFAULT_SOAK_RESET)
    return plan


def panel_pipeline(agents: int) -> Pipeline:
    """The default six stages, each answered by ``agents`` agents."""
    names = [f"a{i:02d}" for i in range(1, agents + 1)]
    modes = ("sequential",) * 3 + ("parallel",) * 3
    stages = ("plan", "tasks", "implement", "validate", "audit", "unlock")
    return pipeline_from_dict(
        {
            "agents": {n: {"provider": "sim", "model": "sim-model"} for n in names},
            "stages": [
                {"name": s, "agents": names, "mode": m, "aggregator": ""} for s, m in zip(stages, modes)
            ],
        },
        source=f"soak panel of {agents}",
    )


def _plan(value: FaultPlan | str) -> FaultPlan:
    # A spec string is taken as `conclave soak --faults` takes it, and a
    # plan object as the CLI's from_env plan is: a 429 without a reset gets
    # the soak's (FaultPlan.parse("429:10%") had none, so no soak given a
    # plan ever closed the gate).
    if isinstance(value, str):
        return default_soak_plan(value)
    return with_soak_reset(value) if isinstance(value, FaultPlan) else value


def _whole(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    # Not instance_of(int): True passed it as 1 run, 1 worker, ... (Limits
    # and open_orchestrator(seed=) refuse a bool).
    check_whole(value, attribute.name)


def _number(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    check_number(value, attribute.name)  # True would read as a 100 % rate


@attrs.frozen(kw_only=True)
class SoakConfig:
    """What a soak runs.  Wrong types are a TypeError and out-of-range
    values a ValueError, naming the field, when the config is built - not
    minutes into a soak.  ``faults`` also takes a spec string
    (``"disconnect:5%,429:2%"``), read as ``conclave soak --faults`` reads it;
    either way a 429 without a reset hint gets the soak's 5 s one."""

    seed: int = attrs.field(default=0, validator=_whole)
    runs: int = attrs.field(default=100, validator=_whole)
    agents: int | None = attrs.field(default=None, validator=attrs.validators.optional(_whole))
    faults: FaultPlan = attrs.field(
        factory=default_soak_plan, converter=_plan, validator=attrs.validators.instance_of(FaultPlan)
    )
    concurrency: int = attrs.field(default=16, validator=_whole)  # runs in flight at once
    retry: RetryPolicy = attrs.field(default=RetryPolicy(), validator=attrs.validators.instance_of(RetryPolicy))
    breaker: BreakerPolicy = attrs.field(default=BreakerPolicy(), validator=attrs.validators.instance_of(BreakerPolicy))
    # Latencies end on a 1 s grid (see ``Latency.quantum``): completions that
    # share a tick wake in one trio batch, so the soak needs about half the
    # run-loop iterations per agent turn (18 -> 8.5).  Draws, content and
    # fault placement are unchanged; only timing is coarser.  Retry pauses
    # and rate-limit releases end on the same grid (unless ``retry`` has a
    # quantum of its own): off it, each had an instant of its own, 63 % of
    # the run loop's iterations.
    latency: Latency = attrs.field(default=Latency(quantum=1.0), validator=attrs.validators.instance_of(Latency))
    disagreement_rate: float = attrs.field(default=0.0, validator=_number)
    # default: a scratch store in memory (see _database)
    db: str | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.instance_of(str)))
    # Processes to split the runs over (see ``_soak_shards``).  Part of the
    # digest's inputs: runs in one process share a breaker and a gate.  At
    # most ``concurrency`` (or ``runs``): each process runs at least one at
    # a time.
    workers: int = attrs.field(default=1, validator=_whole)

    def __attrs_post_init__(self) -> None:
        problem = seed_problem(self.seed)
        if problem is not None:
            raise ValueError(problem)
        if not 0.0 <= self.disagreement_rate <= 1.0:  # NaN fails too
            raise ValueError(f"disagreement_rate must be between 0 and 1, got {self.disagreement_rate!r}")
        if self.runs < 1:
            raise ValueError(f"runs must be at least 1, got {self.runs}")
        if self.agents is not None and self.agents < 1:
            raise ValueError(f"agents must be at least 1, got {self.agents}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.db is not None and self.db.strip() in ("", ":memory:"):
            # The scratch database is in memory already; '' opened a
            # temporary file and failed only when the soak started.
            raise ValueError(f"db must name a file to keep the soak's runs in (or be None), got {self.db!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.shards > self.concurrency:
            # Every worker process has at least one run in flight: the
            # rest of the soak's promise ("concurrency: runs in flight at
            # once") was broken without a word - 200 workers ran 200 runs
            # at once under --concurrency 16, which moves the digest of a
            # plan whose faults meet the breaker.
            raise ValueError(
                f"workers is {self.workers} (--workers {self.workers}), more than concurrency "
                f"{self.concurrency} (--concurrency {self.concurrency}): each worker process has at least one "
                f"run in flight, so {self.shards} runs would be in flight at once; give workers "
                f"{self.concurrency} or fewer, or concurrency {self.shards} or more"
            )
        # Settings no soak could pass: every configured kind must be
        # recovered from at least once.  They ran to the end and failed as
        # if an invariant had broken; refused here, before any run.
        if self.faults.enabled and self.retry.max_attempts == 1:
            raise ValueError(
                f"max_attempts is 1 (--max-attempts 1) with faults configured ({self.faults.describe_kinds()}): "
                "no call is ever retried, so no agent could recover from an injected fault and the soak "
                "could never pass; give max_attempts 2 or more, or no faults"
            )
        if sum(self.faults.rates.values()) >= 1.0 - RATE_SLACK:  # 10%+20%+70% is 100%
            raise ValueError(
                f"fault rates add up to 100% ({self.faults.describe_kinds()}): every attempt of every call "
                "would fault, so no agent could recover and the soak could never pass; give rates under "
                "100% in total"
            )
        reset = self.faults.reset
        if (
            "rate_limit" in self.faults.kinds
            and reset is not None
            and self.retry.wait_refused(reset.seconds) is not None
        ):
            # Every agent would give up on its 429 and the soak would fail
            # on "never recovered from a rate_limit fault", naming no cause.
            # (An anchored reset's first 429s carry its whole distance.)
            raise ValueError(
                f"a 429 reset of {reset.text} is later than the {self.retry.max_wait:g}s a retry waits "
                "(RetryPolicy.max_wait): no agent could recover from an injected 429; "
                "give a shorter CODEX_FAULTS_429_RESET"
            )
        scope = self.faults.provider
        if scope is not None and scope not in (names := self.provider_names()):
            raise ValueError(
                f"faults are scoped to provider {scope!r}, which the soak does not call "
                f"(it calls: {', '.join(names)}); no fault would ever fire"
            )

    def pipeline(self) -> Pipeline:
        return panel_pipeline(self.agents) if self.agents else default_pipeline()

    def provider_names(self) -> tuple[str, ...]:
        """The provider names the soak's calls carry (all served by the simulator)."""
        return tuple(sorted({spec.provider for spec in self.pipeline().agents.values()}))

    @property
    def shards(self) -> int:
        """Shards actually used: never more than there are runs."""
        return min(self.workers, self.runs)

    @property
    def shard_concurrency(self) -> int:
        """Runs in flight per shard, so the total stays about ``concurrency``."""
        return -(-self.concurrency // self.shards)

    def shard_indices(self, shard: int) -> range:
        """The run indices of ``shard``: every ``shards``-th, from ``shard``."""
        return range(shard, self.runs, self.shards)


@attrs.frozen(kw_only=True)
class ShardSummary:
    """One shard's share, as the merged report shows it."""

    shard: int
    runs: int
    agent_turns: int
    concurrency: int
    wall_seconds: float  # inside the shard's process, trio run only
    virtual_seconds: float


@attrs.frozen(kw_only=True)
class SoakReport:
    """What a fault soak found: runs, turns, faults injected and
    recovered, outcomes, breaker trips and gate waits, the digests that
    make it reproducible per seed, and ``breaches`` - the invariants it
    saw broken (``ok``: none).  ``to_json()`` is ``conclave soak --json``."""

    seed: int
    runs: int
    agent_turns: int
    faults: dict[str, int]
    recovered: dict[str, int]
    retries: int
    lost: int
    duplicate_decisions: int
    completed: int
    halted: int
    breaker_trips: int
    gate_waits: int
    digest: str
    fault_digest: str
    wall_seconds: float
    virtual_seconds: float  # W > 1: the longest shard's (each has its own clock)
    breaches: tuple[str, ...]
    workers: int = 1
    shards: tuple[ShardSummary, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.breaches

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["breaches"] = list(self.breaches)
        data["ok"] = self.ok
        data["wall_seconds"] = round(self.wall_seconds, 3)
        data["virtual_seconds"] = round(self.virtual_seconds, 3)
        for shard in data["shards"]:
            shard["wall_seconds"] = round(shard["wall_seconds"], 3)
            shard["virtual_seconds"] = round(shard["virtual_seconds"], 3)
        return data


class _RecordingProvider(BaseProvider):
    """Wraps the simulator and tells the checker of every call that really
    reaches it (and of any real 429 it answers)."""

    def __init__(self, inner: BaseProvider, checker: _Checker) -> None:
        self.inner = inner
        self.name = inner.name
        self.bills = inner.bills
        self._checker = checker

    async def complete(self, request: CompletionRequest) -> Completion:
        self._checker.on_provider_call(self.name, trio.current_time(), request)
        try:
            completion = await self.inner.complete(request)
            self._checker.on_served(request, completion)
            return completion
        except RateLimited as error:
            if error.retry_after is not None:
                now = trio.current_time()
                self._checker.on_rate_limit(self.name, now, now + error.retry_after)
            raise


class _Tap(Interceptor[Any]):
    """Pass-through interceptor that shows every item to a callback."""

    def __init__(self, seen: Any) -> None:
        self._seen = seen

    async def send(self, item: Any, forward: Forward[Any]) -> None:
        self._seen(item)
        await forward(item)


class _Checker:
    def __init__(self, config: SoakConfig, health: HealthRegistry, on_breach: OnBreach | None = None) -> None:
        self.config = config
        self.health = health
        self.stage_names = config.pipeline().stage_names
        self.breaches: list[str] = []
        self._on_breach = on_breach
        # gate / breaker, checked online: calls arrive in time order.
        self._windows: dict[str, collections.deque[tuple[float, float]]] = collections.defaultdict(collections.deque)
        self._closed_until: dict[str, float] = collections.defaultdict(lambda: float("-inf"))
        self._transition_index: dict[str, int] = collections.defaultdict(int)
        self._breaker_state: dict[str, str] = collections.defaultdict(lambda: "closed")
        # per run, forgotten once the run is checked
        self.requests: dict[str, collections.Counter[AgentKey]] = collections.defaultdict(collections.Counter)
        self.replies: dict[str, list[AgentReply]] = collections.defaultdict(list)
        self.arrivals: dict[str, collections.Counter[tuple[AgentKey, int]]] = collections.defaultdict(
            collections.Counter
        )
        # What each attempt cost, from the provider and the injector, not
        # from the agent: usage the agent misreported (doubled, or unknown
        # stored as zero) reached the store and the metrics alike.
        # (usage, the kind of the fault that stood in for the provider, if one did) per attempt.
        self.served: dict[str, dict[tuple[AgentKey, int], tuple[TokenUsage | None, str | None]]] = collections.defaultdict(
            dict
        )
        # Faults per agent call, by kind: each one the call outlived counts
        # as recovered (a set counted two timeouts of one call as one).
        self.faulted: dict[AgentKey, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        # totals
        self.injected: collections.Counter[str] = collections.Counter()
        self.recovered: collections.Counter[str] = collections.Counter()
        self.placement_rows: list[tuple[str, str, str, int, str]] = []

    def breach(self, text: str) -> None:
        if len(self.breaches) < 50:
            self.breaches.append(text)
            if self._on_breach is not None:
                self._on_breach(text)

    # -- provider-side records --

    def on_rate_limit(self, provider: str, start: float, end: float) -> None:
        self._windows[provider].append((start, end))

    def on_provider_call(self, provider: str, now: float, request: CompletionRequest) -> None:
        """A call reaching the provider itself, as it does: no checkpoint
        lies between its admission and this, so the breaker's state now is
        the one it was admitted in - which the transitions' times cannot
        tell within the instant the breaker opened."""
        if self.health[provider].breaker.state == "open":
            self.breach(f"a call reached provider {provider!r} at t={now:.3f}s while its breaker was open")
        self.on_call(provider, now, request)

    def on_call(self, provider: str, now: float, request: CompletionRequest | None = None) -> None:
        if request is not None:
            # Counted where calls arrive, not from what the agent says of
            # itself: a re-send under one attempt number, or a reply that
            # understates its attempts, passed every other check.
            self.arrivals[request.key.run_id][(request.key, request.attempt)] += 1
        windows = self._windows[provider]
        while windows and windows[0][0] < now:  # windows opened strictly before now
            start, end = windows.popleft()
            if end > self._closed_until[provider]:
                self._closed_until[provider] = end
        if self._closed_until[provider] > now:
            self.breach(
                f"a call reached provider {provider!r} at t={now:.3f}s, inside a 429 reset "
                f"window that ends at t={self._closed_until[provider]:.3f}s"
            )
        transitions = self.health[provider].breaker.transitions
        index = self._transition_index[provider]
        while index < len(transitions) and transitions[index][0] < now:
            self._breaker_state[provider] = transitions[index][1]
            index += 1
        self._transition_index[provider] = index
        # A transition at this very instant: the half-open probe is admitted
        # in the instant the cooldown ends (an opening at this instant may
        # come after the call, so it is not held against it).
        same_instant = any(
            state != "open" for at, state in transitions[index:] if at == now
        )
        if self._breaker_state[provider] == "open" and not same_instant:
            self.breach(f"a call reached provider {provider!r} at t={now:.3f}s while its breaker was open")

    def on_served(self, request: CompletionRequest, completion: Completion) -> None:
        self.served[request.key.run_id][(request.key, request.attempt)] = (completion.usage, None)

    def on_fault(self, fault: InjectedFault) -> None:
        request = fault.request
        self.on_call(request.provider, fault.at, request)
        # As a real one: a 429 costs nothing, a cut or timed-out call is unknown.
        cost = ZERO_USAGE if fault.kind == "rate_limit" else None
        self.served[request.key.run_id][(request.key, request.attempt)] = (cost, fault.kind)
        if fault.retry_after is not None:
            self.on_rate_limit(request.provider, fault.at, fault.at + fault.retry_after)
        self.injected[fault.kind] += 1
        self.faulted[request.key][fault.kind] += 1
        key = request.key
        self.placement_rows.append((request.spec_id, key.stage, key.agent, request.attempt, fault.kind))

    # -- agent-side records --

    def on_request(self, item: Any) -> None:
        if isinstance(item, AgentRequest):
            self.requests[item.key.run_id][item.key] += 1

    def on_reply(self, item: Any) -> None:
        if isinstance(item, AgentReply):
            self.replies[item.key.run_id].append(item)
            kinds = self.faulted.pop(item.key, None)
            if item.output is not None and kinds:
                self.recovered.update(kinds)


def _placement_digest(rows: list[tuple[str, str, str, int, str]]) -> str:
    return hashlib.sha256(json.dumps(sorted(rows), separators=(",", ":")).encode()).hexdigest()


@attrs.define
class _RunOutcome:
    index: int
    digest: str
    status: str
    turns: int
    retries: int
    lost: int
    duplicate_decisions: int


def _check_run(
    checker: _Checker, store: Store, config: SoakConfig, run_id: str, result: Any
) -> _RunOutcome:
    """Check one finished run against the store and the taps; forget it."""
    requests = checker.requests.pop(run_id, collections.Counter())
    replies = checker.replies.pop(run_id, [])
    got = collections.Counter(r.key for r in replies)
    lost = sum(1 for key in requests if got[key] == 0)
    for key, n in requests.items():
        if n != 1:
            checker.breach(f"{key.agent} in {run_id}/{key.stage} was asked {n} times")
        if got[key] != 1:
            checker.breach(f"{key.agent} in {run_id}/{key.stage} ended in {got[key]} terminal states")
    for key in got.keys() - requests.keys():
        checker.breach(f"a reply for {key.agent} in {run_id}/{key.stage} that nobody asked for")
    limit = config.retry.max_attempts
    retries = 0
    for reply in replies:
        retries += reply.attempts - 1
        if reply.attempts > limit:
            checker.breach(f"{reply.key.agent} in {run_id}/{reply.key.stage} made {reply.attempts} attempts (limit {limit})")
    said = {reply.key: reply.attempts for reply in replies}
    for (key, attempt), n in checker.arrivals.pop(run_id, collections.Counter()).items():
        where = f"{key.agent} in {run_id}/{key.stage}"
        if n > 1:
            checker.breach(f"attempt {attempt} of {where} reached the provider {n} times")
        if attempt > said.get(key, 0):
            checker.breach(f"attempt {attempt} of {where} reached the provider, but its reply says {said.get(key, 0)}")

    decisions = store.decisions(run_id)
    answered = {(r.key.branch_id, r.key.stage, r.key.agent) for r in replies if r.output is not None}
    for d in decisions:
        early = [a for a in d.verdict.get("missing_agents") or () if (d.branch_id, d.stage, a) in answered]
        if early:
            checker.breach(f"{run_id}/{d.stage} was decided without {', '.join(early)}, who answered")
    per_key = collections.Counter((d.branch_id, d.stage) for d in decisions)
    duplicates = sum(n - 1 for n in per_key.values())
    if duplicates or len(per_key) != len(result.stages):
        checker.breach(
            f"{run_id} has {len(decisions)} decision(s) over {len(per_key)} stage key(s), "
            f"the run reports {len(result.stages)}"
        )
    # By name, in order: a stage decided under another name (one missing,
    # one that does not exist) kept the count.
    decided = [d.stage for d in sorted(decisions, key=lambda d: d.seq)]
    stages = checker.stage_names
    if decided != list(stages[: len(decided)]) or (result.status == "completed" and len(decided) != len(stages)):
        checker.breach(f"{run_id} decided {decided}, not the pipeline's stages {list(stages)} in order")

    usage = ZERO_USAGE
    unknown = 0
    rows = store.outputs(run_id)
    stored: dict[AgentKey, list[int]] = collections.defaultdict(list)
    served = checker.served.pop(run_id, {})
    for row in rows:
        row_key = AgentKey(run_id=row.run_id, branch_id=row.branch_id, stage=row.stage, agent=row.agent)
        stored[row_key].append(row.attempt)
        cost, fault = served.get((row_key, row.attempt), (None, None))
        # A completion or fault the agent never received (its call timeout
        # ended in the same instant) is rightly stored as unknown: only an
        # answer the agent accepted, or a fault it failed with, is held to it.
        received = row.status == "accepted" or (fault is not None and (row.error or "").startswith(f"{fault}:"))
        if received and row.usage != cost:
            checker.breach(
                f"attempt {row.attempt} of {row.agent} in {run_id}/{row.stage} stored usage "
                f"{None if row.usage is None else row.usage.as_dict()}, but the provider reported "
                f"{None if cost is None else cost.as_dict()}"
            )
    # The event log: each failed attempt but the last is a retry, and an
    # agent that never answered gave up once (events were never checked:
    # an agent that wrote none passed).
    # (Only these two kinds are read: the whole log, two events per agent
    # turn with each one's JSON detail decoded, was 2 % of a soak.)
    logged: collections.Counter[tuple[str, str, str, str | None]] = collections.Counter(
        (e.kind, e.branch_id, e.stage or "", e.agent) for e in store.iter_events(run_id, kinds=("retry", "gave_up"))
    )
    for reply in replies:
        k = reply.key
        retried = logged[("retry", k.branch_id, k.stage, k.agent)]
        gave_up = logged[("gave_up", k.branch_id, k.stage, k.agent)]
        if retried != reply.attempts - 1 or gave_up != (reply.output is None):
            checker.breach(
                f"{k.agent} in {run_id}/{k.stage} made {reply.attempts} attempt(s) and "
                f"{'gave up' if reply.output is None else 'answered'}, but the log has {retried} retry "
                f"and {gave_up} gave_up event(s)"
            )
    for key, attempts in said.items():
        if sorted(stored.get(key, ())) != list(range(1, attempts + 1)):
            checker.breach(
                f"{key.agent} in {run_id}/{key.stage} replied after {attempts} attempt(s), "
                f"stored {sorted(stored.get(key, ()))}"
            )
    for row in rows:
        if row.attempt > limit:
            checker.breach(f"stored attempt {row.attempt} of {row.agent} in {run_id} exceeds {limit}")
        if row.usage is None:
            unknown += 1
        else:
            usage = usage + row.usage
    if usage != result.usage or unknown != result.unknown_usage_calls:
        checker.breach(
            f"{run_id} usage totals {result.usage.as_dict()} (+{result.unknown_usage_calls} unknown) "
            f"!= per-attempt sum {usage.as_dict()} (+{unknown} unknown)"
        )
    if len(rows) != result.turns:
        checker.breach(f"{run_id} stored {len(rows)} attempts but counted {result.turns} turns")
    return _RunOutcome(
        index=-1,
        digest=result.digest,
        status=result.status,
        turns=result.turns,
        retries=retries,
        lost=lost,
        duplicate_decisions=duplicates,
    )


@contextmanager
def _database(config: SoakConfig, shard: int = 0) -> Iterator[Store]:
    """The shard's store: the file asked for (durability "normal"), kept;
    or, without ``config.db``, a scratch in-memory database nobody else
    opens and nobody keeps (durability "scratch": no syncs, one exclusive
    lock; no temporary file, whose WAL writes were 12 % of a soak).  The
    soak drops each run from a scratch store once checked, so it only
    ever holds the runs in flight."""
    if config.db is not None:
        path = config.db
        if config.shards > 1:
            root, ext = os.path.splitext(config.db)
            path = f"{root}-shard{shard}{ext}"
        with Store.open(path, durability="normal") as store:
            yield store
        return
    with Store.open(":memory:", durability="scratch") as store:
        yield store


@attrs.frozen(kw_only=True)
class ShardReport:
    """What one shard hands the merge (pickled back from its process):
    everything the merged report and its digests are built from."""

    shard: int
    shards: int
    concurrency: int
    outcomes: tuple[_RunOutcome, ...]  # index order
    injected: dict[str, int]
    recovered: dict[str, int]
    placement_rows: tuple[tuple[str, str, str, int, str], ...]
    breaches: tuple[str, ...]  # this shard's own: per-run checks, tasks left
    breaker_trips: int
    gate_waits: int
    wall_seconds: float
    virtual_seconds: float
    # Calls of runs that never finished (a stalled soak) asked and never
    # answered: lost, though no run check counted them.
    unanswered: int = 0


# Told (runs checked, agent turns in them) so far; reporting only.
Progress = Callable[[int, int], None]
# Told each breach as it is found (the first 50 of each worker), so a long
# soak need not run to its end to show that it failed; reporting only.
OnBreach = Callable[[str], None]

_F = TypeVar("_F", bound=Callable[..., None])


def guarded(callback: _F) -> _F:
    """``callback`` (a :data:`Progress` or :data:`OnBreach`), not called
    again once it raises: it is reporting, and a broken display must not
    fail a soak that holds."""
    broken = False

    def call(*args: Any) -> None:
        nonlocal broken
        if not broken:
            try:
                callback(*args)
            except Exception:
                broken = True

    return cast(_F, call)


# Virtual seconds (about 31,700 years): beyond any latency, backoff,
# breaker cooldown or reset hint a soak can be given.
_STALLED_AFTER = 1e12


def _unanswered(checker: _Checker) -> list[str]:
    """Calls of the runs not checked yet that were asked and never answered."""
    return sorted(
        f"{key.run_id}/{key.stage}/{key.agent}"
        for run, asked in checker.requests.items()
        for key in asked.keys() - {r.key for r in checker.replies.get(run, ())}
    )


def _stalled(unanswered: list[str], unfinished: int) -> str:
    shown = ", ".join(unanswered[:5]) + (f" and {len(unanswered) - 5} more" if len(unanswered) > 5 else "")
    return (
        f"the soak stalled with {unfinished} run(s) unfinished: nothing was left that could ever "
        f"happen (a lost reply or a deadlock); asked and never answered: {shown or 'none'}"
    )


def _run_id(config: SoakConfig, index: int) -> str:
    return f"soak-{config.seed}-{index:06d}"


def _require_virtual_clock() -> None:
    clock = trio.lowlevel.current_clock()
    if isinstance(clock, trio.testing.MockClock) and math.isfinite(clock.autojump_threshold):
        return
    what = "a MockClock without autojump" if isinstance(clock, trio.testing.MockClock) else "a real clock"
    raise ConfigError(
        f"the soak needs a virtual clock and this trio run has {what}: call run_soak(config), or"
        " trio.run(soak, config, clock=trio.testing.MockClock(autojump_threshold=0))"
    )


async def soak_shard(
    config: SoakConfig, shard: int = 0, progress: Progress | None = None, *, on_breach: OnBreach | None = None
) -> ShardReport:
    """Run shard ``shard`` of ``config.shards`` (its runs:
    ``config.shard_indices(shard)``, ``config.shard_concurrency`` at a time)
    in the current trio run, which must use a MockClock with autojump
    (:class:`~actors.ConfigError` before anything starts otherwise: on a
    real clock the soak's simulated hours would take hours).  ``progress``
    is called, synchronously, after each run is checked, and ``on_breach``
    as each breach is found (see :func:`guarded`)."""
    _require_virtual_clock()
    report = guarded(progress) if progress is not None else None
    started_wall = time.perf_counter()  # reporting only; never feeds a decision
    started = trio.current_time()
    tasks_before = trio.lowlevel.current_statistics().tasks_living
    pipeline = config.pipeline()
    health = HealthRegistry(config.breaker, gate_quantum=config.latency.quantum, max_wait=config.retry.max_wait)
    retry = config.retry if config.retry.quantum else attrs.evolve(config.retry, quantum=config.latency.quantum)
    checker = _Checker(config, health, guarded(on_breach) if on_breach is not None else None)
    sim = SimulatedProvider(seed=config.seed, disagreement_rate=config.disagreement_rate, latency=config.latency)
    provider = _RecordingProvider(sim, checker)
    faults = FaultInterceptor(config.faults, seed=config.seed, observer=checker.on_fault)
    outcomes: dict[int, _RunOutcome] = {}
    checked_turns = 0
    assigned = config.shard_indices(shard)
    concurrency = config.shard_concurrency

    scratch = config.db is None  # see _database
    with _database(config, shard) as store:
        if not scratch:
            # A file kept from an earlier soak of this seed holds its runs:
            # each would fail as RunExists, reported as a breach.
            taken = next((r for r in (_run_id(config, i) for i in assigned) if store.get_run(r)), None)
            if taken is not None:
                raise ConfigError(
                    f"the soak's database {store.path} already holds run {taken!r} from an earlier soak "
                    f"with seed {config.seed}: give this soak a new file or another seed"
                )
        async with open_orchestrator(
            store=store,
            provider=provider,
            pipeline=pipeline,
            seed=config.seed,
            faults=faults if config.faults.enabled else None,
            interceptors={"agent": [_Tap(checker.on_request)], "coordinator": [_Tap(checker.on_reply)]},
            retry=retry,
            health=health,
            # Events wait for the next acked write rather than commit alone;
            # longer than the latency grid's tick, so a tick's outputs
            # (not the hold's deadline, due on that tick) end the hold.
            limits=Limits(max_concurrency=10_000, store_hold=10.0),
        ) as orch:
            indices = iter(assigned)

            async def worker() -> None:
                nonlocal checked_turns
                for index in indices:
                    run_id = _run_id(config, index)
                    try:
                        result = await orch.run(f"SOAK-{index:06d}", run_id=run_id)
                    except Exception as exc:  # a breach to report with the seed, not a crash
                        checker.breach(f"{run_id} raised {type(exc).__name__}: {exc}")
                        faults.forget(run_id)
                        continue
                    outcome = _check_run(checker, store, config, run_id, result)
                    faults.forget(run_id)  # checked: its count budget is never read again
                    outcome.index = index
                    outcomes[index] = outcome
                    checked_turns += outcome.turns
                    if report is not None:
                        report(len(outcomes), checked_turns)
                    if scratch:
                        # Checked: nothing reads it again.  A store that
                        # keeps every run grew slower as it grew (8,000
                        # runs: 2,516 turns/s, against 2,980 dropping).
                        ack = await orch._drop_run(run_id)
                        if not ack.ok:
                            checker.breach(f"{run_id} could not be dropped from the scratch store: {ack.error}")

            # A lost reply (or any deadlock) leaves no task with a deadline,
            # so autojump has nowhere to jump and the soak would hang rather
            # than fail.  This is the latest deadline there is: the clock
            # reaches it only once nothing else can ever happen.
            with trio.move_on_after(_STALLED_AFTER) as stall:
                async with trio.open_nursery() as nursery:
                    for _ in range(min(concurrency, len(assigned))):
                        nursery.start_soon(worker)
            unanswered: list[str] = []
            if stall.cancelled_caught:
                unanswered = _unanswered(checker)
                checker.breach(_stalled(unanswered, len(assigned) - len(outcomes)))

    tasks_after = trio.lowlevel.current_statistics().tasks_living
    if tasks_after != tasks_before:
        checker.breach(f"{tasks_after - tasks_before} task(s) left running after the soak")
    trips = sum(
        sum(1 for _, state in h.breaker.transitions if state == "open") for h in health.providers().values()
    )
    return ShardReport(
        shard=shard,
        shards=config.shards,
        concurrency=min(concurrency, len(assigned)),  # runs actually in flight at once
        outcomes=tuple(outcomes[i] for i in sorted(outcomes)),
        injected=dict(checker.injected),
        recovered=dict(checker.recovered),
        placement_rows=tuple(checker.placement_rows),
        breaches=tuple(checker.breaches),
        breaker_trips=trips,
        gate_waits=sum(h.gate.waits for h in health.providers().values()),
        wall_seconds=time.perf_counter() - started_wall,
        virtual_seconds=trio.current_time() - started,
        unanswered=len(unanswered),
    )


def _why_never(config: SoakConfig, kind: FaultKind, outcomes: list[_RunOutcome]) -> str:
    # A small soak can simply draw no fault of a rare kind: say so, so it
    # is not taken for a broken injector.
    rate = config.faults.rates.get(kind)
    if not rate:
        return ""
    calls = sum(o.turns for o in outcomes)
    return f" ({calls:,} agent calls at {rate * 100:g}%: a soak this small may draw none; give it more --runs)"


def _why_unrecovered(config: SoakConfig, breaker_trips: int) -> str:
    # Configurations in which nobody can recover: say so, so they are not
    # taken for a broken retry.  (One attempt, or rates adding up to 100%,
    # SoakConfig refuses.)
    counted = sum(config.faults.counts.values())
    first = config.pipeline().stages[0]
    seats = len(first.agents) * config.retry.max_attempts
    if counted >= seats:
        return (
            f" ({counted} counted faults per run fire on its first calls: enough for every attempt "
            f"of stage {first.name!r} ({len(first.agents)} agents x {config.retry.max_attempts} attempts), "
            "so no call that met one is ever answered)"
        )
    # Each process has its own breaker and shard_concurrency runs in flight.
    in_flight = min(config.shard_concurrency, len(config.shard_indices(0)))
    if counted and breaker_trips and in_flight > 1:
        # The breaker doing its job: every run's counted faults fire on its
        # first calls, so runs started together fail together.
        where = " in each worker" if config.shards > 1 else ""
        # One run in flight per worker: --concurrency 1 with workers is
        # refused (each worker runs at least one).
        alone = config.shards
        return (
            f" (the circuit breaker opened {breaker_trips} time(s): counted faults fire on each run's first "
            f"calls, and {in_flight} runs in flight{where} met theirs at once, so the calls after them were "
            f"refused; with --concurrency {alone} each run meets its faults alone)"
        )
    return ""


def shard_breach(config: SoakConfig, shard: int, text: str) -> str:
    """A shard's breach as the merged report (and ``on_breach``) tell it."""
    return f"shard {shard} of {config.shards}: {text}" if config.shards > 1 else text


def merge_shards(
    config: SoakConfig, parts: list[ShardReport], failures: list[str], *, wall_seconds: float
) -> SoakReport:
    """One report from the shards' reports (``failures``: shards that never
    reported, already described).  The global invariants are checked here,
    on the merged totals; the digest is built as for one process: the runs
    in index order and the totals."""
    parts = sorted(parts, key=lambda p: p.shard)
    breaches = [shard_breach(config, p.shard, b) for p in parts for b in p.breaches] + list(failures)
    injected: collections.Counter[str] = collections.Counter()
    recovered: collections.Counter[str] = collections.Counter()
    for p in parts:
        injected.update(p.injected)
        recovered.update(p.recovered)
    ordered = sorted((o for p in parts for o in p.outcomes), key=lambda o: o.index)
    # No shard reported (each failure says why): no run ever started, and
    # "never injected" or "give it more --runs" would only mislead.
    checked = config.faults.kinds if parts or not failures else ()
    trips = sum(p.breaker_trips for p in parts)
    for kind in checked:
        if not injected[kind]:
            breaches.append(f"fault kind {kind} was configured but never injected{_why_never(config, kind, ordered)}")
        elif not recovered[kind]:
            breaches.append(f"no agent ever recovered from a {kind} fault{_why_unrecovered(config, trips)}")
    if len(ordered) != config.runs:
        breaches.append(f"{config.runs - len(ordered)} run(s) never finished")

    faults_by_kind: dict[str, int] = {k: injected.get(k, 0) for k in FAULT_KINDS}
    retries = sum(o.retries for o in ordered)
    turns = sum(o.turns for o in ordered)
    document = {
        "seed": config.seed,
        "runs": [[o.index, o.status, o.digest] for o in ordered],
        "turns": turns,
        "retries": retries,
        "faults": faults_by_kind,
    }
    digest = hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return SoakReport(
        seed=config.seed,
        runs=len(ordered),
        agent_turns=turns,
        faults=faults_by_kind,
        recovered={k: recovered.get(k, 0) for k in FAULT_KINDS},
        retries=retries,
        lost=sum(o.lost for o in ordered) + sum(p.unanswered for p in parts),
        duplicate_decisions=sum(o.duplicate_decisions for o in ordered),
        completed=sum(1 for o in ordered if o.status == "completed"),
        halted=sum(1 for o in ordered if o.status != "completed"),
        breaker_trips=trips,
        gate_waits=sum(p.gate_waits for p in parts),
        digest=digest,
        fault_digest=_placement_digest([row for p in parts for row in p.placement_rows]),
        wall_seconds=wall_seconds,
        virtual_seconds=max((p.virtual_seconds for p in parts), default=0.0),
        breaches=tuple(breaches),
        workers=config.shards,
        shards=tuple(
            ShardSummary(
                shard=p.shard,
                runs=len(p.outcomes),
                agent_turns=sum(o.turns for o in p.outcomes),
                concurrency=p.concurrency,
                wall_seconds=p.wall_seconds,
                virtual_seconds=p.virtual_seconds,
            )
            for p in parts
        ),
    )


async def soak(
    config: SoakConfig, progress: Progress | None = None, *, on_breach: OnBreach | None = None
) -> SoakReport:
    """Run the soak from a trio run.  One worker: in the current run, which
    must use a MockClock with autojump (:func:`run_soak` arranges that;
    :class:`~actors.ConfigError` otherwise, before anything runs).
    Several: in worker processes, waited for in a thread; cancelling the
    call kills them.  ``progress`` gets the runs checked and their turns,
    over all workers, and ``on_breach`` each breach as it is found (the
    first 50 of each worker), both from another thread when there are
    several workers.  The report lists the breaches again."""
    if config.shards > 1:
        from ._soak_shards import run_sharded_in_trio

        return await run_sharded_in_trio(config, progress=progress, on_breach=on_breach)
    part = await soak_shard(config, 0, progress, on_breach=on_breach)
    return merge_shards(config, [part], [], wall_seconds=part.wall_seconds)


def run_soak(
    config: SoakConfig, progress: Progress | None = None, *, on_breach: OnBreach | None = None
) -> SoakReport:
    """Run the soak: one worker in a fresh trio run on a virtual clock
    (autojump), several in as many processes, each with its own.
    ``progress`` and ``on_breach``: see :func:`soak`."""
    # Checked here: once running, a broken callback is dropped in silence
    # (see guarded), so a wrong one would never be heard of.
    if not isinstance(config, SoakConfig):
        raise TypeError(f"run_soak needs a SoakConfig, got {config!r}")
    for name, callback in (("progress", progress), ("on_breach", on_breach)):
        if callback is not None and not callable(callback):
            raise TypeError(f"{name} must be callable, got {callback!r}")
    if config.shards > 1:
        from ._soak_shards import run_sharded

        return run_sharded(config, progress=progress, on_breach=on_breach)
    return trio.run(
        functools.partial(soak, config, progress, on_breach=on_breach), clock=trio.testing.MockClock(autojump_threshold=0)
    )
