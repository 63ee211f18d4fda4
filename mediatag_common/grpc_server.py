"""What both services' servers share: options, health, reflection, start/drain/stop."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mediatag_common.auth import AuthInterceptor, MethodRoles, TokenTable, token_interceptors
from mediatag_common.call_gate import CallGate
from mediatag_common.request_bodies import RequestGate, RequestLimits, RequestReader
from mediatag_common.status import ErrorMappingInterceptor, StatusCodes
from mediatag_common.tasks import cancel_and_wait
from mediatag_common.tls import ClientTls, ServerTls

logger = logging.getLogger(__name__)

# Long-lived watch streams sit idle for hours: let clients ping, and ping them so dead
# peers are noticed, without the server sending GOAWAY for "too many pings".
KEEPALIVE_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(frozen=True)
class ServerLimits:
    """How many connections and calls a server holds, and how long a connection may hold a
    place doing nothing.

    Beyond ``max_connections`` a new connection is closed as soon as it is accepted (its
    client's calls fail ``UNAVAILABLE``); a connection that has not finished its handshake
    (the HTTP/2 preface, TLS) within ``handshake_timeout`` seconds is closed, and so is one
    that has had no call for ``idle_timeout`` seconds (a GOAWAY: its client reconnects for
    its next call). Beyond ``max_calls`` calls in progress (streams included), a new one is
    refused (:class:`~mediatag_common.call_gate.CallGate`); gRPC's own health and reflection
    streams are bounded apart, ``max_health_streams`` in all and ``max_health_streams_per_peer``
    of one peer address (None: a tenth of them).
    """

    max_connections: int
    handshake_timeout: float
    idle_timeout: float
    max_calls: int
    max_health_streams: int = 100
    max_health_streams_per_peer: int | None = None


class ServerLoad:
    """The bounds a server holds its calls within, and how much of each they take now (read
    by the metrics at scrape time: plain numbers, no asyncio)."""

    def __init__(self, limits: RequestLimits, server_limits: ServerLimits) -> None:
        self.gate = CallGate(
            server_limits.max_calls,
            max_health_streams=server_limits.max_health_streams,
            max_health_streams_per_peer=server_limits.max_health_streams_per_peer,
        )
        self.reader = RequestReader(limits)

    def calls_in_progress(self) -> int:
        return self.gate.in_progress

    def request_bytes_held(self) -> int:
        return self.reader.budget.used

    def requests_waiting(self) -> int:
        return self.reader.budget.waiting_calls


def new_server(
    limits: RequestLimits,
    server_limits: ServerLimits,
    *,
    load: ServerLoad | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    tokens: TokenTable | None = None,
    method_roles: MethodRoles | None = None,
    status_codes: StatusCodes | None = None,
) -> grpc.aio.Server:
    """A grpc.aio server with our error mapping and message size limits.

    ``status_codes`` gives the service's error classes their codes (beside
    :data:`mediatag_common.status.STATUS_CODES`, which covers the shared ones).

    ``interceptors`` run outside the error mapping, so they see the status it sets
    (the metrics interceptor goes there). With ``tokens``, every call but health and
    reflection is authenticated and checked against ``method_roles``, inside the error
    mapping so that its refusals carry AIP-193 details. A request message is read only after
    that, within ``limits`` (see :mod:`mediatag_common.request_bodies`). Connections and calls
    are held within ``server_limits``; ``load`` (made from both when not given) keeps count.
    """
    load = load or ServerLoad(limits, server_limits)
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        # Without this, a second process binds a port already in use and splits its traffic.
        ("grpc.so_reuseport", 0),
        # With bandwidth probing, gRPC announces a 4 MiB window per stream from the first
        # SETTINGS and widens it with its estimate (8 MiB seen): every call not yet
        # authenticated or admitted could make us buffer that much of its body (about 10 MiB
        # a call seen). Without it a stream's window is the one we set, opened by the size of
        # each message we ask to read.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", limits.stream_window),
        # Each connection holds a file descriptor and its buffers, whoever opened it.
        ("grpc.max_allowed_incoming_connections", server_limits.max_connections),
        ("grpc.server_handshake_timeout_ms", round(server_limits.handshake_timeout * 1000)),
        ("grpc.max_connection_idle_ms", round(server_limits.idle_timeout * 1000)),
        *KEEPALIVE_OPTIONS,
    ]
    chain: list[grpc.aio.ServerInterceptor] = [
        RequestGate(),
        *interceptors,
        ErrorMappingInterceptor(status_codes or {}),
        load.gate,
    ]
    if tokens is not None:
        chain.append(AuthInterceptor(tokens, method_roles or {}))
    chain.append(load.reader)
    return grpc.aio.server(interceptors=chain, options=options)


def bind(server: grpc.aio.Server, address: str, tls: ServerTls | None) -> int:
    """Listen on ``address`` in plaintext, or with TLS; the port bound."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.credentials())


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the port on this machine."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(
    name: str, host: str, *, tokens: TokenTable | None, tls: ServerTls | None
) -> None:
    """Log what is unprotected on an address other machines can reach."""
    if is_loopback(host):
        return
    if tokens is None:
        logger.warning(
            "%s service binds %s without authentication: anyone who reaches it may call it",
            name,
            host,
        )
    elif tls is None:
        logger.warning(
            "%s service binds %s without TLS: bearer tokens cross the network in clear text",
            name,
            host,
        )


