"""Prometheus plumbing both services share: a registry per service with its gRPC request
metrics (:class:`ServiceMetrics`), its ``/metrics`` endpoint, and the periodic refresh of
values that live in the database (:class:`MetricsServer`).

``mediatag serve`` runs both services in one process, so each service has its own registry
and its own HTTP server, never prometheus_client's global default registry.

Scrapes run on the HTTP server's thread: collectors and gauge callbacks read plain Python
numbers only. What needs the database is refreshed on the service's event loop by
:class:`MetricsServer`'s refresh task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from mediatag_common.interceptors import Behavior, BehaviorInterceptor
from mediatag_common.tasks import cancel_and_wait

logger = logging.getLogger(__name__)


# Seconds; unary calls take milliseconds, watch streams hours (they land in +Inf).
GRPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)


def _new_registry() -> CollectorRegistry:
    """A service's own registry, with the process, platform and GC metrics of this process."""
    registry = CollectorRegistry()
    # The same process-wide collectors serve every registry: each endpoint describes the
    # process that runs its service.
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


class GrpcServerMetrics:
    """Calls started and handled by method and final status code, and how long they took."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "mediatag_grpc_server_started_total",
            "gRPC calls started on the server.",
            ["grpc_service", "grpc_method", "grpc_type"],
            registry=registry,
        )
        self.handled = Counter(
            "mediatag_grpc_server_handled_total",
            "gRPC calls completed on the server, by status code.",
            ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "mediatag_grpc_server_handling_seconds",
            "Time from the start of a gRPC call to its status (streams: the whole stream).",
            ["grpc_service", "grpc_method", "grpc_type"],
            buckets=GRPC_BUCKETS,
            registry=registry,
        )

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return MetricsInterceptor(self)


class ServiceMetrics:
    """What every service's metrics start from: its own registry and its gRPC call metrics."""

    def __init__(self) -> None:
        self.registry = _new_registry()
        self.grpc = GrpcServerMetrics(self.registry)


class ServerLoadReadings(Protocol):
    """How much of its bounds a gRPC server's calls take now
    (:class:`~mediatag_common.grpc_server.ServerLoad`)."""

    def calls_in_progress(self) -> int: ...

    def request_bytes_held(self) -> int: ...

    def requests_waiting(self) -> int: ...


class _ServerLoadValues:
    """Reads a server's load on the scrape thread: plain numbers the event loop keeps."""

    def __init__(self, readings: ServerLoadReadings) -> None:
        self._readings = readings

    def collect(self) -> Iterable[Metric]:
        read = self._readings
        yield GaugeMetricFamily(
            "mediatag_grpc_server_calls_in_progress",
            "gRPC calls in progress, streams included (bounded by --max-calls).",
            value=read.calls_in_progress(),
        )
        yield GaugeMetricFamily(
            "mediatag_request_memory_bytes",
            "Request memory held: messages read and not yet answered, and a message being "
            "read counted as the largest allowed (bounded by --ingest-request-memory, "
            "--analysis-request-memory).",
            value=read.request_bytes_held(),
        )
        yield GaugeMetricFamily(
            "mediatag_requests_waiting",
            "gRPC calls waiting for request memory (bounded by --max-waiting-requests).",
            value=read.requests_waiting(),
        )


_CALL_TYPES = {
    "unary_unary": "unary",
    "unary_stream": "server_stream",
    "stream_unary": "client_stream",
    "stream_stream": "bidi_stream",
}


