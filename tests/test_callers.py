"""Caller-aware rules (issue 14): caller sets compiled once, variants chosen per caller,
``caller_not_permitted`` without falling through, limits for some callers only, the
step-up challenge, and the caller in the audit line, the metrics and Envoy's metadata.

Decisions here run the engine with the in-memory store on requests carrying jwt_authn's
metadata as Envoy passes it; tests/test_callers_e2e.py repeats the important ones through
the real Envoy with real signed tokens.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from authz import audit, envoy
from authz.decision import Reason
from authz.engine import Engine
from authz.grants import JWT_NAMESPACE
from authz.mcp import HttpRequest
from authz.metrics import Metrics
from authz.policy import PolicyError, compile_policy, parse_policy_text
from authz.policy.callers import Identity, compile_caller_set, recognise
from authz.store import open_store

# The policy of issue 14, verbatim.
ISSUE_POLICY = """\
version: "1"
default: deny
grants: {source: jwt, claim: sub, payload_in_metadata: jwt_payload}
callers:
  exporters: {claims: {groups: radiology-export}}   # the claim equals the value, or is an array holding it
  operators: {scopes: [ecs:write]}                   # every listed scope is in the token's scope / scp
  nightly:   {grants: [svc-nightly-export]}          # grant ids as the grants source derives them
tools:
  start_dicom_export_job:                            # a list: variants tried in order, first whose callers match wins
    - callers: [nightly]
      limits: [{counter: export_nightly, window: day, max: 500}]
    - callers: [exporters]
      limits: [{counter: start_dicom_export_job_rate, window: minute, max: 10}]
  delete_app:
    callers: [operators]
    action: require_approval
  ecs_troubleshooting_tool: {}                       # no callers: everyone
