"""The store: typed writes applied in batches, and typed reads.

``Store`` is synchronous and owned by one task (the store-writer actor for
writes; any task for reads through its own read-only ``Store``).  A batch is
one transaction; each item runs in a savepoint of its own, so one bad item
(a duplicate decision, say) is reported on its own ack and does not undo the
rest.  Nothing here awaits, so no transaction can straddle a checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import apsw
import attrs

from messages import (
    AgentOutput,
    DropRun,
    PersistBranch,
    PersistDecision,
    PersistEvent,
    PersistOutput,
    PersistRun,
    RunUpdate,
    StoreAck,
    StoreWrite,
    TokenUsage,
    storable_text,
)

from ._busy import BUSY_ERRORS, retry_busy
from ._db import BUSY_TIMEOUT_MS, Durability, open_connection
from ._errors import StoreError, StoreFull
from ._lineage import LINEAGE_CTE
from ._runlock import claim_run, is_claimed


def branch_named(branch_id: str, prefix: str) -> bool:
    """Whether ``prefix`` names ``branch_id``: the start of its id, or of
    its short id (the first hex digits of its random suffix, in either
    case: hex digits)."""
    return branch_id.startswith(prefix) or branch_id.rsplit("-", 1)[-1].startswith(prefix.lower())


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch: the one timestamp unit we store.
    Timestamps are data, never inputs to logic or digests."""
    return time.time_ns() // 1_000_000


class RetryableStoreError(StoreError):
    """SQLite was busy or locked; the whole batch may be tried again."""


_OK = StoreAck(ok=True)  # frozen: one instance serves every successful write

# Called around each batch's COMMIT with ("before_commit" | "after_commit",
# items in the batch).  A seam for tests (the crash matrix kills the process
# here); None in production.
CommitHook = Callable[[str, int], None]

