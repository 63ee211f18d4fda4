"""The baseline of the upload benchmark: a bare grpc.aio server that only stores the bytes.

It answers ``/mediatag.ingest.v1.IngestService/UploadMedia`` and ``UploadMediaStream`` with
the same request and response messages as mediatag, and writes each file as durably as
mediatag's blob store does (temp file, write, fsync, rename, fsync the directory), off the
event loop, and nothing else: no validation, sniffing, hashing, database or outbox. It
serves the standard health service so it is started and awaited exactly like ``mediatag
serve ingest``.

Run: ``python -m bench.bare_server --port PORT --data-dir DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from mediatag.ingest.v1 import ingest_pb2

from bench.bare import serve_until_signal

MIB = 1024 * 1024
_SERVICE = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name


class BareUploadStore:
    """Writes every uploaded file to its own durable file in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def upload_media(
        self, request: ingest_pb2.UploadMediaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.UploadMediaResponse:
        await asyncio.to_thread(self._write_all, [file.content for file in request.files])
        return ingest_pb2.UploadMediaResponse(count=len(request.files))

    async def upload_media_stream(
        self,
        requests: AsyncIterator[ingest_pb2.UploadMediaStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ingest_pb2.UploadMediaStreamResponse:
        """The header, then the chunks, kept in memory and written once all have come."""
        chunks = [request.chunk async for request in requests if request.HasField("chunk")]
        await asyncio.to_thread(self._write, b"".join(chunks))
        return ingest_pb2.UploadMediaStreamResponse()

    def _write_all(self, contents: Sequence[bytes]) -> None:
        for content in contents:
            self._write(content)

    def _write(self, content: bytes) -> None:
        descriptor, temp_name = tempfile.mkstemp(dir=self.directory, prefix=".incoming-")
        try:
            with os.fdopen(descriptor, "wb") as temp:
                temp.write(content)
                temp.flush()
                os.fsync(temp.fileno())
            os.replace(temp_name, self.directory / uuid.uuid4().hex)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


async def serve(port: int, data_dir: Path, max_message_bytes: int) -> None:
    """Serve until SIGINT or SIGTERM; ``data_dir`` must exist."""
    store = BareUploadStore(data_dir)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                _SERVICE,
                {
                    "UploadMedia": grpc.unary_unary_rpc_method_handler(
                        store.upload_media,
                        request_deserializer=ingest_pb2.UploadMediaRequest.FromString,
                        response_serializer=ingest_pb2.UploadMediaResponse.SerializeToString,
                    ),
                    "UploadMediaStream": grpc.stream_unary_rpc_method_handler(
                        store.upload_media_stream,
                        request_deserializer=ingest_pb2.UploadMediaStreamRequest.FromString,
                        response_serializer=ingest_pb2.UploadMediaStreamResponse.SerializeToString,
                    ),
                },
            )
        ]
    )
    await serve_until_signal(
        server, port, f"bare server listening on 127.0.0.1:{port} (data in {data_dir})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_server", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--max-message-bytes", type=int, default=128 * MIB)
    args = parser.parse_args(argv)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(args.port, args.data_dir, args.max_message_bytes))


if __name__ == "__main__":
    main()
