"""Decisions for parsed requests under a compiled policy, with the in-memory store.

The end-to-end tests repeat the important ones through the real Envoy and Redis.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import pytest
from msgspec.structs import replace

from authz import envoy, records
from authz.decision import Decision, Reason
from authz.engine import Engine
from authz.mcp import HttpRequest
from authz.pb import external_auth_pb2
from authz.plan import counter_key
from authz.policy import PolicyError, compile_policy
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


def grant_of_token(token: str) -> str:
    return "b-" + hashlib.sha256(token.encode()).hexdigest()[:24]


def post(doc: object, token: str | None = TOKEN, **headers: str) -> HttpRequest:
    h = {"content-type": "application/json", **headers}
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    return HttpRequest(method="POST", headers=h, body=json.dumps(doc).encode())


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
    decision = (await engine.check(post(call("containerize_app")))).decision
    assert decision.allowed
    assert decision.grant is not None and decision.grant.startswith("b-")
    assert TOKEN not in decision.grant


async def test_lifecycle_and_listing_pass_under_default_deny(engine: Engine) -> None:
    for method in ("initialize", "ping", "tools/list", "resources/list", "prompts/list"):
        doc = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {}}
        assert (await engine.check(post(doc, token=None))).decision.allowed, method
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert (await engine.check(post(note, token=None))).decision.allowed
    response = {"jsonrpc": "2.0", "id": "srv-1", "result": {}}
    assert (await engine.check(post(response, token=None))).decision.allowed


async def test_other_methods_follow_default(engine: Engine) -> None:
    doc = {"jsonrpc": "2.0", "id": 4, "method": "resources/read", "params": {"uri": "file:///x"}}
    decision = (await engine.check(post(doc))).decision
    assert decision.reason is Reason.DENIED_BY_DEFAULT
    assert "method 'resources/read'" in decision.message


async def test_bodyless_stream_requests_pass(engine: Engine) -> None:
    for method in ("GET", "DELETE"):
        req = HttpRequest(method=method, headers={}, body=b"")
        assert (await engine.check(req)).decision.allowed
    put = HttpRequest(method="PUT", headers={}, body=b"")
    assert (await engine.check(put)).decision.reason is Reason.METHOD_NOT_ALLOWED
    get_with_body = HttpRequest(method="GET", headers={}, body=b"{}")
    assert (await engine.check(get_with_body)).decision.reason is Reason.MALFORMED


async def test_denied_by_rule_and_by_default(engine: Engine) -> None:
    rule = (await engine.check(post(call("delete_app", id_="x")))).decision
    assert rule.reason is Reason.DENIED_BY_RULE and rule.reason.status == 403
    assert rule.message == "policy violation: tool 'delete_app' denied: needs a human"
    assert rule.tool == "delete_app" and rule.rule == "tools.delete_app"
    body = json.loads(rule.reply_body())
    assert body["id"] == "x" and body["error"]["code"] == -32051
    assert body["error"]["data"] == {"reason": "denied_by_rule", "tool": "delete_app"}
    default = (await engine.check(post(call("ecs_resource_management")))).decision
    assert default.reason is Reason.DENIED_BY_DEFAULT
    assert "default deny" in default.message


async def test_no_grant_identity(engine: Engine) -> None:
    decision = (await engine.check(post(call("containerize_app"), token=None))).decision
    assert decision.reason is Reason.NO_GRANT
    assert decision.message.endswith("no grant identity")
    joined = post(call("containerize_app"), token="a,Bearer b")
    assert (await engine.check(joined)).decision.reason is Reason.NO_GRANT


async def test_grant_header_mode(clock: Clock) -> None:
    engine = Engine(POLICY, open_store("memory://"), grant_header="x-mcp-grant", clock=clock)
    ok = (
        await engine.check(post(call("containerize_app"), token=None, **{"x-mcp-grant": "alice"}))
    ).decision
    assert ok.allowed and ok.grant == "alice"
    bearer_only = (await engine.check(post(call("containerize_app")))).decision
    assert bearer_only.reason is Reason.NO_GRANT
    braces = post(call("containerize_app"), token=None, **{"x-mcp-grant": "a}b{"})
    assert (await engine.check(braces)).decision.reason is Reason.NO_GRANT


async def test_rate_limit_then_retry_after(engine: Engine, clock: Clock) -> None:
    for _ in range(3):
        assert (await engine.check(post(call("start_dicom_export_job")))).decision.allowed
        clock.now += 1_000
    limited = (await engine.check(post(call("start_dicom_export_job", id_=9)))).decision
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
    other = (await engine.check(post(call("start_dicom_export_job"), token="tok-B"))).decision
    assert other.allowed, "a second grant has its own budget"
    clock.now += 57_000
    assert (await engine.check(post(call("start_dicom_export_job")))).decision.allowed


async def test_global_limit_spans_grants_and_denials_consume_nothing(engine: Engine) -> None:
    tokens = ["g1", "g1", "g1", "g2", "g2"]
    for token in tokens:
        assert (
            await engine.check(post(call("start_dicom_export_job"), token=token))
        ).decision.allowed
    # g1 is at its grant limit (3): denied by the grant counter, so the global budget
    # (5, fully used) is not what refuses, and nothing more is spent.
    g3 = (await engine.check(post(call("start_dicom_export_job"), token="g3"))).decision
    assert g3.reason is Reason.RATE_LIMITED and g3.counter == "export_all"
    assert "for all callers" in g3.message


async def test_batch_is_all_or_nothing(engine: Engine) -> None:
    batch = [call("containerize_app", 1), call("delete_app", 2), call("start_dicom_export_job", 3)]
    decision = (await engine.check(post(batch))).decision
    assert decision.reason is Reason.DENIED_BY_RULE
    assert decision.element == 1 and decision.batch
    assert decision.message.startswith("policy violation: batch element 1: tool 'delete_app'")
    replies = json.loads(decision.reply_body())
    assert [r["id"] for r in replies] == [1, 2, 3]
    # The denied batch spent nothing: three single calls still fit the budget of 3.
    for _ in range(3):
        assert (await engine.check(post(call("start_dicom_export_job")))).decision.allowed


async def test_batch_counts_every_call(engine: Engine) -> None:
    twice = [call("start_dicom_export_job", 1), call("start_dicom_export_job", 2)]
    assert (await engine.check(post(twice))).decision.allowed
    thrice = [call("start_dicom_export_job", i) for i in range(3)]
    limited = (await engine.check(post(thrice))).decision
    assert limited.reason is Reason.RATE_LIMITED
    assert (await engine.check(post(call("start_dicom_export_job")))).decision.allowed


async def test_protocol_refusals_map_to_statuses(engine: Engine) -> None:
    cases = {
        Reason.MALFORMED: HttpRequest(
            method="POST", headers={"content-type": "application/json"}, body=b"{"
        ),
        Reason.UNSUPPORTED_MEDIA: post(call("containerize_app"), **{"content-encoding": "gzip"}),
        Reason.HEADER_MISMATCH: post(call("containerize_app"), **{"mcp-name": "delete_app"}),
        Reason.PARTIAL_BODY: post(
            call("containerize_app"), **{"x-envoy-auth-partial-body": "true"}
        ),
    }
    for reason, request in cases.items():
        decision = (await engine.check(request)).decision
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
    needs_counter = (await engine.check(post(call("start_dicom_export_job")))).decision
    assert needs_counter.reason is Reason.STORE_UNAVAILABLE and needs_counter.reason.status == 503
    assert "rate-limit store unavailable" in needs_counter.message
    assert (await engine.check(post(call("containerize_app")))).decision.allowed
    assert (await engine.check(post(call("delete_app")))).decision.reason is Reason.DENIED_BY_RULE


async def test_fail_open_is_explicit_and_marked() -> None:
    engine = Engine(POLICY, DownStore(), fail_open=True)
    decision = (await engine.check(post(call("start_dicom_export_job")))).decision
    assert decision.allowed and decision.fail_open


# --- the policy language of issue #3 -------------------------------------------------------

EXPORT_ARGS = {"datastoreId": "ds-0001", "outputS3Uri": "s3://approved-exports/a", "studyCount": 2}

LANGUAGE = {
    "version": "1",
    "default": "deny",
    "tools": {
        "start_dicom_export_job": {
            "arguments": {
                "type": "object",
                "required": ["datastoreId", "outputS3Uri", "studyCount"],
                "properties": {
                    "datastoreId": {"enum": ["ds-0001", "ds-0002"]},
                    "outputS3Uri": {"type": "string", "pattern": "^s3://approved-exports/"},
                    "studyCount": {"type": "integer", "minimum": 0},
                },
            },
            "limits": [
                {"counter": "exports_minute", "window": "minute", "max": 2},
                {"counter": "exports_day", "window": "day", "max": 3},
                {"counter": "studies_day", "window": "day", "max": 5, "cost": "/studyCount"},
            ],
        },
        "list_*": {"limits": [{"counter": "lists", "window": "minute", "max": 2}]},
        "delete_app": {"action": "require_approval", "reason": "a human decides"},
        "session_tool": {
            "limits": [{"counter": "per_session", "window": "minute", "max": 1, "scope": "session"}]
        },
        "rehearsed": {
            "mode": "dry-run",
            "limits": [{"counter": "rehearsed", "window": "minute", "max": 1}],
        },
        "rehearsed_deny": {"mode": "dry-run", "action": "deny", "reason": "not yet"},
    },
    "resources": {
        "ecs://clusters/*": {},
        "patient://*": {"action": "deny", "reason": "no patient records"},
    },
    "prompts": {"deploy_*": {"action": "allow"}},
}


@pytest.fixture
def language(clock: Clock) -> Engine:
    return Engine(compile_policy(LANGUAGE), open_store("memory://"), clock=clock)


def export(**overrides: Any) -> dict[str, Any]:
    return call("start_dicom_export_job", **{**EXPORT_ARGS, **overrides})


def rpc(method: str, id_: int = 1, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}


async def test_invalid_arguments_are_denied_naming_path_not_value(language: Engine) -> None:
    decision = (await language.check(post(export(outputS3Uri="s3://patient-jane-doe/x")))).decision
    assert decision.reason is Reason.ARGUMENTS_INVALID and decision.reason.status == 403
    assert decision.message == (
        "policy violation: tool 'start_dicom_export_job': invalid arguments: "
        "arguments.outputS3Uri: does not match the required pattern '^s3://approved-exports/'"
    )
    assert "jane" not in decision.reply_body().decode()
    assert json.loads(decision.reply_body())["error"]["data"]["reason"] == "invalid_arguments"
    # Nothing was spent: the whole budget of 2 a minute is still there.
    for _ in range(2):
        assert (await language.check(post(export()))).decision.allowed


async def test_several_limits_are_enforced_together(language: Engine, clock: Clock) -> None:
    for _ in range(2):
        assert (await language.check(post(export(studyCount=1)))).decision.allowed
    minute = await language.check(post(export(studyCount=1)))
    assert minute.decision.reason is Reason.RATE_LIMITED
    assert minute.decision.counter == "exports_minute"
    assert [(c.counter, c.remaining) for c in minute.counters] == [("exports_minute", 0)]
    clock.now += 61_000
    day = await language.check(post(export(studyCount=1)))
    assert day.decision.allowed and [c.counter for c in day.counters] == [
        "exports_minute",
        "exports_day",
        "studies_day",
    ]
    assert [c.remaining for c in day.counters] == [1, 0, 2]
    clock.now += 61_000
    over = (await language.check(post(export(studyCount=1)))).decision
    assert over.reason is Reason.RATE_LIMITED and over.counter == "exports_day"


async def test_cost_from_an_argument(language: Engine, clock: Clock) -> None:
    assert (await language.check(post(export(studyCount=4)))).decision.allowed
    over = (await language.check(post(export(studyCount=2)))).decision
    assert over.reason is Reason.RATE_LIMITED and over.counter == "studies_day"
    assert "allows 5 units per day" in over.message
    # A call that exports no study spends none of the study budget.
    free = await language.check(post(export(studyCount=0)))
    assert free.decision.allowed and {c.counter for c in free.counters} == {
        "exports_minute",
        "exports_day",
    }
    missing = (await language.check(post(call("list_x")))).decision
    assert missing.allowed
    no_count = {k: v for k, v in EXPORT_ARGS.items() if k != "studyCount"}
    refused = (await language.check(post(call("start_dicom_export_job", **no_count)))).decision
    assert refused.reason is Reason.ARGUMENTS_INVALID
    assert "missing required argument(s) 'studyCount'" in refused.message


async def test_cost_pointer_without_schema_denies_missing_or_non_numeric(clock: Clock) -> None:
    doc = {
        "version": "1",
        "default": "deny",
        "tools": {"t": {"limits": [{"counter": "c", "window": "day", "max": 9, "cost": "/n"}]}},
    }
    engine = Engine(compile_policy(doc), open_store("memory://"), clock=clock)
    for args, text in (
        ({}, "arguments.n: missing"),
        ({"n": "3"}, "arguments.n: must be a whole number"),
        ({"n": -2}, "arguments.n: must not be negative"),
        ({"n": 10}, "arguments.n: more than the whole budget"),
    ):
        decision = (await engine.check(post(call("t", **args)))).decision
        assert decision.reason is Reason.ARGUMENTS_INVALID, args
        assert text in decision.message
    assert (await engine.check(post(call("t", n=9)))).decision.allowed
    assert (await engine.check(post(call("t", n=1)))).decision.reason is Reason.RATE_LIMITED


async def test_patterns_in_decisions(language: Engine) -> None:
    first = (await language.check(post(call("list_clusters")))).decision
    assert first.allowed and first.rule == "tools.list_*"
    await language.check(post(call("list_services")))
    shared = (await language.check(post(call("list_tasks")))).decision
    assert shared.reason is Reason.RATE_LIMITED and shared.counter == "lists"


async def test_require_approval_denies_until_approvals_exist(language: Engine) -> None:
    decision = (await language.check(post(call("delete_app", app_name="web")))).decision
    assert decision.reason is Reason.APPROVAL_REQUIRED and decision.reason.status == 403
    assert decision.message == (
        "policy violation: tool 'delete_app': approval required (a human decides)"
    )


async def test_session_scope(language: Engine) -> None:
    """A session the upstream issued to the grant (recorded, as the ext_proc stream of its
    initialize does) has its own budget; any other id spends the grant's."""
    grant = grant_of_token(TOKEN)
    for session in ("session-1", "session-2"):
        await language.store.record(records.session_record(grant, session), 60_000)
    s1 = post(call("session_tool"), **{"mcp-session-id": "session-1"})
    s2 = post(call("session_tool"), **{"mcp-session-id": "session-2"})
    assert (await language.check(s1)).decision.allowed
    assert (await language.check(s1)).decision.reason is Reason.RATE_LIMITED
    assert (await language.check(s2)).decision.allowed, "another session has its own budget"
    # Issued to this grant only: another grant naming it spends its own grant's budget.
    other = {"mcp-session-id": "session-1"}
    assert (
        await language.check(post(call("session_tool"), token="tok-B", **other))
    ).decision.allowed
    refused = await language.check(post(call("session_tool"), token="tok-B", **other))
    assert refused.decision.reason is Reason.RATE_LIMITED
    # An id never issued (invented) spends the grant's counter, as a request without one does.
    assert (
        await language.check(post(call("session_tool"), **{"mcp-session-id": "x0"}))
    ).decision.allowed
    for headers in ({}, {"mcp-session-id": "x1"}):
        denied = await language.check(post(call("session_tool"), **headers))
        assert denied.decision.reason is Reason.RATE_LIMITED
    for bad in ("x" * 257, "has space", "caf\u00e9"):
        refused = await language.check(post(call("session_tool"), **{"mcp-session-id": bad}))
        assert refused.decision.reason is Reason.MALFORMED and refused.decision.reason.status == 400


