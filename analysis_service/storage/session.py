"""Database access for the domain, with driver errors wrapped in the service's own root."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from sqlalchemy.ext.asyncio import AsyncConnection

from analysis_service.errors import StorageUnavailable
from mediatag_common.database import Database, DatabaseError, raising_as


def _unavailable(exc: DatabaseError) -> StorageUnavailable:
    return StorageUnavailable(f"analysis database unavailable: {exc}")


def reading(db: Database) -> AbstractAsyncContextManager[AsyncConnection]:
    """A connection for reads."""
    return raising_as(db.read(), _unavailable)


def writing(db: Database) -> AbstractAsyncContextManager[AsyncConnection]:
    """A serialised write transaction that commits on exit."""
    return raising_as(db.write(), _unavailable)


def consistent_read(db: Database) -> AbstractAsyncContextManager[AsyncConnection]:
    """Several reads with no commit in between."""
    return raising_as(db.snapshot(), _unavailable)
