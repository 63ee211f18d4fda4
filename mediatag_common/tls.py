"""TLS for the services' ports and for the channels that reach them (mutual TLS optional).

Paths only here; the files are read when a server is built or a channel opened, so a
renewed certificate is picked up on restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from mediatag_common.settings import setting


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and key (PEM); with ``client_ca_file``, clients must
    present a certificate that CA signed (mutual TLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        client_ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


@dataclass(frozen=True)
class ClientTls:
    """How a client verifies a server (``ca_file``; None = the system's roots) and, for
    mutual TLS, the certificate and key it presents."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes() if self.ca_file else None,
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )


@dataclass(frozen=True)
class ServiceTls:
    """The PEM files a service serves TLS with and reaches the other service with.

    With a certificate (and its key) the service serves TLS, and presents the same certificate
    to the other service when asked for a client certificate; the other service is reached
    over TLS when this one serves TLS or a CA for it is named.
    """

    cert_file: Path | None = setting(
        None,
        flag="--tls-cert",
        help="PEM certificate chain to serve TLS with; also presented to the other service "
        "when it asks for a client certificate",
        parse=Path,
        metavar="FILE",
        shown_default="none: plaintext",
        shared=True,
    )
    key_file: Path | None = setting(
        None,
        flag="--tls-key",
        help="PEM private key of --tls-cert",
        parse=Path,
        metavar="FILE",
        shown_default="none",
        shared=True,
    )
    # Clients must present a certificate this CA signed (mutual TLS).
    client_ca_file: Path | None = setting(
        None,
        flag="--tls-client-ca",
        help="require client certificates signed by this CA (mutual TLS)",
        parse=Path,
        metavar="FILE",
        shown_default="none: no client certificates",
        shared=True,
    )
    # The CA that signed the other service's certificate; None: the system's roots.
    peer_ca_file: Path | None = setting(
        None,
        flag="--tls-ca",
        help="CA that signed the other service's certificate; with it or --tls-cert the "
        "services reach each other over TLS",
        parse=Path,
        metavar="FILE",
        shown_default="the system's roots",
        shared=True,
    )

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")

    @property
    def server(self) -> ServerTls | None:
        """What the service serves with; None: plaintext."""
        if self.cert_file is None or self.key_file is None:
            return None
        return ServerTls(self.cert_file, self.key_file, self.client_ca_file)

    @property
    def peer(self) -> ClientTls | None:
        """How the service reaches the other one; None: plaintext."""
        if self.cert_file is None and self.peer_ca_file is None:
            return None
        return ClientTls(self.peer_ca_file, self.cert_file, self.key_file)
