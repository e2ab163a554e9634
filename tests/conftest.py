from __future__ import annotations

import os
from datetime import timedelta

import pytest
import trio
from hypothesis import HealthCheck, settings

from tests.helpers import (
    Certs,
    Running,
    build_config,
    echo_handler,
    start_backend,
    start_server,
    write_certs,
)

# The property-based tests (tests/test_fuzz_*.py): `make test` runs the short
# fixed-seed budget, the same inputs every run (a few seconds in all);
# `make fuzz` runs HYPOTHESIS_PROFILE=fuzz, a random campaign of minutes. No
# example database: a failure prints the blob that reproduces it. The deadline
# is only a backstop for a hang, far above any example's milliseconds; the
# work itself is bounded by the tests (lines executed).
settings.register_profile(
    "test",
    derandomize=True,
    max_examples=100,
    deadline=timedelta(seconds=5),
    database=None,
    print_blob=True,
)
settings.register_profile(
    "fuzz",
    max_examples=10_000,
    deadline=timedelta(seconds=5),
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "test"))


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return write_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
async def echo_port(nursery: trio.Nursery) -> int:
    return await start_backend(nursery, echo_handler)


@pytest.fixture
async def proxy(nursery: trio.Nursery, certs: Certs, echo_port: int) -> Running:
    """tlsproxy in front of an echo backend, with a short handshake timeout."""
    return await start_server(nursery, build_config(certs, echo_port, handshake_timeout=2.0))
