"""Edges of the circuit breaker the other breaker tests step around: the
last abandoned probe waking its waiters, a probe failing in its own
instant, stale outcomes after a close, snapshots with a probe out, the
window cleared on close, the window's exact boundary, and the time left
a refused resend reports after the cooldown."""

from __future__ import annotations

import trio
import trio.testing

from actors import BreakerPolicy, CircuitBreaker
from actors._breaker import Ticket


def tripped(policy: BreakerPolicy, *, at: float = 1.0) -> CircuitBreaker:
    """A breaker opened at ``at`` by one call failing at 0 (``min_calls=1``)."""
    assert policy.min_calls == 1
    breaker = CircuitBreaker(policy)
    first = breaker.acquire(0.0)
    assert isinstance(first, Ticket)
    breaker.record(first, 0.0, failure=True)
    assert isinstance(breaker.acquire(at), float) and breaker.state == "open"
    return breaker


def probe(breaker: CircuitBreaker, now: float) -> Ticket:
    ticket = breaker.acquire(now)
    assert isinstance(ticket, Ticket) and ticket.probe, ticket
    return ticket


POLICY = BreakerPolicy(failure_rate=0.5, window=60.0, min_calls=1, cooldown=30.0)


async def test_releasing_the_last_probe_wakes_the_callers_waiting_for_its_verdict(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A caller in half-open sleeps in ``wait_for_verdict`` until the probe
    reports.  A probe abandoned instead (its caller cancelled) gives no
    verdict: if releasing it did not wake the waiters, they slept for ever
    and the provider took no call again."""
    breaker = tripped(POLICY)
    ticket = probe(breaker, 31.0)
    woken: list[str] = []

    async def waiter() -> None:
        await breaker.wait_for_verdict()
        woken.append("woken")

    with trio.fail_after(600):  # a waiter left asleep would hang the test
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert woken == [], "no verdict yet: the probe is out"
            breaker.release(ticket, 31.5)
    assert woken == ["woken"]
    assert probe(breaker, 32.0).probe, "the freed slot goes to the next caller"


def test_a_probe_failing_in_its_own_instant_still_counts_when_another_probe_arrives() -> None:
    """Probe A fails at once (a disconnect) at 31; probe B arrives in that
    same instant and later succeeds.  1 failure of 2 at 50 % reopens the
    breaker.  Starting a fresh probe instant whenever no probe was out
    (even in the same instant) forgot A's failure, so B's success alone
    closed the breaker on a provider failing half its calls - and which
    calls were forgotten depended on trio's order."""
    breaker = tripped(POLICY)
    first = probe(breaker, 31.0)
    breaker.record(first, 31.0, failure=True)
    assert breaker.state == "half_open", "its instant is not over"
    second = probe(breaker, 31.0)
    breaker.record(second, 32.0, failure=False)
    assert breaker.state == "open"
    assert breaker.transitions == [(1.0, "open"), (31.0, "half_open"), (31.0, "open")]


def test_a_failure_admitted_before_the_breaker_closed_does_not_count_after() -> None:
    """A call admitted while closed, still out across open, half-open and
    closed again, then failing, is stale: counted in the new window, it
    (with one fresh call, min_calls=1) reopened the breaker on a provider
    that had just passed its probe."""
    breaker = CircuitBreaker(POLICY)
    slow = breaker.acquire(0.0)
    quick = breaker.acquire(0.0)
    assert isinstance(slow, Ticket) and isinstance(quick, Ticket)
    breaker.record(quick, 0.0, failure=True)
    assert isinstance(breaker.acquire(1.0), float)  # 1 of 2 failed: open
    good = probe(breaker, 31.0)
    breaker.record(good, 32.0, failure=False)
    assert breaker.state == "closed"
    fresh = breaker.acquire(33.0)
    assert isinstance(fresh, Ticket)
    breaker.record(slow, 34.0, failure=True)  # admitted two transitions ago
    assert breaker.failure_ratio == 0.0
    assert isinstance(breaker.acquire(35.0), Ticket) and breaker.state == "closed"


def test_a_probe_reporting_after_the_verdict_leaves_the_breaker_consistent() -> None:
    """Two probes at 31: one fails at once, which decides it (1 of 2 at 50 %).
    The other's success comes at 32, after that verdict: it is stale.
    Counted anyway, it took the reopened breaker's probes_out below zero,
    and every later snapshot was refused (a resume could not take it up)."""
    breaker = tripped(POLICY)
    first, second = probe(breaker, 31.0), probe(breaker, 31.0)
    breaker.record(first, 31.0, failure=True)
    breaker.record(second, 32.0, failure=False)
    assert breaker.state == "open" and breaker.opened_at == 31.0
    assert breaker.probes_out == 0
    taken = breaker.snapshot(32.0)
    assert taken is not None and taken["state"] == "open"
    assert taken["probes"] == [0, 0, 0]


def test_no_snapshot_while_a_probe_is_out_and_one_once_it_reports() -> None:
    """A breaker restored with a probe out would wait for that probe's
    verdict in vain (the probe belonged to the interrupted process): its
    snapshot is None until the probe reports."""
    breaker = tripped(POLICY)
    ticket = probe(breaker, 31.0)
    assert breaker.snapshot(31.0) is None
    assert breaker.snapshot(40.0) is None
    breaker.record(ticket, 41.0, failure=False)
    taken = breaker.snapshot(41.0)
    assert taken is not None and taken["state"] == "closed"


def test_a_close_forgets_the_calls_admitted_before_it() -> None:
    """Ten calls at 0, five fail: open.  After a good probe closes it, four
    new calls all failing must reopen it (4 of 4).  Admissions kept from
    before the close diluted them to 4 of 14 and the breaker stayed closed
    on a provider failing every call."""
    policy = BreakerPolicy(failure_rate=0.5, window=60.0, min_calls=4, cooldown=5.0)
    breaker = CircuitBreaker(policy)
    tickets = [breaker.acquire(0.0) for _ in range(10)]
    for ticket in tickets[:5]:
        assert isinstance(ticket, Ticket)
        breaker.record(ticket, 1.0, failure=True)
    assert isinstance(breaker.acquire(2.0), float) and breaker.state == "open"
    breaker.record(probe(breaker, 7.0), 7.5, failure=False)
    assert breaker.state == "closed" and breaker.failure_ratio == 0.0
    again = [breaker.acquire(8.0) for _ in range(4)]
    for ticket in again:
        assert isinstance(ticket, Ticket)
        breaker.record(ticket, 9.0, failure=True)
    assert breaker.failure_ratio == 1.0
    assert isinstance(breaker.acquire(10.0), float) and breaker.state == "open"


def test_calls_exactly_a_window_old_still_count() -> None:
    """The window is the last ``window`` seconds, its oldest instant
    included: two failures at 0 open a 10 s breaker for a call at 10.0,
    and no longer for one at 10.5.  Forgetting the boundary instant
    early let a call exactly ``window`` seconds later through."""
    policy = BreakerPolicy(failure_rate=0.5, window=10.0, min_calls=2, cooldown=30.0)

    def failed_twice_at_zero() -> CircuitBreaker:
        breaker = CircuitBreaker(policy)
        for ticket in [breaker.acquire(0.0), breaker.acquire(0.0)]:
            assert isinstance(ticket, Ticket)
            breaker.record(ticket, 0.0, failure=True)
        return breaker

    at_edge = failed_twice_at_zero()
    assert at_edge.acquire(10.0) == 30.0 and at_edge.state == "open"
    past = failed_twice_at_zero()
    assert isinstance(past.acquire(10.5), Ticket) and past.state == "closed"


def test_a_refused_resend_after_the_cooldown_reports_no_negative_wait() -> None:
    """A call admitted while closed resends after the breaker opened and
    its cooldown passed (no call has moved it to half-open yet): refused,
    with zero seconds left - not minus five, which its CircuitOpen
    message would show as 'retry in -5.0s'."""
    breaker = CircuitBreaker(BreakerPolicy(failure_rate=0.5, window=60.0, min_calls=1, cooldown=5.0))
    slow = breaker.acquire(0.0)
    quick = breaker.acquire(0.0)
    assert isinstance(slow, Ticket) and isinstance(quick, Ticket)
    breaker.record(quick, 0.0, failure=True)
    assert breaker.acquire(1.0) == 5.0  # opened at 1
    assert breaker.refuses_resend(slow, 3.0) == 3.0
    assert breaker.refuses_resend(slow, 11.0) == 0.0
    assert breaker.state == "open"
