"""What the bare baseline servers share: health, a port, and running until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# In-flight calls get this long when the benchmark stops a baseline server.
STOP_GRACE = 2.0


async def serve_until_signal(server: grpc.aio.Server, port: int, banner: str) -> None:
    """Serve health and ``server``'s handlers on 127.0.0.1:``port`` until told to stop.

    ``banner`` is printed once the server answers health checks with SERVING.
    """
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")

    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(banner, flush=True)
    try:
        await stop_requested.wait()
    finally:
        await server.stop(STOP_GRACE)
