"""TLS for the services' ports and for the channels that reach them (mutual TLS optional).

Paths only here; the files are read when a server is built or a channel opened, so a
renewed certificate is picked up on restart. They are checked as they are read: gRPC itself
would take a file that is no certificate, or a key of another certificate, and fail later as
"Failed to bind" or in every peer's handshake.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mediatag_common.settings import setting

logger = logging.getLogger(__name__)

# A certificate that expires sooner than this is warned about at start.
EXPIRY_WARNING = datetime.timedelta(days=14)


class TlsFileError(RuntimeError):
    """A TLS file cannot be used; the message names the file and what is wrong with it."""


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TlsFileError(f"{path}: {error.strerror or error}") from error


def _certificates(path: Path) -> tuple[bytes, list[x509.Certificate]]:
    """The PEM bytes of ``path`` and the certificates in it (at least one)."""
    pem = _read(path)
    try:
        return pem, x509.load_pem_x509_certificates(pem)
    except ValueError as error:
        raise TlsFileError(f"{path}: no PEM certificate in it") from error


def _check_dates(path: Path, certificates: list[x509.Certificate]) -> None:
    """Refuse an expired certificate, whose peers would refuse every handshake; warn of one
    that expires soon or is not valid yet (a clock behind, or issued for later)."""
    now = datetime.datetime.now(datetime.UTC)
    for certificate in certificates:
        subject = certificate.subject.rfc4514_string() or "(no subject)"
        expiry = certificate.not_valid_after_utc
        if expiry <= now:
            raise TlsFileError(
                f"{path}: the certificate {subject} expired on {expiry:%Y-%m-%d %H:%M} UTC"
            )
        if expiry - now < EXPIRY_WARNING:
            logger.warning(
                "%s: the certificate %s expires on %s UTC: renew it",
                path,
                subject,
                f"{expiry:%Y-%m-%d %H:%M}",
            )
        if certificate.not_valid_before_utc > now:
            logger.warning(
                "%s: the certificate %s is not valid before %s UTC: peers refuse it until then",
                path,
                subject,
                f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M}",
            )


def _chain_and_key(cert_file: Path, key_file: Path) -> tuple[bytes, bytes]:
    """The PEM certificate chain and its private key, checked: certificates that parse and
    are not expired, and the key of the first of them."""
    chain, certificates = _certificates(cert_file)
    _check_dates(cert_file, certificates)
    key_pem = _read(key_file)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as error:
        raise TlsFileError(f"{key_file}: no PEM private key in it") from error
    except TypeError as error:
        raise TlsFileError(
            f"{key_file}: the key has a passphrase, which gRPC cannot take"
        ) from error
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*public) != certificates[0].public_key().public_bytes(*public):
        raise TlsFileError(f"{key_file}: not the private key of the certificate in {cert_file}")
    return chain, key_pem


def _ca(path: Path) -> bytes:
    """The PEM certificates of a CA file, checked to parse (an expired one is the CA's
    business: it may have been renewed beside it in the same file)."""
    return _certificates(path)[0]


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate chain and key (PEM); with ``client_ca_file``, clients must
    present a certificate that CA signed (mutual TLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC's credentials of the files, checked first (:class:`TlsFileError`)."""
        chain, key = _chain_and_key(self.cert_file, self.key_file)
        client_ca = _ca(self.client_ca_file) if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(key, chain)],
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
        """gRPC's credentials of the files, checked first (:class:`TlsFileError`)."""
        chain, key = (None, None)
        if self.cert_file is not None and self.key_file is not None:
            chain, key = _chain_and_key(self.cert_file, self.key_file)
        return grpc.ssl_channel_credentials(
            root_certificates=_ca(self.ca_file) if self.ca_file else None,
            private_key=key,
            certificate_chain=chain,
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
