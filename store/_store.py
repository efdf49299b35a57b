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
from collections.abc import Callable, Sequence
from typing import Any

import apsw
import attrs

from messages import (
    PersistDecision,
    PersistEvent,
    PersistOutput,
    PersistRun,
    RunUpdate,
    StoreAck,
    StoreWrite,
    TokenUsage,
)

from ._db import BUSY_TIMEOUT_MS, Durability, open_connection


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch: the one timestamp unit we store.
    Timestamps are data, never inputs to logic or digests."""
    return time.time_ns() // 1_000_000


class RetryableStoreError(Exception):
    """SQLite was busy or locked; the whole batch may be tried again."""




@attrs.frozen(kw_only=True, slots=True)
class RunRow:
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
    branch_id: str
    run_id: str
    parent_branch_id: str | None
    fork_stage: str | None
    created_at: int


@attrs.frozen(kw_only=True, slots=True)
class DecisionRow:
    run_id: str
    branch_id: str
    stage: str
    seq: int
    status: str
    verdict: dict[str, Any] = attrs.field(eq=False)
    decided_at: int


@attrs.frozen(kw_only=True, slots=True)
class OutputRow:
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


@attrs.frozen(kw_only=True, slots=True)
class EventRow:
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


def _usage_from(row: Sequence[Any]) -> TokenUsage | None:
    if row[0] is None:
        return None
    return TokenUsage(
        input_tokens=row[0],
        cached_input_tokens=row[1],
        output_tokens=row[2],
        reasoning_output_tokens=row[3],
        total_tokens=row[4],
    )


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class Store:
    """One SQLite database.  Not thread-safe; not a checkpoint anywhere."""

    def __init__(
        self, conn: apsw.Connection, path: str, *, clock: Callable[[], int] = wall_clock_ms
    ) -> None:
        self._conn = conn
        self.path = path
        self._clock = clock

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
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes -----------------------------------------------------------

    def apply(self, batch: Sequence[StoreWrite]) -> list[StoreAck]:
        """Apply ``batch`` in one transaction and return one ack per item.

        Raises :class:`RetryableStoreError` (nothing applied) when SQLite is
        busy or locked; other SQLite errors fail only their own item.
        """
        now = self._clock()
        acks: list[StoreAck] = []
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except (apsw.BusyError, apsw.LockedError) as exc:
            raise RetryableStoreError(str(exc)) from exc
        try:
            for item in batch:
                try:
                    with conn:  # a savepoint per item
                        ack = self._apply_one(item, now)
                except apsw.ConstraintError as exc:
                    acks.append(StoreAck(ok=False, duplicate=_is_unique(exc), error=str(exc)))
                except (apsw.BusyError, apsw.LockedError):
                    raise
                except apsw.Error as exc:
                    acks.append(StoreAck(ok=False, error=f"{type(exc).__name__}: {exc}"))
                else:
                    acks.append(ack or StoreAck(ok=True))
            conn.execute("COMMIT")
        except (apsw.BusyError, apsw.LockedError) as exc:
            self._rollback()
            raise RetryableStoreError(str(exc)) from exc
        except BaseException:
            self._rollback()
            raise
        return acks

    def _rollback(self) -> None:
        if not self._conn.getautocommit():
            self._conn.execute("ROLLBACK")

    def _apply_one(self, item: StoreWrite, now: int) -> StoreAck | None:
        conn = self._conn
        if isinstance(item, PersistOutput):
            out = item.output
            conn.execute(
                "INSERT INTO agent_outputs (run_id, branch_id, stage, agent, attempt, status,"
                " content, format, input_tokens, cached_input_tokens, output_tokens,"
                " reasoning_output_tokens, total_tokens, usage_known, model, provider, error,"
                " created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
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
                ),
            )
        elif isinstance(item, PersistDecision):
            d = item.decision
            try:
                conn.execute(
                    "INSERT INTO decisions (run_id, branch_id, stage, seq, status, verdict,"
                    " decided_at) VALUES (?,?,?,?,?,?,?)",
                    (d.key.run_id, d.key.branch_id, d.key.stage, d.seq, d.status, _json(d.verdict), now),
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
            conn.execute(
                "INSERT INTO events (run_id, branch_id, kind, stage, agent, attempt, detail, at)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (
                    item.run_id,
                    item.branch_id,
                    item.kind,
                    item.stage,
                    item.agent,
                    item.attempt,
                    _json(dict(item.detail)),
                    now,
                ),
            )
        elif isinstance(item, RunUpdate):
            usage = _usage_columns(item.usage) if item.usage is not None else None
            if usage is None:
                conn.execute(
                    "UPDATE runs SET status = ?, halt_reason = ?, digest = COALESCE(?, digest),"
                    " updated_at = ? WHERE run_id = ?",
                    (item.status, item.halt_reason, item.digest, now, item.run_id),
                )
            else:
                conn.execute(
                    "UPDATE runs SET status = ?, halt_reason = ?, digest = COALESCE(?, digest),"
                    " input_tokens = ?, cached_input_tokens = ?, output_tokens = ?,"
                    " reasoning_output_tokens = ?, total_tokens = ?, updated_at = ?"
                    " WHERE run_id = ?",
                    (item.status, item.halt_reason, item.digest, *usage, now, item.run_id),
                )
            if conn.changes() != 1:
                raise apsw.ConstraintError(f"no run {item.run_id!r} to update")
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
                " created_at) VALUES (?,?,NULL,NULL,?)",
                (item.branch_id, item.run_id, now),
            )
        else:  # pragma: no cover - the type says this cannot happen
            raise TypeError(f"not a store write: {item!r}")
        return None

    # -- reads --------------------------------------------------------------

    def get_run(self, run_id: str) -> RunRow | None:
        row: Any = self._conn.execute(
            "SELECT run_id, spec_id, goal, seed, pipeline, status, halt_reason,"
            " current_branch_id, input_tokens, cached_input_tokens, output_tokens,"
            " reasoning_output_tokens, total_tokens, digest, created_at, updated_at"
            " FROM runs WHERE run_id = ?",
            (run_id,),
        ).fetchone()
        return None if row is None else _run_row(row)

    def list_runs(self, limit: int = 20) -> list[RunRow]:
        rows: list[Any] = self._conn.execute(
            "SELECT run_id, spec_id, goal, seed, pipeline, status, halt_reason,"
            " current_branch_id, input_tokens, cached_input_tokens, output_tokens,"
            " reasoning_output_tokens, total_tokens, digest, created_at, updated_at"
            " FROM runs ORDER BY created_at DESC, run_id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [_run_row(r) for r in rows]

    def branches(self, run_id: str) -> list[BranchRow]:
        rows: list[Any] = self._conn.execute(
            "SELECT branch_id, run_id, parent_branch_id, fork_stage, created_at"
            " FROM branches WHERE run_id = ? ORDER BY created_at, branch_id",
            (run_id,),
        ).fetchall()
        return [
            BranchRow(
                branch_id=r[0], run_id=r[1], parent_branch_id=r[2], fork_stage=r[3], created_at=r[4]
            )
            for r in rows
        ]

    def decisions(self, run_id: str, branch_id: str | None = None) -> list[DecisionRow]:
        sql = (
            "SELECT run_id, branch_id, stage, seq, status, verdict, decided_at"
            " FROM decisions WHERE run_id = ?"
        )
        args: tuple[Any, ...] = (run_id,)
        if branch_id is not None:
            sql += " AND branch_id = ?"
            args += (branch_id,)
        rows: list[Any] = self._conn.execute(sql + " ORDER BY seq", args).fetchall()
        return [
            DecisionRow(
                run_id=r[0],
                branch_id=r[1],
                stage=r[2],
                seq=r[3],
                status=r[4],
                verdict=json.loads(r[5]),
                decided_at=r[6],
            )
            for r in rows
        ]

    def outputs(
        self,
        run_id: str,
        branch_id: str | None = None,
        stage: str | None = None,
        *,
        accepted_only: bool = False,
    ) -> list[OutputRow]:
        sql = (
            "SELECT run_id, branch_id, stage, agent, attempt, status, content, format,"
            " input_tokens, cached_input_tokens, output_tokens, reasoning_output_tokens,"
            " total_tokens, model, provider, error, created_at FROM agent_outputs WHERE run_id = ?"
        )
        args: tuple[Any, ...] = (run_id,)
        if branch_id is not None:
            sql += " AND branch_id = ?"
            args += (branch_id,)
        if stage is not None:
            sql += " AND stage = ?"
            args += (stage,)
        if accepted_only:
            sql += " AND status = 'accepted'"
        rows: list[Any] = self._conn.execute(sql + " ORDER BY stage, agent, attempt", args).fetchall()
        return [
            OutputRow(
                run_id=r[0],
                branch_id=r[1],
                stage=r[2],
                agent=r[3],
                attempt=r[4],
                status=r[5],
                content=r[6],
                format=r[7],
                usage=_usage_from(r[8:13]),
                model=r[13],
                provider=r[14],
                error=r[15],
                created_at=r[16],
            )
            for r in rows
        ]

    def events(self, run_id: str) -> list[EventRow]:
        rows: list[Any] = self._conn.execute(
            "SELECT id, run_id, branch_id, kind, stage, agent, attempt, detail, at"
            " FROM events WHERE run_id = ? ORDER BY id",
            (run_id,),
        ).fetchall()
        return [
            EventRow(
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
            for r in rows
        ]

    def integrity_check(self) -> str:
        rows: list[Any] = self._conn.execute("PRAGMA integrity_check").fetchall()
        return "; ".join(str(r[0]) for r in rows)

    def foreign_key_violations(self) -> int:
        return len(self._conn.execute("PRAGMA foreign_key_check").fetchall())


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
        ),
        digest=r[13],
        created_at=r[14],
        updated_at=r[15],
    )


def _is_unique(exc: apsw.ConstraintError) -> bool:
    return "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc)
