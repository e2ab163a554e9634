"""Instructions per TLS connection under callgrind: tlsproxy against HAProxy.

    .venv/bin/python -m benchmarks.instructions [--targets tlsproxy,haproxy[,hitch]]
        [--cert ecdsa|rsa] [--direction ingress|egress] [--keep-alive R]
        [--mtls [--allow N]] [--dual] [-n N] [--tree DIR] [--out FILE]
        [--functions K] [--profiles DIR]
    (make instructions; make instructions ARGS="--cert rsa";
     make instructions ARGS="--keep-alive 100"; ARGS="--direction egress")

Why: the machine is shared, so wall-clock and CPU-time figures move a lot
between runs (the same code measured 655 to 1 165 full handshakes per
CPU-second). Valgrind's callgrind counts the instructions a process executes
in user space, which repeat within about 1 % from run to run.

What it does, per target (`--targets`, default tlsproxy,haproxy; hitch is
optional): a self-signed ECDSA P-256 (default) or RSA-2048 (`--cert rsa`)
certificate (with `--dual`, tlsproxy also gets one of the other key type for
the same name, served side by side; the clients accept both, so the `--cert`
one is what they get) is made with `cryptography` in a temporary directory, removed at
the end. nginx (one worker, access log off, a 100-byte file) is the backend,
pinned to CPU 1 with taskset. The target runs on CPU 0 as `taskset -c 0
valgrind --tool=callgrind ...` with the configuration of
../shared/bench/run's target_command: session resumption off everywhere
(tlsproxy `session_tickets = false`, access log on as by default; HAProxy
`nbthread 1`, `tune.ssl.cachesize 0`, `no-tls-tickets`; hitch one worker; the
peers also get an OpenSSL config with `NumTickets = 0`: without it HAProxy
still sends a TLS 1.3 ticket per connection, about 110 k instructions more,
since `no-tls-tickets` only makes the ticket stateful). tlsproxy is this
working tree (or --tree DIR): `python -m proxy run` with the tree as cwd and
PYTHONPATH, and PYTHONHASHSEED=0. Once the port answers (Python under
valgrind takes 10-20 s to start) one warm-up request is made, the counters
are reset, N connections (default 400) are made from 8 client threads (this
process, on CPU 1), each a full TLS 1.3 handshake (stdlib ssl, no session
offered; every connection is checked not to have resumed), `GET /small.txt`
with `Connection: close`, read to EOF and checked for a 200 and the body
(with `--mtls`, the client presents an ECDSA certificate whose URI SAN is a
SPIFFE ID, issued by a CA made alongside, and the target requires and
verifies it: tlsproxy `client_auth = "require"`, HAProxy `verify required`;
hitch has no client authentication and is skipped; `--allow N` gives
tlsproxy an `[listeners.tls.allow]` table of N `uri` entries, N - 1 that the
client does not match and its own SPIFFE ID last, so every connection is
admitted by the last alternative);
then the counters are dumped, the target and nginx are stopped by PID.

`--keep-alive R` (1..1000, with connections x R at most 20 000): each
connection makes one full handshake, then R sequential `GET /small.txt` on
it (HTTP/1.1 keep-alive, the last one with `Connection: close`, then read to
EOF), each response checked for a 200 and the body. The default -n is then
80 (fewer where 80 x R would pass the bound), and the output gives
instructions per request, total / (connections x R), beside those per
connection. The suggested R is 100, as in the Makefile's example: it keeps
the handshake's share of the per-request figure to about a fifth for
tlsproxy (3.8 M over 100 requests against roughly 150 k per request) while
8 000 requests take well under a minute under valgrind; subtracting the
full-handshake figure of a plain run, (per connection with R - per
connection without) / (R - 1), gives the cost of one more request alone.

`--direction egress`: the other half of a sidecar, as ../shared/bench/run
`--direction egress` sets it up. The clients speak plain HTTP to the
target, which originates TLS to nginx, now serving TLS with the same
certificate and refusing resumption (`ssl_session_tickets off`,
`ssl_session_cache off`, and the peers' OpenSSL config); the targets verify
the chain against that certificate and the name localhost: tlsproxy a
listener with `[listeners.upstream_tls]` (`server_name = "localhost"`, `ca`,
`session_resumption = false`) and no `[listeners.tls]`; HAProxy a plain
bind and `server ... ssl verify required ca-file ... verifyhost localhost
sni str(localhost) no-ssl-reuse`; hitch has no client mode and is skipped,
and --mtls, --allow and --dual are refused. nginx logs each request's
connection serial and `$ssl_session_reused`: the run fails if any upstream
session was resumed, and reports how many upstream connections were made
(one per client connection, and one for the warm-up) and their TLS version
and cipher.

`--tree DIR`: the tlsproxy source tree to measure (default: this one), run
as `python -m proxy run` with DIR as cwd and PYTHONPATH, by DIR's own
`.venv/bin/python` when it has one (its dependencies), else by this
interpreter; the output names the tree's commit. This compares two builds
with one version of this tool: e.g. a detached worktree of an older commit
against this one.

The
dump's self costs are summed per shared object (libcrypto, libssl, libc,
libpython, the program itself, other) and divided by N; a target with
several processes (hitch: a master and its children) is the sum of all of
them. valgrind runs with --trace-children=yes (forked children only get a
gdbserver, which callgrind_control talks to, that way) and its FIFOs in the
temporary directory. As root, hitch (which refuses to run its workers as
root) is started, and controlled, as nobody with setpriv: the gdbserver does
not survive hitch's own switch of user.

The counters are reset with a dump (`callgrind_control --dump=baseline`)
rather than `--zero`: with valgrind 3.19 a dump taken after `--zero` carries
a fixed surplus of cost from before the zero (seen as 3.5 M instructions in
HAProxy and 12.6 M in tlsproxy, about 1 % of a 400-connection run; the
file's `totals:` then exceeds its `summary:`), while after a dump the two
agree. The tool checks that its sum of the self costs equals `totals:` and
warns when `summary:` differs by more than 0.1 %.

What it does NOT count: the kernel (system calls, network stack, scheduling:
a large part of a proxy's CPU time), and anything about how fast the
instructions run (cache misses, branch mispredictions, IPC). It is a
repeatable proxy for user-space CPU per connection, to compare builds and to
see where the instructions go, not a replacement for ../shared/bench/run,
which measures throughput and CPU time. Callgrind also serialises threads
(all three targets here are single-threaded).

Needs CPUs 0 and 1, and the Debian packages valgrind, nginx-light, haproxy,
util-linux (taskset, setpriv); hitch if asked for. Every process it starts
is stopped by PID; everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from benchmarks.processes import (
    SESSION_LOG,
    SMALL_BYTES,
    Processes,
    descendants,
    free_port,
    start_nginx,
    wait_port,
)

REPO = Path(__file__).resolve().parent.parent
TREE_PYTHON = Path(".venv/bin/python")  # a tree's own interpreter, when it has one
TARGETS = ("tlsproxy", "haproxy", "hitch")
DEFAULT_TARGETS = "tlsproxy,haproxy"
REFERENCE = "haproxy"  # the ratio's denominator
PACKAGES = {
    "valgrind": "valgrind",
    "callgrind_control": "valgrind",
    "nginx": "nginx-light",
    "taskset": "util-linux",
    "setpriv": "util-linux",
    "haproxy": "haproxy",
    "hitch": "hitch",
}
PROXY_CPU, LOAD_CPU = 0, 1
CLIENT_THREADS = 8
MIN_CONNECTIONS, MAX_CONNECTIONS = CLIENT_THREADS, 5000
MAX_FUNCTIONS = 100
REQUEST = b"GET /small.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
KEEP_ALIVE_REQUEST = b"GET /small.txt HTTP/1.1\r\nHost: localhost\r\n\r\n"
# --keep-alive R: requests per connection, and all requests of a run. The
# bounds keep one target's run within minutes under valgrind (tlsproxy runs
# about 150 k instructions per request, a few million a second there).
MAX_KEEP_ALIVE = 1000
MAX_REQUESTS = 20_000
KEEP_ALIVE_CONNECTIONS = 80  # the default -n with --keep-alive: 10 per client thread
FULL_HANDSHAKE_CONNECTIONS = 400  # the default -n otherwise
DIRECTIONS = ("ingress", "egress")
EGRESS_TARGETS = ("tlsproxy", "haproxy")  # hitch has no TLS client mode
MAX_HEADER_BYTES = 16_384  # a response's header block, before its body

TARGET_START_S = 300  # a target under valgrind must listen within this
SOCKET_TIMEOUT_S = 60  # any one socket operation of a client connection
LOAD_DEADLINE_S = 1800  # all N connections to one target
CONTROL_TIMEOUT_S = 120  # one callgrind_control request (a dump)
STOP_WAIT_S = 60  # after SIGTERM (callgrind writes its final dump), then SIGKILL

GROUPS = ("libcrypto", "libssl", "libc", "libpython", "program", "other")
LIBRARY_GROUPS = (
    ("libcrypto.so", "libcrypto"),
    ("libssl.so", "libssl"),
    ("libc.so", "libc"),
    ("libpython", "libpython"),
)
SUMMARY_TOLERANCE = 0.001  # summary: against totals: in one dump
OTHER_SHOWN = 3  # the largest objects of "other", named in the output
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


# --------------------------------------------------------------- processes --


def log_tail(path: Path, chars: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def on_signal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# ----------------------------------------------------------- configuration --


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path
    pem: Path  # certificate then key, for HAProxy and hitch


def make_certificate(d: Path, kind: str, stem: str = "") -> Certificate:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    paths = Certificate(d / f"{stem}cert.pem", d / f"{stem}key.pem", d / f"{stem}combined.pem")
    paths.cert.write_bytes(cert_pem)
    paths.key.write_bytes(key_pem)
    paths.pem.write_bytes(cert_pem + key_pem)
    for path in (paths.cert, paths.key, paths.pem):
        path.chmod(0o644)  # hitch runs as nobody; the directory is ours
    return paths


def openssl_conf(d: Path) -> Path:
    """The peers' OpenSSL config, as in ../shared/bench/run: no TLS 1.3
    tickets, hence no resumption (hitch has no option of its own)."""
    conf = d / "openssl-bench.cnf"
    conf.write_text(
        "openssl_conf = openssl_init\n"
        "[openssl_init]\nssl_conf = ssl_sect\n"
        "[ssl_sect]\nsystem_default = system_default_sect\n"
        "[system_default_sect]\nMinProtocol = TLSv1.2\nNumTickets = 0\n"
    )
    return conf


# --mtls: the client's identity, and the pattern of the allow table's
# entries it does not match (--allow N: N - 1 of them, then its own).
CLIENT_SPIFFE_ID = "spiffe://bench.example/ns/load/sa/client"
OTHER_PATTERN = "spiffe://bench.example/ns/svc{}/sa/*"
MAX_ALLOW = 10_000


@dataclass(frozen=True)
class ClientPKI:
    """--mtls: the CA that targets trust for clients, and the client's pair."""

    ca: Path
    cert: Path
    key: Path


