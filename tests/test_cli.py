"""The real daemon as a user runs it: `python -m proxy` in a subprocess, driven
over real sockets by real clients (Python ssl, curl), observed through its
exit codes, stdout/stderr and JSON log lines. Every wait has a deadline and
waits for an event (a log line, a status code, an exit), never a guessed sleep.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import signal
import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from cryptography import x509

import proxy
from tests.daemon import (
    PYTHON_M_PROXY,
    Daemon,
    GatedStream,
    config_text,
    echo_through,
    env_for,
    listener_table,
    poll_status,
    run_daemon,
    transfer_across_sigterm,
    write_config,
)
from tests.helpers import (
    STEP,
    BioClient,
    Certs,
    echo_handler,
    http_handler,
    scrape,
    start_backend,
    tls_connect,
    until,
)

CONSOLE_SCRIPT = Path(sys.executable).parent / "tlsproxy"

# The drain test's response: big enough to be many TLS records and socket
# buffers, sent in chunks so it is still in flight when SIGTERM arrives.
PAYLOAD_SIZE = 10 * 1024 * 1024


# ---------------------------------------------------------------- helpers


class Completed:
    """A finished CLI invocation, decoded."""

    def __init__(self, result: subprocess.CompletedProcess[bytes]) -> None:
        self.returncode = result.returncode
        self.stdout = result.stdout.decode(errors="replace")
        self.stderr = result.stderr.decode(errors="replace")

    def __repr__(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"


async def _cli(
    *args: str | Path, cwd: Path, command: tuple[str, ...] = PYTHON_M_PROXY
) -> Completed:
    """Run a command that is expected to exit by itself."""
    with trio.fail_after(STEP):
        result = await trio.run_process(
            [*command, *map(str, args)],
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=cwd,
            env=env_for(cwd / "state"),
        )
    return Completed(result)


async def _http_get(port: int, context: ssl.SSLContext) -> tuple[bytes, bytes]:
    """GET / over TLS; returns (the server's certificate in DER, the response)."""
    with trio.fail_after(STEP):
        tls = await tls_connect(port, context)
        try:
            peer = tls.getpeercert(binary_form=True)
            assert peer is not None
            await tls.send_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            response = b""
            while chunk := await tls.receive_some(65536):
                response += chunk
        finally:
            await tls.aclose()
    return peer, response


async def _stalled_backend(stream: trio.SocketStream) -> None:
    """Sends a first line, then never another byte and never closes."""
    await stream.send_all(b"first bytes\n")
    await trio.sleep_forever()


@asynccontextmanager
async def _daemon_with_a_stuck_connection(
    nursery: trio.Nursery, tmp_path: Path, certs: Certs, drain_timeout: float
) -> AsyncIterator[tuple[Daemon, BioClient]]:
    """A daemon serving one client whose backend sent a first line and then
    stalls: a connection a drain has to wait for or cut."""
    backend_port = await start_backend(nursery, _stalled_backend)
    config = write_config(
        tmp_path / "proxy.toml", certs, backend_port=backend_port, drain_timeout=drain_timeout
    )
    async with run_daemon(nursery, tmp_path, "--config", config) as daemon:
        port, _ = await daemon.started()
        with trio.fail_after(STEP):
            client = await BioClient.connect(port, certs.client_context())
        try:
            received = b""
            with trio.fail_after(STEP):
                while not received.endswith(b"\n"):
                    chunk = await client.recv()
                    assert chunk, "closed before the backend's first bytes arrived"
                    received += chunk
            assert received == b"first bytes\n"
            yield daemon, client
        finally:
            await client.stream.aclose()


# ---------------------------------------------------------------- --version


@pytest.mark.parametrize(
    "command", [PYTHON_M_PROXY, (str(CONSOLE_SCRIPT),)], ids=["python-m-proxy", "tlsproxy"]
)
async def test_version_flag_prints_program_and_package_version_and_exits_0(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    result = await _cli("--version", cwd=tmp_path, command=command)
    assert result.returncode == 0, result
    assert re.fullmatch(r"tlsproxy \d+\.\d+\.\d+\S*\n", result.stdout), result
    assert result.stdout == f"tlsproxy {proxy.__version__}\n"
    # the code's version is the one the installed distribution declares
    assert proxy.__version__ == importlib.metadata.version("tlsproxy")


# ---------------------------------------------------------------- check-config


async def test_check_config_accepts_a_valid_file_with_paths_relative_to_it(
    tmp_path: Path, certs: Certs
) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "tls.crt").write_bytes(certs.cert.read_bytes())
    (conf_dir / "tls.key").write_bytes(certs.key.read_bytes())
    config = conf_dir / "proxy.toml"
    config.write_text(config_text("tls.crt", "tls.key"), encoding="utf-8")

    # run from elsewhere: relative paths must resolve against the config's directory
    result = await _cli("check-config", config, cwd=tmp_path)

    assert result.returncode == 0, result
    assert "ok" in result.stdout, result
    assert "error" not in result.stderr, result
    assert "Traceback" not in result.stderr, result


async def test_check_config_prints_every_error_with_its_toml_path_and_exits_1(
    tmp_path: Path, certs: Certs
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        config_text(
            certs.cert,
            tmp_path / "missing.key",
            listen="127.0.0.1:99999",
            listener_lines='colour = "blue"',
        ),
        encoding="utf-8",
    )

    result = await _cli("check-config", config, cwd=tmp_path)

    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    expected = {
        "listeners[0].colour": "unknown key 'colour'",
        "listeners[0].listen": "out of range",
        "listeners[0].tls.certificates[0].key": "file not found",
    }
    for path, message in expected.items():
        assert any(line.startswith(f"error: {path}: ") and message in line for line in errors), (
            f"no error for {path} ({message!r}):\n{result}"
        )
    assert len(errors) == len(expected), result
    assert f"{len(expected)} error(s)" in result.stderr, result
    assert result.stdout == "", result


async def test_check_config_rejects_two_listeners_on_one_port_naming_both(
    tmp_path: Path, certs: Certs
) -> None:
    config = tmp_path / "overlap.toml"
    second = listener_table("api", "0.0.0.0:18443", 1, certs.cert, certs.key)
    config.write_text(
        config_text(certs.cert, certs.key, listen="127.0.0.1:18443", more_listeners=second),
        encoding="utf-8",
    )

    result = await _cli("check-config", config, cwd=tmp_path)

    assert result.returncode == 1, result
    assert result.stderr.startswith(
        "error: listeners[1].listen: 0.0.0.0:18443 overlaps listeners[0].listen (127.0.0.1:18443): "
    ), result
    assert "1 error(s)" in result.stderr, result


EXAMPLES = sorted((Path(__file__).parent.parent / "config").glob("*.toml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
async def test_check_config_no_files_accepts_every_example_on_a_clean_tree(
    tmp_path: Path, example: Path
) -> None:
    config = tmp_path / example.name  # a copy, without any of the files it names
    await trio.Path(config).write_bytes(await trio.Path(example).read_bytes())

    result = await _cli("check-config", "--no-files", config, cwd=tmp_path)

    assert result.returncode == 0, result
    assert result.stderr == "", result
    assert result.stdout.startswith(f"{config}: ok ("), result
    assert "files not checked (--no-files)" in result.stdout, result


async def test_check_config_without_no_files_still_reports_a_missing_key(
    tmp_path: Path, certs: Certs
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(config_text(certs.cert, tmp_path / "missing.key"), encoding="utf-8")

    checked = await _cli("check-config", config, cwd=tmp_path)
    unchecked = await _cli("check-config", "--no-files", config, cwd=tmp_path)

    assert checked.returncode == 1, checked
    assert "error: listeners[0].tls.certificates[0].key: file not found" in checked.stderr
    assert unchecked.returncode == 0, unchecked


async def test_check_config_reports_toml_syntax_error_with_line_and_exits_1(
    tmp_path: Path,
) -> None:
    config = tmp_path / "broken.toml"
    config.write_text('[admin]\nlisten = "127.0.0.1:9090"\n[[listeners]\nname = "web"\n')

    result = await _cli("check-config", config, cwd=tmp_path)

    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result
    assert "invalid TOML" in result.stderr, result
    assert re.search(r"line 3\b", result.stderr), result
    assert str(config.name) in result.stderr, result


async def test_check_config_on_a_missing_file_says_not_found_and_exits_1(
    tmp_path: Path,
) -> None:
    result = await _cli("check-config", tmp_path / "nope.toml", cwd=tmp_path)

    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result
    assert "nope.toml" in result.stderr, result
    assert "not found" in result.stderr, result


async def test_check_config_accepts_several_workers_and_exits_0(
    tmp_path: Path, certs: Certs
) -> None:
    config = tmp_path / "workers.toml"
    text = config_text(certs.cert, certs.key).replace("[process]\n", "[process]\nworkers = 2\n")
    config.write_text(text, encoding="utf-8")

    result = await _cli("check-config", config, cwd=tmp_path)

    assert result.returncode == 0, result
    assert "Traceback" not in result.stderr, result
    assert "error" not in result.stderr, result
    assert f"{config}: ok (1 listener(s))" in result.stdout, result


# ---------------------------------------------------------------- run: embedded default


async def test_embedded_default_serves_curl_and_reuses_its_certificate_across_restarts(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    backend_port = await start_backend(nursery, http_handler)
    state = tmp_path / "state"  # what env_for() points TLSPROXY_STATE_DIR at
    cert = state / "cert.pem"
    args = ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
    args += ["--backend", f"127.0.0.1:{backend_port}"]

    async with run_daemon(nursery, tmp_path, *args) as daemon:
        hint = await daemon.wait_for("running the embedded default config")
        port, _ = await daemon.started()
        assert hint["certificate"] == str(cert)
        assert hint["try_it"] == f"curl --cacert {cert} https://localhost:{port}/"
        assert stat.S_IMODE((state / "key.pem").stat().st_mode) == 0o600

        with trio.fail_after(STEP):
            curl = await trio.run_process(
                [
                    *("curl", "--silent", "--show-error", "--fail", "--max-time", str(STEP)),
                    *("--cacert", str(cert), "--resolve", f"localhost:{port}:127.0.0.1"),
                    f"https://localhost:{port}/",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert curl.returncode == 0, curl.stderr.decode()
        assert curl.stdout == b"hello from the backend\n"

        daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0, daemon.output()
    first_pem = cert.read_bytes()

    async with run_daemon(nursery, tmp_path, *args) as daemon:
        port, _ = await daemon.started()
        assert cert.read_bytes() == first_pem, "the certificate was regenerated on restart"
        peer, response = await _http_get(port, ssl.create_default_context(cafile=cert))
        served = x509.load_der_x509_certificate(peer)
        assert served.serial_number == x509.load_pem_x509_certificate(first_pem).serial_number
        assert peer == ssl.PEM_cert_to_DER_cert(first_pem.decode())
        assert response.endswith(b"\r\n\r\nhello from the backend\n")
        daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0, daemon.output()


# ---------------------------------------------------------------- run: config and flags


async def test_run_with_config_file_proxies_tls_to_the_backend(
    tmp_path: Path, certs: Certs, nursery: trio.Nursery
) -> None:
    echo_port = await start_backend(nursery, echo_handler)
    config = write_config(tmp_path / "proxy.toml", certs, backend_port=echo_port)

    async with run_daemon(nursery, tmp_path, "--config", config) as daemon:
        port, admin_port = await daemon.started()
        assert (await daemon.wait_for("listening"))["listener"] == "web"
        await echo_through(port, certs.client_context())
        assert await scrape(admin_port, "/readyz") == (200, "ready\n")
        line = await daemon.wait_for("connection")
        assert line["outcome"] == "success"
        assert line["backend"] == f"127.0.0.1:{echo_port}"
        assert (
            line["bytes_to_backend"] == line["bytes_to_client"] == len(b"hello through the daemon")
        )
        daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0, daemon.output()
    assert not (tmp_path / "state").exists(), "a config file must not need the default cert"


async def test_run_with_cert_and_key_flags_and_no_config_proxies_tls(
    tmp_path: Path, certs: Certs, nursery: trio.Nursery
) -> None:
    echo_port = await start_backend(nursery, echo_handler)
    args = ("--cert", certs.cert, "--key", certs.key, "--backend", f"127.0.0.1:{echo_port}")

    async with run_daemon(
        nursery, tmp_path, *args, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"
    ) as daemon:
        port, _ = await daemon.started()
        await echo_through(port, certs.client_context())
        daemon.signal(signal.SIGINT)  # Ctrl-C stops it as cleanly as SIGTERM
        assert await daemon.exit_code() == 0, daemon.output()
    assert not (tmp_path / "state").exists(), "--cert/--key must not generate a certificate"


# ---------------------------------------------------------------- run: drain


async def test_sigterm_drains_in_flight_transfer_while_refusing_new_clients(
    tmp_path: Path, certs: Certs, nursery: trio.Nursery
) -> None:
    backend = GatedStream(os.urandom(PAYLOAD_SIZE))
    backend_port = await start_backend(nursery, backend.handler)
    config = write_config(
        tmp_path / "proxy.toml", certs, backend_port=backend_port, drain_timeout=20
    )

    async with run_daemon(nursery, tmp_path, "--config", config) as daemon:
        ports = await daemon.started()
        assert await scrape(ports[1], "/readyz") == (200, "ready\n")

        async def one_connection_draining() -> None:
            draining = await daemon.wait_for("draining")
            assert draining["connections"] == 1

        received = await transfer_across_sigterm(
            daemon, ports, certs.client_context(), backend, one_connection_draining
        )

        assert len(received) == PAYLOAD_SIZE
        assert hashlib.sha256(received).digest() == hashlib.sha256(backend.payload).digest()
        assert await daemon.exit_code() == 0, daemon.output()
        line = daemon.find("connection")
        assert line is not None, daemon.output()
        assert line["close_reason"] == "backend_closed"
        assert line["bytes_to_client"] == PAYLOAD_SIZE
        assert daemon.find("stopped") is not None


async def test_drain_timeout_cuts_a_stuck_connection_with_close_notify_and_exits_0(
    tmp_path: Path, certs: Certs, nursery: trio.Nursery
) -> None:
    drain_timeout = 1.0
    stuck = _daemon_with_a_stuck_connection(nursery, tmp_path, certs, drain_timeout)
    async with stuck as (daemon, client):
        start = trio.current_time()
        daemon.signal(signal.SIGTERM)
        with daemon.deadline(drain_timeout + 8, "the cut at drain_timeout"):
            # b"" only for a close_notify; a bare TCP EOF raises SSLEOFError
            assert await client.recv() == b""
        assert await daemon.exit_code(within=drain_timeout + 8) == 0, daemon.output()
        elapsed = trio.current_time() - start

    assert elapsed >= drain_timeout * 0.95, "exited before drain_timeout"
    assert daemon.find("drain_timeout expired; closing the remaining connections") is not None
    line = daemon.find("connection")
    assert line is not None, daemon.output()
    assert line["close_reason"] == "drain", line
    assert line["bytes_to_client"] == len(b"first bytes\n")


async def test_second_sigterm_during_drain_exits_at_once(
    tmp_path: Path, certs: Certs, nursery: trio.Nursery
) -> None:
    drain_timeout = 120.0  # far beyond the test's deadline: only the 2nd signal can end it
    stuck = _daemon_with_a_stuck_connection(nursery, tmp_path, certs, drain_timeout)
    async with stuck as (daemon, _):
        daemon.signal(signal.SIGTERM)
        # wait until the first signal is consumed, or trio would merge the two
        draining = await daemon.wait_for("draining")
        assert draining["connections"] == 1
        assert daemon.process.returncode is None

        daemon.signal(signal.SIGTERM)
        assert await daemon.exit_code() == 0, daemon.output()
    assert daemon.find("second stop signal: exiting now without waiting for connections")


# ---------------------------------------------------------------- run: startup failures


async def test_run_with_bad_config_prints_errors_and_exits_1_without_listening(
    tmp_path: Path, certs: Certs
) -> None:
    config = write_config(
        tmp_path / "bad.toml", certs, listener_lines='handshake_timeout = -1\nproxy_protocol = "v3"'
    )

    result = await _cli("run", "--config", config, cwd=tmp_path)

    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result
    assert "error: listeners[0].handshake_timeout: must be > 0" in result.stderr, result
    assert "error: listeners[0].proxy_protocol: must be 'off', 'v1' or 'v2'" in result.stderr
    assert '"listening"' not in result.stderr, result


@pytest.mark.parametrize("busy_flag", ["--listen", "--admin"])
async def test_run_on_a_port_in_use_exits_2_naming_the_address(
    tmp_path: Path, certs: Certs, busy_flag: str
) -> None:
    config = write_config(tmp_path / "proxy.toml", certs)
    busy = trio.socket.socket()
    with busy:
        await busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"

        result = await _cli("run", "--config", config, busy_flag, address, cwd=tmp_path)

    assert "Traceback" not in result.stderr, result
    assert result.returncode == 2, result
    errors = [line for line in result.stderr.splitlines() if '"level": "error"' in line]
    assert errors, result
    assert any(address in line for line in errors), f"the error does not name {address}:\n{result}"
    assert any("already in use" in line for line in errors), result


# ---------------------------------------------------------------- run: drain_delay

# Long enough for a /readyz poll and a handshake on a loaded machine.
DRAIN_DELAY = 3.0
# How late the listeners may close after drain_delay: a SIGTERM's delivery,
# and with workers every worker's.
DRAIN_DELAY_SLACK = 5.0


async def _refused(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return True
    await stream.aclose()
    return False


@pytest.mark.parametrize("workers", [1, 2])
async def test_drain_delay_keeps_serving_new_clients_while_readyz_is_503(
    tmp_path: Path, certs: Certs, nursery: trio.Nursery, workers: int
) -> None:
    echo_port = await start_backend(nursery, echo_handler)
    config = write_config(
        tmp_path / "proxy.toml",
        certs,
        backend_port=echo_port,
        process_lines=f"drain_delay = {DRAIN_DELAY}\nworkers = {workers}",
    )
    async with run_daemon(nursery, tmp_path, "--config", config) as daemon:
        if workers > 1:
            await daemon.wait_for("workers ready")
        port, admin_port = await daemon.started()
        assert (await scrape(admin_port, "/readyz"))[0] == 200
        start = trio.current_time()
        daemon.signal(signal.SIGTERM)
        await poll_status(admin_port, "/readyz", 503)
        for _ in range(2 * workers):  # with workers, likely reaching each of them
            await echo_through(port, certs.client_context())
        served_by = trio.current_time()
        await until(partial(_refused, port))
        refused_after = trio.current_time() - start
        assert await daemon.exit_code() == 0, daemon.output()
    assert served_by - start < DRAIN_DELAY, "the clients were served after drain_delay"
    assert DRAIN_DELAY * 0.95 <= refused_after <= DRAIN_DELAY + DRAIN_DELAY_SLACK
    # the connections echo_through made, not the probes (which sent no ClientHello)
    served = [e for e in daemon.events if e.get("event") == "connection" and "ja4" in e]
    assert [e["outcome"] for e in served] == ["success"] * (2 * workers)
