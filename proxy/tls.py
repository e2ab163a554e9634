"""Build a listener's server SSLContext from its TLS config; select by SNI.

Theory of operation
-------------------

`build_context(tls)` is a pure function of the `[listeners.tls]` table and
of the certificate and key bytes that validating it read
(`CertificatePair.material`): OpenSSL gets those very bytes, so what is
served is what was checked, and what the expiry metric shows, even if the
files change on disk meanwhile (the client CA bundle and its CRLs too,
`TLSConfig.verify_material`). It is the only place OpenSSL parses certificates, keys and cipher
strings: once per listener at start-up or reload, never per handshake. It
builds one complete `SSLContext` per set of certificates served together,
all with the same policy (versions, ciphers, groups, TLS 1.3 suites, ALPN,
client CA, tickets, key log), and returns the first one, the default, which
every connection is wrapped with.

A set is one certificate, or an RSA and an ECDSA one whose names overlap
(`serving_sets`): `load_cert_chain` on one context keeps one pair per key
type, and OpenSSL picks, per handshake, the one the client's
signature_algorithms (and, in TLS 1.2, its cipher list) allow. A client
that accepts both gets the ECDSA one: with OP_CIPHER_SERVER_PREFERENCE our
order decides, and ECDSA comes first in our TLS 1.2 ciphers and in OpenSSL's
signature algorithms. SNI picks the set first, by the names of its pairs.

SNI selection happens in that context's `sni_callback`, which OpenSSL calls
once per handshake right after reading the ClientHello (with `None` when the
client sent no SNI). The callback looks the name up in a prebuilt table of the
certificates' DNS SANs (`proxy.sni`: exact before wildcard) and, on a match,
switches `ssl_sock.context` to that certificate's prebuilt context
(`SSL_set_SSL_CTX`): two dict probes and a pointer swap. No match, or no SNI,
keeps the default (the first certificate).

What the switch does and does not change, in OpenSSL 3: the certificate, key
and chain, the ALPN selection callback and the verify store come from the new
context; options, verify mode and ticket count stay as the SSL object got them
from the default context; session tickets are encrypted and decrypted with the
*default* context's keys (`session_ctx` never changes). Since every context is
built by the same code, all of these agree, and a ticket issued under any
certificate resumes under the listener.

The callback also enforces the ALPN policy of RFC 7301 section 3.2: when the
listener offers protocols and the client offers only others, the handshake
fails with a `no_application_protocol` alert (outcome `alpn_mismatch`).
Python's own ALPN callback would instead carry on without ALPN, so a gRPC
client would learn of the mismatch only from a confused backend. The offered
list comes from the ClientHello the handshake loop read before OpenSSL saw
it (`HandshakeNotes.hello`); when that could not be parsed, the policy is not
applied and the handshake proceeds as Python would.

Per-connection facts (the SNI, the configured name it matched, a refusal)
travel on the SSL socket as a `HandshakeNotes`, set before the handshake by
`proxy.handshake` and filled by the callback.
"""

from __future__ import annotations

import os
import ssl
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from proxy import openssl
from proxy.certs import PairMaterial, VerifyMaterial
from proxy.clienthello import ClientHello
from proxy.config import CertificatePair, TLSConfig
from proxy.outcome import Outcome
from proxy.sni import NameTable

# Mozilla's "intermediate" profile for TLS 1.2, narrowed to ECDHE key exchange
# with AEAD ciphers: forward secrecy always, no CBC, no static RSA, no DHE
# (finite-field DH parameters are slow and rarely needed by modern clients).
# The TLS 1.3 suites and the groups are the listener's `ciphersuites` and
# `groups` (proxy.openssl sets them).
DEFAULT_TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)

MIN_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

_VERIFY_MODES = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "require": ssl.CERT_REQUIRED,
}

