"""Grant identity: whose budget a call spends.

By default the grant is derived from the ``Authorization: Bearer`` credential as a SHA-256
prefix, so the raw token is never stored, logged or used as a Redis key. The token itself
must still be verified by someone (the MCP server, or Envoy's jwt_authn): a caller who
invents tokens gets fresh budgets, but its calls are then refused by whoever verifies.

With ``--grant-header NAME`` the grant is the value of a header that Envoy sets after it
verified the caller; the shipped Envoy config strips any client-supplied copy first.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

# RFC 6750 b64token (token68): what a bearer credential may contain. Anything else (a
# comma from two joined Authorization headers, spaces) is not one credential.
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# A grant id from a trusted header becomes part of Redis keys: keep it to a safe alphabet
# and out of the hash-tag braces.
_HEADER_GRANT = re.compile(r"[A-Za-z0-9._:@/+=\-]{1,128}")


def grant_of(headers: Mapping[str, str], grant_header: str | None) -> str | None:
    """The grant id of a request, or ``None`` when it carries no usable identity."""
    if grant_header:
        value = headers.get(grant_header.lower(), "").strip()
        return value if _HEADER_GRANT.fullmatch(value) else None
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not _TOKEN68.fullmatch(token):
        return None
    return "b-" + hashlib.sha256(token.encode()).hexdigest()[:24]