async def test_initialize_and_delete_mark_their_responses_for_the_session_record(
    language: Engine,
) -> None:
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}
    assert (await language.check(post(init))).decision.session_event == "open"
    assert (await language.check(post(init, token=None))).decision.session_event is None
    modern = {"mcp-protocol-version": "2026-07-28"}
    assert (
        await language.check(post(call("session_tool"), **modern))
    ).decision.session_event is None
    delete = HttpRequest(
        method="DELETE",
        headers={"authorization": f"Bearer {TOKEN}", "mcp-session-id": "s-1"},
        body=b"",
    )
    assert (await language.check(delete)).decision.session_event == "close"
    no_session = HttpRequest(
        method="DELETE", headers={"authorization": f"Bearer {TOKEN}"}, body=b""
    )
    assert (await language.check(no_session)).decision.session_event is None
    assert (await language.check(post(call("session_tool")))).decision.session_event is None


def test_session_keys_are_hashed_and_bounded() -> None:
    (limit,) = compile_policy(LANGUAGE).tools["session_tool"].limits
    key = counter_key(limit, "b-abc", "s" * 256)
    assert re.fullmatch(r"mcpauthz:\{g:b-abc\}:s:[0-9a-f]{32}:per_session", key)
    assert counter_key(limit, "b-abc", None) == "mcpauthz:{g:b-abc}:per_session"
    assert counter_key(limit, "b-abc", "x") != counter_key(limit, "b-def", "x")


