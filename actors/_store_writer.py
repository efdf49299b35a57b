"""The store-writer actor: the only writer of its database.

Group commit: wait for one write, gather whatever else is queued within a
few scheduling rounds (up to ``max_batch``), apply it all in one transaction, then acknowledge every
writer in the batch.  An ack therefore always means "durable".  The
transaction itself never awaits; only the backoff between busy retries
does, and that happens outside any transaction.
"""

from __future__ import annotations

import trio

from messages import StoreAck, StoreWrite, fail_pending
from store import RetryableStoreError, Store


class StoreWriter:
    def __init__(
        self,
        store: Store,
        *,
        max_batch: int = 1024,
        busy_retries: int = 60,
        busy_backoff: float = 0.005,
        busy_backoff_cap: float = 0.5,
        gather_rounds: int = 4,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.store = store
        self.max_batch = max_batch
        self.busy_retries = busy_retries
        self.busy_backoff = busy_backoff
        self.busy_backoff_cap = busy_backoff_cap
        self.gather_rounds = gather_rounds
        self.batches = 0
        self.items = 0
        self.busy_waits = 0

    async def run(self, inbox: trio.MemoryReceiveChannel[StoreWrite]) -> None:
        try:
            async for first in inbox:
                batch = await self._gather(inbox, first)
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
        finally:
            fail_pending(inbox)

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
        for _ in range(self.busy_retries):
            try:
                return self.store.apply(batch)
            except RetryableStoreError:
                self.busy_waits += 1
                await trio.sleep(delay)  # outside the (rolled back) transaction
                delay = min(delay * 2, self.busy_backoff_cap)
        error = f"database {self.store.path} stayed busy through {self.busy_retries} retries"
        return [StoreAck(ok=False, error=error) for _ in batch]
