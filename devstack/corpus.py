"""The bypass corpus: hostile MCP requests, each with its documented outcome.

``tests/test_bypass.py`` sends every variant through the real Envoy and mcp-authz and
judges the reply; ``fuzz/fuzz_check.py`` seeds libFuzzer with the bodies. The policies they
run under deny ``delete_app`` (the denied tool) and allow ``containerize_app``.
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from dataclasses import dataclass
from typing import Any

DENIED_TOOL = "delete_app"
# The bearer token the corpus's requests carry (the stack's grant).
TOKEN = "bypass-corpus-token"
ONE_MIB = 1 << 20


# --- bodies -------------------------------------------------------------------------------


def j(doc: object) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode()


def call(name: object = DENIED_TOOL, id_: object = 1, **arguments: object) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments or {"app_name": "prod"}},
    }


def allowed_call(id_: object = 1) -> dict[str, Any]:
    return call("containerize_app", id_, app_path="/srv/app")


def with_method(method: str, name: str = DENIED_TOOL) -> bytes:
    return j({"jsonrpc": "2.0", "id": 1, "method": method, "params": {"name": name}})


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return "=?base64?" + base64.b64encode(raw).decode() + "?="


DENIED = j(call())
ALLOWED = j(allowed_call())

# MCP 2026-07-28: no session, the version in params._meta, Mcp-Method/Mcp-Name required.
MODERN = "2026-07-28"
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientInfo": {"name": "bypass-corpus", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


def modern(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "params": {**doc.get("params", {}), "_meta": MODERN_META}}


def modern_headers(name: str, method: str = "tools/call") -> tuple[tuple[str, str], ...]:
    return (("mcp-protocol-version", MODERN), ("mcp-method", method), ("mcp-name", name))


MODERN_DENIED = j(modern(call()))
MODERN_ALLOWED = j(modern(allowed_call()))


# --- the corpus ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One hostile request and its documented outcome.

    ``outcome`` is a README reason code (a documented denial), ``"allowed"`` (the policy
    allows it and it must be harmless), or ``"envoy:<status>"`` (Envoy itself refuses it
    before mcp-authz or the upstream see it).
    """

    id: str
    body: bytes
    outcome: str
    headers: tuple[tuple[str, str], ...] = ()
    http_method: str = "POST"
    chunked: bool = False
    no_content_type: bool = False
    no_auth: bool = False
    echo_id: object = None
    upstream_status: int = 200


def v(id_: str, body: bytes, outcome: str, *headers: tuple[str, str], **kw: Any) -> Variant:
    return Variant(id=id_, body=body, outcome=outcome, headers=headers, **kw)


