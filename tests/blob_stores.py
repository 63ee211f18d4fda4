"""Blob stores for the tests: the local directory, and Cloud Storage and S3 emulators that
speak the real protocols (gcp-storage-emulator, moto's server), started once per session on
loopback and inspected with the vendors' own clients.

No test reaches for credentials over the network: Cloud Storage's client is anonymous under
``STORAGE_EMULATOR_HOST``, S3's finds the explicit test keys in the environment first, and
the instance metadata lookup is turned off.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.cloud import storage

from bench import emulators
from bench.emulators import AWS_TEST_ENVIRONMENT, Emulator, s3_client
from tests.conftest import free_port

__all__ = ["BUCKET", "Emulator", "StoreUnderTest", "blob_key", "s3_client", "store_under_test"]

BUCKET = "mediatag-test"
SCHEMES = ("file", "gs", "s3")


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    emulator = emulators.cloud_storage_emulator(
        free_port(), BUCKET, tmp_path_factory.mktemp("gcs") / "emulator.log"
    )
    # What ingest's Cloud Storage client looks for (and then uses no credentials).
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
    yield emulator
    emulator.close()
    if previous is None:
        del os.environ["STORAGE_EMULATOR_HOST"]
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture(scope="session")
def s3_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    emulator = emulators.s3_emulator(
        free_port(), BUCKET, tmp_path_factory.mktemp("s3") / "emulator.log"
    )
    # What ingest's S3 client finds first in the AWS credential chain.
    previous = {name: os.environ.get(name) for name in AWS_TEST_ENVIRONMENT}
    os.environ.update(AWS_TEST_ENVIRONMENT)
    yield emulator
    emulator.close()
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@dataclass
class StoreUnderTest:
    """One blob store as a test sees it: how ingest is pointed at it, and what it holds."""

    scheme: str
    # The blob directory, for the local store.
    root: Path
    emulator: Emulator | None = None
    # The key prefix in the bucket: a new one per test, so tests share the emulators.
    prefix: str = ""

    @property
    def url(self) -> str | None:
        """``--blob-store``; None for the local store (its default place)."""
        if self.scheme == "file":
            return None
        return f"{self.scheme}://{BUCKET}/{self.prefix}"

    @property
    def endpoint(self) -> str | None:
        return self.emulator.url if self.scheme == "s3" and self.emulator else None

    def settings(self) -> dict[str, Any]:
        """The IngestConfig fields that point ingest at this store."""
        return {"blob_store": self.url, "blob_store_endpoint": self.endpoint}

    def flags(self) -> list[str]:
        """The same as ``mediatag serve`` flags."""
        flags = [] if self.url is None else ["--blob-store", self.url]
        return flags + ([] if self.endpoint is None else ["--blob-store-endpoint", self.endpoint])

    def keys(self) -> set[str]:
        """Every object (blobs and temporary objects), as keys relative to the store."""
        if self.scheme == "file":
            return {str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file()}
        return {key for key, _ in self._objects()}

    def blob_keys(self) -> set[str]:
        """The blobs alone."""
        return {key for key in self.keys() if not key.startswith("incoming/")}

    def read(self, sha256: str) -> bytes:
        key = blob_key(sha256)
        if self.scheme == "file":
            return (self.root / key).read_bytes()
        if self.scheme == "gs":
            return bytes(self._gcs().blob(f"{self.prefix}/{key}").download_as_bytes())
        assert self.emulator is not None
        found = s3_client(self.emulator).get_object(Bucket=BUCKET, Key=f"{self.prefix}/{key}")
        return bytes(found["Body"].read())

    def write(self, key: str, content: bytes) -> None:
        """Put an object straight into the store (a crash's leftover)."""
        if self.scheme == "file":
            (self.root / key).parent.mkdir(parents=True, exist_ok=True)
            (self.root / key).write_bytes(content)
        elif self.scheme == "gs":
            self._gcs().blob(f"{self.prefix}/{key}").upload_from_string(content)
        else:
            assert self.emulator is not None
            s3_client(self.emulator).put_object(
                Bucket=BUCKET, Key=f"{self.prefix}/{key}", Body=content
            )

    def delete(self, key: str) -> None:
        """Remove an object behind the service's back (a blob lost, or never copied)."""
        if self.scheme == "file":
            (self.root / key).unlink()
        elif self.scheme == "gs":
            self._gcs().blob(f"{self.prefix}/{key}").delete()
        else:
            assert self.emulator is not None
            s3_client(self.emulator).delete_object(Bucket=BUCKET, Key=f"{self.prefix}/{key}")

    def _objects(self) -> list[tuple[str, Any]]:
        if self.scheme == "gs":
            return [
                (blob.name[len(self.prefix) + 1 :], blob)
                for blob in storage.Client().list_blobs(BUCKET, prefix=f"{self.prefix}/")
            ]
        assert self.emulator is not None
        listed = s3_client(self.emulator).list_objects_v2(Bucket=BUCKET, Prefix=f"{self.prefix}/")
        return [(item["Key"][len(self.prefix) + 1 :], item) for item in listed.get("Contents", [])]

    def _gcs(self) -> Any:
        return storage.Client().bucket(BUCKET)


def blob_key(sha256: str) -> str:
    return f"{sha256[:2]}/{sha256}"


def store_under_test(request: pytest.FixtureRequest, scheme: str, root: Path) -> StoreUnderTest:
    """The store of ``scheme``, its emulator started if this is the session's first use."""
    emulator = None
    if scheme == "gs":
        emulator = request.getfixturevalue("gcs_emulator")
    elif scheme == "s3":
        emulator = request.getfixturevalue("s3_emulator")
    return StoreUnderTest(scheme, root, emulator, prefix=f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=SCHEMES)
def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreUnderTest:
    """Each blob store in turn: the local directory, Cloud Storage, S3."""
    return store_under_test(request, request.param, tmp_path / "ingest" / "blobs")
