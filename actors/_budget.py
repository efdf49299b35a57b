"""Run budgets: parsing, the dispatch gate and the halt it causes.

The metrics accumulator owns the spend and raises the 80/90/100 % alerts
(once each).  Enforcement is at the coordinator: before it dispatches an
agent request (before each agent of a sequential stage, before the whole
batch of a parallel one, unless a resumed stage's batch went out before
the crash) it asks the accumulator; the check is queued
behind every usage report already sent, so it sees all finished calls.  At
or over the budget nothing more is dispatched, the stage stays undecided
and the run halts with ``budget_exceeded``; resuming with a higher budget
continues from there.  Calls already in flight finish (with their retries),
so spend can pass the budget by at most what was in flight.  Calls to
unpriced models cost nothing as far as the budget can tell; they are
counted and reported as unpriced.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation

from messages import BudgetCheck, BudgetStatus, ConclaveError, Outbox, StageKey, reply_pair
from store import BranchRow, Store

from ._ids import shell_word

HALT_REASON = "budget_exceeded"

BudgetLike = Decimal | int | float | str


MAX_BUDGET = Decimal(10**12)


MIN_BUDGET = Decimal("1e-12")  # the smallest amount usd() shows


def parse_budget(value: BudgetLike | None) -> Decimal | None:
    """A budget in USD as an exact Decimal; ``None`` means unlimited."""
    if value is None:
        return None
    try:
        budget = Decimal(str(value).strip().lstrip("$"))
    except InvalidOperation:
        raise ValueError(f"budget must be a number of USD, got {value!r}") from None
    if not budget.is_finite() or budget < 0:
        raise ValueError(f"budget must be a finite amount of USD >= 0, got {value!r}")
    if budget == 0:
        budget = Decimal(0)  # "-0" was kept, and shown as "$-0.0000"
    if 0 < budget < MIN_BUDGET:
        # Amounts are shown to 12 places at most: it printed as $0.000000000000.
        raise ValueError(f"budget must be 0 or at least {MIN_BUDGET:f} USD, got {value!r}")
    if budget > MAX_BUDGET:
        # Past this, sums and percentages of it overflow Decimal's context
        # inside the metrics actor, mid-run; no budget needs it.
        raise ValueError(f"budget must be at most {MAX_BUDGET:,} USD, got {value!r}")
    return budget


def _places(amount: Decimal, places: int = 2) -> int:
    if not amount.is_finite():  # a hand-edited store: see _fixed
        return places
    if amount != 0 and abs(amount) < Decimal("0.01"):
        return max(places, min(max(4, 1 - amount.adjusted()), 12))
    return places


# Wide enough for any amount a run can reach at 12 places.
_ROUNDING = Context(prec=60, rounding=ROUND_HALF_UP)


def _fixed(amount: Decimal, places: int) -> str:
    # Half up, as money is read: Decimal's own half-even format showed
    # $0.045 as "$0.04", and "90% used ($0.04 of $0.05)" read as 80 %.
    try:
        return f"{amount.quantize(Decimal(1).scaleb(-places), context=_ROUNDING):f}"
    except InvalidOperation:
        # Past the context, or not finite (a hand-edited store): shown as
        # Decimal shows it, rather than failing the command that shows it.
        return f"{amount:.{places}f}"


def usd(amount: Decimal, places: int = 2) -> str:
    """``$0.12``; amounts below a cent get more places (``$0.0042``), as
    many as show two significant digits (``$0.000012``: a budget of
    $0.00001 read "$0.0000" in the very message that it was spent).
    Halves round up."""
    return f"${_fixed(amount, _places(amount, places))}"


def usd_of(spent: Decimal, budget: Decimal, places: int = 2, *, joint: str = " of ") -> str:
    """``spent`` and ``budget`` to the same places: "$0.01 of $0.0050"
    read as twice the budget when it was just over it."""
    shown = max(_places(spent, places), _places(budget, places))
    # More places while different amounts read the same: "90% used ($0.05
    # of $0.05)" was printed for $0.045 spent, as if all of it were.
    while shown < 12 and spent != budget and _fixed(spent, shown) == _fixed(budget, shown):
        shown += 1
    return f"${_fixed(spent, shown)}{joint}${_fixed(budget, shown)}"


class BudgetExceeded(ConclaveError):
    """Raised by the gate: the run's budget is spent."""

    def __init__(self, status: BudgetStatus, stage: str, agents: tuple[str, ...]) -> None:
        self.status = status
        self.stage = stage
        self.agents = agents
        budget = status.budget_usd if status.budget_usd is not None else Decimal(0)
        super().__init__(
            f"budget exceeded: {usd_of(status.spent_usd, budget, 4, joint=' spent of ')} before dispatching "
            f"{', '.join(agents)} in stage {stage!r}"
        )


Gate = Callable[[StageKey, tuple[str, ...]], Awaitable[None]]


def budget_gate(metrics: Outbox[BudgetCheck]) -> Gate:
    """The coordinator's gate: raises :class:`BudgetExceeded` when spent."""

    async def gate(key: StageKey, agents: tuple[str, ...]) -> None:
        reply, pending = reply_pair("budget check")
        await metrics.send(BudgetCheck(run_id=key.run_id, reply_to=reply))
        status: BudgetStatus = await pending.receive()
        if status.exceeded:
            raise BudgetExceeded(status, key.stage, agents)

    return gate


def budget_halt_message(run_id: str, exc: BudgetExceeded) -> str:
    return (
        f"halted at stage {exc.stage!r}: {exc}. Nothing more was dispatched; resume with a "
        f"higher budget: 'conclave resume {shell_word(run_id)} --budget USD'."
    )


def stored_budget(store: Store, branch: BranchRow) -> Decimal | None:
    """The budget ``branch`` runs under: the last one a resume replaced it
    with (kept on that resume's event), else the one it was started with."""
    raw = branch.options.get("budget_usd")
    for event in store.events(branch.run_id, kind="resume"):
        if event.branch_id == branch.branch_id and event.detail.get("budget_usd") is not None:
            raw = event.detail["budget_usd"]
    return None if raw is None else Decimal(str(raw))
