"""The operator's HTTP client of the admin API, used by ``mcp-authz approvals``.

The standard library's urllib is enough for a handful of synchronous CLI calls.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any


def admin_request(
    base_url: str, token: str, method: str, path: str, body: Mapping[str, Any] | None = None
) -> tuple[int, Any]:
    """Call ``/admin/v1<path>`` of a running mcp-authz; returns (status, JSON body)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(  # noqa: S310 (the operator's own admin URL)
        base_url.rstrip("/") + "/admin/v1" + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        try:
            return exc.code, json.loads(payload or b"null")
        except json.JSONDecodeError:
            return exc.code, {"error": payload.decode(errors="replace")[:200]}
