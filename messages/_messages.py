"""The messages that cross Conclave's channels, one class per edge.

All are frozen, slotted and keyword-only.  Each carries its identity
(:class:`~messages.StageKey` / :class:`~messages.AgentKey` plus ``attempt``
where it applies).  Requests carry a :class:`~messages.Reply` slot; the flow
is drawn in DESIGN.md:

    coordinator --AgentRequest--> agent --CompletionRequest--> gateway
    agent --AgentReply--> coordinator
    agent --UsageRecorded--> metrics accumulator
    agent --PersistOutput--> store writer --StoreAck--> agent
    coordinator --PersistDecision--> store writer --StoreAck--> coordinator
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any, Literal, get_args

import attrs

from ._channel import Outbox, Reply
from ._errors import ProviderError
from ._identity import AgentKey, StageKey
from ._token_metrics import BudgetCheck, GroupTotals, SetBudget
from ._usage import TokenUsage

OutputFormat = Literal["json", "text"]
OutputStatus = Literal["accepted", "failed"]
DecisionStatus = Literal["ok", "conflict", "degraded", "no_consensus"]



def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if type(value) is int and value >= 1:
        return  # the usual case, without two isinstance calls (3 checks per agent turn)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{attribute.name} must be an int >= 1, got {value!r}")


@attrs.frozen(kw_only=True, slots=True)
class PriorOutput:
    """An earlier agent's output as later agents of a sequential stage are
    shown it (its JSON object, or its text cut: see
    ``actors._agent.for_later_agents``)."""

    agent: str
    content: str


def _a_pause(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
        raise ValueError(f"{attribute.name} must be a finite number of seconds >= 0, got {value!r}")


@attrs.frozen(kw_only=True, slots=True)
class AgentRequest:
    """Coordinator -> agent: answer this stage."""

    key: AgentKey
    spec_id: str
    goal: str
    context: tuple[PriorOutput, ...] = ()
    # On resume: attempts below this one are already durable (failed), so
    # the agent continues the numbering instead of re-buying them.
    first_attempt: int = attrs.field(default=1, validator=_positive)
    # On resume: the pause (seconds) the last durable attempt's failure
    # earned, taken before the first new attempt, as the run would have.
    first_wait: float = attrs.field(default=0.0, validator=_a_pause)
    # The coordinator's well-known inbox (not a one-shot slot): a parallel
    # stage collects every agent's reply from one channel.
    reply_to: Outbox[AgentReply] | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(kw_only=True, slots=True)
class AgentOutput:
    """What one attempt of one agent produced."""

    key: AgentKey
    attempt: int = attrs.field(validator=_positive)
    status: OutputStatus = attrs.field(validator=attrs.validators.in_(get_args(OutputStatus)))
    content: str
    format: OutputFormat = attrs.field(validator=attrs.validators.in_(get_args(OutputFormat)))
    usage: TokenUsage | None  # None: usage unknown (call cut off mid-stream)
    model: str
    provider: str
    error: str | None = None
    started_at: float = 0.0  # trio clock, for latency; not persisted as a timestamp
    finished_at: float = 0.0


@attrs.frozen(kw_only=True, slots=True)
class AgentReply:
    """Agent -> coordinator: the agent's final word for this stage.

    ``output`` is the accepted output, or ``None`` when every attempt failed
    (``error`` says why).  ``replayed`` marks an output reused from the store.
    """

    key: AgentKey
    attempts: int
    output: AgentOutput | None
    error: str | None = None
    replayed: bool = False

    def __attrs_post_init__(self) -> None:
        # An interceptor may answer an agent's request itself: a wrong reply
        # fails where it is built, not later inside the coordinator.  (With a
        # failure: decisions read stored outputs, so an output it makes up
        # fails the run, actors.AnswerNotStored.)
        _check_answer(self.key, "attempts", self.attempts, 0)
        _check_optional("output", self.output, AgentOutput, "an AgentOutput")
        _check_optional("error", self.error, str, "a string")


def _check_answer(key: object, name: str, count: object, least: int) -> None:
    """The identity of an answer built outside the agent (an interceptor's)."""
    if not isinstance(key, AgentKey):
        raise ValueError(f"key must be an AgentKey, got {key!r}")
    if not isinstance(count, int) or isinstance(count, bool) or count < least:
        raise ValueError(f"{name} must be an int >= {least}, got {count!r}")


def _check_optional(name: str, value: object, cls: type, what: str) -> None:
    if value is not None and not isinstance(value, cls):
        raise ValueError(f"{name} must be {what} or None, got {type(value).__name__}")


# More tokens than any one call has used: a count above it is a provider's
# bug, and a few of them would overflow SQLite's 64-bit totals.
MAX_CALL_TOKENS = 10**12


def storable_text(text: str) -> str:
    """``text`` with lone surrogates (half of a split pair, or an undecodable
    byte smuggled through ``surrogateescape``) replaced by U+FFFD: SQLite
    holds UTF-8, which has no spelling for them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _storable(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{attribute.name} is not valid Unicode: a lone surrogate at index {exc.start}"
            " (repair it with messages.storable_text)"
        ) from None


def implausible_usage(usage: TokenUsage) -> str | None:
    """Why ``usage`` cannot be one call's, or None."""
    for name, count in usage.as_dict().items():
        if count > MAX_CALL_TOKENS:
            return f"usage {name} of {count} is more than one call can use ({MAX_CALL_TOKENS})"
    return None


def _plausible_usage(instance: object, attribute: attrs.Attribute[TokenUsage], value: TokenUsage) -> None:
    problem = implausible_usage(value)
    if problem is not None:
        raise ValueError(problem)


@attrs.frozen(kw_only=True, slots=True)
class Completion:
    """A provider's answer to one call.  Checked when built: a provider of
    an embedding app that builds a wrong one fails that call (the gateway
    reports it as the provider's bug), not the metrics or store actor that
    would read it later."""

    content: str = attrs.field(validator=[attrs.validators.instance_of(str), _storable])
    usage: TokenUsage | None = attrs.field(
        validator=attrs.validators.optional([attrs.validators.instance_of(TokenUsage), _plausible_usage])
    )
    model: str = attrs.field(validator=[attrs.validators.instance_of(str), _storable])
    # The model the provider asked for, when not the one the agent named (a
    # provider bound to one model): priced if the server's name for it is
    # unknown.  None: the agent's own.
    requested_model: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(str))
    )