async def test_resources_and_prompts(language: Engine) -> None:
    read = (
        await language.check(post(rpc("resources/read", uri="ecs://clusters/default")))
    ).decision
    assert read.allowed and read.rule == "resources.ecs://clusters/*"
    subscribe = rpc("resources/subscribe", uri="patient://jane-doe/record")
    denied = (await language.check(post(subscribe))).decision
    assert denied.reason is Reason.DENIED_BY_RULE
    assert "jane" not in denied.message and "no patient records" in denied.message
    other = (await language.check(post(rpc("resources/read", uri="file:///etc/passwd")))).decision
    assert other.reason is Reason.DENIED_BY_DEFAULT
    unsubscribe = rpc("resources/unsubscribe", uri="patient://jane-doe/record")
    assert (await language.check(post(unsubscribe, token=None))).decision.allowed
    prompt = (await language.check(post(rpc("prompts/get", name="deploy_checklist")))).decision
    assert prompt.allowed and prompt.rule == "prompts.deploy_*"
    refused = (await language.check(post(rpc("prompts/get", name="other")))).decision
    assert refused.reason is Reason.DENIED_BY_DEFAULT and "prompt 'other'" in refused.message


async def test_dry_run_rule_allows_and_says_what_it_would_deny(language: Engine) -> None:
    decision = (await language.check(post(call("rehearsed_deny")))).decision
    assert decision.allowed and decision.dry_run
    assert decision.would_deny is Reason.DENIED_BY_RULE
    assert decision.message == "policy violation: tool 'rehearsed_deny' denied: not yet"
    assert decision.rule == "tools.rehearsed_deny"
    plain = (await language.check(post(call("list_x")))).decision
    assert plain.allowed and not plain.dry_run and plain.would_deny is None


