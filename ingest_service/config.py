"""Typed configuration of the ingest service, with the flag and variable of each setting."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

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
class WebhookConfig:
    """Webhooks: the endpoints file, and how deliveries are sent and retried."""

    # None: no webhooks (nothing is enqueued).
    file: Path | None = setting(
        None,
        flag="--webhooks-file",
        help="TOML file of webhook endpoints (name, url, secret, optional owners and "
        "statuses), re-read when it changes",
        parse=Path,
        metavar="FILE",
        shown_default="none: no webhooks",
    )
    max_endpoints: int = setting(
        32,
        flag="--max-webhook-endpoints",
        help="endpoints the webhooks file may name (a file with more is refused)",
        parse=positive_int,
        metavar="N",
    )
    # Attempts in flight per endpoint; every endpoint has its own, so a slow one holds only
    # its own. All endpoints together: max_endpoints times this.
    concurrency: int = setting(
        4,
        flag="--webhook-concurrency",
        help="attempts in flight per endpoint",
        parse=positive_int,
        metavar="N",
    )
    timeout: float = setting(
        10.0,
        flag="--webhook-timeout",
        help="seconds one attempt may take (connecting, sending, the answer's status)",
        parse=positive_float,
        metavar="SECONDS",
    )
    initial_backoff: float = setting(
        5.0,
        flag="--webhook-initial-backoff",
        help="seconds before the first retry of a failed delivery; doubling, jittered",
        parse=positive_float,
        metavar="SECONDS",
    )
    max_backoff: float = setting(
        3600.0,
        flag="--webhook-max-backoff",
        help="longest delay between two attempts of a delivery",
        parse=positive_float,
        metavar="SECONDS",
    )
    retry_period: float = setting(
        24 * 3600.0,
        flag="--webhook-retry-period",
        help="seconds a delivery is retried for before it is dead (listed, retryable by hand)",
        parse=positive_float,
        metavar="SECONDS",
    )
    # How often the file is checked for a change, and an idle endpoint looks for deliveries
    # enqueued by other replicas (its own are sent at once).
    reload_interval: float = 5.0
    poll_interval: float = 2.0

    def __post_init__(self) -> None:
        if self.max_backoff < self.initial_backoff:
            raise ValueError("--webhook-max-backoff is shorter than --webhook-initial-backoff")


BLOB_STORE_SCHEMES = ("file", "gs", "s3")


@dataclass(frozen=True)
class StreamLimits:
    """What ``UploadMediaStream`` calls may hold: each is ended after ``idle_timeout`` seconds
    of silence, or when it brings less than ``min_rate`` bytes per second over a window of
    ``rate_window`` seconds; at most ``max_streams`` are open, ``max_streams_per_caller`` of
    one caller (None: half of them)."""

    idle_timeout: float
    min_rate: int
    rate_window: float
    max_streams: int
    max_streams_per_caller: int | None


@dataclass(frozen=True)
class ContentReadLimits:
    """What ``ReadMediaContent`` streams may hold: each is ended once its client has taken
    nothing for ``idle_timeout`` seconds; at most ``max_reads`` are open, ``max_reads_per_caller``
    of one caller (None: half of them), and each service token has ``max_reads`` of its own."""

    idle_timeout: float
    max_reads: int
    max_reads_per_caller: int | None


@dataclass(frozen=True)
class BlobStoreUrl:
    """Where the blobs are: ``file:///path``, ``gs://bucket/prefix`` or ``s3://bucket/prefix``."""

    scheme: str
    # The bucket; empty for a local directory.
    bucket: str
    # A directory for ``file``; the key prefix (maybe empty) in the bucket otherwise.
    path: str

    @classmethod
    def parse(cls, text: str) -> BlobStoreUrl:
        """Raises ValueError for a URL of no store."""
        parts = urlsplit(text)
        if parts.scheme not in BLOB_STORE_SCHEMES or parts.query or parts.fragment:
            raise ValueError(
                f"{text!r} is no blob store URL: file:///path, gs://bucket/prefix or "
                "s3://bucket/prefix"
            )
        if parts.scheme == "file":
            if parts.netloc or not parts.path.startswith("/"):
                raise ValueError(f"{text!r}: a file URL names an absolute path, file:///path")
            return cls("file", "", parts.path)
        if not parts.netloc:
            raise ValueError(f"{text!r} names no bucket")
        return cls(parts.scheme, parts.netloc, parts.path.strip("/"))


