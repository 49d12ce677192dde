"""Redis counter store: every replica shares the counts, one Lua script per check.

The whole check-and-record runs inside ``window.lua`` so an acquire is atomic across
replicas and costs exactly one round trip (an ``EVALSHA``; the script is loaded again
after a ``NOSCRIPT``, e.g. when Redis restarted). The approvals kept beside the counters
(``authz.store.redis_approvals``) go through the same connection, timeout and errors.

This module also reads the store URLs that name several hosts (Sentinel and Cluster), which
redis-py has no ``from_url`` for; see :func:`parse_multi_host_url`.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from authz.approvals import ApprovalBook
from authz.store import Charge, Outcome, StoreUnavailable
from authz.store.connection import Arg, PipelinedConnection, ReplyError, Script, endpoint_of
from authz.store.redis_approvals import RedisApprovals

log = logging.getLogger("mcp_authz.store")

WINDOW = Script.named("window.lua")

# Suffix of the companion key holding a counter's running total. It follows the key, so a
# `{hash-tag}` in the key also places the total in the same Redis Cluster slot.
TOTAL_SUFFIX = ":t"

# Errors that mean "the store did not answer": all become StoreUnavailable (fail closed).
STORE_ERRORS = (RedisError, ReplyError, hiredis.ProtocolError, OSError, TimeoutError)

# Query options of our own, taken out of the URL before redis-py reads the rest.
_OWN_OPTIONS = ("wait_replicas", "sentinel_username", "sentinel_password")

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379


class RedisStore:
    """Counter store shared by every replica through one Redis, or one behind Sentinel.

    Every call is bounded by ``timeout_s`` and any failure surfaces as
    :class:`StoreUnavailable`. Nothing is retried: an ``EVALSHA`` that timed out may still
    have run, so a retry could charge twice. A broken or timed-out connection is dropped and
    the next call opens a new one, so the store recovers by itself once Redis is back. All
    checks share one pipelined connection (:mod:`authz.store.connection`).

    With ``wait_replicas`` N > 0, an allowed check (and any approval change) is only
    reported once N replicas hold its record (``WAIT`` right behind the script, in the same
    round trip). Redis replicates asynchronously, so without it a failover can drop the last
    few records and let a later call through over its limit; with it, a record the master
    could not replicate (e.g. an old master that Sentinel has already replaced) is a 503,
    and the connection is reopened so the next call asks Sentinel where the master is now.
    """

    def __init__(
        self,
        connection: PipelinedConnection,
        timeout_s: float,
        wait_replicas: int = 0,
        sentinel: Sentinel | None = None,
    ) -> None:
        self._connection = connection
        self._sentinel = sentinel
        self._wait_replicas = wait_replicas
        # Sent right behind the script when replicas must hold the record. WAIT must give up
        # before the call's own timeout, to report why it failed, even when a NOSCRIPT reply
        # makes the call run twice.
        wait_ms = max(1, int(timeout_s * 1000 / 3))
        self._wait: list[list[Arg]] = [["WAIT", wait_replicas, wait_ms]] if wait_replicas else []
        self._nonces = Nonces()

    async def acquire(self, charges: Sequence[Charge], now_ms: int | None = None) -> Outcome:
        """Check and record ``charges`` atomically in one ``EVALSHA`` (none when empty)."""
        if not charges:
            return Outcome(allowed=True, remaining=())
        keys, args = script_call(charges, now_ms, self._nonces.next())
        replies = await self._run("acquire", WINDOW, keys, args)
        if self._wait_replicas and int(replies[0][0]) == 1:
            self._replicated("acquire", replies[1])
        return outcome_of(replies[0])

    async def script(
        self, operation: str, script: Script, keys: Sequence[str], args: Sequence[Arg]
    ) -> Any:
        """Run ``script`` and return its reply; with ``wait_replicas``, only once that many
        replicas hold what it wrote."""
        replies = await self._run(operation, script, keys, args)
        if self._wait_replicas:
            self._replicated(operation, replies[1])
        return replies[0]

    async def command(self, operation: str, *command: Arg) -> Any:
        """Run one command and return its reply."""
        try:
            (reply,) = await self._connection.execute(command)
        except STORE_ERRORS as exc:
            raise unavailable(operation, exc) from exc
        if isinstance(reply, ReplyError):
            raise unavailable(operation, reply)
        return reply

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless Redis answers ``PING`` in time."""
        await self.command("ping", "PING")

    async def record(self, key: str, ttl_ms: int) -> None:
        await record(self, key, ttl_ms)

    async def forget(self, key: str) -> None:
        await self.command("forget", "DEL", key)

    async def recorded(self, keys: Sequence[str]) -> tuple[bool, ...]:
        return await recorded(self, keys)

    def approval_book(self) -> ApprovalBook:
        """Approvals in this Redis, on this store's connection."""
        return RedisApprovals(self)

    async def _run(
        self, operation: str, script: Script, keys: Sequence[str], args: Sequence[Arg]
    ) -> list[Any]:
        """``EVALSHA`` (then ``WAIT`` when replicas must hold its writes) in one round trip,
        loading the script first if Redis does not know it."""
        commands = [["EVALSHA", script.sha, len(keys), *keys, *args], *self._wait]
        try:
            replies = await self._connection.execute(*commands)
            if _noscript(replies[0]):
                # Nothing ran (Redis restarted or failed over): load the script, run again.
                await self._connection.execute(script.load)
                replies = await self._connection.execute(*commands)
            for reply in replies:
                if isinstance(reply, ReplyError):
                    if str(reply).startswith("READONLY"):  # a replica now: find the master
                        self._connection.reset()
                    raise reply
        except STORE_ERRORS as exc:
            raise unavailable(operation, exc) from exc
        return replies

    def _replicated(self, operation: str, acked: Any) -> None:
        """Raise :class:`StoreUnavailable` unless ``WAIT`` saw enough replicas in time."""
        if int(acked) < self._wait_replicas:
            self._connection.reset()  # the next call asks Sentinel again
            raise StoreUnavailable(
                f"redis {operation}: recorded on {acked} of {self._wait_replicas} replicas in time"
            )

    async def close(self) -> None:
        """Close the connection (and those to the sentinels)."""
        await self._connection.close()
        if self._sentinel is not None:
            await self._sentinel.aclose()