_INSERT_OUTPUT = (
    "INSERT INTO agent_outputs (run_id, branch_id, stage, agent, attempt, status,"
    " content, format, input_tokens, cached_input_tokens, output_tokens,"
    " reasoning_output_tokens, total_tokens, usage_known, model, provider, error,"
    " created_at, started_at, finished_at, cache_write_input_tokens, cache_write_1h_input_tokens)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


def output_params(out: AgentOutput, now: int) -> tuple[Any, ...]:
    # One timestamp unit: wall ms.  The call's span comes from the run's
    # clock (simulated under the virtual clock), anchored at commit time.
    span = max(0, int((out.finished_at - out.started_at) * 1000))
    return (
        out.key.run_id,
        out.key.branch_id,
        out.key.stage,
        out.key.agent,
        out.attempt,
        out.status,
        out.content,
        out.format,
        *_usage_columns(out.usage),
        int(out.usage is not None),
        out.model,
        out.provider,
        out.error,
        now,
        now - span,
        now,
        *_write_columns(out.usage),
    )


_INSERT_EVENT = (
    "INSERT INTO events (run_id, branch_id, kind, stage, agent, attempt, detail, at)"
    " VALUES (?,?,?,?,?,?,?,?)"
)


def event_params(item: PersistEvent) -> tuple[Any, ...]:
    return (
        item.run_id,
        item.branch_id,
        item.kind,
        item.stage,
        item.agent,
        item.attempt,
        _json(detail if type(detail := item.detail) is dict else dict(detail)),
        item.at_ms,
    )


@attrs.frozen(kw_only=True, slots=True)
class RunRow:
    """One row of ``runs``: a run's identity, goal, seed and pipeline, its
    status as stored (a run left ``running`` by a killed process stays
    so), its current branch, usage totals and digest.  Times are epoch
    milliseconds (:func:`wall_clock_ms`)."""

    run_id: str
    spec_id: str
    goal: str
    seed: int | None
    pipeline: dict[str, Any] = attrs.field(eq=False)
    status: str
    halt_reason: str | None
    current_branch_id: str | None
    usage: TokenUsage
    digest: str | None
    created_at: int
    updated_at: int


@attrs.frozen(kw_only=True, slots=True)
class BranchRow:
    """One branch of a run: its parent and fork stage (``None`` for the
    root), its options (simulator settings, budget, ...) and its own
    outcome - status, halt reason and digest."""

    branch_id: str
    run_id: str
    parent_branch_id: str | None
    fork_stage: str | None
    created_at: int
    options: dict[str, Any] = attrs.field(factory=dict, eq=False)
    status: str | None = None
    halt_reason: str | None = None
    digest: str | None = None


@attrs.frozen(kw_only=True, slots=True)
class DecisionRow:
    """A stage's durable decision on one branch: its seq (unique per
    run), status and the verdict JSON it was made on."""

    run_id: str
    branch_id: str
    stage: str
    seq: int
    status: str
    verdict: dict[str, Any] = attrs.field(eq=False)
    decided_at: int


@attrs.frozen(kw_only=True, slots=True)
class OutputRow:
    """One stored attempt of one agent: accepted (with its content) or
    failed (with its error), its usage (``None``: unknown) and the model
    and provider that answered."""

    run_id: str
    branch_id: str
    stage: str
    agent: str
    attempt: int
    status: str
    content: str
    format: str
    usage: TokenUsage | None
    model: str
    provider: str
    error: str | None
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    # Rows are only ever added, in id order: which existed when (a resume's
    # replays are the lineage's first rows).  Not part of a row's value.
    id: int = attrs.field(default=0, eq=False)


@attrs.frozen(kw_only=True, slots=True)
class EventRow:
    """One entry of a run's event log (``kind`` such as ``stage_start``,
    ``retry``, ``agent_call``), with its JSON ``detail``; ``at`` in epoch
    milliseconds."""

    id: int
    run_id: str
    branch_id: str
    kind: str
    stage: str | None
    agent: str | None
    attempt: int | None
    detail: dict[str, Any] = attrs.field(eq=False)
    at: int


def _usage_columns(usage: TokenUsage | None) -> tuple[int | None, ...]:
    if usage is None:
        return (None, None, None, None, None)
    return (
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.output_tokens,
        usage.reasoning_output_tokens,
        usage.total_tokens,
    )


def _write_columns(usage: TokenUsage | None) -> tuple[int | None, ...]:
    if usage is None:
        return (None, None)
    return (usage.cache_write_input_tokens, usage.cache_write_1h_input_tokens)


def _usage_from(row: Sequence[Any], writes: Sequence[Any] = (0, 0)) -> TokenUsage | None:
    """The usage of ``row``'s five counts (None if unknown) and its two
    cache-write counts (NULL in rows stored before they were counted)."""
    if row[0] is None:
        return None
    return TokenUsage(
        input_tokens=row[0],
        cached_input_tokens=row[1],
        output_tokens=row[2],
        reasoning_output_tokens=row[3],
        total_tokens=row[4],
        cache_write_input_tokens=writes[0] or 0,
        cache_write_1h_input_tokens=writes[1] or 0,
    )


def _make_encoder() -> Callable[[Any], str]:
    """``json.dumps(value, sort_keys=True, separators=(",", ":"))``, the
    canonical form every JSON column is stored in, without building a new
    encoder per call (json.dumps with keyword arguments does, and this runs
    for every event and decision).  Same bytes; only the circular-reference
    check is skipped (our values are trees; a cycle still fails, with
    RecursionError instead of ValueError)."""
    encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:  # pragma: no cover - CPython has the C encoder
        return encoder.encode
    iterencode = c_make_encoder(
        None,
        encoder.default,
        json.encoder.encode_basestring_ascii,
        None,
        encoder.key_separator,
        encoder.item_separator,
        True,
        False,
        True,
    )

    def encode(value: Any) -> str:
        if isinstance(value, str):
            return encoder.encode(value)
        return "".join(iterencode(value, 0))

    return encode


_json = _make_encoder()


# Python values SQLite cannot hold: text with lone surrogates (not UTF-8),
# integers beyond 64 bits.
_UNSTORABLE = (UnicodeEncodeError, OverflowError)
# Errors about the database rather than an item: no item of the batch can
# be written, so none is failed on its own (each ack would blame its item).
_WHOLE_BATCH = (*BUSY_ERRORS, apsw.FullError)


def _full_in(exc: BaseException) -> apsw.FullError | None:
    """The full-disk error behind ``exc``, if any: the savepoint's own
    rollback, failing once SQLite has ended the transaction, raises an
    error of its own over it."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, apsw.FullError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _repaired(item: StoreWrite) -> StoreWrite | None:
    """An output with its text made storable, if that changes anything."""
    if not isinstance(item, PersistOutput):
        return None
    out = item.output
    fixed = attrs.evolve(
        out,
        content=storable_text(out.content),
        model=storable_text(out.model),
        provider=storable_text(out.provider),
        error=None if out.error is None else storable_text(out.error),
    )
    return None if fixed == out else attrs.evolve(item, output=fixed)


class Store:
    """One SQLite database.  Not thread-safe; not a checkpoint anywhere."""

    def __init__(
        self, conn: apsw.Connection, path: str, *, clock: Callable[[], int] = wall_clock_ms
    ) -> None:
        self._conn = conn
        self.path = path
        self._clock = clock
        self.commit_hook: CommitHook | None = None
        # Facts that never change once written (a branch's parent, a run's
        # pipeline), remembered for the lineage fast path.  Bounded: cleared
        # when full.
        self._roots: dict[tuple[str, str], bool] = {}
        self._stages: dict[str, frozenset[str]] = {}
        self.closed = False

    @property
    def writable(self) -> bool:
        """False for a store opened ``readonly`` (or a read-only file).
        Raises :class:`StoreError` on a closed store."""
        self._check_open("write to it")
        return not self._conn.readonly("main")

    def _check_open(self, to: str) -> None:
        if self.closed:  # else apsw's ConnectionClosedError, naming no store
            raise StoreError(f"store {self.path!r} is closed: open it again (Store.open) to {to}")

    @classmethod
    def open(
        cls,
        path: str,
        *,
        readonly: bool = False,
        durability: Durability = "full",
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> Store:
        """Open (creating and migrating unless ``readonly``).  Raises
        :class:`StoreError` naming the file and the problem."""
        conn = open_connection(
            path, readonly=readonly, durability=durability, busy_timeout_ms=busy_timeout_ms
        )
        return cls(conn, path, clock=clock)

    def close(self) -> None:
        self.closed = True
        self._conn.close()

    def claim_run(self, run_id: str) -> AbstractContextManager[None]:
        """Hold ``run_id`` for the block: at most one orchestrator, in any
        process, drives a run at a time (see ``store._runlock``).  Raises
        :class:`~store.RunLocked` at once, before anything is written, if
        another holds it.  Not a checkpoint; released in ``finally``."""
        if not isinstance(run_id, str):
            # (None failed inside the lock table as an AttributeError.)
            raise TypeError(f"run_id must be a string, got {run_id!r}")
        return claim_run(self.path, run_id, scope=self)

    def run_is_driven(self, run_id: str) -> bool | None:
        """Whether an orchestrator (of any process) holds ``run_id`` now:
        a run stored as ``running`` that nobody holds was killed.  None if
        that cannot be known (a database in memory).  Creates nothing."""
        return is_claimed(self.path, run_id)

    def run_state(self, run_id: str) -> tuple[RunRow | None, bool | None]:
        """The run's row and whether an orchestrator holds it
        (:meth:`run_is_driven`), read so that a run ending between the two
        reads is not taken for a killed one: a run records its end before
        it lets go of its claim, so a row that reads ``running`` with no
        holder is read again.  (Read the other way round, ``status`` showed
        runs that had just completed as stalled.)"""
        run = self.get_run(run_id)
        if run is None:
            return None, None
        driven = self.run_is_driven(run_id)
        if run.status == "running" and driven is False:
            run = self.get_run(run_id)
        return run, driven

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes -----------------------------------------------------------

    def apply(self, batch: Sequence[StoreWrite]) -> list[StoreAck]:
        """Apply ``batch`` in one transaction and return one ack per item.

        Raises :class:`RetryableStoreError` (nothing applied) when SQLite is
        busy or locked, and :class:`StoreFull` (nothing applied) when the
        disk is full; other SQLite errors fail only their own item.
        """
        self._check_open("write to it")
        now = self._clock()
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except BUSY_ERRORS as exc:
            raise RetryableStoreError(str(exc)) from exc
        try:
            # Optimistic path: the whole batch in one savepoint.  Only if an
            # item fails is that undone and the batch redone item by item,
            # each in a savepoint of its own, so a bad item still fails only
            # its own ack.
            acks = self._apply_batch(batch, now)
            if acks is None:
                acks = [self._apply_guarded(item, now) for item in batch]
            if self.commit_hook is not None:
                self.commit_hook("before_commit", len(batch))
            conn.execute("COMMIT")
        except BUSY_ERRORS as exc:
            self._rollback()
            raise RetryableStoreError(str(exc)) from exc
        except apsw.Error as exc:
            full = _full_in(exc)
            self._rollback()
            if full is None:
                raise
            # SQLite rolls the transaction back itself on a full disk: the
            # items then "failed" on savepoints that no longer existed, and
            # COMMIT raised "no transaction is active" - which said nothing
            # of the disk, and killed the store writer.
            raise StoreFull(
                f"cannot write to {self.path}: {full} (the disk, or the database's size limit); "
                "nothing of this batch was written: free space, then resume the run"
            ) from exc
        except BaseException:
            self._rollback()
            raise
        if self.commit_hook is not None:
            self.commit_hook("after_commit", len(batch))
        return acks

    def _apply_batch(self, batch: Sequence[StoreWrite], now: int) -> list[StoreAck] | None:
        """Apply ``batch`` in one savepoint and return its acks, or roll the
        savepoint back and return None if any item failed.

        Runs of consecutive outputs, or of consecutive events, go in with one
        ``executemany`` each; order is kept, so event ids are as item by
        item.  Without a savepoint per item, a failing statement is undone
        by SQLite itself (a constraint aborts only its statement), and an
        item whose later statement fails is undone with the whole savepoint.
        """
        conn = self._conn
        acks: list[StoreAck] = []
        n = len(batch)
        try:
            with conn:  # one savepoint for the whole batch
                i = 0
                while i < n:
                    item = batch[i]
                    j = i + 1
                    if isinstance(item, PersistOutput):
                        rows = [output_params(item.output, now)]
                        while j < n and isinstance(nxt := batch[j], PersistOutput):
                            rows.append(output_params(nxt.output, now))
                            j += 1
                        conn.executemany(_INSERT_OUTPUT, rows)
                        acks.extend([_OK] * (j - i))
                    elif isinstance(item, PersistEvent):
                        rows = [event_params(item)]
                        while j < n and isinstance(nxt := batch[j], PersistEvent):
                            rows.append(event_params(nxt))
                            j += 1
                        conn.executemany(_INSERT_EVENT, rows)
                        acks.extend([_OK] * (j - i))
                    else:
                        acks.append(self._apply_one(item, now) or _OK)
                    i = j
        except _WHOLE_BATCH:
            raise
        except (apsw.Error, *_UNSTORABLE):
            if conn.getautocommit():
                raise  # SQLite ended the transaction itself: no item can be written
            return None
        return acks

    def _apply_guarded(self, item: StoreWrite, now: int) -> StoreAck:
        try:
            with self._conn:  # a savepoint per item
                ack = self._apply_one(item, now)
        except apsw.ConstraintError as exc:
            return StoreAck(ok=False, duplicate=_is_unique(exc), error=str(exc))
        except _WHOLE_BATCH:
            raise
        except apsw.Error as exc:
            if self._conn.getautocommit():
                raise  # SQLite ended the transaction itself: no item can be written
            return StoreAck(ok=False, error=f"{type(exc).__name__}: {exc}")
        except _UNSTORABLE as exc:
            # A value SQLite cannot hold fails its own item, never the
            # writer (and with it every run of the orchestrator).  An
            # output's text is what a provider sent: kept, its lone
            # surrogates shown as U+FFFD, rather than lose the answer.
            repaired = _repaired(item)
            if repaired is not None and isinstance(exc, UnicodeEncodeError):
                return self._apply_guarded(repaired, now)
            what = "text with a lone surrogate" if isinstance(exc, UnicodeEncodeError) else "a number beyond 64 bits"
            return StoreAck(ok=False, error=f"cannot store {type(item).__name__}: it holds {what}")
        return ack or _OK

    def _rollback(self) -> None:
        if not self._conn.getautocommit():
            self._conn.execute("ROLLBACK")

    def _apply_one(self, item: StoreWrite, now: int) -> StoreAck | None:
        conn = self._conn
        if isinstance(item, PersistOutput):
            conn.execute(_INSERT_OUTPUT, output_params(item.output, now))
        elif isinstance(item, PersistDecision):
            d = item.decision
            try:
                conn.execute(
                    "INSERT INTO decisions (run_id, branch_id, stage, seq, status, verdict,"
                    " decided_at) VALUES (?,?,?,?,?,?,?)",
                    (d.key.run_id, d.key.branch_id, d.key.stage, d.seq, d.status, _json(d.verdict), now),
                )
                # The event log records the decision in the same transaction:
                # never a decision without its event, nor the reverse.
                conn.execute(
                    _INSERT_EVENT,
                    (d.key.run_id, d.key.branch_id, "decision", d.key.stage, None, None,
                     _json({"seq": d.seq, "status": d.status}), now),
                )
            except apsw.ConstraintError:
                # Idempotent replay of the *same* decision (a coordinator
                # cancelled after sending it retries with the same seq) is a
                # success; any other clash is a real duplicate.
                row = conn.execute(
                    "SELECT seq, status FROM decisions WHERE run_id = ? AND branch_id = ?"
                    " AND stage = ?",
                    (d.key.run_id, d.key.branch_id, d.key.stage),
                ).fetchone()
                if row is not None and (row[0], row[1]) == (d.seq, d.status):
                    return StoreAck(ok=True, duplicate=True)
                raise
        elif isinstance(item, PersistEvent):
            conn.execute(_INSERT_EVENT, event_params(item))
        elif isinstance(item, RunUpdate):
            usage = (*_usage_columns(item.usage), *_write_columns(item.usage)) if item.usage is not None else None
            if item.status == "interrupted":
                # Only a run still running is interrupted: a cancellation
                # that lands while the run's end is being acknowledged finds
                # that end already written (or queued before this), and it
                # stands - it was overwritten, and a resume then re-drove a
                # completed run.
                conn.execute(
                    "UPDATE runs SET status = ?, halt_reason = ?, updated_at = ?"
                    " WHERE run_id = ? AND status = 'running'",
                    (item.status, item.halt_reason, now, item.run_id),
                )
                if conn.changes() == 1:
                    conn.execute(
                        "UPDATE branches SET status = ?, halt_reason = ?"
                        " WHERE branch_id = (SELECT current_branch_id FROM runs WHERE run_id = ?)",
                        (item.status, item.halt_reason, item.run_id),
                    )
                elif conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (item.run_id,)).fetchone() is None:
                    raise apsw.ConstraintError(f"no run {item.run_id!r} to update")
            elif usage is None:
                conn.execute(
                    "UPDATE runs SET status = ?, halt_reason = ?, digest = COALESCE(?, digest),"
                    " updated_at = ? WHERE run_id = ?",
                    (item.status, item.halt_reason, item.digest, now, item.run_id),
                )
            else:
                conn.execute(
                    "UPDATE runs SET status = ?, halt_reason = ?, digest = COALESCE(?, digest),"
                    " input_tokens = ?, cached_input_tokens = ?, output_tokens = ?,"
                    " reasoning_output_tokens = ?, total_tokens = ?, cache_write_input_tokens = ?,"
                    " cache_write_1h_input_tokens = ?, updated_at = ? WHERE run_id = ?",
                    (item.status, item.halt_reason, item.digest, *usage, now, item.run_id),
                )
            if item.status != "interrupted":
                if conn.changes() != 1:
                    raise apsw.ConstraintError(f"no run {item.run_id!r} to update")
                # The current branch keeps its own outcome (history per branch).
                conn.execute(
                    "UPDATE branches SET status = ?, halt_reason = ?, digest = COALESCE(?, digest)"
                    " WHERE branch_id = (SELECT current_branch_id FROM runs WHERE run_id = ?)",
                    (item.status, item.halt_reason, item.digest, item.run_id),
                )
        elif isinstance(item, PersistRun):
            conn.execute(
                "INSERT INTO runs (run_id, spec_id, goal, seed, pipeline, status,"
                " current_branch_id, created_at, updated_at)"
                " VALUES (?,?,?,?,?, 'running', ?,?,?)",
                (
                    item.run_id,
                    item.spec_id,
                    item.goal,
                    item.seed,
                    item.pipeline,
                    item.branch_id,
                    now,
                    now,
                ),
            )
            conn.execute(
                "INSERT INTO branches (branch_id, run_id, parent_branch_id, fork_stage,"
                " created_at, options, status) VALUES (?,?,NULL,NULL,?,?, 'running')",
                (item.branch_id, item.run_id, now, item.options),
            )
        elif isinstance(item, PersistBranch):
            parent = conn.execute(
                "SELECT 1 FROM branches WHERE branch_id = ? AND run_id = ?",
                (item.parent_branch_id, item.run_id),
            ).fetchone()
            if parent is None:
                raise apsw.ConstraintError(
                    f"no branch {item.parent_branch_id!r} in run {item.run_id!r} to fork from"
                )
            conn.execute(
                "INSERT INTO branches (branch_id, run_id, parent_branch_id, fork_stage,"
                " created_at, options, status) VALUES (?,?,?,?,?,?, 'running')",
                (item.branch_id, item.run_id, item.parent_branch_id, item.fork_stage, now, item.options),
            )
            conn.execute(
                "UPDATE runs SET current_branch_id = ?, status = 'running', halt_reason = NULL,"
                " digest = NULL, updated_at = ? WHERE run_id = ?",
                (item.branch_id, now, item.run_id),
            )
        elif isinstance(item, DropRun):
            branches = conn.execute("SELECT branch_id FROM branches WHERE run_id = ?", (item.run_id,)).fetchall()
            # Branches, outputs, decisions and events go with it (ON DELETE CASCADE).
            conn.execute("DELETE FROM runs WHERE run_id = ?", (item.run_id,))
            if conn.changes() != 1:
                raise apsw.ConstraintError(f"no run {item.run_id!r} to drop")
            # What was remembered of it no longer holds (a rolled-back drop
            # only costs a re-read).
            self._stages.pop(item.run_id, None)
            for (branch_id,) in branches:
                self._roots.pop((item.run_id, str(branch_id)), None)
        else:  # pragma: no cover - the type says this cannot happen
            raise TypeError(f"not a store write: {item!r}")
        return None

    # -- reads --------------------------------------------------------------
    # Every read retries busy/locked with backoff (retry_busy); other
    # errors propagate.  Reads never write, so they may run between the
    # writer's transactions on the same connection.
    #
    # In a statement with ORDER BY or LIMIT, bound parameters are written
    # `+?`: SQLite (3.54, as apsw bundles it) otherwise compiles such a
    # statement again on every run, so that its planner can look at the
    # values bound - the statement cache saved nothing, and the stage read
    # consensus decides from took 63 us instead of 10.  Unary + is a no-op
    # on any value and leaves a comparison's affinity as it was (a bare
    # parameter has none either); the plans are the same.

    def _rows(self, sql: str, args: Any = ()) -> list[Any]:
        self._check_open("read it")
        conn = self._conn
        return retry_busy(lambda: conn.execute(sql, args).fetchall(), what=self.path)

    _RUN_COLUMNS = (
        "SELECT run_id, spec_id, goal, seed, pipeline, status, halt_reason,"
        " current_branch_id, input_tokens, cached_input_tokens, output_tokens,"
        " reasoning_output_tokens, total_tokens, digest, created_at, updated_at,"
        " cache_write_input_tokens, cache_write_1h_input_tokens FROM runs"
    )

    def get_run(self, run_id: str) -> RunRow | None:
        rows = self._rows(self._RUN_COLUMNS + " WHERE run_id = ?", (run_id,))
        return _run_row(rows[0]) if rows else None

    def list_runs(self, limit: int = 20) -> list[RunRow]:
        """The latest ``limit`` runs, newest first."""
        # SQLite reads LIMIT -1 as "no limit", and 2**70 overflows.
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 2**63 - 1:
            raise ValueError(f"limit must be a whole number >= 1, got {limit!r}")
        rows = self._rows(self._RUN_COLUMNS + " ORDER BY created_at DESC, run_id DESC LIMIT +?", (limit,))
        return [_run_row(r) for r in rows]

    _BRANCH_COLUMNS = (
        "SELECT branch_id, run_id, parent_branch_id, fork_stage, created_at, options, status,"
        " halt_reason, digest FROM branches"
    )

    def branches(self, run_id: str) -> list[BranchRow]:
        rows = self._rows(self._BRANCH_COLUMNS + " WHERE run_id = +? ORDER BY created_at, rowid", (run_id,))
        return [_branch_row(r) for r in rows]

    def get_branch(self, run_id: str, branch_id: str) -> BranchRow | None:
        rows = self._rows(
            self._BRANCH_COLUMNS + " WHERE run_id = ? AND branch_id = ?", (run_id, branch_id)
        )
        return _branch_row(rows[0]) if rows else None

    def find_branches(self, run_id: str, prefix: str) -> list[BranchRow]:
        """Branches of ``run_id`` whose id, or short id (the first hex digits
        of the random suffix, in either case: hex digits), starts with
        ``prefix``."""
        return [b for b in self.branches(run_id) if branch_named(b.branch_id, prefix)]

    def max_seq(self, run_id: str) -> int:
        rows = self._rows("SELECT COALESCE(MAX(seq), 0) FROM decisions WHERE run_id = ?", (run_id,))
        return int(rows[0][0])

    _DECISION_COLUMNS = "SELECT d.run_id, d.branch_id, d.stage, d.seq, d.status, d.verdict, d.decided_at"

    def decisions(self, run_id: str, branch_id: str | None = None) -> list[DecisionRow]:
        """Decisions made *on* ``branch_id`` (or on any branch); see
        :meth:`lineage_decisions` for what a branch sees."""
        sql = self._DECISION_COLUMNS + " FROM decisions d WHERE d.run_id = +?"
        args: tuple[Any, ...] = (run_id,)
        if branch_id is not None:
            sql += " AND d.branch_id = +?"
            args += (branch_id,)
        return [_decision_row(r) for r in self._rows(sql + " ORDER BY d.seq", args)]

    def lineage_decisions(self, run_id: str, branch_id: str) -> list[DecisionRow]:
        """The decisions ``branch_id`` sees - its own and the ones it
        inherits - in pipeline order."""
        sql = (
            LINEAGE_CTE
            + self._DECISION_COLUMNS
            + " FROM decisions d JOIN lineage l ON d.branch_id = l.branch_id AND d.stage = l.stage"
            " WHERE d.run_id = :run ORDER BY l.idx"
        )
        return [_decision_row(r) for r in self._rows(sql, {"run": run_id, "branch": branch_id})]

    def lineage_decisions_by_branch(self, run_id: str) -> dict[str, list[DecisionRow]]:
        """:meth:`lineage_decisions` of every branch of ``run_id`` at once,
        from three reads: one lineage query per branch, each walking the
        branch's whole chain, made ``conclave branches`` quadratic (3,000
        branches: 15 s)."""
        stages, owners = self._stage_owners(run_id)
        made = {(d.branch_id, d.stage): d for d in self.decisions(run_id)}
        return {
            branch_id: [
                made[(owner, stage)]
                for owner, stage in zip(row_owners, stages)
                if owner is not None and (owner, stage) in made
            ]
            for branch_id, row_owners in owners.items()
        }

    def stage_owner(self, run_id: str, branch_id: str, stage: str) -> str | None:
        """The branch of ``branch_id``'s lineage that runs (or ran) ``stage``:
        itself, or the ancestor it inherits the stage from; None for a stage
        the run's pipeline does not name, or a branch it does not have."""
        stages, owners = self._stage_owners(run_id)
        row_owners = owners.get(branch_id)
        if row_owners is None or stage not in stages:
            return None
        return row_owners[stages.index(stage)]

    def _stage_owners(self, run_id: str) -> tuple[list[str], dict[str, list[str | None]]]:
        """The run's stages in pipeline order and, per branch, which branch
        owns each of them.  The rule of :data:`LINEAGE_CTE`: a branch owns
        the stages from its fork stage on (every stage if it has none, or
        one the pipeline does not name) and sees the earlier ones as its
        parent does."""
        run = self.get_run(run_id)
        if run is None:
            return [], {}
        named = (s.get("name") for s in run.pipeline.get("stages", ()) if isinstance(s, dict))
        stages: list[str] = [name for name in named if isinstance(name, str)]
        index = {name: i for i, name in enumerate(stages)}
        branches = {b.branch_id: b for b in self.branches(run_id)}
        owners: dict[str, list[str | None]] = {}

        def owners_of(branch_id: str, visiting: frozenset[str]) -> list[str | None]:
            known = owners.get(branch_id)
            if known is not None:
                return known
            row = branches[branch_id]
            lo = index.get(row.fork_stage or "", 0)
            parent = row.parent_branch_id
            visiting = visiting | {branch_id}
            above: list[str | None] = (
                owners_of(parent, visiting) if parent in branches and parent not in visiting else [None] * len(stages)
            )
            owners[branch_id] = mine = [branch_id if i >= lo else above[i] for i in range(len(stages))]
            return mine

        for branch_id in branches:
            owners_of(branch_id, frozenset())
        return stages, owners

    _OUTPUT_COLUMNS = (
        "SELECT o.run_id, o.branch_id, o.stage, o.agent, o.attempt, o.status, o.content, o.format,"
        " o.input_tokens, o.cached_input_tokens, o.output_tokens, o.reasoning_output_tokens,"
        " o.total_tokens, o.model, o.provider, o.error, o.created_at, o.started_at, o.finished_at,"
        " o.cache_write_input_tokens, o.cache_write_1h_input_tokens, o.id"
    )

    def outputs(
        self,
        run_id: str,
        branch_id: str | None = None,
        stage: str | None = None,
        *,
        accepted_only: bool = False,
    ) -> list[OutputRow]:
        """Outputs written *on* ``branch_id`` (history, not consensus input:
        consensus reads :meth:`lineage_outputs`)."""
        sql = self._OUTPUT_COLUMNS + " FROM agent_outputs o WHERE o.run_id = +?"
        args: tuple[Any, ...] = (run_id,)
        if branch_id is not None:
            sql += " AND o.branch_id = +?"
            args += (branch_id,)
        if stage is not None:
            sql += " AND o.stage = +?"
            args += (stage,)
        if accepted_only:
            sql += " AND o.status = 'accepted'"
        return [_output_row(r) for r in self._rows(sql + " ORDER BY o.stage, o.agent, o.attempt", args)]

    def lineage_outputs(
        self,
        run_id: str,
        branch_id: str,
        stage: str | None = None,
        *,
        accepted_only: bool = False,
    ) -> list[OutputRow]:
        """The one lineage-aware read of agent outputs: what ``branch_id``
        sees for ``stage`` (or every stage), parallel and sequential alike.
        Rows of stages the branch does not own - a parent's abandoned
        attempt from the fork on, a sibling's anything - never appear."""
        args: dict[str, Any] = {"run": run_id, "branch": branch_id}
        if stage is not None and self._is_root_branch(run_id, branch_id):
            # Fast path (every stage read of a run that was never forked):
            # a root branch owns every stage of its pipeline, so the lineage
            # CTE reduces to "this branch, if the stage is in the pipeline" -
            # same rows, same order, much cheaper than the recursive query
            # (which resume runs once per stage of every run).  Root-ness and
            # the pipeline's stages never change once written, so both are
            # remembered: the read is one indexed query.
            if stage not in self._pipeline_stages(run_id):
                return []
            sql = _ROOT_STAGE_ACCEPTED if accepted_only else _ROOT_STAGE
            return [_output_row(r) for r in self._rows(sql, (run_id, branch_id, stage))]
        sql = (
            LINEAGE_CTE
            + self._OUTPUT_COLUMNS
            + " FROM agent_outputs o JOIN lineage l ON o.branch_id = l.branch_id AND o.stage = l.stage"
            " WHERE o.run_id = :run"
        )
        if stage is not None:
            sql += " AND o.stage = :stage"
            args["stage"] = stage
        if accepted_only:
            sql += " AND o.status = 'accepted'"
        return [_output_row(r) for r in self._rows(sql + " ORDER BY l.idx, o.agent, o.attempt", args)]

    def _is_root_branch(self, run_id: str, branch_id: str) -> bool:
        key = (run_id, branch_id)
        root = self._roots.get(key)
        if root is None:
            rows = self._rows(
                "SELECT parent_branch_id IS NULL FROM branches WHERE branch_id = ? AND run_id = ?",
                (branch_id, run_id),
            )
            if not rows:
                return False  # not (yet) a branch: nothing to remember
            root = bool(rows[0][0])
            if len(self._roots) >= _CACHE_LIMIT:
                self._roots.clear()
            self._roots[key] = root
        return root

    def _pipeline_stages(self, run_id: str) -> frozenset[str]:
        """The stage names of ``run_id``'s stored pipeline (read by SQLite's
        JSON functions, as the lineage CTE reads them)."""
        stages = self._stages.get(run_id)
        if stages is None:
            rows = self._rows(
                "SELECT json_extract(j.value, '$.name') FROM runs r LEFT JOIN"
                " json_each(r.pipeline, '$.stages') j WHERE r.run_id = ?",
                (run_id,),
            )
            stages = frozenset(r[0] for r in rows if isinstance(r[0], str))
            if not rows:
                return stages  # no such run (yet): nothing to remember
            if len(self._stages) >= _CACHE_LIMIT:
                self._stages.clear()
            self._stages[run_id] = stages
        return stages

    def events(self, run_id: str, kind: str | None = None) -> list[EventRow]:
        sql = _EVENT_COLUMNS + " FROM events WHERE run_id = +?"
        args: tuple[Any, ...] = (run_id,)
        if kind is not None:
            sql += " AND kind = +?"
            args += (kind,)
        return [_event_row(r) for r in self._rows(sql + " ORDER BY id", args)]

    def event_counts(self, run_id: str, branch_id: str | None = None) -> tuple[dict[str, int], int]:
        """(events per kind, the last event's id) of a run, or of one of its
        branches: the bound :meth:`iter_events` reads up to, so the counts
        and the events read agree while the run goes on writing."""
        where, args = self._event_scope(run_id, branch_id)
        [(last,)] = self._rows(f"SELECT coalesce(max(id), 0) FROM events WHERE {where}", args)
        rows = self._rows(  # kinds in the order they first happened
            f"SELECT kind, count(*) FROM events WHERE {where} AND id <= +? GROUP BY kind ORDER BY min(id)", (*args, last)
        )
        return {str(k): int(n) for k, n in rows}, int(last)

    def iter_events(
        self,
        run_id: str,
        *,
        branch_id: str | None = None,
        kinds: Collection[str] = (),
        up_to: int | None = None,
        page: int = 1000,
    ) -> Iterator[EventRow]:
        """A run's events (of one branch, of some kinds, up to an id) in id
        order, read ``page`` at a time: a run's whole log as a list took
        about 5 KB per event (a run of a million events, gigabytes).  Each
        page is its own read; nothing is held between them."""
        if isinstance(page, bool) or not isinstance(page, int) or page < 1:
            raise ValueError(f"page must be a whole number >= 1, got {page!r}")
        if isinstance(kinds, (str, bytes)):
            # Read as its letters: kinds="metrics" found no event at all.
            raise TypeError(f"kinds must be a collection of event kinds, got the string {kinds!r}; "
                            f"for one kind, give ({kinds!r},)")
        where, args = self._event_scope(run_id, branch_id)
        if kinds:
            where += f" AND kind IN ({', '.join(['+?'] * len(kinds))})"
            args += tuple(kinds)
        if up_to is not None:
            where += " AND id <= +?"
            args += (up_to,)
        sql = _EVENT_COLUMNS + f" FROM events WHERE {where} AND id > +? ORDER BY id LIMIT +?"
        after = 0
        while True:
            rows = self._rows(sql, (*args, after, page))
            for row in rows:
                yield _event_row(row)
            if len(rows) < page:
                return
            after = rows[-1][0]

    @staticmethod
    def _event_scope(run_id: str, branch_id: str | None) -> tuple[str, tuple[Any, ...]]:
        # (`+?`: see "reads" in Store.)
        if branch_id is None:
            return "run_id = +?", (run_id,)
        return "run_id = +? AND branch_id = +?", (run_id, branch_id)

    def integrity_check(self) -> str:
        return "; ".join(str(r[0]) for r in self._rows("PRAGMA integrity_check"))

    def foreign_key_violations(self) -> int:
        return len(self._rows("PRAGMA foreign_key_check"))


