"""Typed channels, the interceptor seam, and one-shot replies.

An :class:`Interceptor` wraps the *send* side of a channel.  It runs in the
sender's task, before the item enters the channel's buffer, so trio's
guarantee holds end to end: **a cancelled send sent nothing**, provided every
interceptor makes ``forward`` its last await (decide first, then forward or
answer).  An interceptor that took an item into a task of its own and then
awaited could lose it on cancellation (python-trio/trio#1365); this seam
never does that.
"""

from __future__ import annotations

import contextvars
import itertools
import math
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import trio

from ._errors import ActorStopped, Undelivered

T = TypeVar("T")
R = TypeVar("R")

Forward = Callable[[T], Awaitable[None]]


class Interceptor(Generic[T]):
    """The one-method seam on a channel's send side (like httpx's
    ``BaseTransport``).  The default forwards every item unchanged.

    ``send`` may forward the item (``await forward(item)``), forward another
    item, or answer the item itself instead of forwarding it (the fault
    interceptor does this through the item's ``reply_to``).  It must do one of
    those, and ``forward`` must be its last await.  One that returns having
    done neither fails an item's reply slot (its requester gets
    :class:`ActorStopped` naming the interceptor); an item without one is
    dropped, as a filter drops it - except on an edge opened with
    ``awaited=True``, whose every item someone waits for (an agent's
    request, its reply to the coordinator): there the sender gets
    :class:`Undelivered`, an ActorStopped.  Answering an item whose
    ``reply_to`` is an :class:`Outbox` means sending on that outbox from
    ``send`` itself (in the sender's task).
    """

    async def send(self, item: T, forward: Forward[T]) -> None:
        """Handle ``item`` in the sender's task (see the class docstring).
        Make ``forward`` the last await, so that a cancelled send sent
        nothing; an exception raised here reaches the sender."""
        await forward(item)


class FunctionInterceptor(Interceptor[T]):
    """An interceptor from an async function ``handler(item, forward)``:
    the mock implementation of the seam, for tests and small adapters."""

    def __init__(self, handler: Callable[[T, Forward[T]], Awaitable[None]]) -> None:
        self._handler = handler

    async def send(self, item: T, forward: Forward[T]) -> None:
        await self._handler(item, forward)

    def __repr__(self) -> str:
        return f"FunctionInterceptor({getattr(self._handler, '__qualname__', self._handler)!s})"


def _chain(sink: Forward[T], interceptors: Sequence[Interceptor[T]], awaited: bool = False) -> Forward[T]:
    forward = sink
    # The first interceptor in the list sees the item first.
    for interceptor in reversed(interceptors):
        forward = _bind(interceptor, forward, awaited)
    return forward


def _bind(interceptor: Interceptor[T], forward: Forward[T], awaited: bool) -> Forward[T]:
    async def send(item: T) -> None:
        forwarded = False
        # (A replacement forwarded with a reply slot of the interceptor's
        # own is no swallow: the interceptor answers the item's slot when
        # its own is answered - a recorder, a cache, a redactor.)
        slot = getattr(item, "reply_to", None)

        async def onward(passed: T) -> None:
            nonlocal forwarded
            forwarded = True
            await forward(passed)

        answer_to = slot if awaited else None
        if isinstance(answer_to, Outbox):
            # An interceptor may answer an agent's request itself, on the
            # request's reply channel: that is no swallow.  Watched in this
            # task only, so another agent's reply cannot pass for it.
            answered = [False]
            token = _ANSWER_WATCH.set((answer_to, answered))
            answer_to._watches += 1
            try:
                await interceptor.send(item, onward)
            finally:
                answer_to._watches -= 1
                _ANSWER_WATCH.reset(token)
            if answered[0]:
                return
        else:
            await interceptor.send(item, onward)
        if not forwarded:
            # Neither forwarded nor answered: its requester would wait for
            # ever (a run hung on a swallowed PersistDecision).  It gets
            # ActorStopped naming the interceptor instead.
            why = f"interceptor {interceptor!r} neither forwarded nor answered it"
            if isinstance(slot, Reply):
                slot.close(why)
            elif awaited:
                # Its receiver waits for it, with no slot to fail: the run
                # hung for ever on a swallowed AgentRequest.
                raise Undelivered(f"{why} ({type(item).__name__}, which its receiver waits for)")

    return send


