"""A bound on the connections the gateway holds: the listener counts them, from the moment one
is accepted (before TLS) until it is closed, and closes one beyond the bound as it accepts it —
over plain HTTP after writing ``503 UNAVAILABLE``/``TOO_MANY_CONNECTIONS``, over TLS at once,
before any handshake, so a refused connection holds nothing.

aiohttp has no such bound; its sites are where a listener is made, so the gateway listens
through a site of its own, on a listening socket whose ``accept`` does the refusing (asyncio's
event loop accepts through it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import weakref
from collections.abc import Callable
from typing import Any

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


class _Listener(socket.socket):
    """A listening socket whose ``accept`` hands over only the connections ``admit`` takes,
    and closes the others (after writing ``refusal``, if there is one)."""

    def __init__(
        self, listening: socket.socket, admit: Callable[[], bool], refusal: bytes | None
    ) -> None:
        super().__init__(
            listening.family, listening.type, listening.proto, fileno=listening.detach()
        )
        self._admit = admit
        self._refusal = refusal

    def accept(self) -> tuple[socket.socket, Any]:
        # When no connection is waiting, BlockingIOError ends asyncio's round of accepts.
        while True:
            connection, address = super().accept()
            if self._admit():
                return connection, address
            self._refuse(connection)

    def _refuse(self, connection: socket.socket) -> None:
        with connection:
            if self._refusal is not None:
                connection.setblocking(False)
                # Small enough for any fresh socket's send buffer; a peer gone already is
                # fine to ignore.
                with contextlib.suppress(OSError):
                    connection.send(self._refusal)


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
    """An aiohttp site listening on ``sock`` (which it takes over) that holds at most
    ``max_connections``; a TLS handshake not done within ``handshake_timeout`` seconds ends
    its connection."""

    __slots__ = ("_address", "_handshake_timeout", "_max_connections", "_open", "_sock")

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
        self._address: tuple[str, int] = sock.getsockname()[:2]
        self._max_connections = max_connections
        self._handshake_timeout = handshake_timeout
        self._open = 0

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return str(URL.build(scheme=scheme, host=self._address[0], port=self._address[1]))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        refusal = None if self._ssl_context is not None else _refusal_response()
        listener = _Listener(self._sock, self._admit, refusal)

        def protocol() -> asyncio.Protocol:
            counted = _Counted(server(), self._give_back)
            if self._ssl_context is not None:
                loop.call_later(self._handshake_timeout, counted.give_back_unless_made)
            return counted

        self._server = await loop.create_server(
            protocol,
            sock=listener,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self._handshake_timeout if self._ssl_context else None,
        )

    def _admit(self) -> bool:
        if self._open >= self._max_connections:
            return False
        self._open += 1
        return True

    def _give_back(self) -> None:
        self._open -= 1
