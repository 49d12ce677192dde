"""Several mcp-authz processes sharing one Redis count as one: exact under concurrency."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from authz.pb import external_auth_pb2, external_auth_pb2_grpc
from devstack.checks import tool_check
from devstack.redis_server import running_redis
from devstack.stack import authz_proc, free_port, running
from tests.support.reliability import record

EXPORT, ARGS = "start_dicom_export_job", {"datastoreId": "d"}

pytestmark = pytest.mark.e2e

POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "start_dicom_export_job": {
            "limits": [
                {"counter": "exports_all", "window": "minute", "max": 50, "scope": "global"},
                {"counter": "exports", "window": "minute", "max": 8, "scope": "grant"},
            ]
        }
    },
}


async def concurrent_calls(
    tmp_path: Path, policy: dict[str, object], replicas: int, calls: int
) -> list[external_auth_pb2.CheckResponse]:
    """``calls`` concurrent checks over 10 grants, spread round-robin over ``replicas``
    mcp-authz processes that share one real Redis."""
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps(policy))
    ports = [free_port() for _ in range(replicas)]
    with ExitStack() as stack:
        redis = stack.enter_context(running_redis(tmp_path))
        for port in ports:
            store = ["--redis", redis.url]
            proc = authz_proc(
                tmp_path, policy_file, port, free_port(), store, "--store-timeout-ms", "5000"
            )
            stack.enter_context(running(proc, port))
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in ports]
        stubs = [external_auth_pb2_grpc.AuthorizationStub(c) for c in channels]
        try:
            return await asyncio.gather(
                *(
                    stubs[i % replicas].Check(
                        tool_check(EXPORT, ARGS, f"grant-{i % 10}", i), timeout=60
                    )
                    for i in range(calls)
                )
            )
        finally:
            for c in channels:
                await c.close()


async def test_two_processes_on_one_redis_count_exactly(tmp_path: Path) -> None:
    # 10 grants x 20 calls = 200 concurrent checks, alternating between replicas.
    # Per grant at most 8 fit; globally at most 50: 10 x 8 = 80 > 50, so exactly 50.
    replies = await concurrent_calls(tmp_path, POLICY, replicas=2, calls=200)
    allowed = [r for r in replies if r.WhichOneof("http_response") == "ok_response"]
    denied = [r for r in replies if r.WhichOneof("http_response") == "denied_response"]
    assert len(allowed) == 50
    assert len(denied) == 150
    assert {r.denied_response.status.code for r in denied} == {429}
    per_grant: dict[str, int] = {}
    for r in allowed:
        grant = r.ok_response.headers[0].header.value
        per_grant[grant] = per_grant.get(grant, 0) + 1
    assert max(per_grant.values()) <= 8


async def test_four_processes_thousand_concurrent_calls_exactly_250(tmp_path: Path) -> None:
    """Four replicas on one Redis, 1,000 concurrent calls over 10 grants with max 25 each:
    exactly 250 allowed, 25 per grant, whichever replica each call reached."""
    policy = {
        "version": "1",
        "default": "deny",
        "tools": {
            "start_dicom_export_job": {
                "limits": [{"counter": "exports", "window": "minute", "max": 25}]
            }
        },
    }
    started = time.monotonic()
    replies = await concurrent_calls(tmp_path, policy, replicas=4, calls=1_000)
    elapsed = time.monotonic() - started
    allowed = [r for r in replies if r.WhichOneof("http_response") == "ok_response"]
    denied = [r for r in replies if r.WhichOneof("http_response") == "denied_response"]
    per_grant = Counter(r.ok_response.headers[0].header.value for r in allowed)
    assert len(allowed) == 250
    assert sorted(per_grant.values()) == [25] * 10
    assert {r.denied_response.status.code for r in denied} == {429}
    record(
        "Replicas: four mcp-authz processes on one Redis",
        "1,000 concurrent gRPC checks spread round-robin over four mcp-authz processes "
        "sharing one Redis; 10 grants with a limit of 25 each.",
        {
            "checks": len(replies),
            "allowed (exactly 250 expected)": len(allowed),
            "per grant": f"{min(per_grant.values())}..{max(per_grant.values())} (max 25)",
            "refused 429": len(denied),
            "checks per second": round(len(replies) / elapsed),
        },
    )
