"""The strict MCP/JSON-RPC parser: every refusal the core issue lists, and what passes."""

from __future__ import annotations

import base64
import gc
import json

import orjson
import pytest

from authz import jsondoc, mcp, mcp_headers
from authz.jsondoc import InvalidJson
from authz.mcp import Kind, Malformed, Problem

JSON = {"content-type": "application/json"}


def body(doc: object) -> bytes:
    return json.dumps(doc).encode()


def call(name: object = "containerize_app", id_: object = 1, **params: object) -> dict[str, object]:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": name, "arguments": {"app_path": "/srv"}, **params},
    }


def refused(raw: bytes) -> Malformed:
    with pytest.raises(Malformed) as info:
        mcp.parse_body(raw)
    return info.value


def test_single_tools_call() -> None:
    parsed = mcp.parse_body(body(call()))
    assert not parsed.batch
    (msg,) = parsed.messages
    assert (msg.kind, msg.method, msg.id, msg.name) == (
        Kind.REQUEST,
        "tools/call",
        1,
        "containerize_app",
    )
    assert msg.arguments == {"app_path": "/srv"}
    assert parsed.ids == (1,)


def test_notification_and_response_kinds() -> None:
    parsed = mcp.parse_body(
        body(
            [
                {"jsonrpc": "2.0", "method": "notifications/initialized"},
                {"jsonrpc": "2.0", "id": "s-1", "result": {}},
                {"jsonrpc": "2.0", "id": 7, "error": {"code": -1, "message": "no"}},
            ]
        )
    )
    assert [m.kind for m in parsed.messages] == [Kind.NOTIFICATION, Kind.RESPONSE, Kind.RESPONSE]
    assert parsed.batch and parsed.ids == ()


