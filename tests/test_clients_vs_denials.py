"""How the real MCP clients surface a gateway's denial (decides our denial format).

A pure-ASGI "gate" stands in front of the real demo upstream app (examples/demo_upstream.py)
and answers selected JSON-RPC messages itself, like our Envoy + ext_authz gateway does:
HTTP status 200/403/429/503, `content-type: application/json`, and a JSON-RPC error
carrying the request's id. Everything else is passed through to the MCP server.

Findings pinned here (mcp 2.3.0 / fastmcp 4.2.3, both on the SDK's streamable HTTP transport):
* a JSON-RPC error body reaches the caller as `mcp.shared.exceptions.MCPError` with the
  exact code, message and data, whatever the status (200, 403, 429, 503); no retries;
* a non-JSON-RPC body at 4xx/5xx loses the message: MCPError(-32603, "Server returned an
  error response");
* after calling a tool it has not listed, each client sends `tools/list` itself (output-schema
  check), so denying `tools/list` fails an otherwise allowed `tools/call` (after it ran);
* denying `initialize` fails the connect with the denial's MCPError; denying `server/discover`
  only makes "auto" mode fall back to the `initialize` handshake; a denied notification
  (`notifications/initialized`) is silently ignored by the client.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import uvicorn
from mcp.shared.exceptions import MCPError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.support.clients import (
    McpCallError,
    fastmcp_call_tool,
    fastmcp_list_tools,
    sdk_call_tool,
    sdk_list_tools,
)

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo_upstream.py"
HEADERS = {"Authorization": "Bearer abc"}
DENIAL_CODE = -32051
DENIAL_DATA = {"reason": "denied_by_rule"}
TOOL_DENIAL = "policy violation: tool 'delete_app' denied"

CallTool = Callable[..., Awaitable[str]]
CALLERS: dict[str, CallTool] = {"sdk": sdk_call_tool, "fastmcp": fastmcp_call_tool}
LISTERS: dict[str, Callable[..., Awaitable[list[str]]]] = {
    "sdk": sdk_list_tools,
    "fastmcp": fastmcp_list_tools,
}


@dataclass
class Seen:
    http_method: str
    headers: dict[str, str]
    body: Any


@dataclass
class Gate:
    """What to deny and how; keys are JSON-RPC methods, or `tools/call:<tool>`."""

    deny: set[str] = field(default_factory=set)
    status: int = 403
    body: str = "jsonrpc"  # or "text" / "json" (JSON, but not a JSON-RPC error)
    seen: list[Seen] = field(default_factory=list)

    def methods(self) -> list[str]:
        return [s.body.get("method", "?") if s.body else s.http_method for s in self.seen]


def _key(msg: dict[str, Any]) -> str:
    method = str(msg.get("method"))
    params = msg.get("params")
    if method == "tools/call" and isinstance(params, dict):
        return f"tools/call:{params.get('name')}"
    return method


def _denial(gate: Gate, msg: dict[str, Any]) -> tuple[bytes, bytes]:
    key = _key(msg)
    what = f"tool '{key.split(':', 1)[1]}'" if key.startswith("tools/call:") else f"method '{key}'"
    text = f"policy violation: {what} denied"
    if gate.body == "text":
        return b"text/plain", text.encode()
    if gate.body == "json":
        return b"application/json", json.dumps({"error": text}).encode()
    error = {"code": DENIAL_CODE, "message": text, "data": DENIAL_DATA}
    body = {"jsonrpc": "2.0", "id": msg.get("id"), "error": error}
    return b"application/json", json.dumps(body).encode()


class GateMiddleware:
    def __init__(self, app: ASGIApp, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        raw = b"".join(chunks)
        try:
            msg = json.loads(raw) if raw else None
        except ValueError:
            msg = None
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.gate.seen.append(Seen(scope["method"], headers, msg))
        if isinstance(msg, dict) and _key(msg) in self.gate.deny:
            content_type, body = _denial(self.gate, msg)
            await send(
                {
                    "type": "http.response.start",
                    "status": self.gate.status,
                    "headers": [(b"content-type", content_type)],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}

        await self.app(scope, replay, send)


def _load_demo() -> ModuleType:
    # MCPServer() calls logging.basicConfig; keep the root logger as pytest set it up.
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    spec = importlib.util.spec_from_file_location("demo_upstream_under_test", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root.setLevel(level)
    root.handlers[:] = handlers
    return module


@pytest.fixture(scope="module")
def gated() -> Iterator[tuple[Gate, str]]:
    gate = Gate()
    app = GateMiddleware(_load_demo().mcp.streamable_http_app(), gate)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "gate server did not start"
        time.sleep(0.02)
    yield gate, f"http://127.0.0.1:{port}/mcp"
    server.should_exit = True
    thread.join(10)
    sock.close()
    assert not thread.is_alive()


@pytest.fixture
def gate(gated: tuple[Gate, str]) -> Gate:
    g = gated[0]
    g.deny, g.status, g.body, g.seen = set(), 403, "jsonrpc", []
    return g


@pytest.fixture
def url(gated: tuple[Gate, str]) -> str:
    return gated[1]


def _assert_denial(err: McpCallError, message: str) -> None:
    assert "policy violation" in err.message
    assert err.message == message
    assert err.code == DENIAL_CODE
    assert err.data == DENIAL_DATA
    assert type(err.__cause__) is MCPError  # both clients raise the SDK's MCPError


@pytest.mark.parametrize("status", [200, 403, 429, 503])
@pytest.mark.parametrize("mode", ["auto", "legacy"])
@pytest.mark.parametrize("client", ["sdk", "fastmcp"])
async def test_tool_denial_surfaces_message(
    gate: Gate, url: str, client: str, mode: str, status: int
) -> None:
    gate.deny, gate.status = {"tools/call:delete_app"}, status
    with pytest.raises(McpCallError) as caught:
        await CALLERS[client](url, "delete_app", {"app_name": "web"}, HEADERS, mode=mode)
    _assert_denial(caught.value, TOOL_DENIAL)
    assert gate.methods().count("tools/call") == 1  # no retry on 429/503


@pytest.mark.parametrize("status", [403, 429, 503])
@pytest.mark.parametrize("client", ["sdk", "fastmcp"])
async def test_initialize_denial_fails_the_connect(
    gate: Gate, url: str, client: str, status: int
) -> None:
    gate.deny, gate.status = {"initialize"}, status
    with pytest.raises(McpCallError) as caught:
        await LISTERS[client](url, HEADERS, mode="legacy")
    _assert_denial(caught.value, "policy violation: method 'initialize' denied")
    assert gate.methods() == ["initialize"]


@pytest.mark.parametrize("client", ["sdk", "fastmcp"])
async def test_auto_mode_needs_discover_and_initialize_denied(
    gate: Gate, url: str, client: str
) -> None:
    # Denying server/discover alone is not fatal: "auto" falls back to the handshake.
    gate.deny = {"server/discover"}
    assert "Containerized" in await CALLERS[client](
        url, "containerize_app", {"app_path": "/src"}, HEADERS
    )
    assert gate.methods()[:3] == ["server/discover", "initialize", "notifications/initialized"]
    assert gate.seen[-1].headers["mcp-protocol-version"] == "2025-11-25"

    gate.deny, gate.seen = {"server/discover", "initialize"}, []
    with pytest.raises(McpCallError) as caught:
        await LISTERS[client](url, HEADERS)
    _assert_denial(caught.value, "policy violation: method 'initialize' denied")
    assert gate.methods() == ["server/discover", "initialize"]


@pytest.mark.parametrize("status", [403, 503])
@pytest.mark.parametrize("client", ["sdk", "fastmcp"])
async def test_denied_initialized_notification_is_ignored(
    gate: Gate, url: str, client: str, status: int
) -> None:
    gate.deny, gate.status = {"notifications/initialized"}, status
    text = await CALLERS[client](
        url, "containerize_app", {"app_path": "/src"}, HEADERS, mode="legacy"
    )
    assert text.startswith("Containerized /src")
    assert "notifications/initialized" in gate.methods()


@pytest.mark.parametrize("mode", ["auto", "legacy"])
@pytest.mark.parametrize("client", ["sdk", "fastmcp"])
async def test_denied_tools_list_fails_an_allowed_call(
    gate: Gate, url: str, client: str, mode: str
) -> None:
    # The tool runs upstream, then the client's own follow-up tools/list (output-schema
    # check) is denied and call_tool raises: allow tools/list wherever tools/call is allowed.
    gate.deny = {"tools/list"}
    with pytest.raises(McpCallError) as caught:
        await CALLERS[client](url, "containerize_app", {"app_path": "/src"}, HEADERS, mode=mode)
    _assert_denial(caught.value, "policy violation: method 'tools/list' denied")
    methods = gate.methods()
    assert methods.index("tools/call") < methods.index("tools/list")


@pytest.mark.parametrize("body", ["text", "json"])
@pytest.mark.parametrize("client", ["sdk", "fastmcp"])
async def test_non_jsonrpc_denial_body_loses_the_message(
    gate: Gate, url: str, client: str, body: str
) -> None:
    gate.deny, gate.body = {"tools/call:delete_app"}, body
    with pytest.raises(McpCallError) as caught:
        await CALLERS[client](url, "delete_app", {"app_name": "web"}, HEADERS)
    assert caught.value.code == -32603
    assert caught.value.message == "Server returned an error response"


@pytest.mark.parametrize("client", ["sdk", "fastmcp"])
async def test_wire_shape_of_allowed_calls(gate: Gate, url: str, client: str) -> None:
    # "auto" (both clients' default) speaks stateless 2026-07-28: no initialize, no session.
    args = {"app_path": "/src", "port": 9000}
    text = await CALLERS[client](url, "containerize_app", args, HEADERS)
    assert text.startswith("Containerized /src") and "9000" in text
    # After a call to a tool it has not listed yet, the client lists tools itself to
    # validate the result against the tool's output schema.
    assert gate.methods() == ["server/discover", "tools/call", "tools/list"]
    call = gate.seen[1]
    print(f"\n[{client} auto] {call.http_method} {sorted(call.headers.items())}\n{call.body}")
    assert call.headers["mcp-protocol-version"] == "2026-07-28"
    assert call.headers["mcp-method"] == "tools/call"
    assert call.headers["mcp-name"] == "containerize_app"
    assert call.headers["authorization"] == "Bearer abc"
    assert not any("mcp-session-id" in s.headers for s in gate.seen)
    assert call.body["params"]["name"] == "containerize_app"
    assert call.body["params"]["arguments"] == args
    assert call.body["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] == "2026-07-28"

    # "legacy": initialize handshake, Mcp-Session-Id, GET stream, DELETE; no Mcp-Method/Name.
    gate.seen = []
    await CALLERS[client](url, "containerize_app", args, HEADERS, mode="legacy")
    methods = gate.methods()
    assert methods[:2] == ["initialize", "notifications/initialized"]
    assert sorted(methods[2:4]) == ["GET", "tools/call"]  # the GET stream races the call
    assert methods[4:] == ["tools/list", "DELETE"]
    call = next(s for s in gate.seen if s.body and s.body.get("method") == "tools/call")
    print(f"[{client} legacy] {call.http_method} {sorted(call.headers.items())}\n{call.body}")
    assert call.headers["mcp-protocol-version"] == "2025-11-25"
    assert "mcp-session-id" in call.headers
    assert "mcp-method" not in call.headers and "mcp-name" not in call.headers
    assert "mcp-session-id" not in gate.seen[0].headers
