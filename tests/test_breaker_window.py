"""The breaker's failure window: deciding at an instant excludes that
instant's outcomes without scanning them (a stage reporting in one virtual
instant made that scan quadratic).  Checked against the straightforward
scan on random histories."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import BreakerPolicy, CircuitBreaker
from actors._breaker import State, Ticket


class ScanningBreaker(CircuitBreaker):
    """The reference: every admission and failure kept as its own time, and
    the window and this instant filtered out by a scan."""

    def __init__(self, policy: BreakerPolicy) -> None:
        super().__init__(policy)
        self.admitted: list[float] = []
        self.failed: list[float] = []

    def acquire(self, now: float) -> Ticket | float:
        if self.state == "closed" and not self._should_open(now):
            self.admitted.append(now)
        return super().acquire(now)

    def record(self, ticket: Ticket, now: float, *, failure: bool) -> None:
        if failure and not ticket.probe and ticket.generation == self.generation:
            self.failed.append(now)
        super().record(ticket, now, failure=failure)

    def _move(self, now: float, state: State) -> None:
        if state == "closed":
            self.admitted, self.failed = [], []
        super()._move(now, state)

    def _should_open(self, now: float) -> bool:
        horizon = now - self.policy.window
        total = sum(1 for t in self.admitted if horizon <= t < now)
        failures = sum(1 for t in self.failed if horizon <= t < now)
        return total >= self.policy.min_calls and failures >= self.policy.failure_rate * total


ops = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.sampled_from([0.0, 0.5, 1.0, 5.0, 31.0, 61.0])),
        st.tuples(st.just("call"), st.booleans()),
        st.tuples(st.just("acquire"), st.just(False)),
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, min_calls=st.integers(1, 6), rate=st.sampled_from([0.25, 0.5, 1.0]))
def test_same_decisions_as_scanning_the_window(ops: list[tuple[str, object]], min_calls: int, rate: float) -> None:
    policy = BreakerPolicy(failure_rate=rate, window=60.0, min_calls=min_calls, cooldown=30.0)
    fast, slow = CircuitBreaker(policy), ScanningBreaker(policy)
    now = 0.0
    for op, arg in ops:
        if op == "advance":
            now += float(arg)  # type: ignore[arg-type]
            continue
        a, b = fast.acquire(now), slow.acquire(now)
        assert a == b, (op, now)
        if op == "call" and not isinstance(a, float):
            fast.record(a, now, failure=bool(arg))
            slow.record(b, now, failure=bool(arg))  # type: ignore[arg-type]
    assert fast.transitions == slow.transitions


def test_one_instant_of_many_outcomes_is_not_counted_at_that_instant() -> None:
    breaker = CircuitBreaker(BreakerPolicy(failure_rate=0.5, window=60.0, min_calls=3, cooldown=30.0))
    for _ in range(5_000):
        ticket = breaker.acquire(10.0)
        assert not isinstance(ticket, float)
        breaker.record(ticket, 10.0, failure=True)
    assert breaker.state == "closed", "outcomes of this instant are not in yet"
    assert isinstance(breaker.acquire(10.5), float) and breaker.state == "open"


def test_a_burst_of_quick_failures_among_slow_calls_does_not_open_it() -> None:
    """200 calls go out at once; 20 disconnect at once, the rest answer two
    seconds later.  Counting finished calls only, the retries at 0.5 s saw
    100 % failures and opened the breaker: a 10 % fault rate failed whole
    runs (0 of 200 soak runs completed at disconnect:10%, concurrency 200)."""
    breaker = CircuitBreaker(BreakerPolicy(failure_rate=0.5, window=60.0, min_calls=20, cooldown=30.0))
    tickets = [breaker.acquire(0.0) for _ in range(200)]
    for ticket in tickets[:20]:
        breaker.record(ticket, 0.0, failure=True)  # type: ignore[arg-type]
    retries = [breaker.acquire(0.5) for _ in range(20)]
    assert breaker.state == "closed" and all(isinstance(t, Ticket) for t in retries)
    # A provider that fails everything still opens it.
    dead = CircuitBreaker(BreakerPolicy(failure_rate=0.5, window=60.0, min_calls=20, cooldown=30.0))
    for ticket in [dead.acquire(0.0) for _ in range(20)]:
        dead.record(ticket, 0.0, failure=True)  # type: ignore[arg-type]
    assert isinstance(dead.acquire(0.5), float) and dead.state == "open"


def test_half_open_probes_decide_by_their_failure_share() -> None:
    """Every call of the probe instant probes; the first outcome used to
    decide, and a quick failure always comes first: one disconnect among 50
    probes reopened the breaker for another cooldown."""
    breaker = CircuitBreaker(BreakerPolicy(failure_rate=0.5, window=60.0, min_calls=4, cooldown=30.0))
    for ticket in [breaker.acquire(0.0) for _ in range(4)]:
        breaker.record(ticket, 1.0, failure=True)  # type: ignore[arg-type]
    assert isinstance(breaker.acquire(2.0), float) and breaker.state == "open"
    probes = [breaker.acquire(32.0) for _ in range(50)]
    assert breaker.state == "half_open" and all(isinstance(p, Ticket) and p.probe for p in probes)
    for probe in probes[:5]:
        breaker.record(probe, 32.0, failure=True)  # type: ignore[arg-type]
    assert breaker.state == "half_open", "45 probes are still out"
    for probe in probes[5:30]:
        breaker.record(probe, 34.0, failure=False)  # type: ignore[arg-type]
    assert breaker.state == "half_open", "25 successes of 50 cannot yet rule out 50 % failures"
    breaker.record(probes[30], 34.0, failure=False)  # type: ignore[arg-type]
    assert breaker.state == "closed" and [s for _, s in breaker.transitions] == ["open", "half_open", "closed"]
    # ...and a failing majority reopens it as soon as it is one.
    again = CircuitBreaker(BreakerPolicy(failure_rate=0.5, window=60.0, min_calls=1, cooldown=30.0))
    first = again.acquire(0.0)
    again.record(first, 0.0, failure=True)  # type: ignore[arg-type]
    assert isinstance(again.acquire(1.0), float)
    probes = [again.acquire(31.0) for _ in range(4)]
    for probe in probes[:2]:
        again.record(probe, 31.0, failure=True)  # type: ignore[arg-type]
    assert again.acquire(31.5) == 29.5 and again.state == "open" and again.opened_at == 31.0


def test_a_probe_failing_at_once_does_not_refuse_the_rest_of_its_instant() -> None:
    """Which of one instant's calls came after a disconnected probe was
    trio's choice: refusing them made 'conclave soak --faults
    disconnect:100%' give different digests run to run."""
    import itertools

    seen = set()
    for order in itertools.permutations(range(3)):
        breaker = CircuitBreaker(BreakerPolicy(failure_rate=0.5, window=60.0, min_calls=1, cooldown=30.0))
        breaker.record(breaker.acquire(0.0), 0.0, failure=True)  # type: ignore[arg-type]
        assert isinstance(breaker.acquire(1.0), float)
        admitted = []
        for call in order:  # three calls at 31.0; each that gets through fails at once
            ticket = breaker.acquire(31.0)
            if isinstance(ticket, Ticket):
                admitted.append(call)
                breaker.record(ticket, 31.0, failure=True)
        seen.add((tuple(sorted(admitted)), breaker.acquire(32.0), tuple(breaker.transitions)))
    assert seen == {((0, 1, 2), 29.0, ((1.0, "open"), (31.0, "half_open"), (31.0, "open")))}


