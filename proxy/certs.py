"""Certificate checks: a pair, a chain, a CA bundle and its CRLs, read and judged.

Everything here reads files and returns findings instead of raising, so that
`check-config` and a SIGHUP reload can report every problem at once and keep
serving the old certificates when a new one is broken. Messages say what is
wrong and what to do; the caller adds the TOML path.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Literal, NamedTuple, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

# Two weeks is long enough to renew through a normal change window, and matches
# the point where cert-manager/ACME clients have long since retried (they renew
# at 30 days left), so a warning here means renewal is really stuck.
EXPIRY_WARNING = timedelta(days=14)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
KeyType = Literal["rsa", "ecdsa"]  # the only key types _load_key accepts
T = TypeVar("T")


class Finding(NamedTuple):
    """One problem, attributed to the file it is about."""

    file: Literal["cert", "key"]
    message: str


@dataclass(frozen=True)
class PairMaterial:
    """A certificate pair as read and checked, once: what OpenSSL is given
    and what the expiry metric describes, whatever the files hold later."""

    cert_pem: bytes
    key_pem: bytes
    leaf: x509.Certificate  # what clients check and what expires

    @property
    def key_type(self) -> KeyType:
        """The certificate slot OpenSSL keeps the pair in: one per key type."""
        return "rsa" if isinstance(self.leaf.public_key(), rsa.RSAPublicKey) else "ecdsa"

    @property
    def dns_names(self) -> tuple[str, ...]:
        """The leaf's DNS SANs: the names SNI selects it by."""
        try:
            san = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return ()
        return tuple(san.value.get_values_for_type(x509.DNSName))


@dataclass
class CertCheck:
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    material: PairMaterial | None = None  # when there are no errors


def load_leaf(cert: Path) -> x509.Certificate:
    """Raises OSError or ValueError; the leaf is what clients check and what expires."""
    return _load_chain(cert)[1][0]


def check_pair(cert: Path, key: Path, now: datetime) -> CertCheck:
    """Everything that would make a handshake with this pair fail, found up
    front; each file is read once, and what was read is kept on success."""
    check = CertCheck()
    cert_read = _read(cert, "cert", _load_chain, check)
    key_read = _read(key, "key", _load_key, check)
    if cert_read is not None:
        cert_pem, chain = cert_read
        _check_chain(chain, cert, now, check)
        if key_read is not None:
            key_pem, private_key = key_read
            if not _matches(chain[0], private_key):
                check.errors.append(Finding("key", f"key does not match certificate {cert}"))
            elif not check.errors:
                check.material = PairMaterial(cert_pem, key_pem, chain[0])
    return check


def read_ca_bundle(path: Path) -> tuple[bytes, list[x509.Certificate]] | str:
    """The bundle's bytes and certificates, or why it cannot be a CA bundle."""
    check = CertCheck()
    read = _read(path, "cert", _load_chain, check)
    if read is None:
        return check.errors[0].message.replace("PEM cert file", "PEM CA bundle")
    return read


# ---------------------------------------------------------------------------
# The verify store: client CAs and their CRLs

_CRL_BEGIN = b"-----BEGIN X509 CRL-----"

# Where a verify-store finding belongs, relative to the TLS table:
# ("client_ca",) or ("client_crl", index).
Where = tuple[str] | tuple[str, int]


@dataclass(frozen=True)
class CRL:
    """One certificate revocation list as read and checked."""

    file: Path
    pem: bytes
    issuer: str  # RFC 4514, the CA in client_ca that signed it
    next_update: datetime | None  # after it OpenSSL refuses every client of this CA


@dataclass(frozen=True)
class VerifyMaterial:
    """The client CA bundle and its CRLs as read and checked, once: what
    OpenSSL's verify store is given, whatever the files hold later."""

    ca_pem: bytes
    crls: tuple[CRL, ...]

    @property
    def pem(self) -> bytes:
        """CAs and CRLs in one PEM text: OpenSSL's file lookup loads both."""
        return b"\n".join((self.ca_pem, *(crl.pem for crl in self.crls)))


