"""The aiohttp application: routes, the guard every request passes, the static page.

| method and path | service call |
|---|---|
| ``GET /api/v1/media`` | ``ListMedia`` (query: its fields) |
| ``POST /api/v1/media`` | ``UploadMedia`` / ``UploadMediaStream`` (multipart) |
| ``GET /api/v1/media/{id}`` | ``GetMedia`` |
| ``GET /api/v1/media/{id}/content`` | ``ReadMediaContent`` (the bytes) |
| ``POST /api/v1/media:reprocess`` | ``ReprocessMedia`` (JSON body) |
| ``GET /api/v1/queue`` | ``GetQueueStatus`` |
| ``POST /api/v1/queue:pause``, ``:resume`` | ``PauseQueue``, ``ResumeQueue`` |
| ``GET /api/v1/jobs``, ``/api/v1/jobs/{id}`` | ``ListJobs``, ``GetJob`` |
| ``GET /api/v1/webhookDeliveries`` | ``ListWebhookDeliveries`` (query: its fields) |
| ``POST /api/v1/webhookDeliveries:retry`` | ``RetryWebhookDeliveries`` (JSON body) |
| ``GET /api/v1/events`` | ``WatchStatus`` as Server-Sent Events |
| ``GET /api/v1/throughput`` | the gateway's own count of terminal changes per minute |
| ``GET, POST, DELETE /api/v1/session`` | signing a browser in and out |
"""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from mediatag_common.grpc_server import is_loopback
from web_gateway.api import events, media, queue, session, webhooks
from web_gateway.api.callers import check_host
from web_gateway.api.context import CALLER, GATEWAY, JSON, Gateway
from web_gateway.api.errors import body, from_http, http_status
from web_gateway.api.headers import add_security_headers
from web_gateway.errors import Refusal, internal

logger = logging.getLogger(__name__)

_STATIC = Path(__file__).resolve().parent.parent / "static"
API = "/api/"


def _error_response(refusal: Refusal) -> web.Response:
    return web.Response(body=body(refusal), status=http_status(refusal), content_type=JSON)


def _signing_in(request: web.Request) -> bool:
    return request.path == session.PATH and request.method in ("GET", "POST")


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host check, caller and CSRF checks on the API; refusals as ``google.rpc.Status``."""
    gateway = request.app[GATEWAY]
    api = request.path.startswith(API)
    try:
        if gateway.callers.tokens is None and is_loopback(gateway.config.host):
            check_host(request, gateway.config.host)
        if api and not _signing_in(request):
            caller = gateway.callers.identify(request)
            gateway.callers.check_csrf(request, caller)
            request[CALLER] = caller
        return await handler(request)
    except Refusal as refusal:
        return _error_response(refusal)
    except web.HTTPException as error:
        answer = from_http(error) if api else None
        if answer is None:
            raise
        return _error_response(answer)
    except Exception:
        logger.exception("unexpected error in %s %s", request.method, request.path)
        return _error_response(internal())


async def _secure(request: web.Request, response: web.StreamResponse) -> None:
    gateway = request.app[GATEWAY]
    add_security_headers(
        response.headers,
        tls=gateway.config.tls is not None,
        api=request.path.startswith(API),
    )


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(_STATIC / "index.html")


def create_app(gateway: Gateway) -> web.Application:
    """The application serving ``gateway``."""
    app = web.Application(middlewares=[guard])
    app[GATEWAY] = gateway
    app.on_response_prepare.append(_secure)
    v1 = "/api/v1"
    app.router.add_get(f"{v1}/media", media.list_media)
    app.router.add_post(f"{v1}/media", media.upload)
    app.router.add_post(f"{v1}/media:reprocess", media.reprocess)
    app.router.add_get(f"{v1}/media/{{media_id}}", media.get_media)
    app.router.add_get(f"{v1}/media/{{media_id}}/content", media.content, allow_head=False)
    app.router.add_get(f"{v1}/queue", queue.queue_status)
    app.router.add_post(f"{v1}/queue:pause", queue.pause)
    app.router.add_post(f"{v1}/queue:resume", queue.resume)
    app.router.add_get(f"{v1}/jobs", queue.list_jobs)
    app.router.add_get(f"{v1}/jobs/{{media_id}}", queue.get_job)
    app.router.add_get(f"{v1}/throughput", queue.throughput)
    app.router.add_get(f"{v1}/webhookDeliveries", webhooks.list_deliveries)
    app.router.add_post(f"{v1}/webhookDeliveries:retry", webhooks.retry)
    app.router.add_get(f"{v1}/events", events.events, allow_head=False)
    app.router.add_get(session.PATH, session.describe)
    app.router.add_post(session.PATH, session.sign_in)
    app.router.add_delete(session.PATH, session.sign_out)
    app.router.add_get("/", _index)
    app.router.add_static("/static/", _STATIC)
    return app
