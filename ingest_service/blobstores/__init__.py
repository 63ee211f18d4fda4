"""The blob stores: a local directory, Cloud Storage, S3; :func:`open_blob_store` picks one."""

from __future__ import annotations

from pathlib import Path

from ingest_service.blobstores.local import LocalBlobStore
from ingest_service.blobstores.object_store import Bucket, ObjectStoreBlobs
from ingest_service.config import IngestConfig
from ingest_service.domain.blobs import BlobStore
from ingest_service.domain.observer import BlobStoreObserver

__all__ = ["calls", "copy", "gcs", "local", "object_store", "open_blob_store", "s3", "spool"]


def open_blob_store(config: IngestConfig, observer: BlobStoreObserver) -> BlobStore:
    """The store ``config`` names; blocking (directories made, credentials looked up).

    A bucket's streamed uploads are spooled on this machine, in ``spool/`` of the data
    directory.
    """
    location, timeout = config.blob_store_location, config.blob_store_timeout
    if location.scheme == "file":
        return LocalBlobStore(Path(location.path), observer)
    # Imported when used: a local store needs neither client.
    bucket: Bucket
    if location.scheme == "gs":
        from ingest_service.blobstores.gcs import GcsBucket

        bucket = GcsBucket(location.bucket, location.path, timeout=timeout)
    else:
        from ingest_service.blobstores.s3 import S3Bucket

        bucket = S3Bucket(
            location.bucket, location.path, endpoint=config.blob_store_endpoint, timeout=timeout
        )
    return ObjectStoreBlobs(bucket, spool_dir=config.data_dir / "spool", observer=observer)
