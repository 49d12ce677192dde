"""Decisions for parsed requests under a compiled policy, with the in-memory store.

The end-to-end tests repeat the important ones through the real Envoy and Redis.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from authz.engine import Engine, Reason
from authz.mcp import HttpRequest
from authz.policy import compile_policy
from authz.store import Charge, Outcome, StoreUnavailable, open_store

POLICY = compile_policy(
    {
        "version": "1",
        "default": "deny",
        "tools": {
            "start_dicom_export_job": {
                "limits": [
                    {"counter": "export_rate", "window": "minute", "max": 3, "scope": "grant"},
                    {"counter": "export_all", "window": "minute", "max": 5, "scope": "global"},
                ]
            },
            "containerize_app": {"action": "allow"},
            "delete_app": {"action": "deny", "reason": "needs a human"},
        },
    }
)

TOKEN = "tok-A"


def post(doc: object, token: str | None = TOKEN, **headers: str) -> HttpRequest:
    h = {"content-type": "application/json", **headers}
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    return HttpRequest(method="POST", path="/mcp", headers=h, body=json.dumps(doc).encode())


def call(name: str, id_: int | str = 1, **arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(clock: Clock) -> Engine:
    return Engine(POLICY, open_store("memory://"), clock=clock)


async def test_allowed_tool_carries_the_grant(engine: Engine) -> None:
    decision = await engine.check(post(call("containerize_app")))
    assert decision.allowed
    assert decision.grant is not None and decision.grant.startswith("b-")
    assert TOKEN not in decision.grant


async def test_lifecycle_and_listing_pass_under_default_deny(engine: Engine) -> None:
    for method in ("initialize", "ping", "tools/list", "resources/list", "prompts/list"):
        doc = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {}}
        assert (await engine.check(post(doc, token=None))).allowed, method
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert (await engine.check(post(note, token=None))).allowed
    response = {"jsonrpc": "2.0", "id": "srv-1", "result": {}}
    assert (await engine.check(post(response, token=None))).allowed


async def test_other_methods_follow_default(engine: Engine) -> None:
    doc = {"jsonrpc": "2.0", "id": 4, "method": "resources/read", "params": {"uri": "file:///x"}}
    decision = await engine.check(post(doc))
    assert decision.reason is Reason.DENIED_BY_DEFAULT
    assert "method 'resources/read'" in decision.message


async def test_bodyless_stream_requests_pass(engine: Engine) -> None:
    for method in ("GET", "DELETE"):
        req = HttpRequest(method=method, path="/mcp", headers={}, body=b"")
        assert (await engine.check(req)).allowed
    put = HttpRequest(method="PUT", path="/mcp", headers={}, body=b"")
    assert (await engine.check(put)).reason is Reason.METHOD_NOT_ALLOWED
    get_with_body = HttpRequest(method="GET", path="/mcp", headers={}, body=b"{}")
    assert (await engine.check(get_with_body)).reason is Reason.MALFORMED


async def test_denied_by_rule_and_by_default(engine: Engine) -> None:
    rule = await engine.check(post(call("delete_app", id_="x")))
    assert rule.reason is Reason.DENIED_BY_RULE and rule.reason.status == 403
    assert rule.message == "policy violation: tool 'delete_app' denied: needs a human"
    assert rule.tool == "delete_app" and rule.rule == "tools.delete_app"
    body = json.loads(rule.reply_body())
    assert body["id"] == "x" and body["error"]["code"] == -32051
    assert body["error"]["data"] == {"reason": "denied_by_rule", "tool": "delete_app"}
    default = await engine.check(post(call("ecs_resource_management")))
    assert default.reason is Reason.DENIED_BY_DEFAULT
    assert "default deny" in default.message


async def test_no_grant_identity(engine: Engine) -> None:
    decision = await engine.check(post(call("containerize_app"), token=None))
    assert decision.reason is Reason.NO_GRANT
    assert decision.message.endswith("no grant identity")
    joined = post(call("containerize_app"), token="a,Bearer b")
    assert (await engine.check(joined)).reason is Reason.NO_GRANT


async def test_grant_header_mode(clock: Clock) -> None:
    engine = Engine(POLICY, open_store("memory://"), grant_header="x-mcp-grant", clock=clock)
    ok = await engine.check(post(call("containerize_app"), token=None, **{"x-mcp-grant": "alice"}))
    assert ok.allowed and ok.grant == "alice"
    bearer_only = await engine.check(post(call("containerize_app")))
    assert bearer_only.reason is Reason.NO_GRANT
    braces = post(call("containerize_app"), token=None, **{"x-mcp-grant": "a}b{"})
    assert (await engine.check(braces)).reason is Reason.NO_GRANT


async def test_rate_limit_then_retry_after(engine: Engine, clock: Clock) -> None:
    for _ in range(3):
        assert (await engine.check(post(call("start_dicom_export_job")))).allowed
        clock.now += 1_000
    limited = await engine.check(post(call("start_dicom_export_job", id_=9)))
    assert limited.reason is Reason.RATE_LIMITED and limited.reason.status == 429
    assert limited.counter == "export_rate"
    # The first call was at t0; it frees at t0 + 60 s, now is t0 + 3 s.
    assert limited.retry_after_s == 57
    assert "allows 3 per minute" in limited.message
    data = json.loads(limited.reply_body())["error"]["data"]
    assert data == {
        "reason": "rate_limited",
        "tool": "start_dicom_export_job",
        "counter": "export_rate",
        "retryAfter": 57,
    }
    other = await engine.check(post(call("start_dicom_export_job"), token="tok-B"))
    assert other.allowed, "a second grant has its own budget"
    clock.now += 57_000
    assert (await engine.check(post(call("start_dicom_export_job")))).allowed


async def test_global_limit_spans_grants_and_denials_consume_nothing(engine: Engine) -> None:
    tokens = ["g1", "g1", "g1", "g2", "g2"]
    for token in tokens:
        assert (await engine.check(post(call("start_dicom_export_job"), token=token))).allowed
    # g1 is at its grant limit (3): denied by the grant counter, so the global budget
    # (5, fully used) is not what refuses, and nothing more is spent.
    g3 = await engine.check(post(call("start_dicom_export_job"), token="g3"))
    assert g3.reason is Reason.RATE_LIMITED and g3.counter == "export_all"
    assert "for all callers" in g3.message


async def test_batch_is_all_or_nothing(engine: Engine) -> None:
    batch = [call("containerize_app", 1), call("delete_app", 2), call("start_dicom_export_job", 3)]
    decision = await engine.check(post(batch))
    assert decision.reason is Reason.DENIED_BY_RULE
    assert decision.element == 1 and decision.batch
    assert decision.message.startswith("policy violation: batch element 1: tool 'delete_app'")
    replies = json.loads(decision.reply_body())
    assert [r["id"] for r in replies] == [1, 2, 3]
    # The denied batch spent nothing: three single calls still fit the budget of 3.
    for _ in range(3):
        assert (await engine.check(post(call("start_dicom_export_job")))).allowed


async def test_batch_counts_every_call(engine: Engine) -> None:
    twice = [call("start_dicom_export_job", 1), call("start_dicom_export_job", 2)]
    assert (await engine.check(post(twice))).allowed
    thrice = [call("start_dicom_export_job", i) for i in range(3)]
    limited = await engine.check(post(thrice))
    assert limited.reason is Reason.RATE_LIMITED
    assert (await engine.check(post(call("start_dicom_export_job")))).allowed


async def test_protocol_refusals_map_to_statuses(engine: Engine) -> None:
    cases = {
        Reason.MALFORMED: HttpRequest(
            method="POST", path="/mcp", headers={"content-type": "application/json"}, body=b"{"
        ),
        Reason.UNSUPPORTED_MEDIA: post(call("containerize_app"), **{"content-encoding": "gzip"}),
        Reason.HEADER_MISMATCH: post(call("containerize_app"), **{"mcp-name": "delete_app"}),
        Reason.PARTIAL_BODY: post(
            call("containerize_app"), **{"x-envoy-auth-partial-body": "true"}
        ),
    }
    for reason, request in cases.items():
        decision = await engine.check(request)
        assert decision.reason is reason
        assert decision.message.startswith("policy violation: malformed request:")
    assert Reason.PARTIAL_BODY.status == 413 and Reason.UNSUPPORTED_MEDIA.status == 415


class DownStore:
    """Narrow stand-in: a store that is always unreachable."""

    async def acquire(self, charges: Sequence[Charge], now_ms: int | None = None) -> Outcome:
        raise StoreUnavailable("down")

    async def ping(self) -> None:
        raise StoreUnavailable("down")

    async def close(self) -> None:
        return None


async def test_store_down_fails_closed_only_where_a_counter_is_needed() -> None:
    engine = Engine(POLICY, DownStore())
    needs_counter = await engine.check(post(call("start_dicom_export_job")))
    assert needs_counter.reason is Reason.STORE_UNAVAILABLE and needs_counter.reason.status == 503
    assert "rate-limit store unavailable" in needs_counter.message
    assert (await engine.check(post(call("containerize_app")))).allowed
    assert (await engine.check(post(call("delete_app")))).reason is Reason.DENIED_BY_RULE


async def test_fail_open_is_explicit_and_marked() -> None:
    engine = Engine(POLICY, DownStore(), fail_open=True)
    decision = await engine.check(post(call("start_dicom_export_job")))
    assert decision.allowed and decision.fail_open
