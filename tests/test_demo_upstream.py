"""examples/demo_upstream.py as a real process: tools, both client stacks, and --record."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.clients import (
    McpCallError,
    fastmcp_call_tool,
    fastmcp_list_tools,
    sdk_call_tool,
    sdk_list_tools,
)

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo_upstream.py"
HEADERS = {"Authorization": "Bearer abc", "X-Mcp-Authz-Grant": "grant-123"}
TOOLS = {
    "containerize_app",
    "delete_app",
    "ecs_resource_management",
    "ecs_troubleshooting_tool",
    "start_dicom_export_job",
    "list_datastores",
}


@dataclass
class Upstream:
    url: str
    record: Path

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def clear(self) -> None:
        self.record.write_text("")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(tmp: Path, *extra: str) -> Iterator[Upstream]:
    port, record, log = _free_port(), tmp / "record.jsonl", tmp / "server.log"
    cmd = [sys.executable, str(DEMO), "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen([*cmd, "--record", str(record), *extra], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, f"demo upstream exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"demo upstream did not start:\n{log.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield Upstream(f"http://127.0.0.1:{port}/mcp", record)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    yield from _start(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def stateless_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    yield from _start(tmp_path_factory.mktemp("demo-stateless"), "--stateless")


async def test_sdk_client(upstream: Upstream) -> None:
    upstream.clear()
    assert set(await sdk_list_tools(upstream.url, HEADERS)) == TOOLS
    text = await sdk_call_tool(upstream.url, "containerize_app", {"app_path": "/src/web"}, HEADERS)
    assert text == "Containerized /src/web: Dockerfile and task definition created, port 8080."
    records = upstream.records()
    calls = [r["jsonrpc"] for r in records]
    # mode "auto": discover, then stateless 2026-07-28 requests (the SDK re-lists after a call).
    assert calls == [
        [{"method": "server/discover", "tool": None, "id": 1}],
        [{"method": "tools/list", "tool": None, "id": 2}],
        [{"method": "server/discover", "tool": None, "id": 1}],
        [{"method": "tools/call", "tool": "containerize_app", "id": 2}],
        [{"method": "tools/list", "tool": None, "id": 3}],
    ]
    for record in records:
        assert record["http_method"] == "POST"
        assert record["grant"] == "grant-123"
        assert record["headers"] == sorted(record["headers"])
        assert {"authorization", "x-mcp-authz-grant", "mcp-protocol-version"} <= set(
            record["headers"]
        )
        assert "mcp-session-id" not in record["headers"]
    assert "mcp-name" in records[3]["headers"]


async def test_fastmcp_client(upstream: Upstream) -> None:
    upstream.clear()
    assert set(await fastmcp_list_tools(upstream.url, HEADERS, mode="legacy")) == TOOLS
    text = await fastmcp_call_tool(
        upstream.url, "containerize_app", {"app_path": "/src/api", "port": 9000}, {}
    )
    assert text.startswith("Containerized /src/api") and "port 9000" in text
    records = upstream.records()
    legacy = [(r["http_method"], r["jsonrpc"] and r["jsonrpc"][0]["method"]) for r in records[:5]]
    assert legacy[:2] == [("POST", "initialize"), ("POST", "notifications/initialized")]
    # The GET (SSE stream for server-initiated messages, no body) races the first request.
    assert sorted(legacy[2:4], key=str) == [("GET", None), ("POST", "tools/list")]
    assert legacy[4] == ("DELETE", None)
    assert all(r["grant"] == "grant-123" for r in records[:5])
    assert all("mcp-session-id" in r["headers"] for r in records[1:5])
    call = next(r for r in records if r["jsonrpc"] and r["jsonrpc"][0]["method"] == "tools/call")
    assert call["jsonrpc"] == [{"method": "tools/call", "tool": "containerize_app", "id": 2}]
    assert call["grant"] is None and "authorization" not in call["headers"]


async def test_tools_and_errors(upstream: Upstream) -> None:
    url = upstream.url
    assert "ds-0001" in await sdk_call_tool(url, "list_datastores", {}, HEADERS)
    text = await fastmcp_call_tool(
        url,
        "start_dicom_export_job",
        {"datastoreId": "ds-0001", "outputS3Uri": "s3://bucket/out/", "studyCount": 3},
        HEADERS,
    )
    assert "3 study(ies) from ds-0001 to s3://bucket/out/" in text
    with pytest.raises(McpCallError, match="no_such_tool"):
        await sdk_call_tool(url, "no_such_tool", {}, HEADERS)


async def test_record_batch_and_invalid_bodies(upstream: Upstream) -> None:
    upstream.clear()
    batch = [
        {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "delete_app"}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
    ]
    async with httpx.AsyncClient(timeout=5) as client:
        await client.post(upstream.url, json=batch, headers={"x-mcp-authz-grant": "g"})
        await client.post(upstream.url, content=b"{not json", headers={"x-other": "1"})
    first, second = upstream.records()
    assert first["jsonrpc"] == [
        {"method": "tools/call", "tool": "delete_app", "id": 7},
        {"method": "notifications/initialized", "tool": None, "id": None},
    ]
    assert first["grant"] == "g"
    assert second == {
        "http_method": "POST",
        "jsonrpc": None,
        "grant": None,
        "headers": sorted(
            {"host", "accept", "accept-encoding", "connection", "user-agent", "content-length"}
            | {"x-other"}
        ),
    }


async def test_stateless_legacy_session(stateless_upstream: Upstream) -> None:
    text = await sdk_call_tool(
        stateless_upstream.url, "delete_app", {"app_name": "web"}, HEADERS, mode="legacy"
    )
    assert text == "Deleted ECS service, task definition and load balancer for web."
    records = stateless_upstream.records()
    assert records[0]["jsonrpc"][0]["method"] == "initialize"
    assert not any("mcp-session-id" in r["headers"] for r in records)
