"""Running the store's transactions, with database errors turned into the service's own.

Each transaction is a plain function of a synchronous connection, run whole on a database
thread (see :mod:`mediatag_common.database`). An outage is ``StorageUnavailable``; a
transaction that lost to a concurrent one (a deadlock or serialization failure on
PostgreSQL) is run again a few times, then ``StorageConflict``, as is a constraint's refusal;
anything else is a bug and propagates as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.engine import Connection

from analysis_service.errors import StorageConflict, StorageUnavailable
from mediatag_common.database import Database, DatabaseConflict, DatabaseUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

CONFLICT_RETRIES = 3


async def _run(call: Callable[[], Awaitable[T]]) -> T:
    for attempt in range(1, CONFLICT_RETRIES + 1):
        try:
            return await call()
        except DatabaseUnavailable as exc:
            # The driver's text (SQL, paths) goes to the log with the cause, not to clients.
            raise StorageUnavailable("the analysis database is unavailable") from exc
        except DatabaseConflict as exc:
            if not exc.retryable or attempt == CONFLICT_RETRIES:
                raise StorageConflict("concurrent changes got in the way; try again") from exc
            logger.info("transaction lost to a concurrent one (%s); running it again", exc)
    raise AssertionError("unreachable")


async def read(db: Database, query: Callable[[Connection], T]) -> T:
    """The result of ``query`` on a read connection."""
    return await _run(lambda: db.read(query))


async def write(db: Database, transaction: Callable[[Connection], T]) -> T:
    """The result of ``transaction``, committed."""
    return await _run(lambda: db.write(transaction))


async def statement(db: Database, statement: Callable[[Connection], T]) -> T:
    """The result of ``statement``, one statement committed by itself (PostgreSQL)."""
    return await _run(lambda: db.autocommit(statement))


async def consistent_read(db: Database, query: Callable[[Connection], T]) -> T:
    """The result of several reads with no commit in between."""
    return await _run(lambda: db.snapshot(query))
