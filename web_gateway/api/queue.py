"""``/api/v1/queue`` and ``/api/v1/jobs``: the analysis service's queue and its jobs."""

from __future__ import annotations

import json

from aiohttp import web
from mediatag.analysis.v1 import analysis_pb2 as apb

from web_gateway.api.context import JSON, call, gateway_of, query, reply


async def queue_status(request: web.Request) -> web.Response:
    status = await call(
        gateway_of(request).upstream.analysis.GetQueueStatus,
        apb.GetQueueStatusRequest(),
        request,
    )
    return reply(status)


async def pause(request: web.Request) -> web.Response:
    analysis = gateway_of(request).upstream.analysis
    return reply(await call(analysis.PauseQueue, apb.PauseQueueRequest(), request))


async def resume(request: web.Request) -> web.Response:
    analysis = gateway_of(request).upstream.analysis
    return reply(await call(analysis.ResumeQueue, apb.ResumeQueueRequest(), request))


async def list_jobs(request: web.Request) -> web.Response:
    analysis = gateway_of(request).upstream.analysis
    return reply(await call(analysis.ListJobs, query(request, apb.ListJobsRequest()), request))


async def get_job(request: web.Request) -> web.Response:
    asked = query(request, apb.GetJobRequest())
    asked.media_id = request.match_info["media_id"]
    return reply(await call(gateway_of(request).upstream.analysis.GetJob, asked, request))


async def throughput(request: web.Request) -> web.Response:
    """Completed and failed changes per minute over the last hour, counted by the gateway
    since ``since`` (it is not a service's message, so it has no proto)."""
    recorded = gateway_of(request).throughput
    minutes = [
        {"startTime": m.start, "completed": m.completed, "failed": m.failed}
        for m in recorded.last_hour()
    ]
    return web.Response(
        text=json.dumps({"since": recorded.since, "minutes": minutes}), content_type=JSON
    )