def test_a_verdict_is_dated_when_the_probes_reached_it_whatever_runs_first() -> None:
    """The probe failing at 31 decides it (1 of 2 at 50 %); at 40 a new
    call and the other probe's success come in one instant.  The reopening
    was dated 40 or 31 by which of them trio ran first, and with it the
    next cooldown."""
    def setup() -> tuple[CircuitBreaker, Ticket]:
        b = CircuitBreaker(BreakerPolicy(failure_rate=0.5, window=60, min_calls=1, cooldown=30))
        b.record(b.acquire(0.0), 0.0, failure=True)  # type: ignore[arg-type]
        assert isinstance(b.acquire(1.0), float)
        first, second = b.acquire(31.0), b.acquire(31.0)
        b.record(first, 31.0, failure=True)  # type: ignore[arg-type]
        return b, second  # type: ignore[return-value]

    b, second = setup()
    call_first = b.acquire(40.0)
    b.record(second, 40.0, failure=False)
    c, second = setup()
    c.record(second, 40.0, failure=False)
    outcome_first = c.acquire(40.0)
    assert call_first == outcome_first == 21.0
    assert b.transitions == c.transitions == [(1.0, "open"), (31.0, "half_open"), (31.0, "open")]


@pytest.mark.parametrize(("rate", "probes", "failures"), [(0.28, 25, 7), (0.07, 100, 7), (0.14, 50, 7)])
def test_every_probe_reported_always_gives_a_verdict(rate: float, probes: int, failures: int) -> None:
    # In floats neither 'failures >= rate * probes' nor 'successes >
    # (1 - rate) * probes' held: half-open for good, its waiters asleep.
    b = CircuitBreaker(BreakerPolicy(failure_rate=rate, window=60, min_calls=1, cooldown=30))
    b.record(b.acquire(0.0), 0.0, failure=True)  # type: ignore[arg-type]
    assert isinstance(b.acquire(1.0), float)
    tickets = [b.acquire(31.0) for _ in range(probes)]
    for i, ticket in enumerate(tickets):
        b.record(ticket, 32.0, failure=i < failures)  # type: ignore[arg-type]
    assert b.state in ("open", "closed")
