"""The ext_proc stream of one list request, message by message (Envoy itself drives it in
tests/test_listing_e2e.py; here each reply is looked at)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from authz import extproc, records
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


# --- sessions and tasks: recorded per grant from the response ----------------------------


async def recorded_exchange(
    store: Any, *messages: pb.ProcessingRequest
) -> list[pb.ProcessingResponse]:
    service = extproc.ListFilterService(Engine(POLICY, store), Metrics())

    async def stream() -> AsyncIterator[pb.ProcessingRequest]:
        for message in messages:
            yield message

    return [reply async for reply in service.Process(stream(), Context())]


async def test_an_initialize_response_records_the_issued_session() -> None:
    store = open_store("memory://")
    marked = {"x-mcp-authz-session": "open", "x-mcp-authz-grant": "g-1"}
    await recorded_exchange(
        store,
        headers("request_headers", marked),
        headers("response_headers", {":status": "200", "mcp-session-id": "s-9"}),
    )
    key = records.session_record("g-1", "s-9")
    assert await store.recorded([key, records.session_record("g-2", "s-9")]) == (True, False)
    # A failed DELETE keeps it, a successful one drops it.
    closing = {"x-mcp-authz-session": "close", "x-mcp-authz-grant": "g-1", "mcp-session-id": "s-9"}
    for status, kept in (("404", True), ("200", False)):
        await recorded_exchange(
            store,
            headers("request_headers", closing),
            headers("response_headers", {":status": status}),
        )
        assert await store.recorded([key]) == (kept,)


def task_list(*ids: str) -> bytes:
    tasks = [{"taskId": i, "status": "working"} for i in ids]
    return json.dumps({"jsonrpc": "2.0", "id": 4, "result": {"tasks": tasks}}).encode()


async def test_tasks_are_recorded_from_a_task_augmented_call_and_lists_filtered() -> None:
    store = open_store("memory://")
    created = {"jsonrpc": "2.0", "id": 3, "result": {"task": {"taskId": "t-1", "ttl": 5000}}}
    sse = b"event: message\ndata: " + json.dumps(created).encode() + b"\n\n"
    await recorded_exchange(
        store,
        headers("request_headers", {"x-mcp-authz-tasks": "create", "x-mcp-authz-grant": "g-1"}),
        body("request_body", b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{}}'),
        headers("response_headers", {":status": "200", "content-type": "text/event-stream"}),
        body("response_body", sse),
    )
    assert await store.recorded([records.task_record("g-1", "t-1")]) == (True,)
    listing = {"x-mcp-authz-tasks": "list", "x-mcp-authz-grant": "g-1"}
    replies = await recorded_exchange(
        store,
        headers("request_headers", listing),
        body("request_body", b'{"jsonrpc":"2.0","id":4,"method":"tasks/list"}'),
        headers("response_headers", {":status": "200", "content-type": "application/json"}),
        body("response_body", task_list("t-0", "t-1", "t-2")),
    )
    shown = json.loads(replies[3].response_body.response.body_mutation.body)
    assert [t["taskId"] for t in shown["result"]["tasks"]] == ["t-1"]


@pytest.mark.parametrize(
    "raw", [b"not json", b'{"jsonrpc":"2.0","id":4,"result":{}}', task_list("t-1")[:30]]
)
async def test_an_unreadable_task_list_is_replaced_by_an_error(raw: bytes) -> None:
    listing = {"x-mcp-authz-tasks": "list", "x-mcp-authz-grant": "g-1"}
    replies = await recorded_exchange(
        open_store("memory://"),
        headers("request_headers", listing),
        body("request_body", b'{"jsonrpc":"2.0","id":4,"method":"tasks/list"}'),
        headers("response_headers", {":status": "200", "content-type": "application/json"}),
        body("response_body", raw, end=raw != task_list("t-1")[:30]),
    )
    immediate = replies[3].immediate_response
    assert immediate.status.code == 502
    error = json.loads(immediate.body)
    assert error["id"] == 4 and error["error"]["data"] == {"reason": "list_unfilterable"}
    assert b"t-1" not in immediate.body


def test_created_tasks_are_read_in_both_result_shapes() -> None:
    nested = {"jsonrpc": "2.0", "id": 1, "result": {"task": {"taskId": "a", "ttl": None}}}
    flat = {"jsonrpc": "2.0", "id": 1, "result": {"resultType": "task", "taskId": "b", "ttl": 9}}
    plain = {"jsonrpc": "2.0", "id": 1, "result": {"content": [], "taskId": "c"}}
    read = [
        records.created_tasks("application/json", json.dumps(d).encode())
        for d in (nested, flat, plain)
    ]
    assert read == [[("a", records.TASK_TTL_MAX_MS)], [("b", 9)], []]
