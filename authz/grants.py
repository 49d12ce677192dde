"""Grant identity: whose budget a call spends.

The policy's ``grants`` section picks the source; without one it is the ``Authorization:
Bearer`` credential, or the header named by ``--grant-header``.

- ``bearer``: a SHA-256 prefix of the token (``b-<24 hex>``), so the raw token is never
  stored, logged or used as a Redis key. The token must still be verified by someone (the
  MCP server, or Envoy's jwt_authn): a caller who invents tokens gets fresh budgets, but
  its calls are then refused by whoever verifies.
- ``header``: the value of a header Envoy sets after verifying the caller; the shipped
  Envoy config strips any client-supplied copy first.
- ``jwt``: a claim of the verified JWT payload (see :func:`claims_of`): the one Envoy's
  ``jwt_authn`` passes to ext_authz as metadata (``payload_in_metadata`` +
  ``metadata_context_namespaces``; the sidecar Envoy of ``envoy/envoy-jwt.yaml``), or the one
  Istio's ``RequestAuthentication`` forwards in a header (``payload_in_header``, set from
  ``outputPayloadToHeader``).
- ``mtls``: the peer certificate's principal (URI SAN or subject) Envoy reports.

Grant ids become part of Redis keys, so they are kept to a safe alphabet: a header value
outside it is no identity; a claim or principal outside it is used as ``h-<SHA-256 prefix>``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from authz.mcp import HttpRequest

# Where Envoy's jwt_authn filter puts verified payloads (its filter name).
JWT_NAMESPACE = "envoy.filters.http.jwt_authn"

# RFC 6750 b64token (token68): what a bearer credential may contain. Anything else (a
# comma from two joined Authorization headers, spaces) is not one credential.
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# A grant id becomes part of Redis keys: keep it to a safe alphabet and out of the
# hash-tag braces.
_SAFE_GRANT = re.compile(r"[A-Za-z0-9._:@/+=\-]{1,128}")
# Longest Authorization value whose grant is remembered (a JWT access token is well under).
MAX_CACHED_AUTHORIZATION = 4096
# A forwarded payload: base64url (Envoy writes it so, unpadded); the standard alphabet and
# padding are accepted too, anything else is no payload.
_BASE64 = re.compile(r"[A-Za-z0-9_\-+/]+={0,2}")


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
    # Set: the verified payload comes in this header (Istio's outputPayloadToHeader) and the
    # metadata is not read. Only a header the proxy sets and strips from clients may be
    # named here: whoever can set it can claim any identity.
    payload_in_header: str = ""

    def describe(self) -> str:
        if self.source is Source.HEADER:
            return f"header {self.header} (set by Envoy)"
        if self.source is Source.JWT and self.payload_in_header:
            return f"JWT claim {self.claim!r} from the payload in header {self.payload_in_header}"
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


def claims_of(request: HttpRequest, source: GrantSource) -> dict[str, Any]:
    """The verified JWT claims of a request, as a plain dict; empty when it carries none.

    Only a ``jwt`` grant source names where verified claims are: the jwt_authn metadata
    (numbers there are doubles, as protobuf's Struct carries them), or, with
    ``payload_in_header``, the header holding the base64url JSON payload. A header that does
    not decode to a JSON object gives no claims: the proxy writes it after verifying the
    token, so anything else means it was not written by the proxy. Never raises.
    """
    if source.source is not Source.JWT:
        return {}
    if source.payload_in_header:
        return decoded_payload(request.headers.get(source.payload_in_header, ""))
    payload = request.metadata.get(JWT_NAMESPACE, {}).get(source.payload_in_metadata)
    return payload if isinstance(payload, dict) else {}


def decoded_payload(value: str) -> dict[str, Any]:
    """A proxy's base64url JSON payload header as a dict; empty when it does not decode."""
    value = value.strip()
    if not _BASE64.fullmatch(value):
        return {}
    data = value.rstrip("=").replace("+", "-").replace("/", "_")
    try:
        payload = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        # Not base64, not UTF-8 or not JSON (UnicodeDecodeError and JSONDecodeError are
        # ValueErrors); RecursionError: nesting deeper than the interpreter allows.
        return {}
    return payload if isinstance(payload, dict) else {}


def scopes_of(claims: Mapping[str, Any]) -> frozenset[str]:
    """The scopes a token grants: its ``scope`` claim (space-separated, RFC 9068), and its
    ``scp`` claim (an array as Okta issues it, or space-separated as Microsoft Entra does).
    """
    scopes: set[str] = set()
    scope = claims.get("scope")
    if isinstance(scope, str):
        scopes.update(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list):
        scopes.update(item for item in scp if isinstance(item, str) and item)
    elif isinstance(scp, str):
        scopes.update(scp.split())
    return frozenset(scopes)


def grant_of(
    request: HttpRequest, source: GrantSource, claims: Mapping[str, Any] | None = None
) -> str | None:
    """The grant id of a request, or ``None`` when it carries no usable identity.
    ``claims``: the request's verified claims when the caller already has them (see
    :func:`claims_of`), so a payload header is decoded once per check."""
    if source.source is Source.BEARER:  # the default: asked first
        authorization = request.headers.get("authorization", "")
        if len(authorization) > MAX_CACHED_AUTHORIZATION:
            return _bearer_grant.__wrapped__(authorization)
        return _bearer_grant(authorization)
    if source.source is Source.HEADER:
        value = request.headers.get(source.header, "").strip()
        return value if _SAFE_GRANT.fullmatch(value) else None
    if source.source is Source.JWT:
        claim = (claims_of(request, source) if claims is None else claims).get(source.claim)
        if isinstance(claim, float) and claim.is_integer():
            claim = int(claim)  # protobuf Struct carries every number as a double
        if isinstance(claim, bool) or not isinstance(claim, str | int) or claim == "":
            return None
        return _safe_or_hashed(str(claim))
    # Source.MTLS
    return _safe_or_hashed(request.peer_principal) if request.peer_principal else None


@functools.lru_cache(maxsize=1024)
def _bearer_grant(authorization: str) -> str | None:
    """The grant of an ``Authorization`` value: ``b-`` and a SHA-256 prefix of its bearer
    token, or ``None`` when it holds no bearer token.

    Remembered for the most recent values: an agent sends the same token with each call
    until it expires, and hashing it is most of the cost of finding its grant. The values
    stay in this process's memory only, as the requests carrying them do; longer values
    than :data:`MAX_CACHED_AUTHORIZATION` are not remembered, so the cache stays small
    whatever clients send.
    """
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not _TOKEN68.fullmatch(token):
        return None
    return "b-" + hashlib.sha256(token.encode()).hexdigest()[:24]