async def test_dry_run_counts_like_enforcement(language: Engine) -> None:
    first = await language.check(post(call("rehearsed")))
    assert first.decision.allowed and first.decision.would_deny is None
    assert first.counters[0].remaining == 0
    for _ in range(3):
        over = (await language.check(post(call("rehearsed")))).decision
        assert over.allowed and over.would_deny is Reason.RATE_LIMITED
        assert over.counter == "rehearsed" and "rate limit exceeded" in over.message
    # Would-be denials spent nothing: under the same counters, enforcement sees 1 spent.
    enforced = {**LANGUAGE, "tools": {"rehearsed": {**LANGUAGE["tools"]["rehearsed"]}}}
    del enforced["tools"]["rehearsed"]["mode"]
    language.swap(compile_policy(enforced))
    limited = (await language.check(post(call("rehearsed")))).decision
    assert limited.reason is Reason.RATE_LIMITED and limited.retry_after_s == 60


async def test_whole_policy_dry_run_and_rule_level_enforce(clock: Clock) -> None:
    doc = {
        "version": "1",
        "default": "deny",
        "mode": "dry-run",
        "tools": {
            "strict": {"mode": "enforce", "action": "deny"},
            "export": {"arguments": {"properties": {"n": {"type": "integer"}}}},
        },
    }
    engine = Engine(compile_policy(doc), open_store("memory://"), clock=clock)
    unnamed = (await engine.check(post(call("anything")))).decision
    assert unnamed.allowed and unnamed.would_deny is Reason.DENIED_BY_DEFAULT
    bad_args = (await engine.check(post(call("export", n="x")))).decision
    assert bad_args.allowed and bad_args.would_deny is Reason.ARGUMENTS_INVALID
    assert (await engine.check(post(call("strict")))).decision.reason is Reason.DENIED_BY_RULE
    # Identity and protocol refusals are never dry-run.
    assert (
        await engine.check(post(call("anything"), token=None))
    ).decision.reason is Reason.NO_GRANT


