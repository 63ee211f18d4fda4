"""``/api/v1/webhookDeliveries``: the ingest service's webhook deliveries not yet accepted,
and retrying the dead ones."""

from __future__ import annotations

from aiohttp import web
from mediatag.ingest.v1 import ingest_pb2 as ipb

from web_gateway.api.context import body, call, gateway_of, query, reply


async def list_deliveries(request: web.Request) -> web.Response:
    ingest = gateway_of(request).upstream.ingest
    asked = query(request, ipb.ListWebhookDeliveriesRequest())
    return reply(await call(ingest.ListWebhookDeliveries, asked, request))


async def retry(request: web.Request) -> web.Response:
    ingest = gateway_of(request).upstream.ingest
    asked = await body(request, ipb.RetryWebhookDeliveriesRequest())
    return reply(await call(ingest.RetryWebhookDeliveries, asked, request))
