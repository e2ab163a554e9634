"""deploy/kubernetes/overlays/egress: the sidecar also carries the app's calls
to an upstream over mutual TLS.

Then the real daemon runs on the rendered config, in the projected volume
as the kubelet writes it (only the listening addresses and the upstream's
address are changed, to loopback ports of the test): the app's plaintext
reaches a real mTLS upstream that sees the projected client certificate, a
renewed certificate is presented after the kubelet swaps the Secret with no
signal sent, and an upstream with another SPIFFE ID is refused and counted.

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

import socket
import ssl
import tomllib
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio

from proxy.config import load_config, parse_address
from tests.daemon import PYTHON_M_PROXY, env_for, spawn
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
from tests.helpers import STEP, free_port, sample, scrape, until
from tests.pki import CA, Leaf, served_serial
from tests.test_deploy_kubernetes import ADMITTED, NEIGHBOUR, PEERS
from tests.test_deploy_renewal import not_after

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


# ---------------------------------------------------------------- the real daemon

CLIENT_SECRET = "web-upstream-tls"  # certificate.yaml


def certificate_spec(resources: list[dict[str, Any]], secret: str) -> dict[str, Any]:
    specs: list[dict[str, Any]] = [
        r["spec"]
        for r in resources
        if r["kind"] == "Certificate" and r["spec"]["secretName"] == secret
    ]
    (spec,) = specs
    return spec


class Upstream:
    """A mutual-TLS server, as the payments service would be: it requires a
    client certificate from `ca`, records each one's serial and every byte
    it receives, and echoes."""

    def __init__(self, ca: CA, leaf: Leaf) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(leaf.cert), str(leaf.key))
        self.context.verify_mode = ssl.CERT_REQUIRED
        ca.trust(self.context)
        self.client_serials: list[int] = []
        self.received = bytearray()

    async def handle(self, stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, self.context, server_side=True)
        try:
            await tls.do_handshake()
            self.client_serials.append(served_serial(tls.getpeercert(binary_form=True)))
            while data := await tls.receive_some(65536):
                self.received += data
                await tls.send_all(data)
        except trio.BrokenResourceError:
            pass  # the proxy refused us (or reset): nothing to echo
        finally:
            await trio.aclose_forcefully(tls)

    async def start(self, nursery: trio.Nursery, socket_buffer: int | None = None) -> int:
        """Serve on a loopback port (accepted sockets inherit `socket_buffer`
        as their send and receive buffer sizes) and return it."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        if socket_buffer is not None:
            for listener in listeners:
                for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    listener.socket.setsockopt(socket.SOL_SOCKET, option, socket_buffer)
        nursery.start_soon(trio.serve_listeners, self.handle, listeners)
        return int(listeners[0].socket.getsockname()[1])


class Sidecar:
    """The rendered egress overlay laid out as the kubelet would, with the
    listening and upstream addresses moved to the test's loopback ports."""

    def __init__(self, directory: Path, upstream_port: int) -> None:
        self.resources = render(EGRESS)
        self.etc = directory / "etc-tlsproxy"
        self.egress_port = free_port()
        listener = egress_listener(rendered_config(self.resources))
        self.moves = {
            f'listen = "{listener["listen"]}"': f'listen = "127.0.0.1:{self.egress_port}"',
            f'backend = "{listener["backend"]}"': f'backend = "127.0.0.1:{upstream_port}"',
        }

    def write(self, secrets: dict[str, dict[str, bytes]]) -> Path:
        config_path, payload = projected_payload(self.resources, secrets)
        text = payload[config_path].decode()
        for old, new in self.moves.items():
            assert text.count(old) == 1, old
            text = text.replace(old, new)
        payload[config_path] = text.encode()
        write_volume(self.etc, payload)
        return self.etc / config_path


