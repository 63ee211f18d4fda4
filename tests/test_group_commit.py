"""Group commit on a real SQLite database: shared transactions, per-request answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa

from mediatag_common.database import Database, DatabaseError, sqlite_url
from mediatag_common.group_commit import GroupCommit

_rows = sa.Table("rows", sa.MetaData(), sa.Column("value", sa.Integer, primary_key=True))


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(sqlite_url(str(tmp_path / "group.db")), synchronous="NORMAL")
    await database.write(_rows.metadata.create_all)
    yield database
    await database.close()


async def stored(db: Database) -> list[int]:
    return await db.read(lambda conn: sorted(conn.execute(sa.select(_rows.c.value)).scalars()))


def inserting(db: Database, groups: list[int] | None = None) -> GroupCommit[int, int]:
    """Commits that insert their values and answer each with its value doubled."""

    async def insert(values: Sequence[int]) -> list[int]:
        if groups is not None:
            groups.append(len(values))
        await db.write(lambda conn: conn.execute(_rows.insert(), [{"value": v} for v in values]))
        return [2 * value for value in values]

    return GroupCommit(insert)


async def test_concurrent_commits_share_transactions_and_each_waits_for_its_own(
    db: Database,
) -> None:
    groups: list[int] = []
    commits = inserting(db, groups)
    answers = await asyncio.gather(*(commits.commit(value) for value in range(100)))

    assert answers == [2 * value for value in range(100)]
    assert await stored(db) == list(range(100))
    assert sum(groups) == 100
    # The first commit starts alone; the rest queue behind it and share later transactions.
    assert len(groups) < 100


async def test_a_failed_transaction_fails_its_group_and_later_commits_work(db: Database) -> None:
    commits = inserting(db)
    await commits.commit(1)
    # Queued together, 5 and a duplicate 1 share a transaction: both fail, neither lands.
    results = await asyncio.gather(commits.commit(5), commits.commit(1), return_exceptions=True)
    assert all(isinstance(result, DatabaseError) for result in results), results
    assert await stored(db) == [1]
    await commits.commit(2)
    assert await stored(db) == [1, 2]
