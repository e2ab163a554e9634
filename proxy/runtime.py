"""What a listener's connections use at run time (`ListenerRuntime`), and its build from config.

Start-up and reload share this code: reload builds a complete new set of
runtimes (every SSLContext, every certificate read and checked) before
anything is swapped, so a failure anywhere leaves the running set untouched.
Certificates are parsed when the config is validated (which reads each file
once) and handed to OpenSSL here, never per handshake.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from proxy.config import Address, Config, ListenerConfig, UpstreamTLSConfig
from proxy.identity import AllowList
from proxy.log import AccessLog, Logger
from proxy.metrics import ListenerMetrics, Metrics, UpstreamMetrics
from proxy.sni import NameTable
from proxy.tls import build_context
from proxy.tls_upstream import Sessions, build_upstream_context

# An allow table and its name in the access log (`allow_rules`): "listener",
# or "route:<sni>" with the route's configured name.
Rules = tuple[str, AllowList]


@dataclass
class UpstreamRuntime:
    """What a connection needs to originate TLS: built with its listener's."""

    config: UpstreamTLSConfig
    context: ssl.SSLContext
    metrics: UpstreamMetrics
    sessions: Sessions
    allow: AllowList | None
    needs_identity: bool  # the upstream certificate's identity is read only if used


@dataclass
class ListenerRuntime:
    """What a connection needs from its listener, swapped as a whole on reload."""

    config: ListenerConfig
    context: ssl.SSLContext | None  # None: the clients speak plaintext
    metrics: ListenerMetrics
    log: Logger
    upstream: UpstreamRuntime | None = None  # set: TLS to the backend
    access: AccessLog | None = None  # writes the access line; None: log.access_log off
    # [[listeners.routes]]: backend by SNI, built once from the config
    routes: NameTable[Address] = field(init=False, repr=False)
    # `allow` tables compiled once, in the build: the listener's, and by SNI
    # the routes' (every route, so that the route whose backend the SNI picks
    # is the one whose table applies; None where a route has no table)
    allow: Rules | None = field(init=False, repr=False)
    route_allow: NameTable[Rules | None] = field(init=False, repr=False)
    # the certificate's identity is read only when something uses it
    needs_identity: bool = field(init=False, repr=False)

    @property
    def access_log(self) -> bool:
        return self.access is not None

    def __post_init__(self) -> None:
        self.routes = NameTable((route.sni, route.backend) for route in self.config.routes)
        tls = self.config.tls
        self.allow = None if tls is None or tls.allow is None else ("listener", tls.allow.compile())
        self.route_allow = NameTable(
            (
                route.sni,
                None if route.allow is None else (f"route:{route.sni}", route.allow.compile()),
            )
            for route in self.config.routes
        )
        self.needs_identity = (
            tls is not None
            and tls.client_auth != "none"
            and (
                self.access_log
                or self.config.proxy_protocol == "v2"
                or self.allow is not None
                or any(route.allow is not None for route in self.config.routes)
            )
        )

    def allow_for(self, sni: str | None) -> Rules | None:
        """The allow table for this SNI: its route's, which replaces the
        listener's, else the listener's; None when no table applies."""
        found = self.route_allow.lookup(sni) if self.route_allow else None
        if found is not None and found[1] is not None:
            return found[1]
        return self.allow

    def backend_for(self, sni: str | None) -> Address:
        """The route matching the SNI (exact before wildcard), else the listener's."""
        found = self.routes.lookup(sni) if self.routes else None
        return self.config.backend if found is None else found[1]


def build_runtime(
    lc: ListenerConfig, config: Config, metrics: Metrics, log: Logger
) -> ListenerRuntime:
    """The listener's runtime; warns, at start and on every reload, while it
    writes the TLS secrets to a key log."""
    tls, upstream = lc.tls, lc.upstream_tls
    if tls is not None and tls.keylog_file is not None:
        log.warning(
            "keylog_file is set: the TLS secrets of every connection are written to it, "
            "so anyone who can read it can decrypt the traffic; for debugging only",
            listener=lc.name,
            keylog_file=str(tls.keylog_file),
        )
    lm = metrics.for_listener(lc.name, terminates=tls is not None, originates=upstream is not None)
    return ListenerRuntime(
        config=lc,
        context=None if tls is None else build_context(tls),
        metrics=lm,
        log=log,
        upstream=None if upstream is None else build_upstream(upstream, lm, config),
        access=AccessLog(log, config.log.level, config.log.format)
        if config.log.access_log
        else None,
    )


def build_upstream(
    upstream: UpstreamTLSConfig, lm: ListenerMetrics, config: Config
) -> UpstreamRuntime:
    assert lm.upstream is not None
    return UpstreamRuntime(
        config=upstream,
        context=build_upstream_context(upstream),
        metrics=lm.upstream,
        sessions=Sessions(upstream.session_resumption),
        allow=None if upstream.allow is None else upstream.allow.compile(),
        needs_identity=upstream.allow is not None or config.log.access_log,
    )


def build_runtimes(config: Config, metrics: Metrics, log: Logger) -> list[ListenerRuntime]:
    """All listeners' runtimes; raises (OSError, ssl.SSLError, ValueError) on bad material."""
    return [build_runtime(lc, config, metrics, log) for lc in config.listeners]


# (listener, certificate subject, key type) -> the earliest expiry, a Unix timestamp
Expiries = dict[tuple[str, str, str], float]

# The expiry metric's subject label for a CRL: this, then its issuer (RFC 4514).
CRL_SUBJECT_PREFIX = "crl:"


def certificate_expiries(config: Config) -> Expiries:
    """The expiry of exactly the certificates `config` serves, from what its
    validation read (no I/O): computed with the build, published by the swap.

    Our client certificates for originated TLS count as served ones.
    An RSA and an ECDSA certificate for one name usually share their subject
    and are renewed apart: the key type keeps their series apart. Two of one
    subject and key type (for different names) show the earlier expiry, the
    one to act on. A CRL's nextUpdate is an expiry too (past it every client
    of its CA is refused), under the subject `crl:<issuer>` and no key type.
    """
    earliest: Expiries = {}
    for lc in config.listeners:
        for _, pair in lc.certificate_pairs():
            leaf = pair.material.leaf
            labels = (lc.name, leaf.subject.rfc4514_string(), pair.material.key_type)
            expiry = leaf.not_valid_after_utc.timestamp()
            earliest[labels] = min(expiry, earliest.get(labels, expiry))
        verify = None if lc.tls is None else lc.tls.verify_material
        for crl in verify.crls if verify is not None else ():
            if crl.next_update is not None:
                earliest[(lc.name, f"{CRL_SUBJECT_PREFIX}{crl.issuer}", "")] = (
                    crl.next_update.timestamp()
                )
    return earliest


def export_certificates(expiries: Expiries, metrics: Metrics) -> None:
    """Publish the expiries of the certificates now in use, and only those."""
    metrics.certificate_expiry.clear()
    for labels, expiry in expiries.items():
        metrics.certificate_expiry.labels(*labels).set(expiry)


def export_limits(config: Config, metrics: Metrics) -> None:
    """Publish each listener's max_connections, so alerts can use a ratio."""
    metrics.connections_max.clear()
    for lc in config.listeners:
        metrics.connections_max.labels(lc.name).set(lc.max_connections)
