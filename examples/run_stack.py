"""`make run`: the whole local stack in the foreground, on loopback; Ctrl-C stops everything.

    redis-server (127.0.0.1:6379)  <-  mcp-authz (gRPC 127.0.0.1:9001, HTTP 127.0.0.1:9002)
    Envoy (127.0.0.1:8080, envoy/envoy.yaml) -> ext_authz -> MCP upstream (127.0.0.1:8000/mcp)

The upstream is the real awslabs ECS MCP server when it is installed
(`.venv/bin/pip install awslabs-ecs-mcp-server`, or `pip install -e '.[ecs]'`), otherwise the
demo server in examples/demo_upstream.py. MCP_UPSTREAM=demo|ecs forces one.

Every port comes from a variable (the PORTS table; README, "Two commands"), and is checked
to be free before anything starts. The stack is "up" once every service answers. Each
service logs to its own file in .run/ (MCP_AUTHZ_RUN_DIR); the terminal shows one line per
decision from mcp-authz's audit log. Approvals are on, with an admin token made at start.
When Redis stops, the stack keeps running (mcp-authz answers 503 store_unavailable) and
Redis is started again; when another service dies, the stack names it, shows the end of
its log and stops.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack.redis_server import redis_server_binary  # noqa: E402
from devstack.stack import BIN, Proc, envoy_config  # noqa: E402

RUN_DIR = Path(os.environ.get("MCP_AUTHZ_RUN_DIR", ROOT / ".run"))
# The Envoy listener's address; 0.0.0.0 exposes the stack to the network (README).
LISTEN_ADDRESS = os.environ.get("MCP_AUTHZ_RUN_LISTEN_ADDRESS", "127.0.0.1")
DEFAULT_POLICY = ROOT / "examples" / "policy.json"
# How long a service gets to answer after it started (the ECS server imports boto3).
START_TIMEOUT_S = 60.0
# A stopped Redis is started again after this long (the stack fails closed meanwhile).
REDIS_RESTART_DELAY_S = 5.0
LOG_TAIL_LINES = 15

ECS_SERVER = (
    "from awslabs.ecs_mcp_server.main import mcp; "
    "mcp.run(transport='http', host='127.0.0.1', port={port}, show_banner=False)"
)


@dataclass(frozen=True)
class Port:
    service: str
    variable: str
    number: int
    address: str = "127.0.0.1"


def _port(service: str, variable: str, default: int, address: str = "127.0.0.1") -> Port:
    text = os.environ.get(variable, str(default))
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise SystemExit(f"{variable}={text!r} is not a port number")
    return Port(service, variable, int(text), address)


def ports() -> dict[str, Port]:
    """The ports of the stack, each with the variable that moves it."""
    return {
        "listener": _port("envoy", "MCP_AUTHZ_RUN_ENVOY_PORT", 8080, LISTEN_ADDRESS),
        "envoy_admin": _port("envoy (admin)", "MCP_AUTHZ_RUN_ENVOY_ADMIN_PORT", 9901),
        "grpc": _port("mcp-authz (gRPC)", "MCP_AUTHZ_RUN_GRPC_PORT", 9001),
        "http": _port("mcp-authz (health, admin API)", "MCP_AUTHZ_RUN_HTTP_PORT", 9002),
        "redis": _port("redis", "MCP_AUTHZ_RUN_REDIS_PORT", 6379),
        "upstream": _port("MCP upstream", "MCP_AUTHZ_RUN_UPSTREAM_PORT", 8000),
    }


def taken(all_ports: dict[str, Port]) -> list[str]:
    """Why each port that cannot be used is taken, worded with the variable to change."""
    problems = []
    seen: dict[int, Port] = {}
    for port in all_ports.values():
        if port.number in seen:
            other = seen[port.number]
            problems.append(
                f"port {port.number} is set for both {other.service} ({other.variable}) "
                f"and {port.service} ({port.variable})"
            )
            continue
        seen[port.number] = port
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((port.address, port.number))
            except OSError:
                problems.append(
                    f"port {port.number} ({port.service}) is taken by another process: "
                    f"stop it, or choose another port, e.g. {port.variable}={_spare()} make run"
                )
    return problems


def _spare() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def upstream_command(port: int) -> tuple[str, list[str]]:
    choice = os.environ.get("MCP_UPSTREAM", "auto")
    has_ecs = importlib.util.find_spec("awslabs") is not None and (
        importlib.util.find_spec("awslabs.ecs_mcp_server") is not None
    )
    if choice == "ecs" or (choice == "auto" and has_ecs):
        return "awslabs ECS MCP server", [sys.executable, "-c", ECS_SERVER.format(port=port)]
    return "demo MCP server (examples/demo_upstream.py)", [
        sys.executable,
        str(ROOT / "examples" / "demo_upstream.py"),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]


# Loopback URLs only: never through a proxy the environment names.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def answers(url: str, expect: int | None = 200) -> bool:
    """The URL answers (with ``expect``, or any HTTP status when None)."""
    try:
        with _DIRECT.open(url, timeout=1) as reply:
            return expect is None or reply.status == expect
    except urllib.error.HTTPError as exc:
        return expect is None or exc.code == expect
    except OSError:
        return False


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def redis_answers(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def log_tail(proc: Proc) -> str:
    try:
        lines = proc.output().splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        lines = []
    shown = "\n".join(f"    {line}" for line in lines) or "    (empty)"
    return f"last lines of {proc.log}:\n{shown}"


def died(proc: Proc) -> str:
    assert proc.popen is not None
    return f"{proc.name} exited (code {proc.popen.returncode}); {log_tail(proc)}"


def wait_answering(proc: Proc, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not check():
        assert proc.popen is not None
        if proc.popen.poll() is not None:
            raise StackFailed(died(proc))
        if time.monotonic() > deadline:
            raise StackFailed(
                f"{proc.name} did not answer within {START_TIMEOUT_S:.0f} s; {log_tail(proc)}"
            )
        time.sleep(0.1)


class StackFailed(Exception):
    """A service did not come up, or died: the message names it and shows its log."""


def decision_line(line: str) -> str | None:
    """One terminal line for an audit line of mcp-authz (None for other log lines)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    clock = str(entry.get("time", ""))[11:19]
    if "decision" in entry:
        what = " ".join(str(entry[k]) for k in ("method", "tool") if entry.get(k))
        text = f"{clock} {entry['decision']:<12} {what}  grant={entry.get('grant') or '-'}"
        if entry["decision"] != "allow":
            text += f"  {entry.get('reason')}: {entry.get('reason_text', '')}"
        return text
    if str(entry.get("event", "")).startswith("approval_"):
        return f"{clock} {entry['event']:<12} {entry.get('approval_id')} {entry.get('tool')}"
    if entry.get("level") in ("warning", "error", "critical"):
        return f"{clock} mcp-authz {entry['level']}: {entry.get('message')}"
    return None


