"""One contract for every counter store: the memory store and a real redis-server.

The tests drive the clock through ``now_ms`` so both stores see the same times; the Redis
ones also check what only Redis has (many processes, TTLs, round trips, outages).
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import pytest

from authz.store import Charge, CounterStore, Outcome, StoreUnavailable, open_store
from authz.store.memory import MemoryStore
from devstack.redis_server import RedisServer

REPO_ROOT = Path(__file__).resolve().parent.parent

# A minute boundary in Unix ms (a realistic magnitude, so the Lua side's number handling is
# exercised too) and a one-minute window.
T0 = 28_333_333 * 60_000
W = 60_000


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "memory":
        yield "memory://"
    else:
        server = cast(RedisServer, request.getfixturevalue("redis_server"))
        yield server.url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[CounterStore]:
    opened = open_store(store_url, timeout_s=1.0)
    yield opened
    await opened.close()


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[CounterStore]:
    opened = open_store(redis_server.url, timeout_s=1.0)
    yield opened
    await opened.close()


def charge(key: str, max_: int, cost: int = 1, window_ms: int = W) -> Charge:
    """A charge on ``key`` with every key in one `{hash-tag}`, as the engine builds them."""
    return Charge(key="{grant-1}:" + key, window_ms=window_ms, max=max_, cost=cost)


async def one(store: CounterStore, c: Charge, now_ms: int) -> Outcome:
    return await store.acquire([c], now_ms=now_ms)


# --- behaviour shared by both stores ---------------------------------------------------------


async def test_empty_charge_list_is_allowed(store: CounterStore) -> None:
    assert await store.acquire([], now_ms=T0) == Outcome(allowed=True, remaining=())


async def test_exact_count_and_remaining(store: CounterStore) -> None:
    c = charge("calls", 10)
    for i in range(10):
        outcome = await one(store, c, T0 + i)
        assert outcome == Outcome(allowed=True, remaining=(9 - i,))
    refused = await one(store, c, T0 + 10)
    # The oldest entry (at T0) frees the first unit, W - 10 ms from now.
    assert refused == Outcome(allowed=False, remaining=(0,), refused=0, retry_after_ms=W - 10)


async def test_window_slides_one_entry_at_a_time(store: CounterStore) -> None:
    c = charge("calls", 10)
    for i in range(10):
        assert (await one(store, c, T0 + i * 1000)).allowed
    edge = await one(store, c, T0 + W - 1)
    assert not edge.allowed
    assert edge.retry_after_ms == 1
    # At exactly T0 + W the entry at T0 has expired: one more fits, and only one.
    assert await one(store, c, T0 + W) == Outcome(allowed=True, remaining=(0,))
    again = await one(store, c, T0 + W)
    assert not again.allowed
    assert again.retry_after_ms == 1000


async def test_no_double_burst_across_a_minute_boundary(store: CounterStore) -> None:
    c = charge("calls", 10)
    end_of_minute = [await one(store, c, T0 + 59_500 + i) for i in range(10)]
    start_of_next = [await one(store, c, T0 + W + i * 50) for i in range(10)]
    # A fixed bucket would allow 10 + 10 here; the sliding window allows 10 in total.
    assert sum(o.allowed for o in end_of_minute) == 10
    assert sum(o.allowed for o in start_of_next) == 0
    assert start_of_next[0].retry_after_ms == 59_500
    # Exactly one window after the burst, the first of its entries has expired.
    assert not (await one(store, c, T0 + 59_500 + W - 1)).allowed
    assert (await one(store, c, T0 + 59_500 + W)).allowed


async def test_retry_after_is_when_enough_oldest_entries_expire(store: CounterStore) -> None:
    c = {cost: charge("tokens", 10, cost) for cost in (3, 4, 5)}
    assert (await one(store, c[3], T0)).allowed
    assert (await one(store, c[3], T0 + 100)).allowed
    assert (await one(store, c[4], T0 + 200)).allowed
    # Cost 5 needs 5 units freed: the entry at T0 frees 3, the one at T0 + 100 frees 6.
    refused = await one(store, c[5], T0 + 300)
    assert refused == Outcome(
        allowed=False, remaining=(0,), refused=0, retry_after_ms=T0 + 100 + W - (T0 + 300)
    )
    retry_at = T0 + 300 + refused.retry_after_ms
    assert not (await one(store, c[5], retry_at - 1)).allowed
    assert await one(store, c[5], retry_at) == Outcome(allowed=True, remaining=(1,))


async def test_cost_above_max_is_refused_for_a_whole_window(store: CounterStore) -> None:
    outcome = await one(store, charge("tokens", 10, cost=11), T0)
    assert outcome == Outcome(allowed=False, remaining=(10,), refused=0, retry_after_ms=W)
    # ...and it spent nothing.
    assert await one(store, charge("tokens", 10, cost=10), T0) == Outcome(True, (0,))


async def test_costs_count_against_the_budget(store: CounterStore) -> None:
    c = charge("tokens", 12, cost=5)
    assert await one(store, c, T0) == Outcome(allowed=True, remaining=(7,))
    assert await one(store, c, T0 + 10) == Outcome(allowed=True, remaining=(2,))
    third = await one(store, c, T0 + 20)
    assert third == Outcome(allowed=False, remaining=(2,), refused=0, retry_after_ms=W - 20)
    assert (await one(store, c, T0 + W)).allowed


async def test_denied_call_records_nothing_on_any_charge(store: CounterStore) -> None:
    assert (await one(store, charge("b", 2, cost=2), T0)).allowed
    denied = await store.acquire([charge("a", 10), charge("b", 2), charge("c", 5)], now_ms=T0 + 1)
    # Refused at the second charge; the third was never checked.
    assert denied == Outcome(allowed=False, remaining=(10, 0), refused=1, retry_after_ms=W - 1)
    # Nothing was recorded on "a": its whole budget is still there.
    assert await one(store, charge("a", 10, cost=10), T0 + 2) == Outcome(True, (0,))


async def test_all_charges_recorded_when_allowed(store: CounterStore) -> None:
    both = [charge("a", 3), charge("b", 5, cost=2)]
    assert await store.acquire(both, now_ms=T0) == Outcome(allowed=True, remaining=(2, 3))
    assert await store.acquire(both, now_ms=T0 + 1) == Outcome(allowed=True, remaining=(1, 1))
    third = await store.acquire(both, now_ms=T0 + 2)
    assert third == Outcome(allowed=False, remaining=(1, 1), refused=1, retry_after_ms=W - 2)


async def test_separate_calls_on_one_key_share_its_budget(store: CounterStore) -> None:
    shared = charge("shared", 3)
    assert (await store.acquire([charge("x", 9), shared], now_ms=T0)).allowed
    assert (await store.acquire([shared, charge("y", 9)], now_ms=T0 + 1)).allowed
    assert await one(store, shared, T0 + 2) == Outcome(allowed=True, remaining=(0,))
    refused = await store.acquire([charge("z", 9), shared], now_ms=T0 + 3)
    assert (refused.allowed, refused.refused, refused.remaining) == (False, 1, (9, 0))


async def test_keys_are_independent(store: CounterStore) -> None:
    assert (await one(store, charge("a", 1), T0)).allowed
    assert (await one(store, charge("b", 1), T0)).allowed
    assert not (await one(store, charge("a", 1), T0)).allowed


async def test_concurrent_acquires_never_overspend(store: CounterStore) -> None:
    c = charge("hot", 10)
    outcomes = await asyncio.gather(*(one(store, c, T0) for _ in range(200)))
    allowed = [o for o in outcomes if o.allowed]
    assert len(allowed) == 10
    assert sorted(o.remaining[0] for o in allowed) == list(range(10))


async def test_own_clock_when_now_is_omitted(store: CounterStore) -> None:
    c = charge("clock", 2)
    assert (await store.acquire([c])).allowed
    assert (await store.acquire([c])).allowed
    refused = await store.acquire([c])
    assert not refused.allowed
    assert 0 < refused.retry_after_ms <= W


async def test_matches_a_brute_force_model(store: CounterStore) -> None:
    """Random multi-charge traffic gives exactly the outcomes of a naive re-count."""
    rng = random.Random(20240601)
    limits = {"a": (5, 1_000), "b": (9, 2_500), "c": (3, 700)}
    log: dict[str, list[tuple[int, int]]] = {key: [] for key in limits}
    now = T0
    for _ in range(300):
        now += rng.choice((0, 1, 7, 50, 333))
        keys = rng.sample(sorted(limits), rng.randint(1, 3))
        costs = [rng.randint(1, 4) for _ in keys]
        charges = [
            charge(k, limits[k][0], cost, window_ms=limits[k][1])
            for k, cost in zip(keys, costs, strict=True)
        ]
        expected = _model(log, keys, costs, limits, now)
        assert await store.acquire(charges, now_ms=now) == expected
        if expected.allowed:
            for k, cost in zip(keys, costs, strict=True):
                log[k].append((now, cost))


def _model(
    log: dict[str, list[tuple[int, int]]],
    keys: list[str],
    costs: list[int],
    limits: dict[str, tuple[int, int]],
    now: int,
) -> Outcome:
    before: list[int] = []  # each charge's budget before this call
    for index, (key, cost) in enumerate(zip(keys, costs, strict=True)):
        max_, window = limits[key]
        live = sorted(e for e in log[key] if e[0] > now - window)
        used = sum(c for _, c in live)
        before.append(max_ - used)
        if used + cost > max_:
            if cost > max_:
                retry = window
            else:
                freed, retry = 0, window
                for ts, c in live:
                    freed += c
                    if freed >= used + cost - max_:
                        retry = ts + window - now
                        break
            return Outcome(False, tuple(before), refused=index, retry_after_ms=retry)
    return Outcome(True, tuple(b - cost for b, cost in zip(before, costs, strict=True)))


async def test_records_are_kept_until_forgotten(store: CounterStore) -> None:
    keys = ["{grant-1}:session:a", "{grant-1}:session:b", "{grant-1}:task:c"]
    assert await store.recorded(keys) == (False, False, False)
    await store.record(keys[0], 60_000)
    await store.record(keys[2], 60_000)
    assert await store.recorded(keys) == (True, False, True)
    await store.forget(keys[0])
    await store.forget(keys[1])  # none: no error
    assert await store.recorded(keys) == (False, False, True)
    assert await store.recorded([]) == ()


async def test_records_expire(store: CounterStore) -> None:
    await store.record("{grant-1}:task:short", 50)
    await asyncio.sleep(0.2)
    assert await store.recorded(["{grant-1}:task:short"]) == (False,)


def session_charge(max_: int, session: str = "s1") -> Charge:
    """A session-scoped charge: the session's counter, else the grant's."""
    return Charge(
        key="{grant-1}:s:" + session + ":calls",
        window_ms=W,
        max=max_,
        session="{grant-1}:session:" + session,
        fallback="{grant-1}:calls",
    )


async def test_a_session_charge_spends_the_grants_counter_unless_recorded(
    store: CounterStore,
) -> None:
    """An id the upstream never issued (no record) gains nothing: its charges go to the
    grant's counter, shared with every other unrecorded id and with requests without one."""
    grant = charge("calls", 2)
    assert await one(store, session_charge(2, "invented-1"), T0) == Outcome(True, (1,))
    assert await one(store, session_charge(2, "invented-2"), T0 + 1) == Outcome(True, (0,))
    refused = await one(store, grant, T0 + 2)
    assert not refused.allowed
    assert not (await one(store, session_charge(2, "invented-3"), T0 + 3)).allowed
    # A recorded session has a budget of its own, and another recorded session another.
    await store.record("{grant-1}:session:s1", 60_000)
    await store.record("{grant-1}:session:s2", 60_000)
    assert await one(store, session_charge(2, "s1"), T0 + 4) == Outcome(True, (1,))
    assert await one(store, session_charge(2, "s1"), T0 + 5) == Outcome(True, (0,))
    assert not (await one(store, session_charge(2, "s1"), T0 + 6)).allowed
    assert (await one(store, session_charge(2, "s2"), T0 + 7)).allowed
    # Once the session is dropped (DELETE), its id is as good as invented.
    await store.forget("{grant-1}:session:s2")
    assert not (await one(store, session_charge(2, "s2"), T0 + 8)).allowed


