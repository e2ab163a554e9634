import contextlib
import ipaddress
import socket
import ssl
import stat
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from proxy.certs import EXPIRY_WARNING, Finding, check_pair, load_leaf
from proxy.selfsigned import default_state_dir, ensure_self_signed

HANDSHAKE_TIMEOUT = 5.0  # seconds; loopback handshakes take milliseconds


def serial(cert: Path) -> int:
    return load_leaf(cert).serial_number


def handshake(cert: Path, key: Path, hostname: str) -> None:
    """A real TLS handshake over a socketpair: our pair as the server, a client
    that trusts only `cert` and checks `hostname` the way curl --cacert does."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=cert)
    client_sock, server_sock = socket.socketpair()
    for sock in (client_sock, server_sock):
        sock.settimeout(HANDSHAKE_TIMEOUT)

    def serve() -> None:
        with server_context.wrap_socket(server_sock, server_side=True) as tls:
            tls.recv(1)  # stays open until the client has verified and hung up

    with ThreadPoolExecutor(max_workers=1) as pool, client_sock, server_sock:
        server = pool.submit(serve)
        try:
            with client_context.wrap_socket(client_sock, server_hostname=hostname):
                pass
        finally:
            client_sock.close()
            # The server's side only fails because the client rejected it.
            with contextlib.suppress(ssl.SSLError, OSError):
                server.result(timeout=HANDSHAKE_TIMEOUT)


def test_creates_a_private_state_dir_and_key(tmp_path: Path) -> None:
    state_dir = tmp_path / "state" / "tlsproxy"
    cert, key = ensure_self_signed(state_dir)
    assert (cert, key) == (state_dir / "cert.pem", state_dir / "key.pem")
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert sorted(path.name for path in state_dir.iterdir()) == ["cert.pem", "key.pem"]
    assert check_pair(cert, key, datetime.now(UTC)).errors == []


def test_certificate_contents(tmp_path: Path) -> None:
    leaf = load_leaf(ensure_self_signed(tmp_path)[0])
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.key_cert_sign
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    lifetime = leaf.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=364) < lifetime <= timedelta(days=365)


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "::1"])
def test_certificate_verifies_in_a_real_handshake(tmp_path: Path, hostname: str) -> None:
    handshake(*ensure_self_signed(tmp_path), hostname=hostname)


def test_certificate_is_only_valid_for_localhost(tmp_path: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(*ensure_self_signed(tmp_path), hostname="example.com")


def test_reuses_existing_files(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path)
    first = serial(cert)
    assert ensure_self_signed(tmp_path) == (cert, key)
    assert serial(cert) == first


@pytest.mark.parametrize("damaged", ["cert.pem", "key.pem"])
def test_regenerates_garbage(tmp_path: Path, damaged: str) -> None:
    cert, key = ensure_self_signed(tmp_path)
    first = serial(cert)
    (tmp_path / damaged).write_text("garbage\n")
    ensure_self_signed(tmp_path)
    assert serial(cert) != first
    assert check_pair(cert, key, datetime.now(UTC)).errors == []


def test_regenerates_mismatched_key(tmp_path: Path) -> None:
    cert, key = ensure_self_signed(tmp_path)
    first = serial(cert)
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(str(key))
    ensure_self_signed(tmp_path)
    assert serial(cert) != first
    assert check_pair(cert, key, datetime.now(UTC)).errors == []


def test_regenerates_when_expiring_soon(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    leaf = trustme.CA().issue_cert(
        "localhost", not_before=now - timedelta(days=300), not_after=now + timedelta(days=3)
    )
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert, _ = ensure_self_signed(tmp_path)
    assert load_leaf(cert).not_valid_after_utc - now > EXPIRY_WARNING


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("TLSPROXY_STATE_DIR", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert default_state_dir() == tmp_path / ".local" / "state" / "tlsproxy"
    monkeypatch.setenv("XDG_STATE_HOME", "/var/state")
    assert default_state_dir() == Path("/var/state/tlsproxy")
    monkeypatch.setenv("TLSPROXY_STATE_DIR", "/srv/tlsproxy")
    assert default_state_dir() == Path("/srv/tlsproxy")


def write_chain(path: Path, certs: list[bytes]) -> Path:
    path.write_bytes(b"".join(certs))
    return path


def test_chain_leaf_first_is_accepted(tmp_path: Path) -> None:
    leaf = trustme.CA().create_child_ca().issue_cert("localhost")
    cert = write_chain(tmp_path / "chain.pem", [pem.bytes() for pem in leaf.cert_chain_pems])
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    check = check_pair(cert, tmp_path / "key.pem", datetime.now(UTC))
    assert (check.errors, check.warnings) == ([], [])
    assert (
        load_leaf(cert).serial_number
        == x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
    )


def test_chain_out_of_order_is_an_error(tmp_path: Path) -> None:
    leaf = trustme.CA().create_child_ca().issue_cert("localhost")
    leaf_pem, intermediate_pem = (pem.bytes() for pem in leaf.cert_chain_pems[:2])
    cert = write_chain(tmp_path / "chain.pem", [leaf_pem, leaf_pem, intermediate_pem])
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    check = check_pair(cert, tmp_path / "key.pem", datetime.now(UTC))
    assert check.errors == [
        Finding(
            "cert",
            f"certificate 1 in {cert} was not issued by certificate 2; "
            "the chain must be in order, leaf first",
        )
    ]


def test_only_rsa_and_ec_keys(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .sign(key, None)
    )
    cert = write_chain(tmp_path / "cert.pem", [leaf.public_bytes(serialization.Encoding.PEM)])
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    check = check_pair(cert, tmp_path / "key.pem", now)
    assert check.errors == [
        Finding("key", f"only RSA and EC keys are supported: {tmp_path / 'key.pem'}")
    ]


def test_not_yet_valid_is_a_warning(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    leaf = trustme.CA().issue_cert(
        "localhost", not_before=now + timedelta(days=1), not_after=now + timedelta(days=90)
    )
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    check = check_pair(tmp_path / "cert.pem", tmp_path / "key.pem", now)
    assert check.errors == []
    assert [finding.file for finding in check.warnings] == ["cert"]
    assert "is not valid until" in check.warnings[0].message
