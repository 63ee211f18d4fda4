"""Statements on the result cache: results by key, and the claims that make identical
content analysed once across replicas."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from analysis_service.domain.models import JobResult
from analysis_service.storage.events import result_from_row
from analysis_service.storage.schema import result_claims, results
from mediatag_common.database import insert
from mediatag_common.embeddings import embedding_to_bytes


def get_result(conn: Connection, key: str) -> JobResult | None:
    row = conn.execute(sa.select(results).where(results.c.key == key)).first()
    return result_from_row(row, reused=True, with_embedding=True) if row else None


def store_result(conn: Connection, key: str, sha256: str, result: JobResult, now: float) -> None:
    """Insert a result unless the key is already cached (results are deterministic by key)."""
    if result.embedding is None:
        raise ValueError("a stored result needs its embedding")
    conn.execute(
        insert(conn, results)
        .values(
            key=key,
            sha256=sha256,
            analyzer_name=result.analyzer_name,
            analyzer_version=result.analyzer_version,
            tags=list(result.tags),
            embedding=embedding_to_bytes(result.embedding),
            embedding_dimensions=result.embedding_dimensions,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=[results.c.key])
    )


def take_result_claim(
    conn: Connection, key: str, holder: str, *, now: float, lease_seconds: float
) -> bool:
    """Claim the analysis of ``key`` unless another holder's claim is still live or the
    result is already stored."""
    statement = insert(conn, result_claims).values(
        key=key, holder=holder, expires_at=now + lease_seconds
    )
    statement = statement.on_conflict_do_update(
        index_elements=[result_claims.c.key],
        set_={"holder": holder, "expires_at": now + lease_seconds},
        where=sa.or_(result_claims.c.expires_at < now, result_claims.c.holder == holder),
    ).returning(result_claims.c.holder)
    if conn.execute(statement).first() is None:
        return False
    # Checked after the claim, not before: a holder storing its result drops its claim in
    # the same transaction, and the insert above waits for that transaction, so from here
    # (a new statement, read committed) its result is visible.
    if conn.execute(sa.select(results.c.key).where(results.c.key == key)).first() is None:
        return True
    drop_result_claim(conn, key, holder)
    return False


def drop_result_claim(conn: Connection, key: str, holder: str) -> None:
    conn.execute(
        sa.delete(result_claims).where(result_claims.c.key == key, result_claims.c.holder == holder)
    )
