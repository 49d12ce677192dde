"""Hostile input through the real Envoy: a corpus of bypass attempts.

Every variant goes through the real Envoy binary to a real `mcp-authz` (Redis store) and a
real MCP upstream that records each request reaching it, over HTTP/1.1 and over HTTP/2
(prior-knowledge h2c), plus raw-socket HTTP/1.1 variants that no client library would
send. For each one the test decides the documented outcome (README, "What the agent sees
on a denial"), asserts the reply, and asserts from the upstream's own record that no call
the policy denies got there. Allowed variants really run on the upstream (the corpus has
an MCP session), so "harmless" is checked too: the denied tool's output never comes back.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import socket
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.redis_server import running_redis
from tests.support.reliability import record
from tests.support.stack import Stack, mcp_stack, on_transport

pytestmark = pytest.mark.e2e

DENY_BY_DEFAULT_POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "containerize_app": {"action": "allow"},
        "delete_app": {"action": "deny", "reason": "deleting needs a human"},
        "start_dicom_export_job": {
            "limits": [{"counter": "exports", "window": "minute", "max": 1000}]
        },
    },
}
# Look-alikes matter most where unknown names are allowed: a server that folded them onto
# delete_app would run a denied tool.
ALLOW_BY_DEFAULT_POLICY = {
    "version": "1",
    "default": "allow",
    "tools": {"delete_app": {"action": "deny", "reason": "deleting needs a human"}},
}
DENIED_TOOL = "delete_app"
# What delete_app answers when it runs (examples/demo_upstream.py): must never come back.
DENIED_TOOL_OUTPUT = "Deleted ECS service"
PROTOCOL_VERSION = "2025-11-25"
TOKEN = "bypass-corpus-token"
ONE_MIB = 1 << 20

# README table: data.reason -> (HTTP status, JSON-RPC code).
DOCUMENTED = {
    "denied_by_rule": (403, -32051),
    "denied_by_default": (403, -32051),
    "no_grant_identity": (403, -32051),
    "malformed_request": (400, -32600),
    "header_mismatch": (400, -32600),
    "unsupported_media_type": (415, -32600),
    "partial_body": (413, -32600),
    "method_not_allowed": (405, -32600),
}


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
    # Mcp-Method / Mcp-Name (SEP-2243) against the body.
    v("hdr-name-mismatch", DENIED, "header_mismatch", ("mcp-name", "containerize_app"), echo_id=1),
    v("hdr-method-mismatch", DENIED, "header_mismatch", ("mcp-method", "tools/list")),
    v("hdr-name-b64-mismatch", DENIED, "header_mismatch", ("mcp-name", b64("containerize_app"))),
    v("hdr-b64-bad-alphabet", DENIED, "header_mismatch", ("mcp-name", "=?base64?ZGVs!ZXRl?=")),
    v("hdr-b64-no-padding", DENIED, "header_mismatch", ("mcp-name", "=?base64?ZGVsZXRlX2Fw?=")),
    v("hdr-b64-invalid-utf8", DENIED, "header_mismatch", ("mcp-name", b64(b"\xff\xfe"))),
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


# --- the stacks ---------------------------------------------------------------------------


@dataclass
class Corpus:
    """A running stack with an MCP session, and the tally of what the corpus tried."""

    stack: Stack
    port: int
    session: str
    denied_tools: frozenset[str]
    outcomes: Counter[str] = field(default_factory=Counter)
    requests: int = 0

    def base_headers(self) -> dict[str, str]:
        return {
            "accept": "application/json, text/event-stream",
            "mcp-protocol-version": PROTOCOL_VERSION,
            "mcp-session-id": self.session,
        }


def _open_session(url: str) -> str:
    """initialize + notifications/initialized through Envoy: allowed calls then really run."""
    headers = {
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "authorization": f"Bearer {TOKEN}",
    }
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "bypass-corpus", "version": "1"},
        },
    }
    resp = httpx.post(url, json=init, headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    session = resp.headers["mcp-session-id"]
    headers |= {"mcp-session-id": session, "mcp-protocol-version": PROTOCOL_VERSION}
    done = httpx.post(
        url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers
    )
    assert done.status_code == 202, done.text
    return session


@contextlib.contextmanager
def _corpus(tmp: Path, policy: dict[str, Any], section: str, transport: str) -> Iterator[Corpus]:
    policy_file = tmp / "policy.json"
    policy_file.write_text(json.dumps(policy))
    section = on_transport(section, transport)
    with (
        running_redis(tmp) as redis,
        mcp_stack(tmp, policy_file, ["--redis", redis.url], transport=transport) as s,
    ):
        corpus = Corpus(
            stack=s,
            port=httpx.URL(s.url).port or 80,
            session=_open_session(s.url),
            denied_tools=frozenset({DENIED_TOOL}),
        )
        yield corpus
        reached = [t for t in s.recorded_tools() if t in corpus.denied_tools]
        record(
            section,
            "Hostile requests sent through the real Envoy to mcp-authz (Redis store) and a "
            "recording MCP upstream; each reply checked against the documented denial, each "
            "upstream record checked for denied calls.",
            {
                "distinct variants": len({k.split("/", 1)[1] for k in corpus.outcomes.elements()}),
                "requests sent": corpus.requests,
                "outcomes": ", ".join(
                    f"{o}: {n}"
                    for o, n in sorted(
                        Counter(k.split("/")[0] for k in corpus.outcomes.elements()).items()
                    )
                ),
                "requests that reached the upstream": len(s.recorded()),
                "denied tool calls that reached the upstream": len(reached),
            },
        )


@pytest.fixture(scope="module")
def deny_default(tmp_path_factory: pytest.TempPathFactory, transport: str) -> Iterator[Corpus]:
    with _corpus(
        tmp_path_factory.mktemp("bypass"),
        DENY_BY_DEFAULT_POLICY,
        "Bypass corpus (default deny)",
        transport,
    ) as corpus:
        yield corpus


@pytest.fixture(scope="module")
def allow_default(tmp_path_factory: pytest.TempPathFactory, transport: str) -> Iterator[Corpus]:
    with _corpus(
        tmp_path_factory.mktemp("lookalike"),
        ALLOW_BY_DEFAULT_POLICY,
        "Bypass corpus (default allow, look-alike names)",
        transport,
    ) as corpus:
        yield corpus


# --- sending and judging ------------------------------------------------------------------


def _send(corpus: Corpus, variant: Variant, http2: bool) -> httpx.Response:
    headers: list[tuple[str, str]] = list(corpus.base_headers().items())
    names = {name for name, _ in variant.headers}
    if not variant.no_content_type and "content-type" not in names:
        headers.append(("content-type", "application/json"))
    if not variant.no_auth:
        headers.append(("authorization", f"Bearer {TOKEN}"))
    headers += variant.headers
    content: bytes | Iterator[bytes] = variant.body
    if variant.chunked:
        body = variant.body
        content = iter([body[i : i + 65536] for i in range(0, len(body), 65536)])
    with httpx.Client(http1=not http2, http2=http2, timeout=15) as client:
        request = client.build_request(
            variant.http_method, corpus.stack.url, content=content, headers=headers
        )
        resp = client.send(request)
        resp.read()
    corpus.requests += 1
    assert resp.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    return resp


def assert_documented_denial(resp: httpx.Response, reason: str, echo_id: object = None) -> None:
    status, code = DOCUMENTED[reason]
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["x-mcp-authz-reason"].startswith("policy violation:")
    reply = resp.json()
    errors = reply if isinstance(reply, list) else [reply]
    assert errors
    for error in errors:
        assert error["jsonrpc"] == "2.0"
        assert error["error"]["code"] == code
        assert error["error"]["message"].startswith("policy violation:")
        assert error["error"]["data"]["reason"] == reason
    if echo_id is not None:
        assert reply["id"] == echo_id


def judge(corpus: Corpus, variant: Variant, resp: httpx.Response, before: int) -> None:
    """The reply is the documented one, and the upstream got no denied call."""
    new = corpus.stack.recorded()[before:]
    reached = [
        m["tool"]
        for r in new
        for m in (r["jsonrpc"] or [])
        if m.get("method") == "tools/call" and m.get("tool") in corpus.denied_tools
    ]
    assert reached == [], f"denied call reached the upstream: {reached}"
    assert DENIED_TOOL_OUTPUT not in resp.text
    if variant.outcome == "allowed":
        assert "x-mcp-authz-reason" not in resp.headers, resp.text
        assert resp.status_code == variant.upstream_status, resp.text
        assert len(new) == 1
        # Envoy replaced any client-sent grant with the one mcp-authz derived.
        assert new[0]["grant"] is not None and new[0]["grant"].startswith("b-")
        assert new[0]["grant"] != "b-000000000000000000000000"
    elif variant.outcome.startswith("envoy:"):
        assert resp.status_code == int(variant.outcome.split(":")[1]), resp.text
        assert "x-mcp-authz-reason" not in resp.headers
        assert new == []
    else:
        assert_documented_denial(resp, variant.outcome, variant.echo_id)
        assert new == []


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
@pytest.mark.parametrize("variant", CORPUS, ids=[c.id for c in CORPUS])
def test_corpus(deny_default: Corpus, variant: Variant, http2: bool) -> None:
    before = len(deny_default.stack.recorded())
    resp = _send(deny_default, variant, http2)
    judge(deny_default, variant, resp, before)
    deny_default.outcomes[f"{variant.outcome}/{variant.id}"] += 1


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2c"])
@pytest.mark.parametrize("variant", LOOKALIKES, ids=[c.id for c in LOOKALIKES])
def test_lookalikes_under_default_allow(
    allow_default: Corpus, variant: Variant, http2: bool
) -> None:
    before = len(allow_default.stack.recorded())
    resp = _send(allow_default, variant, http2)
    judge(allow_default, variant, resp, before)
    if variant.outcome == "allowed":
        # It ran, as some other (unknown) tool: the upstream says so, and it is not ours.
        (recorded,) = allow_default.stack.recorded()[before:]
        assert recorded["jsonrpc"][0]["tool"] != DENIED_TOOL
        assert "Unknown tool" in resp.text or "not found" in resp.text.lower(), resp.text
    allow_default.outcomes[f"{variant.outcome}/{variant.id}"] += 1


def test_corpus_is_big_enough() -> None:
    assert len({c.id for c in CORPUS}) == len(CORPUS) >= 40
    assert len({c.id for c in LOOKALIKES}) == len(LOOKALIKES)


# --- raw HTTP/1.1 that no client library sends --------------------------------------------


def _raw(corpus: Corpus, data: bytes, *, half_close: bool = False, wait: float = 3.0) -> bytes:
    """Send bytes on a fresh connection; return everything read until close or quiet."""
    out = b""
    with socket.create_connection(("127.0.0.1", corpus.port), timeout=wait) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := sock.recv(65536):
                out += chunk
    corpus.requests += 1
    return out


def _request(corpus: Corpus, body: bytes, *lines: str, length: int | None = None) -> bytes:
    head = [
        "POST /mcp HTTP/1.1",
        f"Host: 127.0.0.1:{corpus.port}",
        "Content-Type: application/json",
        "Accept: application/json, text/event-stream",
        f"Authorization: Bearer {TOKEN}",
        f"Mcp-Session-Id: {corpus.session}",
        f"Mcp-Protocol-Version: {PROTOCOL_VERSION}",
        *lines,
    ]
    if length is not None:
        head.append(f"Content-Length: {length}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _statuses(raw: bytes) -> list[int]:
    return [int(line.split()[1]) for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.")]


RAW_CASES = {
    # Envoy refuses the framing itself: nothing is forwarded, mcp-authz is not asked.
    "content-length-and-chunked": (
        lambda c: _request(c, b"0\r\n\r\n", "Transfer-Encoding: chunked", length=5),
        [400],
    ),
    "transfer-encoding-gzip": (
        lambda c: _request(c, b"0\r\n\r\n", "Transfer-Encoding: gzip, chunked"),
        [501],
    ),
    "http-1.0": (
        lambda c: _request(c, DENIED, length=len(DENIED)).replace(b"HTTP/1.1", b"HTTP/1.0", 1),
        [426],
    ),
    "nul-in-header-value": (
        lambda c: _request(c, DENIED, "Mcp-Name: delete\x00app", length=len(DENIED)),
        [400],
    ),
    # Chunked with a trailer that claims another name: only the body counts.
    "chunked-with-trailer": (
        lambda c: _request(
            c,
            f"{len(DENIED):x}\r\n".encode()
            + DENIED
            + b"\r\n0\r\nMcp-Name: containerize_app\r\n\r\n",
            "Transfer-Encoding: chunked",
        ),
        [403],
    ),
    # Pipelined: the second request is checked on its own, not hidden inside the first.
    "pipelined-allowed-then-denied": (
        lambda c: (
            _request(c, ALLOWED, length=len(ALLOWED)) + _request(c, DENIED, length=len(DENIED))
        ),
        [200, 403],
    ),
    # A Content-Length shorter than the body: the rest is parsed as a new (bad) request.
    "short-content-length": (
        lambda c: _request(c, ALLOWED + DENIED + b"\r\n\r\n", length=len(ALLOWED)),
        [200, 400],
    ),
}


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_raw_http1(deny_default: Corpus, case: str) -> None:
    build, statuses = RAW_CASES[case]
    before = len(deny_default.stack.recorded())
    reply = _raw(deny_default, build(deny_default))
    assert _statuses(reply) == statuses, reply[:600]
    assert DENIED_TOOL_OUTPUT.encode() not in reply
    new = deny_default.stack.recorded()[before:]
    assert all(m.get("tool") != DENIED_TOOL for r in new for m in (r["jsonrpc"] or []))
    assert len(new) == statuses.count(200)
    deny_default.outcomes[f"raw:{','.join(map(str, statuses))}/raw-{case}"] += 1


def test_truncated_body_then_close(deny_default: Corpus) -> None:
    """The client promises more body than it sends and hangs up: nothing is forwarded."""
    before = len(deny_default.stack.recorded())
    reply = _raw(
        deny_default,
        _request(deny_default, DENIED[: len(DENIED) // 2], length=len(DENIED)),
        half_close=True,
    )
    assert not reply.startswith(b"HTTP/1.1 200")
    assert deny_default.stack.recorded()[before:] == []
    deny_default.outcomes["raw:no-reply/raw-truncated-body"] += 1


def test_no_denied_call_ever_reached_the_upstream(deny_default: Corpus) -> None:
    """Over the whole corpus, read from the upstream's own record."""
    tools = deny_default.stack.recorded_tools()
    assert DENIED_TOOL not in tools
    assert set(tools) <= {"containerize_app"}