def make_client_pki(d: Path) -> ClientPKI:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench client CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench client")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(CLIENT_SPIFFE_ID)]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = ClientPKI(d / "client-ca.pem", d / "client.pem", d / "client.key")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for path in (pki.ca, pki.cert, pki.key):
        path.chmod(0o644)
    return pki


def allow_table(entries: int) -> str:
    """tlsproxy's [listeners.tls.allow] of `entries` uri patterns, the
    client's own SPIFFE ID last."""
    uris = [OTHER_PATTERN.format(i) for i in range(entries - 1)] + [CLIENT_SPIFFE_ID]
    return "[listeners.tls.allow]\nuri = [" + ", ".join(f'"{u}"' for u in uris) + "]\n"


@dataclass(frozen=True)
class Setup:
    """What every target shares: the temporary directory, nginx, the certificate."""

    directory: Path
    backend: int  # nginx's port
    cert: Certificate
    peer_env: dict[str, str]  # HAProxy's and hitch's: OPENSSL_CONF without tickets
    procs: Processes
    clients: ClientPKI | None = None  # --mtls
    allow: int = 0  # --allow N: tlsproxy's allow table's entries
    # --dual: tlsproxy also gets a certificate of the other key type for the
    # same names (the clients accept both, so the --cert one is served)
    dual: Certificate | None = None
    egress: bool = False  # --direction egress: plain in, TLS out to nginx
    requests: int = 1  # per connection: 1, or --keep-alive R
    tree: Path = REPO  # --tree: the tlsproxy source tree measured


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]
    cwd: Path | None
    program: Path  # the executable whose own code is the "program" group
    # Run the target, and callgrind_control with it, as another user: vgdb
    # only reaches a process of its own user.
    as_user: tuple[str, ...] = ()


