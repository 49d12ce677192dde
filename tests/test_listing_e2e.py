"""List filtering end to end: the shipped envoy/envoy.yaml, mcp-authz serving ext_authz
and ext_proc on one port, and real upstreams: the demo MCP server (official SDK, JSON
replies), a scripted upstream for the forms and faults no well-behaved server sends, and
the real awslabs ECS MCP server (FastMCP, SSE replies) when it is installed.

What each test proves is read from where it shows: the clients' own list_tools, the
upstream's record of what reached it, and Envoy's ext_proc stats (a stream per list
request, none for anything else).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devstack.stack import (
    ENVOY_CONFIGS,
    ROOT,
    Proc,
    Stack,
    authz_proc,
    envoy_config,
    envoy_proc,
    free_port,
    mcp_stack,
    running,
    upstream_proc,
    wait_ready,
)
from tests.support.clients import (
    McpCallError,
    fastmcp_list_tools,
    sdk_call_tool,
    sdk_list_tools,
)

pytestmark = pytest.mark.e2e

POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "containerize_app": {},
        "delete_app": {"action": "deny", "reason": "deleting an ECS service needs a human"},
        "start_dicom_export_job": {"action": "require_approval"},
        "ecs_troubleshooting_tool": {
            "limits": [{"counter": "troubleshooting", "window": "minute", "max": 1}]
        },
        "slow": {},
    },
    "prompts": {"deploy_checklist": {}},
    "resources": {"ecs://*": {}},
}
PERMITTED_DEMO_TOOLS = {"containerize_app", "start_dicom_export_job", "ecs_troubleshooting_tool"}
# The real ECS server's tools the policy permits (it has no start_dicom_export_job).
PERMITTED_ECS_TOOLS = {"containerize_app", "ecs_troubleshooting_tool"}

BASE_HEADERS = {
    "content-type": "application/json",
    "accept": "application/json, text/event-stream",
}
# MCP 2026-07-28 (stateless): each request carries the protocol version in its _meta.
ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer tok-{uuid.uuid4().hex}"}


@contextlib.contextmanager
def stack_with(
    tmp: Path, upstream: Proc, upstream_port: int, transport: str
) -> Iterator[tuple[Stack, int]]:
    """Envoy (the shipped config of ``transport``) -> mcp-authz (memory store) ->
    ``upstream``; yields the stack and Envoy's admin port. The list filter is on the gRPC
    port on either transport."""
    listen, admin, grpc_port, http_port = (free_port() for _ in range(4))
    authz_http = free_port() if transport == "http" else None
    policy = tmp / "policy.json"
    policy.write_text(json.dumps(POLICY))
    config = envoy_config(
        tmp,
        listen=listen,
        authz=grpc_port,
        upstream=upstream_port,
        admin=admin,
        source=ENVOY_CONFIGS[transport],
        authz_http=authz_http or (),
    )
    authz = authz_proc(
        tmp, policy, grpc_port, http_port, ["--store", "memory"], authz_http=authz_http
    )
    with (
        running(upstream, upstream_port) as up,
        running(authz, authz_http or grpc_port),
        running(envoy_proc(tmp, config), listen) as envoy,
    ):
        wait_ready(f"http://127.0.0.1:{admin}/ready")
        stack = Stack(
            url=f"http://127.0.0.1:{listen}/mcp",
            record=tmp / "upstream-record.jsonl",
            authz=authz,
            envoy=envoy,
            upstream=up,
            tmp=tmp,
        )
        yield stack, admin


def ext_proc_streams(admin: int) -> int:
    stats = httpx.get(f"http://127.0.0.1:{admin}/stats?filter=ext_proc.streams_started").text
    return sum(int(line.rsplit(":", 1)[1]) for line in stats.splitlines() if line.strip())


def post(url: str, payload: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    """POST as a 2026-07-28 client does (SEP-2243 headers for a single request)."""
    sent = {**BASE_HEADERS, "mcp-protocol-version": "2026-07-28"}
    if isinstance(payload, dict):
        sent["mcp-method"] = payload["method"]
        if "name" in payload["params"]:
            sent["mcp-name"] = payload["params"]["name"]
    return httpx.post(
        url, content=json.dumps(payload), headers={**sent, **(headers or {})}, timeout=10
    )


def rpc(method: str, id_: Any = 1, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": {"_meta": ENVELOPE, **params}}


def sse_messages(text: str) -> list[Any]:
    return [
        json.loads(line[5:])
        for line in text.splitlines()
        if line.startswith("data:") and line[5:].strip()
    ]


# --- the demo upstream (official SDK server, JSON replies) -------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, transport: str) -> Iterator[tuple[Stack, int]]:
    tmp = tmp_path_factory.mktemp("listing-demo")
    port = free_port()
    upstream = upstream_proc(tmp, port, tmp / "upstream-record.jsonl")
    with stack_with(tmp, upstream, port, transport) as pair:
        yield pair


@pytest.mark.parametrize("client", ["sdk", "fastmcp"])
@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_clients_list_exactly_the_permitted_tools(
    demo: tuple[Stack, int], client: str, mode: str
) -> None:
    stack, _ = demo
    list_tools = sdk_list_tools if client == "sdk" else fastmcp_list_tools
    assert set(await list_tools(stack.url, bearer(), mode=mode)) == PERMITTED_DEMO_TOOLS


async def test_hidden_tool_called_anyway_is_still_denied(demo: tuple[Stack, int]) -> None:
    stack, _ = demo
    with pytest.raises(McpCallError) as info:
        await sdk_call_tool(stack.url, "delete_app", {"app_name": "prod"}, bearer())
    assert info.value.data["reason"] == "denied_by_rule"
    assert "delete_app" not in stack.recorded_tools()


async def test_rate_limited_tool_stays_listed(demo: tuple[Stack, int]) -> None:
    stack, _ = demo
    caller = bearer()
    await sdk_call_tool(stack.url, "ecs_troubleshooting_tool", {"app_name": "a"}, caller)
    with pytest.raises(McpCallError) as info:
        await sdk_call_tool(stack.url, "ecs_troubleshooting_tool", {"app_name": "a"}, caller)
    assert info.value.data["reason"] == "rate_limited"
    assert "ecs_troubleshooting_tool" in await sdk_list_tools(stack.url, caller)


def test_caller_without_a_grant_sees_no_tools(demo: tuple[Stack, int]) -> None:
    """Every tools/call needs a grant, so a caller without one can use none."""
    stack, _ = demo
    response = post(stack.url, rpc("tools/list"))
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert result["tools"] == []
    assert result["cacheScope"] == "private"  # MCP 2026-07-28: the list varies per caller


def test_prompts_and_resources_are_filtered_by_their_rules(demo: tuple[Stack, int]) -> None:
    stack, _ = demo
    response = post(stack.url, rpc("prompts/list"), bearer())
    prompts = response.json()["result"]["prompts"]
    assert [p["name"] for p in prompts] == ["deploy_checklist"]
    length = response.headers.get("content-length")  # the body changed: dropped or right
    assert length is None or int(length) == len(response.content)
    resources = post(stack.url, rpc("resources/list"), bearer()).json()["result"]["resources"]
    assert [r["uri"] for r in resources] == ["ecs://clusters/default"]


def test_only_list_requests_open_an_ext_proc_stream(demo: tuple[Stack, int]) -> None:
    """Envoy's own stats: a tools/list opens one ext_proc stream; calls, discovery and
    requests carrying a forged list mark open none."""
    stack, admin = demo
    caller = bearer()
    before = ext_proc_streams(admin)
    call = rpc("tools/call", name="containerize_app", arguments={"app_path": "/srv"})
    assert post(stack.url, call, caller).status_code == 200
    forged = {"x-mcp-authz-list": "tools/list"}
    # No grant: ext_authz sets no grant header, and the removal of the mark alone re-routes.
    assert post(stack.url, rpc("server/discover"), forged).status_code == 200
    assert post(stack.url, call, {**caller, **forged}).status_code == 200
    assert ext_proc_streams(admin) == before
    assert post(stack.url, rpc("tools/list"), caller).status_code == 200
    assert ext_proc_streams(admin) == before + 1


# --- the scripted upstream (forms, pagination, faults, streaming) -----------------------


@pytest.fixture(scope="module")
def scripted(
    tmp_path_factory: pytest.TempPathFactory, transport: str
) -> Iterator[tuple[Stack, int, str]]:
    tmp = tmp_path_factory.mktemp("listing-scripted")
    port = free_port()
    upstream = Proc(
        "list-upstream",
        [sys.executable, str(ROOT / "tests/support/list_upstream.py"), "--port", str(port)],
        tmp / "upstream.log",
    )
    with stack_with(tmp, upstream, port, transport) as (stack, admin):
        yield stack, admin, f"http://127.0.0.1:{port}"


def test_pagination_across_filtered_pages(scripted: tuple[Stack, int, str]) -> None:
    stack, _, _ = scripted
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(5):
        params = {"cursor": cursor} if cursor else {}
        result = post(stack.url, rpc("tools/list", **params), bearer()).json()["result"]
        seen += [t["name"] for t in result["tools"]]
        cursor = result.get("nextCursor")
        if cursor is None:
            break
    assert seen == ["containerize_app", "start_dicom_export_job", "ecs_troubleshooting_tool"]


def test_event_stream_list_is_filtered_and_other_events_pass(
    scripted: tuple[Stack, int, str],
) -> None:
    stack, _, _ = scripted
    response = post(stack.url, rpc("prompts/list", 7), {**bearer(), "x-test-form": "sse"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "id: prime-1" in response.text  # the priming event, unchanged
    messages = sse_messages(response.text)
    assert messages[0]["method"] == "notifications/message"
    assert [p["name"] for p in messages[1]["result"]["prompts"]] == ["deploy_checklist"]
    length = response.headers.get("content-length")
    assert length is None or int(length) == len(response.content)


def test_batched_list_requests_are_answered_per_element(
    scripted: tuple[Stack, int, str],
) -> None:
    stack, _, _ = scripted
    # Batches exist up to MCP 2025-11-25 (2026-07-28 refuses them), without _meta envelopes.
    batch = [
        {"jsonrpc": "2.0", "id": i, "method": method, "params": {}}
        for i, method in enumerate(
            ["resources/list", "resources/templates/list", "ping", "tools/list"], start=1
        )
    ]
    session_era = {"mcp-protocol-version": "2025-11-25", **bearer()}
    replies = {r["id"]: r for r in post(stack.url, batch, session_era).json()}
    assert [r["uri"] for r in replies[1]["result"]["resources"]] == ["ecs://clusters/default"]
    templates = replies[2]["result"]["resourceTemplates"]
    assert [t["uriTemplate"] for t in templates] == ["ecs://clusters/{name}"]
    assert replies[3]["result"] == {}
    assert [t["name"] for t in replies[4]["result"]["tools"]] == ["containerize_app"]


@pytest.mark.parametrize("form", ["bad-json", "text", "huge"])
def test_unfilterable_list_response_fails_closed(
    scripted: tuple[Stack, int, str], form: str
) -> None:
    """Not JSON, an unknown media type, or over Envoy's buffer limit: a JSON-RPC error,
    never the unfiltered list."""
    stack, _, _ = scripted
    response = post(stack.url, rpc("tools/list", 9), {**bearer(), "x-test-form": form})
    assert response.status_code == 502, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()
    assert error["id"] == 9
    assert error["error"]["data"]["reason"] == "list_unfilterable"
    assert "delete_app" not in response.text and "t1" not in response.text


@pytest.mark.parametrize("client", ["sdk", "fastmcp"])
async def test_clients_surface_the_fail_closed_error(
    scripted: tuple[Stack, int, str], client: str
) -> None:
    stack, _, _ = scripted
    list_tools = sdk_list_tools if client == "sdk" else fastmcp_list_tools
    with pytest.raises(McpCallError) as info:
        await list_tools(stack.url, {**bearer(), "x-test-form": "bad-json"}, mode="legacy")
    assert info.value.code == -32053
    assert info.value.data == {"reason": "list_unfilterable"}


def test_streamed_tool_call_is_not_buffered(scripted: tuple[Stack, int, str]) -> None:
    """The first progress notification of a long call reaches the client while the
    upstream still holds the result: it is only released after the client has read it."""
    stack, admin, upstream = scripted
    before = ext_proc_streams(admin)
    call = rpc("tools/call", name="slow", arguments={})
    call["params"]["_meta"] = {**ENVELOPE, "progressToken": "tok"}
    with httpx.stream(
        "POST",
        stack.url,
        content=json.dumps(call),
        headers={
            **BASE_HEADERS,
            "mcp-protocol-version": "2026-07-28",
            "mcp-method": "tools/call",
            "mcp-name": "slow",
            **bearer(),
        },
        timeout=10,
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        data = next(line for line in lines if line.startswith("data:"))
        assert json.loads(data[5:])["method"] == "notifications/progress"
        httpx.post(f"{upstream}/release", timeout=5)
        result = next(line for line in lines if line.startswith("data:"))
        assert json.loads(result[5:])["result"]["content"][0]["text"] == "called slow"
    assert ext_proc_streams(admin) == before


def test_get_stream_is_not_buffered(scripted: tuple[Stack, int, str]) -> None:
    stack, _, upstream = scripted
    with httpx.stream(
        "GET", stack.url, headers={"accept": "text/event-stream", **bearer()}, timeout=10
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert json.loads(first[5:])["params"]["data"] == "hi"
        httpx.post(f"{upstream}/release", timeout=5)
        second = next(line for line in lines if line.startswith("data:"))
        assert json.loads(second[5:])["params"]["data"] == "bye"


def test_filter_metrics_count_lists_and_hidden_entries(
    scripted: tuple[Stack, int, str],
) -> None:
    stack, _, _ = scripted
    metrics_port = int(stack.authz.cmd[stack.authz.cmd.index("--http") + 1].rsplit(":", 1)[1])

    def sample(name: str, **labels: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith(f"{name}{{{want}}}"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    # server="": the policy has no servers
    labels = {"kind": "prompts", "result": "filtered", "server": ""}
    filtered = sample("mcp_authz_list_responses_total", **labels)
    hidden = sample("mcp_authz_list_entries_hidden_total", kind="prompts", server="")
    post(stack.url, rpc("prompts/list"), bearer())
    assert sample("mcp_authz_list_responses_total", **labels) == filtered + 1
    assert sample("mcp_authz_list_entries_hidden_total", kind="prompts", server="") == hidden + 1
    audit = [json.loads(line) for line in stack.authz.output().splitlines() if '"list_' in line]
    listed = [
        a for a in audit if a["decision"] == "list_filtered" and a["method"] == "prompts/list"
    ]
    assert listed and listed[-1]["hidden_names"] == ["incident_review"]
    assert "inputSchema" not in stack.authz.output()


def test_ext_proc_unreachable_fails_list_requests_only(tmp_path: Path) -> None:
    """With the list filter's cluster down, a list request fails (no unfiltered list);
    calls, which never open a stream, still pass."""
    port, dead_port = free_port(), free_port()
    listen, admin, grpc_port, http_port = (free_port() for _ in range(4))
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    envoy_yaml = envoy_config(tmp_path, listen=listen, authz=grpc_port, upstream=port, admin=admin)
    config = yaml.safe_load(envoy_yaml.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    for f in hcm["typed_config"]["http_filters"]:
        if f["name"] == "envoy.filters.http.ext_proc":
            f["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = "nowhere"
    dead = json.loads(json.dumps(config["static_resources"]["clusters"][0]))
    dead["name"] = dead["load_assignment"]["cluster_name"] = "nowhere"
    endpoint = dead["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"]["port_value"] = dead_port
    config["static_resources"]["clusters"].append(dead)
    envoy_yaml.write_text(yaml.safe_dump(config))
    with (
        running(upstream_proc(tmp_path, port, tmp_path / "record.jsonl"), port),
        running(
            authz_proc(tmp_path, policy, grpc_port, http_port, ["--store", "memory"]), grpc_port
        ),
        running(envoy_proc(tmp_path, envoy_yaml), listen),
    ):
        wait_ready(f"http://127.0.0.1:{admin}/ready")
        url = f"http://127.0.0.1:{listen}/mcp"
        listed = post(url, rpc("tools/list"), bearer())
        assert listed.status_code >= 500
        assert "delete_app" not in listed.text
        call = rpc("tools/call", name="containerize_app", arguments={"app_path": "/x"})
        assert post(url, call, bearer()).status_code == 200


def test_http_transport_alone_refuses_list_requests_only(tmp_path: Path) -> None:
    """``--grpc off``: no list filter is served, and envoy-http.yaml's ext_proc filter fails
    closed, so list requests are refused (no unfiltered list); calls still pass."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    # The last --grpc wins: mcp-authz serves ext_authz over HTTP alone.
    with mcp_stack(tmp_path, policy, ["--store", "memory"], "--grpc", "off", transport="http") as s:
        listed = post(s.url, rpc("tools/list"), bearer())
        assert listed.status_code >= 500
        assert "delete_app" not in listed.text
        call = rpc("tools/call", name="containerize_app", arguments={"app_path": "/x"})
        assert post(s.url, call, bearer()).status_code == 200
        assert s.recorded_tools() == ["containerize_app"]
    assert "no list filter is served" in s.authz.output()


