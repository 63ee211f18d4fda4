"""Typed configuration of the ingest service (filled from flags/env by the CLI only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mediatag_common.tls import ClientTls, ServerTls

MIB = 1024 * 1024


@dataclass(frozen=True)
class UploadLimits:
    """What one upload may contain; refusals beyond these are INVALID_ARGUMENT."""

    max_files: int = 32
    max_image_bytes: int = 20 * MIB
    max_video_bytes: int = 512 * MIB
    # Pillow's own default: a decompression bomb is refused, however small the file.
    max_image_pixels: int = 89_478_485
    max_owner_id_length: int = 128
    max_category_length: int = 128
    max_context_entries: int = 32
    max_context_value_length: int = 1024
    max_filename_length: int = 255

    @property
    def largest_file_bytes(self) -> int:
        """No file of any kind may be larger than this."""
        return max(self.max_image_bytes, self.max_video_bytes)


@dataclass(frozen=True)
class IngestConfig:
    """Everything the ingest service needs to run."""

    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: Path = Path("data/ingest")
    # Defaults to an SQLite file in data_dir.
    database_url: str | None = None
    sqlite_synchronous: str = "FULL"
    analysis_address: str = "127.0.0.1:50052"
    limits: UploadLimits = field(default_factory=UploadLimits)
    # One UploadMedia message; larger uploads go through UploadMediaStream.
    max_message_bytes: int = 128 * MIB
    # How long an upload's request_id is remembered (AIP-155 asks for at least a day), and
    # how often expired ones are purged.
    request_id_retention: float = 24 * 3600.0
    request_id_purge_interval: float = 600.0
    # A streamed upload that sends nothing for this long is ended (UPLOAD_STALLED) and its
    # partial file removed.
    stream_idle_timeout: float = 120.0
    outbox_batch_size: int = 100
    outbox_initial_backoff: float = 0.5
    outbox_max_backoff: float = 30.0
    mirror_initial_backoff: float = 0.5
    mirror_max_backoff: float = 30.0
    grace_period: float = 10.0
    # Security (all off by default, as on loopback). With a tokens file every call but health
    # and reflection needs a bearer token; ``tls`` serves TLS (mutual with a client CA);
    # ``peer_tls`` and ``service_token`` are how this service reaches the analysis service.
    tokens_file: Path | None = None
    tls: ServerTls | None = None
    peer_tls: ClientTls | None = None
    service_token: str | None = field(default=None, repr=False)
    # Prometheus metrics at http://host:metrics_port/metrics; None = off (the CLI's default is
    # 9451, an embedded service grabs no port unasked); 0 picks a free port.
    metrics_port: int | None = None
    # How often the metrics read from the database (outbox backlog) are refreshed.
    metrics_refresh_interval: float = 5.0

    @property
    def resolved_database_url(self) -> str:
        from mediatag_common.database import sqlite_url

        return self.database_url or sqlite_url(str(self.data_dir / "ingest.db"))