def target_command(name: str, d: Path, port: int, setup: Setup) -> Command:
    backend, cert, peer_env = setup.backend, setup.cert, setup.peer_env
    clients = setup.clients
    if name == "tlsproxy":
        pairs = [cert, *([setup.dual] if setup.dual else [])]
        certificates = ", ".join(f'{{ cert = "{c.cert}", key = "{c.key}" }}' for c in pairs)
        mtls = ""
        if clients is not None:
            mtls = f'client_auth = "require"\nclient_ca = "{clients.ca}"\n'
            mtls += allow_table(setup.allow) if setup.allow else ""
        tls = f"""[listeners.tls]
certificates = [{certificates}]
session_tickets = false
{mtls}"""
        if setup.egress:
            tls = f"""[listeners.upstream_tls]
server_name = "localhost"
ca = "{cert.cert}"
session_resumption = false
"""
        conf = d / "tlsproxy.toml"
        conf.write_text(f"""[admin]
listen = "127.0.0.1:{free_port()}"
[[listeners]]
name = "bench"
listen = "127.0.0.1:{port}"
backend = "127.0.0.1:{backend}"
{tls}""")
        python = tree_python(setup.tree)
        env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(setup.tree)}
        argv = [str(python), "-m", "proxy", "run", "--config", str(conf)]
        # The interpreter's own executable: its code is in libpython here (the
        # python of this venv links it); a static python would show it here.
        return Command(argv, env, setup.tree, python.resolve())
    if name == "haproxy":
        if setup.egress:  # plain in, TLS out
            bind, server = (
                "",
                (
                    f" ssl verify required ca-file {cert.cert} verifyhost localhost "
                    "sni str(localhost) no-ssl-reuse ssl-min-ver TLSv1.2"
                ),
            )
        else:
            verify = "" if clients is None else f" ca-file {clients.ca} verify required"
            bind = f" ssl crt {cert.pem} no-tls-tickets ssl-min-ver TLSv1.2{verify}"
            server = ""
        conf = d / "haproxy.cfg"
        conf.write_text(f"""global
  nbthread 1
  maxconn 4000
  tune.ssl.cachesize 0
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind 127.0.0.1:{port}{bind}
  default_backend be
backend be
  server s1 127.0.0.1:{backend}{server}
""")
        return Command(["haproxy", "-db", "-f", str(conf)], peer_env, None, executable("haproxy"))
    if name == "hitch":
        # hitch refuses to run its workers as root, and valgrind's gdbserver
        # (which callgrind_control talks to) does not survive the switch of
        # user that hitch's `user` option makes: start it as nobody instead.
        as_user = AS_NOBODY if os.geteuid() == 0 else ()
        conf = d / "hitch.conf"
        conf.write_text(f"""frontend = "[127.0.0.1]:{port}"
backend = "[127.0.0.1]:{backend}"
pem-file = "{cert.pem}"
workers = 1
backlog = 4096
daemon = off
log-level = 1
ocsp-dir = "{d}"
tls-protos = TLSv1.2 TLSv1.3
""")
        argv = ["hitch", f"--config={conf}"]
        return Command(argv, peer_env, None, executable("hitch"), as_user)
    raise ValueError(name)


def tree_python(tree: Path) -> Path:
    """The interpreter that runs a tree: its own virtualenv's, else this one."""
    own = tree / TREE_PYTHON
    return own if own.exists() else Path(sys.executable)


def executable(name: str) -> Path:
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found")
    return Path(found).resolve()


# ----------------------------------------------------------------- clients --


