"""S3 (and S3-compatible services) through AWS's own client, ``boto3``.

Credentials come from the standard AWS chain (environment, shared config and credentials
files, SSO, container or instance roles), found by the client; an S3-compatible service is
reached at ``--blob-store-endpoint`` (path-style addressing). The client times each attempt
of a call (to connect, and to read), not the call: with its standard retries a call makes up
to four attempts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from ingest_service.blobstores.object_store import MAX_THREADS, MIB
from ingest_service.errors import (
    BlobMissing,
    StoragePermissionDenied,
    StorageQuotaExceeded,
    StorageUnavailable,
)

_PERMISSION_CODES = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
    }
)
_QUOTA_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
)
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
# Attempts of one call (the client's standard retry mode), and the most its backoff between
# them adds up to: a random part of 1, 2, 4 s, each raised by at most 5 s more when S3 asks
# for a later retry (x-amz-retry-after).
_ATTEMPTS = 4
_MOST_BACKOFF = 1.0 + 2.0 + 4.0 + 3 * 5.0


class S3Upload:
    """A multipart upload."""

    def __init__(self, client: Any, bucket: str, key: str) -> None:
        self._client = client
        self._bucket = bucket
        self._key = key
        self._parts: list[dict[str, Any]] = []
        created = client.create_multipart_upload(Bucket=bucket, Key=key)
        self._upload_id: str = created["UploadId"]

    def send(self, part: bytes) -> None:
        number = len(self._parts) + 1
        sent = self._client.upload_part(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=part,
        )
        self._parts.append({"PartNumber": number, "ETag": sent["ETag"]})

    def complete(self) -> None:
        self._client.complete_multipart_upload(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts},
        )

    def abort(self) -> None:
        self._client.abort_multipart_upload(
            Bucket=self._bucket, Key=self._key, UploadId=self._upload_id
        )


class S3Bucket:
    """A :class:`~ingest_service.blobstores.object_store.Bucket` in S3."""

    # S3's smallest part (but the last); 10,000 of them make 50 GB.
    part_bytes = 5 * MIB

    def __init__(self, bucket: str, prefix: str, *, endpoint: str | None, timeout: float) -> None:
        config = Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"total_max_attempts": _ATTEMPTS, "mode": "standard"},
            # A connection for each of the store's threads.
            max_pool_connections=MAX_THREADS,
            s3={"addressing_style": "path"} if endpoint else None,
        )
        self._client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        self.longest_call = _ATTEMPTS * 2 * timeout + _MOST_BACKOFF
        self._bucket = bucket
        self._prefix = f"{prefix}/" if prefix else ""

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self._bucket, Key=self._name(key))
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                return False
            raise
        return True

    def put(self, key: str, content: bytes) -> None:
        self._client.put_object(Bucket=self._bucket, Key=self._name(key), Body=content)

    def start_upload(self, key: str) -> S3Upload:
        return S3Upload(self._client, self._bucket, self._name(key))

    def copy(self, source: str, target: str) -> None:
        self._client.copy_object(
            Bucket=self._bucket,
            Key=self._name(target),
            CopySource={"Bucket": self._bucket, "Key": self._name(source)},
        )

    def delete(self, key: str) -> None:
        # S3 answers a delete of an absent key with success.
        self._client.delete_object(Bucket=self._bucket, Key=self._name(key))

    def open(self, key: str) -> BinaryIO:
        try:
            found = self._client.get_object(Bucket=self._bucket, Key=self._name(key))
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                raise BlobMissing(f"{key} is not in the blob store") from None
            raise
        return cast(BinaryIO, found["Body"])

    def list_pages(self) -> Iterator[list[tuple[str, float]]]:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self._bucket, Prefix=self._prefix):
            yield [
                (item["Key"][len(self._prefix) :], item["LastModified"].timestamp())
                for item in page.get("Contents", [])
            ]

    def close(self) -> None:
        self._client.close()

    def _name(self, key: str) -> str:
        return self._prefix + key

    @staticmethod
    def classify(exc: Exception) -> StorageUnavailable | None:
        """S3's errors as the service's; messages name no bucket."""
        if isinstance(exc, NoCredentialsError):
            return StoragePermissionDenied("the blob store has no usable credentials")
        if isinstance(exc, ClientError):
            # A refused HEAD (every upload's first call) has no body: its code is the status.
            code = _code(exc)
            if code in _PERMISSION_CODES or code in ("401", "403"):
                return StoragePermissionDenied("the blob store refused the service's credentials")
            # S3 slows a client down with 503 (SlowDown), and others with 429.
            if code in _QUOTA_CODES or code in ("429", "503"):
                return StorageQuotaExceeded(
                    "the blob store's request rate is exceeded; retry later"
                )
            return StorageUnavailable("blob store unavailable")
        if isinstance(exc, BotoCoreError):
            return StorageUnavailable("blob store unavailable")
        return None


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
