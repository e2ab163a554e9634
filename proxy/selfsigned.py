"""The default certificate: self-signed, for a newcomer's first run with no config.

Kept in a state directory and reused while healthy (checked as any
configured pair is, by proxy/certs.py), renewed before it gets close to
expiry, written atomically.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.certs import check_pair

# The default certificate only serves a newcomer's first run; a year keeps it
# out of the way, and ensure_self_signed() renews it before it gets close.
SELF_SIGNED_LIFETIME = timedelta(days=365)

# Backdate the self-signed certificate so a client whose clock runs a little
# behind ours does not reject it as "not yet valid".
CLOCK_SKEW = timedelta(minutes=5)

SELF_SIGNED_HOSTS = ("localhost", "127.0.0.1", "::1")


def ensure_self_signed(state_dir: Path) -> tuple[Path, Path]:
    """Reuse the default certificate while it is healthy, so a browser exception
    or `curl --cacert` set up by the user keeps working across restarts."""
    cert, key = state_dir / "cert.pem", state_dir / "key.pem"
    now = datetime.now(UTC)
    check = check_pair(cert, key, now)
    if check.errors or check.warnings:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert_pem, key_pem = _self_signed(now)
        _write_atomically(key, key_pem, 0o600)
        _write_atomically(cert, cert_pem, 0o644)
    return cert, key


def default_state_dir() -> Path:
    if explicit := os.environ.get("TLSPROXY_STATE_DIR"):
        return Path(explicit)
    state_home = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state_home) / "tlsproxy"


def _self_signed(now: datetime) -> tuple[bytes, bytes]:
    """CA=true lets the certificate be its own trust anchor, which is what
    `curl --cacert cert.pem https://localhost:8443/` needs."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    public_key = key.public_key()
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SELF_SIGNED_HOSTS[1:]]
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + SELF_SIGNED_LIFETIME)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """A crash mid-write must never leave a truncated key that the next start
    would reject; readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