@attrs.frozen(kw_only=True, slots=True)
class CompletionRequest:
    """Agent -> provider gateway: make one model call (one attempt)."""

    key: AgentKey = attrs.field(validator=attrs.validators.instance_of(AgentKey))
    attempt: int = attrs.field(validator=_positive)
    spec_id: str
    provider: str
    model: str
    prompt: str
    # The structured answer asked for: its fields, the one the coordinator
    # compares, and whether this agent also aggregates the panel's views.
    response_fields: tuple[str, ...] = ()
    decision_field: str | None = None
    aggregate: bool = False
    # The stage's panel in roster order: with ``key.agent`` it gives the
    # call's seat, part of its identity for deterministic fault placement.
    panel: tuple[str, ...] = ()
    # Each seat's provider, in the same order (empty: unknown), so that a
    # fault plan scoped to one provider places faults over its seats only.
    panel_providers: tuple[str, ...] = ()
    # When (trio time) the caller stops waiting for the answer: a call whose
    # wait at a closed rate-limit gate would outlast it fails fast instead
    # (see actors._health).  Not part of the identity.
    deadline: float = attrs.field(default=float("inf"), eq=False)
    reply_to: Reply[CompletionResult] | None = attrs.field(default=None, eq=False, repr=False)
    # Set by a fault interceptor that answers for the provider: the gateway
    # serves the call like any other - queued for one of the provider's
    # workers, in arrival order - but runs this instead of the provider.
    injection: Injection | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(kw_only=True, slots=True)
