"""The baseline of the fan-out benchmark: a bare grpc.aio server that broadcasts to streams.

It serves ``/mediatag.analysis.v1.AnalysisService/WatchStatus`` as a server-streaming
method with bytes in and out, so the benchmark's watchers reach it exactly as they reach
mediatag. Each open stream has its own ``asyncio.Queue``; a broadcast puts one serialised
message into every queue, and each stream's handler yields what its queue holds. A stream
that falls ``--stream-buffer`` messages behind is ended with RESOURCE_EXHAUSTED, as
mediatag ends a slow watcher. Nothing else: no database, filters, conversion or interceptor.

The benchmark drives it through ``/bench.BareBroadcast/Broadcast`` (unary, JSON): send
``rate`` messages per second for ``seconds``, cycling through ``templates`` (serialised
WatchStatusResponses recorded from mediatag, base64), each re-stamped with the next revision
and, as its event time, the moment it is broadcast. They go evenly spaced, or, given
``offsets`` (seconds from the start, ascending), at those moments, the schedule repeated as
often as ``seconds`` needs. The answer is the last
revision sent. It serves the standard health service, so it is started and awaited exactly
like ``mediatag serve``.

Run: ``python -m bench.bare_broadcast --port PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from mediatag.analysis.v1 import analysis_pb2

from bench.bare import serve_until_signal
from mediatag_common.grpc_server import KEEPALIVE_OPTIONS

WATCH_SERVICE = analysis_pb2.DESCRIPTOR.services_by_name["AnalysisService"].full_name
CONTROL_SERVICE = "bench.BareBroadcast"
BROADCAST_METHOD = f"/{CONTROL_SERVICE}/Broadcast"
# Tells a stream's handler that it fell too far behind (no real message is empty).
_TOO_SLOW = b""

Context = grpc.aio.ServicerContext[Any, Any]


class Broadcaster:
    """The open streams and the broadcasts to them."""

    def __init__(self, stream_buffer: int) -> None:
        self._stream_buffer = stream_buffer
        self._queues: set[asyncio.Queue[bytes]] = set()
        self._revision = 0

    async def watch(self, request: bytes, context: Context) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._queues.add(queue)
        try:
            # Headers at once, as mediatag does, so the client knows the stream is open.
            await context.send_initial_metadata(())
            while True:
                message = await queue.get()
                if message == _TOO_SLOW:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"stream fell {self._stream_buffer} messages behind",
                    )
                yield message
        finally:
            # A cancelled call (client gone) propagates CancelledError: nothing swallows it.
            self._queues.discard(queue)

    def broadcast(self, message: bytes) -> None:
        for queue in list(self._queues):
            if queue.qsize() < self._stream_buffer:
                queue.put_nowait(message)
                continue
            # Like mediatag: drop what is buffered and end the stream at its next read.
            self._queues.discard(queue)
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(_TOO_SLOW)

    async def run_broadcasts(self, request: bytes, context: Context) -> bytes:
        """The control method: broadcast as asked, then answer the last revision sent."""
        order = json.loads(request)
        rate, seconds = float(order["rate"]), float(order["seconds"])
        offsets = [float(offset) for offset in order.get("offsets", ())]
        # A repeated schedule starts again one average interval after its last message.
        span = offsets[-1] + 1 / rate if offsets else 0.0
        templates = [
            analysis_pb2.WatchStatusResponse.FromString(base64.b64decode(text))
            for text in order["templates"]
        ]
        count = max(1, round(rate * seconds))
        started = time.monotonic()
        for number in range(count):
            # Send on a fixed schedule: a late tick is sent at once, not pushed back.
            if offsets:
                rounds, index = divmod(number, len(offsets))
                due = rounds * span + offsets[index]
            else:
                due = number / rate
            delay = started + due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self._revision += 1
            message = templates[number % len(templates)]
            message.revision = self._revision
            message.change.event_time.FromNanoseconds(time.time_ns())
            self.broadcast(message.SerializeToString())
        return json.dumps({"last_revision": self._revision}).encode()


def _identity(data: bytes) -> bytes:
    return data


async def serve(port: int, stream_buffer: int) -> None:
    """Serve until SIGINT or SIGTERM."""
    broadcaster = Broadcaster(stream_buffer)
    # Same keepalive settings as mediatag's servers, so idle streams cost the same pings.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *KEEPALIVE_OPTIONS])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                WATCH_SERVICE,
                {
                    "WatchStatus": grpc.unary_stream_rpc_method_handler(
                        broadcaster.watch,
                        request_deserializer=_identity,
                        response_serializer=_identity,
                    )
                },
            ),
            grpc.method_handlers_generic_handler(
                CONTROL_SERVICE,
                {
                    "Broadcast": grpc.unary_unary_rpc_method_handler(
                        broadcaster.run_broadcasts,
                        request_deserializer=_identity,
                        response_serializer=_identity,
                    )
                },
            ),
        ]
    )
    await serve_until_signal(server, port, f"bare broadcaster listening on 127.0.0.1:{port}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_broadcast", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stream-buffer", type=int, default=1024)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.stream_buffer))


if __name__ == "__main__":
    main()
