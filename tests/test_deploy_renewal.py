"""A renewed certificate reaches the shipped sidecar without anyone sending SIGHUP.

cert-manager renews the Secret; the kubelet writes the new version into the
pod's volume and swaps `..data` (tests/deploy/kubelet.py); nothing in a pod
signals tlsproxy. The real daemon, on the shipped config, must then serve
the new certificate to a real TLS client and export its expiry. Two layouts:
the Deployment's projected volume exactly as rendered (the ConfigMap's
tlsproxy.toml and the Secret's tls/tls.crt, tls/tls.key in one volume), and
the image's embedded config with a plain Secret volume mounted on its tls/
directory (`tls.crt -> ..data/tls.crt`), as `docker run -v` or a
hand-written pod would do it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509

from tests.daemon import PYTHON_M_PROXY, env_for, spawn
from tests.deploy.kubelet import write_volume
from tests.deploy.kustomize import BASE, projected_payload, render
from tests.helpers import STEP, sample, scrape, until
from tests.pki import CA, Leaf, client_context, handshake

SHIPPED_CONFIG = BASE / "tlsproxy.toml"  # what the Dockerfile embeds and the ConfigMap holds


def secret_data(leaf: Leaf) -> dict[str, bytes]:
    return {"tls.crt": leaf.cert.read_bytes(), "tls.key": leaf.key.read_bytes()}


def projected_volume(leaf: Leaf) -> tuple[str, dict[str, bytes]]:
    """The sidecar's projected volume of the rendered Deployment: (path of the
    config in it, the payload by path), every item where the manifest puts it."""
    return projected_payload(render(BASE), {"web-tls": secret_data(leaf)})


def lay_out_projected(etc: Path, leaf: Leaf) -> Path:
    config_path, payload = projected_volume(leaf)
    write_volume(etc, payload)
    return etc / config_path


def lay_out_secret_volume(etc: Path, leaf: Leaf) -> Path:
    etc.mkdir()
    (etc / "tlsproxy.toml").write_bytes(SHIPPED_CONFIG.read_bytes())
    write_volume(etc / "tls", secret_data(leaf))
    return etc / "tlsproxy.toml"


def renew_projected(etc: Path, leaf: Leaf) -> None:
    write_volume(etc, projected_volume(leaf)[1])


def renew_secret_volume(etc: Path, leaf: Leaf) -> None:
    write_volume(etc / "tls", secret_data(leaf))


LAYOUTS: dict[str, tuple[Callable[[Path, Leaf], Path], Callable[[Path, Leaf], None]]] = {
    "projected-volume": (lay_out_projected, renew_projected),
    "secret-volume": (lay_out_secret_volume, renew_secret_volume),
}


def not_after(leaf: Leaf) -> float:
    cert = x509.load_pem_x509_certificate(leaf.cert.read_bytes())
    return cert.not_valid_after_utc.timestamp()


async def served(port: int, ca: CA) -> int:
    """The serial of the certificate a real TLS client is served."""
    return (await trio.to_thread.run_sync(handshake, port, client_context(ca))).serial


async def expiry(admin_port: int) -> float:
    _, text = await scrape(admin_port)
    return sample(text, "tlsproxy_certificate_expiry_timestamp_seconds", listener="web")


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_the_shipped_sidecar_serves_a_renewed_certificate_after_the_kubelet_swaps_it(
    layout: str, nursery: trio.Nursery, tmp_path: Path, echo_port: int
) -> None:
    lay_out, renew = LAYOUTS[layout]
    ca = CA(tmp_path)
    now = datetime.now(UTC).replace(microsecond=0)
    first = ca.issue("first", "localhost", not_after=now + timedelta(days=60))
    renewed = ca.issue("renewed", "localhost", not_after=now + timedelta(days=90))
    etc = tmp_path / "etc-tlsproxy"
    config = lay_out(etc, first)
    argv: list[Any] = [
        *PYTHON_M_PROXY,
        *("run", "--config", str(config)),
        # only the addresses change: the test binds loopback port 0
        *("--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"),
        *("--backend", f"127.0.0.1:{echo_port}"),
    ]

    async with spawn(nursery, argv, env=env_for(tmp_path / "state"), cwd=tmp_path) as daemon:
        port, admin_port = await daemon.started()
        with trio.fail_after(STEP):
            assert await served(port, ca) == first.serial
            assert await expiry(admin_port) == not_after(first)

        renew(etc, renewed)

        async def renewal_served() -> bool:
            return await served(port, ca) == renewed.serial

        await until(renewal_served)
        with trio.fail_after(STEP):
            assert await expiry(admin_port) == not_after(renewed)
            _, text = await scrape(admin_port)
        assert sample(text, "tlsproxy_config_reloads_total", result="success") >= 1
        assert sample(text, "tlsproxy_config_reloads_total", result="failure") == 0
