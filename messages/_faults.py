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
  when a stage's first call arrives the budget left (``R``) and the index
  of the next fault (``base``) are fixed.  Within the stage the calls are
  numbered ``p = (attempt - 1) * panel_size + seat``: every first attempt
  before any second attempt, seats in roster order.  The call numbered
  ``p`` gets fault ``base + p`` of the sequence if ``p < R``.  This is a
  pure function of identity, so the same calls get the same faults however
  trio interleaves a parallel stage; and a stage spreads its faults over
  its agents instead of burning one agent's every attempt.  "In order"
  therefore means this canonical order, which is the arrival order whenever
  calls cannot race (one agent at a time).

With a health port attached (the runtime attaches the gateway's), an
injected fault stands in for a provider call, so it is admitted exactly
like one: it waits at the provider's rate-limit gate, fails fast with
:class:`~messages.CircuitOpen` while the breaker is open, and reports its
outcome, so an injected 429 closes the gate for everyone and injected
disconnects count against the breaker.
"""

from __future__ import annotations

import collections
import datetime as _dt
import hashlib
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol

import attrs
import trio

from ._channel import Forward, Interceptor, Outbox
from ._errors import ConclaveError, Disconnected, ProviderError, ProviderTimeout, RateLimited
from ._messages import CompletionRequest, CompletionResult, PersistEvent
from ._usage import ZERO_USAGE

FaultKind = Literal["disconnect", "rate_limit", "timeout"]
FAULT_KINDS: tuple[FaultKind, ...] = ("disconnect", "rate_limit", "timeout")  # priority order
_LABELS: dict[str, FaultKind] = {
    "disconnect": "disconnect",
    "429": "rate_limit",
    "rate_limit": "rate_limit",
    "timeout": "timeout",
}
_SCOPE_ALIASES = frozenset({"spec_kit", "speckit", "auto_drive", "gateway"})
DEFAULT_TIMEOUT_MS = 30_000
CHANNEL = "gateway"

DISCONNECT_MESSAGE = "model stream error: stream disconnected before completion"


class FaultPlanError(ConclaveError, ValueError):
    """A fault setting is malformed; the message names the bad entry."""


# -- reset hints ---------------------------------------------------------------

_NUMBER = r"\d+(?:\.\d+)?"
_GO_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$")


@attrs.frozen(kw_only=True, slots=True)
class ResetHint:
    """When a 429's rate limit resets.

    ``relative``: ``seconds`` after each injected 429 (``120``, ``90s``,
    ``1500ms``, ``6m0s``).  ``anchored``: a fixed moment ``seconds`` after
    the run's first call on trio's clock (``now+90s``, or an RFC 3339 time,
    converted against the wall clock once at start-up; a past time is 0),
    so later 429s carry shorter hints, as in the reference.
    """

    mode: Literal["relative", "anchored"]
    seconds: float
    text: str


def _duration(text: str) -> float | None:
    """Seconds from ``120``, ``1.5``, ``90s``, ``1500ms``, ``6m0s``, ``1h2m``."""
    if re.fullmatch(_NUMBER, text):
        return float(text)
    match = _GO_DURATION.fullmatch(text)
    if match is None or not any(match.groups()):
        return None
    h, m, s, ms = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + s + ms / 1000


def parse_reset_hint(text: str, *, now: Callable[[], float] = time.time, source: str = "CODEX_FAULTS_429_RESET") -> ResetHint:
    """Parse a 429 reset hint: seconds (``120``), a duration (``90s``,
    ``1500ms``, ``6m0s``), ``now+90s`` / ``now+90``, or an RFC 3339 time.
    ``now`` is the wall clock, read only for RFC 3339 times."""
    raw = text.strip()
    if raw.lower().startswith("now+"):
        seconds = _duration(raw[4:].strip())
        if seconds is None:
            raise FaultPlanError(f"{source}: cannot read {text!r}: expected now+SECONDS, as in now+90s")
        return ResetHint(mode="anchored", seconds=seconds, text=raw)
    seconds = _duration(raw)
    if seconds is not None:
        return ResetHint(mode="relative", seconds=seconds, text=raw)
    try:
        moment = _dt.datetime.fromisoformat(raw.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        moment = None
    if moment is None or "T" not in raw.upper() or moment.tzinfo is None:
        raise FaultPlanError(
            f"{source}: cannot read {text!r} as a reset hint; expected seconds (120), "
            "now+90s, a duration (90s, 1500ms, 6m0s) or an RFC 3339 time with a zone "
            "(2026-11-29T17:00:00Z)"
        )
    return ResetHint(mode="anchored", seconds=max(0.0, moment.timestamp() - now()), text=raw)


# -- the plan -------------------------------------------------------------------


def _kind_mapping(value: Mapping[Any, Any] | None) -> Mapping[FaultKind, Any]:
    return dict(value or {})


@attrs.frozen(kw_only=True, slots=True)
class FaultPlan:
    """What to inject.  Off unless some count or rate is set.

    ``counts``: exactly that many faults of each kind per run (see the
    module docstring for placement).  ``rates``: the probability that a
    call gets that fault, drawn from its identity.  ``provider`` limits
    injection to one provider's calls (``None``: every provider).
    ``seed``: ``None`` means the orchestrator's seed.
    """

    counts: Mapping[FaultKind, int] = attrs.field(factory=dict, converter=_kind_mapping)
    rates: Mapping[FaultKind, float] = attrs.field(factory=dict, converter=_kind_mapping)
    provider: str | None = None
    seed: int | None = None
    reset: ResetHint | None = None
    timeout_ms: int = DEFAULT_TIMEOUT_MS

    def __attrs_post_init__(self) -> None:
        for kind, count in self.counts.items():
            if kind not in FAULT_KINDS:
                raise FaultPlanError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise FaultPlanError(f"fault count for {kind} must be a whole number >= 0, got {count!r}")
        for kind, rate in self.rates.items():
            if kind not in FAULT_KINDS:
                raise FaultPlanError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
            if not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0 or math.isnan(rate):
                raise FaultPlanError(f"fault rate for {kind} must be within [0, 1], got {rate!r}")
        if sum(self.rates.values()) > 1.0 + 1e-12:
            raise FaultPlanError(f"fault rates add up to more than 100%: {self.describe_kinds()}")
        if not isinstance(self.timeout_ms, int) or self.timeout_ms <= 0:
            raise FaultPlanError(f"fault timeout must be a whole number of ms > 0, got {self.timeout_ms!r}")

    @property
    def enabled(self) -> bool:
        return any(self.counts.values()) or any(self.rates.values())

    @property
    def kinds(self) -> tuple[FaultKind, ...]:
        """The kinds that can fire, in priority order."""
        return tuple(k for k in FAULT_KINDS if self.counts.get(k) or self.rates.get(k))

    @property
    def sequence(self) -> tuple[FaultKind, ...]:
        """The per-run count budget in firing order."""
        return tuple(k for k in FAULT_KINDS for _ in range(self.counts.get(k, 0)))

    def describe_kinds(self) -> str:
        parts = []
        for kind in FAULT_KINDS:
            label = "429" if kind == "rate_limit" else kind
            if self.counts.get(kind):
                parts.append(f"{label}:{self.counts[kind]}")
            if self.rates.get(kind):
                parts.append(f"{label}:{self.rates[kind] * 100:g}%")
        return ",".join(parts)

    def describe(self) -> str:
        """One line for the CLI banner."""
        if not self.enabled:
            return "fault injection off"
        text = f"FAULT INJECTION ACTIVE: {self.describe_kinds()} on the {CHANNEL} channel"
        text += f" (provider {self.provider})" if self.provider else " (every provider)"
        if self.counts.get("rate_limit") or self.rates.get("rate_limit"):
            text += f"; 429 reset {self.reset.text if self.reset else 'none'}"
        if self.counts.get("timeout") or self.rates.get("timeout"):
            text += f"; timeout {self.timeout_ms}ms"
        if self.seed is not None:
            text += f"; fault seed {self.seed}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "faults": self.describe_kinds(),
            "provider": self.provider,
            "seed": self.seed,
            "reset": self.reset.text if self.reset else None,
            "timeout_ms": self.timeout_ms,
        }

    @classmethod
    def parse(
        cls,
        spec: str,
        *,
        seed: int | None = None,
        scope: str | None = None,
        reset: str | ResetHint | None = None,
        timeout_ms: int | str | None = None,
        now: Callable[[], float] = time.time,
        source: str = "CODEX_FAULTS",
    ) -> FaultPlan:
        """Build a plan from the reference's syntax (``disconnect:3,429:1``)
        plus rates (``timeout:2.5%``).  Raises :class:`FaultPlanError` naming
        the bad entry."""
        counts: dict[FaultKind, int] = {}
        rates: dict[FaultKind, float] = {}
        for raw in spec.split(","):
            entry = raw.strip()
            if not entry:
                continue
            label, sep, value = entry.partition(":")
            kind = _LABELS.get(label.strip().lower())
            if kind is None:
                raise FaultPlanError(
                    f"{source}: unknown fault kind {label.strip()!r} in {entry!r}; "
                    "known: disconnect, 429 (or rate_limit), timeout"
                )
            value = value.strip()
            if not sep or not value:
                raise FaultPlanError(
                    f"{source}: bad count in {entry!r}: expected a whole number or a percentage, "
                    f"as in {label.strip()}:3 or {label.strip()}:5%"
                )
            # A repeated kind: the last entry wins, as in the reference.
            counts.pop(kind, None)
            rates.pop(kind, None)
            if re.fullmatch(r"\d+", value):
                counts[kind] = int(value)
            elif re.fullmatch(_NUMBER + "%", value) and float(value[:-1]) <= 100:
                rates[kind] = float(value[:-1]) / 100
            else:
                raise FaultPlanError(
                    f"{source}: bad count in {entry!r}: expected a whole number or a percentage "
                    "between 0% and 100%"
                )
        if sum(rates.values()) > 1.0 + 1e-12:
            raise FaultPlanError(f"{source}: fault rates in {spec!r} add up to more than 100%")
        provider = parse_scope(scope)
        hint = parse_reset_hint(reset, now=now) if isinstance(reset, str) and reset.strip() else (
            reset if isinstance(reset, ResetHint) else None
        )
        if timeout_ms is None or (isinstance(timeout_ms, str) and not timeout_ms.strip()):
            timeout = DEFAULT_TIMEOUT_MS
        elif isinstance(timeout_ms, int):
            timeout = timeout_ms
        elif re.fullmatch(r"\s*\d+\s*", timeout_ms):
            timeout = int(timeout_ms)
        else:
            raise FaultPlanError(f"CODEX_FAULTS_TIMEOUT_MS: expected a whole number of milliseconds, got {timeout_ms!r}")
        if timeout <= 0:
            raise FaultPlanError(f"CODEX_FAULTS_TIMEOUT_MS: must be greater than 0, got {timeout}")
        return cls(counts=counts, rates=rates, provider=provider, seed=seed, reset=hint, timeout_ms=timeout)

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        faults: str | None = None,
        seed: int | None = None,
        now: Callable[[], float] = time.time,
    ) -> FaultPlan:
        """The plan the environment describes, compatible with the reference:
        ``CODEX_FAULTS_SCOPE`` (default ``spec_kit``), ``CODEX_FAULTS``,
        ``CODEX_FAULTS_429_RESET``, ``CODEX_FAULTS_TIMEOUT_MS``, plus
        ``CODEX_FAULTS_SEED``.  ``faults``/``seed`` (the CLI's ``--faults``
        and ``--fault-seed``) override their variables.  Malformed values
        raise :class:`FaultPlanError`; nothing is silently ignored."""
        env = os.environ if env is None else env
        spec = faults if faults is not None else env.get("CODEX_FAULTS", "")
        if seed is None:
            raw_seed = env.get("CODEX_FAULTS_SEED", "").strip()
            if raw_seed:
                try:
                    seed = int(raw_seed)
                except ValueError:
                    raise FaultPlanError(f"CODEX_FAULTS_SEED: expected a whole number, got {raw_seed!r}") from None
        return cls.parse(
            spec,
            seed=seed,
            scope=env.get("CODEX_FAULTS_SCOPE"),
            reset=env.get("CODEX_FAULTS_429_RESET"),
            timeout_ms=env.get("CODEX_FAULTS_TIMEOUT_MS"),
            now=now,
            source="--faults" if faults is not None else "CODEX_FAULTS",
        )


def parse_scope(scope: str | None) -> str | None:
    """``spec_kit``, ``speckit``, legacy ``auto_drive`` or the channel name
    ``gateway`` select every provider call (returns ``None``);
    ``gateway:NAME`` selects one provider's calls (returns ``NAME``)."""
    if scope is None or not scope.strip():
        return None
    text = scope.strip().lower()
    if text in _SCOPE_ALIASES:
        return None
    if text.startswith(f"{CHANNEL}:") and text[len(CHANNEL) + 1 :].strip():
        return scope.strip()[len(CHANNEL) + 1 :].strip()
    raise FaultPlanError(
        f"CODEX_FAULTS_SCOPE: unknown scope {scope!r}; use spec_kit (or speckit, auto_drive), "
        f"the channel name {CHANNEL!r}, or {CHANNEL}:PROVIDER for one provider's calls"
    )


# -- the interceptor ----------------------------------------------------------------


class HealthPort(Protocol):
    """Admission control shared with the gateway (implemented in
    ``actors``): the rate-limit gate and the circuit breaker of each
    provider.  ``admit`` waits at the gate, then returns ``(permit, None)``
    or ``(None, CircuitOpen)``; every permit is then reported or abandoned."""

    async def admit(
        self, provider: str, request: CompletionRequest | None = None
    ) -> tuple[Any, ProviderError | None]: ...

    def report(self, permit: Any, error: ProviderError | None) -> None: ...

    def abandon(self, permit: Any) -> None: ...


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


@attrs.define(slots=True)
class _Stage:
    base: int
    budget: int
    panel: tuple[str, ...]


@attrs.define(slots=True)
class _Bucket:
    anchor: float
    decided: int = 0
    stages: dict[tuple[str, ...], _Stage] = attrs.field(factory=dict)
    by_kind: collections.Counter[FaultKind] = attrs.field(factory=collections.Counter)


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
        plan: FaultPlan,
        *,
        seed: int | None = None,
        health: HealthPort | None = None,
        events: Outbox[Any] | None = None,
        observer: Callable[[InjectedFault], None] | None = None,
    ) -> None:
        self.plan = plan
        self.seed = plan.seed if plan.seed is not None else (seed or 0)
        self.health = health
        self.events = events
        self.observer = observer
        self._sequence = plan.sequence
        self._rates = [(k, plan.rates[k]) for k in FAULT_KINDS if plan.rates.get(k)]
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self.injected: collections.Counter[str] = collections.Counter()
        self.decided: collections.Counter[str] = collections.Counter()

    # -- configuration and diagnostics --

    def attach(self, *, seed: int | None = None, health: HealthPort | None = None, events: Outbox[Any] | None = None) -> None:
        """Fill in what the runtime knows; settings given explicitly win."""
        if self.plan.seed is None and seed is not None:
            self.seed = seed
        self.health = self.health or health
        self.events = self.events or events

    @property
    def enabled(self) -> bool:
        return self.plan.enabled

    def remaining(self, run_id: str | None = None, branch_id: str | None = None) -> dict[str, int]:
        """Count faults not yet placed, per kind, in one run's budget (every
        branch of the run when ``branch_id`` is omitted; a run not seen yet
        has its whole budget left)."""
        left: dict[str, int] = {k: self.plan.counts.get(k, 0) for k in FAULT_KINDS}
        for (run, branch), bucket in self._buckets.items():
            if run == run_id and branch_id in (None, branch):
                for kind, used in bucket.by_kind.items():
                    left[kind] -= used
        return left

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
            or (self.plan.provider is not None and item.provider != self.plan.provider)
        ):
            await forward(item)
            return
        decision = self.decide(item)
        if decision is None:
            await forward(item)
            return
        kind, anchor = decision
        await self._inject(item, kind, anchor)

    def decide(self, request: CompletionRequest) -> tuple[FaultKind, float] | None:
        """Which fault ``request`` gets, if any; records count placements.
        Synchronous: no checkpoint between deciding and acting."""
        key = request.key
        bucket_key = (key.run_id, key.branch_id)
        bucket = self._buckets.get(bucket_key)
        if bucket is None:
            bucket = self._buckets[bucket_key] = _Bucket(anchor=trio.current_time())
        if self._sequence:
            # Without a panel naming the agent, the agent is a stage of its own.
            panel = request.panel if key.agent in request.panel else (key.agent,)
            stage_key = (key.stage, *panel)
            stage = bucket.stages.get(stage_key)
            if stage is None:
                # Every earlier stage of this run is over: its placements are final.
                stage = bucket.stages[stage_key] = _Stage(
                    base=bucket.decided, budget=len(self._sequence) - bucket.decided, panel=panel
                )
            size = len(panel)
            seat = panel.index(key.agent)
            position = (request.attempt - 1) * size + seat
            if position < stage.budget:
                kind = self._sequence[stage.base + position]
                bucket.decided += 1
                bucket.by_kind[kind] += 1
                self.decided[kind] += 1
                return kind, bucket.anchor
        if self._rates:
            draw = _unit(self.seed, "fault", CHANNEL, request.spec_id, key.stage, key.agent, request.attempt)
            edge = 0.0
            for kind, rate in self._rates:
                edge += rate
                if draw < edge:
                    self.decided[kind] += 1
                    return kind, bucket.anchor
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

    async def _inject(self, request: CompletionRequest, kind: FaultKind, anchor: float) -> None:
        reply = request.reply_to
        assert reply is not None
        permit = None
        if self.health is not None:
            # The injected fault stands in for a provider call: admitted
            # through the same gate and breaker as a real one.
            permit, blocked = await self.health.admit(request.provider, request)
            if blocked is not None:
                reply.send(
                    CompletionResult(key=request.key, attempt=request.attempt, error=blocked, usage=ZERO_USAGE)
                )
                return
        at = trio.current_time()
        retry_after = self._retry_after(anchor, at) if kind == "rate_limit" else None
        error = self._error(kind, retry_after)
        if self.observer is not None:
            self.observer(InjectedFault(at=at, request=request, kind=kind, error=error, retry_after=retry_after))
        try:
            if kind == "timeout":
                await trio.sleep(self.plan.timeout_ms / 1000)
        except BaseException:
            if self.health is not None:
                self.health.abandon(permit)
            raise
        if self.health is not None:
            self.health.report(permit, error)
        self.injected[kind] += 1
        if self.events is not None:
            key = request.key
            detail: dict[str, Any] = {"fault": kind, "message": str(error), "provider": request.provider}
            if retry_after is not None:
                detail["retry_after_s"] = round(retry_after, 3)
            try:
                await self.events.send(
                    PersistEvent(
                        run_id=key.run_id,
                        branch_id=key.branch_id,
                        kind="fault",
                        stage=key.stage,
                        agent=key.agent,
                        attempt=request.attempt,
                        detail=detail,
                    )
                )
            except ConclaveError:
                pass  # the store has stopped: the fault still happens
        # Usage of a faulted call is unknown: it may have been billed.
        reply.send(CompletionResult(key=request.key, attempt=request.attempt, error=error, usage=None))


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}".rstrip("0").rstrip(".")