def blob_store_url(text: str) -> str:
    BlobStoreUrl.parse(text)
    return text


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
    webhooks: WebhookConfig = field(default_factory=WebhookConfig)
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
    # A stream that brings less than this many bytes per second, on average over a window of
    # ``upload_rate_window`` seconds, is ended (UPLOAD_TOO_SLOW): a client dripping a byte now
    # and then holds a file and a slot for no upload. 16 KiB/s is a 128 kbit/s link; a phone
    # uploading 500 MB at 2 Mbit/s brings 15 times that.
    upload_min_rate: int = setting(
        16 * 1024,
        flag="--upload-min-rate",
        help="bytes per second an UploadMediaStream must bring on average over each two "
        "minutes, e.g. 16KiB",
        parse=byte_size,
        metavar="SIZE",
        show=format_byte_size,
    )
    upload_rate_window: float = 120.0
    # Streams held at once: each holds a temp file (a descriptor) and a message in memory.
    max_upload_streams: int = setting(
        64,
        flag="--max-upload-streams",
        help="UploadMediaStream calls open at once (RESOURCE_EXHAUSTED TOO_MANY_UPLOAD_STREAMS "
        "beyond); unary uploads are not counted",
        parse=positive_int,
        metavar="N",
    )
    # One caller's share of them (a token, or a peer address without authentication); None:
    # half of them.
    max_upload_streams_per_caller: int | None = setting(
        None,
        flag="--max-upload-streams-per-caller",
        help="UploadMediaStream calls one token (without --tokens-file: one peer address) may "
        "have open at once",
        parse=positive_int,
        metavar="N",
        shown_default="half of --max-upload-streams",
    )
    # ReadMediaContent streams: each holds an open blob (a descriptor) and a call, so a client
    # that opens them and never reads must neither hold them for ever nor take them all.
    content_read_idle_timeout: float = setting(
        60.0,
        flag="--content-read-idle-timeout",
        help="a ReadMediaContent whose client takes nothing for this long is ended and its "
        "blob closed",
        parse=positive_float,
        metavar="SECONDS",
    )
    max_content_reads: int = setting(
        64,
        flag="--max-content-reads",
        help="ReadMediaContent calls of clients open at once (RESOURCE_EXHAUSTED "
        "TOO_MANY_CONTENT_READS beyond); each service token has as many of its own",
        parse=positive_int,
        metavar="N",
    )
    # None: half of them.
    max_content_reads_per_caller: int | None = setting(
        None,
        flag="--max-content-reads-per-caller",
        help="ReadMediaContent calls one token (without --tokens-file: one peer address) may "
        "have open at once",
        parse=positive_int,
        metavar="N",
        shown_default="half of --max-content-reads",
    )

    # None: the directory ``blobs`` in data_dir, the layout every version had.
    blob_store: str | None = setting(
        None,
        flag="--blob-store",
        help="where blobs are kept: file:///path, gs://bucket/prefix (Cloud Storage, "
        "Application Default Credentials) or s3://bucket/prefix (S3 or compatible, the AWS "
        "credential chain)",
        parse=blob_store_url,
        metavar="URL",
        shown_default="file://DIR/ingest/blobs",
    )
    # An S3-compatible service's address (MinIO, Ceph, R2...); None: AWS's own.
    blob_store_endpoint: str | None = setting(
        None,
        flag="--blob-store-endpoint",
        help="endpoint of an S3-compatible store, e.g. https://minio.example:9000 (s3:// only)",
        parse=word,
        metavar="URL",
        shown_default="AWS",
    )
    # One call to Cloud Storage, its retries included; one attempt of a call to S3.
    blob_store_timeout: float = setting(
        30.0,
        flag="--blob-store-timeout",
        help="seconds one call to a Cloud Storage blob store may take, retries included; on "
        "S3, each attempt of a call (to connect, and to read; a call makes up to 4)",
        parse=positive_float,
        metavar="SECONDS",
    )
    # Blobs no row names (left by a crash between blob and row) and temporary objects are
    # removed once older than the grace period, which must be far longer than an upload.
    blob_sweep_grace: float = setting(
        3600.0,
        flag="--blob-sweep-grace",
        help="seconds a blob no media names (a crash's leftover) is kept before the sweep "
        "removes it",
        parse=positive_float,
        metavar="SECONDS",
    )
    # None: the grace period and the longest a stream may last (longest_upload_stream), since
    # S3 dates an object made of parts from the start of its upload.
    blob_sweep_temporary_grace: float | None = setting(
        None,
        flag="--blob-sweep-temporary-grace",
        help="seconds a stream's temporary object in a bucket (a crash's leftover) is kept "
        "before the sweep removes it",
        parse=positive_float,
        metavar="SECONDS",
        shown_default="the grace period and the longest a stream may last",
    )
    blob_sweep_interval: float = setting(
        3600.0,
        flag="--blob-sweep-interval",
        help="seconds between two sweeps of the blob store (the first runs at start)",
        parse=positive_float,
        metavar="SECONDS",
    )
    outbox_batch_size: int = 100
    outbox_initial_backoff: float = 0.5
    outbox_max_backoff: float = 30.0
    mirror_initial_backoff: float = 0.5
    mirror_max_backoff: float = 30.0

    def __post_init__(self) -> None:
        super().__post_init__()
        location = self.blob_store_location
        if self.blob_store_endpoint is not None:
            if location.scheme != "s3":
                raise ValueError("--blob-store-endpoint is for an s3:// blob store")
            endpoint = urlsplit(self.blob_store_endpoint)
            if endpoint.scheme not in ("http", "https") or not endpoint.netloc:
                raise ValueError(
                    "--blob-store-endpoint must be an http:// or https:// URL, e.g. "
                    "https://minio.example:9000"
                )

    @property
    def blob_store_location(self) -> BlobStoreUrl:
        """The blob store, its default (``data_dir/blobs``) resolved."""
        if self.blob_store is None:
            return BlobStoreUrl("file", "", str((self.data_dir / "blobs").absolute()))
        return BlobStoreUrl.parse(self.blob_store)

    @property
    def temporary_blob_grace(self) -> float:
        """Seconds a temporary object is kept: by default the grace period and the longest
        the slowest stream of the largest file may last (it must bring ``upload_min_rate``
        bytes a second over each window)."""
        if self.blob_sweep_temporary_grace is not None:
            return self.blob_sweep_temporary_grace
        longest_stream = self.limits.largest_file_bytes / self.upload_min_rate
        return self.blob_sweep_grace + longest_stream + self.upload_rate_window

    @property
    def stream_limits(self) -> StreamLimits:
        """The bounds of one stream and of all streams (see ``domain.stream_pace``)."""
        return StreamLimits(
            idle_timeout=self.stream_idle_timeout,
            min_rate=self.upload_min_rate,
            rate_window=self.upload_rate_window,
            max_streams=self.max_upload_streams,
            max_streams_per_caller=self.max_upload_streams_per_caller,
        )

    @property
    def content_read_limits(self) -> ContentReadLimits:
        """The bounds of ``ReadMediaContent`` streams (see ``domain.content_reads``)."""
        return ContentReadLimits(
            idle_timeout=self.content_read_idle_timeout,
            max_reads=self.max_content_reads,
            max_reads_per_caller=self.max_content_reads_per_caller,
        )