class AuditFollower:
    """Reads what mcp-authz appended to its log since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return []
        self.offset += len(data)
        *complete, self.partial = (self.partial + data).split(b"\n")
        return [line.decode(errors="replace") for line in complete]


def admin_token() -> str:
    """A fresh admin token, in files only this user can read."""
    token = secrets.token_urlsafe(24)
    for name, text in (("admin-tokens", f"local-operator:{token}\n"), ("admin-token", token)):
        path = RUN_DIR / name
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
    return token


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    cli.add_argument("--policy", default=str(DEFAULT_POLICY), help="policy file (JSON or YAML)")
    policy = Path(cli.parse_args().policy).resolve()
    if not policy.is_file():
        print(f"make run: no policy file at {policy}", file=sys.stderr)
        return 2
    port = ports()
    problems = taken(port)
    if problems:
        print("make run: cannot start the local stack:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    token = admin_token()
    upstream_name, upstream_cmd = upstream_command(port["upstream"].number)
    envoy_yaml = envoy_config(
        RUN_DIR,
        listen=port["listener"].number,
        listen_address=LISTEN_ADDRESS,
        admin=port["envoy_admin"].number,
        authz=port["grpc"].number,
        upstream=port["upstream"].number,
    )
    env = {"AWS_REGION": os.environ.get("AWS_REGION", "us-east-1")}
    r, http = port["redis"].number, port["http"].number
    # Where this machine reaches the listener (all interfaces include loopback).
    reach = "127.0.0.1" if LISTEN_ADDRESS in ("0.0.0.0", "::") else LISTEN_ADDRESS
    listener = f"http://{reach}:{port['listener'].number}"
    redis_proc = Proc(
        "redis",
        [
            redis_server_binary(),
            *("--port", str(r), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            *("--dir", str(RUN_DIR), "--pidfile", str(RUN_DIR / "redis.pid")),
        ],
        RUN_DIR / "redis.log",
        env,
    )
    services: list[tuple[Proc, Callable[[], bool]]] = [
        (redis_proc, lambda: redis_answers(r)),
        (
            Proc("upstream", upstream_cmd, RUN_DIR / "upstream.log", env),
            lambda: answers(f"http://127.0.0.1:{port['upstream'].number}/mcp", None),
        ),
        (
            Proc(
                "mcp-authz",
                [
                    str(BIN / "mcp-authz"),
                    *("serve", "--policy", str(policy), "--redis", f"redis://127.0.0.1:{r}"),
                    *("--grpc", f"127.0.0.1:{port['grpc'].number}", "--http", f"127.0.0.1:{http}"),
                    *("--admin-tokens-file", str(RUN_DIR / "admin-tokens")),
                ],
                RUN_DIR / "mcp-authz.log",
                env,
            ),
            lambda: answers(f"http://127.0.0.1:{http}/readyz"),
        ),
        (
            Proc(
                "envoy",
                [
                    str(BIN / "envoy"),
                    *("-c", str(envoy_yaml), "--concurrency", "2", "--log-level", "warning"),
                    # Its own shared-memory id, so another Envoy on this machine is no clash.
                    *("--base-id", str(port["listener"].number)),
                ],
                RUN_DIR / "envoy.log",
                env,
            ),
            # Envoy is ready, and its listener answers (404 for anything but /mcp).
            lambda: (
                answers(f"http://127.0.0.1:{port['envoy_admin'].number}/ready")
                and answers(f"{listener}/", 404)
            ),
        ),
    ]
    started: list[Proc] = []
    follower = AuditFollower(RUN_DIR / "mcp-authz.log")
    status = 0
    try:
        for proc, check in services:
            proc.log.write_bytes(b"")  # this run's log only
            started.append(proc.start())
            wait_answering(proc, check)
        print(
            f"""