async def test_a_session_charge_beside_grant_charges_is_all_or_nothing(
    store: CounterStore,
) -> None:
    await store.record("{grant-1}:session:s1", 60_000)
    both = [charge("other", 1), session_charge(5, "s1")]
    assert (await store.acquire(both, now_ms=T0)).allowed
    refused = await store.acquire(both, now_ms=T0 + 1)
    assert refused.refused == 0
    # The refused request spent nothing on the session's counter.
    assert await one(store, session_charge(5, "s1"), T0 + 2) == Outcome(True, (3,))


# --- memory store only -------------------------------------------------------------------------


async def test_memory_store_drops_idle_keys() -> None:
    store = MemoryStore()
    for i in range(1_000):
        assert (await store.acquire([charge(f"k{i}", 1, window_ms=1_000)], now_ms=T0)).allowed
    hot = charge("hot", 100, window_ms=1_000)
    assert (await store.acquire([hot], now_ms=T0 + 500)).allowed
    # One window later every key but the one written since is gone...
    assert (await store.acquire([], now_ms=T0 + 1_000)).allowed
    assert set(store._logs) == {hot.key}
    # ...and once its window has passed too, the store is back to empty.
    await store.acquire([], now_ms=T0 + 1_500)
    assert store._logs == {}
    assert len(store._schedule) == 0


