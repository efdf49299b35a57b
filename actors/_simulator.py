"""The embedded simulated provider.

Deterministic from (seed, spec, stage, agent, attempt): the *content* of an
answer depends on (seed, spec, stage, agent) only, so a retried or resumed
call gives the same answer; latency also depends on the attempt.  Latency
runs on trio's clock, so under ``MockClock(autojump_threshold=0)`` a
simulated hour costs milliseconds.
"""

from __future__ import annotations

import json
import math

import attrs
import trio

from messages import Completion, CompletionRequest, TokenUsage

from ._checks import check_number, check_seconds
from ._grid import on_grid, sleep_until_shared
from ._provider import BaseProvider
from ._rng import derive_rng, derive_token, derive_unit

_LIST_FIELDS = frozenset({"work_breakdown", "acceptance_mapping", "tasks", "issues", "requirements"})
_REASONING_MODELS = ("gpt-5", "o3", "o4", "gemini-2.5-pro")
# json.dumps(..., sort_keys=True) builds an encoder per call; the bytes are
# the same from one built once.
_encode_sorted = json.JSONEncoder(sort_keys=True).encode


@attrs.frozen(kw_only=True, slots=True)
class Latency:
    """Log-normal latency in seconds: ``median`` scaled, capped at ``cap``.
    ``median=0`` answers at once, without a schedule point: a zero-latency
    call is pure computation, and the gateway's worker then serves its
    whole queue in one step (it checkpoints between batches itself).

    ``quantum`` (seconds, 0 = off) ends each call on the next tick of a
    global grid of that spacing (``deadline``) instead of exactly ``draw``
    seconds after it started.  Continuous draws give every completion its
    own virtual deadline, and under ``MockClock(autojump_threshold=0)`` each
    distinct deadline is one trip round trio's run loop; on a grid, calls
    that end in the same tick wake together, on one shared timer (see
    ``_grid.sleep_until_shared``).  The draw is unchanged
    (same seed, same unit) and content never depends on it; only timings
    do.  Off by default so ``conclave run`` keeps its digests; the soak
    turns it on."""

    median: float = 2.0
    sigma: float = 0.5
    cap: float = 30.0
    quantum: float = 0.0

    def __attrs_post_init__(self) -> None:
        check_seconds(self.quantum, "latency quantum")
        check_seconds(self.median, "latency median")
        check_number(self.sigma, "latency sigma")
        check_number(self.cap, "latency cap")
        if not 0.0 <= self.sigma < math.inf:  # NaN fails too: it would draw NaN sleeps
            raise ValueError(f"latency sigma must be a finite number >= 0, got {self.sigma!r}")
        if not self.cap >= 0:
            raise ValueError(f"latency cap must be a number of seconds >= 0 (math.inf: none), got {self.cap!r}")

    def draw(self, unit: float) -> float:
        if self.median <= 0:
            return 0.0
        # Inverse-CDF of a log-normal from a uniform draw via the probit.
        z = _probit(min(max(unit, 1e-12), 1 - 1e-12))
        return min(self.cap, self.median * math.exp(self.sigma * z))

    def deadline(self, now: float, delay: float) -> float:
        """When a call started at ``now`` that takes ``delay`` ends: ``now +
        delay``, or with a quantum the first grid tick at or after it (a
        whole multiple of the quantum, so calls started at different times
        share ticks; never earlier than the drawn latency)."""
        return on_grid(now + delay, self.quantum)