def client_context(clients: ClientPKI | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if clients is not None:
        ctx.load_cert_chain(clients.cert, clients.key)
    return ctx


@dataclass(frozen=True)
class Fetch:
    version: str  # ingress: the client's TLS; egress: "" (nginx's log tells)
    cipher: str
    resumed: bool
    ticket: bool  # the server sent a session ticket


def read_response(sock: socket.socket | ssl.SSLSocket, last: bool) -> None:
    """One response to GET /small.txt, checked: the last one read to EOF,
    the others by their Content-Length (nginx sends one for a static file),
    leaving the connection at the next response's first byte."""
    data = bytearray()
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk or len(data) > MAX_HEADER_BYTES:
            raise RuntimeError(f"no complete response header: {bytes(data[:120])!r}")
        data += chunk
    header, _, body = bytes(data).partition(b"\r\n\r\n")
    if last:
        rest = bytearray(body)
        while chunk := sock.recv(65536):
            rest += chunk
        body = bytes(rest)
    else:
        length = re.search(rb"\r\ncontent-length: *(\d+)", header, re.IGNORECASE)
        if length is None:
            raise RuntimeError(f"no Content-Length: {header[:200]!r}")
        want = int(length.group(1))
        rest = bytearray(body)
        while len(rest) < want:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        body = bytes(rest)
    if not (header.startswith(b"HTTP/1.1 200") and body == b"x" * SMALL_BYTES):
        raise RuntimeError(f"unexpected response: {header[:120]!r} + {len(body)} B of body")


def requests_on(sock: socket.socket | ssl.SSLSocket, requests: int) -> None:
    """`requests` sequential GETs, keep-alive but for the last (Connection:
    close), each response read and checked before the next is sent."""
    for i in range(requests):
        last = i == requests - 1
        sock.sendall(REQUEST if last else KEEP_ALIVE_REQUEST)
        read_response(sock, last)


def fetch(port: int, ctx: ssl.SSLContext | None, requests: int = 1) -> Fetch:
    """One connection: a full handshake (no session offered; none with ctx
    None, egress), `requests` GETs of the tiny file, the last read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as raw:
        if ctx is None:
            requests_on(raw, requests)
            return Fetch("", "", resumed=False, ticket=False)
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            version, cipher = tls.version() or "", (tls.cipher() or ("",))[0]
            resumed = bool(tls.session_reused)
            requests_on(tls, requests)
            session = tls.session  # tickets arrive after the handshake
            return Fetch(version, cipher, resumed, session is not None and session.has_ticket)


@dataclass
class Load:
    connections: int = 0
    resumed: int = 0
    tickets: int = 0
    seconds: float = 0.0


def run_load(port: int, n: int, setup: Setup) -> Load:
    """n connections from CLIENT_THREADS threads; stops all of them at the
    first failure or at the deadline."""
    ctx = None if setup.egress else client_context(setup.clients)
    stop = threading.Event()
    deadline = time.monotonic() + LOAD_DEADLINE_S

    def client(count: int) -> Load:
        mine = Load()
        try:
            for _ in range(count):
                if stop.is_set() or time.monotonic() > deadline:
                    break
                result = fetch(port, ctx, setup.requests)
                mine.connections += 1
                mine.resumed += result.resumed
                mine.tickets += result.ticket
        except BaseException:
            stop.set()
            raise
        return mine

    shares = [n // CLIENT_THREADS + (i < n % CLIENT_THREADS) for i in range(CLIENT_THREADS)]
    total = Load()
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=CLIENT_THREADS) as pool:
        futures = [pool.submit(client, share) for share in shares]
        try:
            for future in futures:
                part = future.result()
                total.connections += part.connections
                total.resumed += part.resumed
                total.tickets += part.tickets
        except BaseException:  # an interrupt, too: the clients stop after their connection
            stop.set()
            raise
    total.seconds = time.monotonic() - started
    if total.connections != n:
        raise RuntimeError(
            f"only {total.connections} of {n} connections made in {LOAD_DEADLINE_S} s"
        )
    return total


# --------------------------------------------------------------- callgrind --


@dataclass
class Profile:
    """Self costs (instructions) of one callgrind dump, or of several summed."""

    instructions: int = 0
    totals: int = 0  # the dump's `totals:` line
    summary: int = 0  # the dump's `summary:` line
    objects: Counter[str] = field(default_factory=Counter)
    functions: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, other: Profile) -> None:
        self.instructions += other.instructions
        self.totals += other.totals
        self.summary += other.summary
        self.objects.update(other.objects)
        self.functions.update(other.functions)


# Name compression: "(id) name" defines, "(id)" refers back. Objects, files and
# functions are three separate name spaces.
NAME_SPACES = {
    "ob": "ob",
    "cob": "ob",
    "fl": "fl",
    "fi": "fl",
    "fe": "fl",
    "cfi": "fl",
    "cfl": "fl",
    "fn": "fn",
    "cfn": "fn",
}
COMPRESSED = re.compile(r"\((\d+)\)(?: (.*))?$")


class CallgrindParser:
    """Sums the self cost (event Ir) of one dump per object and per function.
    The cost line right after a `calls=` line is the inclusive cost of that
    call, already counted as self cost where it was spent: it is skipped."""

    def __init__(self) -> None:
        self.profile = Profile()
        self.names: dict[tuple[str, str], str] = {}
        self.positions = 1  # columns before the costs ("positions: line")
        self.event = 0  # index of Ir among the costs
        self.obj = self.function = "???"
        self.after_call = False

    def feed(self, line: str) -> None:
        if not line or line[0] == "#":
            return
        if line[0].isdigit() or line[0] in "+-*":
            self.cost(line)
            return
        key, eq, value = line.partition("=")
        if eq and key in NAME_SPACES:
            self.name(key, value)
        elif eq and key == "calls":
            self.after_call = True
        elif not eq or key not in ("jump", "jcnd"):
            self.header(line)

    def cost(self, line: str) -> None:
        if self.after_call:
            self.after_call = False
            return
        fields = line.split()
        if len(fields) > self.positions + self.event:  # zero costs at the end may be left out
            cost = int(fields[self.positions + self.event])
            self.profile.instructions += cost
            self.profile.objects[self.obj] += cost
            self.profile.functions[(self.obj, self.function)] += cost

    def name(self, key: str, value: str) -> None:
        space = NAME_SPACES[key]
        match = COMPRESSED.match(value)
        if match:
            if match.group(2) is not None:
                self.names[(space, match.group(1))] = match.group(2)
            value = self.names.get((space, match.group(1)), value)
        if key == "ob":
            self.obj = value
        elif key == "fn":
            self.function = value

    def header(self, line: str) -> None:
        key, colon, rest = line.partition(":")
        if not colon:
            return
        if key == "positions":
            self.positions = len(rest.split())
        elif key == "events":
            events = rest.split()
            if "Ir" not in events:
                raise RuntimeError(f"no Ir event in the dump: {events}")
            self.event = events.index("Ir")
        elif key in ("summary", "totals"):
            costs = rest.split()
            setattr(self.profile, key, int(costs[self.event]) if len(costs) > self.event else 0)


def parse_callgrind(lines: Iterable[str]) -> Profile:
    parser = CallgrindParser()
    for line in lines:
        parser.feed(line.rstrip("\n"))
    profile = parser.profile
    if profile.instructions != profile.totals:
        raise RuntimeError(
            f"self costs sum to {profile.instructions}, the dump's totals to {profile.totals}"
        )
    return profile


def control_dump(pid: int, hint: str, vgdb_prefix: Path, as_user: tuple[str, ...]) -> None:
    """Ask callgrind in pid to dump its counters (which also resets them)."""
    out = subprocess.run(
        [*as_user, "callgrind_control", f"--vgdb-prefix={vgdb_prefix}", f"--dump={hint}", str(pid)],
        capture_output=True,
        text=True,
        timeout=CONTROL_TIMEOUT_S,
        check=False,
    )
    if "OK." not in out.stdout:  # callgrind_control exits 0 even when it fails
        raise RuntimeError(f"callgrind_control --dump {pid}: {(out.stdout + out.stderr)[-300:]}")


def dump_file(directory: Path, pid: int, hint: str) -> Path:
    trigger = f"desc: Trigger: dump {hint}\n"
    for path in sorted(directory.glob(f"callgrind.out.{pid}.*")):
        with path.open() as fh:
            if trigger in [fh.readline() for _ in range(40)]:
                return path
    raise RuntimeError(f"no callgrind dump {hint!r} for pid {pid} in {directory}")


def group_of(obj: str, program: Path) -> str:
    base = obj.rsplit("/", 1)[-1]
    for prefix, group in LIBRARY_GROUPS:
        if base.startswith(prefix):
            return group
    return "program" if obj == str(program) else "other"


# ------------------------------------------------------------------ target --


@dataclass
class Measurement:
    target: str
    connections: int
    profile: Profile
    groups: dict[str, int]  # instructions per group, whole run
    load: Load
    warmup: Fetch
    processes: int
    program: Path
    dumps: list[Path]
    requests: int  # per connection
    upstream: Upstream | None  # egress: the sessions nginx saw

    @property
    def per_connection(self) -> float:
        return self.profile.instructions / self.connections

    @property
    def per_request(self) -> float:
        return self.per_connection / self.requests

    def group(self, name: str) -> float:
        return self.groups.get(name, 0) / self.connections


@dataclass(frozen=True)
class Upstream:
    """Egress: nginx's log of one target's measured requests."""

    connections: int  # distinct upstream connections
    requests: int
    resumed: int  # requests on a resumed session
    version: str  # the warm-up's upstream session
    cipher: str


def session_lines(log: Path) -> list[list[str]]:
    try:
        return [line.split() for line in log.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def upstream_sessions(log: Path, before: int, warmed: int, n: int, requests: int) -> Upstream:
    """The lines nginx logged for the warm-up (`before`..`warmed`) and the
    load (after `warmed`), checked: one upstream connection per client
    connection, every request through, no session resumed."""
    lines = session_lines(log)
    warm, measured = lines[before:warmed], lines[warmed:]
    if len(warm) != 1 or len(warm[0]) != 4:
        raise RuntimeError(f"nginx logged {warm!r} for the warm-up request")
    up = Upstream(
        connections=len({fields[0] for fields in measured}),
        requests=len(measured),
        resumed=sum(fields[1] == "r" for fields in measured),
        version=warm[0][2],
        cipher=warm[0][3],
    )
    if up.resumed or up.requests != n * requests or up.connections != n:
        raise RuntimeError(
            f"upstream: {up.connections} connections, {up.requests} requests, "
            f"{up.resumed} resumed; expected {n}, {n * requests} and none"
        )
    return up


def dump_all(
    proc: subprocess.Popen[bytes], family: list[int], hint: str, cmd: Command, cg_dir: Path
) -> None:
    """Dump (and so reset) the counters of every process of the target."""
    if sorted(descendants(proc.pid)) != sorted(family):
        raise RuntimeError("the target's processes changed during the run")
    for pid in family:
        control_dump(pid, hint, cg_dir / "vgdb", cmd.as_user)


def measure(name: str, setup: Setup, n: int) -> Measurement:
    td = setup.directory / name
    td.mkdir()
    cg_dir = td / "callgrind"
    cg_dir.mkdir()
    cg_dir.chmod(0o777)  # hitch runs as nobody
    port = free_port()
    cmd = target_command(name, td, port, setup)
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={cg_dir}/callgrind.out.%p",
        f"--vgdb-prefix={cg_dir}/vgdb",  # its FIFOs go away with the temporary directory
        "--trace-children=yes",  # without it, forked children have no gdbserver
    ]
    argv = ["taskset", "-c", str(PROXY_CPU), *cmd.as_user, *valgrind, *cmd.argv]
    print(f"instructions: {name}: starting under callgrind", file=sys.stderr)
    proc = setup.procs.start(argv, td / "log", cmd.env, cmd.cwd)
    try:
        wait_port(port, proc, TARGET_START_S)
        log = setup.directory / SESSION_LOG
        before = len(session_lines(log))
        warmup = fetch(port, None if setup.egress else client_context(setup.clients))
        warmed = len(session_lines(log))
        family = descendants(proc.pid)
        dump_all(proc, family, "baseline", cmd, cg_dir)
        each = f", {setup.requests} requests each" if setup.requests > 1 else ""
        print(f"instructions: {name}: {n} connections{each}", file=sys.stderr)
        load = run_load(port, n, setup)
        dump_all(proc, family, "measured", cmd, cg_dir)
        upstream = None
        if setup.egress:
            upstream = upstream_sessions(log, before, warmed, n, setup.requests)
        profile = Profile()
        dumps = [dump_file(cg_dir, pid, "measured") for pid in family]
        for path in dumps:
            with path.open() as fh:
                profile.add(parse_callgrind(fh))
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{name}: {exc}\n{log_tail(td / 'log')}") from exc
    finally:
        setup.procs.stop(proc)
    if abs(profile.summary - profile.totals) > SUMMARY_TOLERANCE * profile.totals:
        print(
            f"instructions: warning: {name}: the dump's summary ({profile.summary}) and "
            f"totals ({profile.totals}) differ by more than {SUMMARY_TOLERANCE:.1%}",
            file=sys.stderr,
        )
    groups: Counter[str] = Counter()
    for obj, cost in profile.objects.items():
        groups[group_of(obj, cmd.program)] += cost
    return Measurement(
        name,
        n,
        profile,
        dict(groups),
        load,
        warmup,
        len(family),
        cmd.program,
        dumps,
        setup.requests,
        upstream,
    )


# ------------------------------------------------------------------ output --


def version_of(cmd: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    match = re.search(pattern, out.stdout + out.stderr)
    return match.group(1) if match else "?"


def tree_state(tree: Path) -> str:
    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(tree), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return out.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD") or "?"
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return f"{head} + uncommitted changes" if dirty else head


def versions(targets: list[str], tree: Path) -> dict[str, str]:
    found = {
        "valgrind": version_of(["valgrind", "--version"], r"valgrind-(\S+)"),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "tree": tree_state(tree) + ("" if tree == REPO else f" ({tree})"),
    }
    if "haproxy" in targets:
        found["haproxy"] = version_of(["haproxy", "-v"], r"version (\S+)")
    if "hitch" in targets:
        found["hitch"] = version_of(["hitch", "--version"], r"hitch (\S+)")
    return found


def num(value: float) -> str:
    return f"{value:,.0f}"


def client_auth(args: argparse.Namespace) -> str:
    if not args.mtls:
        return "no client certificate"
    table = f", tlsproxy allow table of {args.allow} uri entries" if args.allow else ""
    return f"mutual TLS (ECDSA client certificate with a SPIFFE ID){table}"


def report(
    results: list[Measurement],
    args: argparse.Namespace,
    info: dict[str, str],
    out: TextIO,
) -> None:
    cert, functions = args.cert, args.functions
    certname = "ECDSA P-256" if cert == "ecdsa" else "RSA-2048"
    first = results[0]
    w = out.write
    direction = (
        "egress (plain HTTP in, TLS out to nginx)"
        if args.direction == "egress"
        else "ingress (TLS in, plain to nginx)"
    )
    w(
        f"Instructions per connection (callgrind), {direction}, {certname} certificate, "
        f"{client_auth(args)}\n"
    )
    handshake = (
        f"upstream {first.upstream.version}, {first.upstream.cipher}"
        if first.upstream is not None
        else f"{first.warmup.version}, {first.warmup.cipher}"
    )
    gets = (
        f"{first.requests} x GET {SMALL_BYTES} B keep-alive, the last with Connection: close"
        if first.requests > 1
        else f"GET {SMALL_BYTES} B, Connection: close"
    )
    w(
        f"{first.connections} connections per target from {CLIENT_THREADS} client threads: "
        f"full handshake ({handshake}), {gets}\n"
    )
    w(", ".join(f"{k} {v}" for k, v in info.items()) + "\n")
    for m in results:
        up = m.upstream
        seen = (
            f"; nginx saw {up.connections} upstream connections, {up.requests} requests, "
            f"{up.resumed} resumed, {up.version} {up.cipher}"
            if up is not None
            else ""
        )
        w(
            f"{m.target}: {m.load.connections} ok, {m.load.resumed} resumed, "
            f"{m.load.tickets} with a session ticket, {m.load.seconds:.0f} s under valgrind, "
            f"{m.processes} process(es); dump summary/totals "
            f"{m.profile.summary / max(m.profile.totals, 1):.4f}{seen}\n"
        )
    by_name = {m.target: m for m in results}
    ref = by_name.get(REFERENCE)
    per_request = first.requests > 1
    for unit in ("connection", "request") if per_request else ("connection",):
        per = first.requests if unit == "request" else 1
        w(f"\nInstructions per {unit}, by shared object:\n")
        w(f"{'target':<18} {'total':>10}" + "".join(f" {g:>10}" for g in GROUPS) + "\n")
        for m in results:
            row = f"{m.target:<18} {num(m.per_connection / per):>10}"
            w(row + "".join(f" {num(m.group(g) / per):>10}" for g in GROUPS) + "\n")
        if ref is not None and "tlsproxy" in by_name:
            mine = by_name["tlsproxy"]
            diff = (mine.per_connection - ref.per_connection) / per
            row = f"{'tlsproxy - ' + REFERENCE:<18} {num(diff):>10}"
            groups = [(mine.group(g) - ref.group(g)) / per for g in GROUPS]
            w(row + "".join(f" {num(g):>10}" for g in groups) + "\n")
    w("\n")
    if ref is not None:
        for m in results:
            if m is not ref:
                w(f"{m.target} / {REFERENCE}: {m.per_connection / ref.per_connection:.2f}x\n")
    for m in results:
        other = [
            (obj.rsplit("/", 1)[-1], cost)
            for obj, cost in m.profile.objects.most_common()
            if group_of(obj, m.program) == "other"
        ]
        if other:
            shown = "; ".join(
                f"{obj} {num(cost / m.connections)}" for obj, cost in other[:OTHER_SHOWN]
            )
            w(f"other, {m.target}: {shown}\n")
    for m in results:
        if functions:
            w(f"\nTop {functions} functions by self cost per connection, {m.target}:\n")
            for (obj, fn), cost in m.profile.functions.most_common(functions):
                w(f"{num(cost / m.connections):>10}  {obj.rsplit('/', 1)[-1]}  {fn}\n")


def ratio_to_reference(m: Measurement, results: list[Measurement]) -> float | None:
    ref = next((r for r in results if r.target == REFERENCE), None)
    if ref is None or ref is m:
        return None
    return round(m.per_connection / ref.per_connection, 3)


def record(
    m: Measurement, results: list[Measurement], args: argparse.Namespace, info: dict[str, str]
) -> dict[str, Any]:
    n = m.connections
    return {
        "record": "instructions",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "target": m.target,
        "cert": args.cert,
        "direction": args.direction,
        "requests_per_connection": m.requests,
        "mtls": args.mtls,
        "allow_entries": args.allow if m.target == "tlsproxy" else 0,
        "connections": n,
        "client_threads": CLIENT_THREADS,
        "instructions": m.profile.instructions,
        "per_connection": round(m.per_connection),
        "per_request": round(m.per_request),
        "per_connection_by_group": {g: round(m.group(g)) for g in GROUPS},
        "per_connection_by_object": {
            obj: round(cost / n) for obj, cost in m.profile.objects.most_common(10)
        },
        f"ratio_to_{REFERENCE}": ratio_to_reference(m, results),
        "dump_summary": m.profile.summary,
        "dump_totals": m.profile.totals,
        "tls_version": m.upstream.version if m.upstream else m.warmup.version,
        "cipher": m.upstream.cipher if m.upstream else m.warmup.cipher,
        "upstream_connections": m.upstream.connections if m.upstream else None,
        "resumed": m.load.resumed,
        "tickets": m.load.tickets,
        "seconds": round(m.load.seconds, 1),
        "processes": m.processes,
        "versions": info,
    }


# -------------------------------------------------------------------- main --


def check_load(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--keep-alive R and -n: their bounds, and -n's default (fewer
    connections with R requests each)."""
    if not 1 <= args.keep_alive <= MAX_KEEP_ALIVE:
        ap.error(f"--keep-alive must be 1..{MAX_KEEP_ALIVE}")
    if args.connections is None:
        args.connections = FULL_HANDSHAKE_CONNECTIONS
        if args.keep_alive > 1:
            fit = MAX_REQUESTS // args.keep_alive
            args.connections = max(MIN_CONNECTIONS, min(KEEP_ALIVE_CONNECTIONS, fit))
    if not MIN_CONNECTIONS <= args.connections <= MAX_CONNECTIONS:
        ap.error(f"--connections must be {MIN_CONNECTIONS}..{MAX_CONNECTIONS}")
    if args.connections * args.keep_alive > MAX_REQUESTS:
        ap.error(f"--connections x --keep-alive must be at most {MAX_REQUESTS}")


def source_tree(ap: argparse.ArgumentParser, option: str, tree: Path) -> Path:
    tree = tree.resolve()
    if not (tree / "proxy" / "__main__.py").is_file():
        ap.error(f"{option}: no tlsproxy source tree (proxy/__main__.py) in {tree}")
    return tree


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--targets",
        default=DEFAULT_TARGETS,
        help=f"comma-separated, from {','.join(TARGETS)} (default {DEFAULT_TARGETS})",
    )
    ap.add_argument(
        "--cert",
        choices=("ecdsa", "rsa"),
        default="ecdsa",
        help="server certificate: ECDSA P-256 (default) or RSA-2048",
    )
    ap.add_argument(
        "--dual",
        action="store_true",
        help="tlsproxy serves an RSA and an ECDSA certificate side by side (--cert's is served)",
    )
    ap.add_argument(
        "--direction",
        choices=DIRECTIONS,
        default="ingress",
        help="ingress: TLS in, plain to nginx (default); egress: plain in, TLS to nginx",
    )
    ap.add_argument(
        "--keep-alive",
        type=int,
        default=1,
        metavar="R",
        help=f"R keep-alive requests per connection, 1..{MAX_KEEP_ALIVE} (e.g. 100)",
    )
    ap.add_argument(
        "-n",
        "--connections",
        type=int,
        help=(
            f"measured connections per target, {MIN_CONNECTIONS}..{MAX_CONNECTIONS} "
            f"(default {FULL_HANDSHAKE_CONNECTIONS}; with --keep-alive "
            f"{KEEP_ALIVE_CONNECTIONS}, or fewer to stay within {MAX_REQUESTS} requests)"
        ),
    )
    ap.add_argument(
        "--tree",
        type=Path,
        default=REPO,
        metavar="DIR",
        help="the tlsproxy source tree to measure (default: this one)",
    )
    ap.add_argument(
        "--mtls",
        action="store_true",
        help="the client presents a certificate that the target requires and verifies",
    )
    ap.add_argument(
        "--allow",
        type=int,
        default=0,
        metavar="N",
        help="with --mtls: tlsproxy's allow table has N uri entries, the client's last",
    )
    ap.add_argument("--out", type=Path, help="append one JSON line per target to this file")
    ap.add_argument(
        "--functions",
        type=int,
        default=0,
        metavar="K",
        help="also list each target's K costliest functions (self cost)",
    )
    ap.add_argument(
        "--profiles",
        type=Path,
        metavar="DIR",
        help="copy the measured callgrind dumps here (for callgrind_annotate, kcachegrind)",
    )
    args = ap.parse_args()
    check_load(ap, args)
    args.tree = source_tree(ap, "--tree", args.tree)
    if not 0 <= args.functions <= MAX_FUNCTIONS:
        ap.error(f"--functions must be 0..{MAX_FUNCTIONS}")
    if not 0 <= args.allow <= MAX_ALLOW or (args.allow and not args.mtls):
        ap.error(f"--allow must be 0..{MAX_ALLOW}, and needs --mtls")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.mtls and "hitch" in args.targets:
        ap.error("--mtls: hitch has no client certificate authentication")
    if args.direction == "egress":
        if args.mtls or args.dual:
            ap.error("--direction egress: --mtls, --allow and --dual are ingress options")
        if not set(args.targets) <= set(EGRESS_TARGETS):
            ap.error(f"--direction egress: targets from {','.join(EGRESS_TARGETS)} only")
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown or not args.targets or len(set(args.targets)) != len(args.targets):
        ap.error(
            f"--targets: each of {','.join(TARGETS)} at most once; got {unknown or args.targets}"
        )
    return args