def open_channel(
    address: str,
    *,
    options: Sequence[tuple[str, Any]] | None = None,
    tls: ClientTls | None = None,
    token: str | None = None,
) -> grpc.aio.Channel:
    """A channel to ``address``: plaintext or TLS, sending ``token`` as a bearer token."""
    opts = list(channel_options() if options is None else options)
    interceptors = token_interceptors(token)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)
    return grpc.aio.secure_channel(
        address, tls.credentials(), options=opts, interceptors=interceptors
    )


def channel_options(max_message_bytes: int = 64 * 1024 * 1024) -> list[tuple[str, Any]]:
    """Client channel options matching the servers' (keepalive for idle streams)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC's default backoff grows to 120 s between reconnects: a peer back from a
        # restart would go unused for up to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


def health_check_stub(
    channel: grpc.aio.Channel,
) -> grpc.aio.UnaryUnaryMultiCallable[
    health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
]:
    """``grpc.health.v1.Health/Check`` on ``channel``.

    Called by name because the typing stubs of grpc_health's ``HealthStub`` have no methods.
    """
    return channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )


class ServiceHost:
    """A gRPC server and the background work of its service, started and stopped together.

    Health and reflection are always on. ``stop`` drains: health goes NOT_SERVING, new
    calls are refused, in-flight calls get ``grace`` seconds, then background work stops.
    """

    def __init__(
        self,
        *,
        name: str,
        server: grpc.aio.Server,
        service_names: Sequence[str],
        on_start: Callable[[], Awaitable[None]],
        on_drain: Callable[[float], Awaitable[None]],
        on_stop: Callable[[], Awaitable[None]],
        is_healthy: Callable[[], Awaitable[bool]],
        health_interval: float = 5.0,
    ) -> None:
        self.name = name
        self.server = server
        self.health = health.aio.HealthServicer()
        self._service_names = list(service_names)
        self._on_start = on_start
        self._on_drain = on_drain
        self._on_stop = on_stop
        self._is_healthy = is_healthy
        self._health_interval = health_interval
        self._health_task: asyncio.Task[None] | None = None
        self._serving: bool | None = None
        self._stopped = False
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )

    async def set_serving(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ["", *self._service_names]:
            await self.health.set(service, status)

    async def start(self) -> None:
        await self._on_start()
        await self.server.start()
        await self.set_serving(True)
        self._health_task = asyncio.create_task(self._watch_health(), name=f"{self.name}-health")

    async def _watch_health(self) -> None:
        """NOT_SERVING while the service's dependencies (its database) are unreachable."""
        while True:
            await asyncio.sleep(self._health_interval)
            healthy = await self._is_healthy()
            if healthy != self._serving:
                logger.warning(
                    "%s service is %s", self.name, "SERVING" if healthy else "NOT_SERVING"
                )
            await self.set_serving(healthy)

    async def stop(self, grace: float) -> None:
        """Drain and stop; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        await cancel_and_wait(self._health_task)
        await self.set_serving(False)
        # Drain first (ends watch streams, lets workers finish), then stop the server so
        # in-flight unary calls complete within the grace period.
        await asyncio.gather(self._on_drain(grace), self.server.stop(grace))
        await self._on_stop()
        logger.info("%s service stopped", self.name)


class Host(Protocol):
    """Something ``mediatag serve`` starts and drains: a service, or the web gateway."""

    async def start(self) -> None: ...

    async def stop(self, grace: float) -> None: ...


async def serve_until_signal(hosts: Sequence[Host], grace: float) -> None:
    """Start every host, run until SIGINT or SIGTERM, then drain and stop them all."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    started: list[Host] = []
    try:
        for host in hosts:
            await host.start()
            started.append(host)
        await stop_requested.wait()
        logger.info("shutting down (grace period %.0f s)", grace)
    finally:
        await asyncio.gather(*(host.stop(grace) for host in started))
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
