"""Build what a listener's connections use at run time, from its config.

Start-up and reload share this code: reload builds a complete new set of
runtimes (every SSLContext, every certificate read and checked) before
anything is swapped, so a failure anywhere leaves the running set untouched.
Certificates are parsed when the config is validated (which reads each file
once) and handed to OpenSSL here, never per handshake.
"""

from __future__ import annotations

from proxy.config import Config, ListenerConfig
from proxy.connection import ListenerRuntime
from proxy.log import Logger
from proxy.metrics import Metrics
from proxy.tls import build_context


def build_runtime(
    lc: ListenerConfig, config: Config, metrics: Metrics, log: Logger
) -> ListenerRuntime:
    return ListenerRuntime(
        config=lc,
        context=build_context(lc.tls),
        metrics=metrics.for_listener(lc.name),
        log=log,
        access_log=config.log.access_log,
    )


def build_runtimes(config: Config, metrics: Metrics, log: Logger) -> list[ListenerRuntime]:
    """All listeners' runtimes; raises (OSError, ssl.SSLError, ValueError) on bad material."""
    return [build_runtime(lc, config, metrics, log) for lc in config.listeners]


# (listener, certificate subject) -> the earliest expiry, a Unix timestamp
Expiries = dict[tuple[str, str], float]

# The expiry metric's subject label for a CRL: this, then its issuer (RFC 4514).
CRL_SUBJECT_PREFIX = "crl:"


def certificate_expiries(config: Config) -> Expiries:
    """The expiry of exactly the certificates `config` serves, from what its
    validation read (no I/O): computed with the build, published by the swap.

    Two certificates can share a subject (an RSA and an ECDSA one for the
    same name): the series shows the earlier expiry, the one to act on. A
    CRL's nextUpdate is an expiry too (past it every client of its CA is
    refused), under the subject `crl:<issuer>`.
    """
    earliest: Expiries = {}
    for lc in config.listeners:
        for pair in lc.tls.certificates:
            leaf = pair.material.leaf
            labels = (lc.name, leaf.subject.rfc4514_string())
            expiry = leaf.not_valid_after_utc.timestamp()
            earliest[labels] = min(expiry, earliest.get(labels, expiry))
        verify = lc.tls.verify_material
        for crl in verify.crls if verify is not None else ():
            if crl.next_update is not None:
                earliest[(lc.name, f"{CRL_SUBJECT_PREFIX}{crl.issuer}")] = (
                    crl.next_update.timestamp()
                )
    return earliest


def export_certificates(expiries: Expiries, metrics: Metrics) -> None:
    """Publish the expiries of the certificates now in use, and only those."""
    metrics.certificate_expiry.clear()
    for labels, expiry in expiries.items():
        metrics.certificate_expiry.labels(*labels).set(expiry)
