"""Measure CPU and memory of mcp-authz and Envoy, idle and under load, on loopback.

The figures behind the `resources:` of k8s/base/deployment.yaml (see k8s/README.md).

    apt-get install wrk           # the load generator
    .venv/bin/python k8s/measure_resources.py [--seconds 10] [--connections 16]

Runs the test stack (devstack/stack.py: Envoy with envoy/envoy.yaml and --concurrency 1,
mcp-authz with examples/policy.json and a local redis-server, the demo MCP upstream), then
samples each process's CPU time and RSS from /proc every 0.25 s: 5 s idle, then two bounded
wrk runs against Envoy's listener on 127.0.0.1:
- "mixed": tools/call of a denied tool (answered by mcp-authz), tools/call of a rate-limited
  tool (a Redis round trip) and tools/list (forwarded to the upstream), in turn;
- "deny-only": only the denied call, so the upstream is out of the way and mcp-authz is the
  bottleneck.
Prints one JSON object: per phase, cores used on average, peak RSS in MiB, and requests/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack.redis_server import running_redis  # noqa: E402
from devstack.stack import mcp_stack  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")

BODIES = [
    '{"jsonrpc":"2.0","id":1,"method":"tools/call",'
    '"params":{"name":"delete_app","arguments":{"app_name":"x"}}}',
    '{"jsonrpc":"2.0","id":2,"method":"tools/call",'
    '"params":{"name":"ecs_troubleshooting_tool","arguments":{"app_name":"x"}}}',
    '{"jsonrpc":"2.0","id":3,"method":"tools/list","params":{}}',
]

WRK_SCRIPT = """
local bodies = {%s}
local i = 0
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["accept"] = "application/json, text/event-stream"
wrk.headers["mcp-protocol-version"] = "2025-11-25"
request = function()
  i = i + 1
  wrk.headers["authorization"] = "Bearer tok-" .. (i %% 50)
  return wrk.format(nil, nil, nil, bodies[i %% #bodies + 1])
end
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def sample(pids: dict[str, int], seconds: float) -> dict[str, dict[str, float]]:
    start_cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
    peak = dict.fromkeys(pids, 0.0)
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        for name, pid in pids.items():
            peak[name] = max(peak[name], rss_mib(pid))
        time.sleep(0.25)
    elapsed = time.monotonic() - start
    return {
        name: {
            "cores": round((cpu_seconds(pid) - start_cpu[name]) / elapsed, 3),
            "rss_peak_mib": round(peak[name], 1),
        }
        for name, pid in pids.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        policy = ROOT / "examples" / "policy.json"
        with (
            running_redis(tmp) as redis,
            mcp_stack(tmp, policy, ["--redis", redis.url]) as stack,
        ):
            assert stack.authz.popen is not None and stack.envoy.popen is not None
            pids = {"mcp-authz": stack.authz.popen.pid, "envoy": stack.envoy.popen.pid}
            time.sleep(2)
            results["idle"] = sample(pids, 5)
            for phase, bodies in (("mixed", BODIES), ("deny-only", BODIES[:1])):
                script = tmp / f"{phase}.lua"
                quoted = ", ".join("[[" + body + "]]" for body in bodies)
                script.write_text(WRK_SCRIPT % quoted)
                wrk = subprocess.Popen(
                    [
                        "wrk",
                        "-t1",
                        f"-c{args.connections}",
                        f"-d{args.seconds}s",
                        "-s",
                        str(script),
                        stack.url,
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                time.sleep(1)  # past wrk's connection ramp-up
                results[phase] = sample(pids, args.seconds - 2)
                output, _ = wrk.communicate(timeout=args.seconds + 30)
                rate = [line for line in output.splitlines() if line.startswith("Requests/sec")]
                results[phase]["requests_per_s"] = float(rate[0].split()[1]) if rate else None
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
