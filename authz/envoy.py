"""Envoy's ext_authz v3 wire types in and out: the only module that knows them.

``http_request`` turns a CheckRequest into the plain :class:`authz.mcp.HttpRequest`;
``check_response`` turns a :class:`authz.engine.Decision` into a CheckResponse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format

from authz.engine import Decision, Reason
from authz.mcp import HttpRequest
from authz.pb import core_pb2, external_auth_pb2

HEADER_PREFIX = "x-mcp-authz-"
# The ext_authz per-route context extension (check_settings.context_extensions) naming the
# MCP server a route leads to: set in the Envoy configuration, never by the client.
SERVER_EXTENSION = "mcp_server"
GRANT_HEADER = "x-mcp-authz-grant"
REASON_HEADER = "x-mcp-authz-reason"
FAIL_OPEN_HEADER = "x-mcp-authz-fail-open"
# On a call a dry-run rule would have denied: "deny:<reason code>", to the upstream (for
# its logs) and in the response.
DRY_RUN_HEADER = "x-mcp-authz-dry-run"
# On an allowed list request, to the upstream: the list methods it asks for. Envoy routes
# such a request to the route whose response goes through the list filter (ext_proc);
# on every other allowed request the header is removed, and the removal (a header
# mutation) makes Envoy match the route again without a copy a client may have sent.
LIST_HEADER = "x-mcp-authz-list"
# With it, to the list filter: the caller sets the caller belongs to, comma-separated.
CALLERS_HEADER = "x-mcp-authz-callers"
# With it, under a policy with servers: the server whose policy the list is filtered with
# (the one whose policy allowed the request).
SERVER_HEADER = "x-mcp-authz-server"
# On an allowed request whose response issues or ends a session ("open": an initialize;
# "close": a DELETE of a session): Envoy routes it to the route whose response headers
# go through ext_proc, which records or drops the session (authz.records). Removed, like
# the list mark, from every other allowed request.
SESSION_HEADER = "x-mcp-authz-session"
# On an allowed request whose response creates tasks ("create": a task-augmented
# tools/call) or lists them ("list": tasks/list): Envoy routes it to the route whose
# response body goes through ext_proc, which records the task ids for the grant or
# filters the list (authz.records). Removed from every other allowed request.
TASKS_HEADER = "x-mcp-authz-tasks"

# gRPC status codes (google.rpc.Code) carried in CheckResponse.status; any non-OK code
# denies, the HTTP status Envoy sends comes from denied_response.
_GRPC_OK = 0
_GRPC_CODE = {
    400: 3,  # INVALID_ARGUMENT
    405: 3,
    413: 3,
    415: 3,
    403: 7,  # PERMISSION_DENIED
    429: 8,  # RESOURCE_EXHAUSTED
    503: 14,  # UNAVAILABLE
}

_OVERWRITE = core_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_MAX_HEADER_TEXT = 256


def http_request(check: external_auth_pb2.CheckRequest) -> HttpRequest:
    """The HTTP request inside a CheckRequest, with the body from ``raw_body``."""
    attrs = check.attributes
    http = attrs.request.http
    headers: Mapping[str, str]
    if http.header_map.headers:  # Envoy's encode_raw_headers mode
        joined: dict[str, str] = {}
        for h in http.header_map.headers:
            value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
            name = h.key.lower()
            joined[name] = f"{joined[name]},{value}" if name in joined else value
        headers = joined
    else:
        # The protobuf map itself (lower-case names, a C mapping): a check looks up a
        # handful of headers, which costs less there than copying every header first.
        headers = http.headers
    filter_metadata = attrs.metadata_context.filter_metadata
    return HttpRequest(
        method=http.method,
        headers=headers,
        body=http.raw_body or http.body.encode(),
        request_id=headers.get("x-request-id", http.id),
        peer_principal=attrs.source.principal,
        server=attrs.context_extensions.get(SERVER_EXTENSION, ""),
        destination_principal=attrs.destination.principal,
        host=http.host,
        # Only what filters before ext_authz put there (jwt_authn's verified payload).
        metadata={
            namespace: json_format.MessageToDict(filter_metadata[namespace])
            for namespace in filter_metadata
        },
    )


def header_text(text: str) -> str:
    """Printable ASCII only, bounded: header values must not carry controls or raw UTF-8."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text[:_MAX_HEADER_TEXT])


