"""MCP 2026-07-28 ``Mcp-Param-{Name}`` headers (SEP-2243): the tool parameters a rule's
argument schema marks with ``x-mcp-header`` must agree with the call's arguments.

The policy is where mcp-authz learns the annotations (copied from the tool's
``inputSchema``); the end-to-end version is in tests/test_protocol_2026.py.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from authz import mcp_headers
from authz.decision import Reason
from authz.engine import Engine
from authz.mcp import HttpRequest, Malformed, Problem
from authz.mcp_headers import ParamHeader
from authz.policy import PolicyError, compile_policy
from authz.store import open_store

MODERN = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": MODERN}

EXPORT_SCHEMA = {
    "type": "object",
    "properties": {
        "datastoreId": {"type": "string", "x-mcp-header": "Datastore"},
        "studyCount": {"type": "integer", "x-mcp-header": "Study-Count"},
        "dryRun": {"type": "boolean", "x-mcp-header": "Dry_Run"},
        "target": {
            "type": "object",
            "properties": {"region": {"type": "string", "x-mcp-header": "Region"}},
        },
        "outputS3Uri": {"type": "string"},
    },
}


def policy_with(schema: object) -> dict[str, Any]:
    return {
        "version": "1",
        "default": "deny",
        "tools": {"start_dicom_export_job": {"arguments": schema}},
    }


def b64(text: str) -> str:
    return "=?base64?" + base64.b64encode(text.encode()).decode() + "?="


# --- loading the annotations -------------------------------------------------------------


def test_annotations_reachable_through_properties_are_compiled() -> None:
    rule = compile_policy(policy_with(EXPORT_SCHEMA)).tools["start_dicom_export_job"]
    assert set(rule.param_headers) == {
        ParamHeader("Datastore", ("datastoreId",)),
        ParamHeader("Study-Count", ("studyCount",)),
        ParamHeader("Dry_Run", ("dryRun",)),
        ParamHeader("Region", ("target", "region")),
    }
    assert ParamHeader("Study-Count", ("studyCount",)).header == "mcp-param-study-count"
    nullable = {"properties": {"a": {"type": ["string", "null"], "x-mcp-header": "A"}}}
    rule = compile_policy(policy_with(nullable)).tools["start_dicom_export_job"]
    assert rule.param_headers == (ParamHeader("A", ("a",)),)
    plain = compile_policy(policy_with({"type": "object"})).tools["start_dicom_export_job"]
    assert plain.param_headers == ()


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        ({"properties": {"a": {"type": "string", "x-mcp-header": ""}}}, "HTTP field-name token"),
        (
            {"properties": {"a": {"type": "string", "x-mcp-header": "Bad Name"}}},
            "HTTP field-name token",
        ),
        ({"properties": {"a": {"type": "string", "x-mcp-header": 7}}}, "HTTP field-name token"),
        (
            {
                "properties": {
                    "a": {"type": "string", "x-mcp-header": "Region"},
                    "b": {"type": "string", "x-mcp-header": "region"},
                }
            },
            "case-insensitively unique",
        ),
        ({"properties": {"a": {"type": "number", "x-mcp-header": "A"}}}, "string, integer"),
        ({"properties": {"a": {"x-mcp-header": "A"}}}, "string, integer"),
        (
            {"properties": {"a": {"type": ["string", "integer"], "x-mcp-header": "A"}}},
            "string, integer",
        ),
        (
            {
                "properties": {
                    "a": {"type": "array", "items": {"type": "string", "x-mcp-header": "A"}}
                }
            },
            "reachable",
        ),
        ({"anyOf": [{"properties": {"a": {"type": "string", "x-mcp-header": "A"}}}]}, "reachable"),
        ({"$defs": {"a": {"type": "string", "x-mcp-header": "A"}}}, "reachable"),
        ({"type": "string", "x-mcp-header": "Root"}, "reachable"),
    ],
)
def test_annotations_the_spec_calls_invalid_are_refused_at_load(
    schema: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(PolicyError) as info:
        compile_policy(policy_with(schema))
    (error,) = info.value.errors
    assert error.startswith("tools.start_dicom_export_job.arguments")
    assert fragment in error


def test_an_annotation_inside_a_data_keyword_is_data() -> None:
    schema = {"properties": {"a": {"type": "object", "default": {"x-mcp-header": "A"}}}}
    rule = compile_policy(policy_with(schema)).tools["start_dicom_export_job"]
    assert rule.param_headers == ()


# --- comparing headers with arguments ----------------------------------------------------

PARAMS = (
    ParamHeader("Datastore", ("datastoreId",)),
    ParamHeader("Study-Count", ("studyCount",)),
    ParamHeader("Dry_Run", ("dryRun",)),
    ParamHeader("Region", ("target", "region")),
)
ARGS = {"datastoreId": "ds-1", "studyCount": 42, "dryRun": False, "target": {"region": "eu 1"}}
GOOD = {
    "mcp-param-datastore": "ds-1",
    "mcp-param-study-count": "42",
    "mcp-param-dry_run": "false",
    "mcp-param-region": b64("eu 1"),
}


def check(headers: dict[str, str], arguments: dict[str, Any], version: str = MODERN) -> None:
    mcp_headers.check_param_headers(
        {"mcp-protocol-version": version, **headers}, PARAMS, arguments, (5,)
    )


def test_matching_headers_pass() -> None:
    check(GOOD, ARGS)
    check({**GOOD, "mcp-param-study-count": "42.0"}, ARGS)  # compared as numbers
    check(GOOD, {**ARGS, "studyCount": 42.0})
    check({**GOOD, "mcp-param-datastore": b64("ds-1")}, ARGS)
    check({**GOOD, "mcp-param-datastore": "ds-1", "mcp-param-unknown": "x"}, ARGS)
    # A null or absent value has no header.
    absent = {k: v for k, v in GOOD.items() if k != "mcp-param-datastore"}
    check(absent, {**ARGS, "datastoreId": None})
    check(absent, {k: v for k, v in ARGS.items() if k != "datastoreId"})
    # A session-era request need not carry them (they are 2026-07-28's), but any it
    # carries must agree.
    check({}, ARGS, version="2025-11-25")


@pytest.mark.parametrize(
    ("headers", "arguments", "fragment"),
    [
        ({**GOOD, "mcp-param-datastore": "ds-2"}, ARGS, "does not match"),
        ({**GOOD, "mcp-param-study-count": "43"}, ARGS, "does not match"),
        ({**GOOD, "mcp-param-study-count": "042"}, ARGS, "does not match"),
        ({**GOOD, "mcp-param-study-count": "4" * 5000}, ARGS, "does not match"),
        ({**GOOD, "mcp-param-study-count": "42"}, {**ARGS, "studyCount": 10**5000}, "does not"),
        ({**GOOD, "mcp-param-dry_run": "False"}, ARGS, "does not match"),
        ({**GOOD, "mcp-param-dry_run": "0"}, ARGS, "does not match"),
        ({**GOOD, "mcp-param-region": "eu 1x"}, ARGS, "does not match"),
        ({**GOOD, "mcp-param-datastore": b64("ds-2")}, ARGS, "does not match"),
        ({**GOOD, "mcp-param-datastore": "=?base64?ZHMtMQ?="}, ARGS, "base64"),
        ({**GOOD, "mcp-param-datastore": "ds-\u00e9"}, ARGS, "invalid characters"),
        ({**GOOD, "mcp-param-datastore": "ds\x01"}, ARGS, "invalid characters"),
        ({**GOOD, "mcp-param-datastore": "ds-1"}, {**ARGS, "datastoreId": ["ds-1"]}, "does not"),
        ({k: v for k, v in GOOD.items() if k != "mcp-param-region"}, ARGS, "is required"),
        (GOOD, {**ARGS, "datastoreId": None}, "no value"),
        (GOOD, {k: v for k, v in ARGS.items() if k != "target"}, "no value"),
    ],
)
def test_disagreeing_missing_or_orphan_headers_are_a_mismatch(
    headers: dict[str, str], arguments: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(Malformed) as info:
        check(headers, arguments)
    assert info.value.problem is Problem.HEADER_MISMATCH
    assert info.value.ids == (5,)
    assert fragment in info.value.detail
    assert "ds-" not in info.value.detail and "eu 1" not in info.value.detail


# --- in a decision -----------------------------------------------------------------------


def request(arguments: dict[str, Any], **headers: str) -> HttpRequest:
    doc = {
        "jsonrpc": "2.0",
        "id": 11,
        "method": "tools/call",
        "params": {"name": "start_dicom_export_job", "arguments": arguments, "_meta": META},
    }
    return HttpRequest(
        method="POST",
        headers={
            "content-type": "application/json",
            "authorization": "Bearer tok",
            "mcp-protocol-version": MODERN,
            "mcp-method": "tools/call",
            "mcp-name": "start_dicom_export_job",
            **headers,
        },
        body=json.dumps(doc).encode(),
    )


async def test_a_call_whose_param_headers_disagree_is_refused_400_header_mismatch() -> None:
    engine = Engine(compile_policy(policy_with(EXPORT_SCHEMA)), open_store("memory://"))
    args = {"datastoreId": "ds-1"}
    assert (await engine.check(request(args, **{"mcp-param-datastore": "ds-1"}))).decision.allowed
    for headers in ({"mcp-param-datastore": "ds-9"}, {}):
        decision = (await engine.check(request(args, **headers))).decision
        assert decision.reason is Reason.HEADER_MISMATCH, headers
        assert "Mcp-Param-Datastore" in decision.message
        reply = json.loads(decision.reply_body())
        assert (reply["id"], reply["error"]["code"]) == (11, -32020)
