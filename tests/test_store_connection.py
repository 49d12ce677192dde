"""The pipelined Redis connection under the counter store, against a real redis-server.

What the store's exactness rests on: every caller gets its own reply however many share
the connection, a caller that gave up before its command was written never has it run,
a stalled or lost connection is replaced by itself, and credentials and the database
number from the URL are used.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from authz.store import Charge, StoreUnavailable, open_store
from authz.store.connection import PipelinedConnection, endpoint_of
from devstack.redis_server import RedisServer, free_port

PASSWORD = "s3cret-for-tests"


def _connection(server: RedisServer, timeout_s: float = 1.0) -> PipelinedConnection:
    return PipelinedConnection(
        endpoint_of({"host": "127.0.0.1", "port": server.port}), timeout_s=timeout_s
    )


async def test_every_caller_gets_its_own_reply(redis_server: RedisServer) -> None:
    connection = _connection(redis_server)
    try:
        replies = await asyncio.gather(
            *(connection.execute(["ECHO", f"caller-{i}"], ["INCR", "shared"]) for i in range(500))
        )
    finally:
        await connection.close()
    assert [echo for echo, _ in replies] == [f"caller-{i}".encode() for i in range(500)]
    assert sorted(count for _, count in replies) == list(range(1, 501))
    with redis_server.client() as client:
        assert int(client.get("shared")) == 500


async def test_all_callers_share_one_connection(redis_server: RedisServer) -> None:
    with redis_server.client() as client:
        before = len(client.client_list())
        connection = _connection(redis_server)
        try:
            await asyncio.gather(*(connection.execute(["PING"]) for _ in range(200)))
            during = len(client.client_list())
        finally:
            await connection.close()
    assert during == before + 1


async def test_a_command_whose_caller_gave_up_before_it_was_written_never_runs(
    redis_server: RedisServer,
) -> None:
    connection = _connection(redis_server)
    try:
        await connection.execute(["PING"])  # connected: the next call only queues and waits
        gave_up = asyncio.create_task(connection.execute(["INCR", "abandoned"]))
        await asyncio.sleep(0)  # the command is queued for this iteration's write
        gave_up.cancel()  # as gRPC cancels a check whose caller went away
        with pytest.raises(asyncio.CancelledError):
            await gave_up
        assert await connection.execute(["EXISTS", "abandoned"]) == [0]
    finally:
        await connection.close()


async def test_a_stalled_server_times_out_and_the_next_call_reconnects(
    redis_server: RedisServer,
) -> None:
    connection = _connection(redis_server, timeout_s=0.2)
    try:
        assert await connection.execute(["ECHO", "before"]) == [b"before"]
        redis_server.pause()
        try:
            with pytest.raises(TimeoutError):
                await connection.execute(["ECHO", "stalled"])
        finally:
            redis_server.resume()
        # The stalled reply arrives on the dropped connection, never to this caller.
        assert await connection.execute(["ECHO", "after"]) == [b"after"]
    finally:
        await connection.close()


async def test_a_lost_server_fails_the_calls_and_a_restarted_one_is_used(
    redis_server: RedisServer,
) -> None:
    connection = _connection(redis_server, timeout_s=0.5)
    try:
        assert await connection.execute(["PING"]) == [b"PONG"]
        redis_server.stop()
        with pytest.raises((ConnectionError, OSError, TimeoutError)):
            await connection.execute(["PING"])
        redis_server.start()
        assert await connection.execute(["PING"]) == [b"PONG"]
    finally:
        await connection.close()


@pytest.fixture
def password_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server that needs a password, with four databases."""
    server = RedisServer(
        port=free_port(), directory=tmp_path, password=PASSWORD, extra=("--databases", "4")
    )
    server.start()
    try:
        yield server
    finally:
        server.terminate()


async def test_url_credentials_and_database_are_used(password_server: RedisServer) -> None:
    port = password_server.port
    store = open_store(f"redis://:{PASSWORD}@127.0.0.1:{port}/3", timeout_s=1.0)
    try:
        outcome = await store.acquire([Charge(key="mcpauthz:{g:a}:c", window_ms=60_000, max=5)])
    finally:
        await store.close()
    assert outcome.allowed and outcome.remaining == (4,)
    with redis.Redis(port=port, password=PASSWORD, db=3) as db3:
        assert db3.exists("mcpauthz:{g:a}:c") == 1
    with redis.Redis(port=port, password=PASSWORD, db=0) as db0:
        assert db0.exists("mcpauthz:{g:a}:c") == 0

    wrong = open_store(f"redis://:wrong@127.0.0.1:{port}", timeout_s=1.0)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await wrong.ping()
    finally:
        await wrong.close()
    assert "WRONGPASS" in str(info.value) or "invalid password" in str(info.value)
    assert "wrong" not in str(info.value).replace("WRONGPASS", "")  # no secret echoed


async def test_a_failed_call_reports_its_failure_once(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A call of two commands (the script and WAIT) that fails raises once; the second
    command's failure is not left to be logged as "never retrieved"."""
    connection = _connection(redis_server, timeout_s=0.5)
    try:
        assert await connection.execute(["PING"]) == [b"PONG"]
        redis_server.pause()
        try:
            with pytest.raises(TimeoutError):
                await connection.execute(["PING"], ["PING"])
        finally:
            redis_server.resume()
        redis_server.stop()
        with pytest.raises((ConnectionError, OSError, TimeoutError)):
            await connection.execute(["PING"], ["PING"])
        redis_server.start()
    finally:
        await connection.close()
    await asyncio.sleep(0.01)
    gc.collect()
    assert "never retrieved" not in caplog.text


async def test_the_script_is_loaded_on_connect_and_reloaded_after_a_flush(
    redis_server: RedisServer,
) -> None:
    """The first check after a connect finds the script (no NOSCRIPT round trip); a script
    cache emptied under a live connection (SCRIPT FLUSH) costs one NOSCRIPT, then works."""
    store = open_store(redis_server.url, timeout_s=1.0)
    limit = Charge(key="mcpauthz:{g:a}:c", window_ms=60_000, max=5)

    def noscript_errors() -> int:
        with redis_server.client() as client:
            stats = client.info("errorstats")
        return int(stats.get("errorstat_NOSCRIPT", {}).get("count", 0))

    try:
        assert (await store.acquire([limit])).remaining == (4,)
        assert noscript_errors() == 0
        with redis_server.client() as client:
            client.script_flush()
        assert (await store.acquire([limit])).remaining == (3,)
        assert noscript_errors() == 1
    finally:
        await store.close()