def _add_header(headers: Any, key: str, value: str) -> None:
    option = headers.add()
    option.header.key = key
    option.header.value = value
    option.append_action = _OVERWRITE


def _set_metadata(response: external_auth_pb2.CheckResponse, decision: Decision) -> None:
    fields = response.dynamic_metadata.fields
    fields["decision"].string_value = "allow" if decision.allowed else "deny"
    fields["reason"].string_value = decision.reason.code
    fields["grant"].string_value = decision.grant or ""
    fields["tool"].string_value = decision.tool or ""
    fields["would_deny"].string_value = decision.would_deny.code if decision.would_deny else ""
    if decision.caller is not None:  # only under a policy with caller sets
        fields["caller"].string_value = decision.caller
    if decision.server is not None:  # only under a policy with servers
        fields["server"].string_value = decision.server


def check_response(
    decision: Decision, request_headers: Mapping[str, str]
) -> external_auth_pb2.CheckResponse:
    """Allow with the grant header for the upstream, or deny with a JSON-RPC error body.

    Built in place: protobuf copies a sub-message passed to a constructor.
    """
    response = external_auth_pb2.CheckResponse()
    _set_metadata(response, decision)
    if decision.allowed:
        response.status.code = _GRPC_OK
        ok = response.ok_response
        ok.SetInParent()  # present even when it carries nothing
        if decision.grant:
            _add_header(ok.headers, GRANT_HEADER, decision.grant)
        if decision.fail_open:
            _add_header(ok.headers, FAIL_OPEN_HEADER, "store unavailable")
            _add_header(ok.response_headers_to_add, FAIL_OPEN_HEADER, "store unavailable")
        if decision.would_deny is not None:
            would = f"deny:{decision.would_deny.code}"
            _add_header(ok.headers, DRY_RUN_HEADER, would)
            _add_header(ok.response_headers_to_add, DRY_RUN_HEADER, would)
        if decision.lists:
            _add_header(ok.headers, LIST_HEADER, ",".join(decision.lists))
            if decision.caller_sets:
                _add_header(ok.headers, CALLERS_HEADER, ",".join(decision.caller_sets))
            if decision.server:
                _add_header(ok.headers, SERVER_HEADER, decision.server)
        else:
            ok.headers_to_remove.append(LIST_HEADER)
        if decision.session_event:
            _add_header(ok.headers, SESSION_HEADER, decision.session_event)
        else:
            ok.headers_to_remove.append(SESSION_HEADER)
        if decision.task_event:
            _add_header(ok.headers, TASKS_HEADER, decision.task_event)
        else:
            ok.headers_to_remove.append(TASKS_HEADER)
        # Client-supplied x-mcp-authz-* headers must never reach the upstream as ours. The
        # names are joined (in C) and searched once, since most requests carry none; only
        # then are they looked at one by one.
        if HEADER_PREFIX in "\n".join(request_headers):
            spoofed = [
                name
                for name in request_headers
                if name.startswith(HEADER_PREFIX)
                and not (name == GRANT_HEADER and decision.grant)
                and not (name == CALLERS_HEADER and decision.caller_sets)
                and not (name == SERVER_HEADER and decision.lists and decision.server)
                and name not in (LIST_HEADER, SESSION_HEADER, TASKS_HEADER)
            ]
            ok.headers_to_remove.extend(spoofed)
        return response
    status = decision.reason.status
    response.status.code = _GRPC_CODE.get(status, 7)
    response.status.message = decision.reason.code
    denied = response.denied_response
    denied.status.code = status
    _add_header(denied.headers, "content-type", "application/json")
    _add_header(denied.headers, REASON_HEADER, header_text(decision.message))
    if decision.reason is Reason.RATE_LIMITED and decision.retry_after_s is not None:
        _add_header(denied.headers, "retry-after", str(decision.retry_after_s))
    if decision.challenge is not None:  # step-up: the token lacks a caller set's scopes
        _add_header(denied.headers, "www-authenticate", header_text(decision.challenge))
    denied.body = decision.reply_body().decode()
    return response
