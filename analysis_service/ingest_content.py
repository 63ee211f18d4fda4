"""The ingest service as the analysis domain's ContentSource: ``ReadMediaContent`` over gRPC."""

from __future__ import annotations

import grpc
from mediatag.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from analysis_service.domain.models import JobSpec
from analysis_service.errors import (
    ContentUnavailable,
    PermanentAnalyzerError,
    TransientAnalyzerError,
)
from mediatag_common.grpc_server import open_channel
from mediatag_common.tls import ClientTls

# Ingest down, restarting, draining or overloaded: wait for it without using attempts. A
# refused service token is a configuration mistake, not the image's fault: jobs wait for
# the operator to fix it instead of failing.
UNREACHABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
# Errors another attempt may not meet; they count as attempts (a bug must not loop forever).
TRANSIENT_CODES = frozenset(
    {grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)


class IngestContent:
    """Reads media bytes with ingest's ``ReadMediaContent``, at most ``max_bytes`` of them."""

    def __init__(
        self,
        ingest_address: str,
        *,
        timeout: float,
        max_bytes: int,
        tls: ClientTls | None = None,
        token: str | None = None,
    ) -> None:
        self._channel = open_channel(ingest_address, tls=tls, token=token)
        self._stub = ingest_pb2_grpc.IngestServiceStub(self._channel)
        self._timeout = timeout
        self._max_bytes = max_bytes

    async def read(self, spec: JobSpec) -> bytes:
        chunks: list[bytes] = []
        received = 0
        try:
            call = self._stub.ReadMediaContent(
                ingest_pb2.ReadMediaContentRequest(media_id=spec.content_ref),
                timeout=self._timeout,
            )
            async for response in call:
                received += len(response.data)
                if received > self._max_bytes:
                    call.cancel()
                    raise PermanentAnalyzerError(
                        f"content of media {spec.media_id} exceeds {self._max_bytes} bytes",
                        reason="CONTENT_TOO_LARGE",
                    )
                chunks.append(response.data)
        except grpc.aio.AioRpcError as exc:
            problem = f"reading content of media {spec.media_id}: {exc.code().name} {exc.details()}"
            if exc.code() in UNREACHABLE_CODES:
                raise ContentUnavailable(problem) from exc
            if exc.code() in TRANSIENT_CODES:
                raise TransientAnalyzerError(problem, reason="CONTENT_READ_FAILED") from exc
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                raise PermanentAnalyzerError(problem, reason="CONTENT_NOT_FOUND") from exc
            raise PermanentAnalyzerError(problem, reason="CONTENT_UNREADABLE") from exc
        return b"".join(chunks)

    async def close(self) -> None:
        await self._channel.close()
