"""The Redis Cluster store against a real three-master cluster on loopback.

What only a cluster has: a request's counters may live in several hash slots, so the store
reserves slot by slot and returns the reservations when a later slot refuses or fails. The
tests check the guarantee the store documents: never more than ``max`` per counter, a
refused call spends nothing, exact counts under concurrent load from several clients.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from authz.store import Charge, CounterStore, Outcome, StoreUnavailable, open_store
from devstack.redis_server import ClusterSetup, running_cluster
from tests.support.reliability import record

T0 = 28_333_333 * 60_000
W = 60_000
GLOBAL = "mcpauthz:{global}:exports_all"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as setup:
        yield setup


@pytest.fixture
async def store(cluster: ClusterSetup) -> AsyncIterator[CounterStore]:
    for node in cluster.nodes:
        with node.client() as client:
            client.flushall()
    opened = open_store(cluster.url, timeout_s=2.0)
    yield opened
    await opened.close()


def grant_key(grant: str, counter: str = "exports") -> str:
    return f"mcpauthz:{{g:{grant}}}:{counter}"


def grant_in_slot_order(before_global: bool, start: int = 0) -> str:
    """A grant whose key's slot sorts before (or after) the global key's slot."""
    global_slot = key_slot(GLOBAL.encode())
    for n in range(start, start + 10_000):
        slot = key_slot(grant_key(f"grant-{n}").encode())
        if (slot < global_slot) == before_global and slot != global_slot:
            return f"grant-{n}"
    raise LookupError("no grant found")


def counted(cluster: ClusterSetup, key: str) -> tuple[int, int]:
    """(entries in the sorted set, running total) of one counter, read from its node."""
    with cluster.node_for(key).client() as client:
        total = client.get(key + ":t")
        return int(client.zcard(key)), int(total or 0)


async def test_single_slot_request_is_one_round_trip(
    store: CounterStore, cluster: ClusterSetup
) -> None:
    charges = [Charge(grant_key("a", c), W, 5) for c in ("x", "y", "z")]
    await store.acquire(charges, now_ms=T0)  # loads the script on that node
    node = cluster.node_for(charges[0].key)

    def evalsha_calls() -> int:
        with node.client() as client:
            return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    before = evalsha_calls()
    assert await store.acquire(charges, now_ms=T0 + 1) == Outcome(True, (3, 3, 3))
    assert evalsha_calls() - before == 1


@pytest.mark.parametrize("grant_first", [True, False], ids=["grant-slot-first", "global-first"])
async def test_refusal_in_a_later_slot_returns_the_earlier_reservation(
    store: CounterStore, cluster: ClusterSetup, grant_first: bool
) -> None:
    grant = grant_in_slot_order(before_global=grant_first)
    per_grant = Charge(grant_key(grant), W, 5)
    overall = Charge(GLOBAL, W, 2)
    both = [per_grant, overall]
    assert await store.acquire(both, now_ms=T0) == Outcome(True, (4, 1))
    assert await store.acquire(both, now_ms=T0 + 1) == Outcome(True, (3, 0))
    refused = await store.acquire(both, now_ms=T0 + 2)
    assert (refused.allowed, refused.refused, refused.retry_after_ms) == (False, 1, W - 2)
    assert refused.remaining[1] == 0
    # The grant's counter holds the two allowed calls only, whichever slot went first.
    assert counted(cluster, per_grant.key) == (2, 2)
    assert counted(cluster, GLOBAL) == (2, 2)
    # Its remaining budget is intact: three more fit on the grant alone.
    for left in (2, 1, 0):
        assert await store.acquire([per_grant], now_ms=T0 + 3) == Outcome(True, (left,))


@pytest.mark.parametrize("recorded", [True, False], ids=["issued-session", "invented-session"])
@pytest.mark.parametrize("grant_first", [True, False], ids=["grant-slot-first", "global-first"])
async def test_a_session_charge_refused_in_another_slot_is_returned(
    store: CounterStore, cluster: ClusterSetup, grant_first: bool, recorded: bool
) -> None:
    """A session charge and a global one: the session's record, its counter and the
    grant's fallback share the grant's slot; a refusal by the global slot returns the
    session slot's reservation from whichever key it spent (rollback.lua tries both)."""
    grant = grant_in_slot_order(before_global=grant_first)
    prefix = f"mcpauthz:{{g:{grant}}}:"
    session = Charge(
        prefix + "s:abc:per_session",
        W,
        5,
        session=prefix + "session:abc",
        fallback=prefix + "per_session",
    )
    if recorded:
        await store.record(prefix + "session:abc", 60_000)
    assert await store.recorded([prefix + "session:abc"]) == (recorded,)
    spent = session.key if recorded else prefix + "per_session"
    unspent = prefix + "per_session" if recorded else session.key
    both = [session, Charge(GLOBAL, W, 1)]
    assert (await store.acquire(both, now_ms=T0)).allowed
    refused = await store.acquire(both, now_ms=T0 + 1)
    assert (refused.allowed, refused.refused) == (False, 1)
    assert counted(cluster, spent) == (1, 1)
    assert counted(cluster, unspent) == (0, 0)