# --- redis store only --------------------------------------------------------------------------

_CHILD = """
import asyncio, sys
from authz.store import Charge, open_store

async def main() -> None:
    store = open_store(sys.argv[1], timeout_s=5.0)
    await store.ping()
    print("ready", flush=True)
    sys.stdin.readline()
    charge = Charge("{global}:calls", window_ms=60_000, max=50)
    outcomes = await asyncio.gather(*(store.acquire([charge]) for _ in range(100)))
    print(sum(o.allowed for o in outcomes), flush=True)
    await store.close()

asyncio.run(main())
"""


def test_redis_processes_share_one_budget(redis_server: RedisServer) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, redis_server.url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
            env=env,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        # Release both at once so their acquires interleave on the server.
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        allowed = [int(child.communicate(timeout=30)[0]) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert sum(allowed) == 50


async def test_redis_keys_expire_with_their_window(
    redis_store: CounterStore, redis_server: RedisServer
) -> None:
    c = charge("ttl", 5)
    assert (await redis_store.acquire([c])).allowed
    with redis_server.client() as client:
        for key in (c.key, c.key + ":t"):
            assert 0 < client.pttl(key) <= W
        short = charge("short", 5, window_ms=150)
        assert (await redis_store.acquire([short])).allowed
        assert client.exists(short.key, short.key + ":t") == 2
        time.sleep(0.3)
        # Idle keys vanish on their own, so Redis memory returns to its baseline.
        assert client.exists(short.key, short.key + ":t") == 0


async def test_redis_session_use_renews_its_record(
    redis_store: CounterStore, redis_server: RedisServer
) -> None:
    record = "{grant-1}:session:s1"
    await redis_store.record(record, 60_000)
    with redis_server.client() as client:
        assert client.get(record) == b"60000"
        client.pexpire(record, 1_000)
        assert (await one(redis_store, session_charge(5, "s1"), T0)).allowed
        assert client.pttl(record) > 1_000
        assert client.exists("{grant-1}:s:s1:calls") == 1
        assert client.exists("{grant-1}:calls") == 0


async def test_redis_acquire_is_one_round_trip(
    redis_store: CounterStore, redis_server: RedisServer
) -> None:
    charges = [charge("a", 5), charge("b", 5), charge("c", 5)]
    await redis_store.acquire(charges, now_ms=T0)  # warm-up: loads the script

    def evalsha_calls() -> int:
        with redis_server.client() as client:
            stats = client.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    before = evalsha_calls()
    await redis_store.acquire(charges, now_ms=T0 + 1)
    assert evalsha_calls() - before == 1
    await redis_store.acquire([], now_ms=T0 + 2)
    assert evalsha_calls() - before == 1


async def test_redis_resyncs_a_lost_total_or_set(
    redis_store: CounterStore, redis_server: RedisServer
) -> None:
    c = charge("resync", 4)
    for i in range(3):
        assert (await one(redis_store, c, T0 + i)).allowed
    with redis_server.client() as client:
        client.delete(c.key + ":t")  # as if evicted: the script recounts the set
    assert await one(redis_store, c, T0 + 3) == Outcome(allowed=True, remaining=(0,))
    assert not (await one(redis_store, c, T0 + 4)).allowed
    with redis_server.client() as client:
        client.delete(c.key)  # the entries are gone, so the stale total must not count
    assert await one(redis_store, c, T0 + 5) == Outcome(allowed=True, remaining=(3,))


async def test_redis_outage_fails_fast_and_recovers(redis_server: RedisServer) -> None:
    store = open_store(redis_server.url, timeout_s=0.2)
    c = charge("outage", 100)
    try:
        assert (await store.acquire([c])).allowed
        redis_server.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.acquire([c])
        with pytest.raises(StoreUnavailable):
            await store.ping()
        assert time.monotonic() - started < 1.0

        redis_server.start()  # same port, empty data, empty script cache
        deadline = time.monotonic() + 1.0
        while True:
            try:
                outcome = await store.acquire([c])
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "store did not recover within 1 s"
                await asyncio.sleep(0.05)
        assert outcome == Outcome(allowed=True, remaining=(99,))
        await store.ping()
    finally:
        await store.close()


async def test_redis_hung_server_times_out(redis_server: RedisServer) -> None:
    store = open_store(redis_server.url, timeout_s=0.1)
    c = charge("hung", 100)
    try:
        assert (await store.acquire([c])).allowed
        redis_server.pause()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="timed out"):
            await store.acquire([c])
        assert time.monotonic() - started < 1.0
        redis_server.resume()
        # The timed-out connection was dropped; the next call works on a fresh one.
        assert (await store.acquire([c])).allowed
    finally:
        redis_server.resume()
        await store.close()


async def test_redis_wait_replicas_refuses_what_no_replica_holds(
    redis_server: RedisServer,
) -> None:
    """With ``wait_replicas`` and no replica to copy the record, the check fails closed."""
    store = open_store(redis_server.url + "?wait_replicas=1", timeout_s=0.5)
    try:
        with pytest.raises(StoreUnavailable, match="recorded on 0 of 1 replicas"):
            await store.acquire([charge("waited", 5)])
        # A refusal records nothing new, so it needs no replica and is answered as usual.
        for _ in range(4):
            with pytest.raises(StoreUnavailable):
                await store.acquire([charge("waited", 5)])
        refused = await store.acquire([charge("waited", 5)])
        assert (refused.allowed, refused.remaining) == (False, (0,))
    finally:
        await store.close()


async def test_memory_store_drops_expired_records() -> None:
    store = MemoryStore()
    for i in range(100):
        await store.record(f"{{grant-1}}:task:{i}", 1)
    await asyncio.sleep(0.05)
    assert await store.recorded(["{grant-1}:task:0"]) == (False,)
    assert not store._records and not store._record_schedule
