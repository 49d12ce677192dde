"""Redis counter store: every replica shares the counts, one Lua script per check.

The whole check-and-record runs inside ``window.lua`` so an acquire is atomic across
replicas and costs exactly one round trip (an ``EVALSHA``; redis-py reloads the script by
itself after a ``NOSCRIPT``, e.g. when Redis restarted).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Sequence
from importlib.resources import files

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from authz.store import Charge, Outcome, StoreUnavailable

_SCRIPT = files("authz.store").joinpath("window.lua").read_text(encoding="utf-8")

# Enough connections for a burst of concurrent checks; beyond it callers queue for a free
# connection (within the call's timeout) instead of failing outright.
_MAX_CONNECTIONS = 64

# Suffix of the companion key holding a counter's running total. It follows the key, so a
# `{hash-tag}` in the key also places the total in the same Redis Cluster slot.
_TOTAL_SUFFIX = ":t"


class RedisStore:
    """Counter store shared by every replica through one Redis (or Redis Cluster slot).

    Every call is bounded by ``timeout_s``, both on the socket and around the whole call,
    and any failure surfaces as :class:`StoreUnavailable`. Nothing is retried: an
    ``EVALSHA`` that timed out may still have run, so a retry could charge twice. A broken
    connection is dropped and the next call opens a new one, so the store recovers by itself
    once Redis is back.
    """

    def __init__(self, url: str, timeout_s: float = 0.05) -> None:
        self._timeout_s = timeout_s
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=_MAX_CONNECTIONS,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=0,
            retry=Retry(NoBackoff(), 0),
        )
        self._client = redis.asyncio.Redis.from_pool(pool)
        self._script = self._client.register_script(_SCRIPT)
        # Random per store, counted per call: two replicas recording in the same millisecond
        # never write the same sorted-set member (which would merge their entries).
        self._nonce_prefix = os.urandom(8).hex()
        self._calls = itertools.count()

    async def acquire(self, charges: Sequence[Charge], now_ms: int | None = None) -> Outcome:
        """Check and record ``charges`` atomically in one ``EVALSHA`` (none when empty)."""
        if not charges:
            return Outcome(allowed=True, remaining=())
        keys: list[str] = []
        args: list[str | int] = ["" if now_ms is None else now_ms, self._nonce()]
        for charge in charges:
            keys += (charge.key, charge.key + _TOTAL_SUFFIX)
            args += (charge.window_ms, charge.max, charge.cost)
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await self._script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise _unavailable("acquire", exc) from exc
        allowed, refused, retry_after_ms, *remaining = (int(value) for value in reply)
        if allowed:
            return Outcome(allowed=True, remaining=tuple(remaining))
        return Outcome(
            allowed=False,
            remaining=tuple(remaining),
            refused=refused,
            retry_after_ms=retry_after_ms,
        )

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless Redis answers ``PING`` in time."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            raise _unavailable("ping", exc) from exc

    async def close(self) -> None:
        """Close the client and every pooled connection."""
        await self._client.aclose()

    def _nonce(self) -> str:
        return f"{self._nonce_prefix}{next(self._calls):x}"


def _unavailable(operation: str, exc: BaseException) -> StoreUnavailable:
    """Name the failure without echoing the call's arguments."""
    if isinstance(exc, TimeoutError):
        return StoreUnavailable(f"redis {operation}: timed out")
    detail = next(iter(str(exc).splitlines()), "")[:200]
    return StoreUnavailable(f"redis {operation}: {type(exc).__name__} {detail}".rstrip())
