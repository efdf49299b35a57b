"""The interceptor seam and reply slots keep trio's channel contracts."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio
import trio.testing

from messages import (
    ActorStopped,
    Forward,
    FunctionInterceptor,
    Interceptor,
    fail_pending,
    open_channel,
    reply_pair,
)


async def test_pass_through_by_default() -> None:
    send, receive = open_channel(1, interceptors=[Interceptor()])
    await send.send("x")
    assert receive.receive_nowait() == "x"


async def test_interceptors_compose_in_order() -> None:
    seen: list[str] = []

    def tag(label: str) -> FunctionInterceptor[str]:
        async def handler(item: str, forward: Forward[str]) -> None:
            seen.append(label)
            await forward(item + label)

        return FunctionInterceptor(handler)

    send, receive = open_channel(1, interceptors=[tag("a"), tag("b")])
    await send.send("x")
    assert seen == ["a", "b"]
    assert receive.receive_nowait() == "xab"


async def test_interceptor_can_answer_instead_of_forwarding() -> None:
    async def swallow(item: int, forward: Forward[int]) -> None:
        if item % 2:
            await forward(item)

    send, receive = open_channel(10, interceptors=[FunctionInterceptor(swallow)])
    for i in range(6):
        await send.send(i)
    assert [receive.receive_nowait() for _ in range(3)] == [1, 3, 5]


async def test_a_replacement_may_carry_a_reply_slot_of_the_interceptors_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A recorder (a cache, a redactor) forwards the item with a slot of
    its own and answers the item's when its own is answered: a check that
    failed every slot not forwarded as it was broke that, on every call."""
    from messages import MetricsQuery

    relayed: list[object] = []

    async def relay(pending: Any, original: Any) -> None:
        answer = await pending.receive()
        relayed.append(answer)
        original.send(answer)

    async with trio.open_nursery() as nursery:

        async def record(item: MetricsQuery, forward: Forward[MetricsQuery]) -> None:
            mine, pending = reply_pair("recorded totals")
            nursery.start_soon(relay, pending, item.reply_to)
            await forward(attrs.evolve(item, reply_to=mine))

        send, receive = open_channel(2, interceptors=[FunctionInterceptor(record)])
        reply, pending = reply_pair("totals")
        await send.send(MetricsQuery(run_id="r", reply_to=reply))
        receive.receive_nowait().reply_to.send("answered")
        assert await pending.receive() == "answered"
    assert relayed == ["answered"]


async def test_cancelled_send_sent_nothing(autojump_clock: trio.testing.MockClock) -> None:
    async def slow(item: str, forward: Forward[str]) -> None:
        await trio.sleep(10)  # decide first...
        await forward(item)  # ...then forward, as the last await

    send, receive = open_channel(1, interceptors=[FunctionInterceptor(slow)])
    with trio.move_on_after(5):
        await send.send("lost?")
    with pytest.raises(trio.WouldBlock):
        receive.receive_nowait()
    # And a full channel: the blocked send is cancelled and delivers nothing.
    plain, plain_rx = open_channel(0)
    with trio.move_on_after(1):
        await plain.send("x")
    with pytest.raises(trio.WouldBlock):
        plain_rx.receive_nowait()


async def test_closed_channel_raises_actor_stopped() -> None:
    send, receive = open_channel(1, name="gateway")
    receive.close()
    with pytest.raises(ActorStopped, match="gateway"):
        await send.send(1)
    with pytest.raises(ActorStopped):
        send.send_nowait(1)


async def test_an_eager_send_in_a_cancelled_scope_to_a_gone_actor_is_cancelled() -> None:
    # The actor's inbox was closed because the same cancellation stopped it:
    # send_eager raised ActorStopped, and a Ctrl-C'd soak exited 1 printing
    # "ActorStopped: the agent gemini actor has stopped" now and then.
    send, receive = open_channel(1, name="agent")
    receive.close()
    with trio.CancelScope() as scope:
        scope.cancel()
        await send.send_eager(1)
        pytest.fail("not cancelled")
    assert scope.cancelled_caught
    with pytest.raises(ActorStopped, match="agent"):  # not cancelled: the actor is simply gone
        await send.send_eager(1)


def test_work_failing_under_a_signal_is_reported_as_the_signal() -> None:
    import os
    import signal

    from messages import ActorStopped as Stopped
    from actors._cli import interruptible

    async def work() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        try:
            await trio.sleep_forever()
        finally:
            raise Stopped("the agent gemini actor has stopped")  # stopping, because of the signal

    with pytest.raises(KeyboardInterrupt):
        trio.run(interruptible, work)


async def test_send_nowait_refused_with_interceptors() -> None:
    send, _ = open_channel(1, interceptors=[Interceptor()])
    with pytest.raises(TypeError):
        send.send_nowait(1)


