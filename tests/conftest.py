from __future__ import annotations

import pytest
import trio

from tests.helpers import (
    Certs,
    Running,
    build_config,
    echo_handler,
    start_backend,
    start_server,
    write_certs,
)


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
