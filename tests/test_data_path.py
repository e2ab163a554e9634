"""Plaintext through the proxy: real clients, integrity, half-close, concurrency,
backend failures and the idle timeout."""

from __future__ import annotations

import hashlib
import os
import socket
from functools import partial

import trio
import trio.testing

from proxy.ends import TLSEnd
from proxy.parking import SCAN_MAX
from tests.helpers import (
    STEP,
    BioClient,
    Certs,
    Running,
    build_config,
    echo_handler,
    free_port,
    http_handler,
    sample,
    scrape,
    start_backend,
    start_server,
    tls_connect,
    until,
)

MIB = 1024 * 1024


async def _http_proxy(nursery: trio.Nursery, certs: Certs) -> Running:
    port = await start_backend(nursery, http_handler)
    return await start_server(nursery, build_config(certs, port))


async def test_python_ssl_client_gets_the_backend_response(
    nursery: trio.Nursery, certs: Certs
) -> None:
    proxy = await _http_proxy(nursery, certs)
    with trio.fail_after(STEP):
        tls = await tls_connect(proxy.port, certs.client_context())
        await tls.send_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        response = b""
        while chunk := await tls.receive_some(65536):
            response += chunk
        await tls.aclose()
    assert response.startswith(b"HTTP/1.1 200 OK")
    assert response.endswith(b"hello from the backend\n")


