"""What the policy tools share: loading a policy with its errors printed, a rule as text,
and a request as Envoy would pass it."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from authz import mcp
from authz.grants import JWT_NAMESPACE, GrantSource, Source
from authz.policy import (
    Policy,
    PolicyError,
    Rule,
    load_policy,
)


def print_errors(path: str, errors: Sequence[str], out: TextIO) -> None:
    print(f"{path}: invalid policy", file=out)
    for error in errors:
        print(f"  {error}", file=out)


def load(path: str, err: TextIO) -> Policy | None:
    try:
        return load_policy(path)
    except PolicyError as exc:
        print_errors(path, exc.errors, err)
        return None


def describe_rule(rule: Rule) -> str:
    """One line: ``allow, arguments checked, dry-run within counter 'c': 10 per minute ...``;
    for a rule that depends on the caller, its variants in order."""
    if rule.variants:
        return "; then ".join(
            f"for {', '.join(v.callers) if v.callers else 'any other caller'}: {describe_rule(v)}"
            for v in rule.variants
        ) + ("" if not rule.variants[-1].callers else "; any other caller: not permitted")
    parts = [rule.action.value]
    if rule.arguments is not None:
        parts.append("arguments checked")
    if rule.dry_run:
        parts.append("dry-run")
    text = ", ".join(parts)
    if rule.limits:
        text += " within " + "; ".join(lim.describe() for lim in rule.limits)
    if rule.reason:
        text += f" (reason: {rule.reason})"
    return text


def rule_text(rule: Rule) -> str:
    return f"{rule.where}{' (pattern)' if rule.pattern else ''}: {describe_rule(rule)}"


def request_of(
    body: bytes,
    headers: Mapping[str, str],
    source: GrantSource,
    claims: Mapping[str, Any] | None = None,
    principal: str = "",
    server: str = "",
) -> mcp.HttpRequest:
    """The request as Envoy would pass it: with verified ``claims`` where the grant source
    reads them (jwt_authn metadata, or the payload header), the mTLS ``principal``, and the
    ``server`` its route names (context extension ``mcp_server``)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    metadata: dict[str, dict[str, Any]] = {}
    if claims is not None and source.source is Source.JWT:
        if source.payload_in_header:
            payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode()
            lowered[source.payload_in_header] = payload.rstrip("=")
        else:
            metadata[JWT_NAMESPACE] = {source.payload_in_metadata: dict(claims)}
    return mcp.HttpRequest(
        method="POST",
        headers={"content-type": "application/json", **lowered},
        body=body,
        peer_principal=principal,
        metadata=metadata,
        server=server,
    )
