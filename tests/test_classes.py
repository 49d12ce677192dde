"""Rules by risk class (tool annotations), the catalogue learnt from the upstream's lists,
and the refusal of tools the upstream does not list (``unlisted_tools: deny``)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from msgspec.structs import replace

from authz import extproc, listing
from authz.catalogue import MAX_TOOLS, Annotations, Catalogue, annotations_of, ranked_classes
from authz.decision import Reason
from authz.engine import Engine
from authz.mcp import HttpRequest
from authz.metrics import Metrics
from authz.pb import external_processor_pb2 as pb
from authz.policy import Action, PolicyError, compile_policy
from authz.store import open_store

LIMIT = {"counter": "open", "window": "minute", "max": 5}
CLASSES: dict[str, Any] = {
    "version": "1",
    "default": "deny",
    "tools": {"reader_by_name": {"action": "deny"}, "admin_*": {"action": "deny"}},
    "classes": {
        "read_only": {},
        "destructive": {"action": "require_approval"},
        "open_world": {"limits": [LIMIT]},
    },
}
READER = {"readOnlyHint": True, "openWorldHint": False}
SEARCH = {"readOnlyHint": True}  # read-only, open-world by default
ADDER = {"destructiveHint": False, "openWorldHint": False}


def hints(raw: dict[str, bool] | None) -> Annotations:
    return annotations_of(raw)


def test_precedence_exact_then_glob_then_class_then_default() -> None:
    policy = compile_policy(CLASSES)
    # an exact name and a glob win over the class the tool is in
    assert policy.rule_for_tool("reader_by_name", hints(READER)).where == "tools.reader_by_name"
    assert policy.rule_for_tool("admin_read", hints(READER)).where == "tools.admin_*"
    # then the class: the riskier one first
    assert policy.rule_for_tool("reader", hints(READER)).where == "classes.read_only"
    assert policy.rule_for_tool("search", hints(SEARCH)).where == "classes.open_world"
    destructive_open = policy.rule_for_tool("drop", hints({"destructiveHint": True}))
    assert destructive_open.where == "classes.destructive"
    assert destructive_open.action is Action.REQUIRE_APPROVAL
    # additive has no class rule here, and the tool is closed-world: default
    assert policy.rule_for_tool("add", hints(ADDER)) is policy.default


def test_a_tool_not_known_counts_as_destructive_and_open_world() -> None:
    assert ranked_classes(Annotations()) == ("destructive", "open_world")
    policy = compile_policy(CLASSES)
    assert policy.rule_for_tool("never_seen").where == "classes.destructive"
    only_open_world = compile_policy({**CLASSES, "classes": {"open_world": {"limits": [LIMIT]}}})
    assert only_open_world.rule_for_tool("never_seen").where == "classes.open_world"
    assert Catalogue().hints("never_seen") == Annotations()


def test_class_rules_are_checked_like_tool_rules() -> None:
    with pytest.raises(PolicyError) as bad:
        compile_policy(
            {
                "version": "1",
                "default": "allow",
                "classes": {
                    "writes": {},
                    "destructive": {"action": "deny", "limits": [LIMIT]},
                    "read_only": {"callers": ["nobody"]},
                },
            }
        )
    text = str(bad.value)
    assert "writes" in text
    assert "classes.destructive: a denied tool class cannot have limits" in text
    assert "classes.read_only.callers: no caller set named 'nobody'" in text
    with pytest.raises(PolicyError, match="unlisted_tools"):
        compile_policy({"version": "1", "default": "allow", "unlisted_tools": "maybe"})


def test_classes_apply_to_the_list_filter() -> None:
    policy = compile_policy(
        {"version": "1", "default": "allow", "classes": {"destructive": {"action": "deny"}}}
    )
    caller = listing.Caller(grant="g")
    catalogue = Catalogue().learnt(
        [("reader", hints(READER)), ("dropper", hints({"destructiveHint": True}))], True
    )
    assert listing.visible(policy, caller, "tools/list", "reader", catalogue)
    assert not listing.visible(policy, caller, "tools/list", "dropper", catalogue)
    # not known: destructive, so hidden
    assert not listing.visible(policy, caller, "tools/list", "other", catalogue)


def test_the_catalogue_is_bounded_and_replaced_not_changed() -> None:
    first = Catalogue().learnt([("a", Annotations())], complete=False)
    assert not first.known and "a" in first.tools
    second = first.learnt([("b", hints(READER))], complete=True)
    assert second is not first and second.known and "b" not in first.tools
    assert second.learnt([("b", hints(READER))], complete=True) is second
    huge = Catalogue.fetched((f"t{i}", Annotations()) for i in range(MAX_TOOLS + 5))
    assert len(huge.tools) == MAX_TOOLS and huge.known
    assert len(huge.learnt([("more", Annotations())], True).tools) == MAX_TOOLS


def response_stream(
    payload: dict[str, Any], content_type: str, server: str | None = None
) -> list[pb.ProcessingRequest]:
    def headers(kind: str, values: dict[str, str]) -> pb.ProcessingRequest:
        message = pb.ProcessingRequest()
        part = getattr(message, kind)
        for key, value in values.items():
            header = part.headers.headers.add()
            header.key, header.raw_value = key, value.encode()
        return message

    def body(kind: str, raw: bytes) -> pb.ProcessingRequest:
        message = pb.ProcessingRequest()
        getattr(message, kind).body = raw
        getattr(message, kind).end_of_stream = True
        return message

    raw = json.dumps(payload).encode()
    if content_type == "text/event-stream":
        raw = b"event: message\ndata: " + raw + b"\n\n"
    marked = {"x-mcp-authz-list": "tools/list", "x-mcp-authz-grant": "g-1"}
    if server is not None:  # ext_authz names the server whose policy allowed the list
        marked["x-mcp-authz-server"] = server
    request = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
    return [
        headers("request_headers", marked),
        body("request_body", json.dumps(request).encode()),
        headers("response_headers", {":status": "200", "content-type": content_type}),
        body("response_body", raw),
    ]


class Context:
    async def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


async def process(
    engine: Engine, messages: list[pb.ProcessingRequest], metrics: Metrics | None = None
) -> bytes:
    service = extproc.ListFilterService(engine, metrics or Metrics())

    async def stream() -> AsyncIterator[pb.ProcessingRequest]:
        for message in messages:
            yield message

    replies = [reply async for reply in service.Process(stream(), Context())]
    return bytes(replies[-1].response_body.response.body_mutation.body)


@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream"])
async def test_the_catalogue_is_learnt_from_a_processed_list_response(content_type: str) -> None:
    """Annotations are learnt before filtering: the hidden tool is learnt too, and the
    class of each listed tool decides what the caller sees."""
    policy = compile_policy(
        {"version": "1", "default": "allow", "classes": {"destructive": {"action": "deny"}}}
    )
    engine = Engine(policy, open_store("memory://"))
    tools = [
        {"name": "reader", "annotations": READER},
        {"name": "dropper", "annotations": {"destructiveHint": True}},
    ]
    page = {"jsonrpc": "2.0", "id": 7, "result": {"tools": tools, "nextCursor": "p2"}}
    filtered = await process(engine, response_stream(page, content_type))
    assert b'"reader"' in filtered and b'"dropper"' not in filtered
    assert engine.catalogue.hints("reader") == hints(READER)
    assert engine.catalogue.hints("dropper").destructive
    assert not engine.catalogue.known  # a page with nextCursor is not the whole list
    last = {"jsonrpc": "2.0", "id": 7, "result": {"tools": [{"name": "adder"}]}}
    await process(engine, response_stream(last, content_type))
    assert engine.catalogue.known and set(engine.catalogue.tools) == {"reader", "dropper", "adder"}


async def test_a_clients_list_response_teaches_nothing_about_other_ids() -> None:
    """Only results answering the list request are read: a result with another id (the
    response to something else) is not the upstream's list."""
    engine = Engine(compile_policy({"version": "1", "default": "allow"}), open_store("memory://"))
    other = {"jsonrpc": "2.0", "id": 8, "result": {"tools": [{"name": "smuggled"}]}}
    await process(engine, response_stream(other, "application/json"))
    assert "smuggled" not in engine.catalogue.tools and not engine.catalogue.known


