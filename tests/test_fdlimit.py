"""The open-file limit against max_connections: raised to the hard limit when
that is enough, a warning naming both numbers when even that is too small."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import trio

from proxy.config import parse_config
from proxy.fdlimit import FD_HEADROOM, descriptors_needed, raise_to
from tests.daemon import PYTHON_M_PROXY, echo_through, env_for, spawn, write_config
from tests.helpers import Certs, listener_table

INFINITY = resource.RLIM_INFINITY


@pytest.mark.parametrize(
    ("soft", "hard", "needed", "expected"),
    [
        (4096, 4096, 2000, None),  # enough already: left alone
        (INFINITY, INFINITY, 2000, None),
        (1024, 524288, 2000, 524288),  # raised to the hard limit
        (1024, INFINITY, 2000, 2000),  # no hard limit: to what is needed
        (1024, 1500, 2000, 1500),  # raised, still short: the caller warns
        (1024, 1024, 2000, None),  # nothing to raise: the caller warns
    ],
)
def test_raise_to(soft: int, hard: int, needed: int, expected: int | None) -> None:
    assert raise_to(soft, hard, needed) == expected


def test_two_descriptors_per_connection_of_every_listener_plus_headroom(certs: Certs) -> None:
    config = parse_config(
        {
            "listeners": [
                listener_table(certs, 1, name="a", max_connections=100),
                listener_table(certs, 1, name="b", max_connections=50, listen="127.0.0.1:1"),
            ]
        },
        certs.cert.parent,
    )
    assert descriptors_needed(config) == 2 * 150 + 2 + FD_HEADROOM


def _max_open_files(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no Max open files line")


# A limit far below the default max_connections (10 000 -> 20 065 descriptors)
# but enough for the daemon itself to run and serve.
LOW = 256


async def test_too_low_a_hard_limit_warns_with_both_numbers_and_serves(
    nursery: trio.Nursery, certs: Certs, echo_port: int, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "tlsproxy.toml", certs, backend_port=echo_port)
    argv = ["prlimit", f"--nofile={LOW}:{LOW}", *PYTHON_M_PROXY, "run", "--config", str(config)]
    async with spawn(nursery, argv, env=env_for(tmp_path / "state"), cwd=tmp_path) as daemon:
        port, _ = await daemon.started()
        await echo_through(port, certs.client_context())
    warnings = [e for e in daemon.events if "RLIMIT_NOFILE" in e["event"]]
    assert len(warnings) == 1, daemon.output()
    (warning,) = warnings
    assert warning["level"] == "warning"
    assert (warning["limit"], warning["hard_limit"], warning["needed"]) == (LOW, LOW, 20065)
    assert f"is {LOW}" in warning["event"]
    assert "20065" in warning["event"]
    assert "ulimit -n" in warning["event"]
    assert "LimitNOFILE" in warning["event"]
    assert "lower max_connections" in warning["event"]


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_low_soft_limit_is_raised_to_the_hard_limit_without_a_warning(
    nursery: trio.Nursery, certs: Certs, echo_port: int, tmp_path: Path, workers: int
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * 1000 + 1 + FD_HEADROOM
    if hard != INFINITY and hard < needed:
        pytest.skip(f"this machine's hard limit ({hard}) is below {needed}")
    hard = min(hard, 4 * needed) if hard != INFINITY else 4 * needed
    config = write_config(
        tmp_path / "tlsproxy.toml", certs, backend_port=echo_port,
        process_lines=f"workers = {workers}", listener_lines="max_connections = 1000",
    )  # fmt: skip
    argv = ["prlimit", f"--nofile={LOW}:{hard}", *PYTHON_M_PROXY, "run", "--config", str(config)]
    async with spawn(nursery, argv, env=env_for(tmp_path / "state"), cwd=tmp_path) as daemon:
        port, _ = await daemon.started()
        pids = [daemon.process.pid]
        if workers > 1:
            pids += (await daemon.wait_for("workers ready"))["worker_pids"]
        for pid in pids:  # the workers inherit the supervisor's raised limit
            assert _max_open_files(pid) == (hard, hard)
        await echo_through(port, certs.client_context())
    (raised,) = [e for e in daemon.events if "RLIMIT_NOFILE" in e["event"]]
    assert raised["level"] == "info"
    assert raised["previous_limit"] == LOW
    assert raised["limit"] == hard
    assert "(the hard limit)" in raised["event"]
