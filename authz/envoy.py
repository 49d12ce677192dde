"""Envoy's ext_authz v3 wire types in and out: the only module that knows them.

``http_request`` turns a CheckRequest into the plain :class:`authz.mcp.HttpRequest`;
``encode`` turns the :class:`authz.reply.Reply` of a decision into a CheckResponse
(``check_response`` does both steps from a :class:`authz.decision.Decision`). The list
filter's ext_proc stream has its own wire module, ``extproc.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format

from authz import reply
from authz.decision import Decision
from authz.mcp import HttpRequest
from authz.pb import core_pb2, external_auth_pb2

# The ext_authz per-route context extension (check_settings.context_extensions) naming the
# MCP server a route leads to: set in the Envoy configuration, never by the client.
SERVER_EXTENSION = "mcp_server"

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


def http_request(check: external_auth_pb2.CheckRequest) -> HttpRequest:
    """The HTTP request inside a CheckRequest, with the body from ``raw_body``."""
    attrs = check.attributes
    http = attrs.request.http
    headers: Mapping[str, str]
    # Envoy's encode_raw_headers mode (HasField first: most checks come without it, and
    # reading an unset sub-message builds an empty one to read from).
    if http.HasField("header_map") and http.header_map.headers:
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
    # Only what filters before ext_authz put there (jwt_authn's verified payload); most
    # checks carry none, and then no comprehension runs.
    filter_metadata = attrs.metadata_context.filter_metadata
    metadata: dict[str, dict[str, Any]] = {}
    if filter_metadata:
        metadata = {
            namespace: json_format.MessageToDict(filter_metadata[namespace])
            for namespace in filter_metadata
        }
    request_id = headers.get("x-request-id")
    if request_id is None:  # Envoy's own id, read only when the header is missing
        request_id = http.id
    return HttpRequest(
        method=http.method,
        headers=headers,
        body=http.raw_body or http.body.encode(),
        request_id=request_id,
        peer_principal=attrs.source.principal,
        server=attrs.context_extensions.get(SERVER_EXTENSION, ""),
        destination_principal=attrs.destination.principal,
        host=http.host,
        metadata=metadata,
    )


def _add_header(headers: Any, key: str, value: str) -> None:
    option = headers.add()
    option.header.key = key
    option.header.value = value
    option.append_action = _OVERWRITE


def check_response(
    decision: Decision, request_headers: Mapping[str, str]
) -> external_auth_pb2.CheckResponse:
    """The :class:`authz.reply.Reply` of a decision as a CheckResponse."""
    return encode(reply.of(decision, request_headers))


def encode(answer: reply.Reply) -> external_auth_pb2.CheckResponse:
    """A reply as a CheckResponse.

    Built in place: protobuf copies a sub-message passed to a constructor.
    """
    response = external_auth_pb2.CheckResponse()
    fields = response.dynamic_metadata.fields
    for key, value in answer.metadata:
        fields[key].string_value = value
    if answer.allowed:
        response.status.code = _GRPC_OK
        ok = response.ok_response
        ok.SetInParent()  # present even when it carries nothing
        for key, value in answer.upstream_headers:
            _add_header(ok.headers, key, value)
        if answer.client_headers:
            for key, value in answer.client_headers:
                _add_header(ok.response_headers_to_add, key, value)
        if answer.remove_headers:
            ok.headers_to_remove.extend(answer.remove_headers)
        return response
    response.status.code = _GRPC_CODE.get(answer.status, 7)
    response.status.message = answer.reason
    denied = response.denied_response
    denied.status.code = answer.status
    for key, value in answer.client_headers:
        _add_header(denied.headers, key, value)
    denied.body = answer.body.decode()
    return response
