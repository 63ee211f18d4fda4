"""The web gateway in tests: started on a free port against a test cluster, and plain HTTP
clients of its JSON API and its Server-Sent Events (aiohttp's client)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from tests.conftest import Cluster
from web_gateway.config import WebConfig
from web_gateway.server import WebHost, create_server


@dataclass
class Web:
    """A started gateway and an HTTP client session for it."""

    host: WebHost
    port: int
    client: aiohttp.ClientSession
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    async def json(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """Status and JSON body of one request."""
        async with self.client.request(method, self.url + path, **kwargs) as response:
            return response.status, await response.json(content_type=None)

    async def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        status, answer = await self.json(method, path, **kwargs)
        assert status == 200, answer
        return answer

    async def stop(self) -> None:
        await self.client.close()
        await self.host.stop(1.0)


def web_config(cluster: Cluster, **overrides: Any) -> WebConfig:
    return replace(
        WebConfig(
            port=0,
            ingest_address=f"127.0.0.1:{cluster.ingest_port}",
            analysis_address=f"127.0.0.1:{cluster.analysis_port}",
        ),
        **overrides,
    )


class Gateways:
    """Gateways started by one test, all stopped at its end."""

    def __init__(self) -> None:
        self._started: list[Web] = []

    async def start(self, config: WebConfig, **client_options: Any) -> Web:
        host, port = await create_server(config)
        await host.start()
        # Cookies of 127.0.0.1 too (aiohttp keeps none for IP addresses by default).
        client_options.setdefault("cookie_jar", aiohttp.CookieJar(unsafe=True))
        client = aiohttp.ClientSession(**client_options)
        web = Web(host, port, client, "https" if config.tls else "http")
        self._started.append(web)
        return web

    async def close(self) -> None:
        for web in self._started:
            await web.stop()


def form(
    fields: dict[str, str | list[str]], files: list[tuple[str, bytes, str]]
) -> aiohttp.FormData:
    """A multipart upload form: fields first, then ``(filename, content, type)`` files."""
    data = aiohttp.FormData()
    for name, value in fields.items():
        for one in [value] if isinstance(value, str) else value:
            data.add_field(name, one)
    for filename, content, content_type in files:
        data.add_field("files", content, filename=filename, content_type=content_type)
    return data


_BOUNDARY = "gateway-test-boundary"


def slow_upload(
    web: Web,
    owner: str,
    filename: str,
    image: bytes,
    may_finish: asyncio.Event,
    headers: dict[str, str] | None = None,
) -> asyncio.Task[tuple[int, Any]]:
    """An upload of one image that sends the start of its body, then the rest only once
    ``may_finish`` is set: it holds its place in the gateway meanwhile."""
    body = (
        (
            f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="owner_id"\r\n\r\n'
            f"{owner}\r\n"
            f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + image
        + f"\r\n--{_BOUNDARY}--\r\n".encode()
    )

    async def slowly() -> AsyncIterator[bytes]:
        yield body[:200]
        await may_finish.wait()
        yield body[200:]

    content_type = {"Content-Type": f"multipart/form-data; boundary={_BOUNDARY}"}
    return asyncio.create_task(
        web.json(
            "POST", "/api/v1/media", data=slowly(), headers={**(headers or {}), **content_type}
        )
    )


@dataclass
class Event:
    """One Server-Sent Event."""

    event: str
    data: str
    id: str | None = None

    @property
    def json(self) -> Any:
        return json.loads(self.data)

    @property
    def revision(self) -> int:
        return int(self.id) if self.id is not None else -1


@dataclass
class EventStream:
    """A plain HTTP client reading ``GET /api/v1/events``."""

    response: aiohttp.ClientResponse
    received: list[Event] = field(default_factory=list)

    async def next(self, within: float = 30.0) -> Event:
        """The next event (comments and the ``retry`` field skipped)."""
        async with asyncio.timeout(within):
            fields: dict[str, str] = {}
            while True:
                line = await self.response.content.readline()
                if not line:
                    raise EOFError("the event stream ended")
                text = line.decode().rstrip("\n")
                if text:
                    name, _, value = text.partition(":")
                    fields[name] = value.removeprefix(" ")
                    continue
                if "event" in fields or "data" in fields:
                    event = Event(fields.get("event", "message"), fields.get("data", ""))
                    event.id = fields.get("id")
                    self.received.append(event)
                    return event
                fields = {}

    async def changes(self, count: int, within: float = 30.0) -> list[Event]:
        """The next ``count`` change events (bookmarks skipped)."""
        found: list[Event] = []
        while len(found) < count:
            event = await self.next(within)
            if event.event == "change":
                found.append(event)
            elif event.event != "bookmark":
                raise AssertionError(f"unexpected {event}")
        return found

    def close(self) -> None:
        self.response.close()


async def open_events(web: Web, query: str = "", **headers: str) -> EventStream:
    response = await web.client.get(f"{web.url}/api/v1/events{query}", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/event-stream"
    return EventStream(response)
