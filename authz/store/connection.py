"""One pipelined Redis connection: the counter store's hot path.

Written by hand because no library fits the hot path: redis-py's asyncio client costs about
250 µs of CPU per ``EVALSHA`` on the benchmark machine (a pool checkout, a timeout and a
retry wrapper around every command, per-argument encoders), more than the rest of a check.
Redis answers the commands of one connection in order, so a single connection carries
every concurrent check: commands sent during one event-loop iteration go out in one write
(auto-pipelining) and replies are handed back to their callers in order. What stays
borrowed: hiredis (the C reply parser and command packer redis-py uses too), redis-py's
URL parsing and TLS settings (``redis.asyncio.connection.parse_url``, ``SSLConnection``),
and redis-py's Sentinel client to ask where the master is.

Failure handling is the store's contract: every call is bounded by the store timeout; a
call that times out drops the connection (its reply may never come, and every reply after
it would be matched to the wrong caller otherwise) and the next call opens a new one, so the
store recovers by itself once Redis answers again; a command whose caller has already given
up before it was written is never written (it would spend budget for a denied call).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any, cast

import hiredis
from redis.asyncio.connection import SSLConnection

# An argument of a Redis command, as hiredis packs it.
Arg = str | bytes | int | float
Address = Callable[[], Awaitable[tuple[str, int]]]


@dataclass(frozen=True)
class Script:
    """A Lua script of this package as Redis knows it: its text and its SHA-1 id."""

    text: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        sha = hashlib.sha1(self.text.encode()).hexdigest()  # noqa: S324 (Redis's script id)
        object.__setattr__(self, "sha", sha)

    @classmethod
    def named(cls, name: str) -> Script:
        """The script in ``authz/store/<name>``."""
        return cls(files("authz.store").joinpath(name).read_text(encoding="utf-8"))

    @property
    def load(self) -> list[Arg]:
        """The ``SCRIPT LOAD`` command that makes Redis know it."""
        return ["SCRIPT", "LOAD", self.text]


class ReplyError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``, ``-READONLY ...``)."""


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect: a TCP ``address`` (asked anew for every connection, so a
    Sentinel failover is followed) or a Unix socket ``path``; TLS; credentials; database."""

    address: Address | None = None
    path: str | None = None
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0


def endpoint_of(options: dict[str, Any], address: Address | None = None) -> Endpoint:
    """An :class:`Endpoint` from redis-py's connection keyword arguments (what its URL
    parser makes of ``redis://``, ``rediss://`` and ``unix://`` URLs), so TLS options mean
    exactly what they mean to redis-py. ``address`` overrides ``host``/``port``."""
    tls = None
    if options.get("connection_class") is SSLConnection or options.get("ssl"):
        ssl_options = {k: v for k, v in options.items() if k.startswith("ssl_")}
        tls = SSLConnection(**ssl_options).ssl_context.get()
    path = options.get("path")
    if address is None and path is None:
        host, port = str(options.get("host", "localhost")), int(options.get("port", 6379))

        async def fixed() -> tuple[str, int]:
            return host, port

        address = fixed
    return Endpoint(
        address=None if path else address,
        path=path,
        tls=tls,
        server_hostname=str(options["host"]) if tls and "host" in options else None,
        username=options.get("username"),
        password=options.get("password"),
        db=int(options.get("db") or 0),
    )


class _Wire(asyncio.Protocol):
    """The protocol of one open connection: writes batched per loop iteration, replies
    matched to futures in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._reader = hiredis.Reader(replyError=ReplyError)
        self._transport: asyncio.Transport | None = None
        self._sent: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._unsent: list[tuple[bytes, list[asyncio.Future[Any]]]] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but has its methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._next_reply()) is not False:
            if not self._sent:  # a reply nobody asked for: the stream is out of step
                self.abort()
                return
            future = self._sent.popleft()
            if not future.done():
                future.set_result(reply)

    def _next_reply(self) -> Any:
        try:
            return self._reader.gets()
        except hiredis.ProtocolError:  # not Redis speaking: nothing after this can be read
            self.abort()
            return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        error = ConnectionError("connection to Redis lost")
        for future in self._sent:
            if not future.done():
                future.set_exception(error)
        self._sent.clear()
        for _, futures in self._unsent:
            for future in futures:
                if not future.done():
                    future.set_exception(error)
        self._unsent.clear()

    def send(self, commands: Sequence[Sequence[Arg]]) -> list[asyncio.Future[Any]]:
        """Queue ``commands``; they are written together with every other command queued
        in this loop iteration."""
        futures = [self._loop.create_future() for _ in commands]
        if self.lost:
            for future in futures:
                future.set_exception(ConnectionError("connection to Redis lost"))
            return futures
        if not self._unsent:
            self._loop.call_soon(self._flush)
        # hiredis's type stub declares a 1-tuple; it packs any number of arguments.
        payload = b"".join(hiredis.pack_command(tuple(c)) for c in commands)  # type: ignore[arg-type]
        self._unsent.append((payload, futures))
        return futures

    def _flush(self) -> None:
        if self.lost or self._transport is None:
            return
        payload = []
        for data, futures in self._unsent:
            if any(future.done() for future in futures):
                continue  # its caller gave up: never run it behind their back
            payload.append(data)
            self._sent.extend(futures)
        self._unsent.clear()
        if payload:
            self._transport.write(b"".join(payload))

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()  # connection_lost fails whatever is still waiting
        self.lost = True


