"""Request ids of uploads (AIP-155): a retried upload gets the first answer, stored once.

An upload may carry a ``request_id`` (a UUID). The first successful upload with an id is
recorded with a digest of its content and metadata and the ids of the media it stored; a
later upload with the same id is answered from that record (the same media, as they were
first answered) and stores nothing, as long as its digest matches. The same id with other
content is refused (``ALREADY_EXISTS``, ``REQUEST_ID_REUSED``): it is a client bug, and
answering it with the first upload's media would hide that.

Duplicates that race are serialised per id within the process (:meth:`RequestIds.claim`),
so the loser finds the winner's record before storing anything. Across processes (replicas
on one database) the store records an id with one ``INSERT … ON CONFLICT``: of two uploads
racing with one id, one stores, and the other, finding the id taken as it commits, stores
nothing and answers with the winner's answer (or refusal). Records are kept for the
retention period (24 h by default) and purged by a background task; an expired record
counts as absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from ingest_service.domain.models import Media, ProcessingStatus, RequestRecord
from ingest_service.domain.store import IngestStore
from ingest_service.errors import IngestError, RequestIdReused, invalid
from mediatag_common.errors import FieldViolation
from mediatag_common.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def parse_request_id(value: str, field_name: str) -> str:
    """The request id in canonical (lower-case) form; "" when none was given.

    Raises INVALID_REQUEST_ID unless ``value`` is a UUID in its 8-4-4-4-12 hex form.
    """
    if not value:
        return ""
    canonical = value.lower()
    if not _UUID.fullmatch(canonical):
        raise invalid(
            field_name,
            "INVALID_REQUEST_ID",
            "must be a UUID such as 123e4567-e89b-12d3-a456-426614174000",
        )
    return canonical


class RequestDigest:
    """A SHA-256 over typed, length-prefixed values, so that no two requests share one."""

    def __init__(self, method: str) -> None:
        self._hash = hashlib.sha256()
        self.text(method)

    def text(self, value: str) -> RequestDigest:
        encoded = value.encode("utf-8", "surrogatepass")
        self._hash.update(b"s" + len(encoded).to_bytes(8, "big") + encoded)
        return self

    def number(self, value: int) -> RequestDigest:
        self._hash.update(b"i" + value.to_bytes(16, "big", signed=True))
        return self

    def mapping(self, value: Mapping[str, str]) -> RequestDigest:
        self.number(len(value))
        for key in sorted(value):
            self.text(key).text(value[key])
        return self

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def as_first_answered(item: Media) -> Media:
    """``item`` as the upload answered it, before analysis changed anything."""
    status = (
        ProcessingStatus.NOT_APPLICABLE if item.not_applicable_reason else ProcessingStatus.PENDING
    )
    return dataclasses.replace(
        item,
        status=status,
        attempt=0,
        outcome=None,
        error=None,
        status_revision=0,
        updated_at=item.created_at,
    )


@dataclass
class _Claim:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class RequestIds:
    """The recorded request ids: look-ups, replays, per-id serialisation and the purge."""

    def __init__(self, *, store: IngestStore, retention: float, purge_interval: float) -> None:
        self._store = store
        self.retention = retention
        self._purge_interval = purge_interval
        self._claims: dict[str, _Claim] = {}
        self._task: asyncio.Task[None] | None = None

    def cutoff(self) -> float:
        """Records made before this time have expired."""
        return time.time() - self.retention

    @contextlib.asynccontextmanager
    async def claim(self, request_id: str) -> AsyncIterator[None]:
        """Hold ``request_id`` for one call: a concurrent call with the same id waits here.

        The wait ends when the holder's upload has committed or failed (its client going
        away cancels it); a waiting call whose client gives up is cancelled too.
        """
        claim = self._claims.setdefault(request_id, _Claim())
        claim.users += 1
        try:
            async with claim.lock:
                yield
        finally:
            claim.users -= 1
            if claim.users == 0:
                del self._claims[request_id]

    async def lookup(self, request_id: str) -> RequestRecord | None:
        """The unexpired record of ``request_id``, if the id was used before."""
        return await self._store.find_request(request_id, not_before=self.cutoff())

    async def replay(
        self, record: RequestRecord, digest: str, field_name: str
    ) -> tuple[tuple[Media, ...], str]:
        """The first answer to ``record``'s request: its media as answered, and its message.

        Raises REQUEST_ID_REUSED when ``digest`` (the retry's) differs from the first's.
        """
        if digest != record.digest:
            raise RequestIdReused(
                f"request_id {record.request_id} was used for another upload",
                field_violations=[
                    FieldViolation(
                        field_name,
                        "already used for an upload with other content or metadata; "
                        "use a new request id for a new upload",
                    )
                ],
            )
        stored = await self._store.media_in_order(record.media_ids)
        if len(stored) != len(record.media_ids):
            raise IngestError(f"the media of request_id {record.request_id} are missing")
        logger.info(
            "request %s repeated: answered with its first answer (%d media)",
            record.request_id,
            len(stored),
        )
        return tuple(as_first_answered(item) for item in stored), record.message

    def start(self) -> None:
        self._task = asyncio.create_task(self._purge_loop(), name="request-id-purge")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def purge(self) -> int:
        """Forget the request ids older than the retention period; returns how many."""
        return await self._store.purge_requests(before=self.cutoff())

    async def _purge_loop(self) -> None:
        while True:
            try:
                purged = await self.purge()
            except IngestError as exc:
                logger.warning("could not purge expired request ids: %s", exc)
            else:
                if purged:
                    logger.debug("purged %d expired request id(s)", purged)
            await asyncio.sleep(self._purge_interval)


def upload_digest(
    *,
    method: str,
    owner_id: str,
    category: str,
    context: Mapping[str, str],
    priority: int,
    files: Sequence[tuple[str, str, str]],
) -> str:
    """The digest of an upload: its metadata and each file's (filename, declared type, sha256)."""
    digest = RequestDigest(method).text(owner_id).text(category).mapping(context).number(priority)
    digest.number(len(files))
    for filename, declared_content_type, sha256 in files:
        digest.text(filename).text(declared_content_type).text(sha256)
    return digest.hexdigest()