async def test_cross_slot_traffic_matches_a_brute_force_model(
    store: CounterStore, cluster: ClusterSetup
) -> None:
    """Random sequential requests over three slots: every answer and every count is what
    a naive re-count says, so reservations are returned exactly."""
    rng = random.Random(7)
    limits = {
        grant_key("m1"): (5, 1_000),
        GLOBAL: (9, 2_500),
        grant_key("m2", "other"): (3, 700),
    }
    log: dict[str, list[tuple[int, int]]] = {key: [] for key in limits}
    now = T0
    for _ in range(200):
        now += rng.choice((0, 1, 7, 50, 333))
        keys = rng.sample(sorted(limits), rng.randint(1, 3))
        costs = [rng.randint(1, 4) for _ in keys]
        charges = [
            Charge(k, limits[k][1], limits[k][0], cost) for k, cost in zip(keys, costs, strict=True)
        ]
        expected = _model(log, keys, costs, limits, now)
        got = await store.acquire(charges, now_ms=now)
        assert (got.allowed, got.refused, got.retry_after_ms) == (
            expected.allowed,
            expected.refused,
            expected.retry_after_ms,
        )
        if got.allowed:
            assert got.remaining == expected.remaining
            for k, cost in zip(keys, costs, strict=True):
                log[k].append((now, cost))
        else:
            assert got.refused is not None
            assert got.remaining[got.refused] == expected.remaining[got.refused]


def _model(
    log: dict[str, list[tuple[int, int]]],
    keys: list[str],
    costs: list[int],
    limits: dict[str, tuple[int, int]],
    now: int,
) -> Outcome:
    """One request's outcome by re-counting. The refused charge is the first that does not
    fit in the order the store checks: by hash slot, then by position in the request."""
    before = []
    for key in keys:
        max_, window = limits[key]
        before.append(max_ - sum(c for ts, c in log[key] if ts > now - window))
    order = sorted(range(len(keys)), key=lambda i: (key_slot(keys[i].encode()), i))
    for index in order:
        cost = costs[index]
        max_, window = limits[keys[index]]
        if cost <= before[index]:
            continue
        retry = window
        if cost <= max_:
            need, freed = cost - before[index], 0
            for ts, c in sorted(e for e in log[keys[index]] if e[0] > now - window):
                freed += c
                if freed >= need:
                    retry = ts + window - now
                    break
        return Outcome(False, tuple(max(b, 0) for b in before), index, retry)
    return Outcome(True, tuple(b - c for b, c in zip(before, costs, strict=True)))


async def test_concurrent_cross_slot_load_never_overspends(cluster: ClusterSetup) -> None:
    """Two stores (as two replicas) race 300 requests over 10 grant slots and one global
    slot: no counter ever exceeds its max, and afterwards every counter holds exactly the
    allowed calls (every refused call's reservations came back)."""
    for node in cluster.nodes:
        with node.client() as client:
            client.flushall()
    stores = [open_store(cluster.url, timeout_s=10.0) for _ in range(2)]
    grants = [f"load-{n}" for n in range(10)]
    per_grant_max, global_max = 12, 60  # 10 x 12 = 120 > 60: the global limit binds

    async def call(i: int) -> tuple[str, Outcome]:
        grant = grants[i % len(grants)]
        charges = [Charge(grant_key(grant), W, per_grant_max), Charge(GLOBAL, W, global_max)]
        return grant, await stores[i % 2].acquire(charges)

    started = time.monotonic()
    try:
        results = await asyncio.gather(*(call(i) for i in range(300)))
    finally:
        for s in stores:
            await s.close()
    elapsed = time.monotonic() - started
    allowed = [grant for grant, outcome in results if outcome.allowed]
    per_grant = {grant: allowed.count(grant) for grant in grants}
    assert len(allowed) <= global_max
    assert max(per_grant.values()) <= per_grant_max
    # Nothing leaked: each counter holds exactly the calls that were allowed.
    assert counted(cluster, GLOBAL) == (len(allowed), len(allowed))
    for grant in grants:
        assert counted(cluster, grant_key(grant)) == (per_grant[grant], per_grant[grant])
    refused_by = [o.refused for _, o in results if not o.allowed]
    record(
        "Redis Cluster: concurrent requests across hash slots",
        "Two clients race 300 requests whose counters span two slots (a grant-scoped "
        "limit of 12 on 10 grants, a global limit of 60) on a three-master cluster. "
        "Afterwards every counter must hold exactly the allowed calls.",
        {
            "requests": len(results),
            "allowed (global max 60)": len(allowed),
            "highest per grant (max 12)": max(per_grant.values()),
            "refused by the global limit": refused_by.count(1),
            "refused at a grant counter (no grant spent more than the highest above; "
            "the rest were in-flight reservations)": refused_by.count(0),
            "reservations left behind": sum(
                counted(cluster, grant_key(g))[0] - per_grant[g] for g in grants
            )
            + counted(cluster, GLOBAL)[0]
            - len(allowed),
            "seconds": round(elapsed, 2),
        },
    )


async def test_failed_later_slot_returns_the_reservation_and_fails_closed(
    tmp_path: Path,
) -> None:
    """The node of the later slot is down: the check fails closed (503) and the earlier
    slot's reservation is returned in the background."""
    with running_cluster(tmp_path) as cluster:
        grant = grant_in_slot_order(before_global=True)
        per_grant = Charge(grant_key(grant), W, 5)
        overall = Charge(GLOBAL, W, 100)
        if cluster.node_for(per_grant.key) is cluster.node_for(GLOBAL):
            # Same node: take another grant whose slot is served elsewhere.
            grant = next(
                g
                for g in (grant_in_slot_order(True, n) for n in range(0, 5_000, 50))
                if cluster.node_for(grant_key(g)) is not cluster.node_for(GLOBAL)
            )
            per_grant = Charge(grant_key(grant), W, 5)
        store = open_store(cluster.url, timeout_s=0.5)
        try:
            assert (await store.acquire([per_grant, overall])).allowed
            cluster.node_for(GLOBAL).stop()
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.acquire([per_grant, overall])
            assert time.monotonic() - started < 1.5
        finally:
            await store.close()  # waits for the background rollback
        assert counted(cluster, per_grant.key) == (1, 1)
