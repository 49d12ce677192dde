"""Redis topologies operators outgrow one Redis into, each with real `mcp-authz` processes:
TLS (``rediss://``), Sentinel with a failover, and a three-master Redis Cluster; on
Sentinel and Cluster, approvals too (requested through one process, approved through
another's admin API, used through that one).

Every deployment is real and on loopback: redis-server with TLS and certificates this
test makes, a master + replica + sentinel, a cluster created with ``redis-cli --cluster``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from authz.admin_client import admin_request
from authz.pb import external_auth_pb2, external_auth_pb2_grpc
from authz.store import StoreUnavailable, open_store
from authz.store.redis import parse_multi_host_url
from devstack.checks import tool_check
from devstack.redis_server import (
    RedisServer,
    make_tls_files,
    running_cluster,
    running_redis,
    running_sentinel,
    tls_supported,
    wait_until,
)
from devstack.stack import authz_proc, free_port, running, wait_for_port
from tests.support.reliability import record

EXPORT, ARGS = "start_dicom_export_job", {"datastoreId": "d"}

pytestmark = pytest.mark.e2e


def policy(tmp: Path, per_grant: int, overall: int | None = None) -> Path:
    """One rate-limited tool: a grant-scoped limit, and optionally a global one."""
    limits: list[dict[str, Any]] = [
        {"counter": "exports", "window": "minute", "max": per_grant, "scope": "grant"}
    ]
    if overall is not None:
        limits.insert(
            0, {"counter": "exports_all", "window": "minute", "max": overall, "scope": "global"}
        )
    path = tmp / "policy.json"
    document = {
        "version": "1",
        "default": "deny",
        "tools": {"start_dicom_export_job": {"limits": limits}},
    }
    path.write_text(json.dumps(document))
    return path


def _online_replicas(server: RedisServer) -> int:
    with server.client() as client:
        info = client.info("replication")
    return sum(
        1
        for name, value in info.items()
        if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
    )


def grant_key(token: str) -> str:
    """The grant-scoped counter key of a bearer token's calls."""
    return "mcpauthz:{g:b-" + hashlib.sha256(token.encode()).hexdigest()[:24] + "}:exports"


@contextmanager
def authz_processes(
    tmp: Path, policy_file: Path, url: str, count: int, *extra: str
) -> Iterator[list[int]]:
    """``count`` mcp-authz processes on one store URL; yields their gRPC ports."""
    ports = [free_port() for _ in range(count)]
    with ExitStack() as stack:
        for port in ports:
            proc = authz_proc(tmp, policy_file, port, free_port(), ["--redis", url], *extra)
            stack.enter_context(running(proc, port))
        yield ports


@asynccontextmanager
async def stubs(
    ports: Sequence[int],
) -> AsyncIterator[list[external_auth_pb2_grpc.AuthorizationStub]]:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in ports]
    try:
        yield [external_auth_pb2_grpc.AuthorizationStub(c) for c in channels]
    finally:
        for channel in channels:
            await channel.close()


def verdict(reply: external_auth_pb2.CheckResponse) -> int:
    """200 for allowed, else the HTTP status mcp-authz denied with."""
    if reply.WhichOneof("http_response") == "ok_response":
        return 200
    return int(reply.denied_response.status.code)


def grant_of(reply: external_auth_pb2.CheckResponse) -> str:
    return next(
        h.header.value for h in reply.ok_response.headers if h.header.key == "x-mcp-authz-grant"
    )


# --- Approvals ------------------------------------------------------------------------------

ADMIN_TOKEN = "topology-admin-token-0123456789"


@contextmanager
def approval_processes(tmp: Path, url: str) -> Iterator[list[tuple[int, int]]]:
    """Two mcp-authz processes with approvals on one store URL; yields their (gRPC, HTTP)
    ports."""
    policy_file = tmp / "approval-policy.json"
    document = {
        "version": "1",
        "default": "deny",
        "tools": {EXPORT: {"action": "require_approval", "approval": {"uses": 1}}},
    }
    policy_file.write_text(json.dumps(document))
    tokens = tmp / "admin-tokens"
    tokens.write_text(f"ops:{ADMIN_TOKEN}\n")
    ports = [(free_port(), free_port()) for _ in range(2)]
    with ExitStack() as stack:
        for grpc_port, http_port in ports:
            proc = authz_proc(
                tmp,
                policy_file,
                grpc_port,
                http_port,
                ["--redis", url],
                *("--store-timeout-ms", "1000", "--admin-tokens-file", str(tokens)),
            )
            started = stack.enter_context(running(proc, grpc_port))
            assert started.popen is not None
            # The admin API (the HTTP port) opens after the gRPC port.
            wait_for_port(http_port, started.popen, started.log)
        yield ports


