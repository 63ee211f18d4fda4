"""A disk with no room for an upload: a clear refusal, nothing half-stored, and the service
keeps taking uploads that fit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest
from mediatag.ingest.v1 import ingest_pb2 as ipb
from mediatag.ingest.v1 import ingest_pb2_grpc

from mediatag_common.errors import error_info
from tests.conftest import PATIENCE, free_port
from tests.media_samples import jpeg_bytes, png_bytes
from tests.processes import Serve

pytestmark = pytest.mark.e2e

# Room for the database and small images, not for a ~3 MB PNG.
FILE_SIZE_LIMIT = 2 * 1024 * 1024
OWNER = "full-disk"


async def test_no_room_for_an_upload_is_resource_exhausted_and_stores_nothing(
    tmp_path: Path,
) -> None:
    port = free_port()
    data = tmp_path / "data"
    ingest = Serve(
        tmp_path / "ingest.log",
        "ingest",
        "--data-dir",
        str(data),
        "--ingest-port",
        str(port),
        "--analysis-port",
        str(free_port()),
        file_size_limit=FILE_SIZE_LIMIT,
    ).start(port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            small = jpeg_bytes(seed=700)
            large = png_bytes(seed=701, size=(1500, 1100))
            assert len(large) > FILE_SIZE_LIMIT

            # A batch with a file that does not fit is refused whole.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.UploadMedia(
                    ipb.UploadMediaRequest(
                        owner_id=OWNER,
                        files=[
                            ipb.MediaFile(filename="small.jpg", content=small),
                            ipb.MediaFile(filename="large.png", content=large),
                        ],
                    ),
                    timeout=PATIENCE,
                )
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            info = error_info(refused.value)
            assert info is not None
            assert (info.reason, info.domain) == ("STORAGE_FULL", "mediatag")
            listed = await stub.ListMedia(ipb.ListMediaRequest(owner_id=OWNER), timeout=PATIENCE)
            assert not listed.media
            blobs = data / "ingest" / "blobs"
            large_sha256 = hashlib.sha256(large).hexdigest()
            assert not (blobs / large_sha256[:2] / large_sha256).exists()
            assert not list((blobs / "incoming").iterdir())

            # What fits is still taken, whole.
            response = await stub.UploadMedia(
                ipb.UploadMediaRequest(
                    owner_id=OWNER, files=[ipb.MediaFile(filename="small.jpg", content=small)]
                ),
                timeout=PATIENCE,
            )
            (media,) = response.media
            digest = hashlib.sha256()
            async for chunk in stub.ReadMediaContent(
                ipb.ReadMediaContentRequest(media_id=media.id), timeout=PATIENCE
            ):
                digest.update(chunk.data)
            assert digest.hexdigest() == hashlib.sha256(small).hexdigest()
    finally:
        assert ingest.stop() == 0, ingest.output()