CORPUS: list[Variant] = [
    # Duplicate keys at every level, including one spelled with an escape.
    v(
        "dup-top-method",
        b'{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call",'
        b'"params":{"name":"delete_app"}}',
        "malformed_request",
    ),
    v(
        "dup-top-id",
        b'{"jsonrpc":"2.0","id":1,"id":2,"method":"tools/call","params":{"name":"delete_app"}}',
        "malformed_request",
    ),
    v(
        "dup-params",
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"containerize_app"},'
        b'"params":{"name":"delete_app"}}',
        "malformed_request",
    ),
    v(
        "dup-params-name",
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        b'"params":{"name":"containerize_app","name":"delete_app"}}',
        "malformed_request",
    ),
    v(
        "dup-escaped-key",
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        b'"params":{"name":"containerize_app","n\\u0061me":"delete_app"}}',
        "malformed_request",
    ),
    v(
        "dup-in-arguments",
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"containerize_app",'
        b'"arguments":{"app_path":"/a","app_path":"/b"}}}',
        "malformed_request",
    ),
    v(
        "dup-in-batch-element",
        b'[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"containerize_app",'
        b'"name":"delete_app"}}]',
        "malformed_request",
    ),
    # Unicode escapes decode to the same name: the rule still applies.
    v(
        "escaped-tool-name",
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete\\u005fapp"}}',
        "denied_by_rule",
        echo_id=1,
    ),
    v(
        "escaped-method",
        b'{"jsonrpc":"2.0","id":1,"method":"\\u0074ools\\/call","params":{"name":"delete_app"}}',
        "denied_by_rule",
    ),
    # Look-alike tool names.
    v("name-case", j(call("Delete_App")), "denied_by_default"),
    v("name-cyrillic-a", j(call("delete_\u0430pp")), "denied_by_default"),
    v("name-trailing-space", j(call("delete_app ")), "malformed_request"),
    v("name-leading-tab", j(call("\tdelete_app")), "malformed_request"),
    v("name-zero-width", j(call("delete\u200b_app")), "malformed_request"),
    v("name-soft-hyphen", j(call("delete\u00ad_app")), "malformed_request"),
    v("name-rtl-override", j(call("\u202edelete_app")), "malformed_request"),
    v("name-full-width", j(call("\uff44\uff45\uff4c\uff45\uff54\uff45_app")), "malformed_request"),
    v("name-nul", j(call("delete_app\u0000")), "malformed_request"),
    v(
        "name-lone-surrogate",
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_app\\ud800"}}',
        "malformed_request",
    ),
    v("name-empty", j(call("")), "malformed_request"),
    # Look-alike methods.
    v("method-title-case", with_method("Tools/Call"), "malformed_request"),
    v("method-upper-case", with_method("TOOLS/CALL"), "malformed_request"),
    v("method-trailing-space", with_method("tools/call "), "malformed_request"),
    v("method-leading-space", with_method(" tools/call"), "malformed_request"),
    v("method-nul", with_method("tools/call\u0000"), "malformed_request"),
    v("method-full-width-slash", with_method("tools\uff0fcall"), "malformed_request"),
    v("method-unknown", with_method("tools//call"), "denied_by_default"),
    # Batches mixing allowed and denied calls, requests and notifications.
    v("batch-allowed-then-denied", j([allowed_call(1), call(id_=2)]), "denied_by_rule"),
    v(
        "batch-denied-notification",
        j([allowed_call(1), {k: x for k, x in call().items() if k != "id"}]),
        "denied_by_rule",
    ),
    v(
        "batch-lifecycle-and-denied",
        j(
            [
                {"jsonrpc": "2.0", "id": 1, "method": "ping"},
                {"jsonrpc": "2.0", "method": "notifications/initialized"},
                {"jsonrpc": "2.0", "id": 2, "result": {}},
                call(id_=3),
            ]
        ),
        "denied_by_rule",
    ),
    v(
        "batch-response-with-method",
        j([allowed_call(1), {"jsonrpc": "2.0", "id": 2, "result": {}, **call(id_=2)}]),
        "malformed_request",
    ),
    v("batch-nested", j([[call()]]), "malformed_request"),
    v("batch-empty", b"[]", "malformed_request"),
    # Allowed through; the upstream (protocol 2025-11-25, no batches) refuses it itself.
    v(
        "batch-allowed-only",
        j([allowed_call(1), allowed_call(2)]),
        "allowed",
        upstream_status=400,
    ),
    v(
        "notification-denied-call",
        j({k: x for k, x in call().items() if k != "id"}),
        "denied_by_rule",
    ),
    # A notification name with an id is a request the server answers: never a notification.
    v(
        "notification-name-with-id",
        with_method("notifications/../tools/call"),
        "malformed_request",
        echo_id=1,
    ),
    v(
        "spec-notification-with-id",
        j({"jsonrpc": "2.0", "id": 1, "method": "notifications/initialized"}),
        "malformed_request",
        echo_id=1,
    ),
    v(
        "notification-unknown-name",
        j({"jsonrpc": "2.0", "method": "notifications/../tools/call", "params": {"name": "x"}}),
        "denied_by_default",
    ),
    v(
        "notification-look-alike",
        j({"jsonrpc": "2.0", "method": "Notifications/initialized"}),
        "malformed_request",
    ),
    # Mcp-Method / Mcp-Name (SEP-2243) against the body.
    v("hdr-name-mismatch", DENIED, "header_mismatch", ("mcp-name", "containerize_app"), echo_id=1),
    v("hdr-method-mismatch", DENIED, "header_mismatch", ("mcp-method", "tools/list")),
    v("hdr-name-b64-mismatch", DENIED, "header_mismatch", ("mcp-name", b64("containerize_app"))),
    # A bad base64 value is refused like any mismatch, echoing the request id.
    *(
        v(f"hdr-b64-{label}", DENIED, "header_mismatch", ("mcp-name", value), echo_id=1)
        for label, value in [
            ("bad-alphabet", "=?base64?ZGVs!ZXRl?="),
            ("no-padding", "=?base64?ZGVsZXRlX2FwcA?="),
            ("short-padding", "=?base64?ZGVsZXRlX2FwcA=?="),
            ("extra-padding", "=?base64?ZGVsZXRlX2FwcA===?="),
            ("inner-space", "=?base64?ZGVsZXRl X2FwcA==?="),
            ("invalid-utf8", b64(b"\xff\xfe")),
        ]
    ),
    v(
        "hdr-method-b64-bad",
        DENIED,
        "header_mismatch",
        ("mcp-method", "=?base64?dG9vbHMvY2Fsbg?="),
        echo_id=1,
    ),
    v(
        "hdr-b64-upper-marker",
        DENIED,
        "header_mismatch",
        ("mcp-name", "=?BASE64?" + base64.b64encode(b"delete_app").decode() + "?="),
    ),
    v("hdr-on-batch", j([call()]), "header_mismatch", ("mcp-method", "tools/call")),
    v(
        "hdr-repeated-name",
        ALLOWED,
        "header_mismatch",
        ("mcp-name", "containerize_app"),
        ("mcp-name", "containerize_app"),
    ),
    v(
        "hdr-b64-agrees-denied",
        DENIED,
        "denied_by_rule",
        ("mcp-method", "tools/call"),
        ("mcp-name", b64("delete_app")),
    ),
    v(
        "hdr-agrees-allowed",
        ALLOWED,
        "allowed",
        ("mcp-method", "tools/call"),
        ("mcp-name", "containerize_app"),
    ),
    # MCP 2026-07-28: the protocol version is known, the required headers are there, the
    # body's _meta names the version the header does, one message per POST.
    v(
        "version-unknown",
        ALLOWED,
        "unsupported_protocol_version",
        ("mcp-protocol-version", "2099-01-01"),
        echo_id=1,
    ),
    v(
        "version-padded",
        DENIED,
        "unsupported_protocol_version",
        ("mcp-protocol-version", "2026-07-28x"),
    ),
    v("modern-allowed", MODERN_ALLOWED, "allowed", *modern_headers("containerize_app")),
    v("modern-denied", MODERN_DENIED, "denied_by_rule", *modern_headers(DENIED_TOOL)),
    v(
        "modern-no-mcp-method",
        MODERN_DENIED,
        "header_mismatch",
        *modern_headers(DENIED_TOOL)[::2],
        echo_id=1,
    ),
    v(
        "modern-no-mcp-name",
        MODERN_ALLOWED,
        "header_mismatch",
        *modern_headers("containerize_app")[:2],
        echo_id=1,
    ),
    v(
        "modern-body-session-header",
        MODERN_ALLOWED,
        "header_mismatch",
        ("mcp-protocol-version", "2025-11-25"),
        *modern_headers("containerize_app")[1:],
    ),
    v(
        "modern-header-legacy-body",
        ALLOWED,
        "header_mismatch",
        *modern_headers("containerize_app"),
    ),
    v(
        "modern-batch",
        j([modern(allowed_call())]),
        "malformed_request",
        ("mcp-protocol-version", MODERN),
    ),
    # subscriptions/listen passes, but the resources it subscribes to are governed.
    *(
        v(
            f"listen-{label}",
            j(
                modern(
                    {
                        "jsonrpc": "2.0",
                        "id": 1,
                        "method": "subscriptions/listen",
                        "params": {"notifications": {"resourceSubscriptions": uris}},
                    }
                )
            ),
            outcome,
            ("mcp-protocol-version", MODERN),
            ("mcp-method", "subscriptions/listen"),
            echo_id=1,
        )
        for label, uris, outcome in [
            ("unlisted-resource", ["file:///etc/passwd"], "denied_by_default"),
            ("resource-zero-width", ["file:///etc/\u200bpasswd"], "malformed_request"),
            ("resource-not-string", [{"uri": "file:///etc/passwd"}], "malformed_request"),
            ("resources-not-array", "file:///etc/passwd", "malformed_request"),
        ]
    ),
    # Content encodings: the gateway must read the bytes the server reads.
    v("enc-gzip", gzip.compress(DENIED), "unsupported_media_type", ("content-encoding", "gzip")),
    v(
        "enc-deflate",
        zlib.compress(DENIED),
        "unsupported_media_type",
        ("content-encoding", "deflate"),
    ),
    v("enc-br-label", DENIED, "unsupported_media_type", ("content-encoding", "br")),
    v("enc-upper-gzip", DENIED, "unsupported_media_type", ("content-encoding", "GZIP")),
    v("enc-list", DENIED, "unsupported_media_type", ("content-encoding", "identity, gzip")),
    v(
        "enc-repeated",
        DENIED,
        "unsupported_media_type",
        ("content-encoding", "identity"),
        ("content-encoding", "gzip"),
    ),
    # Content types.
    v("ct-missing", DENIED, "unsupported_media_type", no_content_type=True),
    v("ct-text-plain", DENIED, "unsupported_media_type", ("content-type", "text/plain")),
    v("ct-json-suffix", DENIED, "unsupported_media_type", ("content-type", "application/x+json")),
    v("ct-form", DENIED, "unsupported_media_type", ("content-type", "multipart/form-data")),
    v(
        "ct-repeated",
        ALLOWED,
        "unsupported_media_type",
        ("content-type", "application/json"),
        ("content-type", "application/json"),
    ),
    v("ct-mixed-case-denied", DENIED, "denied_by_rule", ("content-type", "Application/JSON")),
    v(
        "ct-charset-allowed",
        ALLOWED,
        "allowed",
        ("content-type", "application/json; charset=utf-8"),
    ),
    # Byte-level encodings of the body.
    v("bom", b"\xef\xbb\xbf" + DENIED, "malformed_request"),
    v("invalid-utf8-name", DENIED.replace(b"delete_app", b"delete\xffapp"), "malformed_request"),
    v("overlong-utf8", DENIED.replace(b"delete_app", b"delete\xc1\x9fapp"), "malformed_request"),
    v("utf8-surrogate-bytes", DENIED.replace(b"_app", b"\xed\xa0\x80"), "malformed_request"),
    v(
        "utf16-body",
        json.dumps(call()).encode("utf-16"),
        "malformed_request",
        ("content-type", "application/json; charset=utf-16"),
    ),
    v("nan-argument", DENIED.replace(b'"prod"', b"NaN"), "malformed_request"),
    v("infinity-argument", ALLOWED.replace(b'"/srv/app"', b"-Infinity"), "malformed_request"),
    v("trailing-garbage", ALLOWED + b"x", "malformed_request"),
    v("two-documents", ALLOWED + DENIED, "malformed_request"),
    # Numbers and ids of every JSON type.
    v("id-float", j(call(id_=1.0)), "malformed_request"),
    v("id-exponent", DENIED.replace(b'"id": 1', b'"id": 1e0'), "malformed_request"),
    v("id-true", j(call(id_=True)), "malformed_request"),
    v("id-null", j(call(id_=None)), "malformed_request"),
    v("id-array", j(call(id_=[1])), "malformed_request"),
    v("id-object", j(call(id_={"a": 1})), "malformed_request"),
    v("id-huge-digits", DENIED.replace(b'"id": 1', b'"id": ' + b"9" * 5000), "malformed_request"),
    v("id-string", j(call(id_="1")), "denied_by_rule", echo_id="1"),
    v("id-negative", j(call(id_=-7)), "denied_by_rule", echo_id=-7),
    v("id-beyond-int64", j(call(id_=2**70)), "denied_by_rule", echo_id=2**70),
    v("jsonrpc-number", DENIED.replace(b'"2.0"', b"2.0"), "malformed_request"),
    v("jsonrpc-2.00", DENIED.replace(b'"2.0"', b'"2.00"'), "malformed_request"),
    v(
        "numbers-in-arguments",
        j(call("containerize_app", app_path="/a", port=8080)).replace(b"8080", b"8.08e3"),
        "allowed",
    ),
    # params.name of every non-string type, and other params shapes.
    *(
        v(f"name-type-{label}", j(call(value)), "malformed_request")
        for label, value in [
            ("null", None),
            ("int", 1),
            ("float", 1.5),
            ("bool", True),
            ("array", ["delete_app"]),
            ("object", {"name": "delete_app"}),
        ]
    ),
    v(
        "name-missing",
        j({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}}),
        "malformed_request",
    ),
    v(
        "params-array",
        j({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": ["delete_app"]}),
        "malformed_request",
    ),
    v(
        "arguments-string",
        j({**call(), "params": {"name": DENIED_TOOL, "arguments": "x"}}),
        "malformed_request",
    ),
    # Extra top-level members.
    v("extra-member", j({**call(), "extra": True}), "malformed_request"),
    v("extra-result-member", j({**call(), "result": {}}), "malformed_request"),
    v("extra-error-member", j({**allowed_call(), "error": {}}), "malformed_request"),
    # Bodies: chunked, oversized, the whole body inspected, partial-body spoofing.
    v("chunked-denied", DENIED, "denied_by_rule", chunked=True),
    v("chunked-allowed", ALLOWED, "allowed", chunked=True),
    v("oversized", b" " * ONE_MIB + ALLOWED, "envoy:413"),
    v("oversized-chunked", b" " * ONE_MIB + ALLOWED, "envoy:413", chunked=True),
    v(
        "denied-call-after-padding",
        j(
            [
                call("containerize_app", 1, app_path="/a", pad="x" * (ONE_MIB - 4096)),
                call(id_=2),
            ]
        ),
        "denied_by_rule",
    ),
    v(
        "spoofed-partial-body-denied",
        DENIED,
        "denied_by_rule",
        ("x-envoy-auth-partial-body", "true"),
    ),
    v("spoofed-partial-body-true", ALLOWED, "allowed", ("x-envoy-auth-partial-body", "true")),
    # HTTP methods.
    v("put", DENIED, "method_not_allowed", http_method="PUT"),
    v("patch", DENIED, "method_not_allowed", http_method="PATCH"),
    v("get-with-body", DENIED, "malformed_request", http_method="GET"),
    v("delete-with-body", DENIED, "malformed_request", http_method="DELETE"),
    # Identity: a spoofed grant header, repeated or missing credentials.
    v(
        "spoofed-grant-header",
        ALLOWED,
        "allowed",
        ("x-mcp-authz-grant", "b-000000000000000000000000"),
    ),
    v(
        "spoofed-grant-no-auth",
        ALLOWED,
        "no_grant_identity",
        ("x-mcp-authz-grant", "b-000000000000000000000000"),
        no_auth=True,
    ),
    v(
        "repeated-authorization",
        ALLOWED,
        "no_grant_identity",
        ("authorization", f"Bearer {TOKEN}"),
        ("authorization", "Bearer other"),
        no_auth=True,
    ),
    v(
        "basic-authorization",
        ALLOWED,
        "no_grant_identity",
        ("authorization", "Basic YTpi"),
        no_auth=True,
    ),
]

# Under default allow, unknown names pass: each look-alike must either be refused or run
# something other than the denied tool.
LOOKALIKES: list[Variant] = [
    v("plain-denied", DENIED, "denied_by_rule"),
    v("escaped", j(call()).replace(b"delete_app", b"delete\\u005fapp"), "denied_by_rule"),
    v("case", j(call("DELETE_APP")), "allowed"),
    v("cyrillic", j(call("delete_\u0430pp")), "allowed"),
    v("trailing-space", j(call("delete_app ")), "malformed_request"),
    v("zero-width-joiner", j(call("delete_\u200dapp")), "malformed_request"),
    v("full-width", j(call("\uff44elete_app")), "malformed_request"),
    v("ligature", j(call("delete_\ufb00")), "malformed_request"),
    v("nul", j(call("delete_app\u0000")), "malformed_request"),
    v("method-case", with_method("tools/CALL"), "malformed_request"),
    v(
        "dup-name",
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","name":"delete_app"}}',
        "malformed_request",
    ),
]
