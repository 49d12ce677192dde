"""Grant identity: whose budget a call spends.

The policy's ``grants`` section picks the source; without one it is the ``Authorization:
Bearer`` credential, or the header named by ``--grant-header``.

- ``bearer``: a SHA-256 prefix of the token (``b-<24 hex>``), so the raw token is never
  stored, logged or used as a Redis key. The token must still be verified by someone (the
  MCP server, or Envoy's jwt_authn): a caller who invents tokens gets fresh budgets, but
  its calls are then refused by whoever verifies.
- ``header``: the value of a header Envoy sets after verifying the caller; the shipped
  Envoy config strips any client-supplied copy first.
- ``jwt``: a claim of the payload Envoy's ``jwt_authn`` verified and passed to ext_authz as
  metadata (``payload_in_metadata`` + ``metadata_context_namespaces``).
- ``mtls``: the peer certificate's principal (URI SAN or subject) Envoy reports.

Grant ids become part of Redis keys, so they are kept to a safe alphabet: a header value
outside it is no identity; a claim or principal outside it is used as ``h-<SHA-256 prefix>``.
"""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass

from authz.mcp import HttpRequest

# Where Envoy's jwt_authn filter puts verified payloads (its filter name).
JWT_NAMESPACE = "envoy.filters.http.jwt_authn"

# RFC 6750 b64token (token68): what a bearer credential may contain. Anything else (a
# comma from two joined Authorization headers, spaces) is not one credential.
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# A grant id becomes part of Redis keys: keep it to a safe alphabet and out of the
# hash-tag braces.
_SAFE_GRANT = re.compile(r"[A-Za-z0-9._:@/+=\-]{1,128}")


class Source(enum.Enum):
    BEARER = "bearer"
    HEADER = "header"
    JWT = "jwt"
    MTLS = "mtls"


@dataclass(frozen=True)
class GrantSource:
    """Where the grant id of a request comes from (the policy's ``grants`` section)."""

    source: Source = Source.BEARER
    header: str = ""
    claim: str = ""
    payload_in_metadata: str = "jwt_payload"

    def describe(self) -> str:
        if self.source is Source.HEADER:
            return f"header {self.header} (set by Envoy)"
        if self.source is Source.JWT:
            return f"JWT claim {self.claim!r} from jwt_authn metadata {self.payload_in_metadata!r}"
        if self.source is Source.MTLS:
            return "mTLS peer principal"
        return "SHA-256 prefix of the bearer token"


BEARER = GrantSource()


def _safe_or_hashed(value: str) -> str:
    if _SAFE_GRANT.fullmatch(value):
        return value
    return "h-" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def grant_of(request: HttpRequest, source: GrantSource) -> str | None:
    """The grant id of a request, or ``None`` when it carries no usable identity."""
    if source.source is Source.HEADER:
        value = request.headers.get(source.header, "").strip()
        return value if _SAFE_GRANT.fullmatch(value) else None
    if source.source is Source.JWT:
        payload = request.metadata.get(JWT_NAMESPACE, {}).get(source.payload_in_metadata)
        claim = payload.get(source.claim) if isinstance(payload, dict) else None
        if isinstance(claim, float) and claim.is_integer():
            claim = int(claim)  # protobuf Struct carries every number as a double
        if isinstance(claim, bool) or not isinstance(claim, str | int) or claim == "":
            return None
        return _safe_or_hashed(str(claim))
    if source.source is Source.MTLS:
        return _safe_or_hashed(request.peer_principal) if request.peer_principal else None
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not _TOKEN68.fullmatch(token):
        return None
    return "b-" + hashlib.sha256(token.encode()).hexdigest()[:24]
