"""Soak: a steady, moderate rate through Envoy with Redis; no errors, no memory growth.

30 s in the normal suite; ``make soak`` sets ``SOAK_SECONDS=300``. Every request is of a
kind with a known correct reply (allowed, denied, rate-limited, listing); anything else is
an error. The resident memory of the mcp-authz process is read from /proc after a
warm-up and at the end: growth past 10% would be a leak.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from devstack.redis_server import running_redis
from devstack.stack import (
    authz_proc,
    envoy_config,
    envoy_proc,
    free_port,
    running,
    upstream_proc,
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

SECONDS = float(os.environ.get("SOAK_SECONDS", "30"))
RATE = float(os.environ.get("SOAK_RATE", "60"))
WARM_UP = max(5.0, SECONDS * 0.2)
MAX_RSS_GROWTH = 0.10
POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "containerize_app": {"action": "allow"},
        "delete_app": {"action": "deny", "reason": "needs a human"},
        "start_dicom_export_job": {
            "limits": [{"counter": "exports", "window": "second", "max": 5}]
        },
    },
}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@pytest.mark.timeout(SECONDS + 180)
async def test_soak_through_envoy_with_redis(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    listen, admin, upstream, grpc_port = free_port(), free_port(), free_port(), free_port()
    record_file = tmp_path / "upstream-record.jsonl"
    samples: list[tuple[float, int]] = []
    with ExitStack() as stack:
        redis = stack.enter_context(running_redis(tmp_path))
        upstream_p = stack.enter_context(
            running(stateless(upstream_proc(tmp_path, upstream, record_file)), upstream)
        )
        authz = stack.enter_context(
            running(
                authz_proc(
                    tmp_path,
                    policy,
                    grpc_port,
                    free_port(),
                    ["--redis", redis.url],
                    # A starved CPU, not Redis, is what a short store timeout would catch
                    # here (the fail-closed path has its own tests).
                    "--store-timeout-ms",
                    "3000",
                ),
                grpc_port,
            )
        )
        config = with_check_timeout(
            envoy_config(tmp_path, listen=listen, authz=grpc_port, upstream=upstream, admin=admin),
            "5s",
        )
        envoy_p = stack.enter_context(running(envoy_proc(tmp_path, config), listen))
        processes = {"mcp-authz": authz, "envoy": envoy_p, "upstream": upstream_p}
        wait_ready(f"http://127.0.0.1:{admin}/ready")
        assert authz.popen is not None
        pid = authz.popen.pid

        finished = threading.Event()

        def sample() -> None:
            started = time.monotonic()
            while not finished.wait(1.0):
                samples.append((time.monotonic() - started, rss_bytes(pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        denied = Kind("denied", tool_call("delete_app", 1, app_name="x"), frozenset({403}))
        export = Kind(
            "export",
            tool_call("start_dicom_export_job", 3, datastoreId="d", outputS3Uri="s3://x"),
            frozenset({200, 429}),
        )
        # Most checks end at mcp-authz (as most hostile or over-budget traffic would); one
        # in five requests, plus the exports within budget, reach the MCP upstream.
        mix = [
            denied,
            export,
            Kind("allowed", tool_call("containerize_app", 2, app_path="/a"), frozenset({200})),
            Kind("unnamed", tool_call("ecs_resource_management", 4), frozenset({403})),
            export,
            Kind("malformed", b'{"jsonrpc":"2.0","id":6,"method":"tools/call"}', frozenset({400})),
            denied,
            export,
            Kind("list", b'{"jsonrpc":"2.0","id":5,"method":"tools/list"}', frozenset({200})),
            export,
        ]
        try:
            tally = await steady_load(
                f"http://127.0.0.1:{listen}/mcp",
                client_headers("soak"),
                mix,
                rate=RATE,
                seconds=SECONDS,
                concurrency=32,
            )
        finally:
            finished.set()
            sampler.join()
        still_running = authz.popen.poll() is None
        cpu = {name: cpu_seconds(proc.popen.pid) for name, proc in processes.items() if proc.popen}
        recorded = [json.loads(line) for line in record_file.read_text().splitlines()]

    reached = [m.get("tool") for r in recorded for m in (r["jsonrpc"] or [])]
    warm = [rss for at, rss in samples if at >= WARM_UP]
    assert len(warm) >= 2, samples
    growth = (warm[-1] - warm[0]) / warm[0]
    record(
        f"Soak ({SECONDS:.0f} s)",
        "Steady open-loop load through Envoy to one mcp-authz process with a real Redis "
        "and an MCP upstream: denied, allowed, rate-limited (Redis sliding window) and "
        "listing requests in turn. RSS of mcp-authz read from /proc every second.",
        {
            "load": f"{tally.sent} requests in {tally.seconds:.0f} s "
            f"({tally.sent / tally.seconds:.0f}/s, target {RATE:.0f}/s)",
            "errors": tally.failed,
            "CPU seconds used": ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()),
            "p99 latency": f"{tally.p99_ms():.0f} ms",
            "RSS after warm-up": f"{warm[0] / 2**20:.1f} MiB (at {WARM_UP:.0f} s)",
            "RSS at the end": f"{warm[-1] / 2**20:.1f} MiB",
            "RSS growth after warm-up": f"{growth * 100:+.1f}% (limit +10%)",
            "RSS peak": f"{max(rss for _, rss in samples) / 2**20:.1f} MiB",
            "allowed exports / reached the upstream": f"{tally.count('export', 200)} / "
            f"{reached.count('start_dicom_export_job')}",
            "denied calls that reached the upstream": reached.count("delete_app")
            + reached.count("ecs_resource_management"),
            "replies by kind": ", ".join(
                f"{kind} {status}: {n}" for (kind, status), n in sorted(tally.replies.items())
            ),
        },
    )
    assert still_running
    assert tally.failed == 0, dict(tally.failures)
    assert tally.sent >= RATE * SECONDS * 0.9
    assert growth < MAX_RSS_GROWTH, samples
    assert tally.count("export", 200) == reached.count("start_dicom_export_job")
    assert tally.count("allowed", 200) == reached.count("containerize_app")
    assert "delete_app" not in reached and "ecs_resource_management" not in reached
