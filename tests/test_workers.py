"""``mcp-authz serve --workers N``: N processes on one port, supervised, for real.

The service is started as an operator would start it; the tests look at the processes
through ``/proc`` and talk gRPC to the shared port.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from authz.pb import external_auth_pb2_grpc
from devstack.checks import tool_check
from devstack.redis_server import RedisServer
from devstack.stack import BIN, ROOT, free_port, wait_for_port

pytestmark = pytest.mark.e2e

POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {"containerize_app": {"action": "allow"}},
}


def workers_of(parent: int) -> set[int]:
    """The serving children of the supervisor (not multiprocessing's resource tracker)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmdline:
            found.add(int(entry))
    return found


def listeners(port: int) -> int:
    """Sockets listening on ``port``: one per worker when they share it."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def allowed_checks(port: int, count: int) -> int:
    """Send ``count`` checks, each on a new connection (so the kernel spreads them)."""
    allowed = 0
    for i in range(count):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            reply = stub.Check(
                tool_check("containerize_app", {"app_path": "/srv/app"}, f"token-{i}"), timeout=10
            )
            allowed += reply.WhichOneof("http_response") == "ok_response"
    return allowed


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY))
    return path


@dataclass(frozen=True)
class Service:
    proc: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    log: Path

    def allowed_decisions(self) -> float:
        """mcp_authz_decisions_total{decision="allow"} as /metrics reports it."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("mcp_authz_decisions_total{") and 'decision="allow"' in line
        )


@pytest.fixture
def supervisor(tmp_path: Path, policy: Path, redis_server: RedisServer) -> Iterator[Service]:
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path / "authz.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "mcp-authz"),
                "serve",
                "--policy",
                str(policy),
                "--redis",
                redis_server.url,
                "--grpc",
                f"127.0.0.1:{grpc_port}",
                "--http",
                f"127.0.0.1:{http_port}",
                "--workers",
                "2",
                "--reload-interval",
                "0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            # The supervisor's metrics directory goes here, even when a test kills it.
            env={**os.environ, "TMPDIR": str(tmp_path)},
        )
    try:
        wait_for_port(grpc_port, proc, log, timeout=30)
        wait_until(lambda: listeners(grpc_port) == 2, "two workers listening")
        yield Service(proc, grpc_port, http_port, log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pid in workers_of(proc.pid):
            os.kill(pid, signal.SIGKILL)


def test_workers_share_the_port_survive_a_crash_and_stop_on_sigterm(
    supervisor: Service,
) -> None:
    proc, port, log = supervisor.proc, supervisor.grpc_port, supervisor.log
    first = workers_of(proc.pid)
    assert len(first) == 2
    assert allowed_checks(port, 20) == 20
    # Whichever worker answers the scrape counts the decisions of both.
    assert [supervisor.allowed_decisions() for _ in range(4)] == [20] * 4

    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: len(workers_of(proc.pid) - first) == 1 and listeners(port) == 2,
        "the killed worker replaced",
    )
    assert victim not in workers_of(proc.pid)
    assert proc.poll() is None
    assert allowed_checks(port, 20) == 20
    # The killed worker's counts stay in the total.
    assert supervisor.allowed_decisions() == 40
    assert "worker 0 died (signal SIGKILL)" in log.read_text() or (
        "worker 1 died (signal SIGKILL)" in log.read_text()
    )

    serving = workers_of(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in serving)
    assert listeners(port) == 0


def test_several_workers_need_a_shared_store(tmp_path: Path, policy: Path) -> None:
    done = subprocess.run(
        [
            str(BIN / "mcp-authz"),
            "serve",
            "--policy",
            str(policy),
            "--store",
            "memory",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--workers" in done.stderr


def test_a_single_process_does_not_share_its_port(
    tmp_path: Path, policy: Path, supervisor: Service
) -> None:
    """Without --workers, a second service on a taken port fails instead of splitting the
    traffic with the first (gRPC would set SO_REUSEPORT by default)."""
    port = supervisor.grpc_port
    done = subprocess.run(
        [
            str(BIN / "mcp-authz"),
            "serve",
            "--policy",
            str(policy),
            "--store",
            "memory",
            "--grpc",
            f"127.0.0.1:{port}",
            "--http",
            f"127.0.0.1:{free_port()}",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert listeners(port) == 2


def test_sighup_reaches_every_worker(policy: Path, supervisor: Service) -> None:
    """The policy is re-read on SIGHUP only (--reload-interval 0): after one SIGHUP to the
    supervisor, every worker decides by the new file."""
    proc, port = supervisor.proc, supervisor.grpc_port
    assert allowed_checks(port, 10) == 10
    policy.write_text(json.dumps({"version": "1", "default": "deny"}))
    time.sleep(0.5)
    assert allowed_checks(port, 10) == 10  # not reloaded without the signal
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: allowed_checks(port, 20) == 0, "every worker denies", timeout=15)
    assert len(workers_of(proc.pid)) == 2  # reloaded, not restarted


def test_workers_stop_when_the_supervisor_dies(
    supervisor: Service,
) -> None:
    proc, port = supervisor.proc, supervisor.grpc_port
    serving = workers_of(proc.pid)
    proc.kill()
    proc.wait(10)
    wait_until(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in serving) and not listeners(port),
        "orphaned workers stopped",
    )