def _approval_id(reply: external_auth_pb2.CheckResponse) -> str:
    data = json.loads(reply.denied_response.body)["error"]["data"]
    assert data["reason"] == "approval_required", data
    return str(data["approvalId"])


async def approve_on_one_use_on_another(tmp: Path, url: str) -> None:
    """Request through process one, list and approve through process two's admin API, use
    the approval through process two; the next identical call needs a new approval."""
    with approval_processes(tmp, url) as ports:
        admin_url = f"http://127.0.0.1:{ports[1][1]}"
        async with stubs([grpc for grpc, _ in ports]) as (one, two):
            check = tool_check(EXPORT, ARGS, "needs-approval")
            first = await one.Check(check, timeout=10)
            assert verdict(first) == 403
            approval_id = _approval_id(first)
            assert _approval_id(await two.Check(check, timeout=10)) == approval_id
            status, listed = await asyncio.to_thread(
                admin_request, admin_url, ADMIN_TOKEN, "GET", "/approvals"
            )
            assert status == 200 and [a["id"] for a in listed["approvals"]] == [approval_id]
            status, approved = await asyncio.to_thread(
                admin_request, admin_url, ADMIN_TOKEN, "POST", f"/approvals/{approval_id}/approve"
            )
            assert (status, approved["state"], approved["operator"]) == (200, "approved", "ops")
            assert verdict(await two.Check(check, timeout=10)) == 200
            again = await one.Check(check, timeout=10)
            assert verdict(again) == 403 and _approval_id(again) != approval_id


async def test_sentinel_approvals_are_shared_by_every_process(tmp_path: Path) -> None:
    with running_sentinel(tmp_path, replicas=1) as setup:
        await approve_on_one_use_on_another(tmp_path, setup.url)
        with setup.master.client() as client:
            keys = sorted(k.decode() for k in client.keys("mcpauthz:{approvals}:*"))
    assert keys == [f"mcpauthz:{{approvals}}:{k}" for k in ("bindings", "expiries", "records")]


async def test_cluster_approvals_are_shared_by_every_process(tmp_path: Path) -> None:
    with running_cluster(tmp_path) as cluster:
        await approve_on_one_use_on_another(tmp_path, cluster.url)
        node = cluster.node_for("mcpauthz:{approvals}:records")
        with node.client() as client:
            keys = sorted(k.decode() for k in client.keys("mcpauthz:{approvals}:*"))
    assert keys == [f"mcpauthz:{{approvals}}:{k}" for k in ("bindings", "expiries", "records")]


# --- TLS -----------------------------------------------------------------------------------


@pytest.fixture
def tls_server_required() -> None:
    if not tls_supported():
        message = "redis-server lacks TLS: `make test` installs Debian's redis-server"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


async def test_rediss_counts_exactly_and_verifies_the_server(
    tmp_path: Path, tls_server_required: None
) -> None:
    tls = make_tls_files(tmp_path / "tls")
    stranger = make_tls_files(tmp_path / "stranger", name="stranger")
    with running_redis(tmp_path, tls=tls) as server:
        with authz_processes(
            tmp_path, policy(tmp_path, 10), server.url, 1, "--store-timeout-ms", "1000"
        ) as ports:
            async with stubs(ports) as (stub,):
                replies = [
                    await stub.Check(tool_check(EXPORT, ARGS, "tls", n), timeout=10)
                    for n in range(12)
                ]
        # The counts are in the TLS-only server, under the grant's key.
        with server.client() as client:
            keys = [k.decode() for k in client.keys("mcpauthz:*") if not k.endswith(b":t")]
        # Certificates are verified: a client trusting another CA, and a plain-text one,
        # get no answer, so checks would fail closed.
        wrong_ca = f"rediss://127.0.0.1:{server.port}?ssl_ca_certs={stranger.ca}" + (
            f"&ssl_certfile={tls.cert}&ssl_keyfile={tls.key}"
        )
        refused = []
        for url in (wrong_ca, f"redis://127.0.0.1:{server.port}"):
            store = open_store(url, timeout_s=1.0)
            with pytest.raises(StoreUnavailable) as info:
                await store.ping()
            refused.append(str(info.value))
            await store.close()
    assert [verdict(r) for r in replies] == [200] * 10 + [429, 429]
    assert len(keys) == 1 and keys[0].startswith("mcpauthz:{g:")
    assert "certificate verify failed" in refused[0].lower()
    record(
        "Redis topology: TLS (rediss)",
        "mcp-authz against a TLS-only redis-server (mutual TLS, certificates made by the "
        "test); a client trusting another CA and a plain-text client are refused.",
        {
            "checks": len(replies),
            "allowed (max 10)": sum(verdict(r) == 200 for r in replies),
            "wrong CA": refused[0][:80],
            "plain text to the TLS port": refused[1][:80],
        },
    )


