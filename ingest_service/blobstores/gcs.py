"""Cloud Storage through Google's own client, ``google-cloud-storage``.

Credentials are Application Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``, the
gcloud login, or the metadata server of the machine), found by the client; with
``STORAGE_EMULATOR_HOST`` set, the client talks to that emulator with anonymous credentials
instead. Every call is bounded by the store's timeout, retries included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO, cast

import requests
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import storage
from google.cloud.storage import exceptions as storage_exceptions
from google.cloud.storage.fileio import BlobWriter
from google.cloud.storage.retry import DEFAULT_RETRY

from ingest_service.blobstores.object_store import MIB, READ_CHUNK_BYTES
from ingest_service.errors import (
    BlobMissing,
    StoragePermissionDenied,
    StorageQuotaExceeded,
    StorageUnavailable,
)

CONTENT_TYPE = "application/octet-stream"
# Forbidden (403) with one of these reasons is a quota, not a permission.
_QUOTA_REASONS = frozenset({"quotaExceeded", "rateLimitExceeded", "userRateLimitExceeded"})


class GcsUpload:
    """A resumable upload; each part is a chunk of it."""

    def __init__(self, writer: BlobWriter) -> None:
        self._writer = writer

    def send(self, part: bytes) -> None:
        self._writer.write(part)

    def complete(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        self._writer.terminate()


class GcsBucket:
    """A :class:`~ingest_service.blobstores.object_store.Bucket` in Cloud Storage."""

    # A multiple of the 256 KiB resumable uploads need. Small: the client copies each chunk
    # on its way out, and 5 MiB chunks grew the process by tens of MiB during a stream.
    part_bytes = 2 * MIB

    def __init__(self, bucket: str, prefix: str, *, timeout: float) -> None:
        """Blocking: Application Default Credentials may be looked up (none found:
        StoragePermissionDenied)."""
        try:
            self._client = storage.Client()
        except auth_exceptions.DefaultCredentialsError:
            raise StoragePermissionDenied(
                "no credentials for Cloud Storage: give the service Application Default "
                "Credentials (GOOGLE_APPLICATION_CREDENTIALS, or the machine's service account)"
            ) from None
        self._bucket = self._client.bucket(bucket)
        self._prefix = f"{prefix}/" if prefix else ""
        self._timeout = timeout
        self._retry = DEFAULT_RETRY.with_timeout(timeout)
        # Retries stop at the timeout, but one begun just before runs its own timeout out.
        self.longest_call = 2 * timeout

    def exists(self, key: str) -> bool:
        blob = self._bucket.get_blob(self._name(key), timeout=self._timeout, retry=self._retry)
        return blob is not None

    def put(self, key: str, content: bytes) -> None:
        # Content-addressed: writing the same bytes again is harmless, so retrying is safe.
        self._bucket.blob(self._name(key)).upload_from_string(
            content, content_type=CONTENT_TYPE, timeout=self._timeout, retry=self._retry
        )

    def start_upload(self, key: str) -> GcsUpload:
        blob = self._bucket.blob(self._name(key))
        writer = BlobWriter(
            blob,
            chunk_size=self.part_bytes,
            retry=self._retry,
            content_type=CONTENT_TYPE,
            timeout=self._timeout,
        )
        return GcsUpload(writer)

    def copy(self, source: str, target: str) -> None:
        self._bucket.copy_blob(
            self._bucket.blob(self._name(source)),
            self._bucket,
            self._name(target),
            timeout=self._timeout,
            retry=self._retry,
        )

    def delete(self, key: str) -> None:
        try:
            self._bucket.delete_blob(self._name(key), timeout=self._timeout, retry=self._retry)
        except api_exceptions.NotFound:
            return

    def open(self, key: str) -> BinaryIO:
        reader = self._bucket.blob(self._name(key)).open(
            "rb", chunk_size=READ_CHUNK_BYTES, timeout=self._timeout, retry=self._retry
        )
        return cast(BinaryIO, _Reading(cast(BinaryIO, reader), key))

    def list_pages(self) -> Iterator[list[tuple[str, float]]]:
        listing = self._client.list_blobs(
            self._bucket, prefix=self._prefix, timeout=self._timeout, retry=self._retry
        )
        for page in listing.pages:
            yield [(blob.name[len(self._prefix) :], blob.updated.timestamp()) for blob in page]

    def close(self) -> None:
        self._client.close()

    def _name(self, key: str) -> str:
        return self._prefix + key

    @staticmethod
    def classify(exc: Exception) -> StorageUnavailable | None:
        """Cloud Storage's errors as the service's; messages name no bucket."""
        if isinstance(exc, auth_exceptions.GoogleAuthError):
            return StoragePermissionDenied("the blob store has no usable credentials")
        if isinstance(exc, api_exceptions.TooManyRequests) or (
            isinstance(exc, api_exceptions.Forbidden) and _quota_reason(exc)
        ):
            return StorageQuotaExceeded("the blob store's quota is exceeded; retry later")
        if isinstance(exc, api_exceptions.Unauthorized | api_exceptions.Forbidden):
            return StoragePermissionDenied("the blob store refused the service's credentials")
        if isinstance(
            exc,
            api_exceptions.GoogleAPIError
            | storage_exceptions.InvalidResponse
            | requests.RequestException,
        ):
            return StorageUnavailable("blob store unavailable")
        return None


def _quota_reason(exc: api_exceptions.Forbidden) -> bool:
    errors: list[Any] = list(exc.errors or [])
    return any(isinstance(e, dict) and e.get("reason") in _QUOTA_REASONS for e in errors)


class _Reading:
    """A blob being read; Cloud Storage tells that it is missing at the first read."""

    def __init__(self, reader: BinaryIO, key: str) -> None:
        self._reader = reader
        self._key = key

    def read(self, size: int) -> bytes:
        try:
            return self._reader.read(size)
        except api_exceptions.NotFound:
            raise BlobMissing(f"{self._key} is not in the blob store") from None

    def close(self) -> None:
        self._reader.close()
