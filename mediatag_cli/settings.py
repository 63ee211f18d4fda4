"""Settings of the ``mediatag`` command: flags, then ``MEDIATAG_*`` variables, then defaults.

Every setting is declared once here with its flag, its environment variable and its parser,
and resolved into the typed configuration of the services (``IngestConfig`` and
``AnalysisConfig``) or of the client commands. Flags are declared with a suppressed default
so that "not given on the command line" is visible and the environment can fill it in.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from analysis_service.config import (
    AnalysisConfig,
    GoogleConfig,
    RateLimitConfig,
    RetryPolicy,
    WatchConfig,
)
from ingest_service.config import IngestConfig, UploadLimits
from mediatag_cli.values import (
    LOG_LEVELS,
    SQLITE_SYNCHRONOUS_MODES,
    analyzer_name,
    byte_size,
    format_byte_size,
    log_format,
    log_level,
    non_negative_float,
    non_negative_int,
    port,
    port_or_off,
    positive_float,
    positive_int,
    rate_limits,
    sqlite_synchronous,
    word,
)
from mediatag_common.grpc_server import is_loopback
from mediatag_common.tls import ClientTls, ServerTls

T = TypeVar("T")

INGEST = "ingest"
ANALYSIS = "analysis"
SERVICES = (INGEST, ANALYSIS)
ENV_PREFIX = "MEDIATAG_"
# Hosts that mean "every interface": fine to bind, but not an address to connect to.
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


class SettingsError(ValueError):
    """A flag or environment value that cannot be used; reported as a usage error."""


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One setting: its flag, environment variable, parser and default.

    ``services`` says which ``serve`` variants offer the flag; client settings have none.
    ``shown_default`` describes a default that is not a plain value, for ``--help``.
    """

    flag: str
    parse: Callable[[str], T]
    default: T
    help: str
    metavar: str
    services: frozenset[str] = frozenset()
    env_override: str | None = None
    shown_default: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return self.env_override or ENV_PREFIX + self.dest.upper()


BOTH = frozenset(SERVICES)
ONLY_INGEST = frozenset({INGEST})
ONLY_ANALYSIS = frozenset({ANALYSIS})
_LIMITS = UploadLimits()
_RETRY = RetryPolicy()
_WATCH = WatchConfig()
_ANALYSIS = AnalysisConfig()

DATA_DIR: Setting[Path] = Setting(
    "--data-dir", Path, Path("data"), "data root: ingest uses DIR/ingest, analysis DIR/analysis",
    "DIR", BOTH, shown_default="./data",
)  # fmt: skip
HOST: Setting[str] = Setting("--host", word, "127.0.0.1", "address to bind", "HOST", BOTH)
# Both services take both ports: each derives the other's address from its port.
INGEST_PORT: Setting[int] = Setting(
    "--ingest-port", port, 50051, "port of the ingest service", "PORT", BOTH
)
ANALYSIS_PORT: Setting[int] = Setting(
    "--analysis-port", port, 50052, "port of the analysis service", "PORT", BOTH
)
INGEST_ADDRESS: Setting[str | None] = Setting(
    "--ingest-address", word, None, "where the analysis service reaches ingest", "ADDR",
    ONLY_ANALYSIS, shown_default="HOST:INGEST_PORT",
)  # fmt: skip
ANALYSIS_ADDRESS: Setting[str | None] = Setting(
    "--analysis-address", word, None, "where the ingest service reaches analysis", "ADDR",
    ONLY_INGEST, shown_default="HOST:ANALYSIS_PORT",
)  # fmt: skip
INGEST_DATABASE_URL: Setting[str | None] = Setting(
    "--ingest-database-url", word, None, "SQLAlchemy URL of the ingest database", "URL",
    ONLY_INGEST, shown_default="SQLite file DIR/ingest/ingest.db",
)  # fmt: skip
ANALYSIS_DATABASE_URL: Setting[str | None] = Setting(
    "--analysis-database-url", word, None, "SQLAlchemy URL of the analysis database", "URL",
    ONLY_ANALYSIS, shown_default="SQLite file DIR/analysis/analysis.db",
)  # fmt: skip
SQLITE_SYNCHRONOUS: Setting[str] = Setting(
    "--sqlite-synchronous", sqlite_synchronous, "FULL",
    f"SQLite synchronous pragma: {', '.join(SQLITE_SYNCHRONOUS_MODES)}", "MODE", BOTH,
)  # fmt: skip
GRACE_PERIOD: Setting[float] = Setting(
    "--grace-period", non_negative_float, 10.0,
    "seconds in-flight work gets to finish on SIGTERM", "SECONDS", BOTH,
)  # fmt: skip
ANALYZER: Setting[str] = Setting(
    "--analyzer", analyzer_name, _ANALYSIS.analyzer, "analyser to use", "NAME", ONLY_ANALYSIS
)
EMBEDDING_DIMENSIONS: Setting[int] = Setting(
    "--embedding-dimensions", positive_int, _ANALYSIS.embedding_dimensions,
    "length of the embedding vector", "N", ONLY_ANALYSIS,
)  # fmt: skip
# ---- the google analyser (used with --analyzer google) ----
_GOOGLE = GoogleConfig()
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def switch(text: str) -> bool:
    """An on/off setting: a flag without a value, or ``1``/``0`` (true/false, yes/no, on/off)."""
    value = text.strip().lower()
    if value not in _TRUE_WORDS | _FALSE_WORDS:
        raise argparse.ArgumentTypeError(f"{text!r} is not 1 or 0 (true/false, yes/no, on/off)")
    return value in _TRUE_WORDS


