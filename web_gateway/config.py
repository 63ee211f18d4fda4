"""Typed configuration of the web gateway (filled from flags/env by the CLI only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mediatag_common.grpc_server import is_loopback
from mediatag_common.tls import ClientTls, ServerTls

MIB = 1024 * 1024


@dataclass(frozen=True)
class EventsConfig:
    """Server-Sent Events and the upstream ``WatchStatus`` streams they share."""

    # An SSE connection that has sent nothing for this long gets a bookmark event, so
    # proxies keep it open and the client holds a recent revision to resume from.
    keepalive_interval: float = 15.0
    # Open SSE connections at most; beyond, 429 RESOURCE_EXHAUSTED/TOO_MANY_EVENT_STREAMS.
    max_streams: int = 10_000
    # Distinct filters watched upstream at once (one WatchStatus each); beyond, 429
    # RESOURCE_EXHAUSTED/TOO_MANY_FILTERS.
    max_filters: int = 256
    # Media ids one filter may name.
    max_media_ids: int = 1000
    # Recent events each shared watch keeps, so a reconnecting client resumes from memory.
    replay_events: int = 4096
    # Events an SSE connection may fall behind before it is closed (it reconnects with
    # Last-Event-ID and resumes), and how long one write to it may wait for the client.
    stream_buffer: int = 1024
    write_timeout: float = 30.0
    # Clients resuming from further back than a shared watch remembers read the event log
    # through a watch of their own until they catch up; at most this many at once (the
    # others wait, with keep-alives).
    max_catch_ups: int = 32
    # A shared watch without subscribers is kept this long for clients that reconnect.
    linger: float = 30.0
    # Reconnecting to the analysis service after a watch broke off.
    reconnect_initial_backoff: float = 0.2
    reconnect_max_backoff: float = 5.0


@dataclass(frozen=True)
class SessionConfig:
    """Browser sessions: the page trades a token for an HttpOnly cookie once."""

    # A session unused this long ends (the page asks for the token again).
    idle_timeout: float = 12 * 3600.0
    # Sessions one principal may hold; a new one ends its least recently used.
    max_per_principal: int = 64


@dataclass(frozen=True)
class WebConfig:
    """Everything the web gateway needs to run."""

    host: str = "127.0.0.1"
    port: int = 8450
    ingest_address: str = "127.0.0.1:50051"
    analysis_address: str = "127.0.0.1:50052"
    # Deadline of each unary call to a service.
    call_timeout: float = 30.0
    events: EventsConfig = field(default_factory=EventsConfig)
    sessions: SessionConfig = field(default_factory=SessionConfig)
    # A multipart upload of several files is one UploadMedia call, held in memory until
    # sent: at most this many bytes (one file alone is streamed, up to ingest's own limits).
    max_batch_upload_bytes: int = 128 * MIB
    # Uploads in progress at once; beyond, 429 RESOURCE_EXHAUSTED/TOO_MANY_UPLOADS.
    max_concurrent_uploads: int = 16
    grace_period: float = 10.0
    # Security, as for the gRPC ports (README "Security"). With a tokens file every API call
    # needs a bearer token or a session; ``service_token`` (role service) is the gateway's
    # own credential for the WatchStatus streams it shares among browsers. ``tls`` serves
    # HTTPS (and marks the session cookie Secure); ``peer_tls`` reaches the services.
    tokens_file: Path | None = None
    service_token: str | None = field(default=None, repr=False)
    tls: ServerTls | None = None
    peer_tls: ClientTls | None = None
    # Serving beyond loopback without a tokens file or without TLS needs this.
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.tokens_file is not None and not self.service_token:
            raise ValueError(
                "with a tokens file the web gateway watches the analysis service with a "
                "service token: give --service-token-file (or MEDIATAG_SERVICE_TOKEN)"
            )
        if is_loopback(self.host) or self.insecure:
            return
        if self.tokens_file is None:
            raise ValueError(
                f"the web gateway binds {self.host}, which other machines can reach, without "
                "--tokens-file: give --tokens-file, or --insecure if that is what you want"
            )
        if self.tls is None:
            raise ValueError(
                f"the web gateway binds {self.host}, which other machines can reach, without "
                "TLS: tokens and session cookies would cross the network in clear text; give "
                "--tls-cert and --tls-key, or --insecure if that is what you want"
            )

    @property
    def authenticated(self) -> bool:
        return self.tokens_file is not None
