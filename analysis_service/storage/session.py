"""Database access for the domain, with driver errors wrapped in the service's own root."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncConnection

from analysis_service.errors import StorageUnavailable
from mediatag_common.database import Database, DatabaseError


@asynccontextmanager
async def _wrapped(
    context: AbstractAsyncContextManager[AsyncConnection],
) -> AsyncIterator[AsyncConnection]:
    try:
        async with context as conn:
            yield conn
    except DatabaseError as exc:
        raise StorageUnavailable(f"analysis database unavailable: {exc}") from exc


def reading(db: Database) -> AbstractAsyncContextManager[AsyncConnection]:
    """A connection for reads."""
    return _wrapped(db.read())


def writing(db: Database) -> AbstractAsyncContextManager[AsyncConnection]:
    """A serialised write transaction that commits on exit."""
    return _wrapped(db.write())


def consistent_read(db: Database) -> AbstractAsyncContextManager[AsyncConnection]:
    """Several reads with no commit in between."""
    return _wrapped(db.snapshot())
