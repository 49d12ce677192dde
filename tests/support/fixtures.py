"""Shared pytest fixtures; ``tests/conftest.py`` star-imports this module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.redis_server import RedisServer, running_redis
from devstack.stack import TRANSPORTS

__all__ = ["redis_server", "transport"]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server per test, so no test sees another's keys or statistics."""
    with running_redis(tmp_path) as server:
        yield server


@pytest.fixture(scope="module", params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """The ext_authz transport a stack runs on: every test that asks runs on both."""
    return str(request.param)
