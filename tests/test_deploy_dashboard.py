"""deploy/grafana/tlsproxy.json: it loads, and it shows what the issue asks for.

Its queries are checked elsewhere against a real scrape's metric names and
run against a real Prometheus (tests/test_deploy_prometheus.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.deploy.promql import metric_names
from tests.test_deploy_prometheus import DASHBOARD, dashboard_queries

# Every family a platform team looks at, by the panel topic that needs it.
SHOWN = {
    "handshakes by outcome, success ratio": "tlsproxy_handshakes_total",
    "wants per handshake": "tlsproxy_handshake_wants_total",
    "handshake latency heatmap and quantiles": "tlsproxy_handshake_duration_seconds_bucket",
    "negotiated versions, ciphers, ALPN": "tlsproxy_tls_negotiated_total",
    "active connections": "tlsproxy_connections_active",
    "bytes": "tlsproxy_bytes_total",
    "backend failures": "tlsproxy_backend_connect_failures_total",
    "certificate expiry": "tlsproxy_certificate_expiry_timestamp_seconds",
    "config reloads": "tlsproxy_config_reloads_total",
    "upstream handshakes by outcome": "tlsproxy_upstream_handshakes_total",
    "upstream handshake latency quantiles": "tlsproxy_upstream_handshake_duration_seconds_bucket",
    "upstream negotiated versions, resumption": "tlsproxy_upstream_tls_negotiated_total",
}


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(Path(DASHBOARD).read_text())
    return dashboard


def test_dashboard_has_unique_panel_ids_and_every_query_uses_the_datasource_variable() -> None:
    dashboard = load()
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["description"], panel["id"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_shows_every_topic_the_operators_need() -> None:
    used = set().union(*(metric_names(query) for query in dashboard_queries()))
    missing = {topic: name for topic, name in SHOWN.items() if name not in used}
    assert missing == {}


def test_negotiated_parameters_each_have_a_panel() -> None:
    exprs = [t["expr"] for p in load()["panels"] for t in p.get("targets", [])]
    for label in ("version", "cipher", "alpn", "resumed"):
        assert any(f"sum by ({label}) (rate(tlsproxy_tls_negotiated_total" in e for e in exprs)
    assert any(p["type"] == "heatmap" for p in load()["panels"])


def test_a_panel_shows_the_clients_the_allow_table_denied() -> None:
    exprs = [t["expr"] for p in load()["panels"] for t in p.get("targets", [])]
    assert any('outcome="client_cert_denied"' in expr for expr in exprs)


def test_upstream_handshakes_show_their_outcomes_versions_and_resumption_ratio() -> None:
    exprs = [t["expr"] for p in load()["panels"] for t in p.get("targets", [])]
    assert any(
        "by (listener, outcome) (rate(tlsproxy_upstream_handshakes_total" in e for e in exprs
    )
    assert any(
        "by (listener, version) (rate(tlsproxy_upstream_tls_negotiated_total" in e for e in exprs
    )
    (ratio,) = [
        e for e in exprs if "tlsproxy_upstream_tls_negotiated_total{" in e and 'resumed="true"' in e
    ]
    numerator, denominator = ratio.split("\n/\n")
    assert numerator.replace(', resumed="true"', "") == denominator
    quantiles = [e for e in exprs if "tlsproxy_upstream_handshake_duration_seconds_bucket" in e]
    assert {e.split(",")[0] for e in quantiles} == {
        f"histogram_quantile({q}" for q in ("0.5", "0.9", "0.99")
    }


def test_the_listener_variable_lists_egress_only_listeners_too() -> None:
    # a listener without [listeners.tls] makes no client handshakes, but
    # every listener accepts connections: this family names them all
    variables = {v["name"]: v for v in load()["templating"]["list"]}
    assert variables["listener"]["query"]["query"].startswith(
        "label_values(tlsproxy_connections_total{"
    )