# (outbox, [answered]) while an interceptor on an awaited edge handles an
# item whose reply goes to that outbox; see _bind.
_ANSWER_WATCH: contextvars.ContextVar[tuple[Any, list[bool]] | None] = contextvars.ContextVar(
    "conclave_answer_watch", default=None
)


def _note_answer(outbox: Any) -> None:
    watch = _ANSWER_WATCH.get()
    if watch is not None and watch[0] is outbox:
        watch[1][0] = True


class Outbox(trio.abc.SendChannel[T]):
    """The send side of a memory channel, with interceptors.

    ``send`` is a checkpoint.  Cancellation: if ``send`` raises
    ``trio.Cancelled`` nothing was delivered (given well-behaved
    interceptors, see the module docstring).  A closed or broken channel
    raises :class:`ActorStopped`, naming the channel, instead of trio's
    generic errors: the actor behind it is gone.
    """

    __slots__ = ("_awaited", "_inner", "_interceptors", "_send", "_send_eager", "_watches", "name")

    def __init__(
        self,
        inner: trio.MemorySendChannel[T],
        interceptors: Sequence[Interceptor[T]] = (),
        *,
        name: str = "channel",
        awaited: bool = False,
    ) -> None:
        self._inner = inner
        self._interceptors = tuple(interceptors)
        self._awaited = awaited
        self.name = name
        # Interceptors (in any task) now watching for an answer sent here:
        # while there are none, no send here can be one, and sending skips
        # the context-variable lookup (every send on every edge made one:
        # 14 calls per agent turn in a soak).  Whose watch it is, the
        # variable says.
        self._watches = 0
        self._send: Forward[T] = (
            _chain(self._deliver, self._interceptors, awaited) if self._interceptors else self._deliver
        )
        self._send_eager: Forward[T] = (
            _chain(self._deliver_eager, self._interceptors, awaited)
            if self._interceptors
            else self._deliver_eager
        )

    @property
    def intercepted(self) -> bool:
        return bool(self._interceptors)

    async def _deliver(self, item: T) -> None:
        try:
            await self._inner.send(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ActorStopped(f"the {self.name} actor has stopped") from exc

    async def _deliver_eager(self, item: T) -> None:
        try:
            try:
                self._inner.send_nowait(item)
            except trio.WouldBlock:
                await self._inner.send(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # send_nowait checks no cancellation: when the actor is gone
            # because our own scope is being cancelled, the cancellation is
            # the news, not ActorStopped (nothing was sent either way).
            await trio.lowlevel.checkpoint_if_cancelled()
            raise ActorStopped(f"the {self.name} actor has stopped") from exc

    async def send(self, item: T) -> None:
        """Deliver ``item`` through the interceptors.  A checkpoint; if it
        raises ``trio.Cancelled`` nothing was delivered; raises
        :class:`ActorStopped` once the receiver is gone (see the class
        docstring)."""
        if self._watches:
            _note_answer(self)
        await self._send(item)

    def send_nowait(self, item: T) -> None:
        """Deliver without waiting; only for channels without interceptors
        (interceptors are async).  Raises ``trio.WouldBlock`` when full."""
        if self._interceptors:
            raise TypeError(f"the {self.name} channel has interceptors; use 'await send()'")
        if self._watches:
            _note_answer(self)
        try:
            self._inner.send_nowait(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ActorStopped(f"the {self.name} actor has stopped") from exc

    async def send_eager(self, item: T) -> None:
        """Like ``send``, but the item enters the buffer without a
        scheduling round when there is room: *not* a checkpoint then
        (interceptors still run, and may await).  For hot paths whose buffer
        argument says the send rarely waits.  Cancellation: as ``send`` - if
        it raises ``trio.Cancelled``, nothing was delivered."""
        if self._watches:
            _note_answer(self)
        await self._send_eager(item)

    def clone(self) -> Outbox[T]:
        return Outbox(self._inner.clone(), self._interceptors, name=self.name, awaited=self._awaited)

    def close(self) -> None:
        self._inner.close()

    async def aclose(self) -> None:
        """Close this clone of the send side (the receiver sees the end
        once every clone is closed), then checkpoint: closed even if
        cancelled."""
        self._inner.close()
        await trio.lowlevel.checkpoint()


def open_channel(
    max_buffer_size: int | float,
    *,
    name: str = "channel",
    interceptors: Sequence[Interceptor[Any]] = (),
    awaited: bool = False,
) -> tuple[Outbox[Any], trio.MemoryReceiveChannel[Any]]:
    """Open a memory channel whose send side goes through ``interceptors``.

    Every edge in Conclave is opened here, so every edge has a name, a chosen
    buffer size and an interceptor seam.  ``awaited``: someone waits for
    every item, so one an interceptor swallows raises in the sender (see
    :class:`Interceptor`).
    """
    if max_buffer_size != math.inf and (
        not isinstance(max_buffer_size, int) or max_buffer_size < 0
    ):
        raise ValueError(f"max_buffer_size must be an int >= 0 or math.inf, got {max_buffer_size!r}")
    send, receive = trio.open_memory_channel[Any](max_buffer_size)
    return Outbox(send, interceptors, name=name, awaited=awaited), receive


_EMPTY, _VALUE, _CLOSED, _GONE, _TAKEN = range(5)


class Reply(Generic[R]):
    """A one-shot reply slot carried inside a request message.

    ``send`` never blocks (the slot holds exactly one value) and is not a
    checkpoint, so an actor can answer from a ``finally`` block.  ``close``
    without ``send`` makes the requester's ``receive`` raise
    :class:`ActorStopped`: a request whose actor stopped gets a typed
    failure, never silence.
    """

    __slots__ = ("_pending",)

    def __init__(self, pending: PendingReply[R]) -> None:
        self._pending = pending

    def send(self, value: R) -> bool:
        """Deliver the reply; return False if the requester has gone away or
        a reply was already sent (extra replies are dropped)."""
        return self._pending._settle(_VALUE, value)

    def close(self, why: str = "the actor stopped") -> None:
        """Give up without answering (a no-op after ``send``); the
        requester's ActorStopped says ``why``."""
        self._pending._settle(_CLOSED, why)

    @property
    def abandoned(self) -> bool:
        """The requester stopped waiting (its receive was cancelled, e.g. by
        its own timeout): a reply would reach nobody.  Not a checkpoint."""
        return self._pending._state == _GONE

    def on_abandoned(self, callback: Callable[[], object]) -> None:
        """Have ``callback`` called, from trio's run loop, once the requester
        stops waiting (at once if it already has): e.g. cancel the work the
        reply is for.  Not a checkpoint; one callback per slot (the last
        given).  Never called once the slot is settled."""
        pending = self._pending
        pending._on_gone = callback
        if pending._state == _GONE:
            trio.lowlevel.current_trio_token().run_sync_soon(callback)

    def __repr__(self) -> str:
        return f"<Reply for {self._pending._what}>"


class PendingReply(Generic[R]):
    """The requester's end of a :class:`Reply`, and the state they share.

    A one-shot rendezvous built on trio's low-level park/reschedule: far
    cheaper than a memory channel per request, which matters because every
    model call and every durable write makes one.  (Two objects per request,
    no closures: the store writer's acked writes make one each, and fewer
    allocations mean fewer garbage-collector passes on that hot path.)
    """

    __slots__ = ("_state", "_value", "_task", "_what", "_on_gone")

    def __init__(self, what: str) -> None:
        self._state = _EMPTY
        self._value: Any = None
        self._task: trio.lowlevel.Task | None = None
        self._what = what
        self._on_gone: Callable[[], object] | None = None

    def _settle(self, state: int, value: Any = None) -> bool:
        if self._state != _EMPTY:
            return False
        self._state = state
        self._value = value
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)
        return True

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self._task = None
        self._state = _GONE
        if self._on_gone is not None:
            # Not from inside this abort callback: cancelling another task's
            # scope here would re-enter trio's cancellation delivery.
            trio.lowlevel.current_trio_token().run_sync_soon(self._on_gone)
        return trio.lowlevel.Abort.SUCCEEDED

    async def receive(self) -> R:
        """Wait for the reply.  A checkpoint; raises :class:`ActorStopped` if
        the actor dropped the request without answering.  If cancelled, the
        requester is gone: a later ``Reply.send`` returns False."""
        if self._state == _EMPTY:
            if self._task is not None:
                # The first waiter would never be woken.
                raise trio.BusyResourceError(f"another task is already waiting for the reply to {self._what}")
            self._task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        else:
            await trio.lowlevel.checkpoint()
        return self._take()

    def _take(self) -> R:
        # After the wait (``receive`` and ``request`` share this).
        if self._state == _VALUE:
            value: R = self._value
            self._value = None
            self._state = _TAKEN
            return value
        if self._state == _TAKEN:
            # A second receive returned None, as if that were the reply.
            raise RuntimeError(f"the reply to {self._what} was already received")
        why = self._value if isinstance(self._value, str) else "the actor stopped"
        raise ActorStopped(f"no reply to {self._what}: {why}")


def reply_pair(what: str) -> tuple[Reply[Any], PendingReply[Any]]:
    """A fresh reply slot and the requester's end of it."""
    pending: PendingReply[Any] = PendingReply(what)
    return Reply(pending), pending


def fail_pending(inbox: trio.MemoryReceiveChannel[Any], into: list[Any] | None = None) -> int:
    """Stop an actor's inbox: close the reply slot of every request still
    queued, so each requester gets :class:`ActorStopped`, then close the
    inbox so later sends fail at once.  Not a checkpoint.  Returns how many
    requests were failed; ``into`` also gets every item taken out."""
    failed = 0
    while True:
        try:
            item = inbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            break
        if into is not None:
            into.append(item)
        reply = getattr(item, "reply_to", None)
        if isinstance(reply, Reply):
            reply.close()
            failed += 1
    inbox.close()
    return failed


class Broadcast(Generic[T]):
    """Best-effort fan-out to subscribers (progress and auth events).

    ``publish`` is not a checkpoint and never waits: a subscriber whose
    buffer is full misses the event, and one that closed its channel is
    dropped, so a slow or gone subscriber can never slow the publisher.
    A subscription dropped without being closed (a ``break`` out of its
    ``async for``, then the channel let go) is dropped too, as soon as it
    is garbage: its buffer, and every event in it, go with it.
    """

    __slots__ = ("_buffer", "_keys", "_subscribers")

    def __init__(self, buffer: int) -> None:
        self._buffer = buffer
        # Keyed, not a list: a subscriber that goes is removed in O(1)
        # (20,000 leaving one by one would otherwise scan the list each).
        self._subscribers: dict[int, trio.MemorySendChannel[T]] = {}
        self._keys = itertools.count()

    def subscribe(self, max_buffer: int | None = None) -> trio.MemoryReceiveChannel[T]:
        send, receive = trio.open_memory_channel[T](
            max_buffer if max_buffer is not None else self._buffer
        )
        key = next(self._keys)
        self._subscribers[key] = send
        self._watch(receive, key, send, [0])
        return receive

    def _watch(
        self, receive: trio.MemoryReceiveChannel[T], key: int, send: trio.MemorySendChannel[T], alive: list[int]
    ) -> None:
        # The receive side (and its clones) is all a subscriber holds, and
        # nothing here holds it: once every one is garbage, nobody can read
        # what we send.  Kept, 20,000 subscribers that broke out of ``async
        # for`` held 1,300,000 events and made the next run 4.9x slower.
        # (Closed ones trio tells us of: publish then finds the send side
        # broken.  Not at interpreter exit: nothing is left to save then.)
        alive[0] += 1
        weakref.finalize(receive, self._dropped, key, send, alive).atexit = False
        # A clone reads on when the original is dropped (trio's fan-out
        # idiom closes the original and hands out clones), so clones are
        # counted too.  Weakly referenced here, or the channel would hold
        # itself alive.
        original = weakref.ref(receive)

        def clone() -> trio.MemoryReceiveChannel[T]:
            channel = original()
            assert channel is not None  # called on it, so it is alive
            twin = trio.MemoryReceiveChannel.clone(channel)
            self._watch(twin, key, send, alive)
            return twin

        receive.clone = clone  # type: ignore[method-assign]

    def _dropped(self, key: int, send: trio.MemorySendChannel[T], alive: list[int]) -> None:
        alive[0] -= 1
        if not alive[0]:
            send.close()
            self._subscribers.pop(key, None)

    def publish(self, event: T) -> None:
        for key, send in list(self._subscribers.items()):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.pop(key, None)

    def close(self) -> None:
        """End every subscription (their ``async for`` loops finish)."""
        for send in list(self._subscribers.values()):
            send.close()
        self._subscribers.clear()
