"""Which pod may open a TCP connection to which port, under a NetworkPolicy.

A pure reading of the ingress and egress semantics of networking.k8s.io/v1
for the features the shipped policies use (matchLabels selectors, ports by
name or number, TCP and UDP); anything else (matchExpressions, ipBlock, endPort) is refused
rather than guessed, so a policy using it fails the tests until this reading
is extended. Traffic from the pod's own node (the kubelet's probes) is
always allowed by Kubernetes and is not modelled here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Labels = Mapping[str, str]


@dataclass(frozen=True)
class Peer:
    """A client pod: its namespace's labels and its own."""

    namespace: Labels
    pod: Labels


def _selects(selector: Mapping[str, Any], labels: Labels) -> bool:
    unsupported = selector.keys() - {"matchLabels"}
    assert not unsupported, f"selector fields not modelled: {unsupported}"
    wanted: Labels = selector.get("matchLabels", {})
    return all(labels.get(key) == value for key, value in wanted.items())


def _peer_matches(entry: Mapping[str, Any], peer: Peer, same_namespace: bool) -> bool:
    unsupported = entry.keys() - {"namespaceSelector", "podSelector"}
    assert not unsupported, f"peer fields not modelled: {unsupported}"
    if "namespaceSelector" in entry:
        namespace_ok = _selects(entry["namespaceSelector"], peer.namespace)
    else:
        namespace_ok = same_namespace  # a podSelector alone: the policy's namespace
    return namespace_ok and _selects(entry.get("podSelector", {}), peer.pod)


def _port_matches(entry: Mapping[str, Any], port: tuple[str, int], protocol: str) -> bool:
    unsupported = entry.keys() - {"port", "protocol"}
    assert not unsupported, f"port fields not modelled: {unsupported}"
    if entry.get("protocol", "TCP") != protocol:
        return False
    return "port" not in entry or entry["port"] in port


def _rules_admit(
    rules: list[Mapping[str, Any]],
    peers_key: str,
    *,
    port: tuple[str, int],
    protocol: str,
    peer: Peer,
    same_namespace: bool,
) -> bool:
    for rule in rules:
        ports = rule.get("ports")
        ports_ok = not ports or any(_port_matches(p, port, protocol) for p in ports)
        peers = rule.get(peers_key)
        peer_ok = not peers or any(_peer_matches(e, peer, same_namespace) for e in peers)
        if ports_ok and peer_ok:
            return True
    return False


def admits(
    policy: Mapping[str, Any],
    target: Labels,
    port: tuple[str, int],
    peer: Peer,
    *,
    same_namespace: bool,
) -> bool:
    """Whether `peer` may connect to the container port `port` (name, number)
    of a pod labelled `target`, by this policy alone."""
    spec = policy["spec"]
    if not _selects(spec["podSelector"], target) or "Ingress" not in spec["policyTypes"]:
        return True  # the policy does not isolate this pod's ingress
    return _rules_admit(
        spec.get("ingress", []),
        "from",
        port=port,
        protocol="TCP",
        peer=peer,
        same_namespace=same_namespace,
    )


def admits_egress(
    policy: Mapping[str, Any],
    source: Labels,
    destination: Peer,
    port: tuple[str, int],
    *,
    protocol: str = "TCP",
    same_namespace: bool,
) -> bool:
    """Whether a pod labelled `source` may connect (or, for UDP, send) to the
    port `port` (name, number; name "" for an unnamed one) of `destination`,
    by this policy alone. Replies to connections the pod accepted are not
    egress and are always allowed."""
    spec = policy["spec"]
    if not _selects(spec["podSelector"], source) or "Egress" not in spec["policyTypes"]:
        return True  # the policy does not isolate this pod's egress
    return _rules_admit(
        spec.get("egress", []),
        "to",
        port=port,
        protocol=protocol,
        peer=destination,
        same_namespace=same_namespace,
    )