def test_unicode_escapes_are_decoded_before_matching() -> None:
    raw = b'{"jsonrpc":"2.0","id":1,"method":"tools\\/call","params":{"name":"delete\\u005fapp"}}'
    (msg,) = mcp.parse_body(raw).messages
    assert msg.method == "tools/call" and msg.name == "delete_app"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"{not json", "invalid JSON"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"\xef\xbb\xbf" + body(call()), "byte order mark"),
        (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":NaN}}', "invalid JSON"),
        (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":-Infinity}}', "invalid JSON"),
        (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":1e400}}', "invalid JSON"),
        (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"\\ud800"}}', "invalid JSON"),
        (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"\xed\xa0\x80"}}', "UTF-8"),
        (b"[]", "empty batch"),
        (b"[[]]", "must be an object"),
        (b'"tools/call"', "must be an object"),
        (body({"id": 1, "method": "ping"}), '"jsonrpc" must be "2.0"'),
        (body({"jsonrpc": "1.0", "id": 1, "method": "ping"}), '"jsonrpc" must be "2.0"'),
        (body({"jsonrpc": 2.0, "id": 1, "method": "ping"}), '"jsonrpc" must be "2.0"'),
        (body(call(name=None)), "params.name must be a string"),
        (body(call(name=["delete_app"])), "params.name must be a string"),
        (body(call(name={"x": 1})), "params.name must be a string"),
        (body(call(name=7)), "params.name must be a string"),
        (body(call(name=True)), "params.name must be a string"),
        (body({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}), "params.name must be a string"),
        (body({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": []}), "params must be"),
        (body(call(id_=1.5)), "id must be a string or an integer"),
        (body(call(id_=None)), "id must be a string or an integer"),
        (body(call(id_=True)), "id must be a string or an integer"),
        (body(call(id_=[1])), "id must be a string or an integer"),
        (body({**call(), "extra": 1}), "unexpected member"),
        (body({**call(), "result": {}}), "unexpected member"),
        (body({"jsonrpc": "2.0", "id": 1}), "not a JSON-RPC request"),
        (body({"jsonrpc": "2.0", "id": 1, "result": 1, "error": {}}), "not a JSON-RPC request"),
        (body({"jsonrpc": "2.0", "id": 1, "method": 5}), "method must be a string"),
        (
            body({"jsonrpc": "2.0", "id": 1, "method": "Tools/Call", "params": {"name": "x"}}),
            "exact",
        ),
        (
            body({"jsonrpc": "2.0", "id": 1, "method": "tools/call ", "params": {"name": "x"}}),
            "exact",
        ),
        (body({"jsonrpc": "2.0", "id": 1, "method": "tools/call\u200b"}), "exact"),
        (body(call(arguments=[1, 2])), "arguments must be an object"),
        (body(call(name="delete_app\u200b")), "invisible"),
        (body(call(name=" delete_app")), "invisible"),
        (body(call(name="delete_app\u0000")), "invisible"),
        (body(call(name="\uff44\uff45\uff4c\uff45\uff54\uff45_app")), "non-normalized"),
        (body(call(name="")), "invisible"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"[" * 1_000_000, "nested too deeply"),
        (b"[0," * 2000 + b"0" + b"]" * 2000, "nested too deeply"),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"n":' + b"9" * 5000 + b"}}",
            "invalid",
        ),
    ],
)
def test_refusals(raw: bytes, fragment: str) -> None:
    err = refused(raw)
    assert err.problem is Problem.MALFORMED
    assert fragment in err.detail


@pytest.mark.parametrize(
    "raw",
    [
        b'{"jsonrpc":"2.0","jsonrpc":"2.0","id":1,"method":"ping"}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"x":{"y":1,"y":2}}}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","n\\u0061me":"b"}}',
        b'[{"jsonrpc":"2.0","id":1,"method":"ping","id":2}]',
    ],
)
def test_duplicate_keys_anywhere_are_refused(raw: bytes) -> None:
    assert "duplicate key" in refused(raw).detail


def test_refusal_keeps_known_ids_for_the_reply() -> None:
    assert refused(body({**call(id_="abc"), "extra": 1})).ids == ("abc",)


def test_refusal_text_never_quotes_argument_values() -> None:
    secret = "patient-0042-MRN"
    err = refused(body(call(name=f"x\u200b{secret}")))
    assert secret not in err.detail


def test_media_checks() -> None:
    mcp_headers.check_media({"content-type": "application/json; charset=utf-8"})
    mcp_headers.check_media({"content-type": "Application/JSON", "content-encoding": "identity"})
    for headers in (
        {},
        {"content-type": "text/plain"},
        {"content-type": "application/json", "content-encoding": "gzip"},
        {"content-type": "application/json", "content-encoding": "br"},
    ):
        with pytest.raises(Malformed) as info:
            mcp_headers.check_media(headers)
        assert info.value.problem is Problem.UNSUPPORTED_MEDIA


def b64(text: str) -> str:
    return "=?base64?" + base64.b64encode(text.encode()).decode() + "?="


def test_mcp_headers_must_agree_with_body() -> None:
    parsed = mcp.parse_body(body(call(name="tööl")))
    mcp_headers.check_headers({"mcp-method": "tools/call", "mcp-name": b64("tööl")}, parsed)
    mcp_headers.check_headers({"mcp-method": "tools/call"}, parsed)
    mcp_headers.check_headers({}, parsed)
    bad = [
        {"mcp-method": "tools/list"},
        {"mcp-method": "tools/call", "mcp-name": "other"},
        {"mcp-name": "=?base64?!!notbase64?="},
        # Markers are case-sensitive: this is the literal string, which differs from the name.
        {"mcp-name": "=?BASE64?" + base64.b64encode(b"t\xc3\xb6\xc3\xb6l").decode() + "?="},
    ]
    for headers in bad:
        with pytest.raises(Malformed) as info:
            mcp_headers.check_headers(headers, parsed)
        assert info.value.problem is Problem.HEADER_MISMATCH
        assert info.value.ids == (1,), headers


@pytest.mark.parametrize(
    "value",
    [
        "=?base64?dG9vbA?=",  # missing padding
        "=?base64?dG9vbA=?=",  # short padding
        "=?base64?dG9vbA===?=",  # extra padding
        "=?base64?dG9v bA==?=",  # a space
        "=?base64?dG9v\tbA==?=",
        "=?base64?dG9vbA==\n?=",
        "=?base64?!!!!?=",
        "=?base64?//79?=",  # not UTF-8
    ],
)
def test_bad_base64_in_a_header_is_a_mismatch_that_keeps_the_id(value: str) -> None:
    parsed = mcp.parse_body(body(call(name="tool", id_="req-7")))
    with pytest.raises(Malformed) as info:
        mcp_headers.check_headers({"mcp-name": value}, parsed)
    assert info.value.problem is Problem.HEADER_MISMATCH
    assert "base64" in info.value.detail
    assert info.value.ids == ("req-7",)


def test_mcp_method_is_compared_as_written() -> None:
    """Only Mcp-Name and Mcp-Param-* may carry the base64 form (SEP-2243): a hop that reads
    Mcp-Method as written must see the method the body names."""
    parsed = mcp.parse_body(body(call(id_=3)))
    with pytest.raises(Malformed) as info:
        mcp_headers.check_headers({"mcp-method": b64("tools/call")}, parsed)
    assert info.value.problem is Problem.HEADER_MISMATCH
    assert info.value.ids == (3,)


def test_mcp_headers_cannot_describe_a_batch_or_a_nameless_method() -> None:
    batch = mcp.parse_body(body([call()]))
    with pytest.raises(Malformed):
        mcp_headers.check_headers({"mcp-method": "tools/call"}, batch)
    ping = mcp.parse_body(body({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
    mcp_headers.check_headers({"mcp-method": "ping"}, ping)
    with pytest.raises(Malformed):
        mcp_headers.check_headers({"mcp-method": "ping", "mcp-name": "x"}, ping)


def test_error_reply_echoes_ids() -> None:
    single = json.loads(
        mcp.error_reply(("a",), False, -32051, "policy violation: x", {"reason": "r"})
    )
    assert single == {
        "jsonrpc": "2.0",
        "id": "a",
        "error": {"code": -32051, "message": "policy violation: x", "data": {"reason": "r"}},
    }
    batch = json.loads(mcp.error_reply((1, 2), True, -32051, "m", {}))
    assert [r["id"] for r in batch] == [1, 2]
    notification = json.loads(mcp.error_reply((), True, -32051, "m", {}))
    assert notification["id"] is None


def test_session_id() -> None:
    assert mcp_headers.session_id({}) is None
    assert mcp_headers.session_id({"mcp-session-id": "0f8a-Z~!"}) == "0f8a-Z~!"
    assert mcp_headers.session_id({"mcp-session-id": "s" * mcp_headers.MAX_SESSION_ID}) is not None
    for bad in ("", " x", "a b", "s" * (mcp_headers.MAX_SESSION_ID + 1), "\u00e9", "x\ty"):
        with pytest.raises(Malformed) as info:
            mcp_headers.session_id({"mcp-session-id": bad})
        assert info.value.problem is Problem.MALFORMED
    # MCP 2026-07-28 has no sessions: the header means nothing there.
    for value in ("0f8a", "has space"):
        headers = {"mcp-session-id": value, "mcp-protocol-version": "2026-07-28"}
        assert mcp_headers.session_id(headers) is None
    legacy = {"mcp-session-id": "0f8a", "mcp-protocol-version": "2025-11-25"}
    assert mcp_headers.session_id(legacy) == "0f8a"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":{"b:":1,"b:":"x:y"}}',  # colons inside the duplicated key and value
        b'{"a\\u003a":1,"a:":2}',  # the same key, once written with an escaped colon
        b'{"a\\u003A":1,"a:":2}',
        b'{"a":1,"\\u0061":2}',  # an escaped letter
        b'{"a\\\\u003a":1,"a\\\\u003a":2}',  # an escaped backslash, then the text u003a
        b'{"a\\\\\\u003a":1,"a\\\\:":2}',  # an escaped backslash, then an escaped colon
        b'{"\\u003a\\u003a":{"k":1,"k":2}}',
        b'[{"k":1},{"k":"::","k":1}]',
        b'{"x":"a:b:c","x":"a:b:c"}',
        b'{"k":1, "k" : 1}',
    ],
)
def test_duplicates_are_found_whatever_colons_the_strings_hold(raw: bytes) -> None:
    with pytest.raises(InvalidJson, match="duplicate key"):
        jsondoc.decode_json(raw)


@pytest.mark.parametrize(
    ("raw", "keys"),
    [
        # An escaped backslash and the text u003a, next to a real colon: two keys.
        (b'{"a\\\\u003a":1,"a:":2}', ["a\\u003a", "a:"]),
        # An escaped backslash and an escaped colon, next to the text u003a: two keys.
        (b'{"a\\\\\\u003a":1,"a\\\\u003a":2}', ["a\\:", "a\\u003a"]),
        (b'{"\\u003a":1,"\\u003A\\u003a":2,":::":3}', [":", "::", ":::"]),
        (b'{"q\\"":1,"q\\"\\u003a":2,"\\\\":3}', ['q"', 'q":', "\\"]),
    ],
)
def test_escaped_colons_are_counted_exactly(raw: bytes, keys: list[str]) -> None:
    assert list(jsondoc.decode_json(raw)) == keys


def test_colons_in_strings_are_no_duplicates() -> None:
    doc = jsondoc.decode_json(b'{"url:":"https://x:8080/a:b","n":{"::":[":",{"k:v":":"}]}}')
    assert doc == {"url:": "https://x:8080/a:b", "n": {"::": [":", {"k:v": ":"}]}}


def test_integers_beyond_64_bits_stay_exact() -> None:
    """orjson would turn them into floats; they must reach the policy exactly."""
    doc = jsondoc.decode_json(
        b'{"n":18446744073709551617,"m":-9223372036854775809,"f":1e22,'
        b'"deep":[{"x":[' + b"9" * 300 + b',0.1,"12345678901234567890"]}]}'
    )
    assert doc["n"] == 18446744073709551617 and isinstance(doc["n"], int)
    assert doc["m"] == -9223372036854775809
    assert doc["f"] == 1e22 and isinstance(doc["f"], float)
    assert doc["deep"] == [{"x": [int("9" * 300), 0.1, "12345678901234567890"]}]
    # The argument digest writes them exactly too: a call differing in the last digit
    # is another call.
    other = {**doc, "n": 18446744073709551616}
    assert mcp.arguments_digest(doc) != mcp.arguments_digest(other)
    assert mcp.arguments_digest(doc) == mcp.arguments_digest(dict(reversed(doc.items())))


def test_the_largest_64_bit_integers_need_no_second_parse() -> None:
    doc = jsondoc.decode_json(b"[18446744073709551615,-9223372036854775808,1234567890123456789]")
    assert doc == [2**64 - 1, -(2**63), 1234567890123456789]
    assert all(isinstance(n, int) for n in doc)


def _members(doc: object) -> int:
    if isinstance(doc, dict):
        return len(doc) + sum(_members(v) for v in doc.values())
    if isinstance(doc, list):
        return sum(_members(v) for v in doc)
    return 0


def _elements(doc: object) -> int:
    if isinstance(doc, dict):
        return sum(_elements(v) for v in doc.values())
    if isinstance(doc, list):
        return len(doc) + sum(_elements(v) for v in doc)
    return 0


# Strings full of what the counts look for: colons, commas, brackets, quotes, backslashes.
TRICKY = [
    b'{"a:b":"c,d","e":[":",",","[","{}","[]"],"f":{}}',
    b'{ "k" : [ 1 , [ ] , { } , { "x" : "\\":,[" } ] , "\\\\" : "\\\\\\"," }',
    b'[{"a":1},{"b":[2,3]},[[],[[]]],"\\u003a,",{"\\u0022:":""}]',
]


@pytest.mark.parametrize("raw", TRICKY)
def test_member_bound_counts_exactly(raw: bytes) -> None:
    """Whatever the strings hold, a body at the bound is parsed and one under it is not."""
    members = _members(json.loads(raw))
    assert jsondoc.decode_json(raw, max_members=members) == json.loads(raw)
    with pytest.raises(InvalidJson, match=f"more than {members - 1} object members"):
        # Colons in strings are counted too, so a bound below them forces the exact count.
        jsondoc.decode_json(raw, max_members=members - 1)
    with pytest.raises(InvalidJson, match="more than 1 object members"):
        padded = raw.replace(b"{", b'{"pad":",:,:,:,:,:,:,:,:,:,:,:",', 1)
        jsondoc.decode_json(padded, max_members=1)


def test_array_element_bound_counts_exactly() -> None:
    """Commas, brackets and quotes inside strings do not count as elements."""
    element = b'"[,],[,]\\",[,"'
    at_bound = b"[[]," + b",".join([element] * (jsondoc.MAX_ARRAY_ELEMENTS - 3)) + b",[1]]"
    assert _elements(json.loads(at_bound)) == jsondoc.MAX_ARRAY_ELEMENTS
    assert len(jsondoc.decode_json(at_bound)) == jsondoc.MAX_ARRAY_ELEMENTS - 1
    over = at_bound.replace(b"[1]", b"[1,2]")
    with pytest.raises(InvalidJson, match=f"more than {jsondoc.MAX_ARRAY_ELEMENTS} array elements"):
        jsondoc.decode_json(over)


def test_orjson_writes_exactly_the_depth_the_depth_check_assumes() -> None:
    """The depth check pads a document up to orjson's writing limit: pin that limit."""
    doc: list[object] = []
    for _ in range(jsondoc.ORJSON_WRITE_DEPTH - 1):
        doc = [doc]
    orjson.dumps(doc)
    with pytest.raises(TypeError):
        orjson.dumps([doc])


@pytest.mark.parametrize("enabled", [True, False])
def test_the_garbage_collector_is_left_as_it_was(enabled: bool) -> None:
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        jsondoc.decode_json(b'[[],{"n":123456789012345678901234}]')
        with pytest.raises(InvalidJson):
            jsondoc.decode_json(b"[[],")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_depth_is_bounded() -> None:
    ok = b"[" * jsondoc.MAX_DEPTH + b"]" * jsondoc.MAX_DEPTH
    assert jsondoc.decode_json(ok) is not None
    for depth in (jsondoc.MAX_DEPTH + 1, 300, 1500):
        with pytest.raises(InvalidJson, match="nested too deeply"):
            jsondoc.decode_json(b"[" * depth + b"]" * depth)


# Every notification the MCP revisions 2025-03-26 to 2026-07-28 define (schema.ts of each
# revision: ClientNotification and ServerNotification), in either direction.
SPEC_NOTIFICATIONS = {
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
}


def test_the_spec_notification_names() -> None:
    assert mcp.NOTIFICATIONS == SPEC_NOTIFICATIONS
    for method in SPEC_NOTIFICATIONS:
        (msg,) = mcp.parse_body(body({"jsonrpc": "2.0", "method": method})).messages
        assert msg.kind is Kind.NOTIFICATION and msg.method == method


@pytest.mark.parametrize(
    "method",
    [
        "notifications/../tools/call",
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/not-in-the-spec",
    ],
)
def test_a_notification_name_with_an_id_is_a_malformed_request(method: str) -> None:
    err = refused(body({"jsonrpc": "2.0", "id": 9, "method": method, "params": {"name": "x"}}))
    assert err.problem is Problem.MALFORMED
    assert "notification" in err.detail and "id" in err.detail
    assert err.ids == (9,)


def test_notification_look_alikes_are_refused() -> None:
    for method in (
        "Notifications/initialized",
        "notifications/Cancelled",
        "notifications/progress ",
    ):
        err = refused(body({"jsonrpc": "2.0", "method": method}))
        assert "exact" in err.detail


# --- MCP 2026-07-28: the protocol version, required headers, _meta -------------------------

MODERN = "2026-07-28"
META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
}


def modern(method: str, id_: object = 1, **params: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "jsonrpc": "2.0",
        "method": method,
        "params": {**params, "_meta": META},
    }
    if id_ is not None:
        doc["id"] = id_
    return doc


def headers_for(doc: dict[str, object], **extra: str) -> dict[str, str]:
    params = doc.get("params")
    assert isinstance(params, dict)
    name = params.get("name", params.get("uri"))
    out = {"mcp-protocol-version": MODERN, "mcp-method": str(doc["method"])}
    if isinstance(name, str):
        out["mcp-name"] = name
    return {**out, **extra}


def mismatch(headers: dict[str, str], doc: object) -> Malformed:
    with pytest.raises(Malformed) as info:
        mcp_headers.check_headers(headers, mcp.parse_body(body(doc)))
    return info.value


def test_known_protocol_versions_pass_and_others_are_refused() -> None:
    parsed = mcp.parse_body(body(call(id_=4)))
    mcp_headers.check_headers({}, parsed)  # no header: 2025-03-26, sessions
    for version in ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"):
        mcp_headers.check_headers({"mcp-protocol-version": version}, parsed)
    for version in ("", "2026-07-29", "1900-01-01", "2025-11-25 ", "latest", "2026-07-28,x"):
        err = mismatch({"mcp-protocol-version": version}, call(id_=4))
        assert err.problem is Problem.UNSUPPORTED_VERSION, version
        assert err.ids == (4,)
    assert mcp.PROTOCOL_VERSIONS[0] == MODERN
    with pytest.raises(Malformed) as info:
        mcp_headers.protocol_version({"mcp-protocol-version": "2099-01-01"})
    assert info.value.problem is Problem.UNSUPPORTED_VERSION


def test_modern_requests_carry_mcp_method_and_mcp_name() -> None:
    for doc in (
        modern("tools/call", name="containerize_app", arguments={}),
        modern("resources/read", uri="ecs://clusters/default"),
        modern("prompts/get", name="deploy_checklist"),
        modern("tools/list"),
        modern("server/discover"),
    ):
        mcp_headers.check_headers(headers_for(doc), mcp.parse_body(body(doc)))
        without_method = {k: v for k, v in headers_for(doc).items() if k != "mcp-method"}
        err = mismatch(without_method, doc)
        assert err.problem is Problem.HEADER_MISMATCH and "Mcp-Method" in err.detail
        assert err.ids == (1,)
        if "mcp-name" in headers_for(doc):
            without_name = {k: v for k, v in headers_for(doc).items() if k != "mcp-name"}
            err = mismatch(without_name, doc)
            assert err.problem is Problem.HEADER_MISMATCH and "Mcp-Name" in err.detail
    # The same request under a session-based revision needs no headers.
    legacy = call()
    mcp_headers.check_headers({"mcp-protocol-version": "2025-11-25"}, mcp.parse_body(body(legacy)))
    # Notifications: this revision defines no header requirement for them.
    note = modern("notifications/cancelled", id_=None, requestId=1)
    mcp_headers.check_headers({"mcp-protocol-version": MODERN}, mcp.parse_body(body(note)))


def test_a_modern_post_is_one_message() -> None:
    doc = modern("tools/list")
    err = mismatch(headers_for(doc), [doc])
    assert err.problem is Problem.MALFORMED and "batch" in err.detail


def test_the_body_and_the_header_name_the_same_protocol_version() -> None:
    doc = modern("tools/list", id_=6)
    # A modern body under a session-era header (or none): a dual-era server serves the body
    # statelessly while the headers claim a session.
    for version in ("2025-11-25", None):
        headers = headers_for(doc)
        if version is None:
            del headers["mcp-protocol-version"]
        else:
            headers["mcp-protocol-version"] = version
        err = mismatch(headers, doc)
        assert err.problem is Problem.HEADER_MISMATCH and "protocol version" in err.detail
        assert err.ids == (6,)
    # A modern header on a request without the version in _meta.
    bare = {"jsonrpc": "2.0", "id": 6, "method": "tools/list", "params": {}}
    err = mismatch(headers_for({**bare}), bare)
    assert err.problem is Problem.HEADER_MISMATCH
    # Not a string: malformed whatever the header says.
    odd = {**doc, "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": 20260728}}}
    assert refused(body(odd)).problem is Problem.MALFORMED


