"""Undelivered webhook deliveries as an operator sees them: listed, and the dead ones retried.

A delivery is listed from the moment it is enqueued until its endpoint accepts it: still
retried, or dead (out of retries, kept until retried by hand). Retrying a dead delivery gives
it a new retry period and wakes its endpoint's loop (:meth:`WebhookDispatcher.revive`).
Which owners a caller may see is the gRPC layer's to decide; it passes them in ``owners``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from ingest_service.config import UploadLimits
from ingest_service.domain.pages import Key, one_page
from ingest_service.domain.uploads import validate_owner_id
from ingest_service.domain.webhooks import Delivery, WebhookDispatcher
from ingest_service.errors import WebhookDeliveryNotFound, WebhookEndpointNotFound, invalid
from mediatag_common import paging
from mediatag_common.errors import FieldViolation

# Delivery ids one retry may name.
MAX_RETRY_IDS = 1000


@dataclass(frozen=True)
class DeliveryListing:
    """Which deliveries to list: ``dead`` True (dead), False (still retried) or None (both);
    ``endpoint`` empty means every endpoint, ``owners`` None every owner; below ``before_id``
    (paging: the listing is newest first)."""

    dead: bool | None = None
    endpoint: str = ""
    owners: Collection[str] | None = None
    before_id: int | None = None


@dataclass(frozen=True)
class DeliveryPage:
    deliveries: tuple[Delivery, ...]
    next_page_token: str


class DeliveryLog(Protocol):
    """The stored deliveries, as listed (the ingest database)."""

    async def listed(self, listing: DeliveryListing, *, limit: int) -> list[Delivery]:
        """Up to ``limit`` deliveries ``listing`` selects, newest first."""

    async def owners_of(self, delivery_ids: Collection[int]) -> dict[int, str]:
        """The owner of each stored delivery of ``delivery_ids``; others are left out."""


class WebhookBacklog:
    """Lists undelivered deliveries, and sends dead ones again."""

    def __init__(
        self,
        *,
        log: DeliveryLog,
        dispatcher: WebhookDispatcher,
        limits: UploadLimits,
        page_tokens: paging.PageTokens,
    ) -> None:
        self._log = log
        self._dispatcher = dispatcher
        self._limits = limits
        self._page_tokens = page_tokens

    async def list_page(
        self,
        *,
        dead: bool | None,
        endpoint: str,
        owner_id: str,
        owners: Collection[str] | None,
        page_size: int,
        page_token: str,
    ) -> DeliveryPage:
        """One page of deliveries, newest first (AIP-158 paging), of ``owner_id`` if given,
        else of ``owners`` (None: every owner)."""
        if owner_id:
            validate_owner_id(owner_id, self._limits)
            owners = [owner_id]

        async def fetch(after: Key | None, limit: int) -> list[Delivery]:
            listing = DeliveryListing(
                dead=dead,
                endpoint=endpoint,
                owners=owners,
                before_id=None if after is None else int(after[0]),
            )
            return await self._log.listed(listing, limit=limit)

        state = "" if dead is None else "dead" if dead else "retrying"
        page, token = await one_page(
            self._page_tokens,
            page_size=page_size,
            page_token=page_token,
            filters={"state": state, "endpoint": endpoint, "owner_id": owner_id},
            shape=(int,),
            fetch=fetch,
            key_of=lambda delivery: (delivery.id,),
        )
        return DeliveryPage(page, token)

    async def owners_of(self, delivery_ids: Sequence[int]) -> dict[int, str]:
        """The owner of each stored delivery of ``delivery_ids``; others are left out."""
        return await self._log.owners_of(delivery_ids)

    async def retry(
        self, delivery_ids: Sequence[int], *, endpoint: str, owners: Collection[str] | None
    ) -> int:
        """Send dead deliveries again: those of ``delivery_ids`` (all of ``endpoint``'s
        without ids; with both, those of the ids that go to it), of ``owners`` (None: every
        owner); how many were dead. Listed ids no longer dead are left out: they are being
        retried, or were delivered meanwhile. Deliveries to an endpoint the webhooks file no
        longer names stay dead (nothing would send them)."""
        if not delivery_ids and not endpoint:
            raise invalid("delivery_ids", "FILTER_REQUIRED", "name delivery_ids, or an endpoint")
        if len(delivery_ids) > MAX_RETRY_IDS:
            raise invalid("delivery_ids", "TOO_MANY_DELIVERY_IDS", f"at most {MAX_RETRY_IDS}")
        if endpoint and endpoint not in self._dispatcher.endpoints.current:
            raise WebhookEndpointNotFound(
                f"the webhooks file names no endpoint {endpoint!r}",
                field_violations=[FieldViolation("endpoint", "not in the webhooks file")],
            )
        if delivery_ids:
            stored = await self._log.owners_of(delivery_ids)
            for index, delivery_id in enumerate(delivery_ids):
                if delivery_id not in stored:
                    raise WebhookDeliveryNotFound(
                        f"no undelivered webhook delivery with id {delivery_id}",
                        field_violations=[
                            FieldViolation(f"delivery_ids[{index}]", "unknown or delivered")
                        ],
                    )
        return await self._dispatcher.revive(
            list(dict.fromkeys(delivery_ids)) or None, endpoint=endpoint, owners=owners
        )