def _probit(p: float) -> float:
    # Acklam's rational approximation: good to ~1e-9, plenty for latencies.
    a = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02,
         1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02,
         6.680131188771972e01, -1.328068155288572e01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00,
         -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00,
         3.754408661907416e00)
    if p < 0.02425:
        q = math.sqrt(-2 * math.log(p))
        return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
        )
    if p > 1 - 0.02425:
        return -_probit(1 - p)
    q = p - 0.5
    r = q * q
    return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / (
        ((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1
    )


class SimulatedProvider(BaseProvider):
    """Structured JSON answers with the stage's required fields, realistic
    token usage (cached and reasoning tokens included), seeded latency, and
    a ``disagreement_rate``: the chance that an agent answers the stage's
    decision field differently from the panel."""

    name = "sim"
    bills = False  # (see BaseProvider.bills)

    def __init__(
        self,
        *,
        seed: int = 0,
        disagreement_rate: float = 0.03,
        latency: Latency = Latency(),
    ) -> None:
        check_number(disagreement_rate, "disagreement_rate")
        if not 0.0 <= disagreement_rate <= 1.0:
            raise ValueError(f"disagreement_rate must be within [0, 1], got {disagreement_rate!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be a whole number, got {seed!r}")
        if not isinstance(latency, Latency):
            raise TypeError(f"latency must be a Latency, got {latency!r}")
        self.seed = seed
        self.disagreement_rate = disagreement_rate
        self.latency = latency
        self.calls = 0
        self._consensus: dict[tuple[str, str, str], str] = {}

    def _consensus_token(self, spec_id: str, stage: str, field: str) -> str:
        # One per (spec, stage, field), the same for every agreeing agent of
        # a panel: derive it once per panel rather than once per agent.
        ident = (spec_id, stage, field)
        token = self._consensus.get(ident)
        if token is None:
            if len(self._consensus) >= 4096:
                self._consensus.clear()
            token = self._consensus[ident] = derive_token(self.seed, "consensus", *ident)
        return token

    def answer(self, request: CompletionRequest) -> Completion:
        """The completion for ``request``, without the latency."""
        seed, key = self.seed, request.key
        ident = (request.spec_id, key.stage, key.agent)
        rng = derive_rng(seed, "content", *ident)
        rate = self.disagreement_rate
        # No draw can fall below a rate of 0; skipping it changes nothing.
        dissent = rate > 0.0 and derive_unit(seed, "dissent", *ident) < rate
        body: dict[str, object] = {"stage": key.stage, "agent": key.agent}
        for field in request.response_fields:
            if field in body:
                continue
            if field == request.decision_field and not dissent:
                token = self._consensus_token(request.spec_id, key.stage, field)
            else:
                token = derive_token(seed, "own", *ident, field)
            if field in _LIST_FIELDS:
                items = 2 + int(token[:2], 16) % 3  # from the token: agreeing agents agree wholly
                body[field] = [f"{field}-{i + 1}-{token}" for i in range(items)]
            else:
                body[field] = f"{field}-{token}"
        if request.aggregate:
            agreements = [f"{request.decision_field or 'stage'}: panel converges"]
            body["consensus"] = {"agreements": agreements, "conflicts": []}
        content = _encode_sorted(body)

        input_tokens = len(request.prompt) // 4 + 200 + rng.randrange(1000)
        cached = (input_tokens * rng.randrange(0, 60)) // 100
        output_tokens = len(content) // 4 + 100 + rng.randrange(700)
        reasoning = (
            (output_tokens * rng.randrange(10, 50)) // 100
            if request.model.startswith(_REASONING_MODELS)
            else 0
        )
        usage = TokenUsage.of(
            input_tokens=input_tokens,
            cached_input_tokens=cached,
            output_tokens=output_tokens,
            reasoning_output_tokens=reasoning,
        )
        return Completion(content=content, usage=usage, model=request.model)

    @property
    def answers_at_once(self) -> bool:  # type: ignore[override]
        """Without latency it never awaits (see BaseProvider)."""
        return self.latency.median <= 0

    async def complete(self, request: CompletionRequest) -> Completion:
        self.calls += 1
        key = request.key
        latency = self.latency
        delay = (
            latency.draw(derive_unit(self.seed, "latency", request.spec_id, key.stage, key.agent, request.attempt))
            if latency.median > 0
            else 0.0  # what draw() gives for any unit: skip deriving one
        )
        if delay > 0:
            if self.latency.quantum > 0:
                # On the grid, calls share their end: one timer per tick.
                await sleep_until_shared(self.latency.deadline(trio.current_time(), delay))
            else:
                await trio.sleep(delay)
        return self.answer(request)