def listen(notifications: object, id_: object = 1) -> dict[str, object]:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "subscriptions/listen",
        "params": {"notifications": notifications, "_meta": META},
    }


def test_subscriptions_listen_carries_its_resource_subscriptions() -> None:
    uris = ["ecs://clusters/default", "file:///tmp/a%20b"]
    (msg,) = mcp.parse_body(
        body(listen({"toolsListChanged": True, "resourceSubscriptions": uris}))
    ).messages
    assert msg.method == "subscriptions/listen" and msg.name is None
    assert msg.subscriptions == tuple(uris)
    (bare,) = mcp.parse_body(body(listen({"toolsListChanged": True}))).messages
    assert bare.subscriptions == ()


@pytest.mark.parametrize(
    ("notifications", "fragment"),
    [
        ([], "notifications must be an object"),
        ({"resourceSubscriptions": "ecs://x"}, "must be an array of strings"),
        ({"resourceSubscriptions": [1]}, "must be an array of strings"),
        ({"resourceSubscriptions": [None]}, "must be an array of strings"),
        ({"resourceSubscriptions": ["ecs://x\u200b"]}, "invisible"),
        ({"resourceSubscriptions": [" ecs://x"]}, "invisible"),
    ],
)
def test_subscriptions_listen_refusals(notifications: object, fragment: str) -> None:
    err = refused(body(listen(notifications, id_="L")))
    assert err.problem is Problem.MALFORMED and fragment in err.detail
    assert err.ids == ("L",)


def test_one_listen_subscribes_to_a_bounded_number_of_resources() -> None:
    """Each URI is judged by the policy: their number bounds what one check costs."""
    most = [f"ecs://clusters/c{i}" for i in range(mcp.MAX_SUBSCRIPTIONS)]
    (msg,) = mcp.parse_body(body(listen({"resourceSubscriptions": most}))).messages
    assert len(msg.subscriptions) == mcp.MAX_SUBSCRIPTIONS == 1000
    err = refused(body(listen({"resourceSubscriptions": [*most, "ecs://one-more"]})))
    assert err.problem is Problem.MALFORMED and "at most 1000" in err.detail
