"""Busy/locked handling for the synchronous paths (open, migrate, reads).

SQLite's own busy handler waits up to ``busy_timeout`` first; when that is
not enough, these paths back off and try again (the reference mapped busy
errors to permanent ones by mistake).  Anything other than busy/locked is
raised at once.  The store writer's batches do the same on trio's clock
instead (``actors._store_writer``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import apsw

from ._errors import StoreError

T = TypeVar("T")

BUSY_ERRORS = (apsw.BusyError, apsw.LockedError)


class StoreBusy(StoreError):
    """The database stayed busy or locked through every retry."""


def retry_busy(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 40,
    initial: float = 0.005,
    cap: float = 0.25,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn``; on busy/locked, back off exponentially and retry."""
    delay = initial
    for attempt in range(attempts):
        try:
            return fn()
        except BUSY_ERRORS as exc:
            if attempt == attempts - 1:
                raise StoreBusy(f"{what}: database stayed busy through {attempts} attempts ({exc})") from exc
        sleep(delay)
        delay = min(delay * 2, cap)
    raise AssertionError("unreachable")  # pragma: no cover
