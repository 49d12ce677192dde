"""CheckRequests as Envoy builds them, for the tests and the fuzzer that talk to the
decision path directly."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from authz.pb import external_auth_pb2


def check_request(
    body: bytes, headers: Mapping[str, str], method: str = "POST"
) -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy sends it (body as raw bytes, header names lower-case)."""
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method = method
    http.path = "/mcp"
    http.headers.update(headers)
    http.raw_body = body
    return request


def tool_check(
    tool: str, arguments: Mapping[str, Any], token: str, id_: int = 1
) -> external_auth_pb2.CheckRequest:
    """A ``tools/call`` of ``tool`` by the grant of bearer ``token``."""
    return json_check(
        {
            "jsonrpc": "2.0",
            "id": id_,
            "method": "tools/call",
            "params": {"name": tool, "arguments": dict(arguments)},
        },
        token,
    )


def json_check(body: Mapping[str, Any], token: str) -> external_auth_pb2.CheckRequest:
    """A JSON-RPC body POSTed with bearer ``token``."""
    headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}
    return check_request(json.dumps(body).encode(), headers)
