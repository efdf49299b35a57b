"""Decision sequencing: the reference's semantics, plus identity and
begin/ack/cancel pairing on every exit path."""

from __future__ import annotations

import pytest
import trio

from actors import AlreadyDecided, DecisionSequencer, SequencerBusy
from messages import StageKey


def key(stage: str) -> StageKey:
    return StageKey(run_id="r", branch_id="b", stage=stage)


def test_reference_counter_semantics() -> None:
    s = DecisionSequencer()
    assert s.next_seq() == 1 and s.next_seq() == 2 and s.current_seq == 2
    assert s.should_process(1)
    assert s.begin_processing(1) and s.pending_seq == 1
    assert not s.begin_processing(2), "only one pending at a time"
    assert not s.ack_processed(2), "ack of a seq that is not pending"
    assert s.ack_processed(1) and s.pending_seq is None
    assert not s.should_process(1) and not s.begin_processing(1)
    assert s.begin_processing(2) and s.cancel_pending(2)
    assert s.should_process(2), "a cancelled seq may be retried"
    assert not s.cancel_pending(2)
    assert s.processed_count == 1
    s.reset()
    assert (s.current_seq, s.pending_seq, s.processed_count) == (0, None, 0)


def test_deciding_acks_and_refuses_duplicates_by_identity() -> None:
    s = DecisionSequencer()
    with s.deciding(key("plan")) as ticket:
        ticket.ack()
    assert ticket.seq == 1 and s.decided_seq(key("plan")) == 1
    with pytest.raises(AlreadyDecided) as info:
        with s.deciding(key("plan")):
            pass  # pragma: no cover
    assert info.value.seq == 1
    assert s.pending_seq is None


@pytest.mark.parametrize("exit_path", ["return", "error", "cancel"])
def test_every_exit_path_releases_the_sequencer(exit_path: str) -> None:
    s = DecisionSequencer()

    def attempt() -> None:
        with s.deciding(key("plan")):
            if exit_path == "error":
                raise RuntimeError("store exploded")
            if exit_path == "cancel":
                raise trio.Cancelled._create()  # type: ignore[attr-defined]

    if exit_path == "return":
        attempt()
    else:
        with pytest.raises(BaseException):
            attempt()
    assert s.pending_seq is None and not s.is_decided(key("plan"))
    # The same stage may try again, with the same seq...
    with s.deciding(key("plan")) as ticket:
        assert ticket.seq == 1
        ticket.ack()
    # ...and the next stage is never blocked.
    with s.deciding(key("tasks")) as ticket:
        ticket.ack()
    assert ticket.seq == 2 and s.processed_count == 2


def test_concurrent_decisions_are_refused_not_interleaved() -> None:
    s = DecisionSequencer()
    with s.deciding(key("plan")):
        with pytest.raises(SequencerBusy, match="#1"):
            with s.deciding(key("tasks")):
                pass  # pragma: no cover
    assert s.pending_seq is None


def test_restored_sequencer_continues_after_durable_decisions() -> None:
    s = DecisionSequencer(decided=[(key("plan"), 1), (key("tasks"), 2)])
    assert s.is_decided(key("plan")) and s.current_seq == 2
    with s.deciding(key("implement")) as ticket:
        ticket.ack()
    assert ticket.seq == 3
