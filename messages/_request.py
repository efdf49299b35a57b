"""Request-reply in one schedule point.

``await outbox.send(item)`` then ``await pending.receive()`` costs two trips
through trio's scheduler per request (the send yields even when the buffer
has room).  :func:`request` enqueues with ``send_nowait`` when it can and
yields only while waiting for the reply, halving the scheduling cost of
every acked write - the store writer's hot path.

Semantics are those of the two awaits: it is a checkpoint; if it is
cancelled before the item is enqueued, nothing was sent; once enqueued, a
cancellation while waiting abandons only the reply.  Channels with
interceptors, or a full buffer, fall back to ``await outbox.send``.
"""

from __future__ import annotations

from typing import TypeVar

import trio

from ._channel import Outbox, PendingReply

T = TypeVar("T")
R = TypeVar("R")


async def request(outbox: Outbox[T], item: T, pending: PendingReply[R]) -> R:
    """Send ``item`` (which carries ``pending``'s reply slot) and wait for
    the reply."""
    await trio.lowlevel.checkpoint_if_cancelled()
    await outbox.send_eager(item)
    return await pending.receive()
