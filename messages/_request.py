"""Request-reply in one schedule point.

``await outbox.send(item)`` then ``await pending.receive()`` costs two trips
through trio's scheduler per request (the send yields even when the buffer
has room).  :func:`request` enqueues with ``send_nowait`` when it can and
yields only while waiting for the reply, halving the scheduling cost of
every acked write - the store writer's hot path.

Semantics are those of the two awaits: it is a checkpoint; if it is
cancelled before the item is enqueued, nothing was sent; once enqueued, a
cancellation while waiting abandons only the reply.  Channels with
interceptors go through ``send_eager``; a full buffer falls back to ``await outbox.send``.
"""

from __future__ import annotations

from typing import TypeVar

import trio

from ._channel import _EMPTY, Outbox, PendingReply

T = TypeVar("T")
R = TypeVar("R")


async def request(outbox: Outbox[T], item: T, pending: PendingReply[R]) -> R:
    """Send ``item`` (which carries ``pending``'s reply slot) and wait for
    the reply.  A checkpoint.  Cancelled before the item was enqueued:
    nothing was sent; after: only the reply is abandoned - the receiver may
    still act on the item (in doubt).  Raises :class:`ActorStopped` when
    the receiver is gone or drops the request unanswered."""
    await trio.lowlevel.checkpoint_if_cancelled()
    if outbox.intercepted:
        await outbox.send_eager(item)
    else:  # the same, without two coroutine objects per request
        try:
            outbox.send_nowait(item)
        except trio.WouldBlock:
            await outbox.send(item)
    # pending.receive(), inlined: one coroutine object fewer per request,
    # and it stays alive for the whole wait (the store writer's acked writes
    # are the hot path; fewer live objects, fewer garbage-collector passes).
    if pending._state == _EMPTY:
        pending._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(pending._abort)
    else:
        await trio.lowlevel.checkpoint()
    return pending._take()
