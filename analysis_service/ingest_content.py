"""The ingest service as the analysis domain's ContentSource, over gRPC.

Small items (most images) are read several at a time with ``ReadMediaContents``: a read asked
for while :data:`BATCH_CALLS` such calls are under way waits for the next one, sent a moment
after one ends with every read waiting then (one call per group of jobs instead of one stream
per job, on both sides). Larger items, items the answer leaves out, and every item while
ingest does not know that method (an older release answers UNIMPLEMENTED) are streamed with
``ReadMediaContent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import grpc
from mediatag.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from analysis_service.domain.models import JobSpec
from analysis_service.errors import (
    AnalysisError,
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
# Items read together: at most ingest's limits (ids per call, bytes per answer); larger
# items are streamed on their own.
BATCH_IDS = 64
BATCH_BYTES = 1024 * 1024
BATCHED_ITEM_BYTES = 256 * 1024
# Calls of ReadMediaContents under way at once; reads asked for while that many are under way
# wait for the next, sent when one of them ends, or at most this long after while fewer
# reads wait than it carried. Two, not one: a read need not wait out a whole call under way.
BATCH_CALLS = 2
BATCH_GATHERING = 0.001
# After an UNIMPLEMENTED answer (an ingest replica of an older release), how long every item
# is streamed before batches are tried again.
UNIMPLEMENTED_BACKOFF = 60.0

_INCLUDED = ingest_pb2.MEDIA_CONTENT_STATE_INCLUDED
_NOT_FOUND = ingest_pb2.MEDIA_CONTENT_STATE_NOT_FOUND


def _read_error(spec: JobSpec, exc: grpc.aio.AioRpcError) -> AnalysisError:
    """A failed read as the job's error (whether it waits, retries or fails)."""
    problem = f"reading content of media {spec.media_id}: {exc.code().name} {exc.details()}"
    if exc.code() in UNREACHABLE_CODES:
        return ContentUnavailable(problem)
    if exc.code() in TRANSIENT_CODES:
        return TransientAnalyzerError(problem, reason="CONTENT_READ_FAILED")
    if exc.code() is grpc.StatusCode.NOT_FOUND:
        return PermanentAnalyzerError(problem, reason="CONTENT_NOT_FOUND")
    return PermanentAnalyzerError(problem, reason="CONTENT_UNREADABLE")


