"""Session budgets on the session-based revisions (MCP 2025-03-26 to 2025-11-25), end to end:
the shipped envoy/envoy.yaml, mcp-authz with a real redis-server, and the demo MCP upstream
(official SDK) issuing sessions, or issuing none (``--stateless``).

A session budget exists only for a session id the upstream issued to the caller's grant
(recorded from its ``initialize`` response by the ext_proc stream of that request, headers
only); any other id counts against the grant's counter of the same name, so inventing ids
gains nothing. What reaches the upstream is read from its own record; which requests open
an ext_proc stream, from Envoy's stats.
"""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from devstack.redis_server import running_redis
from devstack.stack import (
    ROOT,
    Proc,
    Stack,
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
    "default": "deny",
    "tools": {
        "containerize_app": {
            "limits": [{"counter": "per_session", "window": "hour", "max": 2, "scope": "session"}]
        },
    },
}
BASE = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


def new_token() -> str:
    return f"tok-{uuid.uuid4().hex}"


def grant_id(token: str) -> str:
    return "b-" + hashlib.sha256(token.encode()).hexdigest()[:24]


@pytest.fixture(scope="module", params=["sessions", "stateless"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, int, str]]:
    """Envoy -> mcp-authz (Redis) -> the demo upstream, keeping sessions or not; yields the
    stack, Envoy's admin port and the upstream's mode."""
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"sessions-{mode}")
    policy = tmp / "policy.json"
    policy.write_text(json.dumps(POLICY))
    listen, admin, upstream_port, grpc_port, http_port = (free_port() for _ in range(5))
    record = tmp / "upstream-record.jsonl"
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "demo_upstream.py"),
        "--port",
        str(upstream_port),
        "--record",
        str(record),
    ]
    upstream = Proc(
        "upstream", cmd + (["--stateless"] if mode == "stateless" else []), tmp / "up.log"
    )
    config = envoy_config(tmp, listen=listen, authz=grpc_port, upstream=upstream_port, admin=admin)
    with running_redis(tmp) as redis:
        authz = authz_proc(tmp, policy, grpc_port, http_port, ["--redis", redis.url])
        with (
            running(upstream, upstream_port) as up,
            running(authz, grpc_port),
            running(envoy_proc(tmp, config), listen) as envoy,
        ):
            wait_ready(f"http://127.0.0.1:{admin}/ready")
            url = f"http://127.0.0.1:{listen}/mcp"
            yield Stack(url, record, authz, envoy, up, tmp), admin, mode


def ext_proc_streams(admin: int) -> int:
    stats = httpx.get(f"http://127.0.0.1:{admin}/stats?filter=ext_proc.streams_started").text
    return sum(int(line.rsplit(":", 1)[1]) for line in stats.splitlines() if line.strip())


def post(stack: Stack, doc: object, token: str, session: str | None = None) -> httpx.Response:
    headers = {**BASE, "authorization": f"Bearer {token}", "mcp-protocol-version": VERSION}
    if session is not None:
        headers["mcp-session-id"] = session
    return httpx.post(stack.url, content=json.dumps(doc), headers=headers, timeout=10)


def call(id_: Any = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": "containerize_app", "arguments": {"app_path": "/srv"}},
    }


def initialize(stack: Stack, token: str) -> str | None:
    """Open a session as a client does; the id the upstream issued (None: it issues none)."""
    doc = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": VERSION,
            "capabilities": {},
            "clientInfo": {"name": "sessions-e2e", "version": "1"},
        },
    }
    headers = {**BASE, "authorization": f"Bearer {token}"}
    opened = httpx.post(stack.url, content=json.dumps(doc), headers=headers, timeout=10)
    assert opened.status_code == 200, opened.text
    session = opened.headers.get("mcp-session-id")
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert post(stack, note, token, session).status_code in (200, 202)
    return session


def calls_reaching(stack: Stack, token: str) -> int:
    return sum(
        1
        for r in stack.recorded()
        if r["grant"] == grant_id(token)
        for m in (r["jsonrpc"] or [])
        if m.get("method") == "tools/call"
    )


def refused(resp: httpx.Response) -> bool:
    return resp.status_code == 429 and resp.json()["error"]["data"]["reason"] == "rate_limited"


def test_a_new_session_id_per_call_gets_no_new_budget(stack: tuple[Stack, int, str]) -> None:
    """The attack: a caller allowed 2 calls per session invents a new Mcp-Session-Id per
    call. Every invented id spends the grant's counter: 2 calls reach the upstream."""
    s, _, _ = stack
    token = new_token()
    replies = [post(s, call(i), token, uuid.uuid4().hex) for i in range(6)]
    assert [refused(r) for r in replies] == [False, False, True, True, True, True]
    assert calls_reaching(s, token) == 2