"""  # noqa: E501 (the issue's text, verbatim)


def issue_policy(**extra: Any) -> Any:
    doc = parse_policy_text(ISSUE_POLICY, "yaml")
    assert isinstance(doc, dict)
    return compile_policy({**doc, **extra})


CALLERS = {
    "exporters": {"claims": {"groups": "radiology-export"}},
    "nightly": {"grants": ["svc-nightly-export"]},
}


def call(name: str, id_: int = 1, **arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }


def request(
    doc: object, claims: dict[str, Any] | None, principal: str = "", **headers: str
) -> HttpRequest:
    """A request as Envoy passes it after jwt_authn verified a token with ``claims``."""
    metadata = {} if claims is None else {JWT_NAMESPACE: {"jwt_payload": claims}}
    return HttpRequest(
        method="POST",
        headers={"content-type": "application/json", **headers},
        body=json.dumps(doc).encode(),
        peer_principal=principal,
        metadata=metadata,
    )


def engine_for(policy: Any) -> Engine:
    clock = iter(range(1_000_000, 10**9, 10))
    return Engine(policy, open_store("memory://"), clock=lambda: next(clock))


NIGHTLY = {"sub": "svc-nightly-export", "groups": ["radiology-export"]}
EXPORTER = {"sub": "alice", "groups": ["radiology", "radiology-export"]}
EXPORTER_STRING = {"sub": "bob", "groups": "radiology-export"}
OPERATOR = {"sub": "carol", "scope": "ecs:read ecs:write"}
OPERATOR_SCP = {"sub": "dave", "scp": ["ecs:write"]}
READER = {"sub": "erin", "scope": "ecs:read"}
NOBODY = {"sub": "mallory", "groups": ["radiology-export-not"], "scope": "ecs:writer"}


# --- the issue's policy, verbatim ----------------------------------------------------------


async def test_the_issue_policy_loads_verbatim_and_behaves_as_its_comments_say() -> None:
    policy = issue_policy()
    assert list(policy.callers) == ["exporters", "operators", "nightly"]
    engine = engine_for(policy)

    async def decide(doc: object, claims: dict[str, Any]) -> Any:
        return (await engine.check(request(doc, claims))).decision

    export = call("start_dicom_export_job")
    # The nightly job is in both sets: its own variant comes first and wins.
    nightly = await decide(export, NIGHTLY)
    assert nightly.allowed and nightly.rule == "tools.start_dicom_export_job[0]"
    assert nightly.caller == "nightly"
    # An array claim holding the value, and a string claim equal to it.
    for claims in (EXPORTER, EXPORTER_STRING):
        decision = await decide(export, claims)
        assert decision.allowed and decision.rule == "tools.start_dicom_export_job[1]"
        assert decision.caller == "exporters"
    # Neither: not permitted, with the issue's message.
    refused = await decide(export, NOBODY)
    assert refused.reason is Reason.CALLER_NOT_PERMITTED
    assert refused.message == (
        "policy violation: tool 'start_dicom_export_job' is not permitted for this caller"
    )
    assert (refused.reason.status, refused.caller, refused.challenge) == (403, None, None)
    # Operators by the scope claim or the scp array; approval required.
    for claims in (OPERATOR, OPERATOR_SCP):
        decision = await decide(call("delete_app"), claims)
        assert decision.reason is Reason.APPROVAL_REQUIRED, claims
        assert decision.caller == "operators"
    refused = await decide(call("delete_app"), EXPORTER)
    assert refused.reason is Reason.CALLER_NOT_PERMITTED
    assert refused.message == "policy violation: tool 'delete_app' is not permitted for this caller"
    assert refused.caller == "exporters"
    # No callers: everyone; a tool the policy does not name: default.
    for claims in (NIGHTLY, EXPORTER, OPERATOR, NOBODY):
        assert (await decide(call("ecs_troubleshooting_tool"), claims)).allowed
    assert (await decide(call("containerize_app"), OPERATOR)).reason is Reason.DENIED_BY_DEFAULT


async def test_per_caller_budgets_are_separate_and_exact() -> None:
    engine = engine_for(issue_policy())
    export = call("start_dicom_export_job")
    for _ in range(10):
        assert (await engine.check(request(export, EXPORTER))).decision.allowed
    refused = (await engine.check(request(export, EXPORTER))).decision
    assert refused.reason is Reason.RATE_LIMITED
    assert refused.counter == "start_dicom_export_job_rate"
    # Another exporter has its own budget; the nightly job spends another counter.
    assert (await engine.check(request(export, EXPORTER_STRING))).decision.allowed
    for _ in range(20):
        result = await engine.check(request(export, NIGHTLY))
        assert result.decision.allowed
    assert [(c.counter, c.remaining) for c in result.counters] == [("export_nightly", 480)]


async def test_not_permitted_does_not_fall_through_to_patterns_or_default() -> None:
    doc = parse_policy_text(ISSUE_POLICY, "yaml")
    assert isinstance(doc, dict)
    widened = compile_policy({**doc, "default": "allow", "tools": {**doc["tools"], "*": {}}})
    engine = engine_for(widened)
    decision = (await engine.check(request(call("delete_app"), READER))).decision
    assert decision.reason is Reason.CALLER_NOT_PERMITTED
    assert (await engine.check(request(call("other_tool"), READER))).decision.allowed


async def test_resources_and_prompts_take_variants_too() -> None:
    policy = issue_policy(
        resources={"ecs://clusters/*": {"callers": ["operators"]}},
        prompts={"runbook": [{"callers": ["exporters"], "action": "deny"}, {}]},
    )
    engine = engine_for(policy)
    read = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "resources/read",
        "params": {"uri": "ecs://clusters/prod"},
    }
    assert (await engine.check(request(read, OPERATOR))).decision.allowed
    refused = (await engine.check(request(read, READER))).decision
    assert refused.reason is Reason.CALLER_NOT_PERMITTED
    assert (
        refused.message
        == "policy violation: method 'resources/read' is not permitted for this caller"
    )
    prompt = {"jsonrpc": "2.0", "id": 1, "method": "prompts/get", "params": {"name": "runbook"}}
    assert (await engine.check(request(prompt, EXPORTER))).decision.reason is Reason.DENIED_BY_RULE
    assert (await engine.check(request(prompt, READER))).decision.allowed


# --- step-up -------------------------------------------------------------------------------

METADATA_URL = "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"


async def test_a_token_lacking_only_scopes_gets_a_step_up_challenge() -> None:
    policy = issue_policy(resource_metadata=METADATA_URL)
    engine = engine_for(policy)
    result = await engine.check(request(call("delete_app"), READER))
    decision = result.decision
    assert decision.reason is Reason.CALLER_NOT_PERMITTED
    assert decision.message == (
        "policy violation: tool 'delete_app' is not permitted for this caller"
    )
    assert decision.challenge == (
        f'Bearer error="insufficient_scope", scope="ecs:write", resource_metadata="{METADATA_URL}"'
    )
    response = envoy.check_response(decision, {})
    headers = {h.header.key: h.header.value for h in response.denied_response.headers}
    assert response.denied_response.status.code == 403
    assert headers["www-authenticate"] == decision.challenge
    assert headers["x-mcp-authz-reason"] == decision.message
    body = json.loads(response.denied_response.body)
    assert body["error"]["data"]["reason"] == "caller_not_permitted"
    # Without resource_metadata the challenge still names the scope.
    plain = await engine_for(issue_policy()).check(request(call("delete_app"), READER))
    assert plain.decision.challenge == 'Bearer error="insufficient_scope", scope="ecs:write"'
    # A set with another key that does not match is no step-up: more scopes would not help.
    gated = issue_policy(
        callers={
            **CALLERS,
            "operators": {"scopes": ["ecs:write"], "claims": {"groups": "platform-ops"}},
        }
    )
    for groups, challenged in (("platform-ops", True), ("dev", False)):
        claims = {"sub": "u", "groups": [groups]}
        decision = (await engine_for(gated).check(request(call("delete_app"), claims))).decision
        assert decision.reason is Reason.CALLER_NOT_PERMITTED
        assert (decision.challenge is not None) is challenged
    # A last variant that denies everyone else: the same challenge with its denial.
    fenced = issue_policy(
        resource_metadata=METADATA_URL,
        tools={"delete_app": [{"callers": ["operators"]}, {"action": "deny", "reason": "no"}]},
    )
    decision = (await engine_for(fenced).check(request(call("delete_app"), READER))).decision
    assert decision.reason is Reason.DENIED_BY_RULE
    assert decision.challenge == (
        f'Bearer error="insufficient_scope", scope="ecs:write", resource_metadata="{METADATA_URL}"'
    )
    # Every scope the set requires is asked for, in the policy's order.
    both = issue_policy(callers={**CALLERS, "operators": {"scopes": ["ecs:read", "ecs:write"]}})
    decision = (await engine_for(both).check(request(call("delete_app"), READER))).decision
    assert decision.challenge == 'Bearer error="insufficient_scope", scope="ecs:read ecs:write"'


# --- limits for some callers, batches, dry-run ---------------------------------------------


async def test_a_limit_with_callers_applies_to_those_callers_only() -> None:
    policy = issue_policy(
        tools={
            "containerize_app": {
                "limits": [
                    {
                        "counter": "exporters_only",
                        "window": "minute",
                        "max": 2,
                        "callers": ["exporters"],
                    },
                    {"counter": "everyone", "window": "minute", "max": 100},
                ]
            }
        }
    )
    engine = engine_for(policy)
    for _ in range(2):
        result = await engine.check(request(call("containerize_app"), EXPORTER))
        assert {c.counter for c in result.counters} == {"exporters_only", "everyone"}
    refused = (await engine.check(request(call("containerize_app"), EXPORTER))).decision
    assert (refused.reason, refused.counter) == (Reason.RATE_LIMITED, "exporters_only")
    for _ in range(5):
        result = await engine.check(request(call("containerize_app"), OPERATOR))
        assert result.decision.allowed
        assert [c.counter for c in result.counters] == ["everyone"]


async def test_a_batch_element_not_permitted_refuses_the_batch() -> None:
    engine = engine_for(issue_policy())
    batch = [call("ecs_troubleshooting_tool", 1), call("delete_app", 2)]
    decision = (await engine.check(request(batch, EXPORTER))).decision
    assert decision.reason is Reason.CALLER_NOT_PERMITTED
    assert decision.message == (
        "policy violation: batch element 1: tool 'delete_app' is not permitted for this caller"
    )


async def test_a_policy_in_dry_run_only_would_deny_a_caller() -> None:
    engine = engine_for(issue_policy(mode="dry-run"))
    decision = (await engine.check(request(call("delete_app"), READER))).decision
    assert decision.allowed and decision.would_deny is Reason.CALLER_NOT_PERMITTED
    assert decision.labels == ("dry_run_deny", "caller_not_permitted")


# --- what carries the caller ---------------------------------------------------------------


async def test_the_caller_reaches_audit_metrics_and_envoy_metadata(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    policy = issue_policy()
    engine = engine_for(policy)
    metrics = Metrics()
    stream = io.StringIO()
    monkeypatch.setattr(audit._sink, "stream", stream)
    for claims in (EXPORTER, NOBODY, OPERATOR):
        result = await engine.check(request(call("start_dicom_export_job"), claims))
        metrics.record_check(result, 0.001)
        audit.record(result, "r", 0.001)
        fields = envoy.check_response(result.decision, {}).dynamic_metadata.fields
        if result.decision.caller is None:
            assert "caller" not in fields
        else:
            assert fields["caller"].string_value == result.decision.caller
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["caller"], line["reason"]) for line in lines] == [
        ("exporters", "allowed"),
        (None, "caller_not_permitted"),
        ("operators", "caller_not_permitted"),
    ]
    scrape = generate_latest(metrics.registry).decode()
    for caller, reason in (("exporters", "allowed"), ("other", "caller_not_permitted")):
        decision = "allow" if reason == "allowed" else "deny"
        assert (
            f'mcp_authz_decisions_total{{caller="{caller}",decision="{decision}",'
            f'reason="{reason}",server="",tool="start_dicom_export_job"}} 1.0'
        ) in scrape
    assert "alice" not in scrape and "mallory" not in scrape


async def test_claims_in_istio_s_payload_header() -> None:
    policy = issue_policy(
        grants={"source": "jwt", "claim": "sub", "payload_in_header": "x-jwt-payload"}
    )
    payload = base64.urlsafe_b64encode(json.dumps(EXPORTER).encode()).decode().rstrip("=")
    engine = engine_for(policy)
    allowed = request(call("start_dicom_export_job"), None, **{"x-jwt-payload": payload})
    decision = (await engine.check(allowed)).decision
    assert decision.allowed and (decision.grant, decision.caller) == ("alice", "exporters")


# --- matching ------------------------------------------------------------------------------


def caller_set(raw: dict[str, Any], source: Any = None) -> Any:
    errors: list[str] = []
    from authz.grants import GrantSource, Source

    compiled = compile_caller_set("s", raw, source or GrantSource(Source.JWT, claim="sub"), errors)
    assert errors == []
    return compiled


@pytest.mark.parametrize(
    ("raw", "who", "belongs"),
    [
        ({"claims": {"groups": ["a", "b"]}}, Identity(claims={"groups": "b"}), True),
        ({"claims": {"groups": ["a", "b"]}}, Identity(claims={"groups": ["x", "a"]}), True),
        ({"claims": {"groups": "a"}}, Identity(claims={"groups": ["x"]}), False),
        ({"claims": {"groups": "a"}}, Identity(claims={}), False),
        ({"claims": {"level": "1"}}, Identity(claims={"level": 1}), False),  # strings only
        ({"claims": {"groups": "a"}}, Identity(claims={"groups": [["a"]]}), False),
        ({"scopes": ["r", "w"]}, Identity(scopes=frozenset({"r", "w", "x"})), True),
        ({"scopes": ["r", "w"]}, Identity(scopes=frozenset({"r"})), False),
        ({"grants": ["g1"]}, Identity(grant="g1"), True),
        ({"grants": ["g1"]}, Identity(grant=None), False),
        (
            {"principals": ["spiffe://td/ns/batch/*"]},
            Identity(principal="spiffe://td/ns/batch/sa/x"),
            True,
        ),
        (
            {"principals": ["spiffe://td/ns/batch/*"]},
            Identity(principal="spiffe://td/ns/web/sa/x"),
            False,
        ),
        ({"principals": ["spiffe://td/ns/batch/*"]}, Identity(), False),
        ({"headers": {"x-team": ["a", "b"]}}, Identity(headers={"x-team": "b"}), True),
        ({"headers": {"x-team": "a"}}, Identity(headers={}), False),
        # Keys of a set are ANDed.
        ({"grants": ["g1"], "claims": {"c": "v"}}, Identity(grant="g1", claims={"c": "v"}), True),
        ({"grants": ["g1"], "claims": {"c": "v"}}, Identity(grant="g1", claims={"c": "w"}), False),
        ({"grants": ["g1"], "claims": {"c": "v"}}, Identity(grant="g2", claims={"c": "v"}), False),
    ],
)
def test_a_caller_set_matches_as_documented(
    raw: dict[str, Any], who: Identity, belongs: bool
) -> None:
    compiled = caller_set(raw)
    assert (compiled.missing_scopes(who) == ()) is belongs
    caller = recognise({"s": compiled}, who)
    assert (caller.sets == {"s"}) is belongs


def test_recognise_names_every_set_in_policy_order_and_the_short_ones() -> None:
    sets = {
        "b": caller_set({"claims": {"g": "x"}}),
        "a": caller_set({"claims": {"g": "x"}, "scopes": ["w"]}),
        "c": caller_set({"scopes": ["r", "w"]}),
    }
    caller = recognise(sets, Identity(claims={"g": ["x"]}, scopes=frozenset({"r"})))
    assert (caller.sets, caller.first) == ({"b"}, "b")
    assert dict(caller.short) == {"a": ("w",), "c": ("r", "w")}


def test_existing_rules_compile_as_before() -> None:
    policy = compile_policy(
        {
            "version": "1",
            "default": "deny",
            "tools": {"t": {"limits": [{"counter": "c", "window": "minute", "max": 1}]}},
        }
    )
    rule = policy.tools["t"]
    assert rule.variants == () and rule.callers == () and rule.limits[0].callers == ()
    assert policy.callers == {}


# --- load-time errors ----------------------------------------------------------------------


def errors_of(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(PolicyError) as info:
        compile_policy({"version": "1", "default": "deny", **doc})
    return info.value.errors


def test_load_errors_name_their_paths() -> None:
    errors = errors_of(
        {
            "grants": {"source": "jwt", "claim": "sub"},
            "callers": {"ops": {"scopes": ["ecs:write"]}, "empty": {}, "other": {"grants": ["g"]}},
            "tools": {
                "a": {"callers": ["opz"]},
                "b": [
                    {
                        "callers": ["ops"],
                        "limits": [{"counter": "shared", "window": "minute", "max": 5}],
                    },
                    {"limits": [{"counter": "shared", "window": "minute", "max": 50}]},
                    {"callers": ["ops"]},
                ],
                "c": {
                    "limits": [{"counter": "x", "window": "hour", "max": 1, "callers": ["nobody"]}]
                },
            },
        }
    )
    assert sorted(errors) == sorted(
        [
            "callers: 'other' is not a caller set name: 1-64 letters, digits, _ . or -, and not "
            "'other' (the metrics label of callers in no set)",
            "callers.empty: a caller set needs at least one of grants, claims, scopes, "
            "principals, headers",
            "tools.a.callers: no caller set named 'opz'",
            "tools.b[2]: unreachable: tools.b[1] lists no callers, so it matches every caller "
            "first",
            "tools.b[1].limits[0]: counter 'shared' is also defined at tools.b[0].limits[0] "
            "with a different window, max or scope",
            "tools.c.limits[0].callers: no caller set named 'nobody'",
        ]
    )


@pytest.mark.parametrize(
    ("grants", "key", "carried"),
    [
        (
            None,
            "scopes",
            "the bearer token's hash or --grant-header (the policy has no grants section)",
        ),
        ({"source": "bearer"}, "scopes", "grants source 'bearer'"),
        ({"source": "header", "header": "x-grant"}, "scopes", "grants source 'header'"),
        ({"source": "mtls"}, "claims", "grants source 'mtls'"),
    ],
)
def test_claims_and_scopes_need_a_jwt_grant_source(
    grants: dict[str, str] | None, key: str, carried: str
) -> None:
    value = ["ecs:write"] if key == "scopes" else {"groups": "a"}
    doc: dict[str, Any] = {"callers": {"ops": {key: value}}}
    if grants is not None:
        doc["grants"] = grants
    assert errors_of(doc) == [
        f"callers.ops.{key}: {carried} carries no verified JWT claims or scopes; use grants "
        "source 'jwt'"
    ]


def test_format_errors_of_caller_sets_and_variants() -> None:
    errors = errors_of(
        {
            "grants": {"source": "jwt", "claim": "sub"},
            "resource_metadata": 'https://x/"quoted"',
            "callers": {"ops": {"scopes": ["has space"], "colour": "red"}},
            "tools": {
                "t": [{"callers": [], "limits": [{"counter": "c", "window": "weekly", "max": 1}]}]
            },
        }
    )
    assert (
        "callers.ops.scopes[0]: 'has space' is not an OAuth scope (printable ASCII without "
        "spaces, quotes or backslashes)" in errors
    )
    assert any(e.startswith("callers.ops: unknown field(s) ('colour'") for e in errors)
    assert "tools.t[0].callers: [] should be non-empty" in errors
    assert any(e.startswith("tools.t[0].limits[0].window: 'weekly' must be") for e in errors)
    assert any(e.startswith("resource_metadata: ") for e in errors)


def test_resource_metadata_needs_a_jwt_source() -> None:
    assert errors_of({"resource_metadata": METADATA_URL}) == [
        "resource_metadata: only a grants source 'jwt' carries the scopes a step-up asks for"
    ]


def test_the_example_policy_has_three_caller_sets_at_least() -> None:
    from authz.policy import load_policy

    policy = load_policy(
        Path(__file__).resolve().parents[1] / "examples" / "ecs-callers.policy.yaml"
    )
    assert len(policy.callers) >= 3


def test_the_readme_documents_the_issue_policy() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Callers: who may call what", 1)[1].split("\n### ", 1)[0]
    assert ISSUE_POLICY in section


async def test_an_operator_s_approved_call_passes_and_others_never_open_a_request() -> None:
    store = open_store("memory://", timeout_s=1.0)
    book = store.approval_book()
    engine = Engine(issue_policy(), store, approvals=book)
    pending = (await engine.check(request(call("delete_app", app_name="web"), OPERATOR))).decision
    assert pending.reason is Reason.APPROVAL_REQUIRED and pending.approval_id is not None
    # A caller the rule does not name is refused before any approval request opens.
    refused = (await engine.check(request(call("delete_app", app_name="web"), READER))).decision
    assert refused.reason is Reason.CALLER_NOT_PERMITTED and refused.approval_id is None
    (opened,) = await book.live()
    assert opened.id == pending.approval_id
    assert opened.caller == "operators"  # what the operator sees of who asked
    await book.decide(pending.approval_id, True, "ops", "")
    allowed = (await engine.check(request(call("delete_app", app_name="web"), OPERATOR))).decision
    assert allowed.allowed and allowed.caller == "operators"
