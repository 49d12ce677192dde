"""The ``x-mcp-header`` annotations of an argument schema (MCP 2026-07-28, SEP-2243).

A tool's ``inputSchema`` may mark parameters to be mirrored in ``Mcp-Param-{Name}``
headers, which intermediaries may route or count on; a gateway that reads the body must
refuse a request whose headers say otherwise. mcp-authz learns the annotations from the
rule's argument schema (copied from the tool's ``inputSchema``). The spec's constraints
are checked at load: an annotation it calls invalid refuses the policy rather than being
enforced differently from the server.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from authz.mcp_headers import ParamHeader

KEYWORD = "x-mcp-header"

# RFC 9110 field-name token: 1*tchar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PRIMITIVE = ("string", "integer", "boolean")
# Keywords whose values are data, not subschemas: an annotation there is no annotation.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


def _reachable(
    node: object, path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every subschema reachable from the root through ``properties`` keys alone."""
    if not isinstance(node, dict):
        return
    yield path, node
    properties = node.get("properties")
    if isinstance(properties, dict):
        for key, sub in properties.items():
            yield from _reachable(sub, (*path, key))


def _primitive(declared: object) -> bool:
    """A string, integer or boolean parameter, possibly nullable (null sends no header)."""
    if isinstance(declared, list):
        types = [t for t in declared if t != "null"]
        return len(types) == 1 and types[0] in _PRIMITIVE
    return declared in _PRIMITIVE


def _count(node: object) -> int:
    """How many annotations the schema holds anywhere (data keywords aside)."""
    if isinstance(node, dict):
        here = 1 if KEYWORD in node else 0
        return here + sum(_count(v) for k, v in node.items() if k not in _DATA_KEYWORDS)
    if isinstance(node, list):
        return sum(_count(v) for v in node)
    return 0


def param_headers(where: str, schema: object, errors: list[str]) -> tuple[ParamHeader, ...]:
    """The parameters ``schema`` mirrors in headers; each violation of the spec's rules for
    ``x-mcp-header`` is added to ``errors`` with its path."""
    found: list[ParamHeader] = []
    seen: dict[str, str] = {}
    placed = 0
    for path, node in _reachable(schema, ()):
        if KEYWORD not in node or not path:
            continue
        placed += 1
        at = where + "".join(f".properties.{key}" for key in path) + f".{KEYWORD}"
        name = node[KEYWORD]
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            errors.append(
                f"{at}: must be an HTTP field-name token (letters, digits, !#$%&'*+-.^_`|~)"
            )
            continue
        if not _primitive(node.get("type")):
            errors.append(f"{at}: only a parameter of type string, integer or boolean has a header")
            continue
        other = seen.setdefault(name.lower(), at)
        if other != at:
            errors.append(f"{at}: must be case-insensitively unique; {other} has the same name")
            continue
        found.append(ParamHeader(name=name, path=path))
    if _count(schema) > placed:
        errors.append(
            f"{where}: {KEYWORD} is only valid on a property reachable from the root through "
            "properties alone (not under items, anyOf/oneOf/allOf/not, if/then/else, $ref "
            "or $defs, nor on the root)"
        )
    return tuple(found)
