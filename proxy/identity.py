"""Who may connect: a verified certificate's identity against an `allow` table.

Theory of operation
-------------------

Authentication (the chain verifies against `client_ca`) is OpenSSL's job;
authorization is this module's. An `allow` table lists identities in four
kinds, and a certificate is admitted when any entry of any kind matches:

- `uri`: against the certificate's URI SANs. A pattern is split on `/`; a
  segment that is exactly `*` stands for one non-empty segment, and a last
  segment `**` for any remainder, the empty one included (so
  `spiffe://td/ns/**` admits `spiffe://td/ns` and everything under it). This
  is the syntax ghostunnel's `--allow-uri` uses, so its flags carry over;
  unlike ghostunnel, a trailing `/` is not optional, and a `*` inside a
  segment (`web-*`) is an error rather than a literal star.
- `dns`: against the DNS SANs, exact or a one-label `*.` wildcard,
  case-insensitive: the same rules, and the same table, as SNI matching
  (`proxy.sni.NameTable`).
- `cn` and `ou`: exact against the subject's commonName and
  organizationalUnitName attributes (any of them, when there are several).

SPIFFE IDs get stricter rules, because an X509-SVID is a contract: a
certificate with more than one `spiffe://` URI SAN is not an SVID and matches
no `uri` entry at all; a `spiffe://` SAN that is not a valid SPIFFE ID (an
upper-case trust domain, a `..` segment, a query) matches no `spiffe://`
pattern, so `spiffe://td/ns/**` cannot be walked out of with `/../`; and a
`spiffe://` pattern must itself be a valid SPIFFE ID pattern, checked when the
config is loaded (`check_uri_pattern`).

Everything is compiled when the config is loaded: all `uri` patterns become
one regular expression, the rest sets and a name table, so a decision costs a
regex match per URI SAN and a few set probes, whatever the table's length.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.sni import NameTable

SPIFFE_SCHEME = "spiffe://"

# The SPIFFE ID spec: a trust domain of lower-case letters, digits, '.', '-'
# and '_'; path segments of letters, digits, '.', '-' and '_', never empty,
# never '.' or '..'; no port, userinfo, query or fragment; 2048 bytes at most.
MAX_SPIFFE_ID = 2048
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SPIFFE_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_SPIFFE_ID = re.compile(r"spiffe://[a-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")

# Any other URI pattern needs a scheme (RFC 3986, 3.1), so that `web/*` is
# not silently a pattern no certificate can carry.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")

ONE_SEGMENT = "*"
REMAINDER = "**"


@dataclass(frozen=True, slots=True)
class Identity:
    """What a certificate says about who holds it, as the matcher reads it."""

    subject: str  # RFC 4514, most significant attribute last, for the log
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    cn: tuple[str, ...] = ()
    ou: tuple[str, ...] = ()

    @classmethod
    def from_peercert(cls, cert: Mapping[str, Any]) -> Identity:
        """From `SSLObject.getpeercert()`: the verified peer certificate."""
        rdns: Any = cert.get("subject", ())
        sans: Any = cert.get("subjectAltName", ())
        attributes = [(key, value) for rdn in rdns for key, value in rdn]
        return cls(
            subject=",".join(
                f"{_RDN_KEYS.get(key, key)}={value}" for key, value in reversed(attributes)
            ),
            uris=tuple(value for kind, value in sans if kind == "URI"),
            dns=tuple(value for kind, value in sans if kind == "DNS"),
            cn=tuple(value for key, value in attributes if key == "commonName"),
            ou=tuple(value for key, value in attributes if key == "organizationalUnitName"),
        )

    def spiffe_id(self) -> str | None:
        """The SVID's SPIFFE ID: the one `spiffe://` URI SAN, if exactly one."""
        ids = [uri for uri in self.uris if uri.startswith(SPIFFE_SCHEME)]
        return ids[0] if len(ids) == 1 else None


# getpeercert() spells attribute names out; RFC 4514 (and the certificate
# expiry metric's subject label) use the short forms.
_RDN_KEYS = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def is_spiffe_id(uri: str) -> bool:
    """Whether `uri` is a valid SPIFFE ID (the spec's rules, as listed above)."""
    if len(uri.encode()) > MAX_SPIFFE_ID or not _SPIFFE_ID.fullmatch(uri):
        return False
    return all(segment not in (".", "..") for segment in uri.split("/")[3:])


def check_uri_pattern(pattern: str) -> str | None:
    """Why `pattern` cannot be a `uri` entry, or None when it can."""
    if not pattern:
        return "must not be empty"
    if pattern.startswith(SPIFFE_SCHEME):
        return _check_spiffe_pattern(pattern)
    if pattern.lower().startswith(SPIFFE_SCHEME):
        return "the scheme of a SPIFFE ID is lower-case: 'spiffe://'"
    if not _SCHEME.match(pattern):
        return "must be an absolute URI with a scheme, e.g. 'spiffe://example.org/ns/web'"
    return _check_wildcards(pattern.split("/"))


