"""Envoy's ext_proc v3 stream, for list responses only: the wire side of authz.listing.

Envoy opens an ``envoy.service.ext_proc.v3.ExternalProcessor/Process`` stream only on the
route of requests ext_authz allowed as list requests (it marks them with the
``x-mcp-authz-list`` header; see envoy/envoy.yaml); every other request and its response
(tool results, SSE streams, GET streams) never reaches this module. On the stream come,
in order: the request headers (who asks), the request body (which JSON-RPC ids are list
requests), the response headers (its form) and the whole response body, which goes back
filtered.

Fail closed: a response body that cannot be filtered, or that Envoy could only buffer in
part (over its buffer limit), is replaced by a JSON-RPC error; any fault in here ends the
stream with an error, which Envoy (``failure_mode_allow: false``) turns into a 500.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import grpc

from authz import audit, envoy, listing, mcp
from authz.engine import Engine
from authz.metrics import Metrics
from authz.pb import (
    core_pb2,
    external_processor_pb2,
    external_processor_pb2_grpc,
    processing_mode_pb2,
)
from authz.policy import Policy

log = logging.getLogger("mcp_authz")

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"

# The reply that replaces a list response the filter cannot read: the upstream answered,
# but not with something the gateway can pass on.
UNFILTERABLE_STATUS = 502
UNFILTERABLE_REASON = "list_unfilterable"
UNFILTERABLE_RPC_CODE = -32053
# The longest list response filtered; a longer one is refused (fail closed). What filtering
# costs grows with the body, and the event loop serves every check meanwhile.
MAX_LIST_BYTES = 1024 * 1024

_Mode = processing_mode_pb2.ProcessingMode
_OVERWRITE = core_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@dataclass
class _Exchange:
    """What one stream has learnt so far about its request and response."""

    headers: Mapping[str, str] = field(default_factory=dict)
    body: mcp.Body | None = None
    requests: Mapping[str, str] = field(default_factory=dict)
    content_type: str = ""

    @property
    def grant(self) -> str | None:
        """The grant ext_authz derived (its header: a client's copy never gets through)."""
        return self.headers.get(envoy.GRANT_HEADER) or None

    @property
    def request_id(self) -> str:
        return self.headers.get("x-request-id", "")

    @property
    def server(self) -> str:
        """The server whose policy allowed the list request, under a policy with servers
        (its header: a client's copy never gets through)."""
        return self.headers.get(envoy.SERVER_HEADER, "")


def list_policy(policy: Policy, server: str) -> Policy | None:
    """The policy a list is filtered with: ``policy``, or under a policy with servers the
    policy of ``server``, the one ext_authz decided the list request with; ``None`` when
    it defines no such server (fail closed)."""
    if policy.servers is None:
        return policy
    return policy.servers.get(server)


def _header_map(headers: core_pb2.HeaderMap) -> dict[str, str]:
    """Envoy's header map (values in ``raw_value``), repeated names joined with ","."""
    joined: dict[str, str] = {}
    for h in headers.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        joined[h.key] = f"{joined[h.key]},{value}" if h.key in joined else value
    return joined


def _skip_rest() -> external_processor_pb2.ProcessingResponse:
    """A reply to request headers that asks for nothing more on this stream."""
    reply = external_processor_pb2.ProcessingResponse()
    reply.request_headers.SetInParent()
    mode = reply.mode_override
    mode.request_body_mode = _Mode.NONE
    mode.response_header_mode = _Mode.SKIP
    mode.response_body_mode = _Mode.NONE
    return reply


class ListFilterService(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """envoy.service.ext_proc.v3.ExternalProcessor/Process: filter one list response."""

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics

    async def Process(
        self,
        requests: AsyncIterator[external_processor_pb2.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[external_processor_pb2.ProcessingResponse]:
        exchange = _Exchange()
        async for message in requests:
            if message.observability_mode:
                continue  # Envoy ignores replies then; nothing can be filtered
            try:
                reply = self._answer(exchange, message)
            except Exception as exc:  # a bug must fail the response, never pass it on
                log.error("list filter failed: %s", type(exc).__name__)
                await context.abort(grpc.StatusCode.INTERNAL, "list filter failed")
                return
            yield reply

    def _answer(
        self, exchange: _Exchange, message: external_processor_pb2.ProcessingRequest
    ) -> external_processor_pb2.ProcessingResponse:
        reply = external_processor_pb2.ProcessingResponse()
        part = message.WhichOneof("request")
        if part == "request_headers":
            exchange.headers = _header_map(message.request_headers.headers)
            if envoy.LIST_HEADER not in exchange.headers:
                return _skip_rest()  # not marked by ext_authz: not a list request
            reply.request_headers.SetInParent()
        elif part == "request_body":
            policy = list_policy(self.engine.policy, exchange.server)
            if policy is None:
                return self._unfilterable(exchange, "the list request names no known server")
            max_members = policy.max_json_members
            try:
                exchange.body = mcp.parse_body(message.request_body.body, max_members)
            except mcp.Malformed:  # ext_authz allowed it: only a policy swap between could
                return self._unfilterable(exchange, "the list request is not readable")
            exchange.requests = listing.list_requests(exchange.body)
            reply.request_body.SetInParent()
        elif part == "response_headers":
            response = _header_map(message.response_headers.headers)
            exchange.content_type = response.get("content-type", "")
            status = response.get(":status", "")
            readable = listing.media_type(exchange.content_type) in (
                "application/json",
                "text/event-stream",
            )
            reply.response_headers.SetInParent()
            if not exchange.requests or (not status.startswith("2") and not readable):
                # Nothing to filter (an upstream error page lists nothing): pass it on.
                reply.mode_override.response_body_mode = _Mode.NONE
        elif part == "response_body":
            return self._filtered(exchange, message.response_body)
        else:
            raise ValueError(f"unexpected ext_proc message {part}")
        return reply

    def _filtered(
        self, exchange: _Exchange, body: external_processor_pb2.HttpBody
    ) -> external_processor_pb2.ProcessingResponse:
        if not exchange.requests:
            reply = external_processor_pb2.ProcessingResponse()
            reply.response_body.SetInParent()
            return reply
        policy = list_policy(self.engine.policy, exchange.server)
        if policy is None:  # a policy swap since the request dropped its server
            return self._unfilterable(exchange, "the list request names no known server")
        if not body.end_of_stream or len(body.body) > MAX_LIST_BYTES:
            return self._unfilterable(exchange, "over the buffer limit")
        grant, request_id = exchange.grant, exchange.request_id
        sets = exchange.headers.get(envoy.CALLERS_HEADER, "")
        caller = listing.Caller(grant=grant, sets=frozenset(filter(None, sets.split(","))))
        try:
            filtered = listing.filter_response(
                policy,
                caller,
                exchange.requests,
                exchange.content_type,
                body.body,
                protocol_version=exchange.headers.get("mcp-protocol-version", ""),
            )
        except listing.Unfilterable as exc:
            return self._unfilterable(exchange, str(exc))
        for listed in filtered.lists:
            self.metrics.record_list(listed.kind, "filtered", listed.hidden)
            audit.record_list(request_id, grant, listed, policy)
        reply = external_processor_pb2.ProcessingResponse()
        reply.response_body.response.body_mutation.body = filtered.body
        return reply

    def _unfilterable(
        self, exchange: _Exchange, why: str
    ) -> external_processor_pb2.ProcessingResponse:
        """The JSON-RPC error that replaces a list response (fail closed)."""
        for method in exchange.requests.values():
            self.metrics.record_list(listing.LISTS[method][2], "failed")
        methods = tuple(exchange.requests.values())
        audit.record_list_failure(exchange.request_id, exchange.grant, methods, why)
        body = exchange.body
        message = f"list response could not be filtered for this caller: {why}"
        reply = external_processor_pb2.ProcessingResponse()
        immediate = reply.immediate_response
        immediate.status.code = UNFILTERABLE_STATUS
        header = immediate.headers.set_headers.add()
        header.header.key = "content-type"
        header.header.raw_value = b"application/json"
        header.append_action = _OVERWRITE
        immediate.body = mcp.error_reply(
            body.ids if body is not None else (),
            body.batch if body is not None else False,
            UNFILTERABLE_RPC_CODE,
            message,
            {"reason": UNFILTERABLE_REASON},
        )
        immediate.details = UNFILTERABLE_REASON
        return reply
