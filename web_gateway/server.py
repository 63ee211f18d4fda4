"""Wiring of the web gateway: ``create_server(config) -> (host, port)``.

aiohttp serves it: its server is built to run inside an event loop someone else owns (an
``AppRunner`` started and cleaned up by the caller, here :class:`WebHost`, in the same loop
as the gRPC services of ``mediatag serve``), it streams responses (Server-Sent Events, file
content) and multipart requests part by part, and its client speaks HTTP for the tests.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import ssl

from aiohttp import web

from mediatag_common.auth import load_tokens
from mediatag_common.caller_slots import CallerSlots
from web_gateway.api.app import create_app
from web_gateway.api.callers import Callers
from web_gateway.api.connections import BoundedSockSite
from web_gateway.api.context import Gateway
from web_gateway.config import WebConfig
from web_gateway.domain.sessions import SessionStore
from web_gateway.domain.throughput import Throughput, ThroughputRecorder
from web_gateway.domain.watches import SharedWatches
from web_gateway.upstream import Upstream

logger = logging.getLogger(__name__)

_MAX_REQUEST_LINE = 64 * 1024


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0 picks a port), so the port is known and a
    taken one reported before anything starts."""
    bare = host.strip("[]")
    family = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((bare, port), family=family)


def _ssl_context(config: WebConfig) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    return context


class WebHost:
    """The gateway's HTTP server and background work, started and stopped together."""

    name = "web"

    def __init__(
        self,
        *,
        runner: web.AppRunner,
        sock: socket.socket,
        ssl_context: ssl.SSLContext | None,
        gateway: Gateway,
        recorder: ThroughputRecorder,
    ) -> None:
        self._runner = runner
        self._sock = sock
        self._port: int = sock.getsockname()[1]
        self._ssl_context = ssl_context
        self._gateway = gateway
        self._recorder = recorder
        self._stopped = False
        # Set once the gateway takes requests.
        self.serving = asyncio.Event()

    @property
    def gateway(self) -> Gateway:
        return self._gateway

    async def start(self) -> None:
        self._recorder.start()
        site = BoundedSockSite(
            self._runner,
            self._sock,
            ssl_context=self._ssl_context,
            max_connections=self._gateway.config.connection_bound,
            handshake_timeout=self._gateway.config.handshake_timeout,
        )
        await site.start()
        config = self._gateway.config
        logger.info(
            "web gateway on %s for ingest %s and analysis %s",
            self.url,
            config.ingest_address,
            config.analysis_address,
        )
        self.serving.set()

    @property
    def url(self) -> str:
        """Where the gateway is bound (a wildcard host as bound, not as reached)."""
        host = self._gateway.config.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{host}:{self._port}"

    async def stop(self, grace: float) -> None:
        """End the event streams, let other requests finish within ``grace``; safe twice."""
        if self._stopped:
            return
        self._stopped = True
        await self._recorder.stop()
        await self._gateway.watches.close()
        await self._runner.cleanup()
        await self._gateway.upstream.close()
        logger.info("web gateway stopped")


async def create_server(config: WebConfig) -> tuple[WebHost, int]:
    """Build the gateway bound to ``config.host:config.port`` (0 picks a port).

    Nothing runs until the returned host is started; the services need not be up.
    """
    tokens = load_tokens(config.tokens_file) if config.tokens_file is not None else None
    upstream = Upstream(config)
    watches = SharedWatches(upstream, config.events)
    throughput = Throughput()
    gateway = Gateway(
        config=config,
        upstream=upstream,
        watches=watches,
        callers=Callers(
            tokens=tokens,
            sessions=SessionStore(config.sessions),
            open_csrf_token=secrets.token_urlsafe(32),
        ),
        throughput=throughput,
        uploads=CallerSlots(
            clients=config.max_concurrent_uploads,
            per_caller=config.max_uploads_per_caller,
            per_service=config.max_concurrent_uploads,
        ),
    )
    ssl_context = _ssl_context(config)
    sock = _listen(config.host, config.port)
    port: int = sock.getsockname()[1]
    runner = web.AppRunner(
        create_app(gateway),
        access_log=None,
        shutdown_timeout=config.grace_period,
        # A request line long enough for an event filter of 1000 media ids.
        max_line_size=_MAX_REQUEST_LINE,
        # Runs from the connection's start and from each response's end until the next
        # request's headers are in: an idle connection, and one that sends its headers slowly
        # or never, gives its place back.
        keepalive_timeout=config.keepalive_timeout,
        # A client that goes away cancels its handler: an event stream frees its place at
        # once, an upload cancels its call (ingest then keeps nothing of it).
        handler_cancellation=True,
    )
    await runner.setup()
    host = WebHost(
        runner=runner,
        sock=sock,
        ssl_context=ssl_context,
        gateway=gateway,
        recorder=ThroughputRecorder(watches, throughput, config.events.keepalive_interval),
    )
    return host, port
