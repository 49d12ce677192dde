"""Two mcp-authz replicas behind one Envoy: restarting each under load fails no request.

Envoy's config is the shipped one plus what a multi-replica deployment adds: an active
gRPC health check on the mcp_authz cluster (mcp-authz reports NOT_SERVING as soon as it
starts draining) and a retry policy on the ext_authz gRPC service (a check caught by a
closing connection is retried on the other replica). Both replicas share one Redis, so
the counts must stay exact across the restarts: a retried check must not spend twice.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devstack.redis_server import running_redis
from devstack.stack import (
    Proc,
    authz_proc,
    envoy_config,
    envoy_proc,
    free_port,
    running,
    upstream_proc,
    wait_for_port,
    wait_ready,
)
from tests.support.load import (
    Kind,
    client_headers,
    stateless,
    steady_load,
    tool_call,
    with_check_timeout,
)
from tests.support.reliability import record

pytestmark = pytest.mark.e2e

EXPORT_BUDGET = 40
POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "containerize_app": {"action": "allow"},
        "delete_app": {"action": "deny", "reason": "needs a human"},
        "start_dicom_export_job": {
            "limits": [
                {
                    "counter": "exports",
                    "window": "hour",
                    "max": EXPORT_BUDGET,
                    "scope": "global",
                }
            ]
        },
    },
}
RATE = 60.0
# Load runs until both restarts are done and 3 s more, at most this long.
MAX_SECONDS = 60.0
SETTLE_SECONDS = 3.0
DRAIN_SECONDS = 2.0
HEALTH_SERVICE = "envoy.service.auth.v3.Authorization"


def replicated_envoy_config(tmp: Path, **ports: Any) -> Path:
    """The shipped envoy.yaml for several replicas: health checks and ext_authz retries."""
    path = with_check_timeout(envoy_config(tmp, **ports), "5s")
    config = yaml.safe_load(path.read_text())
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    log_format = manager["typed_config"]["access_log"][0]["typed_config"]["log_format"]
    log_format["json_format"]["details"] = "%RESPONSE_CODE_DETAILS%"
    log_format["json_format"]["flags"] = "%RESPONSE_FLAGS%"
    for http_filter in manager["typed_config"]["http_filters"]:
        if http_filter["name"] == "envoy.filters.http.ext_authz":
            grpc_service = http_filter["typed_config"]["grpc_service"]
            # Retry only checks that never reached a replica (the connection failed, or
            # the replica refused the stream while going away). A reset or timed-out check
            # may already have spent its budget in Redis, and a retry would spend it again:
            # with "reset,unavailable" added, 37 to 39 of 40 exports were allowed. Kept
            # minimal: with retry_back_off and the previous_hosts predicate also set, checks
            # waiting for a new connection hit a per-try timeout (Envoy 1.40) and failed.
            grpc_service["retry_policy"] = {
                "retry_on": "connect-failure,refused-stream",
                "num_retries": 2,
            }
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "mcp_authz":
            cluster["health_checks"] = [
                {
                    # Two misses mark a replica out (a draining one answers NOT_SERVING),
                    # well inside its drain; one slow answer on a loaded machine does not.
                    "timeout": "1s",
                    "interval": "0.2s",
                    # ext_authz's gRPC calls do not count as routed traffic: without this
                    # the cluster stays on the 60 s no-traffic interval.
                    "no_traffic_interval": "0.2s",
                    "unhealthy_threshold": 2,
                    "healthy_threshold": 1,
                    "grpc_health_check": {"service_name": HEALTH_SERVICE},
                }
            ]
            # The default allows 3 retries in flight; a replica going away under load
            # can catch more checks than that at once.
            cluster["circuit_breakers"] = {"thresholds": [{"max_retries": 64}]}
    path.write_text(yaml.safe_dump(config))
    return path


def healthy_replicas(admin: int) -> set[int]:
    """Ports of the mcp_authz endpoints Envoy currently considers healthy."""
    text = httpx.get(f"http://127.0.0.1:{admin}/clusters", timeout=2).text
    return {
        int(line.split("::")[1].rsplit(":", 1)[1])
        for line in text.splitlines()
        if line.startswith("mcp_authz::") and line.endswith("::health_flags::healthy")
    }


def wait_healthy(admin: int, port: int, present: bool, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (port in healthy_replicas(admin)) is present:
            return
        time.sleep(0.05)
    raise TimeoutError(f"replica {port} healthy={not present} after {timeout} s")


def envoy_counters(admin: int) -> dict[str, int]:
    """Envoy's counters of the mcp_authz cluster (retries, health checks, connections)."""
    text = httpx.get(f"http://127.0.0.1:{admin}/stats?filter=^cluster.mcp_authz.", timeout=5).text
    pairs = (line.rsplit(": ", 1) for line in text.splitlines() if ": " in line)
    return {k.removeprefix("cluster.mcp_authz."): int(v) for k, v in pairs if v.isdigit()}


def checks_answered(proc: Proc, since: int) -> int:
    """Audit lines (one per answered check) a replica wrote after byte offset ``since``."""
    text = proc.log.read_bytes()[since:].decode(errors="replace")
    return sum(1 for line in text.splitlines() if '"decision":' in line)


