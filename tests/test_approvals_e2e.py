"""Human approval end to end: a real Envoy in front of two mcp-authz replicas sharing one
Redis, the demo MCP upstream, the official MCP SDK client as the agent, and the
``mcp-authz approvals`` command as the operator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from devstack.redis_server import running_redis
from devstack.stack import (
    BIN,
    ENVOY_CONFIGS,
    Proc,
    authz_proc,
    envoy_config,
    envoy_proc,
    free_port,
    mcp_stack,
    running,
    upstream_proc,
    wait_ready,
)
from tests.support.clients import McpCallError, sdk_call_tool

pytestmark = pytest.mark.e2e

TOKEN = "alice:approver-token-0123456789"
PATIENT = "patient-7731-MRN"  # an argument value that must never leave the gateway

POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "start_dicom_export_job": {
            "action": "require_approval",
            "reason": "exports protected health information",
            "approval": {"ttl": "15m", "uses": 1, "notify": "#phi-exports"},
            "limits": [{"counter": "exports", "window": "minute", "max": 3}],
        },
        "delete_app": {"action": "require_approval", "approval": {"ttl": "2s"}},
        "containerize_app": {
            "action": "require_approval",
            "approval": {"uses": 3},
            "limits": [{"counter": "containerize", "window": "minute", "max": 1}],
        },
    },
}


@dataclass
class ApprovalStack:
    url: str
    admin_urls: list[str]
    record: Path
    authz: list[Proc]
    token_file: Path
    hooks: list[dict[str, Any]]

    def tools_reached(self) -> list[str]:
        if not self.record.exists():
            return []
        lines = [json.loads(line) for line in self.record.read_text().splitlines() if line]
        return [m["tool"] for r in lines for m in r["jsonrpc"] or [] if m["method"] == "tools/call"]

    def cli(self, replica: int, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *(str(BIN / "mcp-authz"), "approvals", "--url", self.admin_urls[replica]),
                *("--token-file", str(self.token_file), *args),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def audit(self) -> list[dict[str, Any]]:
        events = []
        for proc in self.authz:
            for line in proc.output().splitlines():
                if line.startswith("{") and '"event":"approval_' in line:
                    events.append(json.loads(line))
        return events


@contextlib.contextmanager
def _webhook_receiver(hooks: list[dict[str, Any]], port: int) -> Iterator[None]:
    """A real HTTP receiver for the approval webhook, in its own thread and loop."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner_box: list[web.AppRunner] = []

    async def receive(request: web.Request) -> web.Response:
        hooks.append(await request.json())
        return web.Response(text="ok")

    async def start() -> None:
        app = web.Application()
        app.router.add_post("/hook", receive)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runner_box.append(runner)
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop)
    ready.wait(10)
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(runner_box[0].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, transport: str) -> Iterator[ApprovalStack]:
    tmp = tmp_path_factory.mktemp("approvals")
    policy = tmp / "policy.json"
    policy.write_text(json.dumps(POLICY))
    tokens = tmp / "admin-tokens"
    tokens.write_text(TOKEN + "\n")
    token_file = tmp / "my-token"
    token_file.write_text(TOKEN.split(":", 1)[1])
    listen, admin, upstream, hook_port = (free_port() for _ in range(4))
    grpc_ports = [free_port(), free_port()]
    http_ports = [free_port(), free_port()]
    # The HTTP transport: each replica's ext_authz on a port of its own.
    check_ports = [free_port(), free_port()] if transport == "http" else []
    record = tmp / "record.jsonl"
    hooks: list[dict[str, Any]] = []
    with ExitStack() as es:
        es.enter_context(_webhook_receiver(hooks, hook_port))
        redis = es.enter_context(running_redis(tmp))
        es.enter_context(running(upstream_proc(tmp, upstream, record), upstream))
        procs = []
        for n, (grpc_port, http_port) in enumerate(zip(grpc_ports, http_ports, strict=True)):
            authz_http = check_ports[n] if check_ports else None
            proc = authz_proc(
                tmp,
                policy,
                grpc_port,
                http_port,
                ["--redis", redis.url],
                "--admin-tokens-file",
                str(tokens),
                "--approval-webhook",
                f"http://127.0.0.1:{hook_port}/hook",
                authz_http=authz_http,
            )
            procs.append(es.enter_context(running(proc, authz_http or grpc_port)))
        config = envoy_config(
            tmp,
            listen=listen,
            authz=grpc_ports,
            upstream=upstream,
            admin=admin,
            source=ENVOY_CONFIGS[transport],
            authz_http=check_ports,
        )
        es.enter_context(running(envoy_proc(tmp, config), listen))
        wait_ready(f"http://127.0.0.1:{admin}/ready")
        yield ApprovalStack(
            url=f"http://127.0.0.1:{listen}/mcp",
            admin_urls=[f"http://127.0.0.1:{p}" for p in http_ports],
            record=record,
            authz=procs,
            token_file=token_file,
            hooks=hooks,
        )


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer agent-{uuid.uuid4().hex}"}


