"""The per-listener metric binding, scraped from a fresh registry: which
series exist at zero before anything happened, and where counts go.

Upstream TLS: every UpstreamOutcome at zero for a listener that originates
TLS; no ingress handshake series for one that takes plaintext in. With
workers > 1 the new families merge like the old ones (a unit-level
multiprocess scrape: two fake workers' files, one MergedWorkers).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest, values
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import (
    HANDSHAKE_BUCKETS,
    NO_HANDSHAKES,
    MergedWorkers,
    Metrics,
    SupervisorMetrics,
)
from proxy.outcome import Outcome, UpstreamOutcome

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]

INGRESS_HANDSHAKE_SAMPLES = (
    "tlsproxy_handshakes_total",
    "tlsproxy_handshake_duration_seconds_count",
    "tlsproxy_handshake_wants_total",
    "tlsproxy_handshakes_in_progress",
)
UPSTREAM_FAMILIES = (
    "tlsproxy_upstream_handshakes",
    "tlsproxy_upstream_handshake_duration_seconds",
    "tlsproxy_upstream_handshake_wants",
    "tlsproxy_upstream_tls_negotiated",
)


def _series(registry: CollectorRegistry) -> Series:
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _of(series: Series, name: str, listener: str) -> dict[frozenset[tuple[str, str]], float]:
    """One sample name's series of one listener, by their other labels."""
    return {
        labels - {("listener", listener)}: value
        for (sample, labels), value in series.items()
        if sample == name and ("listener", listener) in labels
    }


