"""Who may connect: a verified certificate's identity against an `allow` table.

Theory of operation
-------------------

Authentication (the peer's chain verifies against the configured CAs) is
OpenSSL's job; authorization is this module's. It knows nothing of which side
of a connection the certificate came from, so one matcher serves every `allow`
table. A table lists identities in four kinds, and a certificate is admitted
when any entry of any kind matches:

- `uri`: against the certificate's URI SANs. A pattern is split on `/`; a
  segment that is exactly `*` stands for one non-empty segment, and a last
  segment `**` for any remainder, the empty one included (so
  `spiffe://td/ns/**` admits `spiffe://td/ns` and everything under it). This
  is the syntax ghostunnel's `--allow-uri` uses, so its flags carry over;
  unlike ghostunnel, a trailing `/` is not optional, and a `*` inside a
  segment (`web-*`) is an error rather than a literal star.
- `dns`: against the DNS SANs, exact or a one-label `*.` wildcard,
  case-insensitive: the same rules, and the same table, as SNI matching
  (`proxy.sni.NameTable`). A SAN that is not itself a host name (a
  wildcard, an empty label as in `.jobs.example`) names no one host and
  matches nothing.
- `cn` and `ou`: exact against the subject's commonName and
  organizationalUnitName attributes (any of them, when there are several).

SPIFFE IDs get stricter rules, because an X509-SVID is a contract: a
certificate with more than one `spiffe://` URI SAN is not an SVID and matches
no `uri` entry at all and has no SPIFFE ID; a `spiffe://` SAN that is not a
valid SPIFFE ID (an upper-case trust domain, a `..` segment, a query) matches
no `spiffe://` pattern, so `spiffe://td/ns/**` cannot be walked out of with
`/../`, and is no SPIFFE ID either; and a
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

from proxy import sni
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

    subject: str  # RFC 4514 (most significant RDN last), for the log
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
            subject=rfc4514(rdns),
            uris=tuple(value for kind, value in sans if kind == "URI"),
            dns=tuple(value for kind, value in sans if kind == "DNS"),
            cn=tuple(value for key, value in attributes if key == "commonName"),
            ou=tuple(value for key, value in attributes if key == "organizationalUnitName"),
        )

    def spiffe_id(self) -> str | None:
        """The SVID's SPIFFE ID: the one `spiffe://` URI SAN, if there is
        exactly one and it is a valid SPIFFE ID."""
        ids = [uri for uri in self.uris if uri.startswith(SPIFFE_SCHEME)]
        return ids[0] if len(ids) == 1 and is_spiffe_id(ids[0]) else None


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


# RFC 4514 section 2.4: characters escaped with a backslash anywhere in a
# value, and those escaped only at its start (`#`, space) or end (space).
_RFC4514_SPECIAL = frozenset(',+"\\<>;')


def rfc4514(rdns: Any) -> str:
    """A subject as `getpeercert()` returns it (RDNs most significant first,
    each a tuple of attributes) in RFC 4514 form: the RDNs reversed, the
    attributes of a multi-valued RDN joined with `+`, special characters
    escaped, as `cryptography`'s `Name.rfc4514_string()` spells it."""
    return ",".join(
        "+".join(f"{_RDN_KEYS.get(key, key)}={_escape(str(value))}" for key, value in rdn)
        for rdn in reversed(rdns)
    )


def _escape(value: str) -> str:
    out = "".join(f"\\{c}" if c in _RFC4514_SPECIAL else c for c in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return out.replace("\0", "\\00")


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


def check_dns_pattern(pattern: str) -> str | None:
    """Why `pattern` cannot be a `dns` entry, or None: SNI's rules."""
    return sni.check_pattern(pattern)


def check_name(value: str) -> str | None:
    """Why `value` cannot be a `cn` or `ou` entry, or None when it can."""
    return None if value else "must not be empty"


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
        for kind, check, values in (
            ("uri", check_uri_pattern, uris),
            ("dns", check_dns_pattern, names),
            ("cn/ou", check_name, [*cns, *ous]),
        ):
            for value in values:
                if problem := check(value):
                    raise ValueError(f"invalid {kind} pattern {value!r}: {problem}")
        self._spiffe = _union(p for p in uris if p.startswith(SPIFFE_SCHEME))
        self._uri = _union(p for p in uris if not p.startswith(SPIFFE_SCHEME))
        self._dns: NameTable[None] = NameTable((name, None) for name in names)
        self._cn = cns
        self._ou = ous
        self.size = len(uris) + len(names) + len(cns) + len(ous)

    def admits(self, identity: Identity) -> bool:
        """Whether any entry of any list matches the identity."""
        # A DNS SAN that is no host name (a wildcard, an empty label) names
        # no one host: it is compared with nothing (NameTable would let
        # `*.x` or `.x` match a `*.x` entry).
        return (
            self._uri_admits(identity.uris)
            or any(
                self._dns.lookup(name) is not None
                for name in identity.dns
                if sni.check_pattern(name) is None and "*" not in name
            )
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
    # DOTALL: a `**` remainder is any remainder, a newline in a URI included
    return re.compile("|".join(f"(?:{alternative})" for alternative in alternatives), re.DOTALL)