class PipelinedConnection:
    """Commands to one Redis over one connection, opened on first use and reopened after
    any failure. Every :meth:`execute` is bounded by ``timeout_s``, connecting included."""

    def __init__(
        self, endpoint: Endpoint, timeout_s: float, on_connect: Sequence[Sequence[Arg]] = ()
    ) -> None:
        self._endpoint = endpoint
        self._timeout_s = timeout_s
        # Sent on every new connection after AUTH and SELECT (the store loads its script,
        # so the first check after a (re)connect needs no NOSCRIPT round trip).
        self._on_connect = [list(command) for command in on_connect]
        self._wire: _Wire | None = None
        self._opening: asyncio.Task[_Wire] | None = None

    async def execute(self, *commands: Sequence[Arg]) -> list[Any]:
        """Send ``commands`` back to back and return their replies (an error reply is
        returned as a :class:`ReplyError` value, not raised). Raises ``TimeoutError`` or
        ``OSError`` (``ConnectionError``) when Redis does not answer in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        wire = self._wire
        if wire is None or wire.lost:
            wire = await self._open(deadline)
        futures = wire.send(commands)
        timer = loop.call_at(deadline, _expire, wire, futures)
        try:
            return await _replies(futures)
        finally:
            timer.cancel()

    def reset(self) -> None:
        """Drop the connection (the next call opens a new one, asking Sentinel anew)."""
        if self._wire is not None:
            self._wire.abort()
            self._wire = None

    async def _open(self, deadline: float) -> _Wire:
        # Concurrent callers share one attempt; each waits for it only until its deadline.
        if self._opening is None or self._opening.done():
            self._opening = asyncio.create_task(self._connect())
            # Retrieved even when every caller has given up before it ended.
            self._opening.add_done_callback(lambda task: task.cancelled() or task.exception())
        async with asyncio.timeout_at(deadline):
            wire = await asyncio.shield(self._opening)
        if asyncio.get_running_loop().time() >= deadline:
            raise TimeoutError  # no time left to send: the deadline would drop the new wire
        return wire

    async def _connect(self) -> _Wire:
        """Connect, authenticate and select the database, within the store timeout."""
        loop = asyncio.get_running_loop()
        end = self._endpoint
        wire: _Wire | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                if end.path is not None:
                    _, wire = await loop.create_unix_connection(lambda: _Wire(loop), end.path)
                else:
                    assert end.address is not None
                    host, port = await end.address()
                    _, wire = await loop.create_connection(
                        lambda: _Wire(loop),
                        host,
                        port,
                        ssl=end.tls,
                        server_hostname=(end.server_hostname or host) if end.tls else None,
                    )
                hello: list[list[Arg]] = []
                if end.password is not None:
                    credentials = (
                        [end.password] if end.username is None else [end.username, end.password]
                    )
                    hello.append(["AUTH", *credentials])
                if end.db:
                    hello.append(["SELECT", end.db])
                hello += self._on_connect
                for reply in await _replies(wire.send(hello)):
                    if isinstance(reply, ReplyError):
                        raise reply
        except BaseException:
            if wire is not None:
                wire.abort()
            raise
        self._wire = wire
        return wire

    async def close(self) -> None:
        self.reset()
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()


async def _replies(futures: list[asyncio.Future[Any]]) -> list[Any]:
    """Every reply, in order. On a failure the rest are given up: a reply that still comes
    is dropped, and a failure set on them later is not reported again."""
    try:
        return [await future for future in futures]
    finally:
        for future in futures:
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # marks it retrieved: the failure was raised once


def _expire(wire: _Wire, futures: list[asyncio.Future[Any]]) -> None:
    """The call's time is up: fail what is unanswered and drop the connection."""
    late = [future for future in futures if not future.done()]
    if not late:
        return
    for future in late:
        future.set_exception(TimeoutError())
    wire.abort()
