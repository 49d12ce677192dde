"""Redis Cluster counter store: exact counts when a request's counters span hash slots.

One Lua script may only touch keys of one hash slot. The keys of one scope share a hash tag
(``{g:<grant>}``, ``{global}``), so a request that touches only grant-scoped counters, the
common case, is still one ``window.lua`` call: one round trip, atomic, exactly as on a
single Redis. A request whose counters live in several slots (say a grant-scoped and a
global limit) is done in two phases:

1. Reserve: ``window.lua`` runs per slot, in ascending slot order, each one checking and
   recording that slot's charges all or nothing.
2. If a slot refuses, or a call fails or times out, ``rollback.lua`` removes exactly the
   members the earlier reservations recorded (and the failed one's, in case it ran).

The guarantee, under any interleaving of any number of replicas:

- no counter ever holds more than its ``max`` in a window, so no call is allowed over a
  limit;
- a call refused by a limit leaves no budget spent: its reservations are returned before
  its answer is sent;
- between a reservation and its rollback (one round trip), a concurrent call may see that
  budget as spent and be refused, rarely, although it would have fitted a moment later.

When the store fails mid-way (the check answers 503), the rollback is still attempted in
the background; if Redis cannot be reached for that either, the reservation stays counted
until its window passes. Faults can therefore only ever refuse more, never allow more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from authz.approvals import ApprovalBook
from authz.store import Charge, Outcome
from authz.store.connection import Arg, Script
from authz.store.redis import (
    DEFAULT_PORT,
    STORE_ERRORS,
    WINDOW,
    Nonces,
    outcome_of,
    parse_multi_host_url,
    record,
    recorded,
    script_call,
    unavailable,
)
from authz.store.redis_approvals import RedisApprovals

log = logging.getLogger("mcp_authz.store")

ROLLBACK = Script.named("rollback.lua")

# Enough concurrent calls for a burst of checks; beyond it callers queue (within their
# timeout) instead of failing outright.
MAX_CONNECTIONS = 64

# The Cluster default. A call holds at most one connection at a time, and at most
# MAX_CONNECTIONS calls run at once, so no node's pool runs dry.
_NODE_CONNECTIONS = 2 * MAX_CONNECTIONS


class ClusterStore:
    """Counter store on a Redis Cluster; see the module docstring for the guarantee.

    Timeouts, errors and retries are as in :class:`authz.store.redis.RedisStore`: each check
    is bounded by ``timeout_s``, fails closed as :class:`StoreUnavailable`, and nothing that
    may have run is retried (redirections, ``MOVED`` and ``ASK``, are followed: the command
    did not run where it was refused).

    Every call first makes sure the client knows the slot map (``initialize()`` is a no-op
    once it does): redis-py routes a command issued before that to an arbitrary node, and
    a burst of the resulting ``MOVED`` replies makes it drop every connection in use. For
    the same reason a ``MOVED`` only patches the slot map (``reinitialize_steps=0``).
    """

    def __init__(self, client: RedisCluster, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._nonces = Nonces()
        # Calls beyond this many wait (within their timeout) rather than open more sockets.
        self._running = asyncio.Semaphore(MAX_CONNECTIONS)
        self._rollbacks: set[asyncio.Task[None]] = set()

    async def acquire(self, charges: Sequence[Charge], now_ms: int | None = None) -> Outcome:
        """Record every charge if all fit, else none; one round trip per hash slot touched."""
        if not charges:
            return Outcome(allowed=True, remaining=())
        nonce = self._nonces.next()
        calls = [
            (indexes, *script_call([charges[i] for i in indexes], now_ms, nonce))
            for indexes in _by_slot(charges)
        ]
        reserved: list[tuple[list[str], list[str | int]]] = []
        remaining: dict[int, int] = {}
        try:
            async with asyncio.timeout(self._timeout_s), self._running:
                await self._client.initialize()
                for indexes, keys, args in calls:
                    reserved.append((keys, args))
                    outcome = outcome_of(await self._run(WINDOW, keys, args))
                    if not outcome.allowed:
                        reserved.pop()  # a refusal records nothing
                        break
                    remaining.update(zip(indexes, outcome.remaining, strict=True))
                else:
                    return Outcome(
                        allowed=True, remaining=tuple(remaining[i] for i in range(len(charges)))
                    )
        except STORE_ERRORS as exc:
            self._roll_back_later(reserved)
            raise unavailable("acquire", exc) from exc
        await self._roll_back(reserved)
        return _refusal(charges, remaining, indexes, outcome)

    async def script(
        self, operation: str, script: Script, keys: Sequence[str], args: Sequence[Arg]
    ) -> Any:
        """Run ``script`` on the node of ``keys``' slot (they share one) and return its reply."""
        try:
            async with asyncio.timeout(self._timeout_s), self._running:
                await self._client.initialize()
                return await self._run(script, keys, args)
        except STORE_ERRORS as exc:
            raise unavailable(operation, exc) from exc

    async def command(self, operation: str, *command: Arg) -> Any:
        """Run one command on the node of its key and return its reply."""
        try:
            async with asyncio.timeout(self._timeout_s), self._running:
                await self._client.initialize()
                return await self._client.execute_command(*command)
        except STORE_ERRORS as exc:
            raise unavailable(operation, exc) from exc

    async def record(self, key: str, ttl_ms: int) -> None:
        await record(self, key, ttl_ms)

    async def forget(self, key: str) -> None:
        await self.command("forget", "DEL", key)

    async def recorded(self, keys: Sequence[str]) -> tuple[bool, ...]:
        return await recorded(self, keys)

    def approval_book(self) -> ApprovalBook:
        """Approvals in this cluster (in one slot), through this store's client."""
        return RedisApprovals(self)

    async def _run(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """``EVALSHA`` on the node of ``keys``' slot, loading the script there if needed.

        redis-py's own fallback loads a missing script on every primary, which fails while
        any one is down, even though this slot's node is up.
        """
        try:
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            node = self._client.get_node_from_key(keys[0])
            await self._client.execute_command("SCRIPT LOAD", script.text, target_nodes=node)
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)

    async def _roll_back(self, reserved: list[tuple[list[str], list[str | int]]]) -> None:
        """Undo ``reserved`` (one ``rollback.lua`` call per slot, in parallel)."""
        if not reserved:
            return
        results: list[Any] = []
        try:
            async with asyncio.timeout(self._timeout_s), self._running:
                await self._client.initialize()
                results = await asyncio.gather(
                    *(self._run(ROLLBACK, keys, args) for keys, args in reserved),
                    return_exceptions=True,
                )
        except STORE_ERRORS as exc:
            results = [exc]
        for result in results:
            if isinstance(result, BaseException):
                # Errs toward refusing: the reservation stays counted until its window passes.
                log.warning("counter reservation not returned: %s", unavailable("rollback", result))

    def _roll_back_later(self, reserved: list[tuple[list[str], list[str | int]]]) -> None:
        """Undo ``reserved`` without holding up the 503 answer of a failed check."""
        if reserved:
            task = asyncio.create_task(self._roll_back(reserved))
            self._rollbacks.add(task)
            task.add_done_callback(self._rollbacks.discard)

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the cluster answers ``PING`` in time."""
        await self.command("ping", "PING")

    async def close(self) -> None:
        """Finish the rollbacks still running, then close every connection."""
        if self._rollbacks:
            await asyncio.wait(self._rollbacks, timeout=self._timeout_s * 2)
        await self._client.aclose()


def _by_slot(charges: Sequence[Charge]) -> list[list[int]]:
    """The charges' indexes grouped by hash slot, in ascending slot order."""
    groups: dict[int, list[int]] = {}
    for index, charge in enumerate(charges):
        groups.setdefault(key_slot(charge.key.encode()), []).append(index)
    return [groups[slot] for slot in sorted(groups)]


