"""End to end: a real Envoy, mcp-authz with a real redis-server, a real MCP upstream built
with the official SDK, and real MCP clients (the official SDK and fastmcp).

The upstream records every request that reaches it, so "denied" is checked where it
matters: the call never got there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.redis_server import running_redis
from devstack.stack import Stack, mcp_stack
from tests.support.clients import (
    McpCallError,
    fastmcp_call_tool,
    fastmcp_list_tools,
    sdk_call_tool,
    sdk_list_tools,
)

pytestmark = pytest.mark.e2e

POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "start_dicom_export_job": {
            "limits": [
                {
                    "counter": "start_dicom_export_job_rate",
                    "window": "minute",
                    "max": 10,
                    "scope": "grant",
                }
            ]
        },
        "containerize_app": {"action": "allow"},
        "delete_app": {"action": "deny", "reason": "deleting an ECS service needs a human"},
    },
}

EXPORT_ARGS = {"datastoreId": "ds-1", "outputS3Uri": "s3://approved-exports/x", "studyCount": 1}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def new_token() -> str:
    return f"tok-{uuid.uuid4().hex}"


def grant_id(token: str) -> str:
    return "b-" + hashlib.sha256(token.encode()).hexdigest()[:24]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, transport: str) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e")
    policy = tmp / "policy.json"
    policy.write_text(json.dumps(POLICY))
    with (
        running_redis(tmp) as redis,
        mcp_stack(tmp, policy, ["--redis", redis.url], transport=transport) as s,
    ):
        yield s


def raw_post(
    stack: Stack, body: bytes | str, headers: dict[str, str] | None = None
) -> httpx.Response:
    base = {
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2025-11-25",
    }
    content = body.encode() if isinstance(body, str) else body
    return httpx.post(stack.url, content=content, headers={**base, **(headers or {})}, timeout=10)


def tool_call(name: str, id_: Any = 1, **arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }


def assert_denied(resp: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["x-mcp-authz-reason"].startswith("policy violation:")
    body = resp.json()
    first = body[0] if isinstance(body, list) else body
    assert first["error"]["message"].startswith("policy violation:")
    assert first["error"]["data"]["reason"] == reason
    return body  # type: ignore[no-any-return]


@pytest.mark.parametrize("client", ["sdk", "fastmcp"])
async def test_tools_list_passes_under_default_deny(stack: Stack, client: str) -> None:
    """Listing passes, filtered: only the tools the caller may use (tests/test_listing_e2e.py)."""
    list_tools = sdk_list_tools if client == "sdk" else fastmcp_list_tools
    tools = await list_tools(stack.url, bearer(new_token()))
    assert set(tools) == {"containerize_app", "start_dicom_export_job"}


@pytest.mark.parametrize("client", ["sdk", "fastmcp"])
async def test_allowed_call_reaches_upstream_with_the_grant(stack: Stack, client: str) -> None:
    call = sdk_call_tool if client == "sdk" else fastmcp_call_tool
    token = new_token()
    text = await call(stack.url, "containerize_app", {"app_path": "/srv/app"}, bearer(token))
    assert "/srv/app" in text
    calls = [
        r
        for r in stack.recorded()
        if any(m.get("tool") == "containerize_app" for m in r["jsonrpc"] or [])
    ]
    assert calls and calls[-1]["grant"] == grant_id(token)


async def test_session_era_client_through_the_gateway(stack: Stack) -> None:
    """A 2025-11-25 client: initialize, Mcp-Session-Id, a GET stream and a DELETE on close
    all pass; its calls are decided like any other (no SEP-2243 headers in this era)."""
    token = new_token()
    before = len(stack.recorded())
    text = await sdk_call_tool(
        stack.url, "containerize_app", {"app_path": "/legacy"}, bearer(token), mode="legacy"
    )
    assert "/legacy" in text
    with pytest.raises(McpCallError) as info:
        await sdk_call_tool(
            stack.url, "delete_app", {"app_name": "prod"}, bearer(token), mode="legacy"
        )
    assert "deleting an ECS service needs a human" in info.value.message
    seen = stack.recorded()[before:]
    methods = [m["method"] for r in seen for m in r["jsonrpc"] or []]
    assert "initialize" in methods and "server/discover" not in methods
    assert {"GET", "DELETE"} & {r["http_method"] for r in seen}
    assert "mcp-session-id" in {h for r in seen for h in r["headers"]}
    assert [m["tool"] for r in seen for m in r["jsonrpc"] or [] if m["tool"]] == [
        "containerize_app"
    ]


@pytest.mark.parametrize("client", ["sdk", "fastmcp"])
async def test_denied_call_never_reaches_upstream_and_client_sees_reason(
    stack: Stack, client: str
) -> None:
    call = sdk_call_tool if client == "sdk" else fastmcp_call_tool
    before = stack.recorded_tools().count("delete_app")
    with pytest.raises(McpCallError) as info:
        await call(stack.url, "delete_app", {"app_name": "prod"}, bearer(new_token()))
    assert "policy violation" in info.value.message
    assert "deleting an ECS service needs a human" in info.value.message
    assert info.value.code == -32051
    assert stack.recorded_tools().count("delete_app") == before


async def test_unnamed_tool_falls_to_default_deny(stack: Stack) -> None:
    with pytest.raises(McpCallError) as info:
        await sdk_call_tool(
            stack.url,
            "ecs_resource_management",
            {"action": "list", "resource_type": "cluster"},
            bearer(new_token()),
        )
    assert "default deny" in info.value.message
    assert "ecs_resource_management" not in stack.recorded_tools()


async def test_eleventh_call_in_a_minute_is_rate_limited_per_grant(stack: Stack) -> None:
    token = new_token()
    for i in range(10):
        resp = raw_post(
            stack, json.dumps(tool_call("start_dicom_export_job", i, **EXPORT_ARGS)), bearer(token)
        )
        assert resp.status_code != 429 and "x-mcp-authz-reason" not in resp.headers, resp.text
    limited = raw_post(
        stack, json.dumps(tool_call("start_dicom_export_job", 10, **EXPORT_ARGS)), bearer(token)
    )
    body = assert_denied(limited, 429, "rate_limited")
    assert body["id"] == 10
    assert body["error"]["code"] == -32052
    retry_after = int(limited.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert body["error"]["data"]["retryAfter"] == retry_after
    assert body["error"]["data"]["counter"] == "start_dicom_export_job_rate"
    # The SDK client surfaces the same reason.
    with pytest.raises(McpCallError) as info:
        await sdk_call_tool(stack.url, "start_dicom_export_job", EXPORT_ARGS, bearer(token))
    assert "rate limit exceeded" in info.value.message
    # A second grant has its own budget: its call goes through to the upstream.
    text = await sdk_call_tool(
        stack.url, "start_dicom_export_job", EXPORT_ARGS, bearer(new_token())
    )
    assert "ds-1" in text


def test_header_body_mismatch_is_denied_before_upstream(stack: Stack) -> None:
    before = len(stack.recorded())
    body = json.dumps(tool_call("delete_app", 5))
    resp = raw_post(
        stack,
        body,
        {**bearer(new_token()), "mcp-method": "tools/call", "mcp-name": "containerize_app"},
    )
    reply = assert_denied(resp, 400, "header_mismatch")
    # MCP 2026-07-28's HeaderMismatch code, echoing the request id.
    assert (reply["error"]["code"], reply["id"]) == (-32020, 5)
    encoded = "=?base64?" + base64.b64encode(b"containerize_app").decode() + "?="
    resp = raw_post(stack, body, {**bearer(new_token()), "mcp-name": encoded})
    assert_denied(resp, 400, "header_mismatch")
    assert len(stack.recorded()) == before


def test_duplicate_keys_are_denied_before_upstream(stack: Stack) -> None:
    before = len(stack.recorded())
    smuggled = (
        '{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        '"params":{"name":"containerize_app","name":"delete_app","arguments":{}}}'
    )
    assert_denied(raw_post(stack, smuggled, bearer(new_token())), 400, "malformed_request")
    assert len(stack.recorded()) == before


def test_batch_smuggling_is_denied_whole(stack: Stack) -> None:
    before = len(stack.recorded())
    batch = [
        tool_call("containerize_app", 1, app_path="/a"),
        tool_call("delete_app", 2, app_name="prod"),
    ]
    resp = raw_post(stack, json.dumps(batch), bearer(new_token()))
    body = assert_denied(resp, 403, "denied_by_rule")
    assert [r["id"] for r in body] == [1, 2]
    assert body[0]["error"]["data"]["element"] == 1
    assert "batch element 1" in body[0]["error"]["message"]
    assert len(stack.recorded()) == before


def test_spoofed_authz_headers_are_replaced(stack: Stack) -> None:
    token = new_token()
    headers = {**bearer(token), "x-mcp-authz-grant": "someone-else", "x-mcp-authz-extra": "x"}
    raw_post(stack, json.dumps(tool_call("containerize_app", 1, app_path="/x")), headers)
    last = stack.recorded()[-1]
    assert last["grant"] == grant_id(token)
    assert "x-mcp-authz-extra" not in last["headers"]


def test_missing_grant_identity_is_denied(stack: Stack) -> None:
    resp = raw_post(stack, json.dumps(tool_call("containerize_app", 1, app_path="/x")))
    body = assert_denied(resp, 403, "no_grant_identity")
    assert "no grant identity" in body["error"]["message"]


def test_gzip_body_is_refused(stack: Stack) -> None:
    import gzip

    resp = raw_post(
        stack,
        gzip.compress(json.dumps(tool_call("delete_app")).encode()),
        {**bearer(new_token()), "content-encoding": "gzip"},
    )
    assert_denied(resp, 415, "unsupported_media_type")


def test_grant_header_mode_strips_client_copies(tmp_path: Path, transport: str) -> None:
    """With --grant-header, Envoy removes the client's copy before mcp-authz reads it."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    with mcp_stack(
        tmp_path,
        policy,
        ["--store", "memory"],
        "--grant-header",
        "x-mcp-grant",
        transport=transport,
    ) as s:
        resp = raw_post(
            s, json.dumps(tool_call("containerize_app", 1, app_path="/x")), {"x-mcp-grant": "alice"}
        )
        assert_denied(resp, 403, "no_grant_identity")
        assert s.recorded_tools() == []


def test_authz_down_fails_closed(tmp_path: Path, transport: str) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    with mcp_stack(tmp_path, policy, ["--store", "memory"], transport=transport) as s:
        s.authz.stop()
        for body in (
            tool_call("containerize_app", 1, app_path="/x"),
            {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        ):
            resp = raw_post(s, json.dumps(body), bearer(new_token()))
            assert resp.status_code == 503
        assert s.recorded() == []
