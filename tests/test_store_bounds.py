"""Memory stays bounded with many grants: every counter key carries a TTL (Redis) or is
swept once its window has passed (memory store), so 100,000 distinct grants leave nothing
behind once their windows expire."""

from __future__ import annotations

import asyncio
import time

from authz.store import Charge, open_store
from authz.store.memory import MemoryStore
from devstack.redis_server import RedisServer, wait_until
from tests.support.reliability import record

GRANTS = 100_000
WINDOW_MS = 5_000


def charge(grant: int) -> Charge:
    return Charge(key=f"mcpauthz:{{g:b-{grant:024x}}}:exports", window_ms=WINDOW_MS, max=5)


async def test_redis_memory_returns_to_baseline_after_100k_grants(
    redis_server: RedisServer,
) -> None:
    per_call = 100  # grants charged per script call, to keep the test short
    with redis_server.client() as client:
        client.config_set("hz", 50)  # expire idle keys sooner; the TTLs are what is tested
        # Baseline: the script loaded and run once (its cache and Lua heap stay), no keys.
        warm_up = open_store(redis_server.url, timeout_s=10.0)
        await warm_up.acquire([charge(-1)])
        await warm_up.close()
        wait_until("the warm-up key to expire", lambda: client.dbsize() == 0)
        baseline = int(client.info("memory")["used_memory"])
        store = open_store(redis_server.url, timeout_s=10.0)
        started = time.monotonic()
        try:

            async def lane(first: int) -> int:
                allowed = 0
                for start in range(first * per_call, GRANTS, 8 * per_call):
                    grants = range(start, min(start + per_call, GRANTS))
                    if (await store.acquire([charge(g) for g in grants])).allowed:
                        allowed += len(grants)
                return allowed

            allowed = sum(await asyncio.gather(*(lane(n) for n in range(8))))
        finally:
            await store.close()
        loaded_s = time.monotonic() - started
        peak_keys = int(client.dbsize())
        peak = int(client.info("memory")["used_memory"])
        ttls = [client.pttl(charge(g).key) for g in (GRANTS - 1, GRANTS - 2)]
        wait_until("every counter key to expire", lambda: client.dbsize() == 0, timeout=30)
        drained_s = time.monotonic() - started - loaded_s

        def used_memory() -> int:
            return int(client.info("memory")["used_memory"])

        # Back to the baseline, give or take half a MiB of allocator and Lua heap noise
        # (the 100,000 grants' counters take over ten MiB at their peak); Redis shrinks
        # its emptied tables in the background.
        settled = wait_until(
            "used_memory to return to its baseline",
            lambda: used_memory() - baseline < 512 * 1024,
            timeout=15,
        )
        after = used_memory()
    assert allowed == GRANTS
    assert all(0 < ttl <= WINDOW_MS for ttl in ttls), ttls
    assert settled
    record(
        "Bounds: 100,000 distinct grants in Redis",
        "A rate-limited charge for each of 100,000 grants (window 5 s, 100 grants per "
        "script call) against a real redis-server; then wait for the windows to pass.",
        {
            "grants charged": allowed,
            "seconds to charge them": round(loaded_s, 1),
            "keys at the peak": peak_keys,
            "used_memory baseline (KiB)": baseline // 1024,
            "used_memory at the peak (KiB)": peak // 1024,
            "used_memory after the windows (KiB)": after // 1024,
            "seconds until every key had expired": round(drained_s, 1),
        },
    )


async def test_memory_store_forgets_100k_grants_after_their_windows() -> None:
    store = MemoryStore()
    t0 = 1_700_000_000_000
    for grant in range(GRANTS):
        assert (await store.acquire([charge(grant)], now_ms=t0 + grant % 500)).allowed
    peak = len(store._logs)
    # One window after the last call, the next check sweeps every expired log away.
    await store.acquire([], now_ms=t0 + 500 + WINDOW_MS)
    assert peak == GRANTS
    assert store._logs == {}
    assert store._schedule == []
    record(
        "Bounds: 100,000 distinct grants in the memory store",
        "One call for each of 100,000 grants (window 5 s, driven clock); then one check "
        "a window later.",
        {"counter logs at the peak": peak, "counter logs after the window": len(store._logs)},
    )
