"""Envoy's ext_proc v3 stream, for list responses (the wire side of authz.listing) and for
the responses that issue or end a session or create or list tasks (:class:`_Recording`,
authz.records).

Envoy opens an ``envoy.service.ext_proc.v3.ExternalProcessor/Process`` stream only on the
route of requests ext_authz allowed as list requests (it marks them with the
``x-mcp-authz-list`` header; see envoy/envoy.yaml), and on the routes of the requests it
marks with ``x-mcp-authz-session`` (an initialize or a DELETE: headers only) or
``x-mcp-authz-tasks`` (a task-augmented call or tasks/list); every other request and its
response (tool results, SSE streams, GET streams) never reaches this module. On a list
stream come,
in order: the request headers (who asks), the request body (which JSON-RPC ids are list
requests), the response headers (its form) and the whole response body, which goes back
filtered.

Fail closed: a response body that cannot be filtered, or that Envoy could only buffer in
part (over its buffer limit), is replaced by a JSON-RPC error; any fault in here ends the
stream with an error, which Envoy (``failure_mode_allow: false``) turns into a 500.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import grpc

from authz import audit, listing, mcp, mcp_headers, records
from authz.engine import Engine
from authz.metrics import Metrics, list_server_label
from authz.pb import (
    core_pb2,
    external_processor_pb2,
    external_processor_pb2_grpc,
    processing_mode_pb2,
)
from authz.policy import Policy
from authz.reply import (
    CALLERS_HEADER,
    GRANT_HEADER,
    LIST_HEADER,
    SERVER_HEADER,
    SESSION_HEADER,
    TASKS_HEADER,
)
from authz.store import CounterStore, StoreUnavailable

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
        return self.headers.get(GRANT_HEADER) or None

    @property
    def request_id(self) -> str:
        return self.headers.get("x-request-id", "")

    @property
    def server(self) -> str:
        """The server whose policy allowed the list request, under a policy with servers
        (its header: a client's copy never gets through)."""
        return self.headers.get(SERVER_HEADER, "")


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
        recording: _Recording | None = None
        async for message in requests:
            if message.observability_mode:
                continue  # Envoy ignores replies then; nothing can be filtered
            try:
                if recording is None and message.WhichOneof("request") == "request_headers":
                    recording = _Recording.of(_header_map(message.request_headers.headers))
                if recording is not None:
                    reply = await recording.answer(self.engine.store, message)
                else:
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
            if LIST_HEADER not in exchange.headers:
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
        self._learn_tools(exchange, body.body)
        grant, request_id = exchange.grant, exchange.request_id
        sets = exchange.headers.get(CALLERS_HEADER, "")
        caller = listing.Caller(grant=grant, sets=frozenset(filter(None, sets.split(","))))
        try:
            filtered = listing.filter_response(
                policy,
                caller,
                exchange.requests,
                exchange.content_type,
                body.body,
                protocol_version=exchange.headers.get("mcp-protocol-version", ""),
                catalogue=self.engine.catalogue_of(exchange.server or None),
            )
        except listing.Unfilterable as exc:
            return self._unfilterable(exchange, str(exc))
        server = list_server_label(self.engine.policy, exchange.server)
        for listed in filtered.lists:
            self.metrics.record_list(listed.kind, "filtered", server, listed.hidden)
            audit.record_list(request_id, grant, listed, policy)
        reply = external_processor_pb2.ProcessingResponse()
        reply.response_body.response.body_mutation.body = filtered.body
        return reply

    def _learn_tools(self, exchange: _Exchange, body: bytes) -> None:
        """Learn the upstream's tools and their annotations from its ``tools/list``
        response, before it is filtered for the caller: the response comes from the
        operator's upstream (this stream sees it on its way back), never from the client.
        A body that cannot be read teaches nothing; the filter then refuses it."""
        if "tools/list" not in exchange.requests.values():
            return
        try:
            pages = listing.listed_tools(exchange.requests, exchange.content_type, body)
        except listing.Unfilterable:
            return
        for tools, complete in pages:
            self.engine.learn_tools(tools, complete, exchange.server or None)

    def _unfilterable(
        self, exchange: _Exchange, why: str
    ) -> external_processor_pb2.ProcessingResponse:
        """The JSON-RPC error that replaces a list response (fail closed)."""
        server = list_server_label(self.engine.policy, exchange.server)
        methods = tuple(exchange.requests.values())
        if not methods:  # refused before the request body was read: ext_authz's mark
            marked = exchange.headers.get(LIST_HEADER, "").split(",")
            methods = tuple(method for method in marked if method in listing.LISTS)
        for method in methods:
            self.metrics.record_list(listing.LISTS[method][2], "failed", server)
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


@dataclass
class _Recording:
    """The ext_proc stream of a request whose response issues or ends a session, or
    creates or lists tasks (ext_authz marked it with ``x-mcp-authz-session`` or
    ``x-mcp-authz-tasks``; see envoy/envoy.yaml), recorded per grant (authz.records):

    - session: only the headers come here, the body passes unbuffered. The session id the
      upstream issued in an ``initialize`` response is recorded for the request's grant; a
      session whose ``DELETE`` succeeded is dropped.
    - tasks: the whole response comes here. The task ids a task-augmented call's response
      hands out are recorded for the grant, and the response passes unchanged; a
      ``tasks/list`` response goes back with only the grant's own tasks.

    A store that cannot be reached fails toward less: a session not recorded counts
    against its grant's counters, a dropped session stays until its idle time passes (the
    upstream has ended it), a task not recorded cannot be reached, a task list is not
    sent.
    """

    headers: Mapping[str, str]
    content_type: str = ""
    # The request's JSON-RPC ids (tasks only): what an error reply echoes.
    ids: tuple[str | int | None, ...] = ()

    @classmethod
    def of(cls, headers: Mapping[str, str]) -> _Recording | None:
        """The recording a request's headers ask for; ``None``: a list request or none."""
        if LIST_HEADER in headers:
            return None
        if SESSION_HEADER not in headers and TASKS_HEADER not in headers:
            return None
        return cls(headers)

    @property
    def grant(self) -> str | None:
        return self.headers.get(GRANT_HEADER) or None

    async def answer(
        self, store: CounterStore, message: external_processor_pb2.ProcessingRequest
    ) -> external_processor_pb2.ProcessingResponse:
        reply = external_processor_pb2.ProcessingResponse()
        part = message.WhichOneof("request")
        if part == "response_headers":
            reply.response_headers.SetInParent()
            response = _header_map(message.response_headers.headers)
            self.content_type = response.get("content-type", "")
            success = response.get(":status", "").startswith("2")
            readable = listing.media_type(self.content_type) in (
                "application/json",
                "text/event-stream",
            )
            if not success and not readable:
                reply.mode_override.response_body_mode = _Mode.NONE  # an error page
            elif success and SESSION_HEADER in self.headers:
                await self._session(store, response)
        elif part == "response_body":
            return await self._tasks(store, message.response_body)
        elif part == "request_body":
            reply.request_body.SetInParent()
            with contextlib.suppress(mcp.Malformed):  # ext_authz read it: only a policy swap
                self.ids = mcp.parse_body(message.request_body.body).ids
        elif part == "request_headers":
            reply.request_headers.SetInParent()
        else:
            raise ValueError(f"unexpected ext_proc message {part}")
        return reply

    async def _session(self, store: CounterStore, response: Mapping[str, str]) -> None:
        grant = self.grant
        event = self.headers.get(SESSION_HEADER)
        issued = response if event == "open" else self.headers
        try:
            session = mcp_headers.session_id({"mcp-session-id": issued.get("mcp-session-id", "")})
        except mcp.Malformed:
            return  # none issued (a stateless upstream), or none a client could send back
        if grant is None or session is None:
            return
        key = records.session_record(grant, session)
        try:
            if event == "open":
                await store.record(key, records.SESSION_IDLE_MS)
            elif event == "close":
                await store.forget(key)
        except StoreUnavailable as exc:
            log.warning("session %s not recorded: %s", event, exc)

    async def _tasks(
        self, store: CounterStore, body: external_processor_pb2.HttpBody
    ) -> external_processor_pb2.ProcessingResponse:
        reply = external_processor_pb2.ProcessingResponse()
        reply.response_body.SetInParent()
        event, grant = self.headers.get(TASKS_HEADER), self.grant
        if event == "create" and grant is not None:
            for task, ttl_ms in records.created_tasks(self.content_type, body.body):
                try:
                    await store.record(records.task_record(grant, task), ttl_ms)
                except StoreUnavailable as exc:
                    log.warning("task not recorded: %s", exc)
        elif event == "list":
            if not body.end_of_stream or len(body.body) > MAX_LIST_BYTES:
                return self._unlisted("over the buffer limit")
            try:
                listed = records.TaskList(self.content_type, body.body)
                keys = [records.task_record(grant, t) for t in listed.ids] if grant else []
                found = await store.recorded(keys) if keys else ()
            except (records.Unreadable, StoreUnavailable) as exc:
                return self._unlisted(str(exc))
            own = {task for task, yes in zip(listed.ids, found, strict=False) if yes}
            reply.response_body.response.body_mutation.body = listed.filtered(own.__contains__)
        return reply

    def _unlisted(self, why: str) -> external_processor_pb2.ProcessingResponse:
        """The JSON-RPC error that replaces a tasks/list response (fail closed)."""
        log.warning("tasks/list response not filtered: %s", why)
        audit.record_list_failure(
            self.headers.get("x-request-id", ""), self.grant, (mcp.TASK_LIST,), why
        )
        reply = external_processor_pb2.ProcessingResponse()
        immediate = reply.immediate_response
        immediate.status.code = UNFILTERABLE_STATUS
        header = immediate.headers.set_headers.add()
        header.header.key = "content-type"
        header.header.raw_value = b"application/json"
        header.append_action = _OVERWRITE
        message = f"list response could not be filtered for this caller: {why}"
        data = {"reason": UNFILTERABLE_REASON}
        immediate.body = mcp.error_reply(self.ids, False, UNFILTERABLE_RPC_CODE, message, data)
        immediate.details = UNFILTERABLE_REASON
        return reply
