"""The HTTP ext_authz listener (authz/authz_http.py) on real sockets: HTTP/1.1 framing,
bounds, identity headers, the reply both transports share, TLS, drain on SIGTERM, and
caller sets, step-up and list filtering through the real Envoy in HTTP mode.

Through Envoy, the end-to-end suites (test_e2e, test_bypass, test_listing_e2e, test_faults,
test_operations, test_approvals_e2e) run on this transport too (the ``transport`` fixture).
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import httpx
import pytest
import yaml

from authz import authz_http, envoy, reply, settings, tls
from authz.cli import main
from authz.decision import Decision, Reason
from authz.engine import Engine
from authz.metrics import Metrics
from authz.policy import compile_policy
from authz.store import open_store
from authz.tls import TlsFiles
from devstack.redis_server import RedisServer
from devstack.stack import (
    ENVOY_CONFIGS,
    authz_proc,
    envoy_config,
    envoy_proc,
    free_port,
    running,
    upstream_proc,
    wait_ready,
)
from tests.test_grpc_tls import Pki, pki  # noqa: F401 (the fixture)

POLICY_DOC: dict[str, Any] = {
    "version": "1",
    "default": "deny",
    "tools": {
        "containerize_app": {"action": "allow"},
        "delete_app": {"action": "deny", "reason": "needs a human"},
    },
}


def call(name: str, id_: int = 1) -> bytes:
    body = {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": name}}
    return json.dumps(body).encode()


def request(body: bytes, *headers: str, method: str = "POST") -> bytes:
    """A check request as Envoy sends it: the client's method, path, headers and body."""
    lines = [
        f"{method} /mcp HTTP/1.1",
        "host: mcp.example",
        "content-type: application/json",
        "accept: application/json, text/event-stream",
        "mcp-protocol-version: 2025-11-25",
        f"content-length: {len(body)}",
        "authorization: Bearer t",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Answer:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class _Responses:
    """httptools' response parser collecting every answer on a connection."""

    def __init__(self) -> None:
        self.done: list[Answer] = []
        self.current = Answer()
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.current = Answer()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self.current.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.done.append(self.current)


async def exchange(
    port: int, data: bytes | Sequence[bytes], expect: int, *, ssl_context: Any = None
) -> tuple[list[Answer], bool]:
    """Send ``data`` (one write, or one write per piece) and read ``expect`` answers;
    also whether the server closed the connection right after them."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_context)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    responses = _Responses()
    pieces = [data] if isinstance(data, bytes) else list(data)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            if len(pieces) > 1:
                await asyncio.sleep(0)
    except ConnectionError:
        pass  # refused mid-request: the answer is still there to read
    closed = False
    while len(responses.done) < expect:
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        if not chunk:
            closed = True
            break
        responses.parser.feed_data(chunk)
    if not closed:
        try:
            closed = await asyncio.wait_for(reader.read(1), 0.3) == b""
        except TimeoutError:
            closed = False
    writer.close()
    return responses.done, closed


@pytest.fixture
async def port() -> AsyncIterator[int]:
    engine = Engine(compile_policy(POLICY_DOC), open_store("memory://"))
    listener = authz_http.Listener(authz_http.checks(engine, Metrics()))
    number = free_port()
    await listener.start("127.0.0.1", number, reuse_port=False)
    yield number
    await listener.stop(1.0)


async def test_keep_alive_answers_each_request_on_one_connection(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    responses = _Responses()
    for body, status in ((call("containerize_app"), 200), (call("delete_app"), 403)) * 2:
        writer.write(request(body))
        expected = len(responses.done) + 1
        while len(responses.done) < expected:
            responses.parser.feed_data(await asyncio.wait_for(reader.read(65536), 10))
        assert responses.done[-1].status == status
    writer.close()
    allowed, denied = responses.done[:2]
    assert allowed.headers[reply.GRANT_HEADER].startswith("b-")
    assert allowed.body == b""
    assert denied.headers["content-type"] == "application/json"
    assert denied.headers[reply.REASON_HEADER].startswith("policy violation:")
    error = json.loads(denied.body)["error"]
    assert error["data"]["reason"] == "denied_by_rule"
    assert denied.headers["x-mcp-authz-log-reason"] == "denied_by_rule"


async def test_pipelined_requests_are_answered_in_order(port: int) -> None:
    bodies = [
        (call("containerize_app", 1), 200),
        (call("delete_app", 2), 403),
        (b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":1}}', 400),
        (call("containerize_app", 4), 200),
        (call("some_other_tool", 5), 403),
    ]
    answers, closed = await exchange(port, b"".join(request(b) for b, _ in bodies), len(bodies))
    assert [a.status for a in answers] == [status for _, status in bodies]
    ids = [json.loads(a.body)["id"] for a in answers if a.body]
    assert ids == [2, 3, 5]
    assert not closed


async def test_answers_wait_for_earlier_slower_ones(port: int) -> None:
    """A request whose decision waits on the store is still answered before the next."""

    class SlowStore:
        def __init__(self) -> None:
            self.inner = open_store("memory://")

        async def acquire(self, *args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0.3)
            return await self.inner.acquire(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    doc = {
        **POLICY_DOC,
        "tools": {
            **POLICY_DOC["tools"],
            "limited": {"limits": [{"counter": "c", "window": "minute", "max": 5}]},
        },
    }
    listener = authz_http.Listener(
        authz_http.checks(Engine(compile_policy(doc), SlowStore()), Metrics())
    )
    slow_port = free_port()
    await listener.start("127.0.0.1", slow_port, reuse_port=False)
    try:
        data = request(call("limited", 1)) + request(call("delete_app", 2))
        answers, _ = await exchange(slow_port, data, 2)
    finally:
        await listener.stop(1.0)
    assert [a.status for a in answers] == [200, 403]
    assert answers[0].headers["x-mcp-authz-log-tool"] == "limited"


async def test_request_split_across_many_segments(port: int) -> None:
    data = request(call("delete_app", 7))
    answers, _ = await exchange(port, [data[i : i + 3] for i in range(0, len(data), 3)], 1)
    assert answers[0].status == 403
    assert json.loads(answers[0].body)["id"] == 7


@pytest.mark.parametrize(
    "data",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"POST /mcp HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 7\r\n\r\nhello",
        b"POST /mcp HTTP/1.1\r\nbad header line\r\n\r\n",
        b"POST /mcp HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["garbage", "two-lengths", "no-colon", "bad-chunk"],
)
async def test_malformed_http_gets_400_and_the_connection_closes(port: int, data: bytes) -> None:
    answers, closed = await exchange(port, data, 1)
    assert [a.status for a in answers] == [400]
    assert closed


async def test_answers_before_a_malformed_request_still_come_first(port: int) -> None:
    answers, closed = await exchange(port, request(call("delete_app")) + b"GARBAGE\r\n\r\n", 2)
    assert [a.status for a in answers] == [403, 400]
    assert closed


async def test_oversized_headers_are_refused(port: int) -> None:
    big = "x-big: " + "a" * (authz_http.MAX_HEADER_BYTES + 1)
    answers, closed = await exchange(port, request(call("containerize_app"), big), 1)
    assert [a.status for a in answers] == [431] and closed
    many = [f"x-h{i}: v" for i in range(authz_http.MAX_HEADERS + 1)]
    answers, closed = await exchange(port, request(call("containerize_app"), *many), 1)
    assert [a.status for a in answers] == [431] and closed


async def test_oversized_body_is_refused(port: int) -> None:
    body = b" " * (authz_http.MAX_BODY_BYTES + 1)
    answers, closed = await exchange(port, request(body), 1)
    assert [a.status for a in answers] == [413] and closed
    at_bound = call("delete_app").ljust(authz_http.MAX_BODY_BYTES)
    answers, _ = await exchange(port, request(at_bound), 1)
    assert [a.status for a in answers] == [403]


async def test_connection_close_is_honoured(port: int) -> None:
    data = request(call("containerize_app"), "connection: close") + request(call("delete_app"))
    answers, closed = await exchange(port, data, 2)
    assert [a.status for a in answers] == [200]
    assert answers[0].headers["connection"] == "close"
    assert closed


async def test_a_failing_answer_closes_the_connection_unanswered() -> None:
    """A bug leaves Envoy without an answer (its status_on_error, fail closed), never with
    a partial or misplaced one."""

    async def broken(_: Any) -> reply.Reply:
        raise RuntimeError("bug")

    listener = authz_http.Listener(broken)
    number = free_port()
    await listener.start("127.0.0.1", number, reuse_port=False)
    try:
        answers, closed = await exchange(number, request(call("containerize_app")) * 2, 1)
    finally:
        await listener.stop(1.0)
    assert answers == [] and closed


async def test_client_copies_of_our_headers_are_listed_for_removal(port: int) -> None:
    data = request(call("containerize_app"), "x-mcp-authz-dry-run: forged", "x-mcp-authz-x: 1")
    (answer,), _ = await exchange(port, data, 1)
    removed = answer.headers[authz_http.REMOVE_HEADER].split(",")
    # The marks go from every allowed request they do not concern, sent or not.
    assert sorted(removed) == sorted(
        [
            "x-mcp-authz-dry-run",
            reply.LIST_HEADER,
            reply.SESSION_HEADER,
            reply.TASKS_HEADER,
            "x-mcp-authz-x",
        ]
    )
    assert "x-mcp-authz-dry-run" not in answer.headers


# --- the one reply, two encodings -----------------------------------------------------------


def _parsed(data: bytes) -> Answer:
    responses = _Responses()
    responses.parser.feed_data(data)
    (answer,) = responses.done
    return answer


DECISIONS = [
    Decision(reason=Reason.ALLOWED, grant="g-1", tool="t"),
    Decision(reason=Reason.ALLOWED, grant="g-1", tool="t", fail_open=True),
    Decision(
        reason=Reason.ALLOWED, grant="g", tool="t", would_deny=Reason.RATE_LIMITED, dry_run=True
    ),
    Decision(reason=Reason.DENIED_BY_RULE, message="policy violation: no", ids=(1,), tool="t"),
    Decision(
        reason=Reason.RATE_LIMITED, message="policy violation: slow", retry_after_s=7, ids=(2,)
    ),
    Decision(reason=Reason.STORE_UNAVAILABLE, message="policy violation: store", ids=(3,)),
    Decision(reason=Reason.MALFORMED, message="policy violation: malformed request: x"),
    Decision(reason=Reason.ALLOWED, grant="g", lists=("tools/list",), caller="ops"),
    Decision(
        reason=Reason.ALLOWED,
        grant="g",
        lists=("tools/list", "prompts/list"),
        caller="ops",
        caller_sets=("auditors", "ops"),
    ),
    Decision(
        reason=Reason.CALLER_NOT_PERMITTED,
        message="policy violation: tool 'd' is not permitted for this caller",
        ids=(4,),
        tool="d",
        challenge='Bearer error="insufficient_scope", scope="ecs:write"',
    ),
    Decision(
        reason=Reason.UNSUPPORTED_VERSION,
        message="policy violation: unsupported protocol version",
        ids=(5,),
        requested_version="1999-01-01",
    ),
]


@pytest.mark.parametrize(
    "decision", DECISIONS, ids=[f"{n}-{d.reason.code}" for n, d in enumerate(DECISIONS)]
)
def test_both_transports_encode_the_same_reply(decision: Decision) -> None:
    headers = {
        "x-mcp-authz-grant": "forged",
        "x-mcp-authz-other": "x",
        "x-mcp-authz-list": "forged",
        "x-mcp-authz-callers": "admins",
    }
    grpc = envoy.check_response(decision, headers)
    http = _parsed(authz_http.encode(reply.of(decision, headers)))
    metadata = {k[len(authz_http.METADATA_HEADER_PREFIX) :]: v for k, v in http.headers.items()}
    for key, value in grpc.dynamic_metadata.items():
        assert metadata[key] == value
    if decision.allowed:
        assert http.status == 200 and grpc.status.code == 0
        ok = grpc.ok_response
        for option in [*ok.headers, *ok.response_headers_to_add]:
            assert http.headers[option.header.key] == option.header.value
        removed = http.headers.get(authz_http.REMOVE_HEADER, "")
        assert sorted(filter(None, removed.split(","))) == sorted(ok.headers_to_remove)
        return
    denied = grpc.denied_response
    wire = authz_http.UNAVAILABLE_WIRE_STATUS if denied.status.code >= 500 else denied.status.code
    assert http.status == wire
    for option in denied.headers:
        assert http.headers[option.header.key] == option.header.value
    assert http.body == denied.body.encode()


def test_header_values_cannot_break_the_response() -> None:
    decision = Decision(reason=Reason.ALLOWED, grant="g", tool="evil\r\nx-injected: 1")
    answer = _parsed(authz_http.encode(reply.of(decision, {})))
    assert "x-injected" not in answer.headers
    assert answer.headers["x-mcp-authz-log-tool"] == "evil??x-injected: 1"


def test_head_is_answered_without_a_body() -> None:
    decision = Decision(reason=Reason.DENIED_BY_RULE, message="policy violation: no")
    full = authz_http.encode(reply.of(decision, {}))
    head = authz_http.encode(reply.of(decision, {}), head=True)
    assert full.startswith(head) and head.endswith(b"\r\n\r\n")
    assert b"content-length: %d" % len(decision.reply_body()) in head


# --- identity headers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("xfcc", "principal"),
    [
        ("By=spiffe://mesh/envoy;Hash=ab12;URI=spiffe://mesh/agent-a", "spiffe://mesh/agent-a"),
        ('Hash=ab12;Subject="CN=agent,O=Example, Inc.";URI=', "CN=agent,O=Example, Inc."),
        ('By=spiffe://e;Subject="CN=a\\"b;c=d"', 'CN=a"b;c=d'),
        # Earlier elements come from proxies in front; the last is this Envoy's.
        ("URI=spiffe://front/proxy,By=spiffe://e;URI=spiffe://mesh/b", "spiffe://mesh/b"),
        ("By=spiffe://mesh/envoy;Hash=ab12", ""),  # By is Envoy's own certificate
        ("", ""),
    ],
)
def test_xfcc_principal(xfcc: str, principal: str) -> None:
    assert authz_http.xfcc_principal(xfcc) == principal


def _payload(claims: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")


async def _grant(doc: dict[str, Any], *headers: str) -> Answer:
    listener = authz_http.Listener(
        authz_http.checks(Engine(compile_policy(doc), open_store("memory://")), Metrics())
    )
    number = free_port()
    await listener.start("127.0.0.1", number, reuse_port=False)
    try:
        (answer,), _ = await exchange(number, request(call("containerize_app"), *headers), 1)
    finally:
        await listener.stop(1.0)
    return answer


async def test_jwt_payload_header_gives_the_grant() -> None:
    doc = {**POLICY_DOC, "grants": {"source": "jwt", "claim": "sub", "payload_in_metadata": "p"}}
    allowed = await _grant(doc, f"{authz_http.JWT_PAYLOAD_HEADER}: {_payload({'sub': 'alice'})}")
    assert allowed.status == 200 and allowed.headers[reply.GRANT_HEADER] == "alice"
    for broken in ("%%%", _payload(["not", "an", "object"]), _payload({"aud": "x"})):
        denied = await _grant(doc, f"{authz_http.JWT_PAYLOAD_HEADER}: {broken}")
        assert json.loads(denied.body)["error"]["data"]["reason"] == "no_grant_identity"


async def test_mtls_principal_from_xfcc_gives_the_grant() -> None:
    doc = {**POLICY_DOC, "grants": {"source": "mtls"}}
    xfcc = "By=spiffe://mesh/envoy;Hash=ab;URI=spiffe://mesh/agent-a"
    allowed = await _grant(doc, f"{authz_http.CLIENT_CERT_HEADER}: {xfcc}")
    assert allowed.headers[reply.GRANT_HEADER] == "spiffe://mesh/agent-a"
    denied = await _grant(doc)
    assert json.loads(denied.body)["error"]["data"]["reason"] == "no_grant_identity"


# --- TLS, the command line, drain --------------------------------------------------------------


async def test_mtls_on_the_listener(pki: Pki) -> None:  # noqa: F811
    files = TlsFiles(
        cert=pki.path("server.pem"),
        key=pki.path("server.key"),
        client_ca=pki.path("client-ca.pem"),
    )
    engine = Engine(compile_policy(POLICY_DOC), open_store("memory://"))
    listener = authz_http.Listener(authz_http.checks(engine, Metrics()), tls.FollowedContext(files))
    number = free_port()
    await listener.start("127.0.0.1", number, reuse_port=False)
    client = ssl.create_default_context(cafile=pki.path("ca.pem"))
    client.check_hostname = False
    try:
        # No client certificate: refused in the handshake (TLS 1.3: right after it).
        try:
            refused, _ = await exchange(number, request(call("delete_app")), 1, ssl_context=client)
        except (ssl.SSLError, ConnectionError):
            refused = []
        assert refused == []
        client.load_cert_chain(pki.path("client.pem"), pki.path("client.key"))
        answers, _ = await exchange(number, request(call("delete_app")), 1, ssl_context=client)
    finally:
        await listener.stop(1.0)
    assert [a.status for a in answers] == [403]


def test_settings_of_the_http_transport() -> None:
    """--authz-http and MCP_AUTHZ_AUTHZ_HTTP fill one setting; --grpc off empties the gRPC
    address (no gRPC listener), and only goes with --authz-http."""
    base = {"policy": "p.json", "store": "memory"}
    from_env = settings.from_arguments(base, {"MCP_AUTHZ_AUTHZ_HTTP": "127.0.0.1:9003"})
    assert from_env.authz_http_address == "127.0.0.1:9003"
    assert from_env.grpc_address == "127.0.0.1:9001"
    alone = settings.from_arguments({**base, "grpc": "off", "authz_http": "127.0.0.1:1"}, {})
    assert (alone.grpc_address, alone.authz_http_address) == ("", "127.0.0.1:1")
    with pytest.raises(settings.SettingsError, match="--grpc off needs --authz-http"):
        settings.from_arguments(base, {"MCP_AUTHZ_GRPC": "off"})


def test_serve_needs_an_ext_authz_listener(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY_DOC))
    args = ["serve", "--policy", str(policy), "--store", "memory", "--grpc", "off"]
    assert main(args) == 2


def test_sigterm_drains_the_http_listener_without_dropping_a_check(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY_DOC))
    grpc_port, check_port, http_port = free_port(), free_port(), free_port()
    proc = authz_proc(
        tmp_path,
        policy,
        grpc_port,
        http_port,
        ["--store", "memory"],
        "--drain-seconds",
        "1.5",
        "--grpc",
        "off",  # the last --grpc wins: ext_authz over HTTP alone
        authz_http=check_port,
    )
    with running(proc, check_port):
        wait_ready(f"http://127.0.0.1:{http_port}/readyz")
        with socket.create_connection(("127.0.0.1", check_port)) as sock:
            sock.sendall(request(call("containerize_app")))
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            assert proc.popen is not None
            proc.popen.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert httpx.get(f"http://127.0.0.1:{http_port}/readyz").status_code == 503
            # Still answered while draining, on the open connection and on a new one.
            sock.sendall(request(call("delete_app")))
            assert sock.recv(65536).startswith(b"HTTP/1.1 403")
            with socket.create_connection(("127.0.0.1", check_port)) as fresh:
                fresh.sendall(request(call("containerize_app")))
                assert fresh.recv(65536).startswith(b"HTTP/1.1 200")
            assert proc.popen.wait(10) == 0
            assert sock.recv(65536) == b""  # closed once stopped
    assert '"message":"stopped"' in proc.output().replace(" ", "")


def test_workers_share_the_http_listener(tmp_path: Path, redis_server: RedisServer) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY_DOC))
    grpc_port, check_port, http_port = free_port(), free_port(), free_port()
    proc = authz_proc(
        tmp_path,
        policy,
        grpc_port,
        http_port,
        ["--redis", redis_server.url],
        "--workers",
        "2",
        authz_http=check_port,
    )
    with running(proc, check_port):
        deadline = time.monotonic() + 20
        while proc.output().count("serving ext_authz on") < 2:
            assert time.monotonic() < deadline, proc.output()[-2000:]
            time.sleep(0.1)
        connections = [socket.create_connection(("127.0.0.1", check_port)) for _ in range(8)]
        try:
            for sock in connections:
                sock.sendall(request(call("containerize_app")))
            assert all(sock.recv(65536).startswith(b"HTTP/1.1 200") for sock in connections)
        finally:
            for sock in connections:
                sock.close()
        assert proc.popen is not None
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.popen.wait(30) == 0


# Caller sets over the forwarded payload: operators hold the ecs:write scope; delete_app is
# theirs alone, so anyone else gets the step-up challenge and does not see it listed.
CALLERS_DOC: dict[str, Any] = {
    **POLICY_DOC,
    "grants": {"source": "jwt", "claim": "sub"},
    "callers": {"operators": {"scopes": ["ecs:write"]}},
    "resource_metadata": "https://mcp.example/.well-known/oauth-protected-resource/mcp",
    "tools": {"containerize_app": {}, "delete_app": {"callers": ["operators"]}},
}


def _access_log(path: Path, wanted: int) -> list[dict[str, Any]]:
    """Envoy's JSON access log lines of MCP requests (it flushes on a timer)."""
    lines: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while len(lines) < wanted and time.monotonic() < deadline:
        time.sleep(0.1)
        lines = [json.loads(x) for x in path.read_text().splitlines() if x[:1] == "{"]
        lines = [line for line in lines if line.get("authz_decision")]
    return lines


async def test_callers_through_envoy_jwt_authn_forwarded_payload(tmp_path: Path) -> None:
    """Real Envoy, envoy-http.yaml with the jwt_authn filter its comment describes: the grant
    and the caller set come from the verified token (a client's own x-jwt-payload never
    counts); a step-up denial reaches the client with its challenge; list responses go
    through the list filter on the gRPC port, per caller; the access log names the caller."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    from tests.support.clients import sdk_list_tools

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]})

    def token(sub: str, scope: str = "") -> str:
        claims = {"iss": "https://idp.test/", "aud": "mcp", "sub": sub, "exp": time.time() + 600}
        if scope:
            claims["scope"] = scope
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(CALLERS_DOC))
    listen, admin, upstream, grpc_port, check_port, http_port = (free_port() for _ in range(6))
    record = tmp_path / "record.jsonl"
    config_path = envoy_config(
        tmp_path,
        listen=listen,
        authz=grpc_port,
        authz_http=check_port,
        upstream=upstream,
        admin=admin,
        source=ENVOY_CONFIGS["http"],
    )
    config = yaml.safe_load(config_path.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = hcm["typed_config"]["http_filters"]
    jwt_filter = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3."
            "JwtAuthentication",
            "providers": {
                "idp": {
                    "issuer": "https://idp.test/",
                    "audiences": ["mcp"],
                    "local_jwks": {"inline_string": jwks},
                    "forward": True,
                    "forward_payload_header": authz_http.JWT_PAYLOAD_HEADER,
                }
            },
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "idp"}}],
        },
    }
    filters.insert(1, jwt_filter)  # after header_mutation, before ext_authz
    config_path.write_text(yaml.safe_dump(config))
    authz = authz_proc(
        tmp_path, policy, grpc_port, http_port, ["--store", "memory"], authz_http=check_port
    )
    envoy = envoy_proc(tmp_path, config_path)
    with (
        running(upstream_proc(tmp_path, upstream, record), upstream),
        running(authz, check_port),
        running(envoy, listen),
    ):
        wait_ready(f"http://127.0.0.1:{admin}/ready")
        url = f"http://127.0.0.1:{listen}/mcp"
        headers = {
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            "mcp-protocol-version": "2025-11-25",
        }
        forged = _payload({"sub": "mallory", "scope": "ecs:write"})
        allowed = httpx.post(
            url,
            content=call("containerize_app"),
            headers={
                **headers,
                "authorization": f"Bearer {token('alice')}",
                authz_http.JWT_PAYLOAD_HEADER: forged,
            },
        )
        assert allowed.status_code != 403, allowed.text
        step_up = httpx.post(
            url,
            content=call("delete_app"),
            headers={**headers, "authorization": f"Bearer {token('bob')}"},
        )
        assert step_up.status_code == 403
        assert step_up.json()["error"]["data"]["reason"] == "caller_not_permitted"
        assert step_up.headers.get_list("www-authenticate") == [
            f'Bearer error="insufficient_scope", scope="ecs:write", '
            f'resource_metadata="{CALLERS_DOC["resource_metadata"]}"'
        ]
        operator = httpx.post(
            url,
            content=call("delete_app"),
            headers={**headers, "authorization": f"Bearer {token('carol', 'ecs:write')}"},
        )
        assert operator.status_code != 403, operator.text
        no_token = httpx.post(
            url,
            content=call("containerize_app"),
            headers={**headers, authz_http.JWT_PAYLOAD_HEADER: forged},
        )
        assert no_token.status_code == 401
        # The list filter (ext_proc, gRPC) shows each caller what its sets may use.
        listed_bob = await sdk_list_tools(url, {"authorization": f"Bearer {token('bob')}"})
        listed_carol = await sdk_list_tools(
            url, {"authorization": f"Bearer {token('carol', 'ecs:write')}"}
        )
        assert set(listed_bob) == {"containerize_app"}
        assert set(listed_carol) == {"containerize_app", "delete_app"}
        logged = _access_log(envoy.log, 3)
    reached = [json.loads(line) for line in record.read_text().splitlines() if line]
    calls = [r["grant"] for r in reached if (r["jsonrpc"] or [{}])[0].get("method") == "tools/call"]
    assert calls == ["alice", "carol"]
    audit = [json.loads(x) for x in authz.output().splitlines() if '"decision"' in x]
    decided = [(e["grant"], e["decision"], e["caller"]) for e in audit if e.get("tool")]
    assert decided == [
        ("alice", "allow", None),
        ("bob", "deny", None),
        ("carol", "allow", "operators"),
    ]
    by_tool = {(line["authz_tool"], line["authz_decision"]): line for line in logged}
    assert by_tool[("delete_app", "allow")]["authz_caller"] == "operators"
    assert by_tool[("delete_app", "deny")]["authz_reason"] == "caller_not_permitted"