def _labels(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def test_a_terminating_listener_exports_every_ingress_outcome_and_no_upstream() -> None:
    registry = CollectorRegistry()
    lm = Metrics(registry).for_listener("web")
    assert lm.upstream is None
    series = _series(registry)
    assert _of(series, "tlsproxy_handshakes_total", "web") == {
        _labels(outcome=o.value): 0.0 for o in Outcome
    }
    assert _of(series, "tlsproxy_handshake_duration_seconds_count", "web") == {
        _labels(result="success"): 0.0,
        _labels(result="failure"): 0.0,
    }
    assert _of(series, "tlsproxy_handshake_wants_total", "web") == {
        _labels(want="read"): 0.0,
        _labels(want="write"): 0.0,
    }
    assert not [key for key in series if key[0].startswith("tlsproxy_upstream_")]


def test_an_originating_listener_exports_every_upstream_outcome_at_zero() -> None:
    registry = CollectorRegistry()
    lm = Metrics(registry).for_listener("egress", originates=True)
    assert lm.upstream is not None
    series = _series(registry)
    assert _of(series, "tlsproxy_upstream_handshakes_total", "egress") == {
        _labels(outcome=o.value): 0.0 for o in UpstreamOutcome
    }
    duration = _of(series, "tlsproxy_upstream_handshake_duration_seconds_bucket", "egress")
    assert len(duration) == 2 * (len(HANDSHAKE_BUCKETS) + 1)  # and +Inf, per result
    assert _of(series, "tlsproxy_upstream_handshake_wants_total", "egress") == {
        _labels(want="read"): 0.0,
        _labels(want="write"): 0.0,
    }
    # TLS in, TLS out: the ingress series are there too
    assert len(_of(series, "tlsproxy_handshakes_total", "egress")) == len(Outcome)


def test_plaintext_in_exports_no_ingress_handshake_series() -> None:
    registry = CollectorRegistry()
    lm = Metrics(registry).for_listener("egress", terminates=False, originates=True)
    # what the ingress hot path would call: it all goes nowhere
    lm.outcomes[Outcome.SUCCESS].inc()
    lm.wants_read.inc(3)
    lm.wants_write.inc(2)
    lm.handshake_ok.observe(0.01)
    lm.handshake_failed.observe(0.01)
    lm.in_progress.inc()
    lm.in_progress.dec()
    series = _series(registry)
    for name in INGRESS_HANDSHAKE_SAMPLES:
        assert _of(series, name, "egress") == {}, name
    assert set(lm.outcomes) == set(Outcome)
    assert all(child is NO_HANDSHAKES for child in lm.outcomes.values())
    # the listener's other series and its upstream ones are there
    assert _of(series, "tlsproxy_connections_total", "egress") == {frozenset(): 0.0}
    assert len(_of(series, "tlsproxy_upstream_handshakes_total", "egress")) == len(UpstreamOutcome)


def test_plaintext_in_plaintext_out_exports_no_handshake_series_at_all() -> None:
    registry = CollectorRegistry()
    lm = Metrics(registry).for_listener("tcp", terminates=False)
    assert lm.upstream is None
    series = _series(registry)
    assert not [key for key in series if "handshake" in key[0] and ("listener", "tcp") in key[1]]


def test_upstream_counts_go_to_the_upstream_families_only() -> None:
    registry = CollectorRegistry()
    lm = Metrics(registry).for_listener("egress", originates=True)
    upstream = lm.upstream
    assert upstream is not None
    upstream.outcomes[UpstreamOutcome.SERVER_CERT_INVALID].inc()
    upstream.outcomes[UpstreamOutcome.SUCCESS].inc()
    upstream.wants_read.inc(2)
    upstream.wants_write.inc(3)
    upstream.handshake_ok.observe(0.003)
    upstream.handshake_failed.observe(0.2)
    upstream.negotiated("TLSv1.3", "TLS_AES_128_GCM_SHA256", "h2", False)
    upstream.negotiated("TLSv1.3", "TLS_AES_128_GCM_SHA256", "h2", False)
    upstream.negotiated("TLSv1.3", "TLS_AES_128_GCM_SHA256", "h2", True)
    assert len(upstream.negotiated_children) == 2  # each child looked up once
    series = _series(registry)
    outcomes = _of(series, "tlsproxy_upstream_handshakes_total", "egress")
    assert {k: v for k, v in outcomes.items() if v} == {
        _labels(outcome="server_cert_invalid"): 1.0,
        _labels(outcome="success"): 1.0,
    }
    assert _of(series, "tlsproxy_upstream_handshake_wants_total", "egress") == {
        _labels(want="read"): 2.0,
        _labels(want="write"): 3.0,
    }
    assert _of(series, "tlsproxy_upstream_handshake_duration_seconds_count", "egress") == {
        _labels(result="success"): 1.0,
        _labels(result="failure"): 1.0,
    }
    tls = {"version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256", "alpn": "h2"}
    assert _of(series, "tlsproxy_upstream_tls_negotiated_total", "egress") == {
        _labels(**tls, resumed="false"): 2.0,
        _labels(**tls, resumed="true"): 1.0,
    }
    # the ingress side saw none of it
    assert not any(_of(series, "tlsproxy_handshakes_total", "egress").values())
    assert _of(series, "tlsproxy_tls_negotiated_total", "egress") == {}


# ---------------------------------------------------------------- workers > 1


@pytest.fixture
def multiprocess_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """prometheus-client's multiprocess mode, as a worker runs it, in this process."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    yield tmp_path
    values.close_all_multiprocess_files()  # type: ignore[no-untyped-call]


def _worker(pid: int, monkeypatch: pytest.MonkeyPatch) -> Metrics:
    """One worker's metrics, written to its own files (as pid `pid`)."""
    value_class = values.MultiProcessValue(lambda: pid)  # type: ignore[no-untyped-call]
    monkeypatch.setattr(values, "ValueClass", value_class)
    return Metrics(CollectorRegistry())


def test_with_workers_the_upstream_families_merge_into_one_scrape(
    multiprocess_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for pid, failed in ((101, UpstreamOutcome.SERVER_CLOSED), (102, UpstreamOutcome.NOT_TLS)):
        worker = _worker(pid, monkeypatch)
        egress = worker.for_listener("egress", terminates=False, originates=True)
        worker.for_listener("web")
        upstream = egress.upstream
        assert upstream is not None
        upstream.outcomes[UpstreamOutcome.SUCCESS].inc()
        upstream.outcomes[failed].inc()
        upstream.wants_read.inc()
        upstream.handshake_ok.observe(0.002)
        upstream.negotiated("TLSv1.3", "TLS_AES_256_GCM_SHA384", "none", False)
    registry = CollectorRegistry()
    registry.register(MergedWorkers(str(multiprocess_dir), SupervisorMetrics(CollectorRegistry())))
    text = generate_latest(registry).decode()
    families = [family.name for family in text_string_to_metric_families(text)]
    for family in UPSTREAM_FAMILIES:
        assert families.count(family) == 1, family
    series = _series(registry)
    assert not [key for key in series if "pid" in dict(key[1])]
    outcomes = _of(series, "tlsproxy_upstream_handshakes_total", "egress")
    assert outcomes == {
        _labels(outcome=o.value): {"success": 2.0, "server_closed": 1.0, "not_tls": 1.0}.get(
            o.value, 0.0
        )
        for o in UpstreamOutcome
    }
    assert _of(series, "tlsproxy_upstream_handshake_wants_total", "egress") == {
        _labels(want="read"): 2.0,
        _labels(want="write"): 0.0,
    }
    duration = _of(series, "tlsproxy_upstream_handshake_duration_seconds_bucket", "egress")
    assert duration[_labels(result="success", le="0.0025")] == 2.0
    assert duration[_labels(result="success", le="0.001")] == 0.0
    negotiated = _of(series, "tlsproxy_upstream_tls_negotiated_total", "egress")
    assert list(negotiated.values()) == [2.0]
    # plaintext in: no ingress handshake series in the merged scrape either
    for name in INGRESS_HANDSHAKE_SAMPLES:
        assert _of(series, name, "egress") == {}, name
    assert len(_of(series, "tlsproxy_handshakes_total", "web")) == len(Outcome)