async def test_dry_run_batch_keeps_enforced_spends(language: Engine) -> None:
    assert (await language.check(post(call("rehearsed")))).decision.allowed
    batch = [call("rehearsed", 1), call("list_a", 2)]
    decision = (await language.check(post(batch))).decision
    assert decision.allowed and decision.would_deny is Reason.RATE_LIMITED
    assert decision.element == 0
    # The enforced call in the batch did spend: one of the two list calls is gone.
    assert (await language.check(post(call("list_b")))).decision.allowed
    assert (await language.check(post(call("list_c")))).decision.reason is Reason.RATE_LIMITED
    enforced_denial = [call("rehearsed_deny", 1), call("delete_app", 2)]
    denied = (await language.check(post(enforced_denial))).decision
    assert denied.reason is Reason.APPROVAL_REQUIRED and denied.element == 1


async def test_store_down_under_dry_run_only_allows(clock: Clock) -> None:
    engine = Engine(compile_policy(LANGUAGE), DownStore(), clock=clock)
    rehearsed = (await engine.check(post(call("rehearsed")))).decision
    assert rehearsed.allowed and rehearsed.would_deny is Reason.STORE_UNAVAILABLE
    enforced = (await engine.check(post(call("list_x")))).decision
    assert enforced.reason is Reason.STORE_UNAVAILABLE


def test_dry_run_header_goes_upstream_and_into_the_response() -> None:
    decision = Decision(reason=Reason.ALLOWED, grant="g", would_deny=Reason.RATE_LIMITED)
    response = envoy.check_response(decision, {})
    upstream = {h.header.key: h.header.value for h in response.ok_response.headers}
    downstream = {
        h.header.key: h.header.value for h in response.ok_response.response_headers_to_add
    }
    assert upstream["x-mcp-authz-dry-run"] == downstream["x-mcp-authz-dry-run"]
    assert upstream["x-mcp-authz-dry-run"] == "deny:rate_limited"
    assert response.dynamic_metadata["would_deny"] == "rate_limited"
    plain = envoy.check_response(Decision(reason=Reason.ALLOWED, grant="g"), {})
    assert "x-mcp-authz-dry-run" not in {h.header.key for h in plain.ok_response.headers}


def test_client_copies_of_our_headers_are_removed_and_nothing_else() -> None:
    allowed = Decision(reason=Reason.ALLOWED, grant="g")
    headers = {
        "authorization": "Bearer t",
        "x-mcp-authz-grant": "someone-else",  # replaced by ours (OVERWRITE), not removed
        "x-mcp-authz-reason": "forged",
        "not-x-mcp-authz-reason": "kept",  # the prefix inside a name is not ours
    }
    response = envoy.check_response(allowed, headers)
    # The list and session marks are removed from every allowed request that does not
    # need them (see below).
    assert list(response.ok_response.headers_to_remove) == [
        "x-mcp-authz-list",
        "x-mcp-authz-session",
        "x-mcp-authz-tasks",
        "x-mcp-authz-reason",
    ]
    assert {h.header.key: h.header.value for h in response.ok_response.headers} == {
        "x-mcp-authz-grant": "g"
    }
    no_grant = envoy.check_response(Decision(reason=Reason.ALLOWED), headers)
    assert sorted(no_grant.ok_response.headers_to_remove) == [
        "x-mcp-authz-grant",
        "x-mcp-authz-list",
        "x-mcp-authz-reason",
        "x-mcp-authz-session",
        "x-mcp-authz-tasks",
    ]
    clean = envoy.check_response(allowed, {"authorization": "Bearer t", "x-other": "1"})
    assert list(clean.ok_response.headers_to_remove) == [
        "x-mcp-authz-list",
        "x-mcp-authz-session",
        "x-mcp-authz-tasks",
    ]
    opening = envoy.check_response(replace(allowed, session_event="open"), headers)
    assert {h.header.key: h.header.value for h in opening.ok_response.headers} == {
        "x-mcp-authz-grant": "g",
        "x-mcp-authz-session": "open",
    }


