"""The web gateway holds a bounded number of connections (README, Limits): one beyond
``--web-max-connections`` is answered ``503 UNAVAILABLE``/``TOO_MANY_CONNECTIONS`` and
closed, the connections already in are served as before, and a place given up (also by a TLS
handshake that failed) is taken again."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from pathlib import Path

import aiohttp

from analysis_service.config import WatchConfig
from mediatag_common.tls import ServiceTls
from tests.conftest import PATIENCE, Cluster, wait_until
from tests.media_samples import jpeg_bytes
from tests.test_watch_scale import fast_cluster
from tests.test_web_api import error_info
from tests.tls_support import make_pki
from tests.web_support import Gateways, Web, form, web_config

# A TLS handshake's time, far below any wait of the tests: a failed handshake's place is given
# back by then at the latest.
SHORT_TIMEOUT = 0.5
# How soon a refused connection must be closed: far sooner than a handshake's time would end it.
CLOSED_WITHIN = 10.0


async def _status_of_a_new_client(url: str, **options: object) -> int | None:
    """The status a client on a connection of its own gets for ``GET url``; None if the
    connection was closed before an answer (a TLS connection refused)."""
    try:
        async with (
            aiohttp.ClientSession(**options) as client,  # type: ignore[arg-type]
            client.get(url) as response,
        ):
            return response.status
    except aiohttp.ClientConnectionError:
        return None


async def test_a_connection_beyond_the_bound_is_refused_and_those_in_keep_working(
    make_cluster: Callable[..., Cluster], gateways: Gateways
) -> None:
    cluster = fast_cluster(make_cluster, WatchConfig())
    await cluster.start_analysis()
    await cluster.start_ingest()
    # One connection for the gateway's own client, kept alive between its requests.
    web = await gateways.start(
        web_config(cluster, max_connections=2), connector=aiohttp.TCPConnector(limit=1)
    )
    queue = f"{web.url}/api/v1/queue"
    await web.ok("GET", "/api/v1/queue")
    _, silent = await asyncio.open_connection("127.0.0.1", web.port)
    try:
        async with aiohttp.ClientSession() as latecomer, latecomer.get(queue) as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            answer = await response.json()
        assert answer["code"] == 14  # UNAVAILABLE
        assert error_info(answer)["reason"] == "TOO_MANY_CONNECTIONS"

        # The connection in is served as before.
        uploaded = await web.ok(
            "POST",
            "/api/v1/media",
            data=form({"owner_id": "listing-7"}, [("a.jpg", jpeg_bytes(1), "image/jpeg")]),
        )
    finally:
        silent.close()

    # The silent connection's place is taken again.
    async def served() -> bool:
        return await _status_of_a_new_client(queue) == 200

    await wait_until(served)
    async with (
        aiohttp.ClientSession() as other,
        other.get(f"{web.url}/api/v1/media", params={"owner_id": "listing-7"}) as response,
    ):
        listed = await response.json()
    assert [item["id"] for item in listed["media"]] == [uploaded["media"][0]["id"]]


async def _tls_gateway_of_one_place(
    make_cluster: Callable[..., Cluster],
    gateways: Gateways,
    tmp_path: Path,
    handshake_timeout: float,
) -> tuple[Web, ssl.SSLContext]:
    """A gateway serving HTTPS that holds one connection, and a context trusting it; its
    client keeps one connection alive."""
    cluster = fast_cluster(make_cluster, WatchConfig())
    pki = make_pki(tmp_path / "pki")
    trust = ssl.create_default_context(cafile=str(pki.ca))
    web = await gateways.start(
        web_config(
            cluster,
            max_connections=1,
            handshake_timeout=handshake_timeout,
            tls_files=ServiceTls(cert_file=pki.server.cert, key_file=pki.server.key),
        ),
        connector=aiohttp.TCPConnector(ssl=trust, limit=1),
    )
    return web, trust


async def test_a_failed_tls_handshake_gives_its_place_back(
    make_cluster: Callable[..., Cluster], gateways: Gateways, tmp_path: Path
) -> None:
    web, trust = await _tls_gateway_of_one_place(make_cluster, gateways, tmp_path, SHORT_TIMEOUT)
    # A connection that fails its handshake takes the one place, and must give it back.
    reader, writer = await asyncio.open_connection("127.0.0.1", web.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # not a TLS hello
    await reader.read()  # the gateway ends the handshake and closes
    writer.close()

    async def served() -> bool:
        page = f"{web.url}/"
        status = await _status_of_a_new_client(page, connector=aiohttp.TCPConnector(ssl=trust))
        return status == 200

    await wait_until(served)


async def test_a_tls_connection_beyond_the_bound_is_closed_before_any_handshake(
    make_cluster: Callable[..., Cluster], gateways: Gateways, tmp_path: Path
) -> None:
    web, trust = await _tls_gateway_of_one_place(make_cluster, gateways, tmp_path, PATIENCE)
    # The one place: a connection whose handshake is done, and which has asked nothing yet.
    held_reader, held_writer = await asyncio.open_connection(
        "127.0.0.1", web.port, ssl=trust, server_hostname="localhost"
    )
    try:
        # One that would sit out a handshake's time (here PATIENCE) is closed as it is accepted.
        reader, writer = await asyncio.open_connection("127.0.0.1", web.port)
        try:
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), CLOSED_WITHIN) == b""
        finally:
            writer.close()
        # The connection in is served.
        held_writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        status_line = await asyncio.wait_for(held_reader.readline(), PATIENCE)
        assert status_line.startswith(b"HTTP/1.1 200")
    finally:
        held_writer.close()
