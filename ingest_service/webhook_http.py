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
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import aiohttp
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


class HttpWebhookSender:
    """The dispatcher's :class:`~ingest_service.domain.webhooks.WebhookSender`: one HTTP
    client session, at most ``max_connections`` connections, each attempt ``timeout``
    seconds at most."""

    def __init__(self, *, timeout: float, max_connections: int) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Made on first use: a session belongs to the running loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
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