async def test_allowed_list_requests_are_marked_for_the_list_filter() -> None:
    """The mark sends the response through the list filter (Envoy re-routes on it); every
    other allowed request has it removed, so a client's copy never picks that route."""
    engine = Engine(POLICY, open_store("memory://", timeout_s=1.0))
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 2, "method": "ping"},
        {"jsonrpc": "2.0", "id": 3, "method": "resources/templates/list"},
    ]
    decision = (await engine.check(post(batch))).decision
    assert decision.lists == ("tools/list", "resources/templates/list")
    response = envoy.check_response(decision, {"x-mcp-authz-list": "forged"})
    upstream = {h.header.key: h.header.value for h in response.ok_response.headers}
    assert upstream["x-mcp-authz-list"] == "tools/list,resources/templates/list"
    assert "x-mcp-authz-list" not in response.ok_response.headers_to_remove
    ping = await engine.check(post({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
    assert ping.decision.lists == ()


# --- grants from the policy -----------------------------------------------------------------


def with_grants(grants: dict[str, str]) -> Any:
    return compile_policy({**POLICY_DOC, "grants": grants})


POLICY_DOC = {"version": "1", "default": "deny", "tools": {"containerize_app": {}}}


async def test_grant_from_a_trusted_header(clock: Clock) -> None:
    engine = Engine(
        with_grants({"source": "header", "header": "x-mcp-grant"}), open_store("memory://")
    )
    ok = (
        await engine.check(post(call("containerize_app"), token=None, **{"x-mcp-grant": "alice"}))
    ).decision
    assert ok.allowed and ok.grant == "alice"
    assert (await engine.check(post(call("containerize_app")))).decision.reason is Reason.NO_GRANT


async def test_grant_from_a_jwt_claim_in_envoy_metadata() -> None:
    engine = Engine(with_grants({"source": "jwt", "claim": "sub"}), open_store("memory://"))

    def request(payload: object) -> HttpRequest:
        meta = {"envoy.filters.http.jwt_authn": {"jwt_payload": payload}}
        return replace(post(call("containerize_app"), token=None), metadata=meta)

    assert (
        await engine.check(request({"sub": "alice@example.com"}))
    ).decision.grant == "alice@example.com"
    hashed = (await engine.check(request({"sub": "auth0|12345"}))).decision.grant
    assert hashed is not None and re.fullmatch(r"h-[0-9a-f]{24}", hashed)
    assert (await engine.check(request({"sub": 42.0}))).decision.grant == "42"
    for payload in ({}, {"sub": ""}, {"sub": True}, {"sub": ["a"]}, "x"):
        assert (await engine.check(request(payload))).decision.reason is Reason.NO_GRANT, payload
    # A bearer token alone is no identity under this source.
    assert (await engine.check(post(call("containerize_app")))).decision.reason is Reason.NO_GRANT


async def test_grant_from_the_mtls_peer() -> None:
    engine = Engine(with_grants({"source": "mtls"}), open_store("memory://"))
    spiffe = "spiffe://cluster.local/ns/agents/sa/export-bot"
    peer = replace(post(call("containerize_app"), token=None), peer_principal=spiffe)
    assert (await engine.check(peer)).decision.grant == spiffe
    no_peer = post(call("containerize_app"))
    assert (await engine.check(no_peer)).decision.reason is Reason.NO_GRANT


def test_policy_grants_and_grant_header_flag_conflict() -> None:
    grants = with_grants({"source": "mtls"})
    with pytest.raises(PolicyError, match="--grant-header"):
        Engine(grants, open_store("memory://"), grant_header="x-mcp-grant")
    engine = Engine(POLICY, open_store("memory://"), grant_header="x-mcp-grant")
    with pytest.raises(PolicyError):
        engine.swap(grants)
    assert engine.policy is POLICY


def test_jwt_metadata_is_read_from_the_check_request() -> None:
    check = external_auth_pb2.CheckRequest()
    check.attributes.request.http.method = "POST"
    check.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].update(
        {"jwt_payload": {"sub": "alice", "aud": ["mcp"]}}
    )
    check.attributes.source.principal = "spiffe://x/y"
    request = envoy.http_request(check)
    assert request.metadata == {
        "envoy.filters.http.jwt_authn": {"jwt_payload": {"sub": "alice", "aud": ["mcp"]}}
    }
    assert request.peer_principal == "spiffe://x/y"


async def test_denials_echo_at_most_128_characters_of_a_name(engine: Engine) -> None:
    decision = (await engine.check(post(call("a" * 100_000)))).decision
    assert decision.reason is Reason.DENIED_BY_DEFAULT
    assert decision.message == (
        f"policy violation: tool '{'a' * 128}...' is not allowed by this policy (default deny)"
    )


SPEC_NOTIFICATIONS = (
    "notifications/cancelled",
    "notifications/initialized",
    "notifications/progress",
    "notifications/message",
    "notifications/resources/updated",
    "notifications/resources/list_changed",
    "notifications/tools/list_changed",
    "notifications/prompts/list_changed",
    "notifications/roots/list_changed",
    "notifications/elicitation/complete",
    "notifications/tasks/status",
    "notifications/subscriptions/acknowledged",
)


async def test_spec_notifications_pass_and_other_notification_names_follow_default(
    engine: Engine, clock: Clock
) -> None:
    for method in SPEC_NOTIFICATIONS:
        note = {"jsonrpc": "2.0", "method": method, "params": {}}
        assert (await engine.check(post(note, token=None))).decision.allowed, method
    unknown = {"jsonrpc": "2.0", "method": "notifications/../tools/call", "params": {"name": "x"}}
    denied = (await engine.check(post(unknown))).decision
    assert denied.reason is Reason.DENIED_BY_DEFAULT
    allow_all = compile_policy({"version": "1", "default": "allow"})
    permissive = Engine(allow_all, open_store("memory://"), clock=clock)
    assert (await permissive.check(post(unknown))).decision.allowed


async def test_a_notification_name_with_an_id_is_refused_whatever_the_default(
    engine: Engine, clock: Clock
) -> None:
    allow_all = compile_policy({"version": "1", "default": "allow"})
    permissive = Engine(allow_all, open_store("memory://"), clock=clock)
    for eng in (engine, permissive):
        for method in ("notifications/../tools/call", "notifications/initialized"):
            doc = {"jsonrpc": "2.0", "id": 5, "method": method, "params": {"name": "delete_app"}}
            decision = (await eng.check(post(doc))).decision
            assert decision.reason is Reason.MALFORMED and decision.reason.status == 400
            assert json.loads(decision.reply_body())["id"] == 5


async def test_a_bad_base64_header_echoes_the_request_id(engine: Engine) -> None:
    for value in ("=?base64?ZGVsZXRlX2FwcA?=", "=?base64?ZGVsZXRlX2FwcA===?=", "=?base64?a b?="):
        request = post(call("containerize_app", id_=42), **{"mcp-name": value})
        decision = (await engine.check(request)).decision
        assert decision.reason is Reason.HEADER_MISMATCH
        assert json.loads(decision.reply_body())["id"] == 42


async def test_a_header_mismatch_is_mcps_header_mismatch_error(engine: Engine) -> None:
    """MCP 2026-07-28: 400 with the JSON-RPC code -32020 (HeaderMismatch)."""
    request = post(call("containerize_app", id_=8), **{"mcp-name": "delete_app"})
    decision = (await engine.check(request)).decision
    assert decision.reason is Reason.HEADER_MISMATCH and decision.reason.status == 400
    reply = json.loads(decision.reply_body())
    assert (reply["id"], reply["error"]["code"]) == (8, -32020)


MODERN = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": MODERN}


def modern_call(name: str, id_: int | str = 1, **arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments, "_meta": META},
    }


def modern_headers(name: str, **extra: str) -> dict[str, str]:
    return {
        "mcp-protocol-version": MODERN,
        "mcp-method": "tools/call",
        "mcp-name": name,
        **extra,
    }


async def test_an_unknown_protocol_version_is_refused_as_the_spec_says(engine: Engine) -> None:
    """400 with UnsupportedProtocolVersionError: -32022, data.supported and data.requested."""
    request = post(call("containerize_app", id_=3), **{"mcp-protocol-version": "2027-01-01"})
    decision = (await engine.check(request)).decision
    assert decision.reason is Reason.UNSUPPORTED_VERSION and decision.reason.status == 400
    reply = json.loads(decision.reply_body())
    assert (reply["id"], reply["error"]["code"]) == (3, -32022)
    data = reply["error"]["data"]
    assert data["reason"] == "unsupported_protocol_version"
    assert data["requested"] == "2027-01-01"
    assert data["supported"][0] == MODERN and "2025-11-25" in data["supported"]
    # A stream request is refused too, and a long value is not echoed whole.
    get = HttpRequest(method="GET", headers={"mcp-protocol-version": "x" * 5000}, body=b"")
    refused = (await engine.check(get)).decision
    assert refused.reason is Reason.UNSUPPORTED_VERSION
    assert len(json.loads(refused.reply_body())["error"]["data"]["requested"]) <= 64


async def test_modern_requests_without_the_required_headers_are_refused(engine: Engine) -> None:
    ok = post(modern_call("containerize_app"), **modern_headers("containerize_app"))
    assert (await engine.check(ok)).decision.allowed
    for drop in ("mcp-method", "mcp-name"):
        headers = {k: v for k, v in modern_headers("containerize_app").items() if k != drop}
        decision = (
            await engine.check(post(modern_call("containerize_app", 2), **headers))
        ).decision
        assert decision.reason is Reason.HEADER_MISMATCH, drop
        reply = json.loads(decision.reply_body())
        assert (reply["id"], reply["error"]["code"]) == (2, -32020)


STATELESS_SESSION_POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "containerize_app": {
            "limits": [{"counter": "per_session", "window": "hour", "max": 2, "scope": "session"}]
        }
    },
}


