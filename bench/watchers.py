"""The fan-out benchmark's client: many WatchStatus streams over a few connections.

Every stream reads raw bytes and parses them as ``WatchStatusResponse``, whichever server it
is connected to, and records for each status change its revision, its commit time (the
event's ``event_time``) and the moment it was read here, on the same machine clock.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
from mediatag.analysis.v1 import analysis_pb2

from mediatag_common.grpc_server import channel_options

WATCH_METHOD = "/mediatag.analysis.v1.AnalysisService/WatchStatus"
# Raw change messages kept from the first stream, to replay through the bare server.
_MAX_SAMPLES = 256
_ENDED = -1


class Receipts:
    """One row per status change read by any stream: revision, status, commit and receipt
    times (ns), message size."""

    def __init__(self) -> None:
        self.revisions = array.array("q")
        self.statuses = array.array("b")
        self.committed_ns = array.array("q")
        self.received_ns = array.array("q")
        self.sizes = array.array("q")

    def add(
        self, revision: int, status: int, committed_ns: int, received_ns: int, size: int
    ) -> None:
        self.revisions.append(revision)
        self.statuses.append(status)
        self.committed_ns.append(committed_ns)
        self.received_ns.append(received_ns)
        self.sizes.append(size)


class WatcherPool:
    """``count`` WatchStatus streams (all events, from now) spread over ``channels``."""

    def __init__(self, address: str, *, count: int, channels: int) -> None:
        # A local subchannel pool per channel: otherwise gRPC shares one connection among
        # channels with equal arguments, and every stream would ride one HTTP/2 connection.
        options = [*channel_options(), ("grpc.use_local_subchannel_pool", 1)]
        self._channels = [
            grpc.aio.insecure_channel(address, options=options) for _ in range(channels)
        ]
        self._count = count
        self._request = analysis_pb2.WatchStatusRequest().SerializeToString()
        self.receipts = Receipts()
        self.samples: list[bytes] = []
        self.ended: collections.Counter[str] = collections.Counter()
        self._last_revision = [0] * count
        self._opened = 0
        self._settled_count = 0
        self._settled = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Streams that have yet to read revision ``_target`` (see ``wait_for_revision``).
        self._target = 0
        self._behind: set[int] = set()
        self._caught_up = asyncio.Event()

    async def open(self) -> None:
        """Start every stream; return once each has its response headers."""
        for index in range(self._count):
            channel = self._channels[index % len(self._channels)]
            self._tasks.append(asyncio.create_task(self._stream(index, channel)))
        await self._settled.wait()
        if self._opened < self._count:
            raise RuntimeError(
                f"only {self._opened} of {self._count} watch streams opened: {dict(self.ended)}"
            )

    async def wait_for_revision(self, revision: int) -> None:
        """Return once every stream still open has read ``revision``."""
        self._target = revision
        self._behind = {
            index
            for index, last in enumerate(self._last_revision)
            if last != _ENDED and last < revision
        }
        self._caught_up.clear()
        if self._behind:
            await self._caught_up.wait()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels:
            await channel.close()

    async def _stream(self, index: int, channel: grpc.aio.Channel) -> None:
        # No (de)serialisers: the request goes as bytes and responses come back as bytes.
        watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(WATCH_METHOD)
        call = watch(self._request, wait_for_ready=True)
        opened = False
        try:
            await call.initial_metadata()
            if not call.done():
                opened = True
                self._opened += 1
                self._settle_one()
            async for raw in call:
                self._read(index, raw, time.time_ns())
            self._end(index, "OK")
        except grpc.aio.AioRpcError as error:
            self._end(index, error.code().name)
        finally:
            call.cancel()
            if not opened:
                self._settle_one()

    def _read(self, index: int, raw: bytes, received_ns: int) -> None:
        response = analysis_pb2.WatchStatusResponse.FromString(raw)
        self._last_revision[index] = response.revision
        if response.HasField("change"):
            change = response.change
            committed_ns = change.event_time.ToNanoseconds()
            self.receipts.add(response.revision, change.status, committed_ns, received_ns, len(raw))
            if index == 0 and len(self.samples) < _MAX_SAMPLES:
                self.samples.append(raw)
        if self._behind and response.revision >= self._target:
            self._stop_waiting_for(index)

    def _end(self, index: int, code: str) -> None:
        self._last_revision[index] = _ENDED
        self.ended[code] += 1
        self._stop_waiting_for(index)

    def _stop_waiting_for(self, index: int) -> None:
        if index in self._behind:
            self._behind.discard(index)
            if not self._behind:
                self._caught_up.set()

    def _settle_one(self) -> None:
        """Count one stream as open or failed; the last one releases ``open``."""
        self._settled_count += 1
        if self._settled_count >= self._count:
            self._settled.set()


@contextlib.asynccontextmanager
async def watching(
    address: str, *, count: int, channels: int, open_timeout: float
) -> AsyncIterator[WatcherPool]:
    """``count`` open streams to ``address`` for the length of the block."""
    pool = WatcherPool(address, count=count, channels=channels)
    try:
        async with asyncio.timeout(open_timeout):
            await pool.open()
        yield pool
    finally:
        await pool.close()
