"""The ext_proc stream of one list request, message by message (Envoy itself drives it in
tests/test_listing_e2e.py; here each reply is looked at)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from authz import extproc
from authz.engine import Engine
from authz.metrics import Metrics
from authz.pb import external_processor_pb2 as pb
from authz.pb import processing_mode_pb2
from authz.policy import compile_policy
from authz.store import open_store

POLICY = compile_policy(
    {"version": "1", "default": "deny", "tools": {"allowed": {}, "denied": {"action": "deny"}}}
)
LIST = {"jsonrpc": "2.0", "id": 5, "method": "tools/list"}
MARKED = {"x-mcp-authz-list": "tools/list", "x-mcp-authz-grant": "g-1", "x-request-id": "r-1"}
Mode = processing_mode_pb2.ProcessingMode


def headers(kind: str, values: dict[str, str], end: bool = False) -> pb.ProcessingRequest:
    message = pb.ProcessingRequest()
    part = getattr(message, kind)
    part.end_of_stream = end
    for key, value in values.items():
        header = part.headers.headers.add()
        header.key = key
        header.raw_value = value.encode()
    return message


def body(kind: str, raw: bytes, end: bool = True) -> pb.ProcessingRequest:
    message = pb.ProcessingRequest()
    getattr(message, kind).body = raw
    getattr(message, kind).end_of_stream = end
    return message


class Context:
    async def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


async def exchange(*messages: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
    service = extproc.ListFilterService(Engine(POLICY, open_store("memory://")), Metrics())

    async def stream() -> AsyncIterator[pb.ProcessingRequest]:
        for message in messages:
            yield message

    return [reply async for reply in service.Process(stream(), Context())]


def listed(names: list[str]) -> bytes:
    tools = [{"name": n} for n in names]
    return json.dumps({"jsonrpc": "2.0", "id": 5, "result": {"tools": tools}}).encode()


async def test_a_list_response_is_filtered() -> None:
    replies = await exchange(
        headers("request_headers", MARKED),
        body("request_body", json.dumps(LIST).encode()),
        headers("response_headers", {":status": "200", "content-type": "application/json"}),
        body("response_body", listed(["allowed", "denied"])),
    )
    assert [r.WhichOneof("response") for r in replies] == [
        "request_headers",
        "request_body",
        "response_headers",
        "response_body",
    ]
    filtered = json.loads(replies[3].response_body.response.body_mutation.body)
    assert filtered["result"]["tools"] == [{"name": "allowed"}]


async def test_an_unmarked_request_asks_for_nothing_more() -> None:
    (reply,) = await exchange(headers("request_headers", {"x-request-id": "r"}))
    mode = reply.mode_override
    assert (mode.request_body_mode, mode.response_header_mode, mode.response_body_mode) == (
        Mode.NONE,
        Mode.SKIP,
        Mode.NONE,
    )


async def test_an_upstream_error_page_passes_unread() -> None:
    replies = await exchange(
        headers("request_headers", MARKED),
        body("request_body", json.dumps(LIST).encode()),
        headers("response_headers", {":status": "503", "content-type": "text/html"}),
    )
    assert replies[2].mode_override.response_body_mode == Mode.NONE


async def test_a_cut_off_body_is_replaced_by_an_error() -> None:
    replies = await exchange(
        headers("request_headers", MARKED),
        body("request_body", json.dumps(LIST).encode()),
        headers("response_headers", {":status": "200", "content-type": "application/json"}),
        body("response_body", listed(["allowed", "denied"])[:40], end=False),
    )
    immediate = replies[3].immediate_response
    assert immediate.status.code == 502
    error = json.loads(immediate.body)
    assert error["id"] == 5 and error["error"]["data"] == {"reason": "list_unfilterable"}
    assert b"denied" not in immediate.body
