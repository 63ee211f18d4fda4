"""``mediatag serve``: run the ingest service, the analysis service and the web gateway in one
process (one event loop), or one of them."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2

from mediatag_cli.settings import ServeSettings
from mediatag_common.database import DatabaseError
from mediatag_common.errors import ServiceError
from mediatag_common.grpc_server import (
    Host,
    ServiceHost,
    health_check_stub,
    open_channel,
    serve_until_signal,
)
from mediatag_common.service_config import connect_address
from mediatag_common.tls import ClientTls

if TYPE_CHECKING:
    from web_gateway.server import WebHost

logger = logging.getLogger(__name__)

# How long one readiness probe waits before it is repeated (start-up may run migrations).
_PROBE_TIMEOUT = 10.0
_PROBE_PAUSE = 0.2


@dataclass(frozen=True)
class _Service:
    """A created (not yet started) service and where it listens."""

    name: str
    host: ServiceHost
    bind_host: str
    port: int
    data_dir: Path
    # How the readiness probe reaches a TLS port: the CA and certificate the service uses
    # for its peer (the same CA signs both services in the README's set-up).
    probe_tls: ClientTls | None = None

    @property
    def bound(self) -> str:
        return f"{self.bind_host}:{self.port}"


async def serve(settings: ServeSettings) -> int:
    """Start the configured services, run until SIGINT/SIGTERM, drain; the exit status."""
    # Imported here so that the client commands never load server code.
    from ingest_service.domain.webhook_endpoints import WebhooksFileError

    try:
        services = await _create(settings)
        web = await _create_web(settings)
    except (OSError, RuntimeError, DatabaseError, ServiceError) as error:
        # Port taken, data dir not writable, database unreachable, no credentials for the
        # blob store: say so without a traceback.
        logger.error("cannot start: %s", error, exc_info=logger.isEnabledFor(logging.DEBUG))
        return 1
    except WebhooksFileError as error:
        # Its message names the file and what is wrong with it.
        logger.error("cannot start: webhooks file %s", error)
        return 1
    announcements = [asyncio.create_task(_announce_when_serving(s)) for s in services]
    hosts: list[Host] = [s.host for s in services]
    if web is not None:
        announcements.append(asyncio.create_task(_announce_web(web)))
        hosts.append(web)
    try:
        await serve_until_signal(hosts, settings.grace_period)
    except (DatabaseError, OSError) as error:
        # OSError: a metrics port is taken (bound when its service starts).
        logger.error("cannot serve: %s", error, exc_info=logger.isEnabledFor(logging.DEBUG))
        return 1
    finally:
        for task in announcements:
            task.cancel()
        await asyncio.gather(*announcements, return_exceptions=True)
    return 0


async def _create(settings: ServeSettings) -> list[_Service]:
    # Imported here so that the client commands never load server code.
    services: list[_Service] = []
    if settings.ingest is not None:
        from ingest_service.server import create_server as create_ingest_server

        host, port = await create_ingest_server(settings.ingest)
        ingest = settings.ingest
        probe_tls = (ingest.peer_tls or ClientTls()) if ingest.tls else None
        services.append(_Service("ingest", host, ingest.host, port, ingest.data_dir, probe_tls))
    if settings.analysis is not None:
        from analysis_service.server import create_server as create_analysis_server

        host, port = await create_analysis_server(settings.analysis)
        analysis = settings.analysis
        probe_tls = (analysis.peer_tls or ClientTls()) if analysis.tls else None
        services.append(
            _Service("analysis", host, analysis.host, port, analysis.data_dir, probe_tls)
        )
    return services


async def _create_web(settings: ServeSettings) -> WebHost | None:
    if settings.web is None:
        return None
    from web_gateway.server import create_server as create_web_server

    host, _ = await create_web_server(settings.web)
    return host


async def _announce_web(web: WebHost) -> None:
    """Print ``web gateway listening on URL`` once it takes requests (stdout, as the others)."""
    await web.serving.wait()
    print(f"web gateway listening on {web.url}", flush=True)


async def _announce_when_serving(service: _Service) -> None:
    """Print ``<name> service listening on HOST:PORT`` once the service answers health checks.

    Printed on stdout, whatever the log settings, so scripts can wait for it.
    """
    address = connect_address(service.bind_host, service.port)
    async with open_channel(address, tls=service.probe_tls) as channel:
        check = health_check_stub(channel)
        while True:
            try:
                await check(
                    health_pb2.HealthCheckRequest(), timeout=_PROBE_TIMEOUT, wait_for_ready=True
                )
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(_PROBE_PAUSE)
    print(
        f"{service.name} service listening on {service.bound} (data in {service.data_dir})",
        flush=True,
    )