def test_a_spent_budget_is_not_reopened_by_adding_a_session_id(
    stack: tuple[Stack, int, str],
) -> None:
    s, _, _ = stack
    token = new_token()
    for i in range(2):
        assert not refused(post(s, call(i), token))
    assert refused(post(s, call(9), token))
    for session in ("x0", "x1"):
        reply = post(s, call(9), token, session)
        assert refused(reply)
        assert reply.json()["id"] == 9
    assert calls_reaching(s, token) == 2


def test_a_genuine_session_gets_its_own_budget(stack: tuple[Stack, int, str]) -> None:
    """Each session the upstream issued has the per-session budget; the grant's own
    (requests without a session, invented ids) stays apart. An upstream that issues no
    session: everything counts against the grant."""
    s, _, mode = stack
    token = new_token()
    first = initialize(s, token)
    if mode == "stateless":
        assert first is None
        assert [refused(post(s, call(i), token)) for i in range(3)] == [False, False, True]
        return
    assert first is not None
    replies = [post(s, call(i), token, first) for i in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 429]
    assert refused(replies[2])
    assert "Containerized /srv" in replies[0].text
    second = initialize(s, token)
    assert second is not None and second != first
    assert [post(s, call(i), token, second).status_code for i in range(3)] == [200, 200, 429]
    # The grant's own budget is untouched by the sessions' calls.
    assert [refused(post(s, call(i), token, "invented")) for i in range(3)] == [
        False,
        False,
        True,
    ]
    # The session is its grant's: another grant naming it spends its own grant's budget.
    thief = new_token()
    assert [refused(post(s, call(i), thief, second)) for i in range(3)] == [False, False, True]
    assert calls_reaching(s, token) == 4 + 2


def test_a_deleted_session_budget_is_gone(stack: tuple[Stack, int, str]) -> None:
    s, _, mode = stack
    if mode == "stateless":
        pytest.skip("the upstream issues no session to delete")
    token = new_token()
    session = initialize(s, token)
    assert session is not None
    assert post(s, call(1), token, session).status_code == 200
    headers = {"authorization": f"Bearer {token}", "mcp-protocol-version": VERSION}
    deleted = httpx.delete(s.url, headers={**headers, "mcp-session-id": session}, timeout=10)
    assert deleted.status_code in (200, 204), deleted.text
    # The id now spends the grant's budget (the upstream answers 404 for it).
    assert [refused(post(s, call(i), token, session)) for i in range(3)] == [False, False, True]


def test_only_initialize_and_delete_open_an_ext_proc_stream(
    stack: tuple[Stack, int, str],
) -> None:
    s, admin, mode = stack
    token = new_token()
    before = ext_proc_streams(admin)
    session = initialize(s, token)  # the initialize; notifications/initialized opens none
    assert ext_proc_streams(admin) == before + 1
    post(s, call(1), token, session)
    post(s, call(2), token, "invented")
    assert ext_proc_streams(admin) == before + 1
    if mode == "sessions":
        assert session is not None
        headers = {"authorization": f"Bearer {token}", "mcp-session-id": session}
        httpx.delete(s.url, headers=headers, timeout=10)
        assert ext_proc_streams(admin) == before + 2


async def test_the_official_sdk_client_gets_a_budget_per_session(
    stack: tuple[Stack, int, str],
) -> None:
    """The SDK client's own initialize (protocol 2025-11-25, legacy mode) opens a session
    whose id is recorded: two calls in it pass, the third is refused; a new client session
    has its budget again. Without sessions, the grant's budget is shared by all."""
    s, _, mode = stack
    headers = {"authorization": f"Bearer {new_token()}"}

    async def three_calls() -> list[str]:
        outcomes = []
        async with (
            httpx2.AsyncClient(headers=headers, timeout=10) as http,
            Client(streamable_http_client(s.url, http_client=http), mode="legacy") as client,
        ):
            for _ in range(3):
                try:
                    result = await client.call_tool("containerize_app", {"app_path": "/srv"})
                    outcomes.append("ok" if not result.is_error else "error")
                except MCPError as exc:
                    outcomes.append(str((exc.data or {}).get("reason")))
        return outcomes

    assert await three_calls() == ["ok", "ok", "rate_limited"]
    again = await three_calls()
    assert again == (["ok", "ok", "rate_limited"] if mode == "sessions" else ["rate_limited"] * 3)
