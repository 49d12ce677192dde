"""The worst argument bodies through the real Envoy and mcp-authz stall no other caller.

mcp-authz checks every request on one event loop, and Envoy answers 503 to any request
whose check takes over its 250 ms ext_authz timeout. Before schema evaluation was linear,
each body below held the loop for seconds (or crashed the check into a 503): while one
caller sends them, another caller's allowed calls must keep being answered 200, and each
worst body gets its own 403 ``invalid_arguments`` with its request id.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.stack import Stack, mcp_stack

pytestmark = pytest.mark.e2e

POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "import_rows": {
            "arguments": {
                "type": "object",
                "properties": {
                    "rows": {"type": "array", "uniqueItems": True},
                    "filter": {"type": "string", "format": "regex"},
                    "name": {"type": "string", "pattern": "^(a+)+$"},
                },
            }
        }
    },
}
HEADERS = {
    "content-type": "application/json",
    "accept": "application/json, text/event-stream",
    "mcp-protocol-version": "2025-11-25",
}
REGEX_TEXT = "is not a valid regex (RE2 syntax, within one call's allowance)"

# Each within the default bounds (1 MiB, 10,000 members), each denied by its schema.
WORST: dict[str, tuple[dict[str, Any], str]] = {
    "8,000 objects under uniqueItems, one repeated": (
        {"rows": [{"id": i} for i in range(7_999)] + [{"id": 7_998.0}]},
        "arguments.rows: must not repeat items",
    ),
    "a regex value of 5,000 open parentheses": (
        {"filter": "(" * 5_000},
        f"arguments.filter: {REGEX_TEXT}",
    ),
    "a regex value of 1,000,000 characters": (
        {"filter": "a" * 1_000_000},
        f"arguments.filter: {REGEX_TEXT}",
    ),
    "50,000 characters against ^(a+)+$": (
        {"name": "a" * 50_000 + "!"},
        "arguments.name: does not match the required pattern '^(a+)+$'",
    ),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("argument-schemas-e2e")
    policy = tmp / "policy.json"
    policy.write_text(json.dumps(POLICY))
    with mcp_stack(tmp, policy, ["--store", "memory"]) as s:
        yield s


def body(method: str, id_: int, **params: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": id_, "method": method, "params": params}).encode()


@pytest.mark.parametrize("case", list(WORST), ids=list(WORST))
async def test_worst_body_stalls_no_other_caller(stack: Stack, case: str) -> None:
    arguments, expected = WORST[case]
    worst = body("tools/call", 1, name="import_rows", arguments=arguments)
    assert len(worst) < 1 << 20
    attacker = {**HEADERS, "authorization": f"Bearer attacker-{uuid.uuid4().hex}"}
    bystander = {**HEADERS, "authorization": f"Bearer bystander-{uuid.uuid4().hex}"}
    initialize = body(
        "initialize",
        1,
        protocolVersion="2025-11-25",
        capabilities={},
        clientInfo={"name": "bystander", "version": "1"},
    )
    sending = True

    async with httpx.AsyncClient(timeout=30) as http:

        async def attack() -> list[httpx.Response]:
            replies = []
            for i in range(5):
                worst_i = worst.replace(b'"id": 1,', f'"id": {100 + i},'.encode(), 1)
                replies.append(await http.post(stack.url, content=worst_i, headers=attacker))
            return replies

        async def bystand() -> list[int]:
            statuses = []
            while sending or len(statuses) < 5:
                reply = await http.post(stack.url, content=initialize, headers=bystander)
                statuses.append(reply.status_code)
            return statuses

        watcher = asyncio.create_task(bystand())
        try:
            replies = await attack()
        finally:
            sending = False
        statuses = await watcher

    for i, reply in enumerate(replies):
        assert reply.status_code == 403, reply.text[:300]
        answer = reply.json()
        assert answer["id"] == 100 + i
        assert answer["error"]["data"]["reason"] == "invalid_arguments"
        assert reply.headers["x-mcp-authz-reason"] == (
            f"policy violation: tool 'import_rows': invalid arguments: {expected}"
        )
    assert statuses and set(statuses) == {200}, statuses
    assert "import_rows" not in stack.recorded_tools()
