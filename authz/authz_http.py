"""Envoy's HTTP ext_authz mode (``http_service``): the check as a plain HTTP/1.1 exchange.

In this mode Envoy sends each check as an HTTP request of its own: the client's method and
path, the headers its ``allowed_headers`` let through, and the body. A 200 answer allows;
its headers named in ``allowed_upstream_headers`` are set on the upstream request and
``x-envoy-auth-headers-to-remove`` lists headers taken off it. Any other status denies and
reaches the client with the headers ``allowed_client_headers`` lets through and the body.
Headers named in ``dynamic_metadata_from_headers`` become the access log's fields.

A plain asyncio protocol with httptools (llhttp) parsing, no web framework: a framework's
routing, request objects and middleware would cost more than the check. The same engine,
metrics and audit line as the gRPC transport (:func:`authz.check.answer`), the same
:class:`authz.reply.Reply`, only encoded as HTTP.

Identity in this mode arrives in headers the shipped Envoy config sets after removing any
client copy: jwt_authn's verified payload (``forward_payload_header``, base64url JSON) and
the mTLS peer in ``x-forwarded-client-cert`` (XFCC).

Bounds, per request: ``MAX_HEADERS`` header lines, ``MAX_HEADER_BYTES`` of URL, names and
values, ``MAX_BODY_BYTES`` of body (the shipped Envoy's ``max_request_bytes``, which with
``allow_partial_message: false`` is the most it ever sends); per connection,
``MAX_PIPELINED`` requests waiting for their answers before reading pauses. Malformed HTTP
gets 400, oversized headers 431, an oversized body 413, and the connection is closed after
the answers before it are written, in order.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from http import HTTPStatus
from typing import Any, cast

import httptools

from authz import check, grants, reply, tls
from authz.engine import Engine
from authz.mcp import HttpRequest
from authz.metrics import Metrics

log = logging.getLogger("mcp_authz")

MAX_HEADERS = 128
MAX_HEADER_BYTES = 96 * 1024
MAX_BODY_BYTES = 1024 * 1024
MAX_PIPELINED = 32

# Set by Envoy (jwt_authn's forward_payload_header; the HTTP connection manager's
# forward_client_cert_details), never by the client: envoy/envoy-http.yaml removes any
# client copy before they are set.
JWT_PAYLOAD_HEADER = "x-jwt-payload"
CLIENT_CERT_HEADER = "x-forwarded-client-cert"
# Envoy removes the headers this lists from the upstream request (gRPC: headers_to_remove).
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
# The status a 503 denial (store unavailable, internal error) is sent with; see encode().
UNAVAILABLE_WIRE_STATUS = 424
# The reply's metadata fields as headers, which Envoy turns into dynamic metadata
# (dynamic_metadata_from_headers) under the same name: "x-mcp-authz-log-decision" ...
METADATA_HEADER_PREFIX = "x-mcp-authz-log-"
_METADATA_PREFIX = METADATA_HEADER_PREFIX.encode()
# Every status line an answer can start with, formatted once.
_STATUS_LINES = {
    status.value: b"HTTP/1.1 %d %s" % (status.value, status.phrase.encode())
    for status in HTTPStatus
}

_REFUSALS = {
    400: b"malformed HTTP request\n",
    413: b"request body over the ext_authz bound\n",
    431: b"request headers over the ext_authz bound\n",
}


class _VerifiedPayload(Mapping[str, Any]):
    """jwt_authn's metadata as this mode rebuilds it from the one forwarded payload.

    Over gRPC, jwt_authn's metadata holds the payload under the policy's
    ``payload_in_metadata`` name; here there is exactly one verified payload, so it answers
    to whatever name the policy looks it up by.
    """

    def __init__(self, payload: Mapping[str, Any]) -> None:
        self._payload = payload

    def __getitem__(self, key: str) -> Mapping[str, Any]:
        return self._payload

    def __iter__(self) -> Iterator[str]:
        return iter(("payload",))

    def __len__(self) -> int:
        return 1


def jwt_metadata(header: str) -> dict[str, Mapping[str, Any]]:
    """The metadata a forwarded JWT payload stands for; empty when it does not decode
    (or when there is none: no header)."""
    payload = grants.decoded_payload(header) if header else {}
    return {grants.JWT_NAMESPACE: _VerifiedPayload(payload)} if payload else {}


def _xfcc_elements(value: str) -> list[list[tuple[str, str]]]:
    """XFCC split into elements of (key, value) pairs.

    Elements are separated by ``,``, pairs by ``;``, a key from its value by the first
    ``=``; a value may be double-quoted, and then holds ``,`` ``;`` ``=`` and ``\\"``. No
    library parses this format; it is a small state machine over the characters.
    """
    elements: list[list[tuple[str, str]]] = [[]]
    key: str | None = None
    text: list[str] = []
    quoted = escaped = False
    for ch in value:
        if quoted:
            if escaped:
                text.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            else:
                text.append(ch)
        elif ch == '"':
            quoted = True
        elif ch == "=" and key is None:
            key, text = "".join(text).strip(), []
        elif ch in ";,":
            if key is not None:
                elements[-1].append((key.lower(), "".join(text).strip()))
            key, text = None, []
            if ch == ",":
                elements.append([])
        else:
            text.append(ch)
    if key is not None:
        elements[-1].append((key.lower(), "".join(text).strip()))
    return [element for element in elements if element]


def xfcc_principal(value: str) -> str:
    """The client certificate's principal in an XFCC header, as Envoy reports it over gRPC
    (``source.principal``): its first URI SAN, else its subject.

    The last element is the one this Envoy added (any earlier ones come from proxies in
    front of it); its ``By`` field names Envoy's own certificate, never the client.
    """
    elements = _xfcc_elements(value) if value else []  # no header (no client certificate)
    if not elements:
        return ""
    fields = elements[-1]
    for name in ("uri", "subject"):
        for key, text in fields:
            if key == name and text:
                return text
    return ""


def _value(text: str) -> bytes:
    """A header value that cannot break the response: printable ASCII, bounded
    (:func:`authz.reply.header_text`, which passes such text through unchanged)."""
    return reply.header_text(text).encode()


def encode(answer: reply.Reply, *, head: bool = False, close: bool = False) -> bytes:
    """A reply as Envoy's HTTP ext_authz mode reads it (see the module docstring)."""
    status = answer.status
    if status >= 500:
        # Envoy takes a 5xx from the authorization server for its own failure and answers
        # status_on_error with no body: a 503 denial travels as 424, which the shipped
        # config's local_reply_config turns back into 503, body and headers kept.
        status = UNAVAILABLE_WIRE_STATUS
    lines = [_STATUS_LINES[status]]
    if answer.allowed:
        # One header serves both ways: the dry-run and fail-open markers are in both lists,
        # and Envoy's allowed_upstream_headers and allowed_client_headers_on_success pick
        # each where it goes.
        headers = dict(answer.upstream_headers)
        if answer.remove_headers:
            headers[REMOVE_HEADER] = ",".join(answer.remove_headers)
    else:
        headers = dict(answer.client_headers)
    lines.extend(b"%s: %s" % (name.encode(), _value(value)) for name, value in headers.items())
    lines.extend(
        b"%s%s: %s" % (_METADATA_PREFIX, name.encode(), _value(value))
        for name, value in answer.metadata
    )
    body = b"" if answer.allowed else answer.body
    lines.append(b"content-length: %d" % len(body))
    if close:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else body)


