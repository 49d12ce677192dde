"""Real processes on loopback: Envoy, mcp-authz, the demo MCP upstream.

Used by the tests, the benchmark and ``make run``. Every process logs to a file and is
stopped by the context manager that started it, so a failure leaves nothing running; the
tests give each process free ports.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from devstack.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"
# The ext_authz transports, and the shipped Envoy config of each.
TRANSPORTS = ("grpc", "http")
ENVOY_CONFIGS = {"grpc": ENVOY_YAML, "http": ROOT / "envoy" / "envoy-http.yaml"}


def on_transport(section: str, transport: str) -> str:
    """A RELIABILITY.md section title for a run on ``transport`` (gRPC keeps the plain one)."""
    return section if transport == "grpc" else f"{section} ({transport} ext_authz)"


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not open after {timeout} s:\n{log.read_text()[-3000:]}")


@dataclass
class Proc:
    """A started process with its log file."""

    name: str
    cmd: Sequence[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        handle = self.log.open("ab")
        self.popen = subprocess.Popen(
            list(self.cmd),
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            cwd=ROOT,
        )
        handle.close()
        return self

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def running(proc: Proc, port: int | None = None) -> Iterator[Proc]:
    proc.start()
    try:
        if port is not None:
            assert proc.popen is not None
            wait_for_port(port, proc.popen, proc.log)
        yield proc
    finally:
        proc.stop()


def envoy_config(
    tmp: Path,
    *,
    listen: int,
    authz: int | Sequence[int],
    upstream: int,
    admin: int,
    source: Path = ENVOY_YAML,
    listen_address: str = "127.0.0.1",
    authz_http: int | Sequence[int] = (),
) -> Path:
    """A shipped Envoy config with only its ports and the listener address changed:
    ``authz`` the gRPC ports (ext_authz, the list filter), ``authz_http`` the HTTP ext_authz
    ports of envoy-http.yaml."""
    config: dict[str, Any] = yaml.safe_load(source.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address=listen_address, port_value=listen)
    ports = {
        "mcp_authz": [authz] if isinstance(authz, int) else list(authz),
        "mcp_authz_http": [authz_http] if isinstance(authz_http, int) else list(authz_http),
        "mcp_server": [upstream],
    }
    for cluster in config["static_resources"]["clusters"]:
        endpoints = cluster["load_assignment"]["endpoints"][0]
        template = endpoints["lb_endpoints"][0]
        endpoints["lb_endpoints"] = []
        for port in ports[cluster["name"]]:
            endpoint = copy.deepcopy(template)
            endpoint["endpoint"]["address"]["socket_address"]["port_value"] = port
            endpoints["lb_endpoints"].append(endpoint)
    path = tmp / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def envoy_proc(tmp: Path, config: Path, concurrency: int = 1) -> Proc:
    return Proc(
        "envoy",
        [
            str(BIN / "envoy"),
            "-c",
            str(config),
            "--concurrency",
            str(concurrency),
            "--log-level",
            "warning",
            "--base-id",
            str(free_port()),
        ],
        tmp / "envoy.log",
    )


def authz_proc(
    tmp: Path,
    policy: Path,
    grpc_port: int,
    http_port: int,
    store: Sequence[str],
    *extra: str,
    authz_http: int | None = None,
) -> Proc:
    """mcp-authz serving ext_authz and the list filter over gRPC on ``grpc_port``, and with
    ``authz_http`` ext_authz over Envoy's HTTP mode on that port too."""
    listener = ["--grpc", f"127.0.0.1:{grpc_port}"]
    if authz_http is not None:
        listener += ["--authz-http", f"127.0.0.1:{authz_http}"]
    return Proc(
        f"mcp-authz-{grpc_port}",
        [
            str(BIN / "mcp-authz"),
            "serve",
            "--policy",
            str(policy),
            *store,
            *listener,
            "--http",
            f"127.0.0.1:{http_port}",
            *extra,
        ],
        tmp / f"authz-{grpc_port}.log",
    )


def upstream_proc(tmp: Path, port: int, record: Path) -> Proc:
    return Proc(
        "upstream",
        [
            sys.executable,
            str(ROOT / "examples" / "demo_upstream.py"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--record",
            str(record),
        ],
        tmp / "upstream.log",
    )


def wait_ready(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready")


@dataclass
class Stack:
    """Envoy → mcp-authz → demo MCP upstream, all real, all on loopback."""

    url: str
    record: Path
    authz: Proc
    envoy: Proc
    upstream: Proc
    tmp: Path

    def recorded(self) -> list[dict[str, Any]]:
        """What reached the upstream, one entry per HTTP request."""
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]

    def recorded_tools(self) -> list[str]:
        return [
            m["tool"]
            for r in self.recorded()
            for m in (r["jsonrpc"] or [])
            if m.get("method") == "tools/call"
        ]


@contextlib.contextmanager
def mcp_stack(
    tmp: Path, policy: Path, store: Sequence[str], *authz_args: str, transport: str = "grpc"
) -> Iterator[Stack]:
    """The stack with ext_authz over ``transport`` ("grpc" or "http"), each with its
    shipped Envoy config; the list filter is on the gRPC port either way."""
    listen, admin, upstream, grpc_port, http_port = (free_port() for _ in range(5))
    authz_http = free_port() if transport == "http" else None
    record = tmp / "upstream-record.jsonl"
    config = envoy_config(
        tmp,
        listen=listen,
        authz=grpc_port,
        upstream=upstream,
        admin=admin,
        source=ENVOY_CONFIGS[transport],
        authz_http=authz_http or (),
    )
    authz = authz_proc(tmp, policy, grpc_port, http_port, store, *authz_args, authz_http=authz_http)
    with (
        running(upstream_proc(tmp, upstream, record), upstream) as up,
        running(authz, authz_http or grpc_port),
        running(envoy_proc(tmp, config), listen) as envoy,
    ):
        wait_ready(f"http://127.0.0.1:{admin}/ready")
        yield Stack(
            url=f"http://127.0.0.1:{listen}/mcp",
            record=record,
            authz=authz,
            envoy=envoy,
            upstream=up,
            tmp=tmp,
        )
