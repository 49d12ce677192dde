"""Sessions and tasks through the shipped envoy/envoy-jwt.yaml: jwt_authn verifies real RS256
tokens (a JWKS file this test writes), the grant is the token's ``sub``, and the session
and tasks routes send the marked responses through ext_proc, which records sessions and
tasks for that grant (mcp-authz with a real redis-server, in front of the real task-capable
MCP server of tests/support/task_upstream.py, which serves any task to anyone who names
it).

Two callers with different tokens: one's task is reachable by it alone and listed to it
alone, and a session the upstream issued to it has its own session budget.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from devstack.redis_server import running_redis
from devstack.stack import (
    authz_proc,
    envoy_config,
    envoy_proc,
    free_port,
    running,
    wait_ready,
)
from tests.test_mcp_authorization import (  # noqa: F401 (keys: a fixture)
    Keys,
    claims,
    keys,
    offline,
    operator_values,
    rs256,
    shipped,
)
from tests.test_tasks_e2e import Agent, Gateway, task_upstream

pytestmark = pytest.mark.e2e

POLICY = {
    "version": "1",
    "default": "allow",
    "grants": {"source": "jwt", "claim": "sub"},
    "tools": {
        "note_study": {
            "limits": [{"counter": "per_session", "window": "hour", "max": 2, "scope": "session"}]
        },
    },
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[Gateway]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("jwt-records")
    jwks = tmp / "jwks.json"
    jwks.write_text(keys.jwks())
    source = tmp / "envoy-jwt.yaml"
    source.write_text(yaml.safe_dump(offline(shipped(), jwks)))
    policy = tmp / "policy.json"
    policy.write_text(json.dumps(POLICY))
    listen, admin, upstream_port, grpc_port, http_port = (free_port() for _ in range(5))
    record = tmp / "upstream-record.jsonl"
    upstream = task_upstream(tmp, upstream_port, record)
    config = envoy_config(
        tmp, listen=listen, authz=grpc_port, upstream=upstream_port, admin=admin, source=source
    )
    with running_redis(tmp) as redis:
        authz = authz_proc(tmp, policy, grpc_port, http_port, ["--redis", redis.url])
        with (
            running(upstream, upstream_port),
            running(authz, grpc_port),
            running(envoy_proc(tmp, config), listen),
        ):
            wait_ready(f"http://127.0.0.1:{admin}/ready")
            yield Gateway(f"http://127.0.0.1:{listen}/mcp", admin, record)


@pytest.fixture(scope="module")
def tokens(keys: Keys) -> dict[str, str]:  # noqa: F811
    """A verified token per caller: its ``sub`` is its grant."""
    values = operator_values(shipped())
    return {sub: rs256(keys, claims(values, sub)) for sub in ("alice", "bob")}


def note(agent: Agent) -> int:
    status, _ = agent.rpc("tools/call", name="note_study", arguments={"study": "s"})
    return status


def test_a_task_is_reached_by_its_creators_grant_only(
    gateway: Gateway, tokens: dict[str, str]
) -> None:
    alice, bob = Agent(gateway, tokens["alice"]), Agent(gateway, tokens["bob"])
    task = alice.start_export("s-1")
    for method in ("tasks/get", "tasks/result", "tasks/cancel"):
        status, reply = bob.rpc(method, taskId=task)
        assert status == 403, reply
        assert reply["error"]["data"] == {"reason": "task_not_owned"}
        assert task not in gateway.reached(method)
    status, got = alice.rpc("tasks/get", taskId=task)
    assert status == 200 and got["result"]["taskId"] == task
    status, result = alice.rpc("tasks/result", taskId=task)
    assert status == 200 and result["result"]["content"][0]["text"] == "exported study s-1"


def test_tasks_list_shows_a_grant_only_its_own_tasks(
    gateway: Gateway, tokens: dict[str, str]
) -> None:
    alice, bob = Agent(gateway, tokens["alice"]), Agent(gateway, tokens["bob"])
    mine = {alice.start_export("a-1"), alice.start_export("a-2")}
    theirs = bob.start_export("b-1")
    # The upstream lists every caller's tasks (two a page): the pages are filtered.
    assert mine <= set(alice.listed())
    assert theirs not in alice.listed()
    listed: list[Any] = bob.listed()
    assert theirs in listed
    assert not mine & set(listed)


def test_a_session_the_upstream_issued_has_its_own_budget(
    gateway: Gateway, tokens: dict[str, str]
) -> None:
    """Each initialize's Mcp-Session-Id is recorded for the caller's grant: two calls per
    session pass, in each session; naming another grant's session spends one's own."""
    alice = Agent(gateway, tokens["alice"])
    assert [note(alice) for _ in range(3)] == [200, 200, 429]
    again = Agent(gateway, tokens["alice"])
    assert again.headers["mcp-session-id"] != alice.headers["mcp-session-id"]
    assert [note(again) for _ in range(3)] == [200, 200, 429]
    bob = Agent(gateway, tokens["bob"])
    bob.headers["mcp-session-id"] = again.headers["mcp-session-id"]
    assert [note(bob) for _ in range(3)] == [200, 200, 429]
    assert note(Agent(gateway, tokens["bob"])) == 200  # a session of bob's own


def test_only_marked_requests_open_an_ext_proc_stream(
    gateway: Gateway, tokens: dict[str, str]
) -> None:
    before = gateway.streams()
    alice = Agent(gateway, tokens["alice"])  # the initialize: its session is recorded
    assert gateway.streams() == before + 1
    task = alice.start_export("s-3")
    assert gateway.streams() == before + 2
    alice.rpc("tasks/get", taskId=task)
    note(alice)
    assert gateway.streams() == before + 2
    assert alice.rpc("tasks/list")[0] == 200
    assert gateway.streams() == before + 3
