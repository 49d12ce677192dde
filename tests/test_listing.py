"""authz.listing: what a caller may see, and list responses filtered in both forms."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz import listing, mcp
from authz.listing import Caller, Unfilterable, filter_response, visible
from authz.policy import compile_policy

POLICY = compile_policy(
    {
        "version": "1",
        "default": "deny",
        "tools": {
            "allowed": {},
            "denied": {"action": "deny", "reason": "no"},
            "approval": {"action": "require_approval"},
            "limited": {"limits": [{"counter": "c", "window": "minute", "max": 1}]},
            "trial": {"action": "deny", "mode": "dry-run"},
            "read_*": {},
        },
        "prompts": {"shown": {}},
        "resources": {"ecs://*": {}, "ecs://secret/*": {"action": "deny"}},
    }
)
CALLER = Caller(grant="g-1")
ANONYMOUS = Caller(grant=None)
JSON = "application/json"
SSE = "text/event-stream"


def tools_reply(names: list[str], id_: Any = 1, **extra: Any) -> dict[str, Any]:
    tools = [{"name": n, "inputSchema": {"type": "object"}} for n in names]
    return {"jsonrpc": "2.0", "id": id_, "result": {"tools": tools, **extra}}


def names_in(reply: dict[str, Any]) -> list[str]:
    return [t["name"] for t in reply["result"]["tools"]]


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("allowed", True),
        ("read_logs", True),  # a glob
        ("approval", True),  # require_approval becomes callable
        ("limited", True),  # limits do not hide
        ("trial", True),  # a dry-run deny is not enforced
        ("denied", False),
        ("unnamed", False),  # default: deny
        ("allowed\u200b", False),  # a name no request could carry
    ],
)
def test_visible_tools(name: str, shown: bool) -> None:
    assert visible(POLICY, CALLER, "tools/list", name) is shown


def test_a_caller_without_a_grant_can_use_no_tool() -> None:
    assert not visible(POLICY, ANONYMOUS, "tools/list", "allowed")
    assert visible(POLICY, ANONYMOUS, "prompts/list", "shown")


def test_rules_for_some_callers_are_listed_to_those_callers_only() -> None:
    """A tool whose variants match none of the caller's sets is refused by ext_authz
    (caller_not_permitted), so it is hidden; its variant decides for a caller in a set."""
    policy = compile_policy(
        {
            "version": "1",
            "default": "deny",
            "grants": {"source": "jwt", "claim": "sub"},
            "callers": {"ops": {"scopes": ["ecs:write"]}, "devs": {"claims": {"team": "dev"}}},
            "tools": {
                "delete_app": {"callers": ["ops"], "action": "require_approval"},
                "export": [
                    {"callers": ["ops"], "action": "deny", "reason": "not ops"},
                    {"callers": ["devs"]},
                ],
                "open": {},
            },
        }
    )
    ops, devs, nobody = (Caller("g", frozenset(s)) for s in ({"ops"}, {"devs"}, set()))
    assert visible(policy, ops, "tools/list", "delete_app")
    assert not visible(policy, devs, "tools/list", "delete_app")
    assert not visible(policy, ops, "tools/list", "export")  # its variant denies
    assert visible(policy, devs, "tools/list", "export")
    assert [visible(policy, nobody, "tools/list", t) for t in ("delete_app", "export", "open")] == [
        False,
        False,
        True,
    ]


def test_resources_templates_and_prompts_follow_their_rules() -> None:
    assert visible(POLICY, CALLER, "resources/list", "ecs://clusters/a")
    assert not visible(POLICY, CALLER, "resources/list", "ecs://secret/a")
    assert not visible(POLICY, CALLER, "resources/list", "file:///etc/passwd")
    assert visible(POLICY, CALLER, "resources/templates/list", "ecs://clusters/{name}")
    assert not visible(POLICY, CALLER, "resources/templates/list", "ecs://secret/{id}")
    assert visible(POLICY, CALLER, "prompts/list", "shown")
    assert not visible(POLICY, CALLER, "prompts/list", "other")


def test_json_list_is_filtered_and_paging_kept() -> None:
    body = json.dumps(tools_reply(["allowed", "denied", "unnamed"], nextCursor="p2")).encode()
    out = filter_response(POLICY, CALLER, {"1": "tools/list"}, JSON, body)
    reply = json.loads(out.body)
    assert names_in(reply) == ["allowed"]
    assert reply["result"]["nextCursor"] == "p2"
    assert "cacheScope" not in reply["result"]
    (listed,) = out.lists
    assert (listed.kind, listed.kept, listed.hidden) == ("tools", 1, 2)
    assert listed.hidden_names == ("denied", "unnamed")


def test_results_vary_per_caller_for_2026_clients() -> None:
    body = json.dumps(tools_reply(["allowed"])).encode()
    out = filter_response(POLICY, CALLER, {"1": "tools/list"}, JSON, body, "2026-07-28")
    assert json.loads(out.body)["result"]["cacheScope"] == "private"
    public = json.dumps(tools_reply(["allowed"], cacheScope="public", ttlMs=60000)).encode()
    reply = json.loads(filter_response(POLICY, CALLER, {"1": "tools/list"}, JSON, public).body)
    assert reply["result"]["cacheScope"] == "private"
    assert reply["result"]["ttlMs"] == 60000


def test_batch_is_filtered_per_element() -> None:
    batch = [
        tools_reply(["allowed", "denied"], 1),
        {"jsonrpc": "2.0", "id": 2, "result": {"prompts": [{"name": "shown"}, {"name": "x"}]}},
        {"jsonrpc": "2.0", "id": 3, "result": {"tools": [{"name": "denied"}]}},  # not a list
        {"jsonrpc": "2.0", "id": 4, "error": {"code": -1, "message": "no"}},
    ]
    requests = {"1": "tools/list", "2": "prompts/list", "4": "resources/list"}
    out = filter_response(POLICY, CALLER, requests, JSON, json.dumps(batch).encode())
    replies = json.loads(out.body)
    assert names_in(replies[0]) == ["allowed"]
    assert replies[1]["result"]["prompts"] == [{"name": "shown"}]
    assert replies[2] == batch[2]  # the response to another request is left alone
    assert replies[3] == batch[3]
    assert [listed.method for listed in out.lists] == ["tools/list", "prompts/list"]


def test_event_stream_filters_the_list_event_and_passes_the_rest() -> None:
    note = b'event: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/message"}\r\n\r\n'
    reply = json.dumps(tools_reply(["allowed", "denied"], "a")).encode()
    half = reply.index(b", ") + 1
    # the response split over two data lines (after a comma), which a client joins with LF
    listed = b"id: 7\ndata: " + reply[:half] + b"\ndata: " + reply[half:] + b"\n\n"
    stream = b": keep-alive\n\nid: 1\ndata:\n\n" + note + listed
    out = filter_response(POLICY, CALLER, {"a": "tools/list"}, SSE, stream)
    assert out.body.startswith(b": keep-alive\n\nid: 1\ndata:\n\n" + note)
    tail = out.body[len(b": keep-alive\n\nid: 1\ndata:\n\n" + note) :]
    assert tail.startswith(b"id: 7\ndata: ") and tail.endswith(b"\n\n")
    assert names_in(json.loads(tail[len(b"id: 7\ndata: ") :])) == ["allowed"]


def test_an_unterminated_last_event_is_filtered_too() -> None:
    stream = b"data: " + json.dumps(tools_reply(["denied"])).encode()
    out = filter_response(POLICY, CALLER, {"1": "tools/list"}, SSE, stream)
    assert b"denied" not in out.body and out.lists[0].hidden == 1


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (JSON, b'{"jsonrpc": "2.0", "id": 1, "result": {"tools": ['),
        (JSON, json.dumps({"jsonrpc": "2.0", "id": 1, "result": {}}).encode()),
        (JSON, json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"x": 1}]}}).encode()),
        (JSON, json.dumps({"jsonrpc": "2.0", "id": 1, "result": [1]}).encode()),
        (SSE, b"data: {not json\n\n"),
        ("text/plain", json.dumps(tools_reply(["denied"])).encode()),
        ("", json.dumps(tools_reply(["denied"])).encode()),
    ],
)
def test_what_cannot_be_read_is_refused(content_type: str, body: bytes) -> None:
    with pytest.raises(Unfilterable):
        filter_response(POLICY, CALLER, {"1": "tools/list"}, content_type, body)


def test_list_requests_of_a_body() -> None:
    body = mcp.parse_body(
        json.dumps(
            [
                {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                {"jsonrpc": "2.0", "id": "b", "method": "resources/templates/list"},
                {"jsonrpc": "2.0", "id": 3, "method": "ping"},
                {"jsonrpc": "2.0", "method": "notifications/initialized"},
            ]
        ).encode()
    )
    assert listing.list_requests(body) == {"1": "tools/list", "b": "resources/templates/list"}


@pytest.mark.parametrize("response_id", [1, "1", 1.0])
def test_ids_a_lax_client_would_match_are_filtered(response_id: object) -> None:
    body = json.dumps(tools_reply(["allowed", "denied"], response_id)).encode()
    out = filter_response(POLICY, CALLER, {"1": "tools/list"}, JSON, body)
    assert b"denied" not in out.body


def test_a_result_with_a_method_is_filtered_all_the_same() -> None:
    reply = {**tools_reply(["allowed", "denied"]), "method": "tools/list"}
    out = filter_response(POLICY, CALLER, {"1": "tools/list"}, JSON, json.dumps(reply).encode())
    assert b"denied" not in out.body


NAMES = st.sampled_from(["allowed", "denied", "approval", "read_x", "other", "trial"])


@given(st.lists(NAMES, max_size=12), st.sampled_from([JSON, SSE]))
def test_exactly_the_visible_entries_remain(names: list[str], form: str) -> None:
    reply = json.dumps(tools_reply(names)).encode()
    body = reply if form == JSON else b"data: " + reply + b"\n\n"
    out = filter_response(POLICY, CALLER, {"1": "tools/list"}, form, body)
    text = out.body if form == JSON else out.body[len(b"data: ") :]
    assert names_in(json.loads(text)) == [
        n for n in names if visible(POLICY, CALLER, "tools/list", n)
    ]


# Pieces of event streams: fields, comments, data that is JSON or not, odd spacing, and
# every line ending a client accepts.
_LINES = st.sampled_from(
    [
        b"data: {}",
        b"data:{}",
        b"data",
        b"data: ",
        b'data: {"a": 1}',
        b"data:  x",
        b"event: message",
        b"id: 7",
        b": a comment",
        b"retry: 10",
        b"dat: no",
        b"",
    ]
)
_ENDINGS = st.sampled_from([b"\n", b"\r\n", b"\r"])


@given(st.lists(st.tuples(_LINES, _ENDINGS), max_size=20))
def test_events_are_split_as_the_sdk_client_splits_them(pieces: list[tuple[bytes, bytes]]) -> None:
    """Differential: the data of each event, against httpx2's SSE parser (the one the
    official mcp SDK client reads streams with)."""
    from httpx2._sse import _SSEParser

    stream = b"".join(line + end for line, end in pieces) + b"\n\n"
    parser = _SSEParser()
    theirs = [e.data for e in [*parser.decode(stream.decode()), *parser.flush()] if e.data]
    ours = [listing.event_data(lines).decode() for lines in listing.events(stream)]
    assert [d for d in ours if d] == theirs
