"""The settings both services share: where a service listens and keeps its data, how it drains,
how it is secured and where its metrics are. Each service's config extends :class:`ServiceConfig`.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from mediatag_common.grpc_server import ServerLimits, is_loopback
from mediatag_common.request_bodies import RequestLimits
from mediatag_common.settings import Lookup, setting
from mediatag_common.tls import ClientTls, ServerTls, ServiceTls
from mediatag_common.values import (
    SQLITE_SYNCHRONOUS_MODES,
    byte_size,
    format_byte_size,
    non_negative_float,
    port,
    port_or_off,
    positive_float,
    positive_int,
    secret,
    sqlite_synchronous,
    word,
)

KIB = 1024
MIB = 1024 * KIB
# HTTP/2 windows: gRPC's default, and the protocol's largest (RFC 9113, 6.9.1).
_MIN_STREAM_WINDOW, _MAX_STREAM_WINDOW = 64 * KIB, 2**31 - 1
# Seconds a new connection has to finish its handshake (TLS, the HTTP/2 preface).
HANDSHAKE_TIMEOUT = 20.0
# Calls that may wait for the request memory by default, and the stream windows they may
# hold between them (1000 of the default 64 KiB window).
MAX_WAITING_REQUESTS = 1000
WAITING_WINDOWS_BYTES = 64 * MIB
# Hosts that mean "every interface": fine to bind, but not an address to connect to.
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


def connect_address(host: str, port_number: int) -> str:
    """A gRPC target that reaches ``host:port``; a wildcard bind host becomes loopback."""
    host = _WILDCARD_HOSTS.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port_number}"


def peer_address(peer: str) -> Callable[[Lookup], str]:
    """The default address of the ``peer`` service: this host, the peer's port."""

    def derive(lookup: Lookup) -> str:
        peer_port: int = lookup(f"--{peer}-port")
        if peer_port == 0:
            raise ValueError(
                f"a port of 0 is only known once bound, so --{peer}-address (or "
                f"MEDIATAG_{peer.upper()}_ADDRESS) must say where the other service is"
            )
        return connect_address(lookup("--host"), peer_port)

    return derive


def _own_directory(root: Path, service: str) -> Path:
    return root / service


def _check_database_url(service: str, url: str) -> None:
    from mediatag_common.database import database_url

    try:
        database_url(url)
    except ValueError as error:
        # Not the URL itself: it may hold a password.
        raise ValueError(f"the {service} database URL cannot be used: {error}") from None


def require_positive(config: object, *names: str) -> None:
    """Refuse ``config`` if any of the bounds ``names`` (None: not set) is below 1."""
    for name in names:
        bound = getattr(config, name)
        if bound is not None and bound < 1:
            raise ValueError(f"{name} must be positive, not {bound}")


