"""Shared pytest fixtures; ``tests/conftest.py`` star-imports this module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.redis_server import RedisServer, running_redis

__all__ = ["redis_server"]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server per test, so no test sees another's keys or statistics."""
    with running_redis(tmp_path) as server:
        yield server
