"""deploy/kubernetes as `kubectl kustomize` renders it, and what the tests look up in it."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import STEP

KUBERNETES = Path(__file__).resolve().parent.parent.parent / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
CERT_MANAGER = KUBERNETES / "overlays" / "cert-manager"
EGRESS = KUBERNETES / "overlays" / "egress"
OVERLAYS = [CERT_MANAGER, EGRESS]


def render(kustomization: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is not installed"
    result = subprocess.run(
        [kubectl, "kustomize", str(kustomization)],
        capture_output=True,
        text=True,
        timeout=STEP,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {resource["kind"]: resource for resource in resources}


def pod_spec(resources: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = by_kind(resources)["Deployment"]["spec"]["template"]["spec"]
    return spec


def container(resources: list[dict[str, Any]], name: str) -> dict[str, Any]:
    matches: list[dict[str, Any]] = [
        c for c in pod_spec(resources)["containers"] if c["name"] == name
    ]
    assert len(matches) == 1, name
    return matches[0]


def rendered_sidecar_config(resources: list[dict[str, Any]]) -> str:
    """The tlsproxy.toml the pods get: the ConfigMap that the sidecar's
    projected volume names, as kustomize rendered it (hash suffix and all)."""
    (volume,) = [v for v in pod_spec(resources)["volumes"] if v["name"] == "tlsproxy-config"]
    (source,) = [s["configMap"] for s in volume["projected"]["sources"] if "configMap" in s]
    (item,) = [i for i in source["items"] if i["path"] == "tlsproxy.toml"]
    (config_map,) = [
        r for r in resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] == source["name"]
    ]
    text: str = config_map["data"][item["key"]]
    return text


def projected_payload(
    resources: list[dict[str, Any]], secrets: Mapping[str, Mapping[str, bytes]]
) -> tuple[str, dict[str, bytes]]:
    """The sidecar's projected volume as the rendered Deployment lays it out:
    (the config's path in it, every file's content by path). The ConfigMap's
    items come from the render, each Secret's from `secrets` (by Secret name,
    then key), so a Secret or key the manifest names and the test does not
    supply fails here."""
    config = rendered_sidecar_config(resources).encode()
    (volume,) = [v for v in pod_spec(resources)["volumes"] if v["name"] == "tlsproxy-config"]
    payload: dict[str, bytes] = {}
    config_path = ""
    for source in volume["projected"]["sources"]:
        if "configMap" in source:
            (item,) = source["configMap"]["items"]
            config_path = item["path"]
            payload[config_path] = config
        else:
            secret = secrets[source["secret"]["name"]]
            for item in source["secret"]["items"]:
                payload[item["path"]] = secret[item["key"]]
    assert config_path, "no ConfigMap in the sidecar's projected volume"
    return config_path, payload
