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

import contextlib
import json
import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.corpus import (
    ALLOWED,
    CORPUS,
    DENIED,
    DENIED_TOOL,
    LOOKALIKES,
    TOKEN,
    Variant,
)
from devstack.redis_server import running_redis
from devstack.stack import Stack, mcp_stack, on_transport
from tests.support.reliability import record

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
# What delete_app answers when it runs (examples/demo_upstream.py): must never come back.
DENIED_TOOL_OUTPUT = "Deleted ECS service"
PROTOCOL_VERSION = "2025-11-25"

# README table: data.reason -> (HTTP status, JSON-RPC code).
DOCUMENTED = {
    "denied_by_rule": (403, -32051),
    "denied_by_default": (403, -32051),
    "no_grant_identity": (403, -32051),
    "malformed_request": (400, -32600),
    "header_mismatch": (400, -32020),
    "unsupported_media_type": (415, -32600),
    "partial_body": (413, -32600),
    "method_not_allowed": (405, -32600),
    "unsupported_protocol_version": (400, -32022),
}


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
    names = {name for name, _ in variant.headers}
    # A variant's own header replaces the session's (e.g. another protocol version).
    headers = [(k, x) for k, x in corpus.base_headers().items() if k not in names]
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