@dataclass
class VerifyCheck:
    errors: list[tuple[Where, str]] = field(default_factory=list)
    warnings: list[tuple[Where, str]] = field(default_factory=list)
    material: VerifyMaterial | None = None  # when there are no errors


def check_verify_store(ca_file: Path, crl_files: tuple[Path, ...], now: datetime) -> VerifyCheck:
    """Read the client CA bundle and every CRL file once and check that
    OpenSSL can verify clients with them.

    With CRLs, OpenSSL checks the leaf against its issuer's CRL and refuses a
    client whose issuer has none (`unable to get certificate CRL`), or whose
    CRL is past its nextUpdate (`CRL has expired`), or not yet valid. Errors,
    then: a CRL not signed by a CA of the bundle (its signature is checked),
    two CRLs of one CA, and a CA of the bundle without a CRL unless it issues
    another CA of the bundle (a root above an intermediate: only the CA that
    issued the client's own certificate is asked for a CRL). A CRL out of its
    validity is a warning, logged again at every reload: the config is right,
    the CRL's publisher is late, and every client of that CA is refused until
    a fresh one is loaded.
    """
    check = VerifyCheck()
    bundle = read_ca_bundle(ca_file)
    if isinstance(bundle, str):
        check.errors.append((("client_ca",), bundle))
        return check
    ca_pem, cas = bundle
    crls: list[CRL] = []
    by_issuer: dict[str, int] = {}
    for index, path in enumerate(crl_files):
        where: Where = ("client_crl", index)
        for crl in _read_crls(path, where, check):
            issuer = crl.issuer.rfc4514_string()
            if issuer in by_issuer:
                check.errors.append(
                    (
                        where,
                        f"a second CRL of {issuer!r} (the first is in "
                        f"client_crl[{by_issuer[issuer]}]); keep only the newest: {path}",
                    )
                )
                continue
            if not _signed_by_one_of(crl, cas):
                check.errors.append(
                    (
                        where,
                        f"CRL of {issuer!r} is not signed by any CA in client_ca "
                        f"({ca_file}): {path}",
                    )
                )
                continue
            by_issuer[issuer] = index
            check.warnings += [(where, p) for p in _crl_time_problems(crl, issuer, path, now)]
            crls.append(
                CRL(path, crl.public_bytes(serialization.Encoding.PEM), issuer, crl.next_update_utc)
            )
    if crl_files:
        issuers = {cert.issuer for cert in cas if cert.issuer != cert.subject}
        for ca in cas:
            subject = ca.subject.rfc4514_string()
            if ca.subject not in issuers and subject not in by_issuer:
                check.errors.append(
                    (
                        ("client_crl",),
                        f"no CRL for {subject!r} of client_ca: with client_crl "
                        "set, every client certificate it issues would be refused "
                        '(client_cert_error = "crl_missing"); add its CRL',
                    )
                )
    if not check.errors:
        check.material = VerifyMaterial(ca_pem, tuple(crls))
    return check


def _read_crls(
    path: Path, where: Where, check: VerifyCheck
) -> list[x509.CertificateRevocationList]:
    findings = CertCheck()
    pem = _read(path, "cert", Path.read_bytes, findings)
    if pem is None:
        check.errors.append((where, findings.errors[0].message))
        return []
    blocks = [_CRL_BEGIN + block for block in pem.split(_CRL_BEGIN)[1:]]
    try:
        crls = [x509.load_pem_x509_crl(block) for block in blocks]
    except ValueError:
        crls = []
    if not crls:
        check.errors.append(
            (where, f"not a PEM CRL file: {path} (expected '-----BEGIN X509 CRL-----')")
        )
    return crls


def _signed_by_one_of(crl: x509.CertificateRevocationList, cas: list[x509.Certificate]) -> bool:
    for ca in cas:
        if ca.subject != crl.issuer:
            continue
        key = ca.public_key()
        if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
            with suppress(InvalidSignature, TypeError, ValueError):
                if crl.is_signature_valid(key):
                    return True
    return False


