"""A small test PKI with exact control of key types, serials, SANs and validity.

trustme covers the common case (tests/helpers.py); these tests also need RSA
and ECDSA leaves side by side, SAN URIs on client certificates, expired and
not-yet-valid certificates, and serials to tell certificates apart.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ecdsa", "rsa"]
Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _key(kind: KeyType) -> Key:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class Leaf:
    cert: Path
    key: Path
    serial: int

    def pair(self) -> dict[str, str]:
        return {"cert": str(self.cert), "key": str(self.key)}


class CA:
    """A self-signed root that issues server and client leaves into a directory."""

    def __init__(self, directory: Path, name: str = "tlsproxy test CA") -> None:
        self.directory = directory
        self.name = name
        self.key = _key("ecdsa")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_usage(cert_sign=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = directory / f"{name.replace(' ', '-')}.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        stem: str,
        *names: str,
        uris: tuple[str, ...] = (),
        key_type: KeyType = "ecdsa",
        client: bool = False,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        ou: str | None = None,
    ) -> Leaf:
        now = datetime.now(UTC)
        key = _key(key_type)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tlsproxy tests")]
        if ou is not None:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else stem))
        subject = x509.Name(attributes)
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(not_before or now - timedelta(hours=1))
            .not_valid_after(not_after or now + timedelta(days=90))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(_usage(cert_sign=False), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        leaf = Leaf(self.directory / f"{stem}.pem", self.directory / f"{stem}.key", serial)
        leaf.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        leaf.key.write_bytes(_pem_key(key))
        return leaf

    def crl(
        self,
        path: Path,
        *revoked: int,
        last_update: datetime | None = None,
        next_update: datetime | None = None,
    ) -> Path:
        """A PEM CRL of this CA revoking the serials `revoked`, written to `path`."""
        now = datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(last_update or now - timedelta(hours=1))
            .next_update(next_update or now + timedelta(days=7))
        )
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - timedelta(minutes=5))
                .build()
            )
        crl = builder.sign(self.key, hashes.SHA256())
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return path

    def trust(self, context: ssl.SSLContext) -> ssl.SSLContext:
        context.load_verify_locations(cafile=str(self.ca_file))
        return context


def self_signed(directory: Path, stem: str, *names: str) -> Leaf:
    """A leaf that is its own issuer (a server still on its default
    certificate): valid dates and the right names, but no CA vouches for it."""
    key = _key("ecdsa")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else stem)])
    now = datetime.now(UTC)
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=90))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    leaf = Leaf(directory / f"{stem}.pem", directory / f"{stem}.key", serial)
    leaf.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    leaf.key.write_bytes(_pem_key(key))
    return leaf


def client_context(ca: CA | None = None, leaf: Leaf | None = None) -> ssl.SSLContext:
    """A client that trusts `ca` (or nothing) and presents `leaf` (or nothing)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        ca.trust(context)
    if leaf is not None:
        context.load_cert_chain(str(leaf.cert), str(leaf.key))
    return context


def served_serial(der: bytes | None) -> int:
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@dataclass
class Seen:
    """What a client saw of one handshake."""

    serial: int
    version: str | None
    alpn: str | None
    reused: bool
    session: ssl.SSLSession | None
    reply: bytes


def handshake(
    port: int,
    context: ssl.SSLContext,
    server_hostname: str | None = "localhost",
    *,
    session: ssl.SSLSession | None = None,
    payload: bytes = b"ping",
    close_notify: bool = False,
) -> Seen:
    """A blocking stdlib client (run it in a thread): handshake, one echo
    round trip (which also collects TLS 1.3 tickets), then close: with a
    bare FIN, or (`close_notify`) the clean TLS end, both ways."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=20.0) as sock,
        context.wrap_socket(sock, server_hostname=server_hostname, session=session) as tls,
    ):
        tls.sendall(payload)
        reply = tls.recv(1024)
        seen = Seen(
            serial=served_serial(tls.getpeercert(binary_form=True)),
            version=tls.version(),
            alpn=tls.selected_alpn_protocol(),
            reused=bool(tls.session_reused),
            session=tls.session,
            reply=reply,
        )
        if close_notify:
            tls.unwrap()
        return seen
