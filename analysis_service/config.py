"""Typed configuration of the analysis service (filled from flags/env by the CLI only)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mediatag_common.tls import ClientTls, ServerTls


@dataclass(frozen=True)
class RateLimitConfig:
    """A limit of ``rate_per_second`` calls with bursts of at most ``burst``."""

    rate_per_second: float
    burst: int = 1


@dataclass(frozen=True)
class RetryPolicy:
    """At most ``max_attempts`` attempts; backoff base * 2^(attempt-1), +/- jitter share."""

    max_attempts: int = 3
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    jitter: float = 0.2
    # Quota refusals and an unreachable ingest do not count as attempts; this bounds how
    # often a job may be put off for them (with backoff up to backoff_max, over an hour).
    max_quota_deferrals: int = 100


@dataclass(frozen=True)
class WatchConfig:
    """WatchStatus stream settings."""

    bookmark_interval: float = 30.0
    # Events buffered per stream before a watcher that does not read is cut off.
    stream_buffer: int = 1024
    # Longest a worker waits, before committing a claim or a completion, for its turn with
    # the watch fan-out (0: never waits). See analysis_service.domain.pacing.
    delivery_pacing: float = 0.2
    max_watchers: int = 1000
    # Event log retention: events older than this, or beyond this many, are compacted away
    # every ``compaction_interval`` seconds; a resume from before them re-syncs.
    retention_seconds: float = 24 * 3600.0
    retention_events: int = 1_000_000
    compaction_interval: float = 60.0


# The dimensions multimodalembedding@001 offers.
GOOGLE_EMBEDDING_DIMENSIONS = (128, 256, 512, 1408)
# Hosts of Google's own APIs: never reached in plaintext or without credentials.
_GOOGLE_API_DOMAINS = ("googleapis.com", "google.com")


@dataclass(frozen=True)
class GoogleConfig:
    """The ``google`` analyser: Cloud Vision, Vertex AI embeddings and (optionally) Gemini.

    Endpoints are ``host:port``. ``insecure`` means plaintext and no credentials, for
    emulators and tests; it is refused for Google's own endpoints.
    """

    project: str = ""
    location: str = "us-central1"
    vision_endpoint: str = "vision.googleapis.com:443"
    # Empty: the regional endpoint of ``location``.
    vertex_endpoint: str = ""
    insecure: bool = False
    embedding_model: str = "multimodalembedding@001"
    refine_tags: bool = False
    gemini_model: str = "gemini-2.5-flash"
    # Vision labels and objects below this score are not tags.
    min_score: float = 0.6
    max_labels: int = 20
    max_objects: int = 10
    max_tags: int = 20
    # Each call's own deadline; the library's retries are off, our retry policy decides.
    request_timeout: float = 20.0
    # What the APIs take (Vision and embeddings: 20 MB; Vision: 75 megapixels); larger
    # images are downscaled before sending.
    max_image_bytes: int = 20_000_000
    max_image_pixels: int = 75_000_000

    @property
    def resolved_vertex_endpoint(self) -> str:
        return self.vertex_endpoint or f"{self.location}-aiplatform.googleapis.com:443"

    def check(self, embedding_dimensions: int) -> None:
        """Raise ``ValueError`` naming what cannot work in this configuration."""
        if embedding_dimensions not in GOOGLE_EMBEDDING_DIMENSIONS:
            raise ValueError(
                "the google analyser's embeddings have "
                f"{', '.join(map(str, GOOGLE_EMBEDDING_DIMENSIONS))} dimensions, "
                f"not {embedding_dimensions}"
            )
        if not self.project:
            raise ValueError(
                "the google analyser needs a Google Cloud project "
                "(--gcp-project, MEDIATAG_GCP_PROJECT)"
            )
        if not self.location:
            raise ValueError(
                "the google analyser needs a location (--gcp-location, MEDIATAG_GCP_LOCATION)"
            )
        if self.insecure:
            for endpoint in (self.vision_endpoint, self.resolved_vertex_endpoint):
                host = endpoint.rsplit(":", 1)[0].strip("[]").lower()
                if any(host == d or host.endswith("." + d) for d in _GOOGLE_API_DOMAINS):
                    raise ValueError(
                        f"insecure mode (plaintext, no credentials) is for emulators and tests "
                        f"only, not for Google's endpoint {endpoint}"
                    )
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError("min_score must be between 0 and 1")
        if self.request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        if min(self.max_labels, self.max_objects, self.max_tags) < 1:
            raise ValueError("max_labels, max_objects and max_tags must be positive")


@dataclass(frozen=True)
class AnalysisConfig:
    """Everything the analysis service needs to run."""

    host: str = "127.0.0.1"
    port: int = 50052
    data_dir: Path = Path("data/analysis")
    database_url: str | None = None
    sqlite_synchronous: str = "FULL"
    ingest_address: str = "127.0.0.1:50051"
    analyzer: str = "local"
    embedding_dimensions: int = 1408
    google: GoogleConfig = field(default_factory=GoogleConfig)
    workers: int = 4
    # Child processes of the local analyser; 0 = threads of this process (see LocalAnalyzer).
    analyzer_processes: int = 0
    # Overrides of the analyser's default per-API limits, by API name.
    rate_limits: Mapping[str, RateLimitConfig] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    lease_seconds: float = 30.0
    analyzer_timeout: float = 60.0
    content_fetch_timeout: float = 30.0
    # Largest content a job may fetch (ingest's own video limit is larger, but videos are
    # never analysed).
    max_content_bytes: int = 64 * 1024 * 1024
    watch: WatchConfig = field(default_factory=WatchConfig)
    max_message_bytes: int = 64 * 1024 * 1024
    grace_period: float = 10.0
    # Security (all off by default, as on loopback). With a tokens file every call but health
    # and reflection needs a bearer token; ``tls`` serves TLS (mutual with a client CA);
    # ``peer_tls`` and ``service_token`` are how this service reaches the ingest service.
    tokens_file: Path | None = None
    tls: ServerTls | None = None
    peer_tls: ClientTls | None = None
    service_token: str | None = field(default=None, repr=False)
    # Prometheus metrics at http://host:metrics_port/metrics; None = off (the CLI's default is
    # 9452, an embedded service grabs no port unasked); 0 picks a free port.
    metrics_port: int | None = None
    # How often the metrics read from the database (queue depth, oldest pending) are refreshed.
    metrics_refresh_interval: float = 5.0

    @property
    def resolved_database_url(self) -> str:
        from mediatag_common.database import sqlite_url

        return self.database_url or sqlite_url(str(self.data_dir / "analysis.db"))
