"""A throwaway certificate authority for the TLS tests, made with ``cryptography``.

EC P-256 keys: generated in milliseconds, and BoringSSL (inside grpcio) takes them.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """A test CA with a server certificate (127.0.0.1, ::1, localhost; also usable as a
    client certificate, as a service uses it towards the other) and a client certificate;
    plus a second, untrusted CA with a client certificate of its own."""

    ca: Path
    server: Issued
    client: Issued
    other_ca: Path
    stranger: Issued


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _builder(
    subject: str,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    valid: tuple[datetime.datetime, datetime.datetime] | None = None,
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = valid or (
        now - datetime.timedelta(minutes=5),
        # Longer than the service's expiry warning (14 days), as a real certificate is.
        now + datetime.timedelta(days=90),
    )
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _make_ca(directory: Path, name: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Name]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    cert = (
        _builder(name, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    _write_cert(cert, path)
    return path, key, subject


def _issue(
    directory: Path,
    name: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    *,
    server: bool,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = _builder(name, ca_name, key.public_key()).add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True
    )
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
    cert = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False).sign(
        ca_key, hashes.SHA256()
    )
    issued = Issued(directory / f"{name}.pem", directory / f"{name}.key")
    _write_cert(cert, issued.cert)
    _write_key(key, issued.key)
    return issued


def make_pki(directory: Path) -> Pki:
    """Write a CA, its server and client certificates, and a stranger's, into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key, ca_name = _make_ca(directory, "test-ca")
    other_ca, other_key, other_name = _make_ca(directory, "other-ca")
    return Pki(
        ca=ca,
        server=_issue(directory, "server", ca_key, ca_name, server=True),
        client=_issue(directory, "client", ca_key, ca_name, server=False),
        other_ca=other_ca,
        stranger=_issue(directory, "stranger", other_key, other_name, server=False),
    )


def make_self_signed(
    directory: Path, name: str, not_before: datetime.datetime, not_after: datetime.datetime
) -> Issued:
    """A self-signed certificate for 127.0.0.1, valid from ``not_before`` to ``not_after``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(name, _name(name), key.public_key(), (not_before, not_after))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    issued = Issued(directory / f"{name}.pem", directory / f"{name}.key")
    _write_cert(cert, issued.cert)
    _write_key(key, issued.key)
    return issued
