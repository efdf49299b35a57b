"""The store-writer actor: the only writer of its database.

Group commit: wait for one write, gather whatever else is queued within a
few scheduling rounds (up to ``max_batch``), apply it all in one transaction, then acknowledge every
writer in the batch.  An ack therefore always means "durable".  The
transaction itself never awaits; only the backoff between busy retries
does, and that happens outside any transaction.

A batch of fire-and-forget writes only (events: nobody
waits on them) is *held* for up to ``hold`` seconds of trio's clock, until
an acknowledged write, a full batch or the inbox's end arrives, and goes
into that transaction: such writes were never promised durable by any
time, and committing them on their own was most of the writer's commits
under a fault soak.  Order is kept (one FIFO batch), so whatever precedes
a durable write is durable too.
"""

from __future__ import annotations

import attrs
import trio

from messages import ActorStopped, Outbox, StoreAck, StoreWrite, fail_pending, reply_pair, request
from store import RetryableStoreError, Store, StoreFull

from ._checks import check_seconds


async def write_durably(store: Outbox[StoreWrite], item: StoreWrite, what: str, failure: str) -> None:
    """Send ``item`` to the store writer and wait until it is committed (a
    checkpoint; ``what`` names the wait).  A write the writer refused
    raises :class:`~messages.ActorStopped` (``failure``: the error's
    start); one it already had (a duplicate) counts as written."""
    reply, pending = reply_pair(what)
    ack: StoreAck = await request(store, attrs.evolve(item, reply_to=reply), pending)
    if not ack.ok and not ack.duplicate:
        raise ActorStopped(f"{failure}: {ack.error}")


class StoreWriter:
    """The store-writer actor: the only writer of ``store``, committing
    its inbox in group commits (see the module docstring).  A write acked
    ``ok`` is durable; a busy database is retried ``busy_retries`` times
    with backoff, then every write of the batch is acked with the error."""

    def __init__(
        self,
        store: Store,
        *,
        max_batch: int = 1024,
        busy_retries: int = 60,
        busy_backoff: float = 0.005,
        busy_backoff_cap: float = 0.5,
        gather_rounds: int = 4,
        hold: float = 0.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.hold = check_seconds(hold, "hold")
        self.store = store
        self.max_batch = max_batch
        self.busy_retries = busy_retries
        self.busy_backoff = busy_backoff
        self.busy_backoff_cap = busy_backoff_cap
        self.gather_rounds = gather_rounds
        self.batches = 0
        self.items = 0
        self.busy_waits = 0
        self.holds = 0
        # Once the orchestrator closes, a busy database is waited out this
        # long, not through every retry: a cancelled app waited 40 s on
        # another connection's lock, its loop stalled by each attempt.
        self.closing_grace = 1.0
        self._closing_at: float | None = None

    def close_soon(self) -> None:
        """The orchestrator is closing: writes still queued get
        ``closing_grace`` seconds (trio clock) of a busy database, then fail
        their acks.  Not a checkpoint."""
        if self._closing_at is None:
            self._closing_at = trio.current_time()

    # KI-protected: a Ctrl-C must never land inside a transaction here (it
    # would kill the writer, and with it the write that marks the run
    # interrupted); trio delivers it to the main task instead.
    @trio.lowlevel.enable_ki_protection
    async def run(self, inbox: trio.MemoryReceiveChannel[StoreWrite]) -> None:
        """Commit batches from ``inbox`` until it closes.

        Cancelled: a batch in hand is still committed (its gathering rounds
        and a hold's commit are shielded), unless the cancellation lands in
        a busy database's backoff: then nothing of it was written and its
        writers' reply slots are closed (they see
        :class:`~messages.ActorStopped`).  Writes still queued are failed
        the same way.  Any other exception from ``Store.apply`` propagates,
        after closing the batch's reply slots."""
        try:
            async for first in inbox:
                batch = await self._gather(inbox, first)
                if self.hold > 0 and len(batch) < self.max_batch and _unacked(batch):
                    try:
                        await self._hold(inbox, batch)
                    except BaseException:
                        # Cancelled while holding: what we hold is ours to write.
                        with trio.CancelScope(shield=True):
                            await self._commit(batch)
                        raise
                await self._commit(batch)
        finally:
            fail_pending(inbox)

    async def _commit(self, batch: list[StoreWrite]) -> None:
        try:
            acks = await self._write(batch)
        except BaseException:
            for item in batch:
                if item.reply_to is not None:
                    item.reply_to.close()
            raise
        self.batches += 1
        self.items += len(batch)
        for item, ack in zip(batch, acks):
            if item.reply_to is not None:
                item.reply_to.send(ack)

    async def _hold(self, inbox: trio.MemoryReceiveChannel[StoreWrite], batch: list[StoreWrite]) -> None:
        """Add to ``batch`` (unacked writes only so far) until an acked write
        arrives (then whatever is queued with it), the batch is full, the
        inbox ends, or ``hold`` seconds pass.  A checkpoint."""
        self.holds += 1
        with trio.move_on_after(self.hold):
            while len(batch) < self.max_batch:
                try:
                    item = await inbox.receive()
                except trio.EndOfChannel:
                    return
                batch.append(item)
                if item.reply_to is not None:
                    while len(batch) < self.max_batch:
                        try:
                            batch.append(inbox.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    return

    async def _gather(
        self, inbox: trio.MemoryReceiveChannel[StoreWrite], first: StoreWrite
    ) -> list[StoreWrite]:
        """``first`` plus whatever arrives within a few scheduling rounds.

        Writers woken in the same round as us get to enqueue before we
        commit, so commits (each an fsync) are fewer and larger.  The rounds
        are shielded: a cancellation cannot strand items we hold.
        """
        batch = [first]
        for _ in range(self.gather_rounds):
            await trio.lowlevel.cancel_shielded_checkpoint()
            before = len(batch)
            while len(batch) < self.max_batch:
                try:
                    batch.append(inbox.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if len(batch) == before or len(batch) >= self.max_batch:
                break
        return batch

    async def _write(self, batch: list[StoreWrite]) -> list[StoreAck]:
        delay = self.busy_backoff
        error = f"database {self.store.path} stayed busy through {self.busy_retries} retries"
        for _ in range(self.busy_retries):
            try:
                return self.store.apply(batch)
            except StoreFull as exc:
                # Every write fails, saying why, and the writer lives on: a
                # run whose write is refused stops with the reason (raised,
                # the error killed every run of the orchestrator as "no
                # transaction is active").  Writes nobody waits for are lost
                # with the batch, as after a busy database's last retry.
                return [StoreAck(ok=False, error=str(exc)) for _ in batch]
            except RetryableStoreError:
                self.busy_waits += 1
                if self._closing_at is not None and trio.current_time() - self._closing_at >= self.closing_grace:
                    error = f"database {self.store.path} stayed busy while the orchestrator closed"
                    break
                await trio.sleep(delay)  # outside the (rolled back) transaction
                delay = min(delay * 2, self.busy_backoff_cap)
        return [StoreAck(ok=False, error=error) for _ in batch]


def _unacked(batch: list[StoreWrite]) -> bool:
    for item in batch:
        if item.reply_to is not None:
            return False
    return True