async def test_a_stateless_request_opens_no_session_budget(clock: Clock) -> None:
    """MCP 2026-07-28 has no sessions: the upstream ignores Mcp-Session-Id, so inventing
    one per call must not open a budget; session limits count against the grant."""
    engine = Engine(compile_policy(STATELESS_SESSION_POLICY), open_store("memory://"), clock=clock)
    allowed = 0
    for i in range(6):
        headers = modern_headers("containerize_app", **{"mcp-session-id": f"random-{i}"})
        decision = (
            await engine.check(post(modern_call("containerize_app", i), **headers))
        ).decision
        allowed += decision.allowed
        if not decision.allowed:
            assert decision.reason is Reason.RATE_LIMITED
    assert allowed == 2
    # The grant's budget is the one spent: a stateless call without the header is refused
    # too, and adding a session id gains nothing.
    bare = post(modern_call("containerize_app", 7), **modern_headers("containerize_app"))
    assert (await engine.check(bare)).decision.reason is Reason.RATE_LIMITED
    for session in ("x0", "x1"):
        headers = modern_headers("containerize_app", **{"mcp-session-id": session})
        decision = (await engine.check(post(modern_call("containerize_app"), **headers))).decision
        assert decision.reason is Reason.RATE_LIMITED
    # Another grant has its own budget.
    other = post(
        modern_call("containerize_app"), token="tok-B", **modern_headers("containerize_app")
    )
    assert (await engine.check(other)).decision.allowed


