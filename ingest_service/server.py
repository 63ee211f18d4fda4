"""Wiring of the ingest service: ``create_server(config) -> (host, port)``."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mediatag.ingest.v1 import ingest_pb2, ingest_pb2_grpc

from ingest_service.api.analysis_client import AnalysisClient
from ingest_service.api.servicer import METHOD_ROLES, IngestServicer
from ingest_service.api.status_codes import STATUS_CODES
from ingest_service.blobstores import open_blob_store
from ingest_service.config import IngestConfig
from ingest_service.domain.blob_sweep import BlobSweep
from ingest_service.domain.blobs import BlobStore
from ingest_service.domain.content_reads import ContentReads
from ingest_service.domain.library import MediaLibrary
from ingest_service.domain.mirror import StatusMirror
from ingest_service.domain.outbox import OutboxForwarder
from ingest_service.domain.requests import RequestIds
from ingest_service.domain.sniff import refuse_decompression_bombs
from ingest_service.domain.stream_upload import StreamUploads
from ingest_service.domain.uploads import Uploads
from ingest_service.domain.webhook_backlog import WebhookBacklog
from ingest_service.domain.webhook_endpoints import WebhookEndpoints
from ingest_service.domain.webhooks import DispatchLimits, RetryPolicy, WebhookDispatcher
from ingest_service.metrics import IngestMetrics
from ingest_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK
from ingest_service.storage.sql_deliveries import SqlDeliveryStore
from ingest_service.storage.sql_store import SqlIngestStore
from ingest_service.webhook_http import HttpWebhookSender
from mediatag_common.auth import load_tokens
from mediatag_common.database import Database
from mediatag_common.grpc_server import (
    ServiceHost,
    channel_options,
    open_channel,
)
from mediatag_common.keys import PAGE_TOKEN_KEY, load_or_create_key
from mediatag_common.paging import PageTokens
from mediatag_common.service_wiring import listening_server, metrics_server

logger = logging.getLogger(__name__)

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name


async def create_server(config: IngestConfig) -> tuple[ServiceHost, int]:
    """Build the ingest service bound to ``config.host:config.port`` (0 picks a port).

    Nothing runs until the returned host is started; the analysis service need not be up.
    """
    refuse_decompression_bombs()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    # What is opened here is closed again if the service cannot be built (a port taken, a
    # webhooks file it cannot use): the database's connections, the blob store's clients.
    async with contextlib.AsyncExitStack() as on_failure:
        db = Database(config.resolved_database_url, synchronous=config.sqlite_synchronous)
        on_failure.push_async_callback(db.close)
        metrics = IngestMetrics()
        blobs = await asyncio.to_thread(open_blob_store, config, metrics)
        on_failure.push_async_callback(blobs.close)
        built = await _assemble(config, db, blobs, metrics)
        on_failure.pop_all()
    return built


async def _assemble(
    config: IngestConfig, db: Database, blobs: BlobStore, metrics: IngestMetrics
) -> tuple[ServiceHost, int]:
    """The service on ``db`` and ``blobs``: its domain, its gRPC server and what starts and
    stops them."""
    await db.migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
    page_tokens = PageTokens(await db.write(lambda conn: load_or_create_key(conn, PAGE_TOKEN_KEY)))
    store = SqlIngestStore(db)
    sweep = BlobSweep(
        store=store,
        blobs=blobs,
        grace_period=config.blob_sweep_grace,
        interval=config.blob_sweep_interval,
        temporary_grace=config.temporary_blob_grace,
    )

    tokens = load_tokens(config.tokens_file) if config.tokens_file is not None else None
    analysis_channel = open_channel(
        config.analysis_address,
        options=channel_options(config.max_message_bytes),
        tls=config.peer_tls,
        token=config.service_token,
    )
    analysis = AnalysisClient(analysis_channel)
    forwarder = OutboxForwarder(
        store=store,
        analysis=analysis,
        batch_size=config.outbox_batch_size,
        initial_backoff=config.outbox_initial_backoff,
        max_backoff=config.outbox_max_backoff,
        observer=metrics,
    )
    hooks = config.webhooks
    endpoints = WebhookEndpoints(
        hooks.file, max_endpoints=hooks.max_endpoints, reload_interval=hooks.reload_interval
    )
    # Raises WebhooksFileError: a service given a file it cannot use does not start.
    endpoints.load()
    delivery_store = SqlDeliveryStore(db)
    sender = HttpWebhookSender(
        timeout=hooks.timeout, max_connections=hooks.max_endpoints * hooks.concurrency
    )
    webhooks = WebhookDispatcher(
        store=delivery_store,
        sender=sender,
        endpoints=endpoints,
        policy=RetryPolicy(hooks.initial_backoff, hooks.max_backoff, hooks.retry_period),
        limits=DispatchLimits(hooks.concurrency, hooks.timeout, hooks.poll_interval),
        observer=metrics,
    )
    endpoints.on_change = webhooks.endpoints_changed
    backlog = WebhookBacklog(
        log=delivery_store, dispatcher=webhooks, limits=config.limits, page_tokens=page_tokens
    )
    mirror = StatusMirror(
        store=store,
        analysis=analysis,
        initial_backoff=config.mirror_initial_backoff,
        max_backoff=config.mirror_max_backoff,
        webhooks=webhooks,
    )
    requests = RequestIds(
        store=store,
        retention=config.request_id_retention,
        purge_interval=config.request_id_purge_interval,
    )
    uploads = Uploads(
        store=store,
        blobs=blobs,
        limits=config.limits,
        requests=requests,
        on_committed=forwarder.wake,
        blob_grace_period=config.blob_sweep_grace,
    )
    streams = StreamUploads(
        uploads=uploads,
        blobs=blobs,
        requests=requests,
        limits=config.limits,
        stream_limits=config.stream_limits,
    )
    library = MediaLibrary(
        store=store,
        blobs=blobs,
        limits=config.limits,
        analysis=analysis,
        page_tokens=page_tokens,
    )
    reads = ContentReads(library=library, limits=config.content_read_limits)

    async def refresh_backlog() -> None:
        metrics.outbox_backlog.set(await forwarder.backlog())
        counts = await delivery_store.counts()
        metrics.webhook_backlog_is({name: (c.pending, c.dead) for name, c in counts.items()})

    metrics_endpoint = metrics_server(config, metrics, refresh=refresh_backlog)
    server, port = listening_server(
        config,
        metrics_endpoint,
        tokens=tokens,
        method_roles=METHOD_ROLES,
        status_codes=STATUS_CODES,
    )
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(
        IngestServicer(
            uploads=uploads, streams=streams, library=library, reads=reads, webhooks=backlog
        ),
        server,
    )

    async def on_start() -> None:
        # First: if its port is taken, nothing else has started yet.
        metrics_endpoint.start()
        forwarder.start()
        webhooks.start()
        endpoints.start()
        mirror.start()
        requests.start()
        sweep.start()
        logger.info(
            "ingest service on %s:%d: data in %s, blobs in a %s store, analysis at %s",
            config.host,
            port,
            config.data_dir,
            config.blob_store_location.scheme,
            config.analysis_address,
        )

    async def on_drain(grace: float) -> None:
        # Uploads in flight finish under server.stop(grace); the outbox keeps what is left.
        return

    async def on_stop() -> None:
        await metrics_endpoint.stop()
        await sweep.stop()
        await uploads.close()
        await streams.close()
        await requests.stop()
        await forwarder.stop()
        await mirror.stop()
        await endpoints.stop()
        await webhooks.stop()
        await sender.close()
        await analysis_channel.close()
        await blobs.close()
        await db.close()

    host = ServiceHost(
        name="ingest",
        server=server,
        service_names=[SERVICE_NAME],
        on_start=on_start,
        on_drain=on_drain,
        on_stop=on_stop,
        is_healthy=db.ping,
    )
    return host, port
