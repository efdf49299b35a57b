"""Conclave's persistence: SQLite through apsw.

Synchronous and free of trio: the store-writer actor (in ``actors``) owns
the write connection and drives :meth:`Store.apply` in group commits.
"""

from ._busy import StoreBusy, retry_busy
from ._db import BUSY_TIMEOUT_MS, Durability
from ._errors import EmptyDatabase, NotADatabase, SchemaTooNew, StoreError, StoreFull
from ._preflight import RunPreview, UnknownRun, preview_lineage, preview_run
from ._runlock import LockFileError, RunLocked
from ._schema import SCHEMA_VERSION
from ._store import (
    BranchRow,
    DecisionRow,
    EventRow,
    OutputRow,
    CommitHook,
    RetryableStoreError,
    RunRow,
    Store,
    branch_named,
    wall_clock_ms,
)

__all__ = [
    "BUSY_TIMEOUT_MS",
    "CommitHook",
    "RunPreview",
    "StoreBusy",
    "UnknownRun",
    "preview_lineage",
    "preview_run",
    "retry_busy",
    "SCHEMA_VERSION",
    "BranchRow",
    "DecisionRow",
    "Durability",
    "EventRow",
    "EmptyDatabase",
    "NotADatabase",
    "OutputRow",
    "RetryableStoreError",
    "LockFileError",
    "RunLocked",
    "RunRow",
    "SchemaTooNew",
    "Store",
    "StoreError",
    "StoreFull",
    "branch_named",
    "wall_clock_ms",
]
