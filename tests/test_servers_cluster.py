"""Estate budgets on a real three-master Redis Cluster: a call spending a server's counter
and a budget is one round trip when both live in its grant's slot, and the store's
reserve-and-rollback keeps it exact when a global budget lives in another slot."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.crc import key_slot

from authz.decision import Reason
from authz.engine import Engine
from authz.mcp import HttpRequest
from authz.policy import compile_policy
from authz.store import open_store
from devstack.redis_server import ClusterSetup, running_cluster

T0 = 28_333_333 * 60_000
GLOBAL_BUDGET = "mcpauthz:{global}:budget:everyone"
POLICY = {
    "version": "1",
    "budgets": {
        "writes": {"window": "hour", "max": 3},
        "everyone": {"window": "hour", "max": 2, "scope": "global"},
    },
    "servers": {
        "a": {
            "default": "deny",
            "tools": {
                "local": {
                    "limits": [
                        {"counter": "calls", "window": "hour", "max": 5},
                        {"budget": "writes"},
                    ]
                },
                "shared": {
                    "limits": [
                        {"counter": "calls", "window": "hour", "max": 5},
                        {"budget": "everyone"},
                    ]
                },
            },
        },
        "b": {"default": "deny", "tools": {"shared": {"limits": [{"budget": "everyone"}]}}},
    },
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as setup:
        yield setup


@pytest.fixture
async def engine(cluster: ClusterSetup) -> AsyncIterator[Engine]:
    for node in cluster.nodes:
        with node.client() as client:
            client.flushall()
    store = open_store(cluster.url, timeout_s=2.0)
    yield Engine(compile_policy(POLICY), store, grant_header="x-grant", clock=lambda: T0)
    await store.close()


def call(tool: str, server: str, grant: str) -> HttpRequest:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool}}
    return HttpRequest(
        method="POST",
        headers={"content-type": "application/json", "x-grant": grant},
        body=json.dumps(body).encode(),
        server=server,
    )


def grant_key(grant: str) -> str:
    return f"mcpauthz:{{g:{grant}}}:server:a:calls"


def grant_in_slot_order(before_global: bool) -> str:
    global_slot = key_slot(GLOBAL_BUDGET.encode())
    for n in range(10_000):
        slot = key_slot(grant_key(f"grant-{n}").encode())
        if (slot < global_slot) == before_global and slot != global_slot:
            return f"grant-{n}"
    raise LookupError("no grant found")


def counted(cluster: ClusterSetup, key: str) -> int:
    with cluster.node_for(key).client() as client:
        return int(client.zcard(key))


async def test_a_server_counter_and_a_grant_budget_are_one_round_trip(
    engine: Engine, cluster: ClusterSetup
) -> None:
    assert (await engine.check(call("local", "a", "g1"))).decision.allowed  # loads the script
    node = cluster.node_for(grant_key("g1"))
    assert node is cluster.node_for("mcpauthz:{g:g1}:budget:writes")

    def evalsha_calls() -> int:
        with node.client() as client:
            return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    before = evalsha_calls()
    assert (await engine.check(call("local", "a", "g1"))).decision.allowed
    assert evalsha_calls() - before == 1
    assert (await engine.check(call("local", "a", "g1"))).decision.allowed
    refused = await engine.check(call("local", "a", "g1"))
    assert refused.decision.reason is Reason.RATE_LIMITED
    assert refused.decision.counter == "writes"
    assert counted(cluster, grant_key("g1")) == 3


@pytest.mark.parametrize("grant_first", [True, False], ids=["grant-slot-first", "global-first"])
async def test_a_global_budget_in_another_slot_stays_exact(
    engine: Engine, cluster: ClusterSetup, grant_first: bool
) -> None:
    grant = grant_in_slot_order(before_global=grant_first)
    assert (await engine.check(call("shared", "a", grant))).decision.allowed
    assert (await engine.check(call("shared", "b", "someone-else"))).decision.allowed
    for server in ("a", "b", "a"):
        refused = await engine.check(call("shared", server, grant))
        assert refused.decision.reason is Reason.RATE_LIMITED
        assert refused.decision.counter == "everyone"
    # The refused calls returned their reservation of the server counter, whichever slot
    # went first: it holds the one call that passed.
    assert counted(cluster, grant_key(grant)) == 1
    assert counted(cluster, GLOBAL_BUDGET) == 2