class Injection:
    """An injected fault waiting to stand in for a provider call.  ``run``
    fires it (admitted at the gate and breaker, answered, reported);
    ``withdraw`` says it never will (its caller gave up while it was
    queued, or the gateway stopped), so a counted fault goes back."""

    run: Callable[[], Awaitable[None]]
    withdraw: Callable[[], None]


def _check_result(result: CompletionResult) -> None:
    _check_answer(result.key, "attempt", result.attempt, 1)
    _check_optional("completion", result.completion, Completion, "a Completion")
    _check_optional("error", result.error, ProviderError, "a ProviderError")
    _check_optional("usage", result.usage, TokenUsage, "a TokenUsage")
    if result.usage is not None:
        problem = implausible_usage(result.usage)
        if problem is not None:
            raise ValueError(problem)
    _check_optional("model", result.model, str, "a string")
    _check_optional("requested_model", result.requested_model, str, "a string")


@attrs.frozen(kw_only=True, slots=True)
class CompletionResult:
    """Provider gateway (or an interceptor answering for it) -> agent.

    Exactly one of ``completion`` and ``error`` is set.  ``usage`` on a
    failure is what the failed call consumed, ``None`` when unknown;
    ``model`` the model that answered it, when the server named one (the
    usage is priced as that model's, as a completion's is), and
    ``requested_model`` the one a provider bound to a model asked for (see
    :class:`Completion`).
    """

    key: AgentKey
    attempt: int
    completion: Completion | None = None
    error: ProviderError | None = None
    usage: TokenUsage | None = None
    model: str | None = None
    requested_model: str | None = None

    def __attrs_post_init__(self) -> None:
        # Checked when built, as a Completion is: an interceptor answering
        # for the gateway with a wrong one crashed the shared store writer
        # (usage="lots") or billed 10**15 tokens.
        if (self.completion is None) == (self.error is None):
            raise ValueError("exactly one of completion and error must be set")
        _check_result(self)


@attrs.frozen(kw_only=True, slots=True)
class UsageRecorded:
    """Agent -> metrics accumulator: one attempt's usage, charged once by
    (key, attempt).  ``usage`` is ``None`` when unknown; ``replay`` marks an
    output reused from the store (counted, not charged as a new turn).
    ``model`` is the model that answered (as the server names it);
    ``requested_model`` the one asked for, priced when the price table does
    not know the server's name for it."""

    key: AgentKey
    attempt: int
    model: str
    provider: str
    usage: TokenUsage | None
    replay: bool = False
    requested_model: str | None = None


@attrs.frozen(kw_only=True, slots=True)
class UsageTotals:
    """Metrics accumulator -> requester: a run's usage so far.

    ``usage`` sums every attempt whose usage is known; ``unknown_calls``
    counts attempts whose usage is unknown (never summed as zero).
    ``by_stage`` maps stage -> summed known usage.
    """

    run_id: str
    usage: TokenUsage
    unknown_calls: int
    turns: int
    replays: int
    duplicates: int
    by_stage: Mapping[str, TokenUsage] = attrs.field(eq=False, factory=dict)
    # Cost and the per-stage/agent/model breakdown (issue 4): ``groups`` maps
    # "stage" | "agent" | "model" -> name -> totals.
    cost_usd: Decimal = Decimal(0)
    unpriced_calls: int = 0
    unpriced_models: tuple[str, ...] = ()
    budget_usd: Decimal | None = None
    alerts: tuple[int, ...] = ()
    price_table: str = ""
    estimated_next_prompt_tokens: int = 0
    groups: Mapping[str, Mapping[str, GroupTotals]] = attrs.field(eq=False, factory=dict)


@attrs.frozen(kw_only=True, slots=True)
class MetricsQuery:
    """Anyone -> metrics accumulator: what are ``run_id``'s totals?"""

    run_id: str
    forget: bool = False  # drop the run's state after answering
    reply_to: Reply[UsageTotals] | None = attrs.field(default=None, eq=False, repr=False)


