"""The metrics accumulator: charged once by identity, unknown apart,
replays not turns, budgets, and latest-value snapshots."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import MetricsAccumulator, MetricsHub, PriceTable
from messages import (
    AgentKey,
    BudgetAlert,
    BudgetCheck,
    BudgetStatus,
    MetricsQuery,
    SetBudget,
    TokenMetrics,
    TokenUsage,
    UsageRecorded,
    UsageTotals,
    open_channel,
    reply_pair,
)

RUN = "run-1"
PRICES = PriceTable.vendored()


def key(stage: str = "plan", agent: str = "claude", run: str = RUN) -> AgentKey:
    return AgentKey(run_id=run, branch_id="b1", stage=stage, agent=agent)


def u(inp: int, out: int, cached: int = 0) -> TokenUsage:
    return TokenUsage.of(input_tokens=inp, output_tokens=out, cached_input_tokens=cached)


def ev(
    stage: str = "plan",
    agent: str = "claude",
    attempt: int = 1,
    usage: TokenUsage | None = None,
    model: str = "gpt-4o",
    replay: bool = False,
) -> UsageRecorded:
    return UsageRecorded(
        key=key(stage, agent), attempt=attempt, model=model, provider="sim", usage=usage, replay=replay
    )


def test_each_attempt_is_charged_once_by_identity() -> None:
    acc = MetricsAccumulator()
    first = ev(usage=u(1_000, 100))
    acc.record(first)
    acc.record(first)  # a duplicate report
    acc.record(ev(usage=u(1_000, 100), replay=True))  # same identity, late replay
    acc.record(ev(attempt=2, usage=u(2_000, 200)))
    t = acc.totals(RUN)
    assert t.usage == u(3_000, 300)
    assert (t.turns, t.replays, t.duplicates) == (2, 0, 2)
    assert t.cost_usd == PRICES.cost(u(3_000, 300), "gpt-4o")


def test_unknown_usage_is_counted_apart_not_as_zero() -> None:
    acc = MetricsAccumulator()
    acc.record(ev(usage=None))
    acc.record(ev(attempt=2, usage=u(500, 50)))
    t = acc.totals(RUN)
    assert t.unknown_calls == 1 and t.turns == 2 and t.usage == u(500, 50)
    assert t.groups["agent"]["claude"].unknown_calls == 1


def test_replays_add_their_usage_but_are_not_turns() -> None:
    acc = MetricsAccumulator()
    acc.record(ev(usage=u(1_000, 100), replay=True))
    acc.record(ev(stage="tasks", usage=u(3_000, 300)))
    t = acc.totals(RUN)
    assert (t.turns, t.replays) == (1, 1)
    assert t.usage == u(4_000, 400)
    assert t.cost_usd == PRICES.cost(u(4_000, 400), "gpt-4o")
    # The next-prompt estimate learns from turns made, not from replays.
    assert t.estimated_next_prompt_tokens == 3_000


def test_metrics_per_stage_agent_and_model_come_from_each_agents_own_usage() -> None:
    acc = MetricsAccumulator()
    acc.record(ev(agent="claude", model="claude-sonnet-4-5", usage=u(1_000, 10)))
    acc.record(ev(agent="gemini", model="gemini-2.5-pro", usage=u(7_000, 70)))
    acc.record(ev(stage="tasks", agent="gemini", model="gemini-2.5-pro", usage=u(9_000, 90)))
    g = acc.totals(RUN).groups
    assert g["agent"]["claude"].usage == u(1_000, 10)
    assert g["agent"]["gemini"].usage == u(16_000, 160)
    assert g["stage"]["plan"].usage == u(8_000, 80) and g["stage"]["tasks"].usage == u(9_000, 90)
    assert g["model"]["gemini-2.5-pro"].cost_usd == PRICES.cost(u(16_000, 160), "gemini-2.5-pro")
    assert g["agent"]["gemini"].estimated_next_prompt_tokens == 8_000


def test_runs_are_kept_apart_and_forgotten_on_request() -> None:
    acc = MetricsAccumulator()
    acc.record(ev(usage=u(10, 1)))
    acc.record(UsageRecorded(key=key(run="other"), attempt=1, model="gpt-4o", provider="sim", usage=u(99, 9)))
    assert acc.totals(RUN).usage == u(10, 1)
    acc.forget(RUN)
    assert acc.totals(RUN).turns == 0 and acc.totals("other").usage == u(99, 9)


# -- acceptance 4 (library level): a resumed run reports the same totals -----

attempts = st.lists(
    st.tuples(
        st.sampled_from(["plan", "tasks", "implement"]),
        st.sampled_from(["claude", "gemini", "gpt_pro"]),
        st.sampled_from(["gpt-4o", "claude-sonnet-4-5", "acme-llm-9"]),
        st.one_of(st.none(), st.builds(u, st.integers(0, 50_000), st.integers(0, 5_000))),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(attempts, st.integers(0, 30), st.randoms(use_true_random=False))
def test_a_resumed_run_reports_the_same_totals_as_an_uninterrupted_one(
    calls: list[tuple[str, str, str, TokenUsage | None]], crash_at: int, rnd: random.Random
) -> None:
    """Every attempt made before the crash is durable and comes back as a
    replay on resume (in any order, some twice); the attempts after the
    crash are made afresh.  Totals, costs and breakdowns must equal the
    uninterrupted run's; only turns move to replays."""
    numbered: dict[tuple[str, str], int] = {}
    events = []
    for stage, agent, model, usage in calls:
        n = numbered[(stage, agent)] = numbered.get((stage, agent), 0) + 1
        events.append(ev(stage=stage, agent=agent, attempt=n, model=model, usage=usage))
    uninterrupted = MetricsAccumulator()
    for e in events:
        uninterrupted.record(e)

    crash_at = min(crash_at, len(events))
    crashed = MetricsAccumulator()  # its state dies with the process
    for e in events[:crash_at]:
        crashed.record(e)
    resumed = MetricsAccumulator()
    replays = [UsageRecorded(key=e.key, attempt=e.attempt, model=e.model, provider=e.provider, usage=e.usage, replay=True) for e in events[:crash_at]]
    rnd.shuffle(replays)
    for e in replays + replays[: len(replays) // 3]:  # some replayed twice
        resumed.record(e)
    for e in events[crash_at:]:
        resumed.record(e)

    a, b = uninterrupted.totals(RUN), resumed.totals(RUN)
    assert b.usage == a.usage and b.cost_usd == a.cost_usd
    assert b.by_stage == a.by_stage and b.unknown_calls == a.unknown_calls
    assert b.unpriced_calls == a.unpriced_calls and b.unpriced_models == a.unpriced_models
    assert b.turns + b.replays == a.turns and b.replays == crash_at
    for dim in ("stage", "agent", "model"):
        assert {n: (g.usage, g.cost_usd) for n, g in b.groups[dim].items()} == {
            n: (g.usage, g.cost_usd) for n, g in a.groups[dim].items()
        }


# -- budget --------------------------------------------------------------------

CALL_COST = PRICES.cost(u(10_000, 1_000), "gpt-4o")  # 0.025 + 0.01 = 0.035


def test_budget_alerts_fire_once_per_threshold() -> None:
    assert CALL_COST == Decimal("0.035")
    alerts: list[BudgetAlert] = []
    acc = MetricsAccumulator(alert=alerts.append)
    acc.set_budget(RUN, Decimal("0.10"))
    spent = []
    for n in range(1, 6):
        acc.record(ev(agent=f"a{n}", usage=u(10_000, 1_000)))
        spent.append([a.threshold for a in alerts])
    # 0.035, 0.070, 0.105 (crosses 80, 90 and 100 at once), 0.140, 0.175
    assert spent == [[], [], [80, 90, 100], [80, 90, 100], [80, 90, 100]]
    assert alerts[0].spent_usd == Decimal("0.105") and alerts[0].budget_usd == Decimal("0.10")


def test_each_threshold_alerts_once_when_crossed_one_by_one() -> None:
    alerts: list[int] = []
    acc = MetricsAccumulator(alert=lambda a: alerts.append(a.threshold))
    acc.set_budget(RUN, Decimal("0.035") * 10)  # one call = 10 %
    for n in range(1, 13):
        acc.record(ev(agent=f"a{n}", usage=u(10_000, 1_000)))
    assert alerts == [80, 90, 100]
    assert acc.totals(RUN).alerts == (80, 90, 100)


def test_a_budget_set_below_what_was_already_spent_alerts_at_once() -> None:
    """A resume replays its spend before its budget arrives: a budget that
    spend already passed must warn then, not at the next priced call."""
    alerts: list[int] = []
    acc = MetricsAccumulator(alert=lambda a: alerts.append(a.threshold))
    acc.record(ev(usage=u(10_000, 1_000), replay=True))  # $0.035
    acc.set_budget(RUN, Decimal("0.04"))  # 87.5 %
    assert alerts == [80]
    acc.set_budget(RUN, Decimal("0.03"))
    assert alerts == [80, 90, 100]


def test_a_stage_whose_usage_is_all_unknown_has_no_known_usage_breakdown() -> None:
    """The digest's by_stage lists stages with some known usage: a stage of
    cut-off calls only is not one with zero tokens."""
    acc = MetricsAccumulator()
    acc.record(ev(stage="plan", usage=u(100, 10)))
    acc.record(ev(stage="tasks", agent="gemini", usage=None))
    acc.record(ev(stage="tasks", agent="claude", attempt=2, usage=None))
    assert set(acc.totals(RUN).by_stage) == {"plan"}
    acc.record(ev(stage="tasks", agent="gpt", usage=u(5, 1)))
    assert set(acc.totals(RUN).by_stage) == {"plan", "tasks"}


def test_a_replay_is_not_the_last_prompt_the_context_gauge_reads() -> None:
    """Context use is the agents' latest prompts: an output replayed from
    the store (asked before a crash, with an older, larger prompt) is not."""
    acc = MetricsAccumulator()
    acc.record(ev(agent="claude", model="claude-sonnet-4-5", usage=u(50_000, 10)))  # 25 %
    acc.record(ev(agent="claude", attempt=2, model="claude-sonnet-4-5", usage=u(150_000, 10), replay=True))
    assert acc.snapshot(RUN).context_utilization == 0.25


def test_the_gate_closes_at_the_budget_and_a_higher_budget_reopens_it() -> None:
    alerts: list[int] = []
    acc = MetricsAccumulator(alert=lambda a: alerts.append(a.threshold))
    acc.set_budget(RUN, Decimal("0.07"))
    acc.record(ev(agent="a", usage=u(10_000, 1_000)))
    assert not acc.budget_status(RUN).exceeded
    acc.record(ev(agent="b", usage=u(10_000, 1_000)))
    status = acc.budget_status(RUN)
    assert status.exceeded and status.spent_usd == Decimal("0.070")
    acc.set_budget(RUN, Decimal("1"))
    assert not acc.budget_status(RUN).exceeded
    assert alerts == [80, 90, 100], "raising the budget does not repeat warnings"


def test_resuming_with_a_higher_budget_opens_the_gate_after_replays() -> None:
    """What ``resume --budget`` relies on: the replayed spend counts
    against the new budget, and the gate answers from it."""
    durable = [ev(agent=f"a{n}", usage=u(10_000, 1_000)) for n in range(3)]  # 0.105 spent
    for budget, exceeded in ((Decimal("0.10"), True), (Decimal("0.20"), False)):
        acc = MetricsAccumulator()
        acc.set_budget(RUN, budget)
        for e in durable:
            acc.record(UsageRecorded(key=e.key, attempt=1, model=e.model, provider="sim", usage=e.usage, replay=True))
        assert acc.budget_status(RUN).exceeded is exceeded


async def test_the_actor_answers_checks_after_the_usage_queued_before_them() -> None:
    acc = MetricsAccumulator()
    tx, rx = open_channel(100, name="metrics")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(acc.run, rx)
        await tx.send(SetBudget(run_id=RUN, budget_usd=Decimal("0.035")))
        await tx.send(ev(usage=u(10_000, 1_000)))
        reply, pending = reply_pair("check")
        await tx.send(BudgetCheck(run_id=RUN, reply_to=reply))
        status: BudgetStatus = await pending.receive()
        assert status.exceeded
        reply, pending = reply_pair("totals")
        await tx.send(MetricsQuery(run_id=RUN, forget=True, reply_to=reply))
        totals: UsageTotals = await pending.receive()
        assert totals.budget_usd == Decimal("0.035") and totals.alerts == (80, 90, 100)
        tx.close()


def test_an_item_the_accumulator_cannot_handle_is_a_typed_error() -> None:
    # Ignored, it left whoever waited on it waiting for ever.
    acc = MetricsAccumulator()
    with pytest.raises(TypeError, match=r"got a str, which is no metrics message"):
        acc.handle("not a message")  # type: ignore[arg-type]


# -- snapshots -----------------------------------------------------------------


async def test_snapshots_are_rate_bounded_and_a_silent_subscriber_holds_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = MetricsHub()
    silent = hub.subscribe()
    reader = hub.subscribe(RUN)
    seen: list[TokenMetrics] = []
    published: list[TokenMetrics] = []

    def publish(m: TokenMetrics) -> None:
        published.append(m)
        hub.publish(m)

    acc = MetricsAccumulator(publish=publish, interval=1.0)
    tx, rx = open_channel(10_000, name="metrics")

    async def read() -> None:
        async for m in reader:
            seen.append(m)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(acc.run, rx)
            nursery.start_soon(read)
            start = trio.current_time()
            for n in range(1, 2_001):
                await tx.send(ev(agent=f"a{n % 7}", attempt=n, usage=u(1_000, 100)))
                if n % 100 == 0:
                    await trio.sleep(0.5)  # simulated time passes while usage flows
            reply, pending = reply_pair("totals")
            await tx.send(MetricsQuery(run_id=RUN, forget=True, reply_to=reply))
            await pending.receive()
            elapsed = trio.current_time() - start
            tx.close()
            hub.close()
    assert elapsed < 11  # 20 pauses of 0.5 s: the silent subscriber slowed nothing
    assert len(published) <= elapsed / 1.0 + 2, f"{len(published)} snapshots in {elapsed}s"
    assert 2 <= len(seen) <= len(published)
    assert seen[-1].final and seen[-1].turns == 2_000 and seen[-1].input_tokens == 2_000_000
    assert [m.turns for m in seen] == sorted(m.turns for m in seen)
    # The silent subscriber holds only the latest snapshot, not a backlog.
    assert silent.latest(RUN) is not None and silent.latest(RUN).final  # type: ignore[union-attr]
    assert silent.replaced == len(published) - 1


def test_snapshot_reports_context_utilisation_and_stage_breakdown() -> None:
    acc = MetricsAccumulator()
    acc.set_budget(RUN, Decimal("10"))
    acc.record(ev(agent="claude", model="claude-sonnet-4-5", usage=u(50_000, 10)))  # 200k window: 25 %
    acc.record(ev(stage="tasks", agent="gpt", model="gpt-5", usage=u(136_000, 10)))  # 272k window: 50 %
    m = acc.snapshot(RUN)
    assert m.context_utilization == 0.5
    assert [s.stage for s in m.by_stage] == ["plan", "tasks"]
    assert m.by_stage[1].input_tokens == 136_000 and m.turns == 2
    assert m.budget_usd == Decimal("10") and m.budget_fraction is not None
    assert m.estimated_next_prompt_tokens == (50_000 + 136_000) // 2


async def test_no_snapshots_are_built_while_nobody_listens(autojump_clock: trio.testing.MockClock) -> None:
    hub = MetricsHub()
    published: list[TokenMetrics] = []

    def publish(m: TokenMetrics) -> None:
        published.append(m)
        hub.publish(m)

    acc = MetricsAccumulator(publish=publish, interval=1.0, listening=hub.listening)
    tx, rx = open_channel(1_000, name="metrics")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(acc.run, rx)
        for n in range(1, 101):
            await tx.send(ev(attempt=n, usage=u(10, 1)))
        await trio.sleep(5)
        assert published == [], "nobody subscribed: nothing built"
        sub = hub.subscribe(RUN)
        await tx.send(ev(attempt=101, usage=u(10, 1)))
        first = await sub.receive()
        assert first.turns == 101, "a subscriber sees the latest figures from the next change on"
        tx.close()
        hub.close()
