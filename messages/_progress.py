"""Progress events published to subscribers (the CLI is one).

Delivery is best effort: the runtime sends with ``send_nowait`` and drops an
event when a subscriber's buffer is full, so a slow subscriber can never
slow a run.  The :class:`RunResult`-style return value and the store are
authoritative; progress is for humans.
"""

from __future__ import annotations

import attrs

from ._identity import AgentKey, StageKey
from ._messages import Decision
from ._token_metrics import BudgetAlert



@attrs.frozen(kw_only=True, slots=True)
class RunStarted:
    """A run, resume or rerun started driving ``branch_id`` through
    ``stages`` (the pipeline's, in order)."""

    run_id: str
    branch_id: str
    spec_id: str
    stages: tuple[str, ...]


@attrs.frozen(kw_only=True, slots=True)
class StageStarted:
    """A stage is about to dispatch its ``agents`` (``mode``:
    ``sequential`` or ``parallel``)."""

    key: StageKey
    agents: tuple[str, ...]
    mode: str


@attrs.frozen(kw_only=True, slots=True)
class AgentFinished:
    """The coordinator took an agent's reply: ``ok`` with an output after
    ``attempts`` attempts, or given up with ``error`` (kind: message);
    ``replayed``: an answer stored before a crash, reused on resume."""

    key: AgentKey
    attempts: int
    ok: bool
    error: str | None = None
    replayed: bool = False


@attrs.frozen(kw_only=True, slots=True)
class AgentRetrying:
    """Attempt ``attempt`` failed with ``error`` (kind: message) and the
    agent waits ``delay`` seconds on trio's clock (a reset hint's, or its
    backoff) before the next: without it a long 429 wait looked like a
    hang."""

    key: AgentKey
    attempt: int
    error: str
    delay: float


@attrs.frozen(kw_only=True, slots=True)
class CallWaiting:
    """Attempt ``attempt`` waits at ``provider``'s rate-limit gate, closed
    by a 429 (this run's or another's), for about ``delay`` seconds on
    trio's clock before it is made: the agent's own retry line gave only
    its backoff, and a long reset looked like a hang."""

    key: AgentKey
    attempt: int
    provider: str
    delay: float


@attrs.frozen(kw_only=True, slots=True)
class StageDecided:
    """A stage's decision, durable - or, on resume, one already stored
    (its ``decision`` is the stored one)."""

    decision: Decision


@attrs.frozen(kw_only=True, slots=True)
class RunFinished:
    """The drive ended with a result: ``status`` ``completed`` or
    ``halted`` (with ``halt_reason``).  Not published for a drive that was
    cancelled or failed."""

    run_id: str
    status: str
    halt_reason: str | None = None


ProgressEvent = (
    RunStarted | StageStarted | AgentFinished | AgentRetrying | CallWaiting | StageDecided | RunFinished | BudgetAlert
)
