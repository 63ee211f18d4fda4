"""Named random keys kept in a service's own database (table ``secrets``).

Made once per database, on first use, so every replica of a service on one database shares
them (a page token signed by one replica verifies on another) and they survive restarts.
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from sqlalchemy.engine import Connection

KEY_BYTES = 32
# The key both services sign their AIP-158 page tokens with.
PAGE_TOKEN_KEY = "page-tokens"

# The table (both services have one), for what handles every table of a database: the copy
# to another database.
SECRETS = sa.Table(
    "secrets",
    sa.MetaData(),
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
)


def load_or_create_key(conn: Connection, name: str) -> bytes:
    """The key called ``name``, made now if the database has none (call in a write
    transaction; when replicas race, every one gets the key that was stored first)."""
    conn.execute(
        sa.text(
            "INSERT INTO secrets (name, value) VALUES (:name, :value) ON CONFLICT (name) DO NOTHING"
        ),
        {"name": name, "value": secrets.token_bytes(KEY_BYTES)},
    )
    value = conn.execute(
        sa.text("SELECT value FROM secrets WHERE name = :name"), {"name": name}
    ).scalar_one()
    return bytes(value)
