"""A client's SNI that is not ASCII: one protocol_error, one JSON access line
saying why, and nothing on stderr that is not JSON (or, in text mode, no
control character from the client).

CPython decodes the SNI as ASCII before `sni_callback` and reports the
failure through `sys.unraisablehook`, whose default prints a traceback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import trio

from tests import hellos
from tests.daemon import Daemon, port_of, run_daemon, write_config
from tests.helpers import STEP, Certs, outcome_delta, outcomes, raw_connect

# ESC [ 3 1 m (a terminal's "red") after a byte that is not ASCII.
HOSTILE_SNI = b"\xff\x1b[31m"


def _hello(server_name: bytes) -> bytes:
    """A TLS 1.2 ClientHello that OpenSSL reads as far as the SNI callback."""
    sni = hellos.extension(0x0000, hellos.vec(b"\x00" + hellos.vec(server_name, 2), 2))
    groups = hellos.u16_list(0x000A, [0x001D, 0x0017])  # x25519, secp256r1
    signatures = hellos.u16_list(0x000D, [0x0804, 0x0403])  # rsa_pss_rsae_sha256, ecdsa
    point_formats = hellos.extension(0x000B, b"\x01\x00")
    ciphers = [0xC02F, 0xC02B]  # ECDHE-RSA/ECDSA-AES128-GCM-SHA256
    return hellos.records(hellos.client_hello(ciphers, [sni, groups, signatures, point_formats]))


async def _send_hostile_hello(port: int) -> None:
    with trio.fail_after(STEP):
        stream = await raw_connect(port)
        await stream.send_all(_hello(HOSTILE_SNI))
        try:
            while await stream.receive_some(4096):  # the alert, then EOF
                pass
        except trio.BrokenResourceError:
            pass
        await stream.aclose()


async def test_a_non_ascii_sni_is_one_protocol_error_and_one_json_line(
    nursery: trio.Nursery, certs: Certs, echo_port: int, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "tlsproxy.toml", certs, backend_port=echo_port)
    async with run_daemon(nursery, tmp_path, "--config", config) as daemon:
        port, admin_port = await daemon.started()
        before = await outcomes(admin_port)
        await _send_hostile_hello(port)
        assert await outcome_delta(admin_port, before) == {"protocol_error": 1.0}
        line = await daemon.wait_for("connection")
    assert line["outcome"] == "protocol_error"
    assert "server name (SNI) is not ASCII" in line["error"]
    assert line["sni"] == "\\xff\x1b[31m"  # shown, escaped by JSON
    for raw in daemon.lines:
        json.loads(raw)  # every line on stderr is JSON
    assert len([e for e in daemon.events if e.get("event") == "connection"]) == 1


def _text_address(daemon: Daemon, event: str) -> int | None:
    for line in daemon.lines:
        if found := re.search(rf"\] {event} +address=(\S+)", line):
            return port_of(found.group(1))
    return None


async def test_text_logs_show_no_control_character_a_client_sent(
    nursery: trio.Nursery, certs: Certs, echo_port: int, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "tlsproxy.toml", certs, backend_port=echo_port,
        more_listeners='\n[log]\nformat = "text"\n',
    )  # fmt: skip
    async with run_daemon(nursery, tmp_path, "--config", config) as daemon:
        await daemon.wait_until(
            lambda: _text_address(daemon, "admin listening") is not None, "admin listening"
        )
        port = _text_address(daemon, "listening")
        admin_port = _text_address(daemon, "admin listening")
        assert port is not None and admin_port is not None
        before = await outcomes(admin_port)
        await _send_hostile_hello(port)
        assert await outcome_delta(admin_port, before) == {"protocol_error": 1.0}
        await daemon.wait_until(
            lambda: any("outcome=protocol_error" in line for line in daemon.lines),
            "the access line",
        )
    output = daemon.output()
    assert "\x1b" not in output
    assert "sni=\\xff\\x1b[31m" in output
