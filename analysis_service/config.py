"""Typed configuration of the analysis service, with the flag and variable of each setting."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from mediatag_common.service_config import ServiceConfig, peer_address
from mediatag_common.settings import redeclared, setting
from mediatag_common.values import (
    non_negative_float,
    non_negative_int,
    one_of,
    positive_float,
    positive_int,
    word,
)


@dataclass(frozen=True)
class RateLimitConfig:
    """A limit of ``rate_per_second`` calls with bursts of at most ``burst``."""

    rate_per_second: float
    burst: int = 1


def rate_limits(text: str) -> dict[str, RateLimitConfig]:
    """``API=RATE[:BURST]``, several separated by commas: ``local=2:1,vision=30``.

    RATE is calls per second (> 0); BURST the calls allowed back to back (default 1).
    """
    limits: dict[str, RateLimitConfig] = {}
    for entry in (part.strip() for part in text.split(",")):
        api, equals, spec = entry.partition("=")
        api = api.strip()
        if not equals or not api or any(c.isspace() for c in api):
            raise argparse.ArgumentTypeError(f"{entry!r} is not API=RATE[:BURST], e.g. local=2:1")
        rate_text, colon, burst_text = spec.partition(":")
        try:
            rate = positive_float(rate_text)
            burst = positive_int(burst_text) if colon else 1
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"{entry!r}: {error}") from None
        limits[api] = RateLimitConfig(rate_per_second=rate, burst=burst)
    return limits


# The analysers the analysis service has (analysis_service.analyzers.registry builds them),
# each with the upstream APIs it may call, named as their rate limits are (--rate-limit API=...).
# The analysers import this module, not the other way round: the names are declared here too,
# so that the config refuses a limit no analyser could use before anything starts
# (tests/test_cli_config.py checks that the analysers' own limits name these APIs).
ANALYZER_APIS: Mapping[str, tuple[str, ...]] = {
    "local": ("local",),
    # Gemini only to refine tags.
    "google": ("vision", "embeddings", "gemini"),
}
ANALYZERS = tuple(ANALYZER_APIS)
analyzer_name = one_of(ANALYZERS, upper=False)


def _score(text: str) -> float:
    value = non_negative_float(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a score between 0 and 1")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """At most ``max_attempts`` attempts; backoff base * 2^(attempt-1), +/- jitter share."""

    max_attempts: int = setting(
        3, flag="--max-attempts", help="analysis attempts per job", parse=positive_int, metavar="N"
    )
    backoff_base: float = setting(
        1.0,
        flag="--backoff-base",
        help="delay before the first retry; doubles with each attempt",
        parse=positive_float,
        metavar="SECONDS",
    )
    backoff_max: float = 60.0
    jitter: float = 0.2
    # Quota refusals and an unreachable ingest do not count as attempts; this bounds how
    # often a job may be put off for them (with backoff up to backoff_max, over an hour).
    max_quota_deferrals: int = 100


@dataclass(frozen=True)
class WatchConfig:
    """WatchStatus stream settings."""

    bookmark_interval: float = setting(
        30.0,
        flag="--bookmark-interval",
        help="idle WatchStatus streams get a bookmark this often",
        parse=positive_float,
        metavar="SECONDS",
    )
    # Events buffered per stream before a watcher that does not read is cut off.
    stream_buffer: int = setting(
        1024,
        flag="--watch-buffer",
        help="events buffered per WatchStatus stream; a watcher this far behind is cut off",
        parse=positive_int,
        metavar="N",
    )
    # Longest a worker waits, before committing a claim or a completion, for its turn with
    # the watch fan-out (0: never waits). See analysis_service.domain.pacing.
    delivery_pacing: float = setting(
        0.2,
        flag="--delivery-pacing",
        help="longest a claim or completion waits for its turn with the WatchStatus fan-out "
        "(each commits once the watchers have taken the changes before it); 0 never waits",
        parse=non_negative_float,
        metavar="SECONDS",
    )
    max_watchers: int = setting(
        1000,
        flag="--max-watchers",
        help="concurrent WatchStatus streams",
        parse=positive_int,
        metavar="N",
    )
    # One caller's share of max_watchers: a token's (or without authentication a peer
    # address's); None: half of them.
    max_watchers_per_caller: int | None = setting(
        None,
        flag="--max-watchers-per-caller",
        help="WatchStatus streams one token (without --tokens-file: one peer address) may hold",
        parse=positive_int,
        metavar="N",
        shown_default="half of --max-watchers",
    )
    # The services' own streams (role service): slots apart from the clients'.
    max_service_watchers: int = setting(
        100,
        flag="--max-service-watchers",
        help="WatchStatus streams of each service token (role service), beyond --max-watchers",
        parse=positive_int,
        metavar="N",
    )
    # Media ids one WatchStatus may name: its filter is held for as long as it is open.
    max_media_ids: int = setting(
        1000,
        flag="--max-watch-media-ids",
        help="media ids one WatchStatus may name (INVALID_ARGUMENT TOO_MANY_MEDIA_IDS beyond)",
        parse=positive_int,
        metavar="N",
    )
    # Event log retention: events older than this, or beyond this many, are compacted away
    # every ``compaction_interval`` seconds; a resume from before them re-syncs.
    retention_seconds: float = setting(
        24 * 3600.0,
        flag="--event-retention",
        help="seconds status events are kept for resuming watchers",
        parse=positive_float,
        metavar="SECONDS",
    )
    retention_events: int = setting(
        1_000_000,
        flag="--event-retention-count",
        help="status events kept at most for resuming watchers",
        parse=positive_int,
        metavar="N",
    )
    compaction_interval: float = setting(
        60.0,
        flag="--compaction-interval",
        help="how often the event log is compacted",
        parse=positive_float,
        metavar="SECONDS",
    )


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

    project: str = setting(
        "",
        flag="--gcp-project",
        help="Google Cloud project of the Vertex AI calls",
        parse=word,
        metavar="PROJECT",
        shown_default="none; required by --analyzer google",
    )
    location: str = setting(
        "us-central1",
        flag="--gcp-location",
        help="Vertex AI region",
        parse=word,
        metavar="LOCATION",
    )
    vision_endpoint: str = setting(
        "vision.googleapis.com:443",
        flag="--vision-endpoint",
        help="Cloud Vision API endpoint",
        parse=word,
        metavar="HOST:PORT",
    )
    # Empty: the regional endpoint of ``location``.
    vertex_endpoint: str = setting(
        "",
        flag="--vertex-endpoint",
        help="Vertex AI API endpoint",
        parse=word,
        metavar="HOST:PORT",
        shown_default="LOCATION-aiplatform.googleapis.com:443",
    )
    insecure: bool = setting(
        False,
        flag="--google-insecure",
        help="plaintext and no credentials to the Vision/Vertex endpoints: for emulators and "
        "tests only, refused for Google's own endpoints",
    )
    embedding_model: str = setting(
        "multimodalembedding@001",
        flag="--embedding-model",
        help="Vertex AI multimodal embedding model",
        parse=word,
        metavar="MODEL",
    )
    refine_tags: bool = setting(
        False,
        flag="--refine-tags",
        help="refine Vision's tags with Gemini from the image, the category and the context",
    )
    gemini_model: str = setting(
        "gemini-2.5-flash",
        flag="--gemini-model",
        help="Gemini model of --refine-tags",
        parse=word,
        metavar="MODEL",
    )
    # Vision labels and objects below this score are not tags.
    min_score: float = setting(
        0.6,
        flag="--min-label-score",
        help="Vision labels and objects scoring below this are not tags",
        parse=_score,
        metavar="SCORE",
    )
    max_labels: int = 20
    max_objects: int = 10
    max_tags: int = 20
    # Each call's own deadline; the library's retries are off, our retry policy decides.
    request_timeout: float = setting(
        20.0,
        flag="--google-timeout",
        help="seconds each call to Google may take",
        parse=positive_float,
        metavar="SECONDS",
    )
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
class AnalysisConfig(ServiceConfig):
    """Everything the analysis service needs to run."""

    SERVICE: ClassVar[str] = "analysis"

    port: int = redeclared(ServiceConfig, "port", 50052)
    data_dir: Path = redeclared(ServiceConfig, "data_dir", Path("data/analysis"))
    metrics_port: int | None = redeclared(ServiceConfig, "metrics_port", None, command_default=9452)
    ingest_address: str = setting(
        "127.0.0.1:50051",
        flag="--ingest-address",
        help="where the analysis service reaches ingest",
        parse=word,
        metavar="ADDR",
        shown_default="HOST:INGEST_PORT",
        default_from=peer_address("ingest"),
    )
    analyzer: str = setting(
        "local", flag="--analyzer", help="analyser to use", parse=analyzer_name, metavar="NAME"
    )
    embedding_dimensions: int = setting(
        1408,
        flag="--embedding-dimensions",
        help="length of the embedding vector",
        parse=positive_int,
        metavar="N",
    )
    google: GoogleConfig = field(default_factory=GoogleConfig)
    # 0: a replica that claims nothing (it serves the API and watchers; others do the work).
    workers: int = setting(
        4,
        flag="--workers",
        help="concurrent analysis workers (0: this replica serves the API and watches only)",
        parse=non_negative_int,
        metavar="N",
    )
    # Child processes of the local analyser; 0 = threads of this process (see LocalAnalyzer).
    analyzer_processes: int = setting(
        0,
        flag="--analyzer-processes",
        help="processes the local analyser measures images in, at idle CPU priority "
        "(0: threads of the service's own process)",
        parse=non_negative_int,
        metavar="N",
        command_default=os.cpu_count() or 1,
    )
    # Overrides of the analyser's default per-API limits, by API name.
    rate_limits: Mapping[str, RateLimitConfig] = setting(
        default_factory=dict,
        flag="--rate-limit",
        help="limit calls to one upstream API to RATE per second in bursts of BURST (default "
        "1); repeatable; the variable takes a comma-separated list, e.g. local=2:1,vision=30",
        parse=rate_limits,
        metavar="API=RATE[:BURST]",
        env="MEDIATAG_RATE_LIMITS",
        shown_default="the analyser's own limits",
        repeatable=True,
    )
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    lease_seconds: float = setting(
        30.0,
        flag="--lease-seconds",
        help="a claimed job goes back to pending when its worker stops renewing it for this long",
        parse=positive_float,
        metavar="SECONDS",
    )
    analyzer_timeout: float = 60.0
    content_fetch_timeout: float = 30.0
    # Largest content a job may fetch (ingest's own video limit is larger, but videos are
    # never analysed).
    max_content_bytes: int = 64 * 1024 * 1024
    watch: WatchConfig = field(default_factory=WatchConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.watch.max_watchers >= self.max_calls:
            raise ValueError(
                f"max_watchers ({self.watch.max_watchers}) must be below max_calls "
                f"({self.max_calls}): each WatchStatus stream is a call in progress"
            )
        if self.analyzer == "google":
            self.google.check(self.embedding_dimensions)
        known = {api for apis in ANALYZER_APIS.values() for api in apis}
        unknown = sorted(set(self.rate_limits) - known)
        if unknown:
            apis = "; ".join(f"{name}: {', '.join(a)}" for name, a in ANALYZER_APIS.items())
            raise ValueError(
                f"rate limit for {', '.join(unknown)} (--rate-limit, MEDIATAG_RATE_LIMITS): "
                f"no analyser calls an API of that name ({apis})"
            )
