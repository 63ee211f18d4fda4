"""Today's flags and environment variables stay: none is renamed or removed.

Scripts and deployments name them; a new setting may be added, an old name never goes away.
"""

from __future__ import annotations

import argparse
import re

import pytest

from mediatag_cli.main import build_parser

# Flags both `serve` variants offer, with the variable named in their help.
SHARED_SERVE = {
    "--data-dir": "MEDIATAG_DATA_DIR",
    "--host": "MEDIATAG_HOST",
    "--ingest-port": "MEDIATAG_INGEST_PORT",
    "--analysis-port": "MEDIATAG_ANALYSIS_PORT",
    "--sqlite-synchronous": "MEDIATAG_SQLITE_SYNCHRONOUS",
    "--grace-period": "MEDIATAG_GRACE_PERIOD",
    "--tokens-file": "MEDIATAG_TOKENS_FILE",
    "--service-token": "MEDIATAG_SERVICE_TOKEN",
    "--service-token-file": "MEDIATAG_SERVICE_TOKEN_FILE",
    "--insecure": "MEDIATAG_INSECURE",
    "--tls-cert": "MEDIATAG_TLS_CERT",
    "--tls-key": "MEDIATAG_TLS_KEY",
    "--tls-client-ca": "MEDIATAG_TLS_CLIENT_CA",
    "--tls-ca": "MEDIATAG_TLS_CA",
    "--log-level": "MEDIATAG_LOG_LEVEL",
    "--log-format": "MEDIATAG_LOG_FORMAT",
    "--request-read-timeout": "MEDIATAG_REQUEST_READ_TIMEOUT",
    "--max-connections": "MEDIATAG_MAX_CONNECTIONS",
    "--max-calls": "MEDIATAG_MAX_CALLS",
    "--max-waiting-requests": "MEDIATAG_MAX_WAITING_REQUESTS",
    "--max-waiting-requests-per-caller": "MEDIATAG_MAX_WAITING_REQUESTS_PER_CALLER",
    "--stream-window": "MEDIATAG_STREAM_WINDOW",
    "--max-health-streams": "MEDIATAG_MAX_HEALTH_STREAMS",
    "--max-health-streams-per-peer": "MEDIATAG_MAX_HEALTH_STREAMS_PER_PEER",
}
INGEST_SERVE = {
    "--analysis-address": "MEDIATAG_ANALYSIS_ADDRESS",
    "--ingest-database-url": "MEDIATAG_INGEST_DATABASE_URL",
    "--max-files": "MEDIATAG_MAX_FILES",
    "--max-image-bytes": "MEDIATAG_MAX_IMAGE_BYTES",
    "--max-image-pixels": "MEDIATAG_MAX_IMAGE_PIXELS",
    "--max-video-bytes": "MEDIATAG_MAX_VIDEO_BYTES",
    "--max-owner-id-length": "MEDIATAG_MAX_OWNER_ID_LENGTH",
    "--max-category-length": "MEDIATAG_MAX_CATEGORY_LENGTH",
    "--max-context-entries": "MEDIATAG_MAX_CONTEXT_ENTRIES",
    "--max-context-value-length": "MEDIATAG_MAX_CONTEXT_VALUE_LENGTH",
    "--max-filename-length": "MEDIATAG_MAX_FILENAME_LENGTH",
    "--request-id-retention": "MEDIATAG_REQUEST_ID_RETENTION",
    "--upload-idle-timeout": "MEDIATAG_UPLOAD_IDLE_TIMEOUT",
    "--blob-store": "MEDIATAG_BLOB_STORE",
    "--blob-store-endpoint": "MEDIATAG_BLOB_STORE_ENDPOINT",
    "--blob-store-timeout": "MEDIATAG_BLOB_STORE_TIMEOUT",
    "--blob-sweep-grace": "MEDIATAG_BLOB_SWEEP_GRACE",
    "--blob-sweep-interval": "MEDIATAG_BLOB_SWEEP_INTERVAL",
    "--ingest-metrics-port": "MEDIATAG_INGEST_METRICS_PORT",
    "--ingest-request-memory": "MEDIATAG_INGEST_REQUEST_MEMORY",
    "--upload-min-rate": "MEDIATAG_UPLOAD_MIN_RATE",
    "--max-upload-streams": "MEDIATAG_MAX_UPLOAD_STREAMS",
    "--max-upload-streams-per-caller": "MEDIATAG_MAX_UPLOAD_STREAMS_PER_CALLER",
    "--content-read-idle-timeout": "MEDIATAG_CONTENT_READ_IDLE_TIMEOUT",
    "--max-content-reads": "MEDIATAG_MAX_CONTENT_READS",
    "--max-content-reads-per-caller": "MEDIATAG_MAX_CONTENT_READS_PER_CALLER",
    "--webhooks-file": "MEDIATAG_WEBHOOKS_FILE",
    "--max-webhook-endpoints": "MEDIATAG_MAX_WEBHOOK_ENDPOINTS",
    "--webhook-concurrency": "MEDIATAG_WEBHOOK_CONCURRENCY",
    "--webhook-timeout": "MEDIATAG_WEBHOOK_TIMEOUT",
    "--webhook-initial-backoff": "MEDIATAG_WEBHOOK_INITIAL_BACKOFF",
    "--webhook-max-backoff": "MEDIATAG_WEBHOOK_MAX_BACKOFF",
    "--webhook-retry-period": "MEDIATAG_WEBHOOK_RETRY_PERIOD",
}
ANALYSIS_SERVE = {
    "--ingest-address": "MEDIATAG_INGEST_ADDRESS",
    "--analysis-database-url": "MEDIATAG_ANALYSIS_DATABASE_URL",
    "--analyzer": "MEDIATAG_ANALYZER",
    "--gcp-project": "MEDIATAG_GCP_PROJECT",
    "--gcp-location": "MEDIATAG_GCP_LOCATION",
    "--vision-endpoint": "MEDIATAG_VISION_ENDPOINT",
    "--vertex-endpoint": "MEDIATAG_VERTEX_ENDPOINT",
    "--google-insecure": "MEDIATAG_GOOGLE_INSECURE",
    "--embedding-model": "MEDIATAG_EMBEDDING_MODEL",
    "--refine-tags": "MEDIATAG_REFINE_TAGS",
    "--gemini-model": "MEDIATAG_GEMINI_MODEL",
    "--min-label-score": "MEDIATAG_MIN_LABEL_SCORE",
    "--google-timeout": "MEDIATAG_GOOGLE_TIMEOUT",
    "--embedding-dimensions": "MEDIATAG_EMBEDDING_DIMENSIONS",
    "--workers": "MEDIATAG_WORKERS",
    "--analyzer-processes": "MEDIATAG_ANALYZER_PROCESSES",
    "--rate-limit": "MEDIATAG_RATE_LIMITS",
    "--max-attempts": "MEDIATAG_MAX_ATTEMPTS",
    "--backoff-base": "MEDIATAG_BACKOFF_BASE",
    "--lease-seconds": "MEDIATAG_LEASE_SECONDS",
    "--bookmark-interval": "MEDIATAG_BOOKMARK_INTERVAL",
    "--max-watchers": "MEDIATAG_MAX_WATCHERS",
    "--watch-buffer": "MEDIATAG_WATCH_BUFFER",
    "--delivery-pacing": "MEDIATAG_DELIVERY_PACING",
    "--event-retention": "MEDIATAG_EVENT_RETENTION",
    "--event-retention-count": "MEDIATAG_EVENT_RETENTION_COUNT",
    "--compaction-interval": "MEDIATAG_COMPACTION_INTERVAL",
    "--analysis-metrics-port": "MEDIATAG_ANALYSIS_METRICS_PORT",
    "--analysis-request-memory": "MEDIATAG_ANALYSIS_REQUEST_MEMORY",
    "--max-watch-media-ids": "MEDIATAG_MAX_WATCH_MEDIA_IDS",
    "--max-watchers-per-caller": "MEDIATAG_MAX_WATCHERS_PER_CALLER",
    "--max-service-watchers": "MEDIATAG_MAX_SERVICE_WATCHERS",
}
WEB_SERVE = {
    "--web-port": "MEDIATAG_WEB_PORT",
    "--ingest-address": "MEDIATAG_INGEST_ADDRESS",
    "--analysis-address": "MEDIATAG_ANALYSIS_ADDRESS",
    "--event-keepalive": "MEDIATAG_EVENT_KEEPALIVE",
    "--max-event-streams": "MEDIATAG_MAX_EVENT_STREAMS",
    "--max-event-streams-per-caller": "MEDIATAG_MAX_EVENT_STREAMS_PER_CALLER",
    "--web-max-connections": "MEDIATAG_WEB_MAX_CONNECTIONS",
}
# Every client command takes these; None: a flag without a variable.
CLIENT = {
    "--ingest": "MEDIATAG_INGEST_ADDRESS",
    "--analysis": "MEDIATAG_ANALYSIS_ADDRESS",
    "--timeout": "MEDIATAG_TIMEOUT",
    "--token": "MEDIATAG_TOKEN",
    "--tls": "MEDIATAG_TLS",
    "--tls-ca": "MEDIATAG_TLS_CA",
    "--tls-cert": "MEDIATAG_TLS_CERT",
    "--tls-key": "MEDIATAG_TLS_KEY",
    "--json": None,
}