# --- Sentinel --------------------------------------------------------------------------------


async def test_sentinel_failover_keeps_answering(tmp_path: Path) -> None:
    """The master crashes under load and Sentinel promotes a replica: the service keeps
    answering, and no allowed call's record is lost (``wait_replicas=1``: an allowed call
    is on a replica, and Sentinel promotes the most up-to-date one), so no grant overspends.
    """
    per_grant = 20
    with (
        running_sentinel(tmp_path) as setup,
        authz_processes(
            tmp_path,
            policy(tmp_path, per_grant),
            setup.url + "?wait_replicas=1",
            1,
            "--store-timeout-ms",
            "1000",
        ) as ports,
    ):
        async with stubs(ports) as (stub,):
            early = [
                await stub.Check(tool_check(EXPORT, ARGS, "early", n), timeout=10)
                for n in range(per_grant + 1)
            ]
            results: list[tuple[str, int]] = []
            stop = asyncio.Event()

            async def worker(w: int) -> None:
                n = 0
                while not stop.is_set() and n < 1_000:
                    token = f"load-{(w * 1_000 + n) % 40}"
                    reply = await stub.Check(tool_check(EXPORT, ARGS, token, n), timeout=10)
                    results.append((token, verdict(reply)))
                    n += 1
                    await asyncio.sleep(0.01)

            workers = [asyncio.create_task(worker(w)) for w in range(4)]
            await asyncio.sleep(0.5)
            crashed = time.monotonic()
            setup.master.stop()  # SIGKILL
            await asyncio.to_thread(
                wait_until,
                "the sentinel to promote a replica",
                lambda: setup.master_port() not in (None, setup.master.port),
                30.0,
            )
            promoted = time.monotonic() - crashed
            # Over once the other replica follows the new master: from then on every
            # allowed record reaches a replica again.
            await asyncio.to_thread(
                wait_until,
                "the other replica to follow the new master",
                lambda: _online_replicas(setup.current_master()) >= 1,
                30.0,
            )
            settled = time.monotonic() - crashed
            served_before = len(results)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*workers)
            after_switch = Counter(status for _, status in results[served_before:])
            after_early = await stub.Check(tool_check(EXPORT, ARGS, "early", 99), timeout=10)
            fresh = await stub.Check(tool_check(EXPORT, ARGS, "after-failover", 1), timeout=10)
        with setup.current_master().client() as new_master:
            recorded = {
                key.decode(): int(new_master.zcard(key))
                for key in new_master.keys("mcpauthz:*")
                if not key.endswith(b":t")
            }

    statuses = Counter(status for _, status in results)
    assert [verdict(r) for r in early] == [200] * per_grant + [429]
    assert set(statuses) <= {200, 429, 503}
    # After the switch the service answers from the new master, which kept every count.
    assert after_switch[200] > 0 and after_switch[503] == 0, after_switch
    assert verdict(after_early) == 429
    assert verdict(fresh) == 200
    allowed = Counter(token for token, status in results if status == 200)
    lost = {t: c - recorded.get(grant_key(t), 0) for t, c in allowed.items()}
    assert max(allowed.values()) <= per_grant
    assert max(lost.values()) <= 0, lost
    record(
        "Redis topology: Sentinel failover",
        "mcp-authz on redis+sentinel://...?wait_replicas=1 (a master, two replicas, one "
        "sentinel) under four clients; the master is killed with SIGKILL and Sentinel "
        "promotes a replica.",
        {
            "checks during the load": len(results),
            "allowed": statuses[200],
            "refused 429": statuses[429],
            "503 while the master was down or unreplicated": statuses[503],
            "sentinel promoted a replica after (s)": round(promoted, 2),
            "the other replica followed it after (s)": round(settled, 2),
            "503 after the switch": after_switch[503],
            "allowed calls whose record was lost": sum(max(0, n) for n in lost.values()),
        },
    )