def _final_code(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    """The status a call ends with, as the client sees it."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    code = context.code()
    if code is not None:
        # Set by context.abort() (AbortError) or context.set_code().
        return code.name
    # grpc answers an exception that escapes the handler with UNKNOWN.
    return "OK" if error is None else "UNKNOWN"


class _Call:
    """The metrics of one call: counted as started now, as handled by ``finish``."""

    def __init__(self, metrics: GrpcServerMetrics, method: str, call_type: str) -> None:
        service, _, name = method.lstrip("/").rpartition("/")
        self._labels = (service, name, call_type)
        self._metrics = metrics
        self._start = time.perf_counter()
        metrics.started.labels(*self._labels).inc()

    def finish(
        self, context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None
    ) -> None:
        self._metrics.handled.labels(*self._labels, _final_code(context, error)).inc()
        self._metrics.handling_seconds.labels(*self._labels).observe(
            time.perf_counter() - self._start
        )


class MetricsInterceptor(BehaviorInterceptor):
    """Counts every call of a known method with its final status code.

    Install it before :class:`mediatag_common.errors.ErrorMappingInterceptor` (outermost), so
    that it sees the status that interceptor sets for a refusal. Unknown methods are not
    counted: their names come from the client.
    """

    def __init__(self, metrics: GrpcServerMetrics) -> None:
        self._metrics = metrics

    def wrap_unary(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        return self._wrap_unary(method, _CALL_TYPES[kind], behavior)

    def wrap_stream(self, method: str, kind: str, behavior: Behavior) -> Behavior:
        return self._wrap_stream(method, _CALL_TYPES[kind], behavior)

    def _wrap_unary(self, method: str, call_type: str, behavior: Behavior) -> Behavior:
        metrics = self._metrics

        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = _Call(metrics, method, call_type)
            try:
                response = await behavior(request, context)
            except BaseException as error:
                call.finish(context, error)
                raise
            call.finish(context, None)
            return response

        return wrapper

    def _wrap_stream(self, method: str, call_type: str, behavior: Behavior) -> Behavior:
        metrics = self._metrics

        async def wrapper(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            call = _Call(metrics, method, call_type)
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as error:
                # Re-raised untouched, CancelledError included (grpc/grpc#43360).
                call.finish(context, error)
                raise
            call.finish(context, None)

        return wrapper


class MetricsServer:
    """Serves a service's metrics at ``http://host:port/metrics`` while the service runs.

    With ``port`` None the metrics are off: nothing is served and gRPC calls are not
    metered. ``refresh`` (if given) runs on the event loop every ``refresh_interval``
    seconds while serving, to bring values that need the database up to date.
    """

    def __init__(
        self,
        metrics: ServiceMetrics,
        *,
        name: str,
        host: str,
        port: int | None,
        refresh: Callable[[], Awaitable[None]] | None = None,
        refresh_interval: float = 5.0,
    ) -> None:
        self.registry = metrics.registry
        self._grpc = metrics.grpc
        self._name = name
        self._host = host
        self._requested_port = port
        self._refresh = refresh
        self._refresh_interval = refresh_interval
        self._http: WSGIServer | None = None
        self._refresh_task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int | None:
        """The bound port while serving (the one picked when 0 was asked for)."""
        return self._http.server_port if self._http is not None else None

    def expose_load(self, readings: ServerLoadReadings) -> None:
        """Serve the load of the service's gRPC server, read at scrape time."""
        self.registry.register(_ServerLoadValues(readings))

    @property
    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """What the service's gRPC server installs: the call metrics, unless metrics are off."""
        return [] if self._requested_port is None else [self._grpc.interceptor()]

    def start(self) -> int | None:
        """Bind and serve on a daemon thread; returns the bound port (None: metrics off).

        Raises OSError (e.g. the port is taken) with the address in its message.
        """
        if self._requested_port is None:
            return None
        try:
            self._http, _ = start_http_server(
                self._requested_port, addr=self._host, registry=self.registry
            )
        except OSError as error:
            raise OSError(
                error.errno,
                f"cannot serve {self._name} metrics on {self._host}:{self._requested_port}: "
                f"{error.strerror or error}",
            ) from error
        if self._refresh is not None:
            self._refresh_task = asyncio.create_task(
                self._refresh_loop(self._refresh), name=f"{self._name}-metrics-refresh"
            )
        logger.info(
            "%s metrics on http://%s:%d/metrics", self._name, self._host, self._http.server_port
        )
        return self._http.server_port

    async def stop(self) -> None:
        """Stop refreshing and serving, and free the port; safe to call twice."""
        await cancel_and_wait(self._refresh_task)
        self._refresh_task = None
        http, self._http = self._http, None
        if http is not None:
            # shutdown() waits for serve_forever's poll loop (up to 0.5 s): not on the loop.
            await asyncio.to_thread(http.shutdown)
            http.server_close()

    async def _refresh_loop(self, refresh: Callable[[], Awaitable[None]]) -> None:
        failing = False
        while True:
            try:
                await refresh()
                failing = False
            except Exception as error:
                # The database may be away; health reports that. Say it once, keep trying.
                if not failing:
                    logger.warning("%s metrics not refreshed: %s", self._name, error)
                failing = True
            await asyncio.sleep(self._refresh_interval)
