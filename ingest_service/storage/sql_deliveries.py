"""The webhook dispatcher's store on SQL: each call one transaction of
:mod:`ingest_service.storage.webhook_deliveries` functions."""

from __future__ import annotations

from collections.abc import Collection
from functools import partial

from ingest_service.domain.webhook_backlog import DeliveryListing
from ingest_service.domain.webhooks import Claim, Delivery, Retry
from ingest_service.storage.sql_store import SqlTransactions
from ingest_service.storage.webhook_deliveries import (
    DeliveryCounts,
    abandon,
    claim,
    counts,
    delivered,
    failed,
    listed,
    owners_of,
    release,
    revive,
)


class SqlDeliveryStore(SqlTransactions):
    """The dispatcher's :class:`~ingest_service.domain.webhooks.DeliveryStore` and the
    backlog's :class:`~ingest_service.domain.webhook_backlog.DeliveryLog` on the ingest
    database."""

    async def claim(
        self, endpoint: str, limit: int, *, concurrency: int, lease: float, claimer: str
    ) -> Claim:
        return await self._write(
            partial(
                claim,
                endpoint=endpoint,
                limit=limit,
                concurrency=concurrency,
                lease=lease,
                claimer=claimer,
            )
        )

    async def delivered(self, delivery_id: int, claimer: str) -> None:
        await self._write(partial(delivered, delivery_id=delivery_id, claimer=claimer))

    async def release(self, delivery_ids: Collection[int], claimer: str) -> None:
        await self._write(partial(release, delivery_ids=delivery_ids, claimer=claimer))

    async def failed(self, delivery_id: int, claimer: str, *, error: str, retry: Retry) -> bool:
        return await self._write(
            partial(failed, delivery_id=delivery_id, claimer=claimer, error=error, retry=retry)
        )

    async def abandon(self, named: Collection[str], *, error: str) -> int:
        return await self._write(partial(abandon, named=named, error=error))

    async def revive(
        self,
        delivery_ids: Collection[int] | None,
        *,
        endpoints: Collection[str],
        owners: Collection[str] | None,
    ) -> int:
        return await self._write(
            partial(revive, delivery_ids=delivery_ids, endpoints=endpoints, owners=owners)
        )

    async def listed(self, listing: DeliveryListing, *, limit: int) -> list[Delivery]:
        return await self._read(partial(listed, listing=listing, limit=limit))

    async def owners_of(self, delivery_ids: Collection[int]) -> dict[int, str]:
        return await self._read(partial(owners_of, delivery_ids=delivery_ids))

    async def counts(self) -> dict[str, DeliveryCounts]:
        """Per endpoint, its deliveries waiting and dead (for the metrics)."""
        return await self._read(counts)
