"""Wiring of the analysis service: ``create_server(config) -> (host, port)``."""

from __future__ import annotations

import contextlib
import logging

from mediatag.analysis.v1 import analysis_pb2, analysis_pb2_grpc

from analysis_service.analyzers.base import Analyzer
from analysis_service.analyzers.registry import build_analyzer, close_analyzer
from analysis_service.api.servicer import METHOD_ROLES, AnalysisServicer
from analysis_service.api.status_codes import STATUS_CODES
from analysis_service.config import AnalysisConfig
from analysis_service.domain.cache import ResultCache
from analysis_service.domain.hub import StatusHub
from analysis_service.domain.limits import RateLimits
from analysis_service.domain.maintenance import Maintenance
from analysis_service.domain.queue import JobQueue
from analysis_service.domain.replicas import Replicas
from analysis_service.domain.stats import Throughput
from analysis_service.domain.watch import StatusWatcher
from analysis_service.domain.workers import WorkerPool
from analysis_service.ingest_content import IngestContent
from analysis_service.metrics import AnalysisMetrics, Readings
from analysis_service.storage.queue_store import SqlQueueStore
from analysis_service.storage.rate_limits import DatabaseSlots
from analysis_service.storage.replicas import DatabaseReplicas
from analysis_service.storage.schema import MIGRATIONS, MIGRATIONS_LOCK
from analysis_service.storage.tailer import EventTailer
from mediatag_common.auth import load_tokens
from mediatag_common.database import POSTGRESQL, SQLITE, Database
from mediatag_common.grpc_server import ServiceHost
from mediatag_common.keys import PAGE_TOKEN_KEY, load_or_create_key
from mediatag_common.paging import PageTokens
from mediatag_common.service_wiring import listening_server, metrics_server

logger = logging.getLogger(__name__)

SERVICE_NAME = analysis_pb2.DESCRIPTOR.services_by_name["AnalysisService"].full_name


async def create_server(
    config: AnalysisConfig, *, analyzer: Analyzer | None = None
) -> tuple[ServiceHost, int]:
    """Build the analysis service bound to ``config.host:config.port`` (0 picks a port).

    ``analyzer`` replaces the configured one (tests use it for a fake at the API edge).
    Nothing runs until the returned host is started.
    """
    config.data_dir.mkdir(parents=True, exist_ok=True)
    # What is opened here is closed again if the service cannot be built: its connections,
    # and on SQLite the file another process may then serve from.
    async with contextlib.AsyncExitStack() as on_failure:
        # On SQLite, one process publishes every commit to its watchers: it serves alone.
        db = Database(
            config.resolved_database_url, synchronous=config.sqlite_synchronous, sole_process=True
        )
        on_failure.push_async_callback(db.close)
        analyzer = analyzer or build_analyzer(config)
        on_failure.push_async_callback(close_analyzer, analyzer)
        metrics = AnalysisMetrics()
        metrics.analyzer_info.labels(analyzer.name, analyzer.version).set(1)
        built = await _assemble(config, db, analyzer, metrics)
        on_failure.pop_all()
    return built


