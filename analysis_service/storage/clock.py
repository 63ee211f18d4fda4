"""The database's clock as SQL: what times shared by replicas are measured with, so that the
replicas' own clocks never enter into them."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

from mediatag_common.database import POSTGRESQL

# Now, in epoch seconds, on PostgreSQL's clock, as SQL text (for statements written as text).
# ``clock_timestamp()``: the moment it is evaluated, not the transaction's start.
POSTGRESQL_NOW = "CAST(extract(epoch FROM clock_timestamp()) AS float8)"


def database_now(dialect: str) -> ColumnElement[Any]:
    """Now, in epoch seconds, as the database tells it (on PostgreSQL: :data:`POSTGRESQL_NOW`)."""
    if dialect == POSTGRESQL:
        return sa.literal_column(POSTGRESQL_NOW, sa.Float)
    # SQLite (one process): julianday's days since -4713, to the millisecond.
    return (sa.func.julianday("now") - 2440587.5) * 86400.0