_EVENT_COLUMNS = "SELECT id, run_id, branch_id, kind, stage, agent, attempt, detail, at"


def _event_row(r: Any) -> EventRow:
    return EventRow(
        id=r[0],
        run_id=r[1],
        branch_id=r[2],
        kind=r[3],
        stage=r[4],
        agent=r[5],
        attempt=r[6],
        detail=json.loads(r[7]),
        at=r[8],
    )


_CACHE_LIMIT = 4096

# (`+?`: see "reads" in Store.)
_ROOT_STAGE = (
    Store._OUTPUT_COLUMNS
    + " FROM agent_outputs o WHERE o.run_id = +? AND o.branch_id = +? AND o.stage = +?"
    " ORDER BY o.agent, o.attempt"
)
_ROOT_STAGE_ACCEPTED = (
    Store._OUTPUT_COLUMNS
    + " FROM agent_outputs o WHERE o.run_id = +? AND o.branch_id = +? AND o.stage = +?"
    " AND o.status = 'accepted' ORDER BY o.agent, o.attempt"
)


def _branch_row(r: Sequence[Any]) -> BranchRow:
    return BranchRow(
        branch_id=r[0],
        run_id=r[1],
        parent_branch_id=r[2],
        fork_stage=r[3],
        created_at=r[4],
        options=json.loads(r[5] or "{}"),
        status=r[6],
        halt_reason=r[7],
        digest=r[8],
    )