def test_buffer_size_is_validated() -> None:
    with pytest.raises(ValueError, match="max_buffer_size"):
        open_channel(-1)


async def test_reply_slot_delivers_once() -> None:
    reply, pending = reply_pair("test")
    assert reply.send(1) is True
    assert reply.send(2) is False  # a second answer is dropped
    assert await pending.receive() == 1


async def test_unanswered_reply_is_a_typed_failure() -> None:
    reply, pending = reply_pair("the thing")
    reply.close()
    with pytest.raises(ActorStopped, match="the thing"):
        await pending.receive()


async def test_fail_pending_fails_queued_requests_and_closes_inbox() -> None:
    class Request:
        def __init__(self) -> None:
            self.reply_to, self.pending = reply_pair("queued")

    send, receive = open_channel(4)
    requests = [Request() for _ in range(3)]
    for r in requests:
        await send.send(r)
    assert fail_pending(receive) == 3
    for r in requests:
        with pytest.raises(ActorStopped):
            await r.pending.receive()
    with pytest.raises(ActorStopped):
        await send.send(Request())


async def test_cancelled_requester_makes_the_reply_undeliverable(autojump_clock: trio.testing.MockClock) -> None:
    reply, pending = reply_pair("slow thing")
    with trio.move_on_after(1):
        await pending.receive()
    assert reply.send(1) is False, "nobody is waiting any more"


async def test_reply_wakes_a_waiting_requester() -> None:
    reply, pending = reply_pair("x")
    got: list[int] = []
    async with trio.open_nursery() as nursery:

        async def wait() -> None:
            got.append(await pending.receive())

        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert reply.send(7)
    assert got == [7]


async def test_receive_is_a_checkpoint_even_with_a_value_ready() -> None:
    reply, pending = reply_pair("x")
    reply.send(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        await pending.receive()
    assert scope.cancelled_caught


async def test_broadcast_never_waits_on_subscribers() -> None:
    from messages import Broadcast

    hub: Broadcast[int] = Broadcast(2)
    slow = hub.subscribe()
    gone = hub.subscribe()
    gone.close()
    for i in range(5):
        hub.publish(i)  # not a checkpoint, never blocks
    assert [slow.receive_nowait(), slow.receive_nowait()] == [0, 1], "a full subscriber misses the rest"
    hub.close()
    with pytest.raises(trio.EndOfChannel):
        await slow.receive()


class _Event:
    """A published item a weak reference can watch."""


async def test_broadcast_lets_go_of_a_subscription_dropped_unclosed() -> None:
    import gc
    import weakref

    from messages import Broadcast

    hub: Broadcast[_Event] = Broadcast(100)
    kept = hub.subscribe()
    cloned = hub.subscribe()
    clone = cloned.clone()
    dropped = hub.subscribe()
    events = [_Event() for _ in range(3)]
    for event in events:
        hub.publish(event)
    async for _ in dropped:
        break  # the client leaves without closing, and lets go of it
    del dropped
    gc.collect()
    assert len(hub._subscribers) == 2, "the dropped subscription is forgotten"
    # A clone still reads: dropping the original ends nothing.
    del cloned
    gc.collect()
    assert len(hub._subscribers) == 2
    assert [clone.receive_nowait() for _ in range(3)] == events
    twin = clone.clone()
    clone.close()  # trio's fan-out: close the one you cloned, read the clones
    del clone
    gc.collect()
    assert len(hub._subscribers) == 2
    hub.publish(events[0])
    assert twin.receive_nowait() is events[0]
    del twin
    gc.collect()
    assert len(hub._subscribers) == 1, "its last clone went"
    # Nor are the unread events held: once the kept one read them, they go.
    watched = [weakref.ref(event) for event in events]
    del event, events
    for _ in range(4):
        kept.receive_nowait()
    gc.collect()
    assert [ref() for ref in watched] == [None, None, None]
    hub.publish(_Event())  # reaches the one left
    assert isinstance(kept.receive_nowait(), _Event)


async def test_a_reply_is_received_once() -> None:
    # A second receive returned None, as if that were the reply.
    reply, pending = reply_pair("the call")
    assert reply.send(7)
    assert await pending.receive() == 7
    with pytest.raises(RuntimeError, match="the reply to the call was already received"):
        await pending.receive()


async def test_a_second_waiter_on_one_reply_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    # It took the first waiter's place, and the first was never woken.
    reply, pending = reply_pair("the call")
    got: list[int] = []
    with trio.fail_after(5):
        await _two_waiters(reply, pending, got)
    assert got == [3]


async def _two_waiters(reply: object, pending: object, got: list[int]) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _keep(pending, got))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError, match="already waiting for the reply to the call"):
            await pending.receive()  # type: ignore[attr-defined]
        reply.send(3)  # type: ignore[attr-defined]


async def _keep(pending: object, got: list[int]) -> None:
    got.append(await pending.receive())  # type: ignore[attr-defined]
