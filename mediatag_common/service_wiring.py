"""What both services' ``create_server`` wire alike, from the settings they share
(:class:`~mediatag_common.service_config.ServiceConfig`): the metrics endpoint, and the gRPC
server listening on the service's port, metered while its metrics are served.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from mediatag_common.auth import MethodRoles, TokenTable
from mediatag_common.grpc_server import ServerLoad, bind, new_server, warn_if_exposed
from mediatag_common.metrics import MetricsServer, ServiceMetrics
from mediatag_common.service_config import ServiceConfig
from mediatag_common.status import StatusCodes


def metrics_server(
    config: ServiceConfig,
    metrics: ServiceMetrics,
    *,
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> MetricsServer:
    """The endpoint of ``metrics`` on ``config.metrics_port`` (doing nothing when it is off)."""
    return MetricsServer(
        metrics,
        name=config.SERVICE,
        host=config.host,
        port=config.metrics_port,
        refresh=refresh,
        refresh_interval=config.metrics_refresh_interval,
    )


def listening_server(
    config: ServiceConfig,
    metrics: MetricsServer,
    *,
    tokens: TokenTable | None,
    method_roles: MethodRoles,
    status_codes: StatusCodes,
) -> tuple[grpc.aio.Server, int]:
    """The service's gRPC server (see :func:`~mediatag_common.grpc_server.new_server`),
    bound to ``config.host:config.port`` with its TLS, and the port bound (the one picked
    when 0 was asked for); ``metrics`` serve its load. Warns if other machines can call it
    unprotected.
    """
    load = ServerLoad(config.request_limits, config.server_limits)
    metrics.expose_load(load)
    server = new_server(
        config.request_limits,
        config.server_limits,
        load=load,
        interceptors=metrics.interceptors,
        tokens=tokens,
        method_roles=method_roles,
        status_codes=status_codes,
    )
    port = bind(server, f"{config.host}:{config.port}", config.tls)
    warn_if_exposed(config.SERVICE, config.host, tokens=tokens, tls=config.tls)
    return server, port
