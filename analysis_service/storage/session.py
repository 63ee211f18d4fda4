"""Database access for the domain, with driver errors wrapped in the service's own root.

The domain writes each transaction as a plain function of a synchronous connection; it runs
whole on a database thread (see :mod:`mediatag_common.database`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.engine import Connection

from analysis_service.errors import StorageUnavailable
from mediatag_common.database import Database, DatabaseError

T = TypeVar("T")


async def _unavailable_as_storage_error(call: Awaitable[T]) -> T:
    try:
        return await call
    except DatabaseError as exc:
        # The driver's text (SQL, paths) goes to the log with the cause, not to clients.
        raise StorageUnavailable("the analysis database is unavailable") from exc


async def read(db: Database, query: Callable[[Connection], T]) -> T:
    """The result of ``query`` on a read connection."""
    return await _unavailable_as_storage_error(db.read(query))


async def write(db: Database, transaction: Callable[[Connection], T]) -> T:
    """The result of ``transaction``, committed (one writer at a time, in order)."""
    return await _unavailable_as_storage_error(db.write(transaction))


async def consistent_read(db: Database, query: Callable[[Connection], T]) -> T:
    """The result of several reads with no commit in between."""
    return await _unavailable_as_storage_error(db.snapshot(query))
