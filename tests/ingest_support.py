"""The ingest service alone for the upload tests: a runner with any configuration, the
stream-upload helpers, and what a refusal must look like (AIP-193)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2
from mediatag.ingest.v1 import ingest_pb2 as ipb
from mediatag.ingest.v1 import ingest_pb2_grpc

from ingest_service.config import IngestConfig
from ingest_service.server import create_server
from mediatag_common.database import database_url, sqlite_url
from mediatag_common.errors import DOMAIN, error_info, field_violations
from mediatag_common.grpc_server import ServiceHost, channel_options, health_check_stub
from tests.blob_stores import StoreUnderTest, blob_key
from tests.conftest import DATABASES, PATIENCE, DatabaseUrls, free_port

OWNER = "listing-7"


def on_each_database(fixture: str) -> pytest.MarkDecorator:
    """Runs a test on SQLite and on PostgreSQL: ``fixture`` (an ingest server fixture that
    takes its databases from :func:`database_urls`) gets each kind in turn."""
    return pytest.mark.parametrize(fixture, DATABASES, indirect=True)


def database_urls(request: pytest.FixtureRequest, root: Path) -> DatabaseUrls:
    """Databases of the kind ``on_each_database`` gave the requesting fixture (else SQLite);
    call ``drop()`` on them afterwards."""
    kind = getattr(request, "param", "sqlite")
    server = request.getfixturevalue("postgres") if kind == "postgresql" else None
    return DatabaseUrls(kind, root, server)


@dataclass
class IngestServer:
    """The ingest service on a data directory (restartable on it), analysis nowhere; its
    blobs in ``store`` (by default the local directory in the data directory)."""

    data_dir: Path
    config: IngestConfig = field(default_factory=IngestConfig)
    analysis_port: int = field(default_factory=free_port)
    store: StoreUnderTest | None = None
    host: ServiceHost | None = None
    channel: grpc.aio.Channel | None = None
    port: int = 0

    def __post_init__(self) -> None:
        if self.store is None:
            self.store = StoreUnderTest("file", self.data_dir / "blobs")

    async def start(self) -> ingest_pb2_grpc.IngestServiceAsyncStub:
        config = replace(
            self.config,
            port=0,
            data_dir=self.data_dir,
            analysis_address=f"127.0.0.1:{self.analysis_port}",
            sqlite_synchronous="NORMAL",
            outbox_initial_backoff=0.05,
            outbox_max_backoff=0.5,
            mirror_initial_backoff=0.05,
            mirror_max_backoff=0.5,
            **self.blobs.settings(),
        )
        self.host, self.port = await create_server(config)
        await self.host.start()
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{self.port}", options=channel_options(256 * 1024 * 1024)
        )
        return ingest_pb2_grpc.IngestServiceStub(self.channel)

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        if self.host is not None:
            await self.host.stop(1.0)
            self.host = None

    async def health(self) -> int:
        assert self.channel is not None
        response = await health_check_stub(self.channel)(
            health_pb2.HealthCheckRequest(service=""), timeout=PATIENCE
        )
        return response.status

    @property
    def blobs(self) -> StoreUnderTest:
        assert self.store is not None
        return self.store

    def blob_files(self) -> set[str]:
        """The key of every object in the blob store, temporary ones included."""
        return self.blobs.keys()

    @property
    def spool_dir(self) -> Path:
        """Where uploads being received are spooled on this machine."""
        if self.blobs.scheme == "file":
            return self.blobs.root / "incoming"
        return self.data_dir / "spool"

    def incoming_files(self) -> list[Path]:
        """The local spool files of uploads being received."""
        return list(self.spool_dir.iterdir())

    def blob(self, sha256: str) -> str:
        return blob_key(sha256)

    def count_rows(self, table: str) -> int:
        """Rows of ``table`` in the service's database (its SQLite file, or the PostgreSQL
        database its configuration names)."""
        url = self.config.database_url or sqlite_url(str(self.data_dir / "ingest.db"))
        engine = sa.create_engine(database_url(url))
        try:
            with engine.connect() as conn:
                count = conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
        finally:
            engine.dispose()
        return int(count)


async def refusal(call: Awaitable[Any]) -> grpc.RpcError:
    """The error a call that must fail ends with (grpc.aio's or the synchronous client's)."""
    with pytest.raises(grpc.RpcError) as caught:
        await call
    return caught.value


def assert_refused(
    error: grpc.RpcError, code: grpc.StatusCode, reason: str, field_name: str | None
) -> None:
    """``error`` is ``code`` with ErrorInfo ``reason`` (domain mediatag) naming ``field_name``."""
    assert error.code() == code, error.details()
    info = error_info(error)
    assert info is not None
    assert (info.reason, info.domain) == (reason, DOMAIN), error.details()
    if field_name is not None:
        assert [v.field for v in field_violations(error)] == [field_name]


def sha256_of(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def header(**fields: Any) -> ipb.UploadMediaStreamRequest:
    fields.setdefault("owner_id", OWNER)
    return ipb.UploadMediaStreamRequest(header=ipb.UploadHeader(**fields))


def chunk(data: bytes) -> ipb.UploadMediaStreamRequest:
    return ipb.UploadMediaStreamRequest(chunk=data)


def chunks_of(content: bytes, size: int = 64 * 1024) -> list[ipb.UploadMediaStreamRequest]:
    return [chunk(content[i : i + size]) for i in range(0, len(content), size)]


async def stream(
    messages: Iterable[ipb.UploadMediaStreamRequest],
) -> AsyncIterator[ipb.UploadMediaStreamRequest]:
    for message in messages:
        yield message


async def upload_stream(
    stub: ingest_pb2_grpc.IngestServiceAsyncStub,
    content: bytes,
    *,
    chunk_size: int = 64 * 1024,
    deadline: float = PATIENCE,
    **header_fields: Any,
) -> ipb.UploadMediaStreamResponse:
    """Stream ``content`` after a header made of ``header_fields``."""
    messages = [header(**header_fields), *chunks_of(content, chunk_size)]
    response: ipb.UploadMediaStreamResponse = await stub.UploadMediaStream(
        stream(messages), timeout=deadline
    )
    return response


async def stream_with_sync_client(
    server: IngestServer,
    messages: Iterable[ipb.UploadMediaStreamRequest],
    deadline: float = PATIENCE,
) -> ipb.UploadMediaStreamResponse:
    """UploadMediaStream through gRPC's synchronous client, in a thread.

    For streams the server ends before the client has sent everything (an early refusal, an
    answer from the header alone): grpc.aio's client can then report ``INTERNAL: Internal
    error from Core`` instead of the server's status, when its next write fails after the
    stream closed (grpc/grpc#36066). The synchronous client reports the server's status.
    """

    def call() -> ipb.UploadMediaStreamResponse:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            response: ipb.UploadMediaStreamResponse = stub.UploadMediaStream(
                iter(messages), timeout=deadline
            )
            return response

    return await asyncio.to_thread(call)


async def listed(stub: ingest_pb2_grpc.IngestServiceAsyncStub, owner: str = OWNER) -> list[str]:
    """The ids of every item of ``owner``, newest first."""
    response = await stub.ListMedia(
        ipb.ListMediaRequest(owner_id=owner, page_size=1000), timeout=PATIENCE
    )
    return [m.id for m in response.media]