async def pending_id(
    stack: ApprovalStack, tool: str, args: dict[str, Any], headers: dict[str, str]
) -> str:
    with pytest.raises(McpCallError) as info:
        await sdk_call_tool(stack.url, tool, args, headers)
    assert "requires human approval" in info.value.message, info.value.message
    assert info.value.data["reason"] == "approval_required"
    approval_id: str = info.value.data["approvalId"]
    assert approval_id in info.value.message
    return approval_id


EXPORT = {"datastoreId": "ds-1", "outputS3Uri": f"s3://approved-exports/{PATIENT}", "studyCount": 1}


async def test_pending_approve_once_then_pending_again(stack: ApprovalStack) -> None:
    agent = bearer()
    first = await pending_id(stack, "start_dicom_export_job", EXPORT, agent)
    assert await pending_id(stack, "start_dicom_export_job", EXPORT, agent) == first, (
        "no second request"
    )
    assert "start_dicom_export_job" not in stack.tools_reached()

    listed = stack.cli(0, "list")
    assert listed.returncode == 0, listed.stderr
    assert first in listed.stdout and "pending" in listed.stdout
    assert PATIENT not in listed.stdout
    # Approve through the other replica: the state is shared through Redis.
    approved = stack.cli(1, "approve", first)
    assert approved.returncode == 0, approved.stderr
    assert json.loads(approved.stdout)["state"] == "approved"

    text = await sdk_call_tool(stack.url, "start_dicom_export_job", EXPORT, agent)
    assert "ds-1" in text
    assert stack.tools_reached().count("start_dicom_export_job") == 1
    again = await pending_id(stack, "start_dicom_export_job", EXPORT, agent)
    assert again != first
    assert stack.tools_reached().count("start_dicom_export_job") == 1

    events = [(e["event"], e["approval_id"]) for e in stack.audit()]
    for event in ("approval_requested", "approval_approved", "approval_consumed"):
        assert (event, first) in events
    approved_line = next(e for e in stack.audit() if e["event"] == "approval_approved")
    assert approved_line["operator"] == "alice"
    # The webhook was told, without argument values.
    deadline = time.monotonic() + 10
    while not any(h["id"] == first for h in stack.hooks) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    notice = next(h for h in stack.hooks if h["id"] == first)
    assert notice["argument_names"] == ["datastoreId", "outputS3Uri", "studyCount"]
    assert notice["notify"] == "#phi-exports" and len(notice["arguments_sha256"]) == 64
    assert PATIENT not in json.dumps(stack.hooks)
    for proc in stack.authz:
        assert PATIENT not in proc.output()


async def test_changed_argument_needs_its_own_approval(stack: ApprovalStack) -> None:
    agent = bearer()
    first = await pending_id(stack, "start_dicom_export_job", EXPORT, agent)
    assert stack.cli(0, "approve", first).returncode == 0
    changed = {**EXPORT, "studyCount": 2}
    other = await pending_id(stack, "start_dicom_export_job", changed, agent)
    assert other != first
    # And another grant cannot use this grant's approval.
    assert await pending_id(stack, "start_dicom_export_job", EXPORT, bearer()) != first


async def test_reject_tells_the_agent_the_operators_reason(stack: ApprovalStack) -> None:
    agent = bearer()
    first = await pending_id(stack, "start_dicom_export_job", EXPORT, agent)
    rejected = stack.cli(0, "reject", first, "--reason", "wrong datastore for this study")
    assert rejected.returncode == 0, rejected.stderr
    with pytest.raises(McpCallError) as info:
        await sdk_call_tool(stack.url, "start_dicom_export_job", EXPORT, agent)
    assert info.value.data["reason"] == "approval_rejected"
    assert "wrong datastore for this study" in info.value.message
    second = stack.cli(1, "approve", first)
    assert second.returncode == 1 and "409" in second.stderr


async def test_unanswered_request_expires(stack: ApprovalStack) -> None:
    agent = bearer()
    first = await pending_id(stack, "delete_app", {"app_name": "prod"}, agent)
    await asyncio.sleep(2.3)
    assert stack.cli(0, "approve", first).returncode == 1  # expired: 404
    assert await pending_id(stack, "delete_app", {"app_name": "prod"}, agent) != first
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        expired = [e for e in stack.audit() if e["event"] == "approval_expired"]
        if any(e["approval_id"] == first for e in expired):
            break
        await asyncio.sleep(0.2)
    reports = [
        e for e in stack.audit() if e["event"] == "approval_expired" and e["approval_id"] == first
    ]
    assert len(reports) == 1, "each expiry is reported once across replicas"
    assert "delete_app" not in stack.tools_reached()