def _crl_time_problems(
    crl: x509.CertificateRevocationList, issuer: str, path: Path, now: datetime
) -> list[str]:
    problems = []
    next_update = crl.next_update_utc
    if next_update is not None and next_update <= now:
        problems.append(
            f"CRL of {issuer!r} expired on {next_update:%Y-%m-%d %H:%M}Z (its nextUpdate): "
            "OpenSSL refuses every client certificate this CA issued "
            f'(client_cert_error = "crl_expired") until a new CRL is loaded: {path}'
        )
    if crl.last_update_utc > now:
        problems.append(
            f"CRL of {issuer!r} is not valid until {crl.last_update_utc:%Y-%m-%d %H:%M}Z "
            "(its lastUpdate): OpenSSL refuses every client certificate this CA issued "
            f'(client_cert_error = "crl_not_yet_valid") until then: {path}'
        )
    return problems


def _load_chain(cert: Path) -> tuple[bytes, list[x509.Certificate]]:
    pem = cert.read_bytes()
    return pem, x509.load_pem_x509_certificates(pem)


def _load_key(key: Path) -> tuple[bytes, PrivateKey]:
    pem = key.read_bytes()
    try:
        private_key = serialization.load_pem_private_key(pem, password=None)
    except TypeError as exc:  # cryptography's way of saying "needs a password"
        raise _Unusable(
            f"encrypted keys are not supported: {key} "
            f"(decrypt it, e.g. `openssl pkey -in {key.name} -out plain-{key.name}`)"
        ) from exc
    if not isinstance(private_key, PrivateKey):
        raise _Unusable(f"only RSA and EC keys are supported: {key}")
    return pem, private_key


class _Unusable(ValueError):
    """A file that parsed but cannot be used; its message is the finding."""


def _read(
    path: Path, file: Literal["cert", "key"], load: Callable[[Path], T], check: CertCheck
) -> T | None:
    try:
        return load(path)
    except FileNotFoundError:
        problem = (
            f"file not found: {path} (relative paths are relative to the config file's directory)"
        )
    except IsADirectoryError:
        problem = f"is a directory, not a file: {path}"
    except PermissionError:
        problem = f"permission denied: {path} (the proxy's user must be able to read it)"
    except OSError as exc:
        problem = f"cannot read {path}: {exc.strerror}"
    except _Unusable as exc:
        problem = str(exc)
    except ValueError:
        expected = "CERTIFICATE" if file == "cert" else "PRIVATE KEY"
        problem = f"not a PEM {file} file: {path} (expected '-----BEGIN {expected}-----')"
    check.errors.append(Finding(file, problem))
    return None


def _check_chain(
    chain: list[x509.Certificate], cert: Path, now: datetime, check: CertCheck
) -> None:
    leaf = chain[0]
    expires = leaf.not_valid_after_utc
    if expires <= now:
        check.errors.append(Finding("cert", f"certificate expired on {expires:%Y-%m-%d}: {cert}"))
    elif expires - now < EXPIRY_WARNING:
        days = (expires - now).days
        check.warnings.append(
            Finding("cert", f"certificate expires in {days} days ({expires:%Y-%m-%d}): {cert}")
        )
    if leaf.not_valid_before_utc > now:
        starts = leaf.not_valid_before_utc
        check.warnings.append(
            Finding("cert", f"certificate is not valid until {starts:%Y-%m-%d %H:%M}Z: {cert}")
        )
    try:
        leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        check.warnings.append(
            Finding(
                "cert",
                f"certificate has no subjectAltName, so SNI cannot select it and most "
                f"clients (browsers, Go, Python) reject it; reissue it with the DNS names "
                f"as SANs: {cert}",
            )
        )
    for position, (child, parent) in enumerate(pairwise(chain), start=1):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            check.errors.append(
                Finding(
                    "cert",
                    f"certificate {position} in {cert} was not issued by certificate "
                    f"{position + 1}; the chain must be in order, leaf first",
                )
            )


def _matches(leaf: x509.Certificate, private_key: PrivateKey) -> bool:
    def spki(public_key: CertificatePublicKeyTypes) -> bytes:
        return public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    return spki(leaf.public_key()) == spki(private_key.public_key())