def _refusal(
    charges: Sequence[Charge], reserved: dict[int, int], indexes: list[int], refusal: Outcome
) -> Outcome:
    """The refusal in the request's own charge order.

    ``reserved`` holds what the returned reservations left (so before them: plus the cost);
    the refusing slot's reply gives the budgets before the request up to the refused
    charge. A charge in a slot the check never reached reads as its ``max``.
    """
    assert refusal.refused is not None
    before = {i: left + charges[i].cost for i, left in reserved.items()}
    before.update(zip(indexes, refusal.remaining, strict=False))
    refused = indexes[refusal.refused]
    return Outcome(
        allowed=False,
        remaining=tuple(before.get(i, charges[i].max) for i in range(refused + 1)),
        refused=refused,
        retry_after_ms=refusal.retry_after_ms,
    )


def open_cluster(url: str, timeout_s: float) -> ClusterStore:
    """``redis+cluster://[user:password@]host:port[,host:port...][?options]``.

    The hosts are startup nodes (one is enough; the client learns the rest with
    ``CLUSTER SLOTS``); ``rediss+cluster://`` for TLS.
    """
    parsed = parse_multi_host_url(url, DEFAULT_PORT)
    if parsed.path:
        raise ValueError("redis+cluster:// URL takes no path (a cluster has only db 0)")
    if parsed.own:
        raise ValueError(f"redis+cluster:// URL does not take {', '.join(sorted(parsed.own))}")
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "max_connections": _NODE_CONNECTIONS,
        **parsed.connection,
    }
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.hosts],
        retry=Retry(NoBackoff(), 0),
        reinitialize_steps=0,
        **options,
    )
    return ClusterStore(client, timeout_s)
