"""One policy for several MCP servers, in process: loading, compile errors, which server a
check is for, per-server counters and approvals, estate budgets, server files and their
hot reload, the Envoy mapping, and the policy tools.

The end-to-end version (one Envoy, one or two mcp-authz, the real ECS and HealthImaging
MCP servers) is ``test_servers_e2e.py``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz import envoy
from authz.approvals import Binding
from authz.decision import CheckResult, Reason
from authz.engine import Engine
from authz.mcp import HttpRequest
from authz.metrics import Metrics, server_label
from authz.pb import external_auth_pb2
from authz.plan import counter_key
from authz.policy import Limit, Policy, PolicyError, Scope, compile_policy, load_policy
from authz.reload import FAILURE, SUCCESS, watch_policy
from authz.reply import GRANT_HEADER, LIST_HEADER, SERVER_HEADER
from authz.store.memory import MemoryStore
from authz.tooling.cases import run_cases
from authz.tooling.explain import explain
from authz.tooling.report import check_policy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "servers.policy.yaml"
TOKEN = "tok-servers"
NOW_MS = 1_700_000_000_000


def call(tool: str, server: str = "", *, token: str = TOKEN, **extra: Any) -> HttpRequest:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool}}
    return HttpRequest(
        method="POST",
        headers={"content-type": "application/json", "authorization": f"Bearer {token}"},
        body=json.dumps(body).encode(),
        server=server,
        **extra,
    )


class Clock:
    def __init__(self) -> None:
        self.ms = NOW_MS

    def __call__(self) -> int:
        return self.ms


def engine_for(policy: Policy, clock: Clock | None = None, **kwargs: Any) -> Engine:
    return Engine(policy, MemoryStore(), clock=clock or Clock(), **kwargs)


def errors_of(doc: object) -> list[str]:
    with pytest.raises(PolicyError) as info:
        compile_policy(doc)
    return info.value.errors


def estate(**servers: Any) -> dict[str, Any]:
    return {"version": "1", "servers": servers}


# --- the policy, verbatim ------------------------------------------------------


async def test_the_example_policy_loads_and_behaves_as_its_comments_say() -> None:
    policy = load_policy(EXAMPLE)
    assert policy.servers is not None and set(policy.servers) == {"healthimaging", "ecs"}
    engine = engine_for(policy)

    async def decide(tool: str, server: str) -> CheckResult:
        return await engine.check(call(tool, server))

    # HealthImaging: 10 exports a minute per grant, each also spending the writes budget.
    for _ in range(10):
        assert (await decide("start_dicom_export_job", "healthimaging")).decision.allowed
    refused = await decide("start_dicom_export_job", "healthimaging")
    assert refused.decision.reason is Reason.RATE_LIMITED
    assert refused.decision.counter == "start_dicom_export_job_rate"
    assert refused.decision.server == "healthimaging"
    # ECS: containerize_app is free; everything else falls to its own default deny.
    assert (await decide("containerize_app", "ecs")).decision.allowed
    assert (await decide("ecs_troubleshooting_tool", "ecs")).decision.reason is (
        Reason.DENIED_BY_DEFAULT
    )
    # The writes budget is 50 a day per grant across both servers: 10 exports are spent,
    # the refused 11th spent nothing, so exactly 40 delete_app calls fit.
    for i in range(40):
        result = await decide("delete_app", "ecs")
        assert result.decision.allowed, i
    last = await decide("delete_app", "ecs")
    assert last.decision.reason is Reason.RATE_LIMITED
    assert last.decision.counter == "writes"
    assert "budget 'writes' allows 50 per day" in last.decision.message
    # Another grant has a budget of its own.
    other = await engine.check(call("delete_app", "ecs", token="tok-other"))
    assert other.decision.allowed
    assert other.counters[0].remaining == 49


async def test_a_rule_of_one_server_never_applies_to_another() -> None:
    engine = engine_for(load_policy(EXAMPLE))
    on_hi = await engine.check(call("containerize_app", "healthimaging"))
    assert on_hi.decision.reason is Reason.DENIED_BY_DEFAULT
    on_ecs = await engine.check(call("start_dicom_export_job", "ecs"))
    assert on_ecs.decision.reason is Reason.DENIED_BY_DEFAULT


async def test_a_server_the_policy_does_not_define_is_refused() -> None:
    engine = engine_for(load_policy(EXAMPLE))
    for server in ("billing", ""):
        result = await engine.check(call("containerize_app", server))
        assert result.decision.reason is Reason.UNKNOWN_SERVER
        assert result.decision.reason.status == 403
        assert result.decision.server == server
        assert server_label(result) == "other"
        assert result.decision.message.startswith("policy violation: ")
    reply = json.loads(result.decision.reply_body())
    assert reply["error"]["data"] == {"reason": "unknown_server"}


async def test_a_policy_without_servers_ignores_the_route_s_server() -> None:
    policy = compile_policy({"version": "1", "default": "deny", "tools": {"t": {}}})
    engine = engine_for(policy)
    for server in ("", "ecs", "anything"):
        result = await engine.check(call("t", server))
        assert result.decision.allowed
        assert result.decision.server is None
        assert server_label(result) == ""


# --- counter keys ----------------------------------------------------------------------


def test_counter_keys_are_namespaced_per_server_and_budgets_are_shared() -> None:
    grant = Limit("calls", 60_000, 5, Scope.GRANT)
    assert counter_key(grant, "g") == "mcpauthz:{g:g}:calls"  # without servers: as before
    on_a = Limit("calls", 60_000, 5, Scope.GRANT, server="a")
    on_b = Limit("calls", 60_000, 5, Scope.GRANT, server="b")
    assert counter_key(on_a, "g") == "mcpauthz:{g:g}:server:a:calls"
    assert counter_key(on_b, "g") == "mcpauthz:{g:g}:server:b:calls"
    glob_a = Limit("calls", 60_000, 5, Scope.GLOBAL, server="a")
    assert counter_key(glob_a, "g") == "mcpauthz:{global:a}:server:a:calls"
    assert counter_key(Limit("calls", 60_000, 5, Scope.GLOBAL), "g") == "mcpauthz:{global}:calls"
    session = Limit("calls", 60_000, 5, Scope.SESSION, server="a")
    key = counter_key(session, "g", "s1")  # a session's counters share the grant's slot
    assert key.startswith("mcpauthz:{g:g}:s:") and key.endswith(":server:a:calls")
    budget = Limit("writes", 86_400_000, 50, Scope.GRANT, budget=True)
    assert counter_key(budget, "g") == "mcpauthz:{g:g}:budget:writes"
    global_budget = Limit("writes", 86_400_000, 50, Scope.GLOBAL, budget=True)
    assert counter_key(global_budget, "g") == "mcpauthz:{global}:budget:writes"
    # A counter named like a budget is still another key.
    assert counter_key(Limit("writes", 86_400_000, 50, Scope.GRANT), "g") != counter_key(
        budget, "g"
    )


async def test_the_same_counter_name_on_two_servers_is_two_budgets() -> None:
    limit = {"limits": [{"counter": "calls", "window": "minute", "max": 1}]}
    body = {"default": "deny", "tools": {"t": limit}}
    engine = engine_for(compile_policy(estate(a=body, b=body)))
    assert (await engine.check(call("t", "a"))).decision.allowed
    assert (await engine.check(call("t", "b"))).decision.allowed
    assert (await engine.check(call("t", "a"))).decision.reason is Reason.RATE_LIMITED
    assert (await engine.check(call("t", "b"))).decision.reason is Reason.RATE_LIMITED


async def test_a_global_budget_is_one_for_every_caller_and_server() -> None:
    doc = estate(
        a={"default": "deny", "tools": {"w": {"limits": [{"budget": "w"}]}}},
        b={"default": "deny", "tools": {"w": {"limits": [{"budget": "w"}]}}},
    )
    doc["budgets"] = {"w": {"window": "hour", "max": 3, "scope": "global"}}
    engine = engine_for(compile_policy(doc))
    outcomes = [
        (await engine.check(call("w", server, token=token))).decision.allowed
        for server, token in (("a", "t1"), ("b", "t2"), ("a", "t3"), ("b", "t4"))
    ]
    assert outcomes == [True, True, True, False]


async def test_a_denied_call_spends_nothing_anywhere() -> None:
    # One batch message spends a server counter and the budget; the server counter is
    # spent up, so the call is refused, and the budget is left untouched.
    doc = estate(
        a={
            "default": "deny",
            "tools": {
                "x": {"limits": [{"counter": "x", "window": "hour", "max": 1}, {"budget": "w"}]},
                "y": {"limits": [{"budget": "w"}]},
            },
        }
    )
    doc["budgets"] = {"w": {"window": "hour", "max": 3}}
    engine = engine_for(compile_policy(doc))
    assert (await engine.check(call("x", "a"))).decision.allowed  # w: 2 left
    for _ in range(5):
        assert (await engine.check(call("x", "a"))).decision.reason is Reason.RATE_LIMITED
    assert (await engine.check(call("y", "a"))).decision.allowed  # w: 1 left
    last = await engine.check(call("y", "a"))
    assert last.decision.allowed and last.counters[0].remaining == 0


# --- approvals -------------------------------------------------------------------------


def test_an_approval_binds_the_server() -> None:
    base = {
        "grant": "g",
        "tool": "t",
        "arguments_sha256": "0" * 64,
        "argument_names": (),
        "policy_digest": "d",
    }
    assert Binding(**base, server="a").key != Binding(**base, server="b").key
    assert Binding(**base).key != Binding(**base, server="a").key


async def test_an_approval_for_one_server_does_not_let_a_call_through_another() -> None:
    body = {"default": "deny", "tools": {"t": {"action": "require_approval"}}}
    store = MemoryStore()
    book = store.approval_book()
    engine = Engine(compile_policy(estate(a=body, b=body)), store, approvals=book)
    pending = await engine.check(call("t", "a"))
    assert pending.decision.reason is Reason.APPROVAL_REQUIRED
    approval_id = pending.decision.approval_id
    assert approval_id is not None
    approval = await book.get(approval_id)
    assert approval is not None and approval.server == "a"
    await book.decide(approval_id, True, "operator", "")
    on_b = await engine.check(call("t", "b"))
    assert on_b.decision.reason is Reason.APPROVAL_REQUIRED
    assert on_b.decision.approval_id != approval_id
    assert (await engine.check(call("t", "a"))).decision.allowed


# --- choosing the server ---------------------------------------------------------------


async def test_istio_destinations_choose_the_server_the_route_wins() -> None:
    ecs_id = "spiffe://cluster.local/ns/mcp/sa/mcp-ecs"
    hi_id = "spiffe://cluster.local/ns/mcp/sa/mcp-healthimaging"
    doc = estate(
        ecs={
            "default": "deny",
            "tools": {"ecs_only": {}},
            "match": {"principals": [ecs_id], "hosts": ["mcp-ecs.mcp.svc.cluster.local"]},
        },
        healthimaging={
            "default": "deny",
            "tools": {"hi_only": {}},
            "match": {"principals": [hi_id], "hosts": ["mcp-healthimaging.mcp.svc"]},
        },
    )
    policy = compile_policy(doc)
    assert policy.server_name("", ecs_id, "") == "ecs"
    assert policy.server_name("", "", "MCP-ECS.mcp.svc.cluster.local:8000") == "ecs"
    assert policy.server_name("", "", "mcp-healthimaging.mcp.svc") == "healthimaging"
    # The mesh identity of the destination wins over the authority the client chose.
    assert policy.server_name("", hi_id, "mcp-ecs.mcp.svc.cluster.local") == "healthimaging"
    # The route's mcp_server wins over both.
    assert policy.server_name("ecs", hi_id, "mcp-healthimaging.mcp.svc") == "ecs"
    assert policy.server_name("", "spiffe://other", "elsewhere") == ""
    engine = engine_for(policy)
    result = await engine.check(call("hi_only", destination_principal=hi_id, host="x"))
    assert result.decision.allowed and result.decision.server == "healthimaging"
    result = await engine.check(call("hi_only", destination_principal=ecs_id))
    assert result.decision.reason is Reason.DENIED_BY_DEFAULT


def check_request(**extensions: str) -> external_auth_pb2.CheckRequest:
    check = external_auth_pb2.CheckRequest()
    http = check.attributes.request.http
    http.method = "POST"
    http.host = "gateway.example:8080"
    http.headers["content-type"] = "application/json"
    http.headers["mcp_server"] = "ecs"  # a client's header: never read as the server
    http.headers["x-mcp-server"] = "ecs"
    check.attributes.destination.principal = "spiffe://cluster.local/ns/mcp/sa/x"
    for key, value in extensions.items():
        check.attributes.context_extensions[key] = value
    return check


def test_envoy_maps_the_route_s_context_extension_and_never_a_header() -> None:
    request = envoy.http_request(check_request(mcp_server="healthimaging"))
    assert request.server == "healthimaging"
    assert request.destination_principal == "spiffe://cluster.local/ns/mcp/sa/x"
    assert request.host == "gateway.example:8080"
    assert envoy.http_request(check_request()).server == ""


async def test_dynamic_metadata_and_audit_carry_the_server(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from authz import audit

    audit.configure_logging("info", "json", "info")
    engine = engine_for(load_policy(EXAMPLE))
    result = await engine.check(call("containerize_app", "ecs"))
    response = envoy.check_response(result.decision, {})
    assert response.dynamic_metadata.fields["server"].string_value == "ecs"
    audit.record(result, "rid", 0.001)
    refused = await engine.check(call("containerize_app", "billing"))
    audit.record(refused, "rid2", 0.001)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["server"], line["reason"]) for line in lines] == [
        ("ecs", "allowed"),
        ("billing", "unknown_server"),
    ]
    plain = engine_for(compile_policy({"version": "1", "default": "allow"}))
    response = envoy.check_response((await plain.check(call("t"))).decision, {})
    assert "server" not in response.dynamic_metadata.fields


async def test_metrics_carry_a_bounded_server_label() -> None:
    from prometheus_client import generate_latest

    engine = engine_for(load_policy(EXAMPLE))
    metrics = Metrics()
    for server in ("ecs", "healthimaging", "made-up-1", "made-up-2"):
        metrics.record_check(await engine.check(call("containerize_app", server)), 0.001)
    text = generate_latest(metrics.registry).decode()
    servers = {
        line.split('server="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("mcp_authz_decisions_total{")
    }
    assert servers == {"ecs", "healthimaging", "other"}
    assert "made-up" not in text


# --- compile errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            estate(a={"default": "deny", "tools": {"t": {"limits": [{"budget": "nope"}]}}}),
            "servers.a.tools.t.limits[0].budget: no budget 'nope' is defined under budgets",
        ),
        (
            {**estate(a={"default": "deny"}), "tools": {"t": {}}},
            "tools: a policy with servers says it in each server (servers.NAME.tools)",
        ),
        (
            {**estate(a={"default": "deny"}), "default": "deny"},
            "default: a policy with servers says it in each server",
        ),
        (
            estate(a={"default": "deny", "budgets": {"w": {"window": "day", "max": 1}}}),
            "servers.a.budgets: set once, at the top of the policy with servers",
        ),
        (
            estate(a={"default": "deny", "grants": {"source": "bearer"}}),
            "servers.a.grants: set once, at the top of the policy with servers",
        ),
        (estate(a={"tools": {}}), "servers.a: 'default' is a required property"),
        (
            estate(a={"default": "deny", "tools": {"t": {"limit": []}}}),
            "servers.a.tools.t: unknown field(s)",
        ),
        (estate(a={"file": "a.yaml", "default": "deny"}), "servers.a: a server in a file"),
        (estate(a={"file": "a.yaml"}), "servers.a.file: not read"),
        (estate(**{"bad name": {"default": "deny"}}), "'bad name' does not match"),
        (
            estate(
                a={"default": "deny", "match": {"principals": ["p"]}},
                b={"default": "deny", "match": {"principals": ["p"]}},
            ),
            "servers.b.match.principals: 'p' is also matched by server 'a'",
        ),
        (
            {
                **estate(a={"default": "deny"}),
                "budgets": {"w": {"window": "day", "max": 1, "scope": "session"}},
            },
            "budgets.w.scope",
        ),
        (
            estate(
                a={
                    "default": "deny",
                    "tools": {"t": {"limits": [{"budget": "w", "counter": "c"}]}},
                }
            ),
            "unknown field(s) ('counter' was unexpected)",
        ),
        ({"version": "1", "servers": {}}, "servers: {} should be non-empty"),
    ],
)
def test_compile_errors_name_their_path(doc: dict[str, Any], expected: str) -> None:
    errors = errors_of(doc)
    assert any(expected in error for error in errors), errors


def test_every_error_of_every_server_is_reported_at_once() -> None:
    errors = errors_of(
        estate(
            a={"default": "maybe"},
            b={"default": "deny", "tools": {"t": {"limits": [{"budget": "x"}]}}},
        )
    )
    assert any(e.startswith("servers.a.default:") for e in errors), errors
    assert any(e.startswith("servers.b.tools.t.limits[0].budget:") for e in errors), errors


def test_budgets_in_a_policy_without_servers_are_counters_of_their_own() -> None:
    policy = compile_policy(
        {
            "version": "1",
            "default": "deny",
            "budgets": {"w": {"window": "day", "max": 2}},
            "tools": {"t": {"limits": [{"budget": "w"}]}},
        }
    )
    assert counter_key(policy.tools["t"].limits[0], "g") == "mcpauthz:{g:g}:budget:w"


# --- server files and hot reload -------------------------------------------------------


def write(path: Path, content: object) -> None:
    text = content if isinstance(content, str) else yaml.safe_dump(content)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def hi_file(reason: str) -> dict[str, Any]:
    return {
        "version": "1",
        "default": "deny",
        "tools": {"probe": {"action": "deny", "reason": reason}, "start_dicom_export_job": {}},
    }


def test_a_server_file_loads_relative_to_the_main_file(tmp_path: Path) -> None:
    (tmp_path / "teams").mkdir()
    write(tmp_path / "teams" / "hi.yaml", hi_file("v1"))
    main = tmp_path / "policy.yaml"
    write(main, estate(healthimaging={"file": "teams/hi.yaml"}, ecs={"default": "deny"}))
    policy = load_policy(main)
    assert policy.servers is not None
    assert policy.servers["healthimaging"].tools["probe"].reason == "v1"
    assert [f.path for f in policy.files] == [str(tmp_path / "teams" / "hi.yaml")]
    out = io.StringIO()
    assert check_policy(str(main), out=out) == 0
    assert f"server healthimaging from {tmp_path / 'teams' / 'hi.yaml'}" in out.getvalue()


def test_a_broken_server_file_at_start_is_refused_with_its_path(tmp_path: Path) -> None:
    write(tmp_path / "hi.yaml", {"version": "1", "default": "deny", "tools": {"t": {"x": 1}}})
    write(tmp_path / "bad.json", "{not json")
    main = tmp_path / "policy.yaml"
    write(
        main,
        estate(
            healthimaging={"file": "hi.yaml"},
            ecs={"file": "bad.json"},
            gone={"file": "missing.yaml"},
        ),
    )
    with pytest.raises(PolicyError) as info:
        load_policy(main)
    errors = info.value.errors
    assert any(e.startswith(f"{tmp_path / 'hi.yaml'}: tools.t: unknown field") for e in errors)
    assert any(e.startswith(f"{tmp_path / 'bad.json'}: (file): invalid JSON") for e in errors)
    assert any(e.startswith(f"{tmp_path / 'missing.yaml'}: (file): cannot read") for e in errors)
    assert len(errors) == 3, errors


async def test_a_broken_server_file_keeps_its_previous_version_on_reload(
    tmp_path: Path,
) -> None:
    hi = tmp_path / "hi.yaml"
    write(hi, hi_file("v1"))
    main = tmp_path / "policy.yaml"
    ecs = {"default": "deny", "tools": {"probe": {"action": "deny", "reason": "ecs-v1"}}}
    write(main, estate(healthimaging={"file": "hi.yaml"}, ecs=ecs))
    engine = engine_for(load_policy(main))
    results: list[str] = []
    watcher = asyncio.create_task(
        watch_policy(main, engine, lambda r, _: results.append(r), interval=0.02)
    )

    async def reason(server: str) -> str:
        return (await engine.check(call("probe", server))).decision.message

    async def until(condition: Any) -> None:
        for _ in range(500):
            if await condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition never held")

    try:
        # A new version of the server file alone is seen and put in force.
        write(hi, hi_file("v2"))
        await until(lambda: _contains(reason("healthimaging"), "v2"))
        assert results == [SUCCESS]
        # The server file breaks while the main file changes: the main file's change goes
        # in force, the broken server keeps v2, and the errors are reported once.
        write(hi, {"version": "1", "default": "deny", "tools": {"t": {"oops": 1}}})
        write(
            main,
            estate(
                healthimaging={"file": "hi.yaml"},
                ecs={**ecs, "tools": {"probe": {"action": "deny", "reason": "ecs-v2"}}},
            ),
        )
        await until(lambda: _contains(reason("ecs"), "ecs-v2"))
        assert "v2" in await reason("healthimaging")
        assert engine.policy.kept and engine.policy.kept[0].startswith(f"{hi}: tools.t")
        await asyncio.sleep(0.2)
        assert results == [SUCCESS, FAILURE, SUCCESS]  # reported once, not every interval
        # Fixed: in force.
        write(hi, hi_file("v3"))
        await until(lambda: _contains(reason("healthimaging"), "v3"))
        assert not engine.policy.kept
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def _contains(text: Any, part: str) -> bool:
    return part in await text


# --- the policy tools ------------------------------------------------------------------


def test_explain_takes_a_server() -> None:
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "delete_app"}}
    ).encode()
    out = io.StringIO()
    assert explain(str(EXAMPLE), body, "g", out=out, server="ecs") == 0
    text = out.getvalue()
    assert "server: ecs" in text
    assert "budget 'writes': 50 per day per grant (key mcpauthz:{g:g}:budget:writes)" in text
    out = io.StringIO()
    assert explain(str(EXAMPLE), body, "g", out=out, server="healthimaging") == 1
    assert "denied_by_default" in out.getvalue()
    out = io.StringIO()
    assert explain(str(EXAMPLE), body, "g", out=out) == 1
    assert "unknown_server" in out.getvalue()


def test_the_example_cases_pass() -> None:
    out = io.StringIO()
    cases = ROOT / "examples" / "servers.cases.yaml"
    assert run_cases(str(EXAMPLE), str(cases), out=out) == 0, out.getvalue()
    assert "7 passed, 0 failed" in out.getvalue()


def test_check_policy_describes_every_server_and_budget() -> None:
    out = io.StringIO()
    assert check_policy(str(EXAMPLE), out=out) == 0
    text = out.getvalue()
    assert "2 servers" in text
    assert "budget 'writes': 50 per day per grant" in text
    assert "  server healthimaging (enforce" in text
    assert "    tool delete_app: allow within budget 'writes'" in text


def test_check_policy_against_needs_a_name_per_server() -> None:
    err = io.StringIO()
    code = check_policy(str(EXAMPLE), ["http://127.0.0.1:1/mcp"], out=io.StringIO(), err=err)
    assert code == 2
    assert "expected NAME=URL, NAME one of healthimaging, ecs" in err.getvalue()


def test_a_broken_budget_is_reported_once() -> None:
    doc = estate(a={"default": "deny", "tools": {"t": {"limits": [{"budget": "w"}]}}})
    doc["budgets"] = {"w": {"window": "fortnight", "max": 1}}
    errors = errors_of(doc)
    assert len(errors) == 1 and errors[0].startswith("budgets.w.window:"), errors


# --- servers with caller sets, rule variants, Mcp-Param headers and the list filter ------


def _listed(names: list[str]) -> bytes:
    tools = [{"name": name} for name in names]
    return json.dumps({"jsonrpc": "2.0", "id": 5, "result": {"tools": tools}}).encode()


def _list_request(server: str) -> HttpRequest:
    body = {"jsonrpc": "2.0", "id": 5, "method": "tools/list"}
    return HttpRequest(
        method="POST",
        headers={
            "content-type": "application/json",
            "authorization": f"Bearer {TOKEN}",
            "x-mcp-authz-server": "ecs",  # a client's copy: never the server
        },
        body=json.dumps(body).encode(),
        server=server,
    )


async def _filtered(engine: Engine, headers: dict[str, str], names: list[str]) -> Any:
    """The ext_proc list filter's answer for a tools/list response listing ``names``, with
    the request headers Envoy passes it (those ext_authz set): the filtered body, or the
    error that replaces it."""
    from authz import extproc
    from authz.pb import external_processor_pb2 as pb

    def message(kind: str, values: dict[str, str] | None = None, raw: bytes = b"") -> Any:
        msg = pb.ProcessingRequest()
        part = getattr(msg, kind)
        for key, value in (values or {}).items():
            header = part.headers.headers.add()
            header.key, header.raw_value = key, value.encode()
        if raw:
            part.body, part.end_of_stream = raw, True
        return msg

    class Context:
        async def abort(self, code: Any, details: str) -> None:
            raise AssertionError(f"aborted: {code} {details}")

    async def stream() -> Any:
        yield message("request_headers", headers)
        yield message("request_body", raw=b'{"jsonrpc": "2.0", "id": 5, "method": "tools/list"}')
        yield message("response_headers", {":status": "200", "content-type": "application/json"})
        yield message("response_body", raw=_listed(names))

    service = extproc.ListFilterService(engine, Metrics())
    async for reply in service.Process(stream(), Context()):
        if reply.HasField("immediate_response"):
            return reply  # Envoy sends it to the client and ends the stream
        last = reply
    return last


def _headers_set(response: external_auth_pb2.CheckResponse) -> dict[str, str]:
    return {h.header.key: h.header.value for h in response.ok_response.headers}


async def test_a_list_is_filtered_with_the_rules_of_its_own_server() -> None:
    """ext_authz names the server whose policy allowed a list request (x-mcp-authz-server,
    over a client's copy), and the list filter keeps what that server's rules allow: ECS's
    two tools on an ECS list, HealthImaging's export on a HealthImaging list, each hiding
    the other's even where both servers list the same names."""
    engine = engine_for(load_policy(EXAMPLE))
    every = ["containerize_app", "delete_app", EXPORT_TOOL, "ecs_troubleshooting_tool"]
    kept = {}
    for server in ("ecs", "healthimaging"):
        request = _list_request(server)
        result = await engine.check(request)
        assert result.decision.allowed and result.decision.server == server
        response = envoy.check_response(result.decision, request.headers)
        sent = _headers_set(response)
        assert sent[SERVER_HEADER] == server
        assert sent[LIST_HEADER] == "tools/list"
        reply = await _filtered(engine, sent, every)
        body = json.loads(reply.response_body.response.body_mutation.body)
        kept[server] = [tool["name"] for tool in body["result"]["tools"]]
    assert kept == {"ecs": ["containerize_app", "delete_app"], "healthimaging": [EXPORT_TOOL]}
    # A list whose server the policy does not define is not passed on (fail closed).
    unknown = {LIST_HEADER: "tools/list", GRANT_HEADER: "g", "x-request-id": "r"}
    reply = await _filtered(engine, {**unknown, SERVER_HEADER: "billing"}, every)
    assert reply.immediate_response.status.code == 502
    reply = await _filtered(engine, unknown, every)
    assert reply.immediate_response.status.code == 502


async def test_a_client_s_server_header_is_removed_where_ext_authz_sets_none() -> None:
    spoofed = {"x-mcp-authz-server": "ecs"}
    engine = engine_for(load_policy(EXAMPLE))
    result = await engine.check(call("containerize_app", "ecs"))
    response = envoy.check_response(result.decision, spoofed)
    assert "x-mcp-authz-server" in response.ok_response.headers_to_remove
    assert SERVER_HEADER not in _headers_set(response)
    plain = engine_for(compile_policy({"version": "1", "default": "allow"}))
    listing = await plain.check(_list_request(""))
    assert listing.decision.lists and listing.decision.server is None
    response = envoy.check_response(listing.decision, spoofed)
    assert "x-mcp-authz-server" in response.ok_response.headers_to_remove


EXPORT_TOOL = "start_dicom_export_job"
JWT_GRANTS = {"source": "jwt", "claim": "sub"}


def _with_claims(request: HttpRequest, claims: dict[str, Any]) -> HttpRequest:
    from msgspec.structs import replace

    from authz.grants import JWT_NAMESPACE

    return replace(request, metadata={JWT_NAMESPACE: {"jwt_payload": claims}})


def _callers_estate() -> Policy:
    return compile_policy(_callers_estate_doc())


def _callers_estate_doc() -> dict[str, Any]:
    return {
        "version": "1",
        "grants": JWT_GRANTS,
        "budgets": {"writes": {"window": "day", "max": 2}},
        "servers": {
            "healthimaging": {
                "default": "deny",
                "callers": {"exporters": {"claims": {"role": "exporter"}}},
                "tools": {
                    EXPORT_TOOL: [
                        {
                            "callers": ["exporters"],
                            "limits": [{"budget": "writes", "callers": ["exporters"]}],
                        }
                    ],
                    "get_datastore": {
                        "arguments": {
                            "type": "object",
                            "properties": {
                                "datastore_id": {"type": "string", "x-mcp-header": "Datastore"}
                            },
                        }
                    },
                },
            },
            "ecs": {"default": "deny", "tools": {"containerize_app": {}}},
        },
    }


async def test_caller_sets_and_variants_work_inside_a_server_body() -> None:
    """A server's caller sets are its own (checked against the estate's jwt grants), its
    variants decide for its callers, and a budget limit may name caller sets."""
    policy = _callers_estate()
    assert policy.servers is not None
    hi = policy.servers["healthimaging"]
    assert list(hi.callers) == ["exporters"] and not policy.servers["ecs"].callers
    assert [h.name for h in hi.tools["get_datastore"].param_headers] == ["Datastore"]
    engine = engine_for(policy)
    exporter = {"sub": "alice", "role": "exporter"}
    for _ in range(2):
        result = await engine.check(_with_claims(call(EXPORT_TOOL, "healthimaging"), exporter))
        assert result.decision.allowed, result.decision.message
        assert (result.decision.caller, result.decision.server) == ("exporters", "healthimaging")
    spent = await engine.check(_with_claims(call(EXPORT_TOOL, "healthimaging"), exporter))
    assert spent.decision.reason is Reason.RATE_LIMITED and spent.decision.counter == "writes"
    other = await engine.check(_with_claims(call(EXPORT_TOOL, "healthimaging"), {"sub": "bob"}))
    assert other.decision.reason is Reason.CALLER_NOT_PERMITTED
    # ECS names no caller sets: the same caller is in none there.
    ecs = await engine.check(_with_claims(call("containerize_app", "ecs"), exporter))
    assert ecs.decision.allowed and ecs.decision.caller is None
    from prometheus_client import generate_latest

    metrics = Metrics()
    metrics.record_check(ecs, 0.001)
    metrics.record_check(other, 0.001)
    text = generate_latest(metrics.registry).decode()
    assert (
        'mcp_authz_decisions_total{caller="other",decision="deny",'
        'reason="caller_not_permitted",server="healthimaging",tool="start_dicom_export_job"} 1.0'
    ) in text


def test_caller_sets_belong_in_a_server_and_are_checked_against_the_estate_s_grants() -> None:
    top = errors_of(
        {
            "version": "1",
            "grants": JWT_GRANTS,
            "callers": {"ops": {"grants": ["g"]}},
            "servers": {"ecs": {"default": "deny"}},
        }
    )
    assert any(e.startswith("callers: a policy with servers says it in each server") for e in top)
    body = {"default": "deny", "callers": {"ops": {"claims": {"role": "ops"}}}}
    bearer = errors_of(estate(ecs=body))
    assert any(e.startswith("servers.ecs.callers.ops") for e in bearer), bearer
    assert compile_policy({**estate(ecs=body), "grants": JWT_GRANTS}).servers is not None


def test_explain_and_check_policy_show_a_server_s_callers(tmp_path: Path) -> None:
    path = tmp_path / "estate.yaml"
    write(path, _callers_estate_doc())
    out = io.StringIO()
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": EXPORT_TOOL}}
    ).encode()
    claims = {"sub": "alice", "role": "exporter"}
    code = explain(
        str(path), body, out=out, err=io.StringIO(), claims=claims, server="healthimaging"
    )
    text = out.getvalue()
    assert code == 0, text
    assert "server: healthimaging\ncaller: exporters (in: exporters)" in text
    assert "budget 'writes': 2 per day per grant, only for exporters" in text
    out = io.StringIO()
    assert check_policy(str(path), out=out, err=io.StringIO()) == 0
    text = out.getvalue()
    assert "    callers exporters: claims role=exporter" in text
    rows = [line.split("  ") for line in text.splitlines()]
    cells = [[cell.strip() for cell in row if cell.strip()] for row in rows]
    assert [EXPORT_TOOL, "allow 2/day", "not permitted"] in cells
