"""Counter stores: where the sliding-window limits keep their counts.

One small interface, backends chosen by URL (as the `limits` library does):

- ``memory://``: in this process only; exact for a single replica and local runs.
- ``redis://``, ``rediss://``, ``unix://``: one Redis shared by every replica, one Lua
  script per check.
- ``redis+sentinel://``, ``rediss+sentinel://``: the master a set of sentinels names
  (``authz.store.redis.open_sentinel``).
- ``redis+cluster://``, ``rediss+cluster://``: a Redis Cluster, exact across hash slots
  (``authz.store.cluster``).

All implement the same algorithm (a sliding log, see ``window.lua``), so one contract test
suite runs against each. Each also keeps the approvals (:mod:`authz.approvals`) beside its
counters, through the same connection, timeout and error mapping.

This module and :mod:`authz.approvals` import no I/O library: the engine imports them, and
the backends (and redis-py) are imported only when a URL names them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol
from urllib.parse import urlsplit

import msgspec

from authz.approvals import ApprovalBook

# How long a store call may take before the check is answered 503 (or let through under
# --fail-open): the default of --store-timeout-ms, well inside Envoy's ext_authz timeout.
DEFAULT_TIMEOUT_S = 0.05


# Frozen msgspec Structs, as in authz.mcp: built on every limited check.
class Charge(msgspec.Struct, frozen=True):
    """One limit a request wants to spend against.

    ``key`` is the full counter key (the engine builds it from scope and counter name, and
    the keys of one charge list never repeat: the engine merges equal keys by adding costs).
    """

    key: str
    window_ms: int
    max: int
    cost: int = 1
    # A session-scoped charge names the record of its session (see CounterStore.record):
    # ``key`` is charged while that record exists (renewing its idle time), ``fallback``
    # (the grant's counter of the same name) otherwise. Both are under the grant's hash tag.
    session: str | None = None
    fallback: str | None = None


class Outcome(msgspec.Struct, frozen=True):
    """The result of :meth:`CounterStore.acquire`.

    When ``allowed``, every charge was recorded and ``remaining[i]`` is what is left of
    charge ``i``'s budget. When not, nothing was recorded, ``refused`` is the index of the
    first charge that did not fit, ``retry_after_ms`` is how long until enough of its window
    frees up for the charge's cost, and ``remaining`` holds the budget left before the
    request, up to and including the refused charge. A store that checks in another order
    than the list's (Redis Cluster goes slot by slot) gives a charge it never reached as
    its ``max``.
    """

    allowed: bool
    remaining: tuple[int, ...]
    refused: int | None = None
    retry_after_ms: int = 0


class StoreUnavailable(Exception):
    """The store could not answer in time (connection refused, timeout, protocol error).

    The engine turns this into a 503 denial (fail closed) unless the operator opted into
    ``--fail-open``.
    """


class CounterStore(Protocol):
    """What the engine needs from a store: an all-or-nothing acquire, a ping, a close."""

    async def acquire(self, charges: Sequence[Charge], now_ms: int | None = None) -> Outcome:
        """Record every charge if all fit in their windows, otherwise record none.

        ``now_ms`` (Unix milliseconds) lets tests drive the clock; ``None`` means the
        store's own clock (Redis: the server's ``TIME``, so replicas agree).
        """
        ...

    async def record(self, key: str, ttl_ms: int) -> None:
        """Keep ``key`` for ``ttl_ms`` (wall clock) from now: what the upstream issued to a
        grant (a session id, a task id). A session record's time is renewed by each
        charge that names it, so it expires after ``ttl_ms`` without use."""
        ...

    async def forget(self, key: str) -> None:
        """Drop the record ``key`` (no error when there is none)."""
        ...

    async def recorded(self, keys: Sequence[str]) -> tuple[bool, ...]:
        """Whether each of ``keys`` is recorded and unexpired (keys of one grant)."""
        ...

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` when the store cannot be reached."""
        ...

    async def close(self) -> None: ...


class Backend(CounterStore, Protocol):
    """A counter store as :func:`open_store` builds it, which can also keep approvals."""

    def approval_book(self) -> ApprovalBook:
        """The approvals kept beside these counters: in the same place, through the same
        connection, bounded by the same timeout, failing as :class:`StoreUnavailable`."""
        ...


def open_store(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Backend:
    """Build the store a URL names; ``timeout_s`` bounds every store call."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from authz.store.memory import MemoryStore

        return MemoryStore()
    if scheme in ("redis", "rediss", "unix"):
        from authz.store.redis import open_redis

        return open_redis(url, timeout_s)
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        from authz.store.redis import open_sentinel

        return open_sentinel(url, timeout_s)
    if scheme in ("redis+cluster", "rediss+cluster"):
        from authz.store.cluster import open_cluster

        return open_cluster(url, timeout_s)
    raise ValueError(
        f"unsupported store URL scheme {scheme!r} (use memory://, redis://, rediss://, "
        "unix://, redis+sentinel://, redis+cluster://)"
    )