async def _assemble(
    config: AnalysisConfig, db: Database, analyzer: Analyzer, metrics: AnalysisMetrics
) -> tuple[ServiceHost, int]:
    """The service on ``db``: its domain, its gRPC server and what starts and stops them."""
    tokens = load_tokens(config.tokens_file) if config.tokens_file is not None else None
    await db.migrate(MIGRATIONS, lock_name=MIGRATIONS_LOCK)
    # On PostgreSQL, replicas may share the database: they share one limit per API too.
    shared_slots = DatabaseSlots(db) if db.dialect == POSTGRESQL else None
    limits = RateLimits(analyzer.api_limits, config.rate_limits, shared_slots)
    page_tokens = PageTokens(await db.write(lambda conn: load_or_create_key(conn, PAGE_TOKEN_KEY)))

    hub = StatusHub(
        buffer_size=config.watch.stream_buffer,
        max_watchers=config.watch.max_watchers,
        max_watchers_per_caller=config.watch.max_watchers_per_caller,
        max_service_watchers=config.watch.max_service_watchers,
    )
    # Several replicas may share PostgreSQL: each follows the log (see storage.tailer).
    tailer = None if db.dialect == SQLITE else EventTailer(db, publish=hub.publish)
    store = SqlQueueStore(db, committed=hub.publish if tailer is None else tailer.committed)
    queue = JobQueue(
        store,
        hub,
        config.retry,
        config.lease_seconds,
        delivery_pacing=config.watch.delivery_pacing,
    )
    await queue.load()
    throughput = Throughput()
    content = IngestContent(
        config.ingest_address,
        timeout=config.content_fetch_timeout,
        max_bytes=config.max_content_bytes,
        tls=config.peer_tls,
        token=config.service_token,
    )
    cache = ResultCache(
        store,
        analyzer_name=analyzer.name,
        analyzer_version=analyzer.version,
        # Renewed while its holder analyses: a dead holder's key lapses as its job's lease does.
        claim_seconds=config.lease_seconds,
    )
    pool = WorkerPool(
        queue=queue,
        analyzer=analyzer,
        limits=limits,
        cache=cache,
        content=content,
        size=config.workers,
        analyzer_timeout=config.analyzer_timeout,
        throughput=throughput,
        observer=metrics,
    )
    replicas = Replicas(
        DatabaseReplicas(db),
        workers_total=pool.size,
        workers_busy=lambda: pool.busy,
        finished_last_minute=throughput.last_minute,
    )
    watcher = StatusWatcher(store, hub, bookmark_interval=config.watch.bookmark_interval)
    maintenance = Maintenance(queue, config.watch)
    metrics.expose(
        Readings(
            queue_paused=lambda: queue.paused,
            workers=lambda: pool.size,
            workers_busy=lambda: pool.busy,
            watchers=lambda: hub.watcher_count,
            events_published=lambda: hub.events_published,
            current_revision=lambda: hub.current_revision,
            cache_hits=lambda: cache.hits,
            cache_misses=lambda: cache.misses,
            quota_errors=limits.quota_error_counts,
        )
    )

    async def refresh_queue_depth() -> None:
        depth = await queue.depth()
        metrics.record_queue_depth(depth.counts, depth.oldest_pending_submission)

    metrics_endpoint = metrics_server(config, metrics, refresh=refresh_queue_depth)
    server, port = listening_server(
        config,
        metrics_endpoint,
        tokens=tokens,
        method_roles=METHOD_ROLES,
        status_codes=STATUS_CODES,
    )
    analysis_pb2_grpc.add_AnalysisServiceServicer_to_server(
        AnalysisServicer(
            queue=queue,
            watcher=watcher,
            replicas=replicas,
            limits=limits,
            analyzer=analyzer,
            metrics=metrics,
            max_watch_media_ids=config.watch.max_media_ids,
            page_tokens=page_tokens,
        ),
        server,
    )

    async def on_start() -> None:
        # First: if its port is taken, nothing else has started yet.
        metrics_endpoint.start()
        if tailer is not None:
            tailer.start(hub.current_revision, queue.wake_workers)
        pool.start()
        maintenance.start()
        replicas.start()
        logger.info(
            "analysis service on %s:%d: %d workers, analyser %s %s, limits %s%s",
            config.host,
            port,
            pool.size,
            analyzer.name,
            analyzer.version,
            ", ".join(
                f"{api} {limit.rate_per_second:g}/s burst {limit.burst}"
                for api, limit in limits.configured.items()
            ),
            " (queue paused)" if queue.paused else "",
        )

    async def on_drain(grace: float) -> None:
        hub.close()
        await pool.drain(grace)
        await queue.close()

    async def on_stop() -> None:
        await metrics_endpoint.stop()
        await maintenance.stop()
        await replicas.stop()
        if tailer is not None:
            await tailer.stop()
        await content.close()
        await close_analyzer(analyzer)
        await db.close()

    host = ServiceHost(
        name="analysis",
        server=server,
        service_names=[SERVICE_NAME],
        on_start=on_start,
        on_drain=on_drain,
        on_stop=on_stop,
        is_healthy=db.ping,
    )
    return host, port
