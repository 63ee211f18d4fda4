"""Webhooks over HTTP: the JSON body, the Standard Webhooks signature, one POST per attempt.

The body (at most a few hundred bytes: ids, an owner id of bounded length, a status)::

    {"type": "media.completed", "timestamp": "2026-12-05T14:03:07.250000Z",
     "data": {"mediaId": "…", "ownerId": "listing-7", "status": "COMPLETED",
              "revision": 1234, "eventTime": "2026-12-05T14:03:07.250000Z"}}

Headers per https://www.standardwebhooks.com: ``webhook-id`` (the same on every attempt),
``webhook-timestamp`` (this attempt, Unix seconds) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of id.timestamp.body>`` with the endpoint's secret), signed by
the specification's own library. Only a 2xx answer is an acceptance; redirects are not
followed (a receiver must not steer the service to another address), and the answer's body
is never read.

Names are looked up by :class:`_LookupThreads`, in threads of the sender's own (see there).
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from standardwebhooks.webhooks import Webhook

from ingest_service.domain.webhook_endpoints import WebhookEndpoint
from ingest_service.domain.webhooks import Delivery, WebhookChange

USER_AGENT = "mediatag-webhooks/1"


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def webhook_body(change: WebhookChange, now: float) -> str:
    """The JSON body telling ``change``."""
    return json.dumps(
        {
            "type": f"media.{change.status.value.lower()}",
            "timestamp": _rfc3339(now),
            "data": {
                "mediaId": change.media_id,
                "ownerId": change.owner_id,
                "status": change.status.value,
                "revision": change.revision,
                "eventTime": _rfc3339(change.event_time),
            },
        },
        separators=(",", ":"),
    )


def signed_headers(
    endpoint: WebhookEndpoint, message_id: str, body: str, now: float
) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt sent at ``now``."""
    timestamp = datetime.fromtimestamp(int(now), UTC)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now)),
        "webhook-signature": Webhook(endpoint.secret).sign(message_id, timestamp, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def _failure(error: aiohttp.ClientError) -> str:
    # The URL is left out: it may hold the receiver's key.
    if isinstance(error, aiohttp.ClientConnectorError):
        return f"cannot connect: {error.os_error.strerror or type(error.os_error).__name__}"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "the receiver closed the connection"
    return type(error).__name__


class _LookupThreads(AbstractResolver):
    """The system's ``getaddrinfo`` (so nsswitch: /etc/hosts, mDNS, LDAP… as configured)
    in at most ``threads`` threads of its own.

    aiohttp's default resolver runs it in the event loop's default executor, which uploads
    (hashing, sniffing, the local blob store's writes) use too. A lookup cannot be cancelled:
    one whose DNS server never answers holds its thread for the resolver's whole timeout
    (10 s with glibc's defaults), whatever the attempt's timeout, so eight dead names took
    every default thread and uploads waited seconds behind them. Here they hold only these.

    The connector (DNS cache on, the default) runs one lookup of a host and port at a time,
    whatever the attempts waiting for it, and an attempt that gives up leaves it running for
    the next: a dead name holds one thread. Names in flight are those of the attempts in
    flight, which are at most the connections, plus names of endpoints a reload removed whose
    lookups have not ended yet; with ``threads`` = the connections (4 per endpoint by
    default), every endpoint's lookup gets a thread at once.

    Not aiodns (``aiohttp.AsyncResolver``): c-ares reads /etc/resolv.conf and /etc/hosts but
    not nsswitch, which some deployments name their receivers through; and it would be one
    more dependency.
    """

    def __init__(self, threads: int) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="webhook-dns")

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        lookup = functools.partial(
            socket.getaddrinfo, host, port, family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG
        )
        infos = await asyncio.get_running_loop().run_in_executor(self._executor, lookup)
        found: list[ResolveResult] = []
        for found_family, _, proto, _, address in infos:
            named, found_port = str(address[0]), int(address[1])
            if found_family == socket.AF_INET6 and len(address) == 4 and address[3]:
                # A link-local address: its scope goes with it (numeric: looks nothing up).
                named, _ = socket.getnameinfo(
                    address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
                )
            found.append(
                ResolveResult(
                    hostname=host,
                    host=named,
                    port=found_port,
                    family=found_family,
                    proto=proto,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        return found

    async def close(self) -> None:
        # Queued lookups are dropped; a running one ends with its own timeout, unwaited.
        self._executor.shutdown(wait=False, cancel_futures=True)


class HttpWebhookSender:
    """The dispatcher's :class:`~ingest_service.domain.webhooks.WebhookSender`: one HTTP
    client session, at most ``max_connections`` connections, each attempt ``timeout``
    seconds at most."""

    def __init__(self, *, timeout: float, max_connections: int) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._resolver: _LookupThreads | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the running loop.
        if self._session is None:
            self._resolver = _LookupThreads(self._max_connections)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._max_connections,
                    resolver=self._resolver,
                ),
                timeout=self._timeout,
                # Proxy variables meant for other programs do not reroute webhooks.
                trust_env=False,
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        # A resolver given to the connector is not closed with it.
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None

    async def send(self, endpoint: WebhookEndpoint, delivery: Delivery) -> str | None:
        now = datetime.now(UTC).timestamp()
        body = webhook_body(delivery.change, now)
        headers = signed_headers(endpoint, delivery.change.message_id, body, now)
        try:
            async with self._client().post(
                endpoint.url, data=body.encode(), headers=headers, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except TimeoutError:
            return "timeout"
        except aiohttp.ClientError as error:
            return _failure(error)
