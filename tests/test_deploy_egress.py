"""deploy/kubernetes/overlays/egress: the sidecar also carries the app's calls
to an upstream over mutual TLS.

What the overlay must keep true, checked on the `kubectl kustomize` output:
the sidecar's config is the base's plus one egress listener, on loopback
only (whoever reaches it speaks to the upstream as this workload), where the
app is told to call; the client certificate cert-manager issues is projected
where that listener names it, into the sidecar alone; the rendered config
loads with tlsproxy's own loader with every Secret in place; the
NetworkPolicy lets the pod reach the upstream's pods on their port and the
cluster DNS, nothing else, and still admits exactly what the base admits.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from proxy.config import load_config, parse_address
from tests.deploy.kubelet import write_volume
from tests.deploy.kustomize import (
    BASE,
    EGRESS,
    OVERLAYS,
    by_kind,
    container,
    pod_spec,
    projected_payload,
    render,
    rendered_sidecar_config,
)
from tests.deploy.networkpolicy import Peer, admits, admits_egress
from tests.pki import CA
from tests.test_deploy_kubernetes import ADMITTED, NEIGHBOUR, PEERS

# The namespace label Kubernetes sets on every namespace, which the policy selects by.
NAMESPACE_LABEL = "kubernetes.io/metadata.name"
POD_NAME_LABEL = "app.kubernetes.io/name"


def egress_listener(config: dict[str, Any]) -> dict[str, Any]:
    listeners: list[dict[str, Any]] = [x for x in config["listeners"] if "upstream_tls" in x]
    (listener,) = listeners
    return listener


def rendered_config(resources: list[dict[str, Any]]) -> dict[str, Any]:
    config: dict[str, Any] = tomllib.loads(rendered_sidecar_config(resources))
    return config


def test_the_overlay_config_is_the_base_config_then_one_egress_listener() -> None:
    base_text = (BASE / "tlsproxy.toml").read_text()
    overlay_text = (EGRESS / "tlsproxy.toml").read_text()
    assert overlay_text.startswith(base_text), (
        "overlays/egress/tlsproxy.toml must begin with base/tlsproxy.toml verbatim: "
        "copy the base's file over its head"
    )
    assert rendered_sidecar_config(render(EGRESS)) == overlay_text

    base, overlay = tomllib.loads(base_text), tomllib.loads(overlay_text)
    assert {k: v for k, v in overlay.items() if k != "listeners"} == {
        k: v for k, v in base.items() if k != "listeners"
    }
    *ingress, added = overlay["listeners"]
    assert ingress == base["listeners"]
    assert "upstream_tls" in added and "tls" not in added  # plaintext in, TLS out
    assert added["upstream_tls"]["allow"]["uri"], "the upstream is checked by its SPIFFE ID"


def test_the_egress_listener_is_on_loopback_only_and_the_app_is_pointed_at_it() -> None:
    resources = render(EGRESS)
    listen = parse_address(egress_listener(rendered_config(resources))["listen"])
    assert listen.host == "127.0.0.1", "anyone who reaches it borrows our client certificate"

    app_env = {e["name"]: e["value"] for e in container(resources, "app")["env"]}
    url = urlsplit(app_env["PAYMENTS_URL"])
    assert (url.scheme, url.hostname, url.port) == ("http", listen.host, listen.port)
    # nothing publishes it beyond the pod
    container_ports = {
        p["containerPort"] for c in pod_spec(resources)["containers"] for p in c["ports"]
    }
    assert listen.port not in container_ports
    named = {
        p["name"]: p["containerPort"] for c in pod_spec(resources)["containers"] for p in c["ports"]
    }
    service_targets = {
        named.get(p["targetPort"], p["targetPort"])
        for p in by_kind(resources)["Service"]["spec"]["ports"]
    }
    assert listen.port not in service_targets


def test_the_client_certificate_is_projected_where_the_egress_listener_reads_it() -> None:
    resources = render(EGRESS)
    (certificate,) = [r for r in resources if r["kind"] == "Certificate"]
    spec = certificate["spec"]
    (uri,) = spec["uris"]  # an X509-SVID carries exactly one URI SAN
    assert uri.startswith("spiffe://")
    assert "client auth" in spec["usages"]

    (volume,) = [v for v in pod_spec(resources)["volumes"] if v["name"] == "tlsproxy-config"]
    (source,) = [
        s["secret"]
        for s in volume["projected"]["sources"]
        if "secret" in s and s["secret"]["name"] == spec["secretName"]
    ]
    projected = {item["key"]: item["path"] for item in source["items"]}
    upstream = egress_listener(rendered_config(resources))["upstream_tls"]
    (pair,) = upstream["certificates"]
    # paths in the config are relative to it, and it sits at the volume's top
    assert (pair["cert"], pair["key"], upstream["ca"]) == (
        projected["tls.crt"],
        projected["tls.key"],
        projected["ca.crt"],
    )
    # only the sidecar holds the key, not the app that calls through it
    mounting = [
        c["name"]
        for c in pod_spec(resources)["containers"]
        if any(m["name"] == volume["name"] for m in c.get("volumeMounts", []))
    ]
    assert mounting == ["tlsproxy"]


def secrets_as_issued(resources: list[dict[str, Any]], ca: CA) -> dict[str, dict[str, bytes]]:
    """Every Secret the sidecar projects, as cert-manager fills a
    kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt): a client certificate
    with its URI SANs where a Certificate of the render asks for client auth,
    else a server certificate."""
    certificates = {
        r["spec"]["secretName"]: r["spec"] for r in resources if r["kind"] == "Certificate"
    }
    (volume,) = [v for v in pod_spec(resources)["volumes"] if v["name"] == "tlsproxy-config"]
    secrets: dict[str, dict[str, bytes]] = {}
    for source in volume["projected"]["sources"]:
        if "secret" not in source:
            continue
        name = source["secret"]["name"]
        spec = certificates.get(name, {})
        leaf = ca.issue(
            name,
            *spec.get("dnsNames", ["web.example.com"]),
            uris=tuple(spec.get("uris", ())),
            client="client auth" in spec.get("usages", ()),
        )
        secrets[name] = {
            "tls.crt": leaf.cert.read_bytes(),
            "tls.key": leaf.key.read_bytes(),
            "ca.crt": ca.ca_file.read_bytes(),
        }
    return secrets


@pytest.mark.parametrize("kustomization", [BASE, *OVERLAYS], ids=lambda p: p.name)
def test_the_rendered_config_loads_with_every_secret_projected_beside_it(
    kustomization: Path, tmp_path: Path
) -> None:
    # tlsproxy's own loader, files checked (every certificate matches its key,
    # the CA bundle reads), on the projected volume as the kubelet writes it
    resources = render(kustomization)
    (tmp_path / "pki").mkdir()
    secrets = secrets_as_issued(resources, CA(tmp_path / "pki"))
    config_path, payload = projected_payload(resources, secrets)
    write_volume(tmp_path / "etc", payload)

    config = load_config(tmp_path / "etc" / config_path)

    assert config.warnings == ()
    assert [listener.name for listener in config.listeners] == [
        listener["name"] for listener in rendered_config(resources)["listeners"]
    ]


# Where the pod may connect to. Destinations by namespace labels and pod labels.
UPSTREAM = Peer({NAMESPACE_LABEL: "payments"}, {POD_NAME_LABEL: "payments"})
UPSTREAM_LOOKALIKE = Peer({NAMESPACE_LABEL: "team-a"}, {POD_NAME_LABEL: "payments"})
DNS = Peer({NAMESPACE_LABEL: "kube-system"}, {"k8s-app": "kube-dns"})
DESTINATIONS = {
    "upstream": (UPSTREAM, False),
    "upstream-lookalike": (UPSTREAM_LOOKALIKE, False),
    "dns": (DNS, False),
    "neighbour": (NEIGHBOUR, True),  # (peer, in the policy's namespace)
}
# (destination, port, protocol) -> admitted
EGRESS_ADMITTED = {
    ("upstream", 8443, "TCP"): True,
    ("upstream", 8080, "TCP"): False,
    ("upstream-lookalike", 8443, "TCP"): False,
    ("dns", 53, "UDP"): True,
    ("dns", 53, "TCP"): True,
    ("dns", 8443, "TCP"): False,
    ("neighbour", 8443, "TCP"): False,
    ("neighbour", 53, "UDP"): False,
}


@pytest.mark.parametrize(
    ("destination", "port", "protocol"),
    EGRESS_ADMITTED,
    ids=[f"{d}-{port}-{proto}" for d, port, proto in EGRESS_ADMITTED],
)
def test_network_policy_lets_the_pod_reach_only_the_upstream_and_dns(
    destination: str, port: int, protocol: str
) -> None:
    resources = render(EGRESS)
    policy = by_kind(resources)["NetworkPolicy"]
    pod_labels = by_kind(resources)["Deployment"]["spec"]["template"]["metadata"]["labels"]
    peer, same_namespace = DESTINATIONS[destination]

    admitted = admits_egress(
        policy, pod_labels, peer, ("", port), protocol=protocol, same_namespace=same_namespace
    )

    assert admitted is EGRESS_ADMITTED[destination, port, protocol]


def test_network_policy_admits_the_backend_the_egress_listener_connects_to() -> None:
    # <service>.<namespace>.svc.cluster.local:<port>; the example's pods carry
    # their Service's name as app.kubernetes.io/name and listen on its port
    resources = render(EGRESS)
    backend = parse_address(egress_listener(rendered_config(resources))["backend"])
    service, namespace, *_ = backend.host.split(".")
    policy = by_kind(resources)["NetworkPolicy"]
    pod_labels = by_kind(resources)["Deployment"]["spec"]["template"]["metadata"]["labels"]
    peer = Peer({NAMESPACE_LABEL: namespace}, {POD_NAME_LABEL: service})

    assert admits_egress(policy, pod_labels, peer, ("", backend.port), same_namespace=False)


@pytest.mark.parametrize(
    ("port_name", "peer_name"), ADMITTED, ids=[f"{port}-from-{peer}" for port, peer in ADMITTED]
)
def test_network_policy_still_admits_what_the_base_admits(port_name: str, peer_name: str) -> None:
    resources = render(EGRESS)
    policy = by_kind(resources)["NetworkPolicy"]
    pod_labels = by_kind(resources)["Deployment"]["spec"]["template"]["metadata"]["labels"]
    ports = {
        p["name"]: p["containerPort"] for c in pod_spec(resources)["containers"] for p in c["ports"]
    }
    peer, same_namespace = PEERS[peer_name]

    admitted = admits(
        policy, pod_labels, (port_name, ports[port_name]), peer, same_namespace=same_namespace
    )

    assert admitted is ADMITTED[port_name, peer_name]
