"""Typed configuration of the ingest service, with the flag and variable of each setting."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from mediatag_common.service_config import MIB, ServiceConfig, peer_address
from mediatag_common.settings import redeclared, setting
from mediatag_common.values import (
    byte_size,
    format_byte_size,
    non_negative_int,
    positive_float,
    positive_int,
    word,
)


@dataclass(frozen=True)
class UploadLimits:
    """What one upload may contain; refusals beyond these are INVALID_ARGUMENT."""

    max_files: int = setting(
        32, flag="--max-files", help="files per upload", parse=positive_int, metavar="N"
    )
    max_image_bytes: int = setting(
        20 * MIB,
        flag="--max-image-bytes",
        help="largest image, e.g. 20MiB",
        parse=byte_size,
        metavar="SIZE",
        show=format_byte_size,
    )
    max_video_bytes: int = setting(
        512 * MIB,
        flag="--max-video-bytes",
        help="largest video, e.g. 512MiB",
        parse=byte_size,
        metavar="SIZE",
        show=format_byte_size,
    )
    # Pillow's own default: a decompression bomb is refused, however small the file.
    max_image_pixels: int = setting(
        89_478_485,
        flag="--max-image-pixels",
        help="largest image in pixels (decompression bomb guard)",
        parse=positive_int,
        metavar="N",
    )
    max_owner_id_length: int = setting(
        128, flag="--max-owner-id-length", help="longest owner id", parse=positive_int, metavar="N"
    )
    max_category_length: int = setting(
        128, flag="--max-category-length", help="longest category", parse=positive_int, metavar="N"
    )
    max_context_entries: int = setting(
        32,
        flag="--max-context-entries",
        help="context entries per upload",
        parse=non_negative_int,
        metavar="N",
    )
    max_context_value_length: int = setting(
        1024,
        flag="--max-context-value-length",
        help="longest context value",
        parse=positive_int,
        metavar="N",
    )
    max_filename_length: int = setting(
        255, flag="--max-filename-length", help="longest filename", parse=positive_int, metavar="N"
    )

    @property
    def largest_file_bytes(self) -> int:
        """No file of any kind may be larger than this."""
        return max(self.max_image_bytes, self.max_video_bytes)


@dataclass(frozen=True)
class IngestConfig(ServiceConfig):
    """Everything the ingest service needs to run."""

    SERVICE: ClassVar[str] = "ingest"

    port: int = redeclared(ServiceConfig, "port", 50051)
    data_dir: Path = redeclared(ServiceConfig, "data_dir", Path("data/ingest"))
    # One UploadMedia message; larger uploads go through UploadMediaStream.
    max_message_bytes: int = 128 * MIB
    metrics_port: int | None = redeclared(ServiceConfig, "metrics_port", None, command_default=9451)
    analysis_address: str = setting(
        "127.0.0.1:50052",
        flag="--analysis-address",
        help="where the ingest service reaches analysis",
        parse=word,
        metavar="ADDR",
        shown_default="HOST:ANALYSIS_PORT",
        default_from=peer_address("analysis"),
    )
    limits: UploadLimits = field(default_factory=UploadLimits)
    # How long an upload's request_id is remembered (AIP-155 asks for at least a day), and
    # how often expired ones are purged.
    request_id_retention: float = setting(
        24 * 3600.0,
        flag="--request-id-retention",
        help="seconds an upload's request_id is remembered: a retry within it gets the first "
        "answer",
        parse=positive_float,
        metavar="SECONDS",
    )
    request_id_purge_interval: float = 600.0
    # A streamed upload that sends nothing for this long is ended (UPLOAD_STALLED) and its
    # partial file removed.
    stream_idle_timeout: float = setting(
        120.0,
        flag="--upload-idle-timeout",
        help="an UploadMediaStream that sends nothing for this long is ended and its partial "
        "file removed",
        parse=positive_float,
        metavar="SECONDS",
    )
    outbox_batch_size: int = 100
    outbox_initial_backoff: float = 0.5
    outbox_max_backoff: float = 30.0
    mirror_initial_backoff: float = 0.5
    mirror_max_backoff: float = 30.0