def call(name: str) -> HttpRequest:
    body = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": name}}
    return HttpRequest(
        method="POST",
        headers={
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            "authorization": "Bearer t-1",
        },
        body=json.dumps(body).encode(),
    )


UNLISTED = {
    "version": "1",
    "default": "allow",
    "unlisted_tools": "deny",
    "tools": {"delete_app": {"action": "deny"}},
}
ALIAS = "__0123456789ab_delete_app"


async def test_a_tool_the_upstream_does_not_list_is_refused() -> None:
    engine = Engine(compile_policy(UNLISTED), open_store("memory://"))
    # nothing known and nothing fetched: the rules alone judge (the alias passes them)
    assert (await engine.check(call(ALIAS))).decision.allowed
    engine.learn_tools([("delete_app", Annotations()), ("containerize_app", Annotations())], True)
    refused = (await engine.check(call(ALIAS))).decision
    assert refused.reason is Reason.UNKNOWN_TOOL and refused.reason.status == 403
    assert "not a tool the upstream lists" in refused.message
    assert json.loads(refused.reply_body())["error"]["data"]["reason"] == "unknown_tool"
    assert (await engine.check(call("containerize_app"))).decision.allowed
    denied = (await engine.check(call("delete_app"))).decision
    assert denied.reason is Reason.DENIED_BY_RULE