async def test_limits_still_apply_and_a_refused_use_is_given_back(stack: ApprovalStack) -> None:
    agent = bearer()
    args = {"app_path": "/srv/a"}
    first = await pending_id(stack, "containerize_app", args, agent)
    assert stack.cli(0, "approve", first).returncode == 0
    assert "/srv/a" in await sdk_call_tool(stack.url, "containerize_app", args, agent)
    with pytest.raises(McpCallError) as info:
        await sdk_call_tool(stack.url, "containerize_app", args, agent)
    assert info.value.data["reason"] == "rate_limited"
    shown = json.loads(stack.cli(1, "show", first).stdout)
    assert shown["uses_left"] == 2, "the rate-limited call did not use up an approval"


async def test_admin_api_is_not_reachable_through_envoy(stack: ApprovalStack) -> None:
    """An agent holding (or guessing) an admin token still cannot approve through Envoy."""
    agent = bearer()
    pending = await pending_id(stack, "start_dicom_export_job", EXPORT, agent)
    token = TOKEN.split(":", 1)[1]
    base = stack.url.removesuffix("/mcp")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    for path in (
        f"/admin/v1/approvals/{pending}/approve",
        f"/mcp/../admin/v1/approvals/{pending}/approve",
    ):
        resp = httpx.post(base + path, headers=headers, content=b"{}")
        assert resp.status_code in (404, 400, 415), resp.status_code
    listed = httpx.get(base + "/admin/v1/approvals", headers=headers)
    assert listed.status_code == 404 and pending not in listed.text
    shown = json.loads(stack.cli(0, "show", pending).stdout)
    assert shown["state"] == "pending"


def test_admin_api_refuses_wrong_or_missing_tokens(stack: ApprovalStack) -> None:
    url = stack.admin_urls[0] + "/admin/v1/approvals"
    assert httpx.get(url).status_code == 401
    assert (
        httpx.get(url, headers={"Authorization": "Bearer nope-nope-nope-nope"}).status_code == 401
    )
    assert httpx.get(url, headers={"Authorization": "Basic abc"}).status_code == 401
    ok = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN.split(':', 1)[1]}"})
    assert ok.status_code == 200 and "approvals" in ok.json()
    # The agent's own bearer token is no admin token.
    assert httpx.get(url, headers=bearer()).status_code == 401


async def test_paused_redis_answers_store_unavailable_with_an_audit_line(tmp_path: Path) -> None:
    """Redis frozen (SIGSTOP): a call that needs an approval gets mcp-authz's documented
    503 ``store_unavailable`` JSON-RPC reply within the store timeout, not Envoy's empty
    503 after its own ext_authz timeout, and the decision is audited."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    tokens = tmp_path / "admin-tokens"
    tokens.write_text(TOKEN + "\n")
    with (
        running_redis(tmp_path) as redis,
        mcp_stack(
            tmp_path,
            policy,
            ["--redis", redis.url],
            "--admin-tokens-file",
            str(tokens),
            "--store-timeout-ms",
            "50",
        ) as stack,
    ):
        agent = bearer()
        # The connection is open and the scripts are loaded before Redis freezes.
        with pytest.raises(McpCallError):
            await sdk_call_tool(stack.url, "delete_app", {"app_name": "a"}, agent)
        redis.pause()
        try:
            resp = httpx.post(
                stack.url,
                content=json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": 7,
                        "method": "tools/call",
                        "params": {"name": "delete_app", "arguments": {"app_name": "b"}},
                    }
                ),
                headers={
                    "content-type": "application/json",
                    "accept": "application/json, text/event-stream",
                    **agent,
                },
                timeout=10,
            )
        finally:
            redis.resume()
        audit_lines = [
            json.loads(line)
            for line in stack.authz.output().splitlines()
            if line.startswith("{") and '"decision"' in line
        ]
    assert resp.status_code == 503
    assert "x-mcp-authz-reason" in resp.headers, "answered by mcp-authz, not by Envoy"
    error = resp.json()["error"]
    assert error["code"] == -32053 and error["data"]["reason"] == "store_unavailable"
    assert resp.json()["id"] == 7
    assert "approval store unavailable" in error["message"]
    assert any(
        line["tool"] == "delete_app" and line["reason"] == "store_unavailable"
        for line in audit_lines
    ), audit_lines
