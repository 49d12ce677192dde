"""`make run` (examples/run_stack.py) as a new user meets it, for real: the script runs as a
subprocess with the demo upstream on free ports, and the README's requests are pasted from
the README itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from devstack.stack import BIN, ROOT, authz_proc, free_port, running

pytestmark = pytest.mark.e2e

RUN_STACK = ROOT / "examples" / "run_stack.py"
PORT_VARIABLES = {
    "listener": "MCP_AUTHZ_RUN_ENVOY_PORT",
    "envoy_admin": "MCP_AUTHZ_RUN_ENVOY_ADMIN_PORT",
    "grpc": "MCP_AUTHZ_RUN_GRPC_PORT",
    "http": "MCP_AUTHZ_RUN_HTTP_PORT",
    "redis": "MCP_AUTHZ_RUN_REDIS_PORT",
    "upstream": "MCP_AUTHZ_RUN_UPSTREAM_PORT",
}
POLICY_YAML = """\
version: "1"
default: deny
tools:
  containerize_app: {action: allow}
  delete_app: {action: deny, reason: deleting needs a human}
  start_dicom_export_job:
    limits: [{counter: exports, window: minute, max: 1000}]
"""
PROTOCOL_VERSION = "2025-11-25"
HEADERS = {
    "authorization": "Bearer run-stack-test",
    "content-type": "application/json",
    "accept": "application/json, text/event-stream",
    "mcp-protocol-version": PROTOCOL_VERSION,
}


@dataclass
class LocalStack:
    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    run_dir: Path
    stdout: Path
    stderr: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['listener']}/mcp"

    def output(self) -> str:
        return self.stdout.read_text(errors="replace")

    def errors(self) -> str:
        return self.stderr.read_text(errors="replace")

    def child(self, marker: str) -> int:
        """The pid of the stack's child process whose command line holds ``marker``."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == self.proc.pid and marker.encode() in cmdline:
                return int(entry)
        raise LookupError(marker)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def start_stack(tmp: Path, *args: str, **env: str) -> LocalStack:
    ports = {name: free_port() for name in PORT_VARIABLES}
    run_dir = tmp / "run"
    variables = {PORT_VARIABLES[name]: str(port) for name, port in ports.items()}
    out, err = tmp / "stdout.txt", tmp / "stderr.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(RUN_STACK), *args],
            stdout=stdout,
            stderr=stderr,
            env={
                **os.environ,
                "MCP_UPSTREAM": "demo",
                "MCP_AUTHZ_RUN_DIR": str(run_dir),
                **variables,
                **env,
            },
            cwd=ROOT,
        )
    return LocalStack(proc, ports, run_dir, out, err)


def stop(stack: LocalStack) -> None:
    if stack.proc.poll() is None:
        stack.proc.send_signal(signal.SIGINT)
        try:
            stack.proc.wait(30)
        except subprocess.TimeoutExpired:
            stack.proc.kill()
            stack.proc.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    tmp = tmp_path_factory.mktemp("run-stack")
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY_YAML)
    local = start_stack(tmp, "--policy", str(policy))
    try:
        wait_for(
            lambda: "stack is up" in local.output() or local.proc.poll() is not None,
            "the local stack to come up",
            timeout=120,
        )
        assert local.proc.poll() is None, local.errors()
        yield local
    finally:
        stop(local)


def open_session(url: str) -> dict[str, str]:
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "run-stack-test", "version": "1"},
        },
    }
    reply = httpx.post(url, json=init, headers=HEADERS, timeout=10)
    assert reply.status_code == 200, reply.text
    headers = {**HEADERS, "mcp-session-id": reply.headers["mcp-session-id"]}
    done = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert httpx.post(url, json=done, headers=headers, timeout=10).status_code == 202
    return headers


def export_call(url: str, headers: dict[str, str]) -> httpx.Response:
    """A call of a tool with a limit: it needs the counter store."""
    call = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {
            "name": "start_dicom_export_job",
            "arguments": {"datastoreId": "d1", "outputS3Uri": "s3://bucket/x"},
        },
    }
    return httpx.post(url, json=call, headers=headers, timeout=10)


