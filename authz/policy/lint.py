"""Warnings for rules that load but can never apply: the policy means less than it says."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from authz.mcp import suspicious_name
from authz.policy.globs import literal_prefix
from authz.policy.texts import pointer_tokens

_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
# What a glob's literal prefix may be when the names it matches can still be URIs: a
# scheme and its colon, or the start of one (``file*`` matches ``file:///a``).
_URI_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*(:|$)")


def _can_be_uri(key: str) -> bool:
    """Whether a resource key (exact, or a glob) can match a URI, which has a scheme."""
    if "*" not in key:
        return _URI_SCHEME.match(key) is not None
    prefix = literal_prefix(key)
    return not prefix or _URI_START.match(prefix) is not None


def key_never_matching(section: str, key: str) -> list[str]:
    """Warnings for a rule key no request can name."""
    where = f"{section}.{key}"
    if section == "resources":
        if not _can_be_uri(key):
            return [
                f"{where}: not a URI (no scheme such as file: or https:), and resource URIs "
                "always have one, so this rule never matches"
            ]
    elif suspicious_name(key.replace("*", "x")):
        return [
            f"{where}: the name has blank, invisible or non-normalized characters; requests "
            "naming it are refused as malformed, so this rule never matches"
        ]
    return []


def never_matching(where: str, raw: Mapping[str, Any]) -> list[str]:
    """Warnings for a rule (or one of its variants) at ``where`` whose limits can never
    be spent: every call is denied."""
    warnings: list[str] = []
    schema = raw.get("arguments")
    if not isinstance(schema, dict):
        return warnings
    declared = schema.get("properties", {})
    closed = schema.get("additionalProperties") is False
    for i, lim in enumerate(raw.get("limits", ())):
        pointer = lim.get("cost")
        if not isinstance(pointer, str):
            continue
        first = pointer_tokens(pointer)[0]
        prop = declared.get(first) if isinstance(declared, dict) else None
        if closed and prop is None:
            warnings.append(
                f"{where}.limits[{i}].cost: {pointer} names an argument the arguments schema "
                "does not allow, so every call is denied"
            )
        elif isinstance(prop, dict) and len(pointer_tokens(pointer)) == 1:
            types = prop.get("type")
            types = [types] if isinstance(types, str) else types
            if isinstance(types, list) and not {"integer", "number"} & set(types):
                warnings.append(
                    f"{where}.limits[{i}].cost: {pointer} is declared as {'/'.join(types)}, "
                    "not a number, so every call is denied"
                )
    return warnings
