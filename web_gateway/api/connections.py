"""A bound on the connections the gateway holds: the listener counts them, from the moment one
is accepted (before TLS) until it is closed, and answers one beyond the bound with
``503 UNAVAILABLE``/``TOO_MANY_CONNECTIONS`` and closes it.

aiohttp has no such bound; its sites are where a listener is made, so the gateway listens
through a site of its own whose protocol factory does the counting.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import weakref
from collections.abc import Callable

from aiohttp import web
from google.rpc import code_pb2
from yarl import URL

from web_gateway.api.errors import body, http_status
from web_gateway.errors import Refusal

_REFUSAL = Refusal.of(
    code_pb2.UNAVAILABLE,
    "TOO_MANY_CONNECTIONS",
    "the web gateway holds as many connections as it may; try again shortly",
)


def _refusal_response() -> bytes:
    content = body(_REFUSAL)
    head = (
        f"HTTP/1.1 {http_status(_REFUSAL)} Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(content)}\r\n"
        "Cache-Control: no-store\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + content


class _Refusing(asyncio.Protocol):
    """Answers the refusal as soon as the connection is made (after TLS), then closes it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_refusal_response())
        transport.close()


class _Counted(asyncio.Protocol):
    """The request handler of one connection, and its place in the count.

    The place is given back when the connection is lost. A TLS connection whose handshake
    fails or times out is never made, nor lost: its place is given back once the handshake's
    time is up, or when the protocol is dropped, if that comes first (asyncio keeps it in a
    reference cycle until the garbage collector runs).
    """

    def __init__(self, handler: asyncio.Protocol, give_back: Callable[[], None]) -> None:
        self._handler = handler
        self._give_back = weakref.finalize(self, give_back)
        self._made = False

    def give_back_unless_made(self) -> None:
        if not self._made:
            self._give_back()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._made = True
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._give_back()
        self._handler.connection_lost(exc)


class BoundedSockSite(web.BaseSite):
    """An aiohttp site listening on ``sock`` that holds at most ``max_connections``; a TLS
    handshake not done within ``handshake_timeout`` seconds ends its connection."""

    __slots__ = ("_handshake_timeout", "_max_connections", "_open", "_sock")

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        handshake_timeout: float,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._sock = sock
        self._max_connections = max_connections
        self._handshake_timeout = handshake_timeout
        self._open = 0

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        host, port = self._sock.getsockname()[:2]
        return str(URL.build(scheme=scheme, host=host, port=port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None

        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            if self._open >= self._max_connections:
                return _Refusing()
            self._open += 1
            counted = _Counted(server(), self._give_back)
            if self._ssl_context is not None:
                loop.call_later(self._handshake_timeout, counted.give_back_unless_made)
            return counted

        self._server = await loop.create_server(
            protocol,
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self._handshake_timeout if self._ssl_context else None,
        )

    def _give_back(self) -> None:
        self._open -= 1