def readme_block(heading: str, language: str) -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split(heading, 1)[1]
    match = re.search(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert match, f"README {heading}: no {language} block"
    return match.group(1)


def loopback_listeners(port: int) -> set[str]:
    """The local addresses (hex, as /proc shows them) of the sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].rpartition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


# --- before anything starts --------------------------------------------------------------


def test_a_taken_port_is_named_with_its_variable(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        local = start_stack(tmp_path, MCP_AUTHZ_RUN_REDIS_PORT=str(port))
        assert local.proc.wait(60) == 1
    message = local.errors()
    assert f"port {port} (redis) is taken" in message
    assert "MCP_AUTHZ_RUN_REDIS_PORT=" in message
    assert "stack is up" not in local.output()
    assert not (local.run_dir / "redis.log").exists(), "nothing may start"


def test_make_run_takes_a_policy() -> None:
    dry = subprocess.run(
        ["make", "-n", "run", "POLICY=my policy.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "examples/run_stack.py --policy 'my policy.yaml'" in dry.stdout


def test_the_cli_says_when_approvals_are_off(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"version": "1", "default": "allow"}))
    grpc_port, http_port = free_port(), free_port()
    with running(authz_proc(tmp_path, policy, grpc_port, http_port, ["--store", "memory"])):
        wait_for(lambda: _ready(http_port), "mcp-authz to be ready")
        result = subprocess.run(
            [str(BIN / "mcp-authz"), "approvals", "--url", f"http://127.0.0.1:{http_port}", "list"],
            capture_output=True,
            text=True,
            env={**os.environ, "MCP_AUTHZ_ADMIN_TOKEN": "some-operator-token"},
            check=False,
        )
    assert result.returncode == 1
    assert "approvals are not enabled on this server (no admin tokens configured)" in (
        result.stderr
    )
    assert "404" not in result.stderr


def _ready(http_port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# --- the running stack (one for the tests below; the last one stops it) ------------------


def test_up_means_every_service_answers(stack: LocalStack) -> None:
    ports = stack.ports
    assert httpx.get(f"http://127.0.0.1:{ports['http']}/readyz", timeout=5).status_code == 200
    assert httpx.get(f"http://127.0.0.1:{ports['envoy_admin']}/ready", timeout=5).text.strip() == (
        "LIVE"
    )
    with redis.Redis(port=ports["redis"]) as client:
        assert client.ping()
    assert "stack is up (upstream: demo MCP server" in stack.output()


def test_every_port_is_on_loopback_only(stack: LocalStack) -> None:
    # 127.0.0.1 as /proc shows it: IPv4, and IPv4-mapped IPv6 (gRPC's sockets).
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
    for name, port in stack.ports.items():
        found = loopback_listeners(port)
        assert found and found <= loopback, name


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on PATH to paste into")
def test_the_readme_curl_sequence_works(stack: LocalStack) -> None:
    script = readme_block("### Trying the local stack", "sh").replace(
        "127.0.0.1:8080", f"127.0.0.1:{stack.ports['listener']}"
    )
    result = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "Containerized /srv/app" in result.stdout
    assert '"reason":"denied_by_rule"' in result.stdout
    wait_for(
        lambda: re.search(r"deny +tools/call delete_app .*denied_by_rule", stack.output()),
        "a one-line summary of the denial on the terminal",
        timeout=10,
    )
    assert re.search(r"allow +tools/call containerize_app", stack.output())
    assert "my-agent-token" not in stack.output()


def test_the_readme_python_example_works(stack: LocalStack) -> None:
    script = readme_block("The same with the official `mcp` SDK client", "python").replace(
        "127.0.0.1:8080", f"127.0.0.1:{stack.ports['listener']}"
    )
    assert len(script.strip().splitlines()) <= 12
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "Containerized /srv/app" in result.stdout


def test_every_service_logs_to_the_run_directory(stack: LocalStack) -> None:
    for name in ("redis", "upstream", "mcp-authz", "envoy"):
        log = stack.run_dir / f"{name}.log"
        assert log.stat().st_size > 0, name
    assert '"decision"' in (stack.run_dir / "mcp-authz.log").read_text()
    # Envoy's access log, with the decision mcp-authz returned.
    assert '"authz_decision"' in (stack.run_dir / "envoy.log").read_text()


def test_approvals_are_on_with_a_printed_token(stack: LocalStack) -> None:
    token_file = stack.run_dir / "admin-token"
    token = token_file.read_text()
    assert token_file.stat().st_mode & 0o077 == 0
    assert token in stack.output()
    assert f"http://127.0.0.1:{stack.ports['http']}/admin/v1/approvals" in stack.output()
    console = f"http://127.0.0.1:{stack.ports['http']}/console/"
    assert console in stack.output()
    # The printed token signs in to the console (the login form posts it, never a URL).
    origin = f"http://127.0.0.1:{stack.ports['http']}"
    signed_in = httpx.post(
        f"{console}login", data={"token": token}, headers={"origin": origin}, timeout=5
    )
    assert signed_in.status_code == 303 and "set-cookie" in signed_in.headers
    result = subprocess.run(
        [
            *(str(BIN / "mcp-authz"), "approvals", "--token-file", str(token_file)),
            *("--url", f"http://127.0.0.1:{stack.ports['http']}", "list"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "no approvals: none pending" in result.stdout


def test_stopping_redis_fails_closed_and_recovers(stack: LocalStack) -> None:
    headers = open_session(stack.url)
    assert export_call(stack.url, headers).status_code == 200
    os.kill(int((stack.run_dir / "redis.pid").read_text()), signal.SIGTERM)
    wait_for(lambda: "redis exited" in stack.output(), "the stack to report Redis gone", 10)
    refused = export_call(stack.url, headers)
    assert refused.status_code == 503
    assert refused.json()["error"]["data"]["reason"] == "store_unavailable"
    assert stack.proc.poll() is None, "the stack keeps running"
    wait_for(lambda: "redis is back" in stack.output(), "Redis to start again", 30)
    wait_for(lambda: export_call(stack.url, headers).status_code == 200, "recovery", 15)
    assert stack.proc.poll() is None


def test_a_dead_service_is_named_with_its_log(stack: LocalStack) -> None:
    """Runs last: it stops the module's stack."""
    os.kill(stack.child("demo_upstream.py"), signal.SIGKILL)
    assert stack.proc.wait(30) == 1
    message = stack.errors()
    assert "upstream exited" in message
    assert f"last lines of {stack.run_dir / 'upstream.log'}" in message
    assert "stopped" in stack.output()