def with_client_leaf(
    resources: list[dict[str, Any]], ca: CA, leaf: Leaf
) -> dict[str, dict[str, bytes]]:
    secrets = secrets_as_issued(resources, ca)
    secrets[CLIENT_SECRET]["tls.crt"] = leaf.cert.read_bytes()
    secrets[CLIENT_SECRET]["tls.key"] = leaf.key.read_bytes()
    return secrets


async def call_through(port: int, message: bytes) -> bytes:
    """What the app gets back for one plaintext request to the egress listener."""
    received = b""
    with trio.fail_after(STEP):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            with suppress(trio.BrokenResourceError):  # a reset is a refusal too
                await stream.send_all(message)
                while len(received) < len(message):
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    received += chunk
    return received


def argv_for(config: Path) -> list[str]:
    # the ingress listener and admin move by flag, to loopback port 0
    return [
        *PYTHON_M_PROXY,
        *("run", "--config", str(config)),
        *("--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"),
    ]


async def test_the_app_reaches_the_upstream_over_mtls_and_a_renewed_client_certificate_is_used(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    ca = CA(tmp_path)
    resources = render(EGRESS)
    (upstream_id,) = egress_listener(rendered_config(resources))["upstream_tls"]["allow"]["uri"]
    upstream = Upstream(ca, ca.issue("upstream", "payments.example", uris=(upstream_id,)))
    sidecar = Sidecar(tmp_path, await upstream.start(nursery))
    own_id = tuple(certificate_spec(resources, CLIENT_SECRET)["uris"])
    now = datetime.now(UTC).replace(microsecond=0)
    first = ca.issue("first", uris=own_id, client=True, not_after=now + timedelta(days=60))
    renewed = ca.issue("renewed", uris=own_id, client=True, not_after=now + timedelta(days=90))
    config = sidecar.write(with_client_leaf(resources, ca, first))

    async with spawn(nursery, argv_for(config), env=env_for(tmp_path / "state")) as daemon:
        _, admin_port = await daemon.started()
        await daemon.wait_for("listening", listener="payments")
        assert await call_through(sidecar.egress_port, b"GET /charge") == b"GET /charge"
        assert upstream.client_serials == [first.serial]
        _, text = await scrape(admin_port)
        expiry = "tlsproxy_certificate_expiry_timestamp_seconds"
        assert sample(text, expiry, listener="payments") == not_after(first)
        ok = {"listener": "payments", "outcome": "success"}
        assert sample(text, "tlsproxy_upstream_handshakes_total", **ok) == 1

        sidecar.write(with_client_leaf(resources, ca, renewed))  # the kubelet's swap

        async def renewed_presented() -> bool:
            assert await call_through(sidecar.egress_port, b"ping") == b"ping"
            return upstream.client_serials[-1] == renewed.serial

        await until(renewed_presented)
        _, text = await scrape(admin_port)
        assert sample(text, expiry, listener="payments") == not_after(renewed)
        assert sample(text, "tlsproxy_config_reloads_total", result="failure") == 0


async def test_an_upstream_with_another_spiffe_id_is_refused_before_any_byte_reaches_it(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    ca = CA(tmp_path)
    resources = render(EGRESS)
    impostor = ca.issue("impostor", "payments.example", uris=("spiffe://prod.example/ns/x/sa/y",))
    upstream = Upstream(ca, impostor)
    sidecar = Sidecar(tmp_path, await upstream.start(nursery))
    config = sidecar.write(secrets_as_issued(resources, ca))

    async with spawn(nursery, argv_for(config), env=env_for(tmp_path / "state")) as daemon:
        _, admin_port = await daemon.started()
        await daemon.wait_for("listening", listener="payments")

        assert await call_through(sidecar.egress_port, b"GET /charge") == b""
        assert upstream.received == b""

        denied = {"listener": "payments", "outcome": "server_identity_denied"}

        async def counted() -> bool:
            _, text = await scrape(admin_port)
            return sample(text, "tlsproxy_upstream_handshakes_total", **denied) == 1

        await until(counted)