async def test_a_stateless_request_ignores_a_session_id_it_could_not_use(clock: Clock) -> None:
    """The spec tells a 2026-07-28 server to ignore Mcp-Session-Id; so does mcp-authz."""
    engine = Engine(compile_policy(STATELESS_SESSION_POLICY), open_store("memory://"), clock=clock)
    headers = modern_headers("containerize_app", **{"mcp-session-id": "has space"})
    assert (await engine.check(post(modern_call("containerize_app"), **headers))).decision.allowed


def listen(*uris: str, id_: int = 1) -> dict[str, Any]:
    notifications: dict[str, Any] = {"toolsListChanged": True}
    if uris:
        notifications["resourceSubscriptions"] = list(uris)
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "subscriptions/listen",
        "params": {"notifications": notifications, "_meta": META},
    }


LISTEN_HEADERS = {"mcp-protocol-version": MODERN, "mcp-method": "subscriptions/listen"}


async def test_subscriptions_listen_passes_and_its_resources_follow_the_resource_rules(
    language: Engine,
) -> None:
    """It replaces the GET stream (lifecycle); the resources it subscribes to are governed
    as resources/subscribe is."""
    bare = post(listen(), token=None, **LISTEN_HEADERS)
    assert (await language.check(bare)).decision.allowed
    allowed = post(listen("ecs://clusters/default", "ecs://clusters/prod"), **LISTEN_HEADERS)
    assert (await language.check(allowed)).decision.allowed
    denied = post(listen("ecs://clusters/default", "patient://p-0042", id_=4), **LISTEN_HEADERS)
    decision = (await language.check(denied)).decision
    assert decision.reason is Reason.DENIED_BY_RULE
    assert decision.rule == "resources.patient://*"
    assert "patient://" not in decision.message and "p-0042" not in decision.message
    assert json.loads(decision.reply_body())["id"] == 4
    unknown = post(listen("file:///etc/passwd"), **LISTEN_HEADERS)
    assert (await language.check(unknown)).decision.reason is Reason.DENIED_BY_DEFAULT


# --- tasks (MCP 2025-11-25) ---------------------------------------------------------------

TASKS = compile_policy(
    {
        "version": "1",
        "default": "deny",
        "tools": {"export": {"limits": [{"counter": "exports", "window": "minute", "max": 1}]}},
    }
)


def on_task(method: str, task: str | None, id_: int = 3) -> dict[str, Any]:
    params = {} if task is None else {"taskId": task}
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}


async def test_task_methods_reach_only_the_grants_own_tasks() -> None:
    engine = Engine(TASKS, open_store("memory://"))
    await engine.store.record(records.task_record(grant_of_token(TOKEN), "t-own"), 60_000)
    for method in ("tasks/get", "tasks/result", "tasks/cancel"):
        assert (await engine.check(post(on_task(method, "t-own")))).decision.allowed
        for request in (post(on_task(method, "t-other")), post(on_task(method, "t-own"), "tok-B")):
            denied = (await engine.check(request)).decision
            assert denied.reason is Reason.TASK_NOT_OWNED and denied.reason.status == 403
            assert denied.ids == (3,) and denied.reason.rpc_code == -32051
            assert denied.message == (
                f"policy violation: method '{method}': the task was not created by this "
                "caller, or has expired"
            )
        anonymous = (await engine.check(post(on_task(method, "t-own"), token=None))).decision
        assert anonymous.reason is Reason.NO_GRANT
        malformed = (await engine.check(post(on_task(method, None)))).decision
        assert malformed.reason is Reason.MALFORMED


async def test_a_task_augmented_call_is_governed_as_the_call_and_marked() -> None:
    engine = Engine(TASKS, open_store("memory://"))
    augmented = call("export")
    augmented["params"]["task"] = {"ttl": 60_000}
    allowed = (await engine.check(post(augmented))).decision
    assert allowed.allowed and allowed.task_event == "create" and allowed.tool == "export"
    assert (await engine.check(post(augmented))).decision.reason is Reason.RATE_LIMITED
    denied = call("delete")
    denied["params"]["task"] = {}
    refused = (await engine.check(post(denied))).decision
    assert refused.reason is Reason.DENIED_BY_DEFAULT and refused.task_event is None
    assert (await engine.check(post(call("export"), "tok-B"))).decision.task_event is None
    listed = (await engine.check(post(on_task("tasks/list", None)))).decision
    assert listed.allowed and listed.task_event == "list"
    assert (await engine.check(post(on_task("tasks/list", None), None))).decision.task_event == (
        "list"
    )
    response = envoy.check_response(allowed, {})
    assert ("x-mcp-authz-tasks", "create") in [
        (h.header.key, h.header.value) for h in response.ok_response.headers
    ]


async def test_task_requests_are_never_batched() -> None:
    engine = Engine(TASKS, open_store("memory://"))
    batch = [on_task("tasks/list", None, 1), {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}]
    refused = (await engine.check(post(batch))).decision
    assert refused.reason is Reason.MALFORMED and refused.ids == (1, 2)
    assert "task requests cannot be sent in a batch" in refused.message