async def test_each_server_has_its_own_catalogue() -> None:
    """Under a policy with servers, a name one server lists is still unlisted on another:
    each server's list response teaches only that server's catalogue."""
    policy = compile_policy({"version": "1", "servers": {"ecs": UNLISTED, "imaging": UNLISTED}})
    engine = Engine(policy, open_store("memory://"))

    def on(server: str, name: str) -> HttpRequest:
        return replace(call(name), server=server)

    ecs_list = {"jsonrpc": "2.0", "id": 7, "result": {"tools": [{"name": "containerize_app"}]}}
    await process(engine, response_stream(ecs_list, "application/json", server="ecs"))
    imaging_list = {"jsonrpc": "2.0", "id": 7, "result": {"tools": [{"name": "list_datastores"}]}}
    await process(engine, response_stream(imaging_list, "application/json", server="imaging"))
    assert (await engine.check(on("ecs", "containerize_app"))).decision.allowed
    assert (await engine.check(on("imaging", "list_datastores"))).decision.allowed
    crossed = (await engine.check(on("imaging", "containerize_app"))).decision
    assert crossed.reason is Reason.UNKNOWN_TOOL and crossed.server == "imaging"
    assert (await engine.check(on("ecs", "list_datastores"))).decision.reason is Reason.UNKNOWN_TOOL
    assert not engine.catalogue.known  # the policy without servers' catalogue is untouched


async def test_list_metrics_name_the_server() -> None:
    """Under a policy with servers the list metrics say whose list it was; a list naming
    no server of the policy fails closed and counts under ``other``."""
    engine = Engine(
        compile_policy({"version": "1", "servers": {"ecs": UNLISTED}}), open_store("memory://")
    )
    metrics = Metrics()
    tools = [{"name": "delete_app"}, {"name": "containerize_app"}]
    page = {"jsonrpc": "2.0", "id": 7, "result": {"tools": tools}}
    kept = await process(engine, response_stream(page, "application/json", "ecs"), metrics)
    assert b"containerize_app" in kept and b"delete_app" not in kept
    await process(engine, response_stream(page, "application/json", "elsewhere"), metrics)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    responses = "mcp_authz_list_responses_total"
    assert value(responses, kind="tools", result="filtered", server="ecs") == 1
    assert value("mcp_authz_list_entries_hidden_total", kind="tools", server="ecs") == 1
    assert value(responses, kind="tools", result="failed", server="other") == 1
    assert value(responses, kind="tools", result="filtered", server="") == 0