async def test_openssl_s_client_gets_the_backend_response(
    nursery: trio.Nursery, certs: Certs
) -> None:
    proxy = await _http_proxy(nursery, certs)
    with trio.fail_after(STEP):
        result = await trio.run_process(
            [
                "openssl",
                "s_client",
                "-quiet",
                "-verify_return_error",
                "-CAfile",
                str(certs.ca_file),
                "-servername",
                "localhost",
                "-connect",
                f"127.0.0.1:{proxy.port}",
            ],
            stdin=b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert b"hello from the backend" in result.stdout, result.stderr


async def test_curl_gets_the_backend_response(nursery: trio.Nursery, certs: Certs) -> None:
    proxy = await _http_proxy(nursery, certs)
    with trio.fail_after(STEP):
        result = await trio.run_process(
            [
                "curl",
                "--silent",
                "--show-error",
                "--max-time",
                "15",
                "--cacert",
                str(certs.ca_file),
                "--resolve",
                f"localhost:{proxy.port}:127.0.0.1",
                f"https://localhost:{proxy.port}/",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello from the backend\n"


async def test_20_mib_each_way_arrive_intact(proxy: Running, certs: Certs) -> None:
    payload = os.urandom(20 * MIB)
    received = hashlib.sha256()
    count = 0
    with trio.fail_after(STEP * 3):
        client = await BioClient.connect(proxy.port, certs.client_context())

        async def send() -> None:
            view = memoryview(payload)
            for start in range(0, len(payload), MIB):
                await client.send_all(bytes(view[start : start + MIB]))
            await client.close_notify()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while chunk := await client.recv():
                received.update(chunk)
                count += len(chunk)
        await client.stream.aclose()
    assert count == len(payload)
    assert received.hexdigest() == hashlib.sha256(payload).hexdigest()
    _, text = await scrape(proxy.admin_port)
    assert sample(text, "tlsproxy_bytes_total", direction="to_backend") >= len(payload)
    assert sample(text, "tlsproxy_bytes_total", direction="to_client") >= len(payload)


async def _count_then_answer(stream: trio.SocketStream) -> None:
    """Backend that answers only after the client half-closed: needs the FIN."""
    total = 0
    async for data in stream:
        total += len(data)
    await stream.send_all(f"got {total} bytes".encode())
    await stream.aclose()


async def _banner_then_echo(stream: trio.SocketStream) -> None:
    """A server-speaks-first backend (SMTP, MySQL, SSH): a banner on connect."""
    await stream.send_all(b"220 ready\r\n")
    await echo_handler(stream)


async def test_backend_that_speaks_first_reaches_the_client_before_it_sends(
    nursery: trio.Nursery, certs: Certs
) -> None:
    """The splice waits for the backend's first bytes rather than reading at
    once; a banner sent before the client says anything must still arrive."""
    port = await start_backend(nursery, _banner_then_echo)
    proxy = await start_server(nursery, build_config(certs, port))
    with trio.fail_after(STEP):
        tls = await tls_connect(proxy.port, certs.client_context())
        assert await tls.receive_some(100) == b"220 ready\r\n"
        await tls.send_all(b"EHLO\r\n")
        assert await tls.receive_some(100) == b"EHLO\r\n"
        await tls.aclose()


async def test_client_close_notify_reaches_backend_as_fin_and_reply_still_arrives(
    nursery: trio.Nursery, certs: Certs
) -> None:
    port = await start_backend(nursery, _count_then_answer)
    proxy = await start_server(nursery, build_config(certs, port))
    with trio.fail_after(STEP):
        client = await BioClient.connect(proxy.port, certs.client_context())
        await client.send_all(b"x" * 100_000)
        await client.close_notify()
        assert await client.recv_all() == b"got 100000 bytes"
        await client.stream.aclose()


async def test_client_bare_fin_reaches_backend_as_fin_and_reply_still_arrives(
    nursery: trio.Nursery, certs: Certs
) -> None:
    """A client that half-closes with a bare FIN (no close_notify) still gets
    the answer: OpenSSL must not make the EOF a fatal error."""
    port = await start_backend(nursery, _count_then_answer)
    proxy = await start_server(nursery, build_config(certs, port))
    with trio.fail_after(STEP):
        client = await BioClient.connect(proxy.port, certs.client_context())
        async with client.stream:
            await client.send_all(b"x" * 100_000)
            await client.stream.send_eof()
            assert await client.recv_all() == b"got 100000 bytes"
    (event,) = await proxy.access_log()
    assert event["close_reason"] == "client_closed"
    assert event["bytes_to_client"] == len(b"got 100000 bytes")


async def test_backend_fin_reaches_client_as_close_notify_while_client_keeps_sending(
    nursery: trio.Nursery, certs: Certs
) -> None:
    received: list[int] = []
    done = trio.Event()

    async def answer_then_fin_then_read(stream: trio.SocketStream) -> None:
        await stream.send_all(b"ready")
        await stream.send_eof()  # the backend half-closes first...
        total = 0
        async for data in stream:  # ...and still reads what the client sends
            total += len(data)
        received.append(total)
        done.set()
        await stream.aclose()

    port = await start_backend(nursery, answer_then_fin_then_read)
    proxy = await start_server(nursery, build_config(certs, port))
    with trio.fail_after(STEP):
        client = await BioClient.connect(proxy.port, certs.client_context())
        assert await client.recv_all() == b"ready"  # then the proxy's close_notify
        await client.send_all(b"y" * 300_000)  # the client's half is still open
        await client.close_notify()
        await done.wait()
        await client.stream.aclose()
    assert received == [300_000]


async def test_backend_fin_while_client_data_is_still_undecrypted_loses_nothing(
    nursery: trio.Nursery, certs: Certs
) -> None:
    """The backend half-closes while the proxy holds whole client records it
    has not decrypted yet (it is stuck writing to a backend that does not
    read): close_notify must wait until they are passed on, or OpenSSL's
    shutdown would read and reject them.

    The state is made, not waited for: the backend reads nothing until every
    task is blocked, the proxy among them with client records fed but not
    decrypted (the upload is larger than the socket buffers on the way); only
    then does it send its FIN, and the proxy is seen deferring its
    close_notify (`close_notify_wanted`) until the backend reads again."""
    upload = os.urandom(32 * MIB)
    received = hashlib.sha256()
    count = 0
    fin_now, read_now, done = trio.Event(), trio.Event(), trio.Event()

    async def fin_when_told_then_read(stream: trio.SocketStream) -> None:
        nonlocal count
        await fin_now.wait()
        await stream.send_all(b"bye")
        await stream.send_eof()
        await read_now.wait()
        async for data in stream:
            received.update(data)
            count += len(data)
        done.set()
        await stream.aclose()

    port = await start_backend(nursery, fin_when_told_then_read)
    proxy = await start_server(nursery, build_config(certs, port))
    with trio.fail_after(STEP):
        client = await BioClient.connect(proxy.port, certs.client_context())
        async with trio.open_nursery() as uploading:
            # many whole records per proxy read
            uploading.start_soon(partial(client.send_all, upload, record=1024))
            await trio.testing.wait_all_tasks_blocked()
            (splice,) = proxy.server.connections.idle._splices
            assert isinstance(splice.client, TLSEnd)
            assert not splice.client.conn.drained(), "the proxy holds no undecrypted record"
            fin_now.set()
            await trio.testing.wait_all_tasks_blocked()
            assert splice.client.close_notify_wanted, "close_notify was not deferred"
            read_now.set()
        assert await client.recv_all() == b"bye"  # ends on close_notify, not a bare FIN
        assert not splice.client.close_notify_wanted  # the deferred close_notify was sent
        await client.close_notify()
        await done.wait()
        await client.stream.aclose()
    assert count == len(upload)
    assert received.digest() == hashlib.sha256(upload).digest()
    (event,) = await proxy.access_log()
    assert event["close_reason"] == "backend_closed"
    assert event["bytes_to_backend"] == len(upload)


async def test_100_concurrent_clients_each_get_their_own_bytes_back(
    proxy: Running, certs: Certs
) -> None:
    context = certs.client_context()
    failures: list[str] = []

    async def one(i: int) -> None:
        message = f"client {i} ".encode() * 1000
        tls = await tls_connect(proxy.port, context)
        await tls.send_all(message)
        echoed = b""
        while len(echoed) < len(message):
            echoed += await tls.receive_some(65536)
        if echoed != message:
            failures.append(f"client {i} got someone else's bytes")
        await tls.aclose()

    with trio.fail_after(STEP * 3):
        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(one, i)
    assert failures == []
    _, text = await scrape(proxy.admin_port)
    assert sample(text, "tlsproxy_handshakes_total", outcome="success") == 100


async def test_dead_backend_is_counted_refused_and_client_gets_close_notify(
    nursery: trio.Nursery, certs: Certs
) -> None:
    proxy = await start_server(nursery, build_config(certs, free_port()))
    with trio.fail_after(STEP):
        client = await BioClient.connect(proxy.port, certs.client_context())
        assert await client.recv() == b""  # a clean close_notify, not a reset
        await client.stream.aclose()
    _, text = await scrape(proxy.admin_port)
    assert sample(text, "tlsproxy_backend_connect_failures_total", reason="refused") == 1
    assert sample(text, "tlsproxy_handshakes_total", outcome="success") == 1
    (event,) = await proxy.access_log()
    assert event["close_reason"] == "backend_refused"


async def test_silent_backend_is_counted_timeout_within_connect_timeout(
    nursery: trio.Nursery, certs: Certs
) -> None:
    # A listening socket whose accept queue is full drops new SYNs: a connect
    # to it neither succeeds nor fails, exactly like a black-holed backend.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            proxy = await start_server(nursery, build_config(certs, port, connect_timeout=1.0))
            with trio.fail_after(STEP):
                client = await BioClient.connect(proxy.port, certs.client_context())
                start = trio.current_time()
                assert await client.recv() == b""
                elapsed = trio.current_time() - start
                await client.stream.aclose()
        finally:
            for filler in fillers:
                filler.close()
    assert 0.5 < elapsed < STEP
    _, text = await scrape(proxy.admin_port)
    assert sample(text, "tlsproxy_backend_connect_failures_total", reason="timeout") == 1


# The idle test's timeout, and the margin past it plus the scan period
# (IdleWatch scans every quarter of the shortest timeout, and stamps a
# connection active at the first scan after its bytes moved) allowed for a
# loaded machine before a close counts as late.
IDLE = 1.0
IDLE_MARGIN = 1.5
# Echoes before going idle, one per PING_EVERY seconds, for longer than the
# watch's first scan (it starts on a SCAN_MAX sleep): any close before the
# timeout then comes within a scan period of going idle, far below it.
PING_EVERY = 0.1
PINGS = int((SCAN_MAX + 0.2) / PING_EVERY)


async def test_idle_connection_is_closed_after_idle_timeout(
    nursery: trio.Nursery, certs: Certs, echo_port: int
) -> None:
    """Closed once idle for `idle_timeout`: not before (an immediate close
    fails), and not much after; traffic meanwhile keeps it open."""
    proxy = await start_server(nursery, build_config(certs, echo_port, idle_timeout=IDLE))
    with trio.fail_after(STEP):
        client = await BioClient.connect(proxy.port, certs.client_context())
        for _ in range(PINGS):
            await trio.sleep(PING_EVERY)
            await client.send_all(b"hi")
            assert await client.recv() == b"hi"
        idle_since = trio.current_time()  # a little after the proxy's last activity
        assert await client.recv() == b""  # close_notify once idle for 1 s
        idle_for = trio.current_time() - idle_since
        await client.stream.aclose()
    # Lower bound: the proxy's last activity precedes idle_since by the echo's
    # way back to us, a few milliseconds.
    assert IDLE - 0.1 <= idle_for <= IDLE + 2 * IDLE / 4 + IDLE_MARGIN, idle_for
    (event,) = await proxy.access_log()
    assert event["close_reason"] == "idle_timeout"
    assert event["bytes_to_backend"] == event["bytes_to_client"] == 2 * PINGS


async def test_access_log_line_has_every_field(proxy: Running, certs: Certs) -> None:
    with trio.fail_after(STEP):
        tls = await tls_connect(proxy.port, certs.client_context())
        await tls.send_all(b"abc")
        assert await tls.receive_some(10) == b"abc"
        await tls.aclose()
    (event,) = await proxy.access_log()
    for field in (
        "timestamp",
        "listener",
        "client",
        "sni",
        "alpn",
        "tls_version",
        "cipher",
        "resumed",
        "outcome",
        "handshake_ms",
        "wants_read",
        "wants_write",
        "backend",
        "bytes_to_backend",
        "bytes_to_client",
        "duration_ms",
        "close_reason",
    ):
        assert field in event, field
    assert event["sni"] == "localhost"
    assert event["tls_version"] == "TLSv1.3"
    assert event["outcome"] == "success"


async def test_the_bytes_of_an_open_connection_are_counted_while_it_is_open(
    nursery: trio.Nursery, certs: Certs
) -> None:
    """tlsproxy_bytes_total is published at each idle scan, not only when a
    connection ends: a long stream shows its bytes while it lasts."""
    port = await start_backend(nursery, echo_handler)
    proxy = await start_server(nursery, build_config(certs, port))
    payload = b"x" * 5000
    with trio.fail_after(STEP):
        tls = await tls_connect(proxy.port, certs.client_context())
        await tls.send_all(payload)
        received = b""
        while len(received) < len(payload):
            received += await tls.receive_some()

        async def counted() -> bool:
            _, text = await scrape(proxy.admin_port)
            return [
                sample(text, "tlsproxy_bytes_total", listener="web", direction=direction)
                for direction in ("to_backend", "to_client")
            ] == [len(payload), len(payload)]

        await until(counted)
        assert proxy.log_events("connection") == [], "the connection is still open"
        await tls.aclose()