# RFC 7301: "no_application_protocol(120)". Python's ssl has no constant for
# it; an sni_callback may return any alert number.
ALERT_NO_APPLICATION_PROTOCOL = 120

# The label value for an SNI that matched no configured name (or no SNI):
# keeps the set of values bounded by the config, whatever clients send.
OTHER_NAME = "other"

_NOTES = "tlsproxy_notes"


@dataclass(slots=True)
class HandshakeNotes:
    """What one handshake learned outside OpenSSL's own state."""

    hello: ClientHello | None = None
    sni: str | None = None
    sni_match: str = OTHER_NAME  # the configured name the SNI matched, bounded
    refused: Outcome | None = None  # our policy failed the handshake, and why
    no_shared: str | None = None  # "group": why a no_shared_cipher, for the log


def attach_notes(conn: ssl.SSLObject, notes: HandshakeNotes) -> None:
    setattr(conn, _NOTES, notes)


def notes_of(conn: ssl.SSLObject) -> HandshakeNotes:
    notes = getattr(conn, _NOTES, None)
    if notes is None:
        notes = HandshakeNotes()
        setattr(conn, _NOTES, notes)
    return notes


def build_context(tls: TLSConfig) -> ssl.SSLContext:
    """The default certificate's context, selecting the others by SNI.

    Raises ssl.SSLError/OSError/ValueError on unusable material (the config
    checks make that rare: a file changed between check and load), and
    openssl.PolicyUnavailable when the groups or suites cannot be set.
    """
    served = serving_sets(tls.certificates)
    if tls.keylog_file is not None:
        create_private_file(tls.keylog_file)
    contexts = [_certificate_context(tls, pairs) for pairs in served]
    names = NameTable(
        (name, context)
        for pairs, context in zip(served, contexts, strict=True)
        for name in dict.fromkeys(name for pair in pairs for name in pair.material.dns_names)
    )
    default = contexts[0]
    default.sni_callback = _SNISelector(names, frozenset(a.encode() for a in tls.alpn))
    return default


def serving_sets(pairs: tuple[CertificatePair, ...]) -> list[list[CertificatePair]]:
    """The pairs grouped into contexts: a pair joins the first group that
    shares a DNS name with it and holds no pair of its key type (an RSA and an
    ECDSA certificate for one name, served by the client's signature
    algorithms), else starts its own. The group of the first pair comes first.
    """
    groups: list[tuple[set[str], list[CertificatePair]]] = []
    for pair in pairs:
        names = set(pair.material.dns_names)
        kind = pair.material.key_type
        for group_names, members in groups:
            if group_names & names and all(m.material.key_type != kind for m in members):
                group_names.update(names)
                members.append(pair)
                break
        else:
            groups.append((names, [pair]))
    return [members for _, members in groups]


