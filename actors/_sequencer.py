"""Decision sequencing: exactly one decision per (run, branch, stage).

:class:`DecisionSequencer` keeps the reference's counter semantics
(``next_seq``, ``should_process``, ``begin_processing``, ``ack_processed``,
``cancel_pending``, ``current_seq``, ``pending_seq``, ``processed_count``,
``reset``) and adds what the reference lacked: deduplication by *identity*
(:class:`~messages.StageKey`), and :meth:`DecisionSequencer.deciding`, a
context manager that pairs begin with ack or cancel so that no exit path -
success, halt, error or cancellation - can leave the sequencer blocked.

It is plain synchronous state owned by one coordinator task; trio's single
thread needs no locks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import attrs

from messages import ConclaveError, StageKey


class SequencerBusy(ConclaveError, RuntimeError):
    """Another decision is pending: decisions of a run are made one at a time."""


class AlreadyDecided(ConclaveError):
    """The key already has a durable decision; carries its seq."""

    def __init__(self, key: StageKey, seq: int) -> None:
        super().__init__(f"stage {key.stage!r} of branch {key.branch_id} is already decided (seq {seq})")
        self.key = key
        self.seq = seq


@attrs.define(slots=True)
class Ticket:
    """The right to make one decision: ``seq`` is reserved for ``key``.
    Call :meth:`ack` once the decision is durable; leaving the ``with``
    block without acking cancels it, and the same key may try again later
    (with the same seq)."""

    key: StageKey
    seq: int
    acked: bool = False

    def ack(self) -> None:
        self.acked = True


class DecisionSequencer:
    """Hands out one run's decision seqs and lets each (run, branch,
    stage) be decided once, one decision at a time (see the module
    docstring).  Synchronous; owned by one coordinator task."""

    def __init__(self, *, start_seq: int = 0, decided: Iterable[tuple[StageKey, int]] = ()) -> None:
        """``start_seq`` and ``decided`` restore a sequencer from the store
        (on resume): seqs continue after ``start_seq`` and decided keys are
        never decided again."""
        self._seq = start_seq
        self._processed: set[int] = set()
        self._pending: int | None = None
        self._decided: dict[StageKey, int] = {}
        self._reserved: dict[StageKey, int] = {}
        for key, seq in decided:
            self._decided[key] = seq
            self._processed.add(seq)
            self._seq = max(self._seq, seq)

    # -- the reference's counter semantics ---------------------------------

    def next_seq(self) -> int:
        """Draw a fresh seq (the first call returns 1)."""
        self._seq += 1
        return self._seq

    def should_process(self, seq: int) -> bool:
        return seq not in self._processed

    def begin_processing(self, seq: int) -> bool:
        """Mark ``seq`` pending; False if it was processed or another seq is
        pending."""
        if seq in self._processed or self._pending is not None:
            return False
        self._pending = seq
        return True

    def ack_processed(self, seq: int) -> bool:
        """Mark the pending ``seq`` processed; False unless it is pending."""
        if self._pending != seq:
            return False
        self._pending = None
        self._processed.add(seq)
        return True

    def cancel_pending(self, seq: int) -> bool:
        """Release the pending ``seq`` without marking it processed (it may
        be retried); False unless it is pending."""
        if self._pending != seq:
            return False
        self._pending = None
        return True

    @property
    def current_seq(self) -> int:
        return self._seq

    @property
    def pending_seq(self) -> int | None:
        return self._pending

    @property
    def processed_count(self) -> int:
        return len(self._processed)

    def reset(self) -> None:
        self._seq = 0
        self._processed.clear()
        self._pending = None
        self._decided.clear()
        self._reserved.clear()

    # -- identity -----------------------------------------------------------

    def decided_seq(self, key: StageKey) -> int | None:
        return self._decided.get(key)

    def is_decided(self, key: StageKey) -> bool:
        return key in self._decided

    def record_decided(self, key: StageKey, seq: int) -> None:
        """Note a decision found durable elsewhere (e.g. a duplicate insert
        the store rejected)."""
        self._decided[key] = seq
        self._processed.add(seq)
        self._seq = max(self._seq, seq)
        self._reserved.pop(key, None)

    @contextmanager
    def deciding(self, key: StageKey) -> Iterator[Ticket]:
        """Reserve the decision of ``key``.

        Raises :class:`AlreadyDecided` for a decided key and
        :class:`SequencerBusy` while another decision is pending.  On exit,
        an acked ticket marks ``key`` decided; anything else (exception,
        cancellation, return without ack) cancels the pending seq.
        """
        if key in self._decided:
            raise AlreadyDecided(key, self._decided[key])
        seq = self._reserved.get(key) or self.next_seq()
        if not self.begin_processing(seq):
            raise SequencerBusy(
                f"cannot decide {key.stage!r}: decision #{self._pending} is still pending"
            )
        self._reserved[key] = seq
        ticket = Ticket(key=key, seq=seq)
        try:
            yield ticket
        finally:
            if ticket.acked:
                self.ack_processed(seq)
                self._decided[key] = seq
                self._reserved.pop(key, None)
            else:
                self.cancel_pending(seq)
