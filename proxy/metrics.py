"""Every metric tlsproxy exports, defined in one place.

The names and labels are a published interface (the README's Metrics
section): dashboards and alerts depend on them. Metrics live on a registry
passed in by the caller, so tests build a fresh `CollectorRegistry` and
nothing is global.

Labelled children are bound once per listener (`ListenerMetrics`), so the hot
path never does a label lookup: a handshake costs a handful of attribute
increments, not dictionary work. A listener that originates TLS to its
upstream also has the `tlsproxy_upstream_*` children (`UpstreamMetrics`); one
that takes plaintext in has no ingress handshake series at all.

With `workers > 1` (proxy/workers.py) each worker's values live in
prometheus-client's multiprocess files and the supervisor merges them into
one scrape. Counters and histograms are summed over every worker that ever
ran, the dead included, so a restart never makes them go backwards. A gauge
must say how to merge (`multiprocess_mode`); the default, "all", would add a
`pid` label and break the published label sets. Each choice is next to its
gauge. Outside multiprocess mode `multiprocess_mode` has no effect.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.outcome import Outcome, UpstreamOutcome

NAMESPACE = "tlsproxy"

# The `reason` values of connections_rejected_total and of
# backend_connect_failures_total, materialised at zero like the outcomes so
# that increase() and alerts see the first refusal of a kind.
REJECT_REASONS = ("max_connections", "fd_exhausted", "proxy_header")
BACKEND_FAILURE_REASONS = ("refused", "timeout", "unreachable", "resolve", "fd_exhausted")

# A handshake on loopback takes ~1 ms; across the internet with a slow client
# tens to hundreds of ms; the default handshake_timeout is 10 s. The buckets
# cover that range with ~2.5x steps.
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# A backend connect is a sidecar's loopback hop (~100 µs) or a short network
# hop; connect_timeout defaults to 5 s.
CONNECT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0)

LOG_LINES_DROPPED = "log_lines_dropped"
LOG_LINES_DROPPED_HELP = "Log lines lost because stderr was too slow or gone (see proxy/log.py)."


class Metrics:
    """The process-wide metric families, registered on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.handshakes = Counter(
            "handshakes",
            "TLS handshakes by how they ended.",
            ["listener", "outcome"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.handshake_duration = Histogram(
            "handshake_duration_seconds",
            "Time from accept to the end of the TLS handshake.",
            ["listener", "result"],
            namespace=NAMESPACE,
            buckets=HANDSHAKE_BUCKETS,
            registry=registry,
        )
        self.handshake_wants = Counter(
            "handshake_wants",
            "Times the handshake loop waited because OpenSSL wanted to read or write.",
            ["listener", "want"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.handshakes_in_progress = Gauge(
            "handshakes_in_progress",
            "Handshakes started and not yet ended.",
            ["listener"],
            namespace=NAMESPACE,
            registry=registry,
            multiprocess_mode="livesum",  # the whole daemon's count; a dead worker's are gone
        )
        self.tls_negotiated = Counter(
            "tls_negotiated",
            "Successful handshakes by negotiated parameters.",
            ["listener", "version", "cipher", "alpn", "resumed"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.upstream_handshakes = Counter(
            "upstream_handshakes",
            "TLS handshakes originated to upstreams, by how they ended.",
            ["listener", "outcome"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.upstream_handshake_duration = Histogram(
            "upstream_handshake_duration_seconds",
            "Time from the upstream connect to the end of the TLS handshake.",
            ["listener", "result"],
            namespace=NAMESPACE,
            buckets=HANDSHAKE_BUCKETS,
            registry=registry,
        )
        self.upstream_handshake_wants = Counter(
            "upstream_handshake_wants",
            "Times the upstream handshake loop waited because OpenSSL wanted to read or write.",
            ["listener", "want"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.upstream_tls_negotiated = Counter(
            "upstream_tls_negotiated",
            "Successful upstream handshakes by negotiated parameters.",
            ["listener", "version", "cipher", "alpn", "resumed"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.connections_active = Gauge(
            "connections_active",
            "Client connections currently open (handshaking or established).",
            ["listener"],
            namespace=NAMESPACE,
            registry=registry,
            multiprocess_mode="livesum",  # as handshakes_in_progress
        )
        self.connections = Counter(
            "connections",
            "Client connections accepted.",
            ["listener"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.connections_rejected = Counter(
            "connections_rejected",
            "Client connections closed at accept without a handshake.",
            ["listener", "reason"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.bytes = Counter(
            "bytes",
            "Plaintext bytes copied between client and backend.",
            ["listener", "direction"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.backend_connect_failures = Counter(
            "backend_connect_failures",
            "Backend connects that failed, by reason.",
            ["listener", "reason"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.backend_connect_duration = Histogram(
            "backend_connect_duration_seconds",
            "Time to connect to the backend.",
            ["listener"],
            namespace=NAMESPACE,
            buckets=CONNECT_BUCKETS,
            registry=registry,
        )
        self.certificate_expiry = Gauge(
            "certificate_expiry_timestamp_seconds",
            "Not-after time of each loaded certificate (and nextUpdate of each client CRL, "
            "subject crl:<issuer>, key_type empty), as a Unix timestamp.",
            ["listener", "subject", "key_type"],
            namespace=NAMESPACE,
            registry=registry,
            # Each worker reloads by itself (on SIGHUP): the earliest
            # expiry any running worker still serves is the one to act on,
            # as with two certificates of one subject.
            multiprocess_mode="livemin",
        )
        self.connections_max = Gauge(
            "connections_max",
            "The configured max_connections of each listener.",
            ["listener"],
            namespace=NAMESPACE,
            registry=registry,
            # Each worker enforces the limit on its own connections, so the
            # daemon holds up to the sum over the live workers, which is also
            # how connections_active merges: their ratio stays the alert's.
            multiprocess_mode="livesum",
        )
        self.internal_errors = Counter(
            "internal_errors",
            "Connections ended by an unexpected exception after the handshake: bugs.",
            ["listener"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.log_lines_dropped = Counter(
            LOG_LINES_DROPPED, LOG_LINES_DROPPED_HELP, namespace=NAMESPACE, registry=registry
        )
        self.config_reloads = reload_counter(registry)
        self.build_info = Gauge(
            "build_info",
            "Always 1; the labels say what is running.",
            ["version", "python", "openssl"],
            namespace=NAMESPACE,
            registry=registry,
            multiprocess_mode="livemax",  # 1 per build that runs now, not per process
        )
        python = ".".join(str(part) for part in sys.version_info[:3])
        self.build_info.labels(__version__, python, ssl.OPENSSL_VERSION).set(1)

    def for_listener(
        self, name: str, *, terminates: bool = True, originates: bool = False
    ) -> ListenerMetrics:
        """`terminates`: the listener answers TLS handshakes (else it takes
        plaintext in); `originates`: it makes TLS handshakes to its upstream."""
        return ListenerMetrics.bind(self, name, terminates=terminates, originates=originates)


# The interfaces the hot path uses of a labelled child. prometheus-client's
# Counter, Gauge and Histogram have them, and so does NO_HANDSHAKES.
class Increments(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Observes(Protocol):
    def observe(self, amount: float) -> None: ...


class UpDown(Increments, Protocol):
    def dec(self, amount: float = 1) -> None: ...


class _NoHandshakes:
    """The ingress handshake children of a listener that takes plaintext in.

    Such a listener answers no TLS handshake, so it exports no handshake
    series: binding `handshakes_total{outcome}` children at zero would show
    dashboards a TLS listener that never succeeds. Its ListenerMetrics keeps
    the same fields, typed by what the hot path calls, and this object stands
    in for every one of them, so neither the type checker nor the
    terminating listener's hot path needs a branch (a method call on either
    is one attribute lookup). Nothing calls it: a counted ingress handshake
    on such a listener would be a bug, and then it costs nothing and creates
    no series.
    """

    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


NO_HANDSHAKES = _NoHandshakes()


def _count_negotiated(
    family: Counter,
    name: str,
    children: dict[tuple[str, str, str, bool], Counter],
    key: tuple[str, str, str, bool],
) -> None:
    """Increment a tls_negotiated child, looking it up only the first time.

    The labels vary per handshake but take few values (bounded by the TLS
    policy and the ALPN list), so each child is looked up once and reused.
    """
    child = children.get(key)
    if child is None:
        version, cipher, alpn, resumed = key
        child = family.labels(name, version, cipher, alpn, "true" if resumed else "false")
        children[key] = child
    child.inc()


@dataclass(frozen=True, slots=True)
class UpstreamMetrics:
    """The `tlsproxy_upstream_*` children of a listener that originates TLS."""

    name: str
    family: Metrics
    outcomes: dict[UpstreamOutcome, Counter]
    handshake_ok: Histogram
    handshake_failed: Histogram
    wants_read: Counter
    wants_write: Counter
    negotiated_children: dict[tuple[str, str, str, bool], Counter]

    @classmethod
    def bind(cls, family: Metrics, name: str) -> UpstreamMetrics:
        return cls(
            name=name,
            family=family,
            # at zero, as the ingress outcomes: alerts see the first failure
            outcomes={o: family.upstream_handshakes.labels(name, o.value) for o in UpstreamOutcome},
            handshake_ok=family.upstream_handshake_duration.labels(name, "success"),
            handshake_failed=family.upstream_handshake_duration.labels(name, "failure"),
            wants_read=family.upstream_handshake_wants.labels(name, "read"),
            wants_write=family.upstream_handshake_wants.labels(name, "write"),
            negotiated_children={},
        )

    def negotiated(self, version: str, cipher: str, alpn: str, resumed: bool) -> None:
        _count_negotiated(
            self.family.upstream_tls_negotiated,
            self.name,
            self.negotiated_children,
            (version, cipher, alpn, resumed),
        )


@dataclass(frozen=True, slots=True)
class ListenerMetrics:
    """One listener's labelled children, bound once so the hot path does no lookups.

    The ingress handshake fields (outcomes through in_progress) are
    NO_HANDSHAKES when the listener does not terminate TLS; `upstream` is
    None unless it originates TLS.
    """

    name: str
    family: Metrics
    outcomes: dict[Outcome, Increments]
    handshake_ok: Observes
    handshake_failed: Observes
    wants_read: Increments
    wants_write: Increments
    in_progress: UpDown
    active: Gauge
    accepted: Counter
    bytes_to_backend: Counter
    bytes_to_client: Counter
    connect_duration: Histogram
    internal_errors: Counter
    # tls_negotiated children by (version, cipher, alpn, resumed)
    negotiated_children: dict[tuple[str, str, str, bool], Counter]
    upstream: UpstreamMetrics | None

    @classmethod
    def bind(
        cls, family: Metrics, name: str, *, terminates: bool = True, originates: bool = False
    ) -> ListenerMetrics:
        for reason in REJECT_REASONS:
            family.connections_rejected.labels(name, reason)
        for reason in BACKEND_FAILURE_REASONS:
            family.backend_connect_failures.labels(name, reason)
        if terminates:
            # Every outcome is materialised at zero so that rate() and alerts
            # see a series before the first failure of a kind happens.
            outcomes: dict[Outcome, Increments] = {
                o: family.handshakes.labels(name, o.value) for o in Outcome
            }
            handshake_ok: Observes = family.handshake_duration.labels(name, "success")
            handshake_failed: Observes = family.handshake_duration.labels(name, "failure")
            wants_read: Increments = family.handshake_wants.labels(name, "read")
            wants_write: Increments = family.handshake_wants.labels(name, "write")
            in_progress: UpDown = family.handshakes_in_progress.labels(name)
        else:
            outcomes = dict.fromkeys(Outcome, NO_HANDSHAKES)
            handshake_ok = handshake_failed = NO_HANDSHAKES
            wants_read = wants_write = in_progress = NO_HANDSHAKES
        return cls(
            name=name,
            family=family,
            outcomes=outcomes,
            handshake_ok=handshake_ok,
            handshake_failed=handshake_failed,
            wants_read=wants_read,
            wants_write=wants_write,
            in_progress=in_progress,
            active=family.connections_active.labels(name),
            accepted=family.connections.labels(name),
            bytes_to_backend=family.bytes.labels(name, "to_backend"),
            bytes_to_client=family.bytes.labels(name, "to_client"),
            connect_duration=family.backend_connect_duration.labels(name),
            internal_errors=family.internal_errors.labels(name),
            negotiated_children={},
            upstream=UpstreamMetrics.bind(family, name) if originates else None,
        )

    def negotiated(self, version: str, cipher: str, alpn: str, resumed: bool) -> None:
        _count_negotiated(
            self.family.tls_negotiated,
            self.name,
            self.negotiated_children,
            (version, cipher, alpn, resumed),
        )

    def rejected(self, reason: str) -> None:
        self.family.connections_rejected.labels(self.name, reason).inc()

    def connect_failed(self, reason: str) -> None:
        self.family.backend_connect_failures.labels(self.name, reason).inc()


CONFIG_RELOADS = "config_reloads"


def reload_counter(registry: CollectorRegistry) -> Counter:
    counter = Counter(
        CONFIG_RELOADS,
        "Configuration reloads by result.",
        ["result"],
        namespace=NAMESPACE,
        registry=registry,
    )
    for result in ("success", "failure"):
        counter.labels(result)  # at zero, so increase() sees the first failure
    return counter


class SupervisorMetrics:
    """The supervisor's own metrics with `workers > 1`, served beside the
    workers' merged ones. The supervisor does not run in multiprocess mode:
    these are ordinary in-memory metrics on the registry it serves, except
    its dropped log lines, which are added into the workers' series of the
    same name (`MergedWorkers`): one family per name in a scrape."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.log_lines_dropped = 0
        self.worker_restarts = Counter(
            "worker_restarts",
            "Worker processes restarted after exiting on their own (crash, kill).",
            namespace=NAMESPACE,
            registry=registry,
        )
        # The daemon's reloads: the workers' own count stays at zero (each
        # answers the supervisor instead), and the scrape shows this one.
        self.config_reloads = reload_counter(registry)

    def count_log_drops(self, count: int) -> None:
        """The log sink's drop callback (called under the sink's lock)."""
        self.log_lines_dropped += count


class MergedWorkers(Collector):
    """The workers' multiprocess files merged, plus the supervisor's own log
    drops: the counter is per process and the scrape shows the sum."""

    def __init__(self, path: str, supervisor: SupervisorMetrics) -> None:
        self._workers = MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]
        self._supervisor = supervisor

    def collect(self) -> Iterable[Metric]:
        name = f"{NAMESPACE}_{LOG_LINES_DROPPED}"
        own = self._supervisor.log_lines_dropped
        merged = False
        for family in self._workers.collect():  # type: ignore[no-untyped-call]
            if family.name == f"{NAMESPACE}_{CONFIG_RELOADS}":
                continue  # the workers' zeros; the supervisor's own count is served
            if family.name == name:
                family.samples = [
                    s._replace(value=s.value + own) if s.name == f"{name}_total" else s
                    for s in family.samples
                ]
                merged = True
            yield family
        if not merged:  # no worker has written its files yet
            yield CounterMetricFamily(name, LOG_LINES_DROPPED_HELP, value=own)
