"""Statements on the result cache: results by key, and the claims that make identical
content analysed once across replicas."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from analysis_service.domain.models import JobResult
from analysis_service.domain.store import AttemptEnd
from analysis_service.storage import clock
from analysis_service.storage.clock import POSTGRESQL_NOW
from analysis_service.storage.events import result_from_row
from analysis_service.storage.schema import result_claims, results
from mediatag_common.database import (
    POSTGRESQL,
    array_parameters,
    database_now,
    insert,
    unnest_parameters,
)
from mediatag_common.embeddings import embedding_to_bytes

_GET_RESULTS = sa.select(results).where(
    results.c.key.in_(sa.bindparam("result_keys", expanding=True))
)


def get_results(conn: Connection, keys: Sequence[str]) -> list[JobResult | None]:
    """The result stored under each of ``keys`` (None where there is none), in one query."""
    rows = {row.key: row for row in conn.execute(_GET_RESULTS, {"result_keys": list(keys)})}
    return [
        result_from_row(rows[key], reused=True, with_embedding=True) if key in rows else None
        for key in keys
    ]


def _result_row(key: str, sha256: str, result: JobResult) -> dict[str, Any]:
    """The columns of a stored result but its time."""
    if result.embedding is None:
        raise ValueError("a stored result needs its embedding")
    return {
        "key": key,
        "sha256": sha256,
        "analyzer_name": result.analyzer_name,
        "analyzer_version": result.analyzer_version,
        "tags": list(result.tags),
        "embedding": embedding_to_bytes(result.embedding),
        "embedding_dimensions": result.embedding_dimensions,
    }


def store_result(conn: Connection, key: str, sha256: str, result: JobResult, now: float) -> None:
    """Insert a result unless the key is already cached (results are deterministic by key)."""
    _store_rows(conn, [_result_row(key, sha256, result)], now)


def _store_rows(conn: Connection, rows: Sequence[dict[str, Any]], now: float) -> None:
    conn.execute(
        insert(conn, results).on_conflict_do_nothing(index_elements=[results.c.key]),
        [{**row, "created_at": now} for row in rows],
    )


# PostgreSQL: a stored result's claim is not deleted but settled: held by no one for this
# long. A claim statement that began before the result's commit does not see the result; it
# meets the settled claim (live, another holder's) and is refused, and its holder finds the
# result when it looks again. A deleted claim would let it claim the key and analyse it a
# second time. Settled claims, like abandoned ones, are dropped once expired (compaction).
SETTLED_CLAIM_SECONDS = 60.0
_SETTLE = f"holder = '', expires_at = {POSTGRESQL_NOW} + {SETTLED_CLAIM_SECONDS}"

# PostgreSQL: a group's new results, and the end of their claims, in one statement (one
# round trip) of the transaction that ends the group's attempts.
_STORED_COLUMNS = (
    ("key", "text"),
    ("sha256", "text"),
    ("analyzer_name", "text"),
    ("analyzer_version", "text"),
    ("tags", "text"),
    ("embedding", "bytea"),
    ("embedding_dimensions", "integer"),
    ("holder", "text"),
)
_PG_STORE_NEW = sa.text(
    f"""
    WITH stored AS MATERIALIZED (
        SELECT * FROM {unnest_parameters(_STORED_COLUMNS, "stored")}
    ),
    settled AS (
        UPDATE result_claims
        SET {_SETTLE}
        FROM stored
        WHERE result_claims.key = stored.key AND result_claims.holder = stored.holder
    )
    INSERT INTO results (key, sha256, analyzer_name, analyzer_version, tags, embedding,
        embedding_dimensions, created_at)
    SELECT key, sha256, analyzer_name, analyzer_version, CAST(tags AS json), embedding,
        embedding_dimensions, {POSTGRESQL_NOW}
    FROM stored
    ON CONFLICT (key) DO NOTHING
    """
)


def store_new_results(conn: Connection, ends: Sequence[AttemptEnd]) -> None:
    """Keep the new results of ``ends`` (written or fenced out) and end their claims (settled
    on PostgreSQL, deleted on SQLite, where one writer leaves no statement in between)."""
    rows: list[dict[str, Any]] = []
    holders: list[str | None] = []
    for end in ends:
        if end.new_result is None:
            continue
        if end.result is None or end.result_key is None:
            raise ValueError("a new result needs its result and key")
        rows.append(_result_row(end.result_key, end.new_result.sha256, end.result))
        holders.append(end.new_result.holder)
    if not rows:
        return
    if conn.dialect.name == POSTGRESQL:
        values = [
            {**row, "tags": json.dumps(row["tags"]), "holder": holder}
            for row, holder in zip(rows, holders, strict=True)
        ]
        conn.execute(_PG_STORE_NEW, array_parameters(_STORED_COLUMNS, values))
        return
    _store_rows(conn, rows, database_now(conn))
    claims = [
        {"claim_key": row["key"], "claim_holder": holder}
        for row, holder in zip(rows, holders, strict=True)
        if holder is not None
    ]
    if claims:
        conn.execute(_DROP_CLAIM, claims)


def take_result_claims(
    conn: Connection, keys: Sequence[str], holder: str, *, lease_seconds: float
) -> list[JobResult | bool]:
    """For each of ``keys`` (distinct): the result stored under it; else claim its analysis
    for ``holder`` (True) unless another holder's claim is still live (False). In the
    caller's transaction; times on the database's clock."""
    taken: list[JobResult | bool] = []
    now = clock.database_now(conn.dialect.name)
    for key, stored in zip(keys, get_results(conn, keys), strict=True):
        if stored is not None:
            taken.append(stored)
            continue
        statement = insert(conn, result_claims).values(
            key=key, holder=holder, expires_at=now + lease_seconds
        )
        statement = statement.on_conflict_do_update(
            index_elements=[result_claims.c.key],
            set_={"holder": holder, "expires_at": now + lease_seconds},
            where=sa.or_(result_claims.c.expires_at < now, result_claims.c.holder == holder),
        ).returning(result_claims.c.holder)
        taken.append(conn.execute(statement).first() is not None)
    return taken


# PostgreSQL: for each key asked, the stored result, else the claim of its analysis (taken
# unless another holder's claim is live), in one statement of fixed text: one round trip,
# committed by itself. A result committed while it runs leaves a settled claim, which refuses
# it (see SETTLED_CLAIM_SECONDS). The claims are taken in key order, so that two replicas'
# statements never wait for each other's rows crosswise.
_PG_TAKE_CLAIMS = sa.text(
    f"""
    WITH asked AS MATERIALIZED (
        SELECT * FROM {unnest_parameters((("key", "text"),), "asked")}
    ),
    found AS MATERIALIZED (
        SELECT results.* FROM results JOIN asked USING (key)
    ),
    claimed AS (
        INSERT INTO result_claims (key, holder, expires_at)
        SELECT asked.key, :holder, {POSTGRESQL_NOW} + :lease_seconds
        FROM asked
        WHERE NOT EXISTS (SELECT FROM found WHERE found.key = asked.key)
        ORDER BY asked.key
        ON CONFLICT (key) DO UPDATE
        SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
        WHERE result_claims.expires_at < {POSTGRESQL_NOW}
            OR result_claims.holder = EXCLUDED.holder
        RETURNING key
    )
    SELECT found.*, claimed.key IS NOT NULL AS claimed
    FROM asked
    LEFT JOIN found ON found.key = asked.key
    LEFT JOIN claimed ON claimed.key = asked.key
    ORDER BY asked.position
    """
).columns(*results.c, sa.column("claimed", sa.Boolean))


def take_result_claims_committed(
    conn: Connection, keys: Sequence[str], holder: str, *, lease_seconds: float
) -> list[JobResult | bool]:
    """:func:`take_result_claims` on PostgreSQL in one statement committed by itself."""
    rows = conn.execute(
        _PG_TAKE_CLAIMS,
        {"key": list(keys), "holder": holder, "lease_seconds": float(lease_seconds)},
    ).all()
    return [
        result_from_row(row, reused=True, with_embedding=True) or False
        if row.key is not None
        else bool(row.claimed)
        for row in rows
    ]


_DROP_CLAIM = sa.delete(result_claims).where(
    result_claims.c.key == sa.bindparam("claim_key"),
    result_claims.c.holder == sa.bindparam("claim_holder"),
)


def drop_result_claim(conn: Connection, key: str, holder: str) -> None:
    """End ``holder``'s claim on ``key`` with no result stored (its analysis failed)."""
    conn.execute(_DROP_CLAIM, {"claim_key": key, "claim_holder": holder})


_SETTLE_CLAIM = sa.text(
    f"""
    UPDATE result_claims
    SET {_SETTLE}
    WHERE key = :claim_key AND holder = :claim_holder
    """
)


def end_result_claim(conn: Connection, key: str, holder: str) -> None:
    """End ``holder``'s claim on ``key`` whose result this transaction stores (settled on
    PostgreSQL: see SETTLED_CLAIM_SECONDS)."""
    parameters = {"claim_key": key, "claim_holder": holder}
    conn.execute(_SETTLE_CLAIM if conn.dialect.name == POSTGRESQL else _DROP_CLAIM, parameters)


def drop_expired_claims(conn: Connection, now: float) -> None:
    """Drop the claims expired at ``now``: settled ones, and those of holders that stopped
    without ending them (taking one over needs no row)."""
    conn.execute(sa.delete(result_claims).where(result_claims.c.expires_at < now))
