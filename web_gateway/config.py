"""Typed configuration of the web gateway, with the flag and variable of each setting.

Where the gateway shares a setting with the services (the address it binds, the tokens
file, TLS...), it redeclares theirs: one flag, one variable, one value for all of
``mediatag serve``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from mediatag_common.grpc_server import is_loopback
from mediatag_common.service_config import (
    HANDSHAKE_TIMEOUT,
    MIB,
    ServiceConfig,
    default_max_connections,
    peer_address,
    require_positive,
)
from mediatag_common.settings import redeclared, setting
from mediatag_common.tls import ClientTls, ServerTls, ServiceTls
from mediatag_common.values import port, positive_float, positive_int, word

# Connections for the API's calls, beside the event streams.
_API_CONNECTIONS = 1000


@dataclass(frozen=True)
class EventsConfig:
    """Server-Sent Events and the upstream ``WatchStatus`` streams they share."""

    # An SSE connection that has sent nothing for this long gets a bookmark event, so
    # proxies keep it open and the client holds a recent revision to resume from.
    keepalive_interval: float = setting(
        15.0,
        flag="--event-keepalive",
        help="an event stream that sent nothing for this long gets a bookmark event",
        parse=positive_float,
        metavar="SECONDS",
    )
    # Open SSE connections at most; beyond, 429 RESOURCE_EXHAUSTED/TOO_MANY_EVENT_STREAMS.
    max_streams: int = setting(
        10_000,
        flag="--max-event-streams",
        help="open event streams (Server-Sent Events) the web gateway serves at once",
        parse=positive_int,
        metavar="N",
    )
    # One caller's share of them (a token or session, or without a tokens file a peer
    # address); None: half of them. Beyond, 429 TOO_MANY_EVENT_STREAMS_FOR_CALLER.
    max_streams_per_caller: int | None = setting(
        None,
        flag="--max-event-streams-per-caller",
        help="event streams one token (without --tokens-file: one peer address) may have "
        "open at once",
        parse=positive_int,
        metavar="N",
        shown_default="half of --max-event-streams",
    )
    # Distinct filters watched upstream at once (one WatchStatus each); beyond, 429
    # RESOURCE_EXHAUSTED/TOO_MANY_FILTERS. With max_catch_ups and the ingest service's own
    # watch, within the analysis service's --max-service-watchers (100) of one service token.
    max_filters: int = 64
    # The distinct filters one caller's streams may be on (None: half of max_filters), so
    # that one client naming a new filter per stream cannot take them all; beyond, 429
    # TOO_MANY_FILTERS_FOR_CALLER. A service token is bound by max_filters alone.
    max_filters_per_caller: int | None = None
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
    max_catch_ups: int = 16
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

    # The name ``mediatag serve`` knows it by.
    SERVICE: ClassVar[str] = "web"

    host: str = redeclared(ServiceConfig, "host", "127.0.0.1")
    port: int = setting(
        8450, flag="--web-port", help="port of the web gateway", parse=port, metavar="PORT"
    )
    ingest_address: str = setting(
        "127.0.0.1:50051",
        flag="--ingest-address",
        help="where the web gateway reaches ingest",
        parse=word,
        metavar="ADDR",
        shown_default="HOST:INGEST_PORT",
        default_from=peer_address("ingest"),
    )
    analysis_address: str = setting(
        "127.0.0.1:50052",
        flag="--analysis-address",
        help="where the web gateway reaches analysis",
        parse=word,
        metavar="ADDR",
        shown_default="HOST:ANALYSIS_PORT",
        default_from=peer_address("analysis"),
    )
    # Deadline of each unary call to a service, and how long a streamed call (content, a
    # streamed upload) waits for the service's next message or to take one of ours: a stuck
    # service ends the call (504 INGEST_TIMEOUT) however long its transfer may take.
    call_timeout: float = 30.0
    events: EventsConfig = field(default_factory=EventsConfig)
    sessions: SessionConfig = field(default_factory=SessionConfig)
    # A multipart upload of several files is one UploadMedia call, held in memory until
    # sent: at most this many bytes (one file alone is streamed, up to ingest's own limits).
    max_batch_upload_bytes: int = 128 * MIB
    # Uploads in progress at once; beyond, 429 RESOURCE_EXHAUSTED/TOO_MANY_UPLOADS. One
    # caller's share (None: half); beyond, 429 TOO_MANY_UPLOADS_FOR_CALLER.
    max_concurrent_uploads: int = 16
    max_uploads_per_caller: int | None = None
    # An upload whose client sends nothing for this long is refused (504
    # DEADLINE_EXCEEDED/UPLOAD_STALLED) and gives its place back.
    upload_idle_timeout: float = 60.0
    # A write of content to a client that does not read it waits this long, then the
    # connection is closed and the service's call ended.
    content_write_timeout: float = 30.0
    # A connection with no request in progress (idle, or still sending a request's line and
    # headers) is closed after this long: aiohttp's own default is an hour.
    keepalive_timeout: float = 75.0
    # A TLS handshake not done by then ends its connection (and gives its place back).
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    # None: events.max_streams and 1000 more, or a quarter of the open-file limit.
    max_connections: int | None = setting(
        None,
        flag="--web-max-connections",
        help="connections the web gateway holds at once; beyond, a new one is answered 503 "
        "UNAVAILABLE/TOO_MANY_CONNECTIONS and closed",
        parse=positive_int,
        metavar="N",
        shown_default="--max-event-streams + 1000, or a quarter of the open-file limit if less",
    )
    grace_period: float = redeclared(ServiceConfig, "grace_period", 10.0)
    # Security, as for the gRPC ports (README "Security"). With a tokens file every API call
    # needs a bearer token or a session; ``service_token`` (role service) is the gateway's
    # own credential for the WatchStatus streams it shares among browsers. With a
    # certificate it serves HTTPS (and marks the session cookie Secure), and reaches the
    # services over TLS as they reach each other.
    tokens_file: Path | None = redeclared(ServiceConfig, "tokens_file", None)
    service_token: str | None = redeclared(ServiceConfig, "service_token", None)
    insecure: bool = redeclared(ServiceConfig, "insecure", False)
    tls_files: ServiceTls = field(default_factory=ServiceTls)

    def __post_init__(self) -> None:
        require_positive(self, "max_connections", "max_uploads_per_caller")
        require_positive(self.events, "max_streams_per_caller", "max_filters_per_caller")
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
    def connection_bound(self) -> int:
        """How many connections the gateway holds at once: each event stream is one, and the
        API's calls need some beside them."""
        if self.max_connections is not None:
            return self.max_connections
        return default_max_connections(self.events.max_streams + _API_CONNECTIONS)

    @property
    def tls(self) -> ServerTls | None:
        """What the gateway serves HTTPS with; None: plain HTTP. Browsers sign in with
        tokens: the gRPC ports' client CA (mutual TLS) is not asked of them."""
        files = self.tls_files
        if files.cert_file is None or files.key_file is None:
            return None
        return ServerTls(files.cert_file, files.key_file)

    @property
    def peer_tls(self) -> ClientTls | None:
        """How the gateway reaches the services over TLS; None: plaintext."""
        return self.tls_files.peer