def waiting_requests_for(stream_window: int) -> int:
    """The calls that may wait for the request memory by default: 1000, or as many as
    :data:`WAITING_WINDOWS_BYTES` of stream windows if fewer, since each may have sent a
    window of its body before it waits (1000 calls of a 1 MiB window held 1 GiB)."""
    return max(1, min(MAX_WAITING_REQUESTS, WAITING_WINDOWS_BYTES // stream_window))


def default_max_connections(wanted: int = 1000) -> int:
    """``wanted``, or a quarter of the process's open-file limit if that is less: the services
    and the web gateway may share one process, and its files, database connections and
    spooled uploads need descriptors too."""
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft_limit // 4))


@dataclass(frozen=True)
class ServiceConfig:
    """What every service needs to run. A subclass names its ``SERVICE`` (the flags of the
    settings each service has its own of are named after it) and redeclares the defaults that
    differ between services (``mediatag_common.settings.redeclared``).

    Security is off by default, as on loopback: binding an address other machines can reach
    needs a tokens file, or ``insecure``.
    """

    SERVICE: ClassVar[str]

    host: str = setting(
        "127.0.0.1", flag="--host", help="address to bind", parse=word, metavar="HOST", shared=True
    )
    # 0 picks a free port. Both services take both ports: each reaches the other on its port.
    port: int = setting(
        0,
        flag="--{service}-port",
        help="port of the {service} service",
        parse=port,
        metavar="PORT",
        shared=True,
    )
    # This service's own directory; the command names the root that holds both.
    data_dir: Path = setting(
        Path("data"),
        flag="--data-dir",
        help="data root: ingest uses DIR/ingest, analysis DIR/analysis",
        parse=Path,
        metavar="DIR",
        shown_default="./data",
        command_default=Path("data"),
        per_service=_own_directory,
        shared=True,
    )
    # None: an SQLite file in data_dir.
    database_url: str | None = setting(
        None,
        flag="--{service}-database-url",
        help="SQLAlchemy URL of the {service} database",
        parse=word,
        metavar="URL",
        shown_default="SQLite file DIR/{service}/{service}.db",
    )
    sqlite_synchronous: str = setting(
        "FULL",
        flag="--sqlite-synchronous",
        help=f"SQLite synchronous pragma: {', '.join(SQLITE_SYNCHRONOUS_MODES)}",
        parse=sqlite_synchronous,
        metavar="MODE",
        shared=True,
    )
    # The largest gRPC message, either way.
    max_message_bytes: int = 64 * MIB
    # The largest message of a request stream (an UploadMediaStream chunk): clients send 64 KiB
    # to 1 MiB; each is counted in the request memory until the stream asks for the next.
    max_stream_message_bytes: int = 4 * MIB
    # Request messages held at once: one being read counts as max_message_bytes (its size is
    # known once read), one read as its size until its call is answered. None: two messages of
    # max_message_bytes. See mediatag_common.request_bodies.
    max_request_bytes_in_flight: int | None = setting(
        None,
        flag="--{service}-request-memory",
        help="bytes of request messages the {service} service holds at once (a message being "
        "read counts as the largest allowed); further calls wait",
        parse=byte_size,
        metavar="SIZE",
        shown_default="two of its largest messages",
    )
    # None: default_max_connections().
    max_connections: int | None = setting(
        None,
        flag="--max-connections",
        help="connections each gRPC service holds at once; beyond, a new one is closed as it "
        "is accepted (its calls fail UNAVAILABLE)",
        parse=positive_int,
        metavar="N",
        shown_default="1000, or a quarter of the open-file limit if less",
        shared=True,
    )
    # Calls in progress at once, streams included: each holds a task and its work queued.
    max_calls: int = setting(
        10_000,
        flag="--max-calls",
        help="calls each gRPC service serves at once, streams included; beyond, a new one is "
        "refused RESOURCE_EXHAUSTED",
        parse=positive_int,
        metavar="N",
        shared=True,
    )
    # gRPC's own health and reflection streams (Health/Watch, ServerReflectionInfo), which need
    # no token and are not counted by max_calls: each holds a task and its queue of statuses.
    # A load balancer checks with one (or with unary Health/Check, never bounded so).
    max_health_streams: int = setting(
        100,
        flag="--max-health-streams",
        help="gRPC health (Watch) and reflection streams each service holds open at once; "
        "beyond, a new one is refused RESOURCE_EXHAUSTED",
        parse=positive_int,
        metavar="N",
        shared=True,
    )
    # One peer address's share of them; None: a tenth of them.
    max_health_streams_per_peer: int | None = setting(
        None,
        flag="--max-health-streams-per-peer",
        help="gRPC health (Watch) and reflection streams of one peer address open at once",
        parse=positive_int,
        metavar="N",
        shown_default="a tenth of --max-health-streams",
        shared=True,
    )
    # A connection that has not sent the HTTP/2 preface (and finished TLS) by then is closed.
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    # A connection without a call this long is closed with a GOAWAY (its client reconnects for
    # its next call), so idle connections do not keep others out for good.
    connection_idle_timeout: float = 300.0
    # The HTTP/2 window of each stream: what a client may send before we read it. gRPC's
    # default, 64 KiB, moves one window per round trip (3 MiB/s at 20 ms); a larger one is
    # faster over long links and is what each call not yet read may make us hold.
    stream_window: int = setting(
        64 * KIB,
        flag="--stream-window",
        help="HTTP/2 window of each gRPC stream: bytes a client may send before the service "
        "reads them; larger is faster over long round trips, and is what each call not yet "
        "authenticated or admitted may make the service hold",
        parse=byte_size,
        show=format_byte_size,
        metavar="SIZE",
        shared=True,
    )
    # Calls waiting at once for room to read their request messages: each holds a task and
    # what its client sent into the stream window (about 90 KiB with the default window, 1 MiB
    # with a 1 MiB window, measured). None: waiting_requests_for(stream_window).
    max_waiting_requests: int | None = setting(
        None,
        flag="--max-waiting-requests",
        help="calls that wait at once for room to read their request message; beyond, "
        "RESOURCE_EXHAUSTED SERVER_BUSY at once",
        parse=positive_int,
        metavar="N",
        shown_default="1000, or fewer with a stream window over 64 KiB: as many as 64 MiB of "
        "windows",
        shared=True,
    )
    # One caller's share of them (a token, or a peer address without authentication); None:
    # half of them. Each service token has max_waiting_requests places of its own.
    max_waiting_requests_per_caller: int | None = setting(
        None,
        flag="--max-waiting-requests-per-caller",
        help="calls of one token (without --tokens-file: one peer address) that wait at once "
        "for room to read their request message",
        parse=positive_int,
        metavar="N",
        shown_default="half of --max-waiting-requests",
        shared=True,
    )
    # How long a call waits for room to read its request message, and then for the message.
    request_read_timeout: float = setting(
        60.0,
        flag="--request-read-timeout",
        help="seconds a call waits for room to read its request message (RESOURCE_EXHAUSTED "
        "SERVER_BUSY), and then for the message to arrive (DEADLINE_EXCEEDED REQUEST_TOO_SLOW)",
        parse=positive_float,
        metavar="SECONDS",
        shared=True,
    )
    grace_period: float = setting(
        10.0,
        flag="--grace-period",
        help="seconds in-flight work gets to finish on SIGTERM",
        parse=non_negative_float,
        metavar="SECONDS",
        shared=True,
    )
    # With a tokens file every call but health and reflection needs a bearer token.
    tokens_file: Path | None = setting(
        None,
        flag="--tokens-file",
        help="TOML file of bearer tokens, their roles and owners; every call but health and "
        "reflection then needs a token",
        parse=Path,
        metavar="FILE",
        shown_default="none: no authentication",
        shared=True,
    )
    # The token (role service) this service calls the other one with.
    service_token: str | None = setting(
        None,
        flag="--service-token",
        help="token (role service) this service sends to the other one; prefer the variable "
        "or --service-token-file, a flag shows in the process list",
        parse=secret,
        metavar="TOKEN",
        shown_default="none",
        file_flag="--service-token-file",
        file_help="file holding the service token",
        shared=True,
        repr=False,
    )
    # Allows binding an address other machines reach without a tokens file.
    insecure: bool = setting(
        False,
        flag="--insecure",
        help="allow binding a non-loopback address without --tokens-file (anyone who reaches "
        "the port may call every method)",
        shared=True,
    )
    tls_files: ServiceTls = field(default_factory=ServiceTls)
    # Prometheus metrics at http://host:metrics_port/metrics; None: off (an embedded service
    # grabs no port unasked; `mediatag serve` serves them); 0 picks a free port.
    metrics_port: int | None = setting(
        None,
        flag="--{service}-metrics-port",
        help="port of the {service} service's Prometheus metrics (http://HOST:PORT/metrics); "
        "off disables them, 0 picks a free port",
        parse=port_or_off,
        metavar="PORT|off",
    )
    # How often the metrics read from the database are refreshed.
    metrics_refresh_interval: float = 5.0

    def __post_init__(self) -> None:
        require_positive(
            self,
            "max_connections",
            "max_calls",
            "max_health_streams",
            "max_health_streams_per_peer",
            "max_waiting_requests",
            "max_waiting_requests_per_caller",
        )
        if not _MIN_STREAM_WINDOW <= self.stream_window <= _MAX_STREAM_WINDOW:
            raise ValueError(
                f"stream_window must be between {format_byte_size(_MIN_STREAM_WINDOW)} and "
                f"{_MAX_STREAM_WINDOW} bytes, not {self.stream_window}"
            )
        if self.database_url is not None:
            _check_database_url(self.SERVICE, self.database_url)
        if self.tokens_file is None and not self.insecure and not is_loopback(self.host):
            raise ValueError(
                f"binding {self.host}, which other machines can reach, without --tokens-file "
                "lets anyone call every method: give --tokens-file, or --insecure if that is "
                "what you want"
            )

    @property
    def request_limits(self) -> RequestLimits:
        """How request messages are read (``mediatag_common.request_bodies``)."""
        return RequestLimits(
            max_message_bytes=self.max_message_bytes,
            max_bytes_in_flight=self.max_request_bytes_in_flight or 2 * self.max_message_bytes,
            read_timeout=self.request_read_timeout,
            stream_window=self.stream_window,
            max_waiting=self.max_waiting_requests or waiting_requests_for(self.stream_window),
            max_waiting_per_caller=self.max_waiting_requests_per_caller,
            max_stream_message_bytes=self.max_stream_message_bytes,
        )

    @property
    def server_limits(self) -> ServerLimits:
        """How many connections and calls the gRPC server holds, and how long idle
        connections stay."""
        return ServerLimits(
            max_connections=self.max_connections or default_max_connections(),
            handshake_timeout=self.handshake_timeout,
            idle_timeout=self.connection_idle_timeout,
            max_calls=self.max_calls,
            max_health_streams=self.max_health_streams,
            max_health_streams_per_peer=self.max_health_streams_per_peer,
        )

    @property
    def tls(self) -> ServerTls | None:
        """What the service serves TLS with; None: plaintext."""
        return self.tls_files.server

    @property
    def peer_tls(self) -> ClientTls | None:
        """How the service reaches the other one over TLS; None: plaintext."""
        return self.tls_files.peer

    @property
    def resolved_database_url(self) -> str:
        from mediatag_common.database import sqlite_url

        return self.database_url or sqlite_url(str(self.data_dir / f"{self.SERVICE}.db"))