# --- the real awslabs ECS MCP server (FastMCP, SSE replies) ------------------------------

HAS_ECS = importlib.util.find_spec("awslabs") is not None and (
    importlib.util.find_spec("awslabs.ecs_mcp_server") is not None
)


@pytest.mark.skipif(not HAS_ECS, reason="awslabs-ecs-mcp-server is not installed")
@pytest.mark.parametrize("client", ["sdk", "fastmcp"])
def test_real_ecs_server_lists_exactly_the_permitted_tools(tmp_path: Path, client: str) -> None:
    import anyio

    port = free_port()
    server = Proc(
        "ecs-mcp-server",
        [
            sys.executable,
            "-c",
            "from awslabs.ecs_mcp_server.main import mcp; "
            f"mcp.run(transport='http', host='127.0.0.1', port={port}, show_banner=False)",
        ],
        tmp_path / "ecs.log",
        env={"AWS_REGION": "us-east-1", "FASTMCP_LOG_LEVEL": "WARNING"},
    )
    with stack_with(tmp_path, server, port, "grpc") as (stack, admin):
        before = ext_proc_streams(admin)
        list_tools = sdk_list_tools if client == "sdk" else fastmcp_list_tools
        tools = anyio.run(lambda: list_tools(stack.url, bearer(), timeout=30))
        assert set(tools) == PERMITTED_ECS_TOOLS
        assert ext_proc_streams(admin) > before
        # Its replies are event streams: the list response is one data: event.
        caller = {**bearer(), "mcp-protocol-version": "2025-11-25"}
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "test", "version": "1"},
            },
        }
        opened = httpx.post(stack.url, json=init, headers={**BASE_HEADERS, **caller}, timeout=30)
        session = {**caller, "mcp-session-id": opened.headers["mcp-session-id"]}
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        httpx.post(stack.url, json=note, headers={**BASE_HEADERS, **session}, timeout=30)
        listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        raw = httpx.post(stack.url, json=listing, headers={**BASE_HEADERS, **session}, timeout=30)
        assert raw.headers["content-type"].startswith("text/event-stream")
        listed = [m for m in sse_messages(raw.text) if "result" in m]
        assert {t["name"] for t in listed[0]["result"]["tools"]} == PERMITTED_ECS_TOOLS
