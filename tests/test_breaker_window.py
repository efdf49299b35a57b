"""The breaker's failure window: deciding at an instant excludes that
instant's outcomes without scanning them (a stage reporting in one virtual
instant made that scan quadratic).  Checked against the straightforward
scan on random histories."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from actors import BreakerPolicy, CircuitBreaker


class ScanningBreaker(CircuitBreaker):
    """The reference: exclude this instant's outcomes by scanning the tail."""

    def _should_open(self, now: float) -> bool:
        total, failures = self._in_window(now)
        for at, failed in reversed(self._outcomes):
            if at < now:
                break
            total -= 1
            failures -= failed
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
