"""Test-time PKI: a CA, a server certificate for 127.0.0.1/localhost, a client
certificate from that CA, and a client certificate from an unrelated rogue CA.

EC P-256 keys keep generation instant. Certificates carry the extensions strict
verifiers insist on (basic constraints, key usage, SKI/AKI, EKU), so they also pass
``VERIFY_X509_STRICT``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca_cert: Path
    rogue_client_cert: Path
    rogue_client_key: Path


@dataclass(frozen=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "refloop tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(
    common_name: str,
    issuer: _Issued | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    signer = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.cert.subject if issuer else _name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(_key_usage(ca=ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    )
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
    return _Issued(builder.sign(signer, hashes.SHA256()), key)


def _write_cert(path: Path, issued: _Issued) -> Path:
    path.write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, issued: _Issued) -> Path:
    path.write_bytes(
        issued.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def make_pki(directory: Path) -> Pki:
    """Write a fresh PKI into ``directory`` (PEM files) and return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _issue("refloop test CA", None, ca=True)
    server = _issue("localhost", ca, server=True)
    client = _issue("test-sender", ca)
    rogue_ca = _issue("refloop test CA", None, ca=True)  # an impostor: same name
    rogue_client = _issue("test-sender", rogue_ca)  # same subject, wrong issuer
    d = directory
    return Pki(
        ca_cert=_write_cert(d / "ca.pem", ca),
        server_cert=_write_cert(d / "server.pem", server),
        server_key=_write_key(d / "server.key", server),
        client_cert=_write_cert(d / "client.pem", client),
        client_key=_write_key(d / "client.key", client),
        rogue_ca_cert=_write_cert(d / "rogue-ca.pem", rogue_ca),
        rogue_client_cert=_write_cert(d / "rogue-client.pem", rogue_client),
        rogue_client_key=_write_key(d / "rogue-client.key", rogue_client),
    )