# --- Cluster ---------------------------------------------------------------------------------


async def test_cluster_replicas_never_overspend_across_slots(tmp_path: Path) -> None:
    """Two mcp-authz processes on a three-master cluster, each check spending a grant
    counter and a global counter (two hash slots): no counter exceeds its max, and every
    counter holds exactly the allowed calls."""
    with (
        running_cluster(tmp_path) as cluster,
        authz_processes(
            tmp_path, policy(tmp_path, 8, overall=50), cluster.url, 2, "--store-timeout-ms", "2000"
        ) as ports,
    ):
        async with stubs(ports) as two:
            calls = [
                two[i % 2].Check(tool_check(EXPORT, ARGS, f"grant-{i % 10}", i), timeout=30)
                for i in range(200)
            ]
            replies = await asyncio.gather(*calls)
        held = {}
        for key in ("mcpauthz:{global}:exports_all",):
            with cluster.node_for(key).client() as client:
                held[key] = int(client.zcard(key))
        per_grant_held = {}
        for reply in replies:
            if verdict(reply) == 200:
                key = f"mcpauthz:{{g:{grant_of(reply)}}}:exports"
                if key not in per_grant_held:
                    with cluster.node_for(key).client() as client:
                        per_grant_held[key] = int(client.zcard(key))
    statuses = Counter(verdict(r) for r in replies)
    allowed_per_grant = Counter(grant_of(r) for r in replies if verdict(r) == 200)
    assert set(statuses) <= {200, 429}
    assert 0 < statuses[200] <= 50
    assert max(allowed_per_grant.values()) <= 8
    assert held["mcpauthz:{global}:exports_all"] == statuses[200]
    for grant, count in allowed_per_grant.items():
        assert per_grant_held[f"mcpauthz:{{g:{grant}}}:exports"] == count
    record(
        "Redis topology: Cluster, two mcp-authz processes",
        "200 concurrent checks over 10 grants through two mcp-authz processes on a "
        "three-master cluster; each spends a grant counter (max 8) and the global counter "
        "(max 50), which live in different hash slots.",
        {
            "checks": len(replies),
            "allowed (global max 50)": statuses[200],
            "refused 429": statuses[429],
            "highest per grant (max 8)": max(allowed_per_grant.values()),
            "global counter holds": held["mcpauthz:{global}:exports_all"],
        },
    )


# --- URLs ------------------------------------------------------------------------------------


def test_multi_host_urls_are_read_like_redis_py_reads_one() -> None:
    url = parse_multi_host_url(
        "rediss+sentinel://u:p%40ss@[::1]:26380,10.0.0.2/mymaster/3"
        "?ssl_ca_certs=/ca.pem&socket_keepalive=true&wait_replicas=1&sentinel_password=s",
        26379,
    )
    assert url.hosts == (("::1", 26380), ("10.0.0.2", 26379))
    assert url.path == ("mymaster", "3")
    assert url.connection == {
        "username": "u",
        "password": "p@ss",
        "ssl_ca_certs": "/ca.pem",
        "socket_keepalive": True,
        "ssl": True,
    }
    assert url.own == {"wait_replicas": "1", "sentinel_password": "s"}


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("redis+sentinel://127.0.0.1:26379", "service_name"),
        ("redis+sentinel://127.0.0.1:x/m", "bad port"),
        ("redis+cluster://127.0.0.1:7000/0", "takes no path"),
        ("redis+cluster://127.0.0.1:7000?wait_replicas=1", "does not take wait_replicas"),
        ("redis://127.0.0.1?wait_replicas=some", "whole number"),
        ("mongodb://127.0.0.1", "unsupported store URL scheme"),
    ],
)
def test_bad_store_urls_are_refused_with_the_reason(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        open_store(url, timeout_s=1.0)


async def test_unreachable_sentinel_fails_closed() -> None:
    store = open_store(f"redis+sentinel://127.0.0.1:{free_port()}/m", timeout_s=0.2)
    try:
        with pytest.raises(StoreUnavailable):
            await store.ping()
    finally:
        await store.close()