def _refusal(status: int) -> bytes:
    body = _REFUSALS[status]
    phrase = HTTPStatus(status).phrase.encode()
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (status, phrase, len(body), body)
    )


Decide = Callable[[HttpRequest], Awaitable[reply.Reply]]


def checks(engine: Engine, metrics: Metrics) -> Decide:
    """The service's checks: :func:`authz.check.answer` on this engine and metrics (a
    partial, not a wrapping coroutine: one frame less on every check)."""
    return functools.partial(check.answer, engine, metrics)


class _Refused(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class _Connection(asyncio.Protocol):
    """One Envoy connection: parse requests, check each, answer in the order received."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.last: asyncio.Task[None] | None = None  # the latest answer, written last
        self.waiting = 0  # requests parsed whose answers are not written yet
        self.paused = False
        self.done = False  # refused or closing: read no further requests
        self._reset()

    def _reset(self) -> None:
        self.headers: dict[str, str] = {}
        self.header_count = 0
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_bytes = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.listener.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.connections.discard(self)
        self.done = True

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._refuse(cause.status if isinstance(cause, _Refused) else 400)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._refuse(400)

    def eof_received(self) -> bool:
        # Answer what was asked, then close (returning False closes the transport once
        # written, which would cut answers still being decided).
        self.done = True
        self._after(self.last, b"", close=True)
        return True

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        # The path is not read (the policy decides by the body and headers), only bounded.
        self.header_bytes += len(url)
        if self.header_bytes > MAX_HEADER_BYTES:
            raise _Refused(431)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        self.header_bytes += len(name) + len(value)
        if self.header_count > MAX_HEADERS or self.header_bytes > MAX_HEADER_BYTES:
            raise _Refused(431)
        key = name.decode("latin-1").lower()
        text = value.decode("utf-8", "replace")
        # Repeated headers join with "," as Envoy's gRPC header map does.
        self.headers[key] = f"{self.headers[key]},{text}" if key in self.headers else text

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > MAX_BODY_BYTES:
            raise _Refused(413)
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.done:  # pipelined after a request that closes the connection
            return
        headers = self.headers
        http = HttpRequest(
            method=self.parser.get_method().decode("latin-1"),
            headers=headers,
            body=b"".join(self.body),
            request_id=headers.get("x-request-id", ""),
            peer_principal=xfcc_principal(headers.get(CLIENT_CERT_HEADER, "")),
            metadata=jwt_metadata(headers.get(JWT_PAYLOAD_HEADER, "")),
        )
        keep_alive = self.parser.should_keep_alive()
        if not keep_alive:
            self.done = True
        self.waiting += 1
        if self.waiting >= MAX_PIPELINED and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self.last = asyncio.get_running_loop().create_task(
            self._answer(http, self.last, head=http.method == "HEAD", close=not keep_alive)
        )

    # answers

    async def _answer(
        self, http: HttpRequest, previous: asyncio.Task[None] | None, *, head: bool, close: bool
    ) -> None:
        close = close or self.listener.closing
        try:
            data = encode(await self.listener.decide(http), head=head, close=close)
        except Exception as exc:  # a bug: no answer, and Envoy's status_on_error (fail closed)
            log.error("ext_authz HTTP answer failed: %s", type(exc).__name__)
            data, close = b"", True
        if previous is not None:
            await previous
        self._write(data, close=close)
        self.waiting -= 1
        if self.paused and self.waiting < MAX_PIPELINED // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def _refuse(self, status: int) -> None:
        log.warning("ext_authz HTTP request refused with %d", status)
        self.done = True
        self._after(self.last, _refusal(status), close=True)

    def _after(self, previous: asyncio.Task[None] | None, data: bytes, *, close: bool) -> None:
        async def write() -> None:
            if previous is not None:
                await previous
            self._write(data, close=close)

        self.last = asyncio.get_running_loop().create_task(write())

    def _write(self, data: bytes, *, close: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if data:
            transport.write(data)
        if close:
            transport.close()

    async def finish(self) -> None:
        """Answer what was received, then close (the listener is stopping)."""
        self.done = True
        if self.last is not None:
            await self.last
        self._write(b"", close=True)


class Listener:
    """The HTTP ext_authz listener: its connections, to drain them when stopping.

    ``decide`` answers one check: :func:`checks` for the service; the no-op benchmark
    floor (bench/noop_authz.py) passes one that allows at once, so it measures this same
    protocol code and nothing else.
    """

    def __init__(self, decide: Decide, tls_context: tls.FollowedContext | None = None) -> None:
        self.decide = decide
        self.tls = tls_context
        self.connections: set[_Connection] = set()
        self.closing = False
        self.server: asyncio.Server | None = None

    def protocol(self) -> _Connection:
        if self.tls is not None:
            self.tls.refresh()  # before this connection's handshake
        return _Connection(self)

    async def start(self, host: str, port: int, *, reuse_port: bool) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self.protocol,
            host,
            port,
            reuse_port=reuse_port or None,
            ssl=self.tls.context if self.tls is not None else None,
        )

    async def stop(self, grace: float) -> None:
        """Stop accepting, answer every request received, close every connection; give
        up on answers still pending after ``grace`` seconds."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        pending = [asyncio.create_task(c.finish()) for c in list(self.connections)]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
