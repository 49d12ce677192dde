"""MCP 2026-07-28 end to end: a real Envoy, mcp-authz with a real redis-server, the demo
MCP upstream (official SDK, which serves that revision statelessly) and the official SDK
client.

Budgets: the revision has no sessions, so a made-up ``Mcp-Session-Id`` must not open a
session budget; session-scoped limits count against the grant. Headers: what the spec
requires of a POST, and what a gateway that reads the body must refuse. Each refusal is
checked where it matters, in the upstream's own record.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devstack.redis_server import running_redis
from devstack.stack import Stack, mcp_stack
from tests.support.clients import McpCallError, sdk_call_tool

pytestmark = pytest.mark.e2e

MODERN = "2026-07-28"
META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientInfo": {"name": "protocol-2026-test", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}

POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "containerize_app": {
            "limits": [{"counter": "per_session", "window": "hour", "max": 2, "scope": "session"}]
        },
        "delete_app": {"action": "deny", "reason": "deleting needs a human"},
        # The parameters the tool's inputSchema would mark x-mcp-header (SEP-2243).
        "start_dicom_export_job": {
            "arguments": {
                "type": "object",
                "properties": {
                    "datastoreId": {"type": "string", "x-mcp-header": "Datastore"},
                    "studyCount": {"type": "integer", "x-mcp-header": "Study-Count"},
                },
            }
        },
    },
    "resources": {
        "ecs://clusters/*": {},
        "patient://*": {"action": "deny", "reason": "no patient records"},
    },
}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def new_token() -> str:
    return f"tok-{uuid.uuid4().hex}"


def grant_id(token: str) -> str:
    return "b-" + hashlib.sha256(token.encode()).hexdigest()[:24]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("protocol-2026")
    policy = tmp / "policy.json"
    policy.write_text(json.dumps(POLICY))
    with running_redis(tmp) as redis, mcp_stack(tmp, policy, ["--redis", redis.url]) as s:
        yield s


def modern_call(name: str, id_: Any = 1, **arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments, "_meta": META},
    }


def post(stack: Stack, doc: object, headers: dict[str, str]) -> httpx.Response:
    base = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    return httpx.post(stack.url, content=json.dumps(doc), headers={**base, **headers}, timeout=10)


def modern_headers(doc: dict[str, Any], token: str, **extra: str) -> dict[str, str]:
    headers = {"mcp-protocol-version": MODERN, "mcp-method": doc["method"], **bearer(token)}
    name = doc["params"].get("name", doc["params"].get("uri"))
    if name is not None:
        headers["mcp-name"] = name
    return {**headers, **extra}


def calls_reaching(stack: Stack, token: str, tool: str) -> int:
    return sum(
        1
        for r in stack.recorded()
        if r["grant"] == grant_id(token)
        for m in (r["jsonrpc"] or [])
        if m.get("method") == "tools/call" and m.get("tool") == tool
    )


def assert_denied(resp: httpx.Response, status: int, reason: str, code: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    reply: dict[str, Any] = resp.json()
    assert reply["error"]["code"] == code, reply
    assert reply["error"]["data"]["reason"] == reason
    assert reply["error"]["message"].startswith("policy violation:")
    return reply


# --- budgets: no session on a sessionless revision -----------------------------------------


def test_a_new_session_id_per_call_gets_no_new_session_budget(stack: Stack) -> None:
    token = new_token()
    statuses = []
    for i in range(6):
        doc = modern_call("containerize_app", i, app_path="/srv")
        headers = modern_headers(doc, token, **{"mcp-session-id": uuid.uuid4().hex})
        statuses.append(post(stack, doc, headers).status_code)
    assert statuses == [200, 200, 429, 429, 429, 429]
    assert calls_reaching(stack, token, "containerize_app") == 2


def test_a_spent_budget_is_not_reopened_by_adding_a_session_id(stack: Stack) -> None:
    token = new_token()
    for i in range(2):
        doc = modern_call("containerize_app", i, app_path="/srv")
        assert post(stack, doc, modern_headers(doc, token)).status_code == 200
    doc = modern_call("containerize_app", 9, app_path="/srv")
    refused = post(stack, doc, modern_headers(doc, token))
    assert_denied(refused, 429, "rate_limited", -32052)
    for session in ("x0", "x1"):
        resp = post(stack, doc, modern_headers(doc, token, **{"mcp-session-id": session}))
        reply = assert_denied(resp, 429, "rate_limited", -32052)
        assert reply["id"] == 9
    assert calls_reaching(stack, token, "containerize_app") == 2


async def test_the_official_client_with_made_up_session_ids_gets_two_calls(stack: Stack) -> None:
    """The SDK client speaks 2026-07-28 to this upstream; a session header it is told to
    send on every request changes nothing."""
    token = new_token()
    results: list[str | int | None] = []
    for _ in range(4):
        headers = {**bearer(token), "Mcp-Session-Id": uuid.uuid4().hex}
        try:
            text = await sdk_call_tool(stack.url, "containerize_app", {"app_path": "/a"}, headers)
            results.append(text.split(":")[0])
        except McpCallError as exc:
            results.append(exc.code)
    assert results == ["Containerized /a", "Containerized /a", -32052, -32052]
    assert calls_reaching(stack, token, "containerize_app") == 2


# --- the headers a 2026-07-28 POST must carry ----------------------------------------------


def test_required_headers_and_the_protocol_version(stack: Stack) -> None:
    token = new_token()
    before = len(stack.recorded())
    doc = modern_call("containerize_app", "r-1", app_path="/srv")
    full = modern_headers(doc, token)
    for missing in ("mcp-method", "mcp-name"):
        headers = {k: v for k, v in full.items() if k != missing}
        reply = assert_denied(post(stack, doc, headers), 400, "header_mismatch", -32020)
        assert reply["id"] == "r-1"
    session_era = {**full, "mcp-protocol-version": "2025-11-25"}
    assert_denied(post(stack, doc, session_era), 400, "header_mismatch", -32020)
    unknown = {**full, "mcp-protocol-version": "2099-01-01"}
    reply = assert_denied(post(stack, doc, unknown), 400, "unsupported_protocol_version", -32022)
    assert reply["id"] == "r-1"
    assert reply["error"]["data"]["requested"] == "2099-01-01"
    assert MODERN in reply["error"]["data"]["supported"]
    assert len(stack.recorded()) == before
    # The same request with every header reaches the upstream and runs.
    ok = post(stack, doc, full)
    assert ok.status_code == 200 and "Containerized /srv" in ok.text


# --- subscriptions/listen: lifecycle, with the resources it subscribes to governed ---------


def listen(*uris: str, id_: Any = 1) -> dict[str, Any]:
    notifications: dict[str, Any] = {"toolsListChanged": True}
    if uris:
        notifications["resourceSubscriptions"] = list(uris)
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "subscriptions/listen",
        "params": {"notifications": notifications, "_meta": META},
    }


def open_listen(stack: Stack, doc: dict[str, Any], token: str) -> tuple[int, str, str]:
    """Open the stream, read its first line, hang up (it stays open otherwise)."""
    headers = {
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        **modern_headers(doc, token),
    }
    with httpx.stream(
        "POST", stack.url, content=json.dumps(doc), headers=headers, timeout=10
    ) as resp:
        first = next(resp.iter_lines(), "") if resp.status_code == 200 else resp.read().decode()
        return resp.status_code, resp.headers.get("content-type", ""), first


def listens_reaching(stack: Stack, token: str) -> int:
    return sum(
        1
        for r in stack.recorded()
        if r["grant"] == grant_id(token)
        for m in (r["jsonrpc"] or [])
        if m.get("method") == "subscriptions/listen"
    )


def test_subscriptions_listen_passes_and_a_denied_resource_in_it_is_refused(
    stack: Stack,
) -> None:
    token = new_token()
    for doc in (listen(), listen("ecs://clusters/default")):
        status, content_type, _ = open_listen(stack, doc, token)
        assert status == 200 and content_type.startswith("text/event-stream")
    assert listens_reaching(stack, token) == 2
    for uri, reason in (
        ("patient://p-0042", "denied_by_rule"),
        ("file:///etc/passwd", "denied_by_default"),
    ):
        doc = listen("ecs://clusters/default", uri, id_="L-1")
        resp = post(stack, doc, modern_headers(doc, token))
        reply = assert_denied(resp, 403, reason, -32051)
        assert reply["id"] == "L-1"
        assert uri not in resp.text
    assert listens_reaching(stack, token) == 2


# --- Mcp-Param-{Name}: the parameters marked x-mcp-header agree with the arguments ---------


def test_param_headers_must_agree_with_the_arguments(stack: Stack) -> None:
    token = new_token()
    args = {"datastoreId": "ds-ü", "outputS3Uri": "s3://exports/x", "studyCount": 3}
    doc = modern_call("start_dicom_export_job", "p-1", **args)
    encoded = "=?base64?" + base64.b64encode("ds-ü".encode()).decode() + "?="
    good = modern_headers(
        doc, token, **{"Mcp-Param-Datastore": encoded, "Mcp-Param-Study-Count": "3"}
    )
    before = calls_reaching(stack, token, "start_dicom_export_job")
    for changed in (
        {"Mcp-Param-Study-Count": "30"},  # routes or counts on another amount
        {"Mcp-Param-Datastore": "ds-other"},  # on another datastore
        {"Mcp-Param-Datastore": "=?base64?ZHMtw7w?="},  # bad base64 (no padding)
    ):
        resp = post(stack, doc, {**good, **changed})
        reply = assert_denied(resp, 400, "header_mismatch", -32020)
        assert reply["id"] == "p-1"
        assert "ds-" not in reply["error"]["message"]
    missing = {k: v for k, v in good.items() if k != "Mcp-Param-Study-Count"}
    assert_denied(post(stack, doc, missing), 400, "header_mismatch", -32020)
    assert calls_reaching(stack, token, "start_dicom_export_job") == before
    ok = post(stack, doc, good)
    assert ok.status_code == 200 and "Export job" in ok.text
    assert calls_reaching(stack, token, "start_dicom_export_job") == before + 1