def create_private_file(path: Path) -> None:
    """Make sure `path` exists readable by us only before OpenSSL opens it
    (Python's keylog_filename would create it with the umask's mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def apply_policy(
    context: ssl.SSLContext,
    min_version: str,
    ciphers: str,
    groups: tuple[str, ...],
    ciphersuites: tuple[str, ...],
) -> None:
    """The protocol policy both sides share: versions, TLS 1.2 ciphers, groups,
    TLS 1.3 suites; renegotiation and compression (CRIME) off.

    A bare FIN is a peer's half-close (a client's `shutdown(SHUT_WR)`,
    nginx's `proxy_half_close`: no close_notify), read as the end of its
    bytes (proxy.ends); OpenSSL 3 would otherwise make it a fatal error and
    refuse our half's writes after it, and the answer would be lost. Inside
    a handshake an EOF is still an error (`client_closed`, `server_closed`).
    """
    context.minimum_version = MIN_VERSIONS[min_version]
    context.set_ciphers(ciphers or DEFAULT_TLS12_CIPHERS)
    openssl.set_groups(context, groups)
    openssl.set_ciphersuites(context, ciphersuites)
    context.options |= (
        ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_IGNORE_UNEXPECTED_EOF
    )


def _certificate_context(tls: TLSConfig, pairs: list[CertificatePair]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_policy(context, tls.min_version, tls.ciphers, tls.groups, tls.ciphersuites)
    # Our cipher order, not the client's: with ECDHE+AEAD only, every choice
    # is a good one.
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    for pair in pairs:  # one per key type: OpenSSL keeps each in its own slot
        load_pair(context, pair.material)
    if tls.alpn:
        context.set_alpn_protocols(list(tls.alpn))
    context.verify_mode = _VERIFY_MODES[tls.client_auth]
    verify = tls.verify_material
    if verify is not None:
        _load_verify_store(context, verify)
    if not tls.session_tickets:
        # OP_NO_TICKET alone still lets OpenSSL send stateful TLS 1.3 tickets
        # backed by its session cache, and a TLS 1.2 client resume by session
        # ID from that cache: zero tickets and no cache mean no resumption.
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
        openssl.disable_session_cache(context)
    if tls.keylog_file is not None:
        context.keylog_filename = str(tls.keylog_file)
    return context


def load_pair(context: ssl.SSLContext, material: PairMaterial) -> None:
    """Give OpenSSL the chain and key that validation read, from memory."""
    with _pem_file(material.cert_pem + b"\n" + material.key_pem) as path:
        context.load_cert_chain(path)  # the key follows the chain in the same file


def _load_verify_store(context: ssl.SSLContext, verify: VerifyMaterial) -> None:
    """The client CAs and their CRLs, from the bytes validation read: one PEM
    text through a path, since only OpenSSL's file lookup loads CRLs (Python's
    `cadata` takes certificates only). With CRLs, the client's own
    certificate is checked against its issuer's (CRL_CHECK_LEAF: the CAs
    above it are the bundle's, trusted as configured)."""
    with _pem_file(verify.pem) as path:
        context.load_verify_locations(cafile=path)
    if verify.crls:
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


@contextmanager
def _pem_file(pem: bytes) -> Iterator[str]:
    """A path to `pem` for the duration, since Python's ssl loads a chain and
    key only from a path.

    On Linux an anonymous memory file (memfd): no name in any file system,
    never on a disk, gone once closed, and it works on a read-only root; it
    is opened through /proc/self/fd. Elsewhere, a file readable by us only,
    in a private temporary directory removed at once.
    """
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("tlsproxy-pair", os.MFD_CLOEXEC)
        try:
            data = memoryview(pem)
            while data:
                data = data[os.write(fd, data) :]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
    else:
        with tempfile.TemporaryDirectory(prefix="tlsproxy-") as private:  # mode 0700
            path = Path(private) / "pair.pem"
            path.touch(mode=0o600)
            path.write_bytes(pem)
            yield str(path)


class _SNISelector:
    """The sni_callback: switch to the matching certificate, apply ALPN policy.

    WARNING: OpenSSL calls this from inside do_handshake(); an exception here
    becomes an unraisable-exception report and an internal_error alert, so it
    must not raise.
    """

    __slots__ = ("alpn", "names")

    def __init__(self, names: NameTable[ssl.SSLContext], alpn: frozenset[bytes]) -> None:
        self.names = names
        self.alpn = alpn

    def __call__(
        self, conn: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext
    ) -> int | None:
        notes = notes_of(conn)
        # Interned: the connections to one name share one string while they
        # live (kept for the access line); the interpreter drops it after them.
        notes.sni = None if server_name is None else sys.intern(server_name)
        found = self.names.lookup(server_name)
        if found is not None:
            notes.sni_match, context = found
            conn.context = context
        hello = notes.hello
        if self.alpn and hello is not None and hello.alpn and self.alpn.isdisjoint(hello.alpn):
            notes.refused = Outcome.ALPN_MISMATCH
            return ALERT_NO_APPLICATION_PROTOCOL
        return None