def _decision_row(r: Sequence[Any]) -> DecisionRow:
    return DecisionRow(
        run_id=r[0],
        branch_id=r[1],
        stage=r[2],
        seq=r[3],
        status=r[4],
        verdict=json.loads(r[5]),
        decided_at=r[6],
    )


def _output_row(r: Sequence[Any]) -> OutputRow:
    return OutputRow(
        run_id=r[0],
        branch_id=r[1],
        stage=r[2],
        agent=r[3],
        attempt=r[4],
        status=r[5],
        content=r[6],
        format=r[7],
        usage=_usage_from(r[8:13], r[19:21]),
        model=r[13],
        provider=r[14],
        error=r[15],
        created_at=r[16],
        started_at=r[17],
        finished_at=r[18],
        id=r[21],
    )


def _run_row(r: Sequence[Any]) -> RunRow:
    return RunRow(
        run_id=r[0],
        spec_id=r[1],
        goal=r[2],
        seed=r[3],
        pipeline=json.loads(r[4]),
        status=r[5],
        halt_reason=r[6],
        current_branch_id=r[7],
        usage=TokenUsage(
            input_tokens=r[8],
            cached_input_tokens=r[9],
            output_tokens=r[10],
            reasoning_output_tokens=r[11],
            total_tokens=r[12],
            cache_write_input_tokens=r[16],
            cache_write_1h_input_tokens=r[17],
        ),
        digest=r[13],
        created_at=r[14],
        updated_at=r[15],
    )


def _is_unique(exc: apsw.ConstraintError) -> bool:
    return "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc)