MetricsMessage = UsageRecorded | MetricsQuery | SetBudget | BudgetCheck


@attrs.frozen(kw_only=True, slots=True)
class StoreAck:
    """Store writer -> requester: the write is durable (``ok``), was a
    duplicate of a durable row (``duplicate``), or failed (``error``)."""

    ok: bool
    duplicate: bool = False
    error: str | None = None


@attrs.frozen(kw_only=True, slots=True)
class PersistOutput:
    """Agent -> store writer: make this attempt's output durable."""

    output: AgentOutput
    reply_to: Reply[StoreAck] | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(kw_only=True, slots=True)
class Decision:
    """The one decision of a stage.  ``verdict`` is JSON-ready."""

    key: StageKey
    seq: int = attrs.field(validator=_positive)
    status: DecisionStatus = attrs.field(validator=attrs.validators.in_(get_args(DecisionStatus)))
    verdict: Mapping[str, Any] = attrs.field(eq=False)


@attrs.frozen(kw_only=True, slots=True)
class PersistDecision:
    """Coordinator -> store writer: make this decision durable."""

    decision: Decision
    reply_to: Reply[StoreAck] | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(kw_only=True, slots=True)
class PersistEvent:
    """Anyone -> store writer: append to the run's event log (fire and
    forget unless ``reply_to`` is given)."""

    run_id: str
    branch_id: str
    kind: str
    stage: str | None = None
    agent: str | None = None
    attempt: int | None = None
    detail: Mapping[str, Any] = attrs.field(factory=dict, eq=False)
    reply_to: Reply[StoreAck] | None = attrs.field(default=None, eq=False, repr=False)
    # When it happened (epoch ms, wall clock: data for the log, read by no
    # logic).  Stamped when made: the writer holds events up to a second
    # before a commit, and a retry logged at its commit read as a second
    # after the 429 it followed.
    at_ms: int = attrs.field(factory=lambda: time.time_ns() // 1_000_000, eq=False)

    @classmethod
    def of_attempt(cls, key: AgentKey, attempt: int, kind: str, detail: Mapping[str, Any]) -> PersistEvent:
        """The event of one agent attempt (a call, a fault, a retry): its
        identity comes from the attempt's key."""
        return cls(
            run_id=key.run_id,
            branch_id=key.branch_id,
            kind=kind,
            stage=key.stage,
            agent=key.agent,
            attempt=attempt,
            detail=detail,
        )


@attrs.frozen(kw_only=True, slots=True)
class RunUpdate:
    """Coordinator -> store writer: the run's status changed."""

    run_id: str
    status: str
    halt_reason: str | None = None
    usage: TokenUsage | None = None
    digest: str | None = None
    reply_to: Reply[StoreAck] | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(kw_only=True, slots=True)
class PersistRun:
    """Runtime -> store writer: a new run and its root branch."""

    run_id: str
    branch_id: str
    spec_id: str
    goal: str
    seed: int | None
    pipeline: str  # canonical JSON of the pipeline the run uses
    # JSON of what else a resume needs to act alike (e.g. simulator settings).
    options: str = "{}"
    reply_to: Reply[StoreAck] | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(kw_only=True, slots=True)
class PersistBranch:
    """Runtime -> store writer: fork a child branch of a run at
    ``fork_stage`` and make it the run's current branch."""

    run_id: str
    branch_id: str
    parent_branch_id: str
    fork_stage: str
    options: str = "{}"
    reply_to: Reply[StoreAck] | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(kw_only=True, slots=True)
class DropRun:
    """Owner -> store writer: delete a finished run and everything stored
    for it (branches, outputs, decisions, events).  The soak drops each run
    from its scratch store once checked, so that store only ever holds the
    runs in flight; nothing in a real run drops anything."""

    run_id: str
    reply_to: Reply[StoreAck] | None = attrs.field(default=None, eq=False, repr=False)


StoreWrite = PersistRun | PersistBranch | PersistOutput | PersistDecision | PersistEvent | RunUpdate | DropRun