def _score(text: str) -> float:
    value = non_negative_float(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a score between 0 and 1")
    return value


GCP_PROJECT: Setting[str] = Setting(
    "--gcp-project", word, _GOOGLE.project, "Google Cloud project of the Vertex AI calls",
    "PROJECT", ONLY_ANALYSIS, shown_default="none; required by --analyzer google",
)  # fmt: skip
GCP_LOCATION: Setting[str] = Setting(
    "--gcp-location", word, _GOOGLE.location, "Vertex AI region", "LOCATION", ONLY_ANALYSIS
)
VISION_ENDPOINT: Setting[str] = Setting(
    "--vision-endpoint", word, _GOOGLE.vision_endpoint, "Cloud Vision API endpoint",
    "HOST:PORT", ONLY_ANALYSIS,
)  # fmt: skip
VERTEX_ENDPOINT: Setting[str] = Setting(
    "--vertex-endpoint", word, _GOOGLE.vertex_endpoint, "Vertex AI API endpoint",
    "HOST:PORT", ONLY_ANALYSIS, shown_default="LOCATION-aiplatform.googleapis.com:443",
)  # fmt: skip
GOOGLE_INSECURE: Setting[bool] = Setting(
    "--google-insecure", switch, False,
    "plaintext and no credentials to the Vision/Vertex endpoints: for emulators and tests "
    "only, refused for Google's own endpoints", "", ONLY_ANALYSIS, shown_default="off",
)  # fmt: skip
EMBEDDING_MODEL: Setting[str] = Setting(
    "--embedding-model", word, _GOOGLE.embedding_model, "Vertex AI multimodal embedding model",
    "MODEL", ONLY_ANALYSIS,
)  # fmt: skip
REFINE_TAGS: Setting[bool] = Setting(
    "--refine-tags", switch, False,
    "refine Vision's tags with Gemini from the image, the category and the context", "",
    ONLY_ANALYSIS, shown_default="off",
)  # fmt: skip
GEMINI_MODEL: Setting[str] = Setting(
    "--gemini-model", word, _GOOGLE.gemini_model, "Gemini model of --refine-tags", "MODEL",
    ONLY_ANALYSIS,
)  # fmt: skip
MIN_LABEL_SCORE: Setting[float] = Setting(
    "--min-label-score", _score, _GOOGLE.min_score,
    "Vision labels and objects scoring below this are not tags", "SCORE", ONLY_ANALYSIS,
)  # fmt: skip
GOOGLE_TIMEOUT: Setting[float] = Setting(
    "--google-timeout", positive_float, _GOOGLE.request_timeout,
    "seconds each call to Google may take", "SECONDS", ONLY_ANALYSIS,
)  # fmt: skip
GOOGLE_SETTINGS: tuple[Setting[Any], ...] = (
    GCP_PROJECT, GCP_LOCATION, VISION_ENDPOINT, VERTEX_ENDPOINT, GOOGLE_INSECURE,
    EMBEDDING_MODEL, REFINE_TAGS, GEMINI_MODEL, MIN_LABEL_SCORE, GOOGLE_TIMEOUT,
)  # fmt: skip
WORKERS: Setting[int] = Setting(
    "--workers", positive_int, _ANALYSIS.workers, "concurrent analysis workers", "N",
    ONLY_ANALYSIS,
)  # fmt: skip
ANALYZER_PROCESSES: Setting[int] = Setting(
    "--analyzer-processes", non_negative_int, os.cpu_count() or 1,
    "processes the local analyser measures images in, at idle CPU priority "
    "(0: threads of the service's own process)", "N", ONLY_ANALYSIS,
)  # fmt: skip
RATE_LIMITS: Setting[Mapping[str, RateLimitConfig]] = Setting(
    "--rate-limit", rate_limits, {},
    "limit calls to one upstream API to RATE per second in bursts of BURST (default 1); "
    "repeatable; the variable takes a comma-separated list, e.g. local=2:1,vision=30",
    "API=RATE[:BURST]", ONLY_ANALYSIS, env_override=ENV_PREFIX + "RATE_LIMITS",
    shown_default="the analyser's own limits",
)  # fmt: skip
MAX_ATTEMPTS: Setting[int] = Setting(
    "--max-attempts", positive_int, _RETRY.max_attempts, "analysis attempts per job", "N",
    ONLY_ANALYSIS,
)  # fmt: skip
BACKOFF_BASE: Setting[float] = Setting(
    "--backoff-base", positive_float, _RETRY.backoff_base,
    "delay before the first retry; doubles with each attempt", "SECONDS", ONLY_ANALYSIS,
)  # fmt: skip
LEASE_SECONDS: Setting[float] = Setting(
    "--lease-seconds", positive_float, _ANALYSIS.lease_seconds,
    "a claimed job goes back to pending when its worker stops renewing it for this long",
    "SECONDS", ONLY_ANALYSIS,
)  # fmt: skip
BOOKMARK_INTERVAL: Setting[float] = Setting(
    "--bookmark-interval", positive_float, _WATCH.bookmark_interval,
    "idle WatchStatus streams get a bookmark this often", "SECONDS", ONLY_ANALYSIS,
)  # fmt: skip
MAX_WATCHERS: Setting[int] = Setting(
    "--max-watchers", positive_int, _WATCH.max_watchers, "concurrent WatchStatus streams", "N",
    ONLY_ANALYSIS,
)  # fmt: skip
WATCH_BUFFER: Setting[int] = Setting(
    "--watch-buffer", positive_int, _WATCH.stream_buffer,
    "events buffered per WatchStatus stream; a watcher this far behind is cut off", "N",
    ONLY_ANALYSIS,
)  # fmt: skip
DELIVERY_PACING: Setting[float] = Setting(
    "--delivery-pacing", non_negative_float, _WATCH.delivery_pacing,
    "longest a claim or completion waits for its turn with the WatchStatus fan-out (each "
    "commits once the watchers have taken the changes before it); 0 never waits", "SECONDS",
    ONLY_ANALYSIS,
)  # fmt: skip
EVENT_RETENTION: Setting[float] = Setting(
    "--event-retention", positive_float, _WATCH.retention_seconds,
    "seconds status events are kept for resuming watchers", "SECONDS", ONLY_ANALYSIS,
)  # fmt: skip
EVENT_RETENTION_COUNT: Setting[int] = Setting(
    "--event-retention-count", positive_int, _WATCH.retention_events,
    "status events kept at most for resuming watchers", "N", ONLY_ANALYSIS,
)  # fmt: skip
COMPACTION_INTERVAL: Setting[float] = Setting(
    "--compaction-interval", positive_float, _WATCH.compaction_interval,
    "how often the event log is compacted", "SECONDS", ONLY_ANALYSIS,
)  # fmt: skip
MAX_FILES: Setting[int] = Setting(
    "--max-files", positive_int, _LIMITS.max_files, "files per upload", "N", ONLY_INGEST
)
MAX_IMAGE_BYTES: Setting[int] = Setting(
    "--max-image-bytes", byte_size, _LIMITS.max_image_bytes, "largest image, e.g. 20MiB",
    "SIZE", ONLY_INGEST, shown_default=format_byte_size(_LIMITS.max_image_bytes),
)  # fmt: skip
MAX_IMAGE_PIXELS: Setting[int] = Setting(
    "--max-image-pixels", positive_int, _LIMITS.max_image_pixels,
    "largest image in pixels (decompression bomb guard)", "N", ONLY_INGEST,
)  # fmt: skip
MAX_VIDEO_BYTES: Setting[int] = Setting(
    "--max-video-bytes", byte_size, _LIMITS.max_video_bytes, "largest video, e.g. 512MiB",
    "SIZE", ONLY_INGEST, shown_default=format_byte_size(_LIMITS.max_video_bytes),
)  # fmt: skip
MAX_OWNER_ID_LENGTH: Setting[int] = Setting(
    "--max-owner-id-length", positive_int, _LIMITS.max_owner_id_length,
    "longest owner id", "N", ONLY_INGEST,
)  # fmt: skip
MAX_CATEGORY_LENGTH: Setting[int] = Setting(
    "--max-category-length", positive_int, _LIMITS.max_category_length,
    "longest category", "N", ONLY_INGEST,
)  # fmt: skip
MAX_CONTEXT_ENTRIES: Setting[int] = Setting(
    "--max-context-entries", non_negative_int, _LIMITS.max_context_entries,
    "context entries per upload", "N", ONLY_INGEST,
)  # fmt: skip
MAX_CONTEXT_VALUE_LENGTH: Setting[int] = Setting(
    "--max-context-value-length", positive_int, _LIMITS.max_context_value_length,
    "longest context value", "N", ONLY_INGEST,
)  # fmt: skip
MAX_FILENAME_LENGTH: Setting[int] = Setting(
    "--max-filename-length", positive_int, _LIMITS.max_filename_length,
    "longest filename", "N", ONLY_INGEST,
)  # fmt: skip
_INGEST = IngestConfig()
REQUEST_ID_RETENTION: Setting[float] = Setting(
    "--request-id-retention", positive_float, _INGEST.request_id_retention,
    "seconds an upload's request_id is remembered: a retry within it gets the first answer",
    "SECONDS", ONLY_INGEST,
)  # fmt: skip
UPLOAD_IDLE_TIMEOUT: Setting[float] = Setting(
    "--upload-idle-timeout", positive_float, _INGEST.stream_idle_timeout,
    "an UploadMediaStream that sends nothing for this long is ended and its partial file "
    "removed", "SECONDS", ONLY_INGEST,
)  # fmt: skip
INGEST_UPLOAD_SETTINGS: tuple[Setting[Any], ...] = (
    MAX_OWNER_ID_LENGTH, MAX_CATEGORY_LENGTH, MAX_CONTEXT_ENTRIES, MAX_CONTEXT_VALUE_LENGTH,
    MAX_FILENAME_LENGTH, REQUEST_ID_RETENTION, UPLOAD_IDLE_TIMEOUT,
)  # fmt: skip
# The services' own defaults are off (an embedded service grabs no port unasked); `serve` is on.
INGEST_METRICS_PORT: Setting[int | None] = Setting(
    "--ingest-metrics-port", port_or_off, 9451,
    "port of the ingest service's Prometheus metrics (http://HOST:PORT/metrics); off disables "
    "them, 0 picks a free port", "PORT|off", ONLY_INGEST,
)  # fmt: skip
ANALYSIS_METRICS_PORT: Setting[int | None] = Setting(
    "--analysis-metrics-port", port_or_off, 9452,
    "port of the analysis service's Prometheus metrics (http://HOST:PORT/metrics); off "
    "disables them, 0 picks a free port", "PORT|off", ONLY_ANALYSIS,
)  # fmt: skip
LOG_LEVEL: Setting[str] = Setting(
    "--log-level", log_level, "INFO", f"log level: {', '.join(LOG_LEVELS)}", "LEVEL", BOTH
)
LOG_FORMAT: Setting[str] = Setting(
    "--log-format", log_format, "text", "text (for people) or json (one object per line)",
    "FORMAT", BOTH,
)  # fmt: skip

# ---- security (README "Security") ----


def secret(text: str) -> str:
    """A token: non-empty, no spaces; never quoted back in an error."""
    value = text.strip()
    if not value or any(c.isspace() for c in value):
        raise argparse.ArgumentTypeError("a token must be non-empty and contain no spaces")
    return value


TOKENS_FILE: Setting[Path | None] = Setting(
    "--tokens-file", Path, None,
    "TOML file of bearer tokens, their roles and owners; every call but health and "
    "reflection then needs a token", "FILE", BOTH, shown_default="none: no authentication",
)  # fmt: skip
SERVICE_TOKEN: Setting[str | None] = Setting(
    "--service-token", secret, None,
    "token (role service) this service sends to the other one; prefer the variable or "
    "--service-token-file, a flag shows in the process list", "TOKEN", BOTH,
    shown_default="none",
)  # fmt: skip
SERVICE_TOKEN_FILE: Setting[Path | None] = Setting(
    "--service-token-file", Path, None, "file holding the service token", "FILE", BOTH,
    shown_default="none",
)  # fmt: skip
INSECURE: Setting[bool] = Setting(
    "--insecure", switch, False,
    "allow binding a non-loopback address without --tokens-file (anyone who reaches the "
    "port may call every method)", "", BOTH, shown_default="off",
)  # fmt: skip
SERVE_TLS_CERT: Setting[Path | None] = Setting(
    "--tls-cert", Path, None,
    "PEM certificate chain to serve TLS with; also presented to the other service when it "
    "asks for a client certificate", "FILE", BOTH, shown_default="none: plaintext",
)  # fmt: skip
SERVE_TLS_KEY: Setting[Path | None] = Setting(
    "--tls-key", Path, None, "PEM private key of --tls-cert", "FILE", BOTH, shown_default="none"
)
TLS_CLIENT_CA: Setting[Path | None] = Setting(
    "--tls-client-ca", Path, None,
    "require client certificates signed by this CA (mutual TLS)", "FILE", BOTH,
    shown_default="none: no client certificates",
)  # fmt: skip
SERVE_TLS_CA: Setting[Path | None] = Setting(
    "--tls-ca", Path, None,
    "CA that signed the other service's certificate; with it or --tls-cert the services "
    "reach each other over TLS", "FILE", BOTH, shown_default="the system's roots",
)  # fmt: skip
SECURITY_SETTINGS: tuple[Setting[Any], ...] = (
    TOKENS_FILE, SERVICE_TOKEN, SERVICE_TOKEN_FILE, INSECURE, SERVE_TLS_CERT, SERVE_TLS_KEY,
    TLS_CLIENT_CA, SERVE_TLS_CA,
)  # fmt: skip

SERVE_SETTINGS: tuple[Setting[Any], ...] = (
    DATA_DIR, HOST, INGEST_PORT, ANALYSIS_PORT, INGEST_ADDRESS, ANALYSIS_ADDRESS,
    INGEST_DATABASE_URL, ANALYSIS_DATABASE_URL, SQLITE_SYNCHRONOUS, GRACE_PERIOD, ANALYZER,
    *GOOGLE_SETTINGS,
    EMBEDDING_DIMENSIONS, WORKERS, ANALYZER_PROCESSES, RATE_LIMITS, MAX_ATTEMPTS, BACKOFF_BASE,
    LEASE_SECONDS,
    BOOKMARK_INTERVAL, MAX_WATCHERS, WATCH_BUFFER, DELIVERY_PACING, EVENT_RETENTION,
    EVENT_RETENTION_COUNT,
    COMPACTION_INTERVAL, MAX_FILES, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS,
    MAX_VIDEO_BYTES, *INGEST_UPLOAD_SETTINGS, INGEST_METRICS_PORT, ANALYSIS_METRICS_PORT,
    *SECURITY_SETTINGS, LOG_LEVEL, LOG_FORMAT,
)  # fmt: skip

INGEST_TARGET: Setting[str] = Setting(
    "--ingest", word, "127.0.0.1:50051", "address of the ingest service", "ADDR",
    env_override=ENV_PREFIX + "INGEST_ADDRESS",
)  # fmt: skip
ANALYSIS_TARGET: Setting[str] = Setting(
    "--analysis", word, "127.0.0.1:50052", "address of the analysis service", "ADDR",
    env_override=ENV_PREFIX + "ANALYSIS_ADDRESS",
)  # fmt: skip
TIMEOUT: Setting[float] = Setting(
    "--timeout", positive_float, 30.0, "seconds to wait for each call (not for watch streams)",
    "SECONDS",
)  # fmt: skip
TOKEN: Setting[str | None] = Setting(
    "--token", secret, None, "bearer token to call the services with", "TOKEN",
    shown_default="none",
)  # fmt: skip
CLIENT_TLS: Setting[bool] = Setting(
    "--tls", switch, False, "connect over TLS (implied by --tls-ca and --tls-cert)", "",
    shown_default="off",
)  # fmt: skip
TLS_CA: Setting[Path | None] = Setting(
    "--tls-ca", Path, None, "CA that signed the services' certificates", "FILE",
    shown_default="the system's roots",
)  # fmt: skip
TLS_CERT: Setting[Path | None] = Setting(
    "--tls-cert", Path, None, "client certificate, for services that require one", "FILE",
    shown_default="none",
)  # fmt: skip
TLS_KEY: Setting[Path | None] = Setting(
    "--tls-key", Path, None, "private key of --tls-cert", "FILE", shown_default="none"
)
CLIENT_SETTINGS: tuple[Setting[Any], ...] = (
    INGEST_TARGET, ANALYSIS_TARGET, TIMEOUT, TOKEN, CLIENT_TLS, TLS_CA, TLS_CERT, TLS_KEY,
)  # fmt: skip


class _MergeRateLimits(argparse.Action):
    """Repeated ``--rate-limit`` flags add up; a later one wins for the same API."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, {**getattr(namespace, self.dest, {}), **values})


def _help(setting: Setting[T]) -> str:
    default = setting.shown_default or setting.default
    return f"{setting.help} (env {setting.env}; default {default})"


def _add_argument(parser: argparse.ArgumentParser, setting: Setting[T]) -> None:
    if setting.parse is switch:
        # An on/off flag takes no value; its variable takes 1/0.
        parser.add_argument(
            setting.flag,
            dest=setting.dest,
            action="store_true",
            default=argparse.SUPPRESS,
            help=_help(setting),
        )
        return
    parser.add_argument(
        setting.flag,
        dest=setting.dest,
        type=setting.parse,
        default=argparse.SUPPRESS,
        action=_MergeRateLimits if setting is RATE_LIMITS else "store",
        metavar=setting.metavar,
        help=_help(setting),
    )


def add_serve_arguments(parser: argparse.ArgumentParser, services: Sequence[str]) -> None:
    """Add the flags of ``mediatag serve`` for ``services`` to ``parser``."""
    wanted = set(services)
    for setting in SERVE_SETTINGS:
        if setting.services & wanted:
            _add_argument(parser, setting)


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options every client command shares (addresses, timeout, ``--json``)."""
    for setting in CLIENT_SETTINGS:
        _add_argument(parser, setting)
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def resolve(
    setting: Setting[T], args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> T:
    """The flag's value if given, else the environment variable's, else the default.

    An empty environment variable counts as unset.
    """
    if hasattr(args, setting.dest):
        given: T = getattr(args, setting.dest)
        return given
    raw = (os.environ if environ is None else environ).get(setting.env, "")
    if not raw.strip():
        return setting.default
    try:
        return setting.parse(raw)
    except (argparse.ArgumentTypeError, ValueError) as error:
        raise SettingsError(f"environment variable {setting.env}={raw!r}: {error}") from None


# ---- resolved settings ----


@dataclass(frozen=True)
class ServeSettings:
    """What ``mediatag serve`` runs: the config of each service it starts, and how to log."""

    ingest: IngestConfig | None
    analysis: AnalysisConfig | None
    grace_period: float
    log_level: str
    log_format: str


@dataclass(frozen=True)
class ClientSettings:
    """Where the client commands connect and how they print."""

    ingest_address: str
    analysis_address: str
    timeout: float
    json: bool
    token: str | None = field(default=None, repr=False)
    tls: ClientTls | None = None


def connect_address(host: str, port_number: int) -> str:
    """A gRPC target that reaches ``host:port``; a wildcard bind host becomes loopback."""
    host = _WILDCARD_HOSTS.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port_number}"


def _peer_address(
    explicit: str | None, host: str, peer_port: int, setting: Setting[str | None]
) -> str:
    if explicit is not None:
        return explicit
    if peer_port == 0:
        raise SettingsError(
            f"a port of 0 is only known once bound, so {setting.flag} (or {setting.env}) "
            "must say where the other service is"
        )
    return connect_address(host, peer_port)


def serve_settings(
    args: argparse.Namespace, services: Sequence[str], environ: Mapping[str, str] | None = None
) -> ServeSettings:
    """Resolve ``mediatag serve`` flags, environment and defaults into the services' configs.

    Only the settings of ``services`` are read, so a bad variable meant for the other service
    does not stop this one.
    """

    def get(setting: Setting[T]) -> T:
        return resolve(setting, args, environ)

    data_dir = get(DATA_DIR)
    host = get(HOST)
    grace_period = get(GRACE_PERIOD)
    security = _security(get, host, both=set(services) == set(SERVICES))
    ingest: IngestConfig | None = None
    analysis: AnalysisConfig | None = None
    if INGEST in services:
        ingest = IngestConfig(
            host=host,
            port=get(INGEST_PORT),
            data_dir=data_dir / INGEST,
            database_url=get(INGEST_DATABASE_URL),
            sqlite_synchronous=get(SQLITE_SYNCHRONOUS),
            analysis_address=_peer_address(
                get(ANALYSIS_ADDRESS), host, get(ANALYSIS_PORT), ANALYSIS_ADDRESS
            ),
            limits=UploadLimits(
                max_files=get(MAX_FILES),
                max_image_bytes=get(MAX_IMAGE_BYTES),
                max_image_pixels=get(MAX_IMAGE_PIXELS),
                max_video_bytes=get(MAX_VIDEO_BYTES),
                max_owner_id_length=get(MAX_OWNER_ID_LENGTH),
                max_category_length=get(MAX_CATEGORY_LENGTH),
                max_context_entries=get(MAX_CONTEXT_ENTRIES),
                max_context_value_length=get(MAX_CONTEXT_VALUE_LENGTH),
                max_filename_length=get(MAX_FILENAME_LENGTH),
            ),
            request_id_retention=get(REQUEST_ID_RETENTION),
            stream_idle_timeout=get(UPLOAD_IDLE_TIMEOUT),
            grace_period=grace_period,
            metrics_port=get(INGEST_METRICS_PORT),
        )
    if ANALYSIS in services:
        analysis = AnalysisConfig(
            host=host,
            port=get(ANALYSIS_PORT),
            data_dir=data_dir / ANALYSIS,
            database_url=get(ANALYSIS_DATABASE_URL),
            sqlite_synchronous=get(SQLITE_SYNCHRONOUS),
            ingest_address=_peer_address(
                get(INGEST_ADDRESS), host, get(INGEST_PORT), INGEST_ADDRESS
            ),
            analyzer=get(ANALYZER),
            embedding_dimensions=get(EMBEDDING_DIMENSIONS),
            google=_google_config(get),
            workers=get(WORKERS),
            analyzer_processes=get(ANALYZER_PROCESSES),
            rate_limits=get(RATE_LIMITS),
            retry=RetryPolicy(max_attempts=get(MAX_ATTEMPTS), backoff_base=get(BACKOFF_BASE)),
            lease_seconds=get(LEASE_SECONDS),
            watch=WatchConfig(
                bookmark_interval=get(BOOKMARK_INTERVAL),
                max_watchers=get(MAX_WATCHERS),
                stream_buffer=get(WATCH_BUFFER),
                delivery_pacing=get(DELIVERY_PACING),
                retention_seconds=get(EVENT_RETENTION),
                retention_events=get(EVENT_RETENTION_COUNT),
                compaction_interval=get(COMPACTION_INTERVAL),
            ),
            grace_period=grace_period,
            metrics_port=get(ANALYSIS_METRICS_PORT),
        )
    if ingest is not None:
        ingest = replace(ingest, **security)
    if analysis is not None:
        analysis = replace(analysis, **security)
    if analysis is not None and analysis.analyzer == "google":
        try:
            analysis.google.check(analysis.embedding_dimensions)
        except ValueError as error:
            raise SettingsError(str(error)) from None
    return ServeSettings(
        ingest=ingest,
        analysis=analysis,
        grace_period=grace_period,
        log_level=get(LOG_LEVEL),
        log_format=get(LOG_FORMAT),
    )


def _tls_pair(cert: Path | None, key: Path | None, cert_flag: str, key_flag: str) -> None:
    if (cert is None) != (key is None):
        raise SettingsError(f"{cert_flag} and {key_flag} go together")


def _security(get: Callable[[Setting[Any]], Any], host: str, *, both: bool) -> dict[str, Any]:
    """The security fields both services' configs share."""
    tokens_file: Path | None = get(TOKENS_FILE)
    if tokens_file is None and not is_loopback(host) and not get(INSECURE):
        raise SettingsError(
            f"binding {host}, which other machines can reach, without --tokens-file lets anyone "
            "call every method: give --tokens-file, or --insecure if that is what you want"
        )
    service_token: str | None = get(SERVICE_TOKEN)
    token_file: Path | None = get(SERVICE_TOKEN_FILE)
    if token_file is not None:
        if service_token is not None:
            raise SettingsError("give --service-token or --service-token-file, not both")
        try:
            service_token = secret(token_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, argparse.ArgumentTypeError) as error:
            raise SettingsError(f"service token file {token_file}: {error}") from None
    if both and tokens_file is not None and service_token is None:
        raise SettingsError(
            "with --tokens-file the two services call each other with a service token: give "
            "--service-token-file (or MEDIATAG_SERVICE_TOKEN) with a token of role service"
        )
    cert, key = get(SERVE_TLS_CERT), get(SERVE_TLS_KEY)
    _tls_pair(cert, key, SERVE_TLS_CERT.flag, SERVE_TLS_KEY.flag)
    client_ca, peer_ca = get(TLS_CLIENT_CA), get(SERVE_TLS_CA)
    if client_ca is not None and cert is None:
        raise SettingsError(
            f"{TLS_CLIENT_CA.flag} needs {SERVE_TLS_CERT.flag} and {SERVE_TLS_KEY.flag}"
        )
    return {
        "tokens_file": tokens_file,
        "service_token": service_token,
        "tls": ServerTls(cert, key, client_ca) if cert is not None and key is not None else None,
        # The other service is reached over TLS when this one serves it, or a CA is named;
        # this service's certificate doubles as its client certificate.
        "peer_tls": ClientTls(peer_ca, cert, key) if cert is not None or peer_ca else None,
    }


def _google_config(get: Callable[[Setting[Any]], Any]) -> GoogleConfig:
    return GoogleConfig(
        project=get(GCP_PROJECT),
        location=get(GCP_LOCATION),
        vision_endpoint=get(VISION_ENDPOINT),
        vertex_endpoint=get(VERTEX_ENDPOINT),
        insecure=get(GOOGLE_INSECURE),
        embedding_model=get(EMBEDDING_MODEL),
        refine_tags=get(REFINE_TAGS),
        gemini_model=get(GEMINI_MODEL),
        min_score=get(MIN_LABEL_SCORE),
        request_timeout=get(GOOGLE_TIMEOUT),
    )


def client_settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ClientSettings:
    """Resolve the client commands' shared options."""
    ca, cert, key = (resolve(s, args, environ) for s in (TLS_CA, TLS_CERT, TLS_KEY))
    _tls_pair(cert, key, TLS_CERT.flag, TLS_KEY.flag)
    use_tls = resolve(CLIENT_TLS, args, environ) or ca is not None or cert is not None
    return ClientSettings(
        ingest_address=resolve(INGEST_TARGET, args, environ),
        analysis_address=resolve(ANALYSIS_TARGET, args, environ),
        timeout=resolve(TIMEOUT, args, environ),
        json=bool(getattr(args, "json", False)),
        token=resolve(TOKEN, args, environ),
        tls=ClientTls(ca, cert, key) if use_tls else None,
    )