EXPECTED: dict[str, dict[str, str | None]] = {
    "serve": {**SHARED_SERVE, **INGEST_SERVE, **ANALYSIS_SERVE, **WEB_SERVE},
    "serve web": {**SHARED_SERVE, **WEB_SERVE},
    "serve ingest": {**SHARED_SERVE, **INGEST_SERVE},
    "serve analysis": {**SHARED_SERVE, **ANALYSIS_SERVE},
    "upload": {
        **CLIENT,
        **dict.fromkeys(["--owner", "--category", "--context", "--priority", "--watch"]),
    },
    "watch": {**CLIENT, **dict.fromkeys(["--owner", "--since", "--initial", "--until-terminal"])},
    "get": {**CLIENT, "--embedding": None},
    "ls": {**CLIENT, **dict.fromkeys(["--owner", "--status", "--limit"])},
    "queue": {**CLIENT, "--watch": None},
    "retry": {**CLIENT, **dict.fromkeys(["--failed", "--owner"])},
    "pause": CLIENT,
    "resume": CLIENT,
    "webhooks": {**CLIENT, **dict.fromkeys(["--state", "--endpoint", "--owner", "--limit"])},
    "retry-webhooks": {**CLIENT, "--endpoint": None},
}
_ENV_IN_HELP = re.compile(r"\(env (MEDIATAG_\w+);")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _command(path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path.split():
        parser = _subcommands(parser)[name]
    return parser


def _flags(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    """Each flag of ``parser`` with the environment variable its help names (or None)."""
    flags: dict[str, str | None] = {}
    for action in parser._actions:
        for flag in action.option_strings:
            found = _ENV_IN_HELP.search(action.help or "")
            flags[flag] = found.group(1) if found else None
    return flags


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_no_flag_or_variable_is_renamed_or_removed(command: str) -> None:
    flags = _flags(_command(command))
    missing = {flag: env for flag, env in EXPECTED[command].items() if flags.get(flag, "") != env}
    assert not missing, f"mediatag {command} lost or renamed: {missing}"