async def test_restarting_each_replica_under_load_fails_no_request(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    listen, admin, upstream = free_port(), free_port(), free_port()
    grpc_ports = [free_port(), free_port()]
    record_file = tmp_path / "upstream-record.jsonl"
    restarts: list[dict[str, float]] = []
    with ExitStack() as stack:
        redis = stack.enter_context(running_redis(tmp_path))
        stack.enter_context(
            running(stateless(upstream_proc(tmp_path, upstream, record_file)), upstream)
        )
        replicas = [
            stack.enter_context(
                running(
                    authz_proc(
                        tmp_path,
                        policy,
                        port,
                        free_port(),
                        ["--redis", redis.url],
                        "--drain-seconds",
                        str(DRAIN_SECONDS),
                        # Starved CPUs on a shared machine, not Redis, would trip the
                        # default 50 ms here (the fail-closed path has its own tests).
                        "--store-timeout-ms",
                        "3000",
                    ),
                    port,
                )
            )
            for port in grpc_ports
        ]
        config = replicated_envoy_config(
            tmp_path, listen=listen, authz=grpc_ports, upstream=upstream, admin=admin
        )
        stack.enter_context(running(envoy_proc(tmp_path, config, concurrency=2), listen))
        wait_ready(f"http://127.0.0.1:{admin}/ready")
        for port in grpc_ports:
            wait_healthy(admin, port, True)
        url = f"http://127.0.0.1:{listen}/mcp"
        headers = client_headers("replica-restart")

        def restart_each() -> None:
            for replica, port in zip(replicas, grpc_ports, strict=True):
                time.sleep(2.5)
                began = time.monotonic()
                replica.stop()  # SIGTERM: NOT_SERVING, drain, stop
                offset = replica.log.stat().st_size
                replica.start()
                assert replica.popen is not None
                wait_for_port(port, replica.popen, replica.log)
                wait_healthy(admin, port, True)
                done = time.monotonic()
                restarts.append(
                    {"port": port, "offset": offset, "seconds": done - began, "done": done}
                )

        mix = [
            Kind("denied", tool_call("delete_app", 1, app_name="x"), frozenset({403})),
            Kind("allowed", tool_call("containerize_app", 2, app_path="/a"), frozenset({200})),
            Kind("denied", tool_call("delete_app", 3, app_name="y"), frozenset({403})),
            Kind(
                "export",
                tool_call("start_dicom_export_job", 4, datastoreId="d", outputS3Uri="s3://x"),
                frozenset({200, 429}),
            ),
        ]
        restarter = asyncio.create_task(asyncio.to_thread(restart_each))

        def settled() -> bool:
            done = [r for r in restarts if "done" in r]
            return len(done) == 2 and time.monotonic() - done[-1]["done"] > SETTLE_SECONDS

        tally = await steady_load(
            url, headers, mix, rate=RATE, seconds=MAX_SECONDS, stop_when=settled
        )
        await restarter
        stats = envoy_counters(admin)
        all_stats = httpx.get(f"http://127.0.0.1:{admin}/stats", timeout=5).text
        (tmp_path / "envoy-stats.txt").write_text(all_stats)  # for a failure's post-mortem
        recorded = [json.loads(line) for line in record_file.read_text().splitlines()]
        served_after = [
            checks_answered(replica, int(r["offset"]))
            for replica, r in zip(replicas, restarts, strict=True)
        ]

    reached = [m.get("tool") for r in recorded for m in (r["jsonrpc"] or [])]
    record(
        "Replica restarts under load",
        "Two mcp-authz replicas (one Redis) behind one Envoy with gRPC health checks and "
        "ext_authz retries; each replica restarted (SIGTERM, drain, start) in turn while "
        "a steady mix of allowed, denied and rate-limited calls ran.",
        {
            "load": f"{tally.sent} requests in {tally.seconds:.1f} s "
            f"({tally.sent / tally.seconds:.0f}/s)",
            "restarts survived": len(restarts),
            "restart durations (stop to healthy again)": ", ".join(
                f"{r['seconds']:.1f} s" for r in restarts
            ),
            "checks answered by each replica after its restart": served_after,
            "failed requests": tally.failed,
            "checks Envoy retried on the other replica": stats.get("upstream_rq_retry", 0),
            "health checks that marked a replica out": stats.get("health_check.failure", 0)
            + stats.get("health_check.network_failure", 0),
            "p99 latency": f"{tally.p99_ms():.0f} ms",
            f"exports allowed (global budget {EXPORT_BUDGET})": tally.count("export", 200),
            "exports that reached the upstream": reached.count("start_dicom_export_job"),
            "denied calls that reached the upstream": reached.count("delete_app"),
        },
    )
    assert len(restarts) == 2
    assert tally.failed == 0, dict(tally.failures)
    assert all(n > 0 for n in served_after), served_after
    # Nothing counted twice, nothing lost: exactly the budget was allowed, and each allowed
    # call reached the upstream once.
    assert tally.count("export", 200) == EXPORT_BUDGET
    assert reached.count("start_dicom_export_job") == EXPORT_BUDGET
    assert reached.count("containerize_app") == tally.count("allowed", 200)
    assert "delete_app" not in reached