def _check_spiffe_pattern(pattern: str) -> str | None:
    rest = pattern.removeprefix(SPIFFE_SCHEME)
    if "?" in rest or "#" in rest:
        return "a SPIFFE ID has no query or fragment"
    domain, *segments = rest.split("/")
    if "@" in domain:
        return "a SPIFFE ID has no userinfo ('user@') in its trust domain"
    if ":" in domain:
        return "a SPIFFE ID has no port in its trust domain"
    if not domain:
        return "the trust domain is missing: 'spiffe://<trust domain>/<path>'"
    if not _TRUST_DOMAIN.fullmatch(domain):
        return (
            f"trust domain {domain!r} must be lower-case letters, digits, '.', '-' and '_' "
            "(no wildcard: a pattern names one trust domain)"
        )
    if len(pattern.encode()) > MAX_SPIFFE_ID:
        return f"a SPIFFE ID is at most {MAX_SPIFFE_ID} bytes"
    if problem := _check_wildcards(segments):
        return problem
    for segment in segments:
        if segment == "":
            return "a SPIFFE ID has no empty path segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return "a SPIFFE ID has no '.' or '..' path segment"
        if segment not in (ONE_SEGMENT, REMAINDER) and not _SPIFFE_SEGMENT.fullmatch(segment):
            return (
                f"path segment {segment!r} must be letters, digits, '.', '-' and '_' "
                "(or '*' for one segment, '**' last for any remainder)"
            )
    return None


def _check_wildcards(segments: list[str]) -> str | None:
    for index, segment in enumerate(segments):
        if segment == REMAINDER and index != len(segments) - 1:
            return "'**' may only be the last path segment"
        if "*" in segment and segment not in (ONE_SEGMENT, REMAINDER):
            return f"'*' must be a whole path segment, got {segment!r}"
    return None


def _uri_regex(pattern: str) -> str:
    segments = pattern.split("/")
    remainder = segments[-1] == REMAINDER
    if remainder:
        segments.pop()
    body = "/".join("[^/]+" if s == ONE_SEGMENT else re.escape(s) for s in segments)
    return body + ("(?:/.*)?" if remainder else "")


class AllowList:
    """An `allow` table, compiled once per listener (or route) at load."""

    __slots__ = ("_cn", "_dns", "_ou", "_spiffe", "_uri", "size")

    def __init__(
        self,
        *,
        uri: Iterable[str] = (),
        dns: Iterable[str] = (),
        cn: Iterable[str] = (),
        ou: Iterable[str] = (),
    ) -> None:
        uris, names, cns, ous = list(uri), list(dns), frozenset(cn), frozenset(ou)
        for pattern in uris:
            if problem := check_uri_pattern(pattern):
                raise ValueError(f"invalid uri pattern {pattern!r}: {problem}")
        self._spiffe = _union(p for p in uris if p.startswith(SPIFFE_SCHEME))
        self._uri = _union(p for p in uris if not p.startswith(SPIFFE_SCHEME))
        self._dns: NameTable[None] = NameTable((name, None) for name in names)
        self._cn = cns
        self._ou = ous
        self.size = len(uris) + len(names) + len(cns) + len(ous)

    def admits(self, identity: Identity) -> bool:
        """Whether any entry of any list matches the identity."""
        # A wildcard DNS SAN in a client certificate names no one host: it is
        # compared with nothing (NameTable would let it match a `*.` entry).
        return (
            self._uri_admits(identity.uris)
            or any(self._dns.lookup(name) is not None for name in identity.dns if "*" not in name)
            or not self._cn.isdisjoint(identity.cn)
            or not self._ou.isdisjoint(identity.ou)
        )

    def _uri_admits(self, uris: tuple[str, ...]) -> bool:
        if not uris:
            return False
        spiffe = [uri for uri in uris if uri.startswith(SPIFFE_SCHEME)]
        if len(spiffe) > 1:
            return False  # not an X509-SVID: it must carry exactly one SPIFFE ID
        if spiffe and self._spiffe is not None:
            (candidate,) = spiffe
            if is_spiffe_id(candidate) and self._spiffe.fullmatch(candidate):
                return True
        other = self._uri
        return other is not None and any(
            other.fullmatch(uri) for uri in uris if not uri.startswith(SPIFFE_SCHEME)
        )


def _union(patterns: Iterable[str]) -> re.Pattern[str] | None:
    alternatives = [_uri_regex(pattern) for pattern in patterns]
    if not alternatives:
        return None
    return re.compile("|".join(f"(?:{alternative})" for alternative in alternatives))