def _noscript(reply: Any) -> bool:
    return isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT")


class Nonces:
    """Unique sorted-set members across calls and replicas.

    Random per store, counted per call: two replicas recording in the same millisecond never
    write the same member (which would merge their entries).
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._calls = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._calls):x}"


class Commands(Protocol):
    """One command through a Redis store (single, Sentinel or Cluster), bounded by its
    timeout, every failure raised as :class:`StoreUnavailable`."""

    async def command(self, operation: str, *command: Arg) -> Any: ...


async def record(redis: Commands, key: str, ttl_ms: int) -> None:
    """A record holds its own time to live, which ``window.lua`` renews on each use."""
    await redis.command("record", "SET", key, ttl_ms, "PX", ttl_ms)


async def recorded(redis: Commands, keys: Sequence[str]) -> tuple[bool, ...]:
    """One ``MGET`` (the keys of one grant share a slot)."""
    if not keys:
        return ()
    values = await redis.command("lookup", "MGET", *keys)
    return tuple(value is not None for value in values)


def script_call(
    charges: Sequence[Charge], now_ms: int | None, nonce: str
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of ``window.lua`` (and ``rollback.lua``) for ``charges``."""
    keys: list[str] = []
    args: list[str | int] = ["" if now_ms is None else now_ms, nonce]
    for charge in charges:
        keys += (charge.key, charge.key + TOTAL_SUFFIX)
        if charge.session is not None and charge.fallback is not None:
            keys += (charge.session, charge.fallback, charge.fallback + TOTAL_SUFFIX)
            args += (charge.window_ms, charge.max, charge.cost, 1)
        else:
            args += (charge.window_ms, charge.max, charge.cost, 0)
    return keys, args


def outcome_of(reply: Sequence[Any]) -> Outcome:
    """Read ``window.lua``'s flat reply."""
    allowed, refused, retry_after_ms, *remaining = (int(value) for value in reply)
    if allowed:
        return Outcome(allowed=True, remaining=tuple(remaining))
    return Outcome(
        allowed=False,
        remaining=tuple(remaining),
        refused=refused,
        retry_after_ms=retry_after_ms,
    )


def unavailable(operation: str, exc: BaseException) -> StoreUnavailable:
    """Name the failure without echoing the call's arguments."""
    if isinstance(exc, TimeoutError):
        return StoreUnavailable(f"redis {operation}: timed out")
    detail = next(iter(str(exc).splitlines()), "")[:200]
    return StoreUnavailable(f"redis {operation}: {type(exc).__name__} {detail}".rstrip())