def check_machine(targets: list[str]) -> list[str] | None:
    """The targets that can run, or None (and a message) when nothing can."""
    tools = ["valgrind", "callgrind_control", "nginx", "taskset"]
    tools += ["setpriv"] if "hitch" in targets and os.geteuid() == 0 else []
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        debs = " ".join(sorted({PACKAGES[m] for m in missing}))
        print(
            f"instructions: missing {', '.join(missing)}; install with: apt-get install -y {debs}",
            file=sys.stderr,
        )
        return None
    if not {PROXY_CPU, LOAD_CPU} <= os.sched_getaffinity(0):
        print(
            "instructions: needs CPUs 0 and 1 (target on 0, nginx and clients on 1)",
            file=sys.stderr,
        )
        return None
    runnable = []
    for t in targets:
        if t != "tlsproxy" and shutil.which(t) is None:
            print(
                f"instructions: {t} skipped: not installed (apt-get install -y {PACKAGES[t]})",
                file=sys.stderr,
            )
        else:
            runnable.append(t)
    return runnable


def run(
    args: argparse.Namespace, targets: list[str], procs: Processes
) -> tuple[list[Measurement], int]:
    results: list[Measurement] = []
    failed = 0
    with tempfile.TemporaryDirectory(prefix="tls-instructions-") as tmp:
        d = Path(tmp)
        d.chmod(0o755)  # nginx's worker and hitch run as nobody
        cert = make_certificate(d, args.cert)
        peer_env = {**os.environ, "OPENSSL_CONF": str(openssl_conf(d))}
        egress = args.direction == "egress"
        nginx, backend = start_nginx(
            d,
            procs,
            ["taskset", "-c", str(LOAD_CPU)],
            (cert.cert, cert.key) if egress else None,
            peer_env if egress else None,
        )
        other = "rsa" if args.cert == "ecdsa" else "ecdsa"
        dual = make_certificate(d, other, "dual-") if args.dual else None
        clients = make_client_pki(d) if args.mtls else None
        setup = Setup(
            d,
            backend,
            cert,
            peer_env,
            procs,
            clients,
            args.allow,
            dual,
            egress,
            args.keep_alive,
            args.tree,
        )
        try:
            for name in targets:
                try:
                    m = measure(name, setup, args.connections)
                except RuntimeError as exc:
                    print(f"instructions: failed: {exc}", file=sys.stderr)
                    failed += 1
                    continue
                results.append(m)
                if args.profiles:
                    args.profiles.mkdir(parents=True, exist_ok=True)
                    for path in m.dumps:
                        pid = path.name.split(".")[2]
                        shutil.copy(path, args.profiles / f"callgrind.{name}.{args.cert}.{pid}")
        finally:
            procs.stop(nginx)
    return results, failed


def main() -> int:
    args = parse_args()
    targets = check_machine(args.targets)
    if targets is None:
        return 2
    os.sched_setaffinity(0, {LOAD_CPU})  # the clients stay off the target's CPU
    signal.signal(signal.SIGTERM, on_signal)
    info = versions(targets, args.tree)
    procs = Processes(STOP_WAIT_S)
    try:
        results, failed = run(args, targets, procs)
    finally:
        procs.stop_all()
    if results:
        report(results, args, info, sys.stdout)
    if args.out and results:
        with args.out.open("a") as fh:
            for m in results:
                fh.write(json.dumps(record(m, results, args, info)) + "\n")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("instructions: interrupted; every started process stopped", file=sys.stderr)
        sys.exit(130)
