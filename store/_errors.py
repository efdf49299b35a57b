"""Errors raised by the store."""

from __future__ import annotations

from messages import ConclaveError


class StoreError(ConclaveError):
    """The database cannot be used as asked.  The message names the file and
    the problem and says what to do; the file was not modified."""


class StoreFull(StoreError):
    """The disk holding the database (or the database's own size limit) is
    full: nothing of the batch was written, and what was written before
    stays.  Free space, then resume."""


class SchemaTooNew(StoreError):
    """The database was written by a newer Conclave."""


class NotADatabase(StoreError):
    """The file exists but is not an SQLite database."""


class EmptyDatabase(NotADatabase):
    """An SQLite database with nothing in it yet (an empty file, say): no
    Conclave runs to read."""
