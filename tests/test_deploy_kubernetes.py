"""deploy/kubernetes rendered by kustomize and validated offline against the schemas.

`kubectl kustomize` renders the base and the cert-manager overlay;
kubernetes-validate (PyPI, bundles the Kubernetes OpenAPI schemas) checks
every built-in kind strictly. The operator kinds (PodMonitor,
PrometheusRule, Certificate) have no bundled schema, so the tests check what
matters about them: that they point at the ports, labels and Secret the
Deployment really has. The sidecar's TOML passes `tlsproxy check-config`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type hints
import pytest
import yaml

from tests.deploy.kustomize import (
    BASE,
    CERT_MANAGER,
    OVERLAYS,
    by_kind,
    container,
    pod_spec,
    render,
    rendered_sidecar_config,
)
from tests.deploy.networkpolicy import Peer, admits
from tests.helpers import STEP, write_certs

REPO = Path(__file__).resolve().parent.parent
KUBERNETES_VERSION = "1.37.0"  # the newest schema kubernetes-validate bundles
OPERATOR_KINDS = {"PodMonitor", "PrometheusRule", "Certificate"}


def sidecar_toml() -> dict[str, Any]:
    config: dict[str, Any] = tomllib.loads((BASE / "tlsproxy.toml").read_text())
    return config


@pytest.mark.parametrize("kustomization", [BASE, *OVERLAYS], ids=lambda p: p.name)
def test_kustomize_output_is_valid_against_the_kubernetes_schemas(kustomization: Path) -> None:
    resources = render(kustomization)
    kinds = {resource["kind"] for resource in resources}
    assert {"Deployment", "ConfigMap", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    assert {"PodMonitor", "PrometheusRule"} <= kinds

    for resource in resources:
        if resource["kind"] in OPERATOR_KINDS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        else:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kustomization", [BASE, *OVERLAYS], ids=lambda p: p.name)
def test_the_rendered_sidecar_config_watches_its_files(kustomization: Path) -> None:
    # cert-manager renews the Secret and the kubelet swaps the projected
    # files; nothing in a pod sends SIGHUP, so only the watch picks them up
    config = tomllib.loads(rendered_sidecar_config(render(kustomization)))
    assert config["process"]["watch"] is True


def test_the_schema_validation_rejects_a_misspelled_field() -> None:
    # proves the check above is not vacuous: strict mode catches a typo
    deployment = by_kind(render(BASE))["Deployment"]
    tlsproxy = deployment["spec"]["template"]["spec"]["containers"][0]
    tlsproxy["securityContext"]["readOnlyRootFileSystem"] = True  # "System", not "system"

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_cert_manager_overlay_issues_the_secret_the_sidecar_mounts() -> None:
    resources = render(CERT_MANAGER)
    certificate = by_kind(resources)["Certificate"]
    (volume,) = [v for v in pod_spec(resources)["volumes"] if v["name"] == "tlsproxy-config"]
    secrets = [s["secret"]["name"] for s in volume["projected"]["sources"] if "secret" in s]

    assert secrets == [certificate["spec"]["secretName"]]


def hours(duration: str) -> float:
    """A cert-manager duration as this repository writes them: whole hours."""
    match = re.fullmatch(r"(\d+)h", duration)
    assert match, f"{duration!r}: write certificate durations in hours"
    return float(match[1])


@pytest.mark.parametrize("kustomization", OVERLAYS, ids=lambda p: p.name)
def test_every_certificate_is_renewed_before_the_expiry_alert_would_fire(
    kustomization: Path,
) -> None:
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "rules.yml").read_text())
    (rule,) = [
        r
        for g in rules["groups"]
        for r in g["rules"]
        if r["alert"] == "TLSProxyCertificateExpiresIn14Days"
    ]
    threshold = re.search(r"< (\d+) \* 86400", rule["expr"])
    assert threshold, rule["expr"]
    alert_days = int(threshold[1])
    certificates = [r["spec"] for r in render(kustomization) if r["kind"] == "Certificate"]
    assert certificates
    for spec in certificates:
        renew_days = hours(spec["renewBefore"]) / 24
        assert alert_days < renew_days < hours(spec["duration"]) / 24, spec["secretName"]


def test_podmonitor_scrapes_the_admin_port_of_the_deployments_pods() -> None:
    resources = render(BASE)
    monitor = by_kind(resources)["PodMonitor"]["spec"]
    pod_labels = by_kind(resources)["Deployment"]["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container(resources, "tlsproxy")["ports"]}
    admin_port = int(sidecar_toml()["admin"]["listen"].rsplit(":", 1)[1])

    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert ports[endpoint["port"]] == admin_port


# Who tries to connect, by namespace labels and pod labels (the kubelet's
# probes come from the node, which NetworkPolicy always admits).
PROMETHEUS = Peer(
    {"kubernetes.io/metadata.name": "monitoring"}, {"app.kubernetes.io/name": "prometheus"}
)
PROMETHEUS_LOOKALIKE = Peer(  # any team can label a pod "prometheus" in its own namespace
    {"kubernetes.io/metadata.name": "team-a"}, {"app.kubernetes.io/name": "prometheus"}
)
CLIENT = Peer({"kubernetes.io/metadata.name": "frontend"}, {"app.kubernetes.io/name": "shop"})
NEIGHBOUR = Peer({"kubernetes.io/metadata.name": "web"}, {"app.kubernetes.io/name": "batch"})
PEERS = {
    "prometheus": (PROMETHEUS, False),
    "prometheus-lookalike": (PROMETHEUS_LOOKALIKE, False),
    "client": (CLIENT, False),
    "neighbour": (NEIGHBOUR, True),  # (peer, in the policy's namespace)
}
# (port name, peer) -> admitted. Everyone reaches TLS; only Prometheus the
# admin port; nobody the app's plaintext port, which only the sidecar uses.
ADMITTED = {
    ("https", "prometheus"): True,
    ("https", "prometheus-lookalike"): True,
    ("https", "client"): True,
    ("https", "neighbour"): True,
    ("tlsproxy-admin", "prometheus"): True,
    ("tlsproxy-admin", "prometheus-lookalike"): False,
    ("tlsproxy-admin", "client"): False,
    ("tlsproxy-admin", "neighbour"): False,
    ("http", "prometheus"): False,
    ("http", "prometheus-lookalike"): False,
    ("http", "client"): False,
    ("http", "neighbour"): False,
}


@pytest.mark.parametrize(
    ("port_name", "peer_name"), ADMITTED, ids=[f"{port}-from-{peer}" for port, peer in ADMITTED]
)
def test_network_policy_admits_clients_to_tls_and_only_prometheus_to_admin(
    port_name: str, peer_name: str
) -> None:
    resources = render(BASE)
    policy = by_kind(resources)["NetworkPolicy"]
    pod_labels = by_kind(resources)["Deployment"]["spec"]["template"]["metadata"]["labels"]
    ports = {
        p["name"]: p["containerPort"] for c in pod_spec(resources)["containers"] for p in c["ports"]
    }
    peer, same_namespace = PEERS[peer_name]

    assert (
        admits(
            policy, pod_labels, (port_name, ports[port_name]), peer, same_namespace=same_namespace
        )
        is ADMITTED[port_name, peer_name]
    )


def test_network_policy_names_only_ports_the_pod_has() -> None:
    # a misspelled named port would silently admit nobody
    resources = render(BASE)
    policy = by_kind(resources)["NetworkPolicy"]["spec"]
    tlsproxy_ports = {p["name"] for p in container(resources, "tlsproxy")["ports"]}
    named = {port["port"] for rule in policy["ingress"] for port in rule["ports"]}
    assert named == tlsproxy_ports == {"https", "tlsproxy-admin"}


def test_sidecar_is_probed_on_admin_endpoints_and_the_service_reaches_tls() -> None:
    resources = render(BASE)
    tlsproxy = container(resources, "tlsproxy")
    ports = {p["name"]: p["containerPort"] for p in tlsproxy["ports"]}
    config = sidecar_toml()

    assert tlsproxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert tlsproxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert ports[tlsproxy["readinessProbe"]["httpGet"]["port"]] == 9090
    assert config["admin"]["listen"] == "0.0.0.0:9090"  # the kubelet probes the pod IP
    (service_port,) = by_kind(resources)["Service"]["spec"]["ports"]
    assert ports[service_port["targetPort"]] == 8443
    assert config["listeners"][0]["listen"] == "0.0.0.0:8443"
    assert config["listeners"][0]["backend"] == "127.0.0.1:8080"
    assert {p["containerPort"] for p in container(resources, "app")["ports"]} == {8080}


def test_every_container_is_non_root_read_only_unprivileged_and_bounded() -> None:
    resources = render(BASE)
    spec = pod_spec(resources)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for each in spec["containers"]:
        security = each["securityContext"]
        assert security["runAsUser"] != 0, each["name"]
        assert security["readOnlyRootFilesystem"] is True, each["name"]
        assert security["allowPrivilegeEscalation"] is False, each["name"]
        assert security["capabilities"]["drop"] == ["ALL"], each["name"]
        assert {"cpu", "memory"} <= each["resources"]["requests"].keys(), each["name"]
        assert "memory" in each["resources"]["limits"], each["name"]
    assert container(resources, "tlsproxy")["securityContext"]["runAsUser"] == 65532
    mounts = {m["mountPath"] for m in container(resources, "tlsproxy")["volumeMounts"]}
    assert "/run/tlsproxy" in mounts  # the image's TLSPROXY_STATE_DIR lives there


def test_shutdown_drains_the_sidecar_before_the_app_stops_within_the_grace_period() -> None:
    resources = render(BASE)
    spec = pod_spec(resources)
    assert "lifecycle" not in container(resources, "tlsproxy")  # drain_delay does the wait
    app_sleep = container(resources, "app")["lifecycle"]["preStop"]["sleep"]["seconds"]
    process = sidecar_toml()["process"]
    assert process["drain_delay"] >= 5, "endpoints need a few seconds to drop the pod"

    drain_ends = process["drain_delay"] + process["drain_timeout"]
    assert app_sleep > drain_ends, "the app would get SIGTERM while connections still drain"
    assert spec["terminationGracePeriodSeconds"] > app_sleep, "no time left for the app to stop"
    budget = by_kind(resources)["PodDisruptionBudget"]["spec"]
    assert budget["selector"] == by_kind(resources)["Deployment"]["spec"]["selector"]


def test_sidecar_config_passes_check_config_with_the_secret_projected_beside_it(
    tmp_path: Path,
) -> None:
    # the same layout as the projected volume: tlsproxy.toml and tls/tls.{crt,key}
    (tmp_path / "tls").mkdir()
    certs = write_certs(tmp_path / "tls")
    certs.cert.rename(tmp_path / "tls" / "tls.crt")
    certs.key.rename(tmp_path / "tls" / "tls.key")
    shutil.copy(BASE / "tlsproxy.toml", tmp_path / "tlsproxy.toml")

    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(tmp_path / "tlsproxy.toml")],
        capture_output=True,
        text=True,
        timeout=STEP,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok (1 listener(s))" in result.stdout


def test_connections_alert_is_a_ratio_against_the_exported_limit() -> None:
    # the daemon exports max_connections, so no limit is written into the rule
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "rules.yml").read_text())
    (rule,) = [
        r
        for g in rules["groups"]
        for r in g["rules"]
        if r["alert"] == "TLSProxyConnectionsNearLimit"
    ]
    limit = sidecar_toml()["listeners"][0]["max_connections"]
    assert "tlsproxy_connections_active / tlsproxy_connections_max" in rule["expr"]
    assert str(limit) not in rule["expr"]