def test_upstream_url_is_refused_with_a_policy_of_servers(tmp_path: Path) -> None:
    """One fetched list cannot stand for several servers: the service refuses to start."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"version": "1", "servers": {"ecs": UNLISTED}}))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "authz.cli",
            "serve",
            "--policy",
            str(policy),
            "--store",
            "memory",
            "--upstream-url",
            "http://127.0.0.1:9/mcp",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "--upstream-url" in done.stderr and "servers" in done.stderr


async def test_unlisted_tools_fail_closed_while_the_fetched_list_is_awaited() -> None:
    engine = Engine(
        compile_policy(UNLISTED), open_store("memory://"), catalogue=Catalogue(awaited=True)
    )
    refused = (await engine.check(call("containerize_app"))).decision
    assert refused.reason is Reason.UNKNOWN_TOOL
    assert "not known yet" in refused.message
    engine.catalogue = Catalogue.fetched([("containerize_app", Annotations())])
    assert (await engine.check(call("containerize_app"))).decision.allowed


async def test_unlisted_tools_are_allowed_by_default() -> None:
    policy = compile_policy({**UNLISTED, "unlisted_tools": "allow"})
    engine = Engine(policy, open_store("memory://"), catalogue=Catalogue(awaited=True))
    engine.learn_tools([("delete_app", Annotations())], True)
    assert (await engine.check(call(ALIAS))).decision.allowed
    assert not compile_policy({"version": "1", "default": "allow"}).deny_unlisted


def test_the_example_policy_resolves_the_demo_upstreams_tools() -> None:
    """examples/classes.policy.yaml against the annotations examples/demo_upstream.py
    states (delete_app is denied by name before its class counts)."""
    from authz.policy import load_policy
    from devstack.stack import ROOT

    policy = load_policy(ROOT / "examples/classes.policy.yaml")
    assert policy.deny_unlisted
    resolved = {
        name: policy.rule_for_tool(name, hints(raw)).where
        for name, raw in [
            ("delete_app", {"destructiveHint": True}),
            ("ecs_troubleshooting_tool", {"readOnlyHint": True}),
            ("list_datastores", {"readOnlyHint": True, "openWorldHint": True}),
            ("closed_reader", READER),
            ("adder", ADDER),
            ("containerize_app", None),
        ]
    }
    assert resolved == {
        "delete_app": "tools.delete_*",
        "ecs_troubleshooting_tool": "classes.open_world",
        "list_datastores": "classes.open_world",
        "closed_reader": "classes.read_only",
        "adder": "classes.additive",
        "containerize_app": "classes.destructive",
    }


def test_the_risk_report_names_each_caller_sets_rule_and_warns() -> None:
    import io

    from authz.tooling import report

    policy = compile_policy(
        {
            "version": "1",
            "default": "deny",
            "grants": {"source": "jwt", "claim": "sub"},
            "callers": {"ops": {"claims": {"groups": "ops"}}},
            "classes": {
                "read_only": {},
                "destructive": [{"callers": ["ops"]}],
                "additive": {"limits": [LIMIT]},
            },
        }
    )
    out = io.StringIO()
    report._print_risk(
        policy,
        [("reader", READER), ("dropper", None), ("adder", ADDER)],
        out,
    )
    text = out.getvalue()
    assert "dropper: destructive, open_world, no annotations -> classes.destructive" in text
    assert "ops: allow; anyone else: not permitted" in text
    assert "reader: read_only -> classes.read_only" in text
    assert "adder: additive -> classes.additive" in text
    warned = [line for line in text.splitlines() if "warning:" in line]
    assert len(warned) == 1 and "tool dropper (classes.destructive[0])" in warned[0]


def test_the_upstreams_list_is_fetched_page_by_page(tmp_path: Path) -> None:
    """--upstream-url's fetch against a scripted upstream paginating its tools over three
    pages; a port where nothing answers is an error, never an empty list."""
    from authz.upstream import fetch_tools
    from devstack.stack import ROOT, Proc, free_port, running

    port = free_port()
    server = Proc(
        "list-upstream",
        [sys.executable, str(ROOT / "tests/support/list_upstream.py"), "--port", str(port)],
        tmp_path / "upstream.log",
    )
    with running(server, port):
        tools = asyncio.run(fetch_tools(f"http://127.0.0.1:{port}/mcp"))
    assert [name for name, _ in tools] == [
        "containerize_app",
        "delete_app",
        "start_dicom_export_job",
        "build_and_push_image_to_ecr",
        "ecs_troubleshooting_tool",
        "ecs_resource_management",
    ]
    assert all(hints == Annotations() for _, hints in tools)  # none stated
    with pytest.raises(OSError):
        asyncio.run(fetch_tools(f"http://127.0.0.1:{free_port()}/mcp"))
