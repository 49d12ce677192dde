"""Tasks (MCP 2025-11-25) end to end: the shipped envoy/envoy.yaml, mcp-authz with a real
redis-server, and a real MCP server implementing tasks (tests/support/task_upstream.py,
the official SDK's low-level Server; it serves any task to anyone who names it, as a server
trusting its gateway does).

A task-augmented call is governed as the call; the task ids its response hands out are
recorded for the caller's grant (the ext_proc stream of that request); ``tasks/get``,
``tasks/result`` and ``tasks/cancel`` pass only for the grant's own tasks, and
``tasks/list`` shows only those. What reached the upstream is read from its own record;
which requests open an ext_proc stream, from Envoy's stats.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.redis_server import running_redis
from devstack.stack import (
    ROOT,
    Proc,
    authz_proc,
    envoy_config,
    envoy_proc,
    free_port,
    running,
    wait_ready,
)

pytestmark = pytest.mark.e2e

VERSION = "2025-11-25"
POLICY = {
    "version": "1",
    "default": "allow",
    "tools": {
        "export_study": {"limits": [{"counter": "exports", "window": "minute", "max": 5}]},
        "delete_study": {"action": "deny", "reason": "deleting needs a human"},
    },
}
BASE = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


class Gateway:
    """The stack under test: its URL, Envoy's admin port, the upstream's record."""

    def __init__(self, url: str, admin: int, record: Any) -> None:
        self.url, self.admin, self.record = url, admin, record

    def reached(self, method: str) -> list[str | None]:
        """The taskIds of the ``method`` requests that reached the upstream."""
        if not self.record.exists():
            return []
        lines = [json.loads(line) for line in self.record.read_text().splitlines() if line]
        return [e["taskId"] for e in lines if e["method"] == method]

    def streams(self) -> int:
        text = httpx.get(f"http://127.0.0.1:{self.admin}/stats?filter=ext_proc.streams_started")
        return sum(int(line.rsplit(":", 1)[1]) for line in text.text.splitlines() if line.strip())


def task_upstream(tmp: Path, port: int, record: Path, *, json_replies: bool = False) -> Proc:
    """tests/support/task_upstream.py on ``port``, recording the task requests it serves
    in ``record``; ``json_replies``: it answers in JSON rather than an event stream."""
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "support" / "task_upstream.py"),
        "--port",
        str(port),
        "--record",
        str(record),
    ]
    if json_replies:
        cmd.append("--json")
    return Proc("task-upstream", cmd, tmp / "upstream.log")


@pytest.fixture(scope="module", params=["sse", "json"])
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp(f"tasks-{request.param}")
    policy = tmp / "policy.json"
    policy.write_text(json.dumps(POLICY))
    listen, admin, upstream_port, grpc_port, http_port = (free_port() for _ in range(5))
    record = tmp / "upstream-record.jsonl"
    upstream = task_upstream(tmp, upstream_port, record, json_replies=request.param == "json")
    config = envoy_config(tmp, listen=listen, authz=grpc_port, upstream=upstream_port, admin=admin)
    with running_redis(tmp) as redis:
        authz = authz_proc(tmp, policy, grpc_port, http_port, ["--redis", redis.url])
        with (
            running(upstream, upstream_port),
            running(authz, grpc_port),
            running(envoy_proc(tmp, config), listen),
        ):
            wait_ready(f"http://127.0.0.1:{admin}/ready")
            yield Gateway(f"http://127.0.0.1:{listen}/mcp", admin, record)


class Agent:
    """One caller (its own bearer token, so its own grant) with its own MCP session."""

    def __init__(self, gateway: Gateway, token: str | None = None) -> None:
        self.gateway = gateway
        self.headers = {**BASE}
        if token is not None:
            self.headers["authorization"] = f"Bearer {token}"
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": VERSION,
                "capabilities": {"tasks": {}},
                "clientInfo": {"name": "tasks-e2e", "version": "1"},
            },
        }
        opened = self.post_raw(init)
        assert opened.status_code == 200, opened.text
        self.headers["mcp-session-id"] = opened.headers["mcp-session-id"]
        self.headers["mcp-protocol-version"] = VERSION
        self.post_raw({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def post_raw(self, doc: object) -> httpx.Response:
        return httpx.post(
            self.gateway.url, content=json.dumps(doc), headers=self.headers, timeout=10
        )

    def rpc(self, method: str, **params: Any) -> tuple[int, dict[str, Any]]:
        """(HTTP status, the JSON-RPC reply) of one request."""
        resp = self.post_raw({"jsonrpc": "2.0", "id": 7, "method": method, "params": params})
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            data = [ln[5:] for ln in resp.text.splitlines() if ln.startswith("data:")]
            replies = [json.loads(d) for d in data if d.strip()]
            return resp.status_code, next(r for r in replies if r.get("id") == 7)
        return resp.status_code, resp.json()

    def start_export(self, study: str) -> str:
        status, reply = self.rpc(
            "tools/call",
            name="export_study",
            arguments={"study": study},
            task={"ttl": 60_000},
        )
        assert status == 200, reply
        task_id: str = reply["result"]["task"]["taskId"]
        return task_id

    def listed(self) -> list[str]:
        """Every task id tasks/list shows this caller, across pages."""
        seen: list[str] = []
        cursor = None
        for _ in range(20):
            status, reply = self.rpc("tasks/list", **({"cursor": cursor} if cursor else {}))
            assert status == 200, reply
            seen += [t["taskId"] for t in reply["result"]["tasks"]]
            cursor = reply["result"].get("nextCursor")
            if cursor is None:
                return seen
        raise AssertionError("tasks/list never ended")


def token() -> str:
    return f"tok-{uuid.uuid4().hex}"


def test_the_owner_reaches_its_task(gateway: Gateway) -> None:
    alice = Agent(gateway, token())
    task = alice.start_export("s-1")
    status, got = alice.rpc("tasks/get", taskId=task)
    assert status == 200 and got["result"]["taskId"] == task
    status, result = alice.rpc("tasks/result", taskId=task)
    assert status == 200
    assert result["result"]["content"][0]["text"] == "exported study s-1"
    status, cancelled = alice.rpc("tasks/cancel", taskId=task)
    assert status == 200 and cancelled["result"]["status"] == "cancelled"


@pytest.mark.parametrize("method", ["tasks/get", "tasks/result", "tasks/cancel"])
def test_another_grant_cannot_reach_a_task(gateway: Gateway, method: str) -> None:
    """The attack: a task id learnt elsewhere, used by another caller. It never reaches
    the upstream, which would serve it."""
    alice, mallory = Agent(gateway, token()), Agent(gateway, token())
    task = alice.start_export("s-2")
    for guessed in (task, str(uuid.uuid4())):
        status, reply = mallory.rpc(method, taskId=guessed)
        assert status == 403, reply
        assert reply["id"] == 7
        assert reply["error"]["code"] == -32051
        assert reply["error"]["data"] == {"reason": "task_not_owned"}
        assert guessed not in gateway.reached(method)
    anonymous = Agent(gateway)
    status, reply = anonymous.rpc(method, taskId=task)
    assert status == 403 and reply["error"]["data"]["reason"] == "no_grant_identity"
    assert gateway.reached(method).count(task) == 0


def test_tasks_list_shows_a_grant_only_its_own_tasks(gateway: Gateway) -> None:
    alice, bob = Agent(gateway, token()), Agent(gateway, token())
    mine = {alice.start_export("a-1"), alice.start_export("a-2")}
    theirs = {bob.start_export("b-1")}
    # The upstream pages by two across every caller's tasks: the pages are filtered.
    assert set(alice.listed()) == mine
    assert set(bob.listed()) == theirs
    assert Agent(gateway).listed() == []


def test_a_task_augmented_call_is_governed_as_the_call(gateway: Gateway) -> None:
    alice = Agent(gateway, token())
    status, reply = alice.rpc(
        "tools/call", name="delete_study", arguments={"study": "s"}, task={"ttl": 1000}
    )
    assert status == 403 and reply["error"]["data"]["reason"] == "denied_by_rule"
    assert "delete_study" not in json.dumps(gateway.reached("tools/call"))
    for i in range(5):
        alice.start_export(f"limit-{i}")
    status, reply = alice.rpc(
        "tools/call", name="export_study", arguments={"study": "x"}, task={"ttl": 1000}
    )
    assert status == 429 and reply["error"]["data"]["reason"] == "rate_limited"


def test_only_task_creating_and_listing_requests_open_an_ext_proc_stream(
    gateway: Gateway,
) -> None:
    alice = Agent(gateway, token())  # the initialize opens one (its session is recorded)
    before = gateway.streams()
    task = alice.start_export("s-3")
    assert gateway.streams() == before + 1
    alice.rpc("tasks/get", taskId=task)
    alice.rpc("tasks/result", taskId=task)
    alice.rpc("tools/call", name="export_study", arguments={"study": "plain"})
    assert gateway.streams() == before + 1
    assert alice.rpc("tasks/list")[0] == 200
    assert gateway.streams() == before + 2