mcp-authz local stack is up (upstream: {upstream_name}).
  MCP endpoint (through Envoy): {listener}/mcp   (listening on {LISTEN_ADDRESS})
  mcp-authz health:             http://127.0.0.1:{http}/healthz  /readyz  /metrics
  approvals console:            http://127.0.0.1:{http}/console/   (sign in with the token)
  approvals (admin API):        http://127.0.0.1:{http}/admin/v1/approvals
  admin token:                  {token}   (also in {RUN_DIR}/admin-token)
    .venv/bin/mcp-authz approvals --url http://127.0.0.1:{http} \\
      --token-file {RUN_DIR}/admin-token list
  Envoy admin:                  http://127.0.0.1:{port["envoy_admin"].number}/stats/prometheus
  policy:                       {policy} (edits are reloaded)
  logs:                         {RUN_DIR}/{{redis,upstream,mcp-authz,envoy}}.log
Any bearer token is accepted; README "Trying the local stack" has requests to paste.
One line per decision follows (the full audit lines are in mcp-authz.log). Ctrl-C stops.
""",
            flush=True,
        )
        redis_restart_at: float | None = None
        while True:
            for line in follower.new_lines():
                shown = decision_line(line)
                if shown is not None:
                    print(shown, flush=True)
            for proc in started:
                assert proc.popen is not None
                if proc.popen.poll() is None:
                    continue
                if proc is not redis_proc:
                    raise StackFailed(died(proc))
                if redis_restart_at is None:
                    print(
                        f"{died(proc)}\nThe stack keeps running: mcp-authz answers calls that "
                        "need a counter with 503 store_unavailable (fail closed). Starting "
                        f"Redis again in {REDIS_RESTART_DELAY_S:.0f} s.",
                        flush=True,
                    )
                    redis_restart_at = time.monotonic() + REDIS_RESTART_DELAY_S
            if redis_restart_at is not None and time.monotonic() >= redis_restart_at:
                redis_restart_at = None
                redis_proc.start()
                wait_answering(redis_proc, lambda: redis_answers(r))
                print("redis is back; mcp-authz recovers with it.", flush=True)
            time.sleep(0.2)
    except StackFailed as exc:
        print(f"make run: {exc}", file=sys.stderr, flush=True)
        status = 1
    except KeyboardInterrupt:
        pass
    finally:
        for proc in reversed(started):
            proc.stop()
        print("stopped", flush=True)
    return status


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