class IngestContent:
    """Reads media bytes from ingest, at most ``max_bytes`` of them per item."""

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
        # Reads waiting for the next batch (bounded by the workers: each waits for one).
        self._waiting: dict[str, tuple[JobSpec, asyncio.Future[bytes | None]]] = {}
        self._calls: set[asyncio.Task[None]] = set()
        self._send_timer: asyncio.Handle | None = None
        # Reads the last call carried: the next one is sent once as many wait.
        self._last_batch = 1
        self._batches_after = 0.0

    async def read(self, spec: JobSpec) -> bytes:
        if (
            spec.size_bytes <= min(BATCHED_ITEM_BYTES, self._max_bytes)
            and time.monotonic() >= self._batches_after
        ):
            content = await self._read_batched(spec)
            if content is not None:
                return content
        return await self._read_streamed(spec)

    async def _read_batched(self, spec: JobSpec) -> bytes | None:
        """The item's bytes from a batch; None when it is to be streamed instead."""
        if spec.content_ref in self._waiting:
            # The same item twice (a retried job beside its old attempt): read it apart.
            return None
        read: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._waiting[spec.content_ref] = (spec, read)
        if len(self._calls) < BATCH_CALLS and (
            self._send_timer is None or len(self._waiting) >= self._last_batch
        ):
            # Sent once the loop has run what is ready now: the other workers' reads of this
            # moment (jobs claimed together start together) go in the same call.
            self._send_soon(asyncio.get_running_loop().call_soon)
        try:
            return await read
        finally:
            # Cancelled before its batch was sent: it is not asked for.
            if self._waiting.get(spec.content_ref, (spec, None))[1] is read:
                del self._waiting[spec.content_ref]

    def _send_soon(self, schedule: Callable[[Callable[[], None]], asyncio.Handle]) -> None:
        """Send the waiting reads when ``schedule`` runs its callback (instead of when a
        send already scheduled would)."""
        if self._send_timer is not None:
            self._send_timer.cancel()
        self._send_timer = schedule(self._send_batch)

    def _send_batch(self) -> None:
        """Start a call for the reads waiting now, as many as one answer takes."""
        self._send_timer = None
        batch: list[tuple[JobSpec, asyncio.Future[bytes | None]]] = []
        size = 0
        for ref, (spec, read) in list(self._waiting.items()):
            if len(batch) == BATCH_IDS or size + spec.size_bytes > BATCH_BYTES:
                break
            del self._waiting[ref]
            batch.append((spec, read))
            size += spec.size_bytes
        if not batch:
            return
        self._last_batch = len(batch)
        call = asyncio.create_task(self._call(batch), name="read-media-contents")
        self._calls.add(call)
        call.add_done_callback(self._call_ended)

    def _call_ended(self, call: asyncio.Task[None]) -> None:
        self._calls.discard(call)
        if not call.cancelled():
            call.exception()  # _call settles every read; nothing else is left to report
        if not self._waiting or len(self._calls) >= BATCH_CALLS or self._send_timer is not None:
            return
        if len(self._waiting) >= self._last_batch:
            self._send_batch()
        else:
            # The jobs whose bytes just came ask for their next ones within a moment: the
            # reads waiting now go with theirs, once as many wait as the last call carried
            # (with 4 workers on SQLite: calls of 4 reads instead of 3 and 1 alternating).
            loop = asyncio.get_running_loop()
            self._send_soon(lambda send: loop.call_later(BATCH_GATHERING, send))

    async def _call(self, batch: list[tuple[JobSpec, asyncio.Future[bytes | None]]]) -> None:
        request = ingest_pb2.ReadMediaContentsRequest(
            media_ids=[spec.content_ref for spec, _ in batch]
        )
        try:
            response = await self._stub.ReadMediaContents(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            failure = exc
            if failure.code() is grpc.StatusCode.UNIMPLEMENTED:
                self._batches_after = time.monotonic() + UNIMPLEMENTED_BACKOFF
                _settle(batch, lambda spec: None)
            else:
                _settle(batch, lambda spec: _read_error(spec, failure))
            return
        except BaseException:
            _settle(batch, lambda spec: None)
            raise
        answers = response.contents
        if len(answers) != len(batch):
            _settle(batch, lambda spec: None)
            return
        for (spec, read), answer in zip(batch, answers, strict=True):
            if read.done():
                continue
            if answer.state == _INCLUDED and len(answer.data) <= self._max_bytes:
                read.set_result(answer.data)
            elif answer.state == _NOT_FOUND:
                read.set_exception(
                    PermanentAnalyzerError(
                        f"reading content of media {spec.media_id}: NOT_FOUND",
                        reason="CONTENT_NOT_FOUND",
                    )
                )
            else:
                read.set_result(None)

    async def _read_streamed(self, spec: JobSpec) -> bytes:
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
            raise _read_error(spec, exc) from exc
        return b"".join(chunks)

    async def close(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
        for call in list(self._calls):
            call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._calls, return_exceptions=True)
        await self._channel.close()


def _settle(
    batch: list[tuple[JobSpec, asyncio.Future[bytes | None]]],
    outcome: Callable[[JobSpec], AnalysisError | None],
) -> None:
    """Give each read of ``batch`` still waiting what ``outcome(spec)`` says: an error to
    raise, or None (stream it)."""
    for spec, read in batch:
        if read.done():
            continue
        error = outcome(spec)
        if error is None:
            read.set_result(None)
        else:
            read.set_exception(error)