@dataclass(frozen=True)
class MultiHostUrl:
    """A ``redis+sentinel://`` or ``redis+cluster://`` URL, read.

    ``hosts`` are the sentinels (Sentinel) or the startup nodes (Cluster); ``path`` the
    non-empty path segments (Sentinel: the service name, then optionally the db number);
    ``connection`` the keyword arguments redis-py's own URL parser makes of the credentials
    and query options (``ssl=True`` for the ``rediss+`` schemes); ``own`` our options.
    """

    hosts: tuple[tuple[str, int], ...]
    path: tuple[str, ...]
    connection: dict[str, Any]
    own: dict[str, str]


def parse_multi_host_url(url: str, default_port: int) -> MultiHostUrl:
    """Read ``scheme://[user:password@]host[:port][,host[:port]...][/path][?options]``."""
    bare, own = _take_own_options(url)
    parts = urlsplit(bare)
    userinfo, _, host_list = parts.netloc.rpartition("@")
    hosts = tuple(_host_port(item, default_port) for item in host_list.split(","))
    tls = parts.scheme.startswith("rediss")
    # redis-py's parser turns the credentials and query options into connection arguments
    # (typed as its from_url would); the host it sees is a placeholder.
    netloc = f"{userinfo}@localhost" if userinfo else "localhost"
    connection: dict[str, Any] = dict(
        parse_url(urlunsplit(("rediss" if tls else "redis", netloc, "", parts.query, "")))
    )
    for placeholder in ("host", "port", "connection_class"):
        connection.pop(placeholder, None)
    if tls:
        connection["ssl"] = True
    path = tuple(unquote(segment) for segment in parts.path.split("/") if segment)
    return MultiHostUrl(hosts=hosts, path=path, connection=connection, own=own)


def _take_own_options(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    own = {name: value for name, value in query if name in _OWN_OPTIONS}
    rest = urlencode([(name, value) for name, value in query if name not in _OWN_OPTIONS])
    return urlunsplit(parts._replace(query=rest)), own


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    if not item:
        raise ValueError("store URL: empty host")
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = item.partition(":")
    if not host:
        raise ValueError(f"store URL: no host in {item!r}")
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise ValueError(f"store URL: bad port in {item!r}") from None


def _wait_replicas(own: dict[str, str]) -> int:
    value = own.get("wait_replicas", "0")
    if not value.isdigit():
        raise ValueError(f"store URL: wait_replicas must be a whole number, not {value!r}")
    return int(value)


def open_redis(url: str, timeout_s: float) -> RedisStore:
    """A store on one Redis: ``redis://``, ``rediss://`` or ``unix://``."""
    bare, own = _take_own_options(url)
    endpoint = endpoint_of(dict(parse_url(bare)))
    return RedisStore(
        PipelinedConnection(endpoint, timeout_s, on_connect=[WINDOW.load]),
        timeout_s,
        wait_replicas=_wait_replicas(own),
    )


def open_sentinel(url: str, timeout_s: float) -> RedisStore:
    """A store on the master that Sentinel names.

    ``redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db][?options]``
    (``rediss+sentinel://`` for TLS to the sentinels and the Redis servers alike). The
    credentials are the Redis servers'; ``sentinel_username`` / ``sentinel_password`` are the
    sentinels' own, if they need any. The master's address is asked of the sentinels each
    time a connection opens, so after a failover new connections reach the new master.
    """
    parsed = parse_multi_host_url(url, DEFAULT_SENTINEL_PORT)
    if not parsed.path or len(parsed.path) > 2:
        raise ValueError("redis+sentinel:// URL needs /service_name[/db] after the hosts")
    connection = dict(parsed.connection)
    if len(parsed.path) == 2:
        connection["db"] = int(parsed.path[1])
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
        **{name: value for name, value in connection.items() if name.startswith("ssl")},
    }
    if sentinel_kwargs.pop("ssl", False):
        sentinel_kwargs["connection_class"] = SSLConnection
    for option in ("username", "password"):
        if f"sentinel_{option}" in parsed.own:
            sentinel_kwargs[option] = parsed.own[f"sentinel_{option}"]
    sentinel = Sentinel(list(parsed.hosts), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    service = parsed.path[0]

    async def master() -> tuple[str, int]:
        host, port = await sentinel.discover_master(service)
        return str(host), int(port)

    return RedisStore(
        PipelinedConnection(
            endpoint_of(connection, address=master), timeout_s, on_connect=[WINDOW.load]
        ),
        timeout_s,
        wait_replicas=_wait_replicas(parsed.own),
        sentinel=sentinel,
    )
