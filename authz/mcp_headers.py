"""MCP's HTTP headers, checked against the body :mod:`authz.mcp` parsed. Pure: no I/O.

What the streamable HTTP transport carries beside the JSON-RPC body: the protocol
revision (``MCP-Protocol-Version``), the session (``Mcp-Session-Id``), the media types, and
MCP 2026-07-28's mirrors of the body (SEP-2243: ``Mcp-Method``, ``Mcp-Name``,
``Mcp-Param-*``). The body stays the source of truth; a header that disagrees with it is
refused, since some hop would route, count or authorize on a different message than the
server runs.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

import msgspec

from authz.mcp import (
    NAMED_BY_HEADER,
    PROTOCOL_VERSIONS,
    STATELESS_VERSIONS,
    VERSION_META,
    Body,
    Kind,
    Malformed,
    Problem,
)

MAX_SESSION_ID = 256

_BASE64_PREFIX = "=?base64?"
_BASE64_SUFFIX = "?="


def decode_header_value(value: str, ids: tuple[str | int | None, ...] = ()) -> str:
    """Decode a SEP-2243 ``Mcp-Name``/``Mcp-Param-*`` value: ``=?base64?<base64 of
    UTF-8>?=`` or a literal. ``ids`` are echoed by the refusal of a value that is not.

    The markers are case-sensitive; a value that only resembles them is literal. The
    base64 must be canonical (padding exact, nothing outside the alphabet, no spaces).
    """
    if value.startswith(_BASE64_PREFIX) and value.endswith(_BASE64_SUFFIX):
        encoded = value[len(_BASE64_PREFIX) : -len(_BASE64_SUFFIX)]
        try:
            return base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise Malformed(
                Problem.HEADER_MISMATCH, "malformed base64 value in an Mcp-* header", ids
            ) from None
    return value


def protocol_version(
    headers: Mapping[str, str], ids: tuple[str | int | None, ...] = ()
) -> str | None:
    """The ``MCP-Protocol-Version`` of a request (``None``: 2025-03-26, which had none);
    a revision mcp-authz does not know is refused (MCP: 400, UnsupportedProtocolVersion)."""
    version = headers.get("mcp-protocol-version")
    if version is not None and version not in PROTOCOL_VERSIONS:
        raise Malformed(Problem.UNSUPPORTED_VERSION, "unsupported MCP protocol version", ids)
    return version


def stateless(headers: Mapping[str, str]) -> bool:
    """The request speaks a revision without sessions (MCP 2026-07-28)."""
    return headers.get("mcp-protocol-version") in STATELESS_VERSIONS


def check_headers(headers: Mapping[str, str], body: Body) -> None:
    """The protocol version is known, and the headers agree with the body.

    MCP 2026-07-28 (SEP-2243) mirrors the method and target in ``Mcp-Method``/``Mcp-Name``
    and the version in params._meta. The body stays the source of truth; a disagreement
    means some hop would route, count or authorize on a different message than the server
    runs, so it is refused. Only ``Mcp-Name`` may carry the base64 form; ``Mcp-Method`` is
    compared as written. On that revision the headers are required and a POST carries
    one message.
    """
    ids = body.ids
    version = protocol_version(headers, ids)
    required = version in STATELESS_VERSIONS
    for message in body.messages:
        # A dual-era server serves a body whose _meta names a version by that version:
        # the header (which says whether Mcp-Session-Id means anything) must say the same.
        named = message.protocol_version
        if (named is not None or (required and message.kind is Kind.REQUEST)) and (
            named != version
        ):
            raise Malformed(
                Problem.HEADER_MISMATCH,
                f"MCP-Protocol-Version header does not match the protocol version in "
                f"params._meta {VERSION_META}",
                ids,
            )
    header_method = headers.get("mcp-method")
    header_name = headers.get("mcp-name")
    if body.batch:
        if required:
            raise Malformed(
                Problem.MALFORMED, f"MCP {version} carries one message per POST, not a batch", ids
            )
        if header_method is not None or header_name is not None:
            raise Malformed(
                Problem.HEADER_MISMATCH,
                "Mcp-Method/Mcp-Name headers cannot describe a batch",
                ids,
            )
        return
    message = body.messages[0]
    if required and message.kind is Kind.REQUEST:
        if header_method is None:
            raise Malformed(
                Problem.HEADER_MISMATCH, f"Mcp-Method header is required by MCP {version}", ids
            )
        if header_name is None and message.method in NAMED_BY_HEADER:
            raise Malformed(
                Problem.HEADER_MISMATCH,
                f"Mcp-Name header is required by MCP {version} for {message.method}",
                ids,
            )
    if header_method is not None and header_method != message.method:
        raise Malformed(Problem.HEADER_MISMATCH, "Mcp-Method header does not match the body", ids)
    if header_name is not None and decode_header_value(header_name, ids) != message.name:
        raise Malformed(Problem.HEADER_MISMATCH, "Mcp-Name header does not match the body", ids)


class ParamHeader(msgspec.Struct, frozen=True):
    """A tool parameter MCP 2026-07-28 mirrors in an ``Mcp-Param-{name}`` header (its
    schema marks it ``x-mcp-header: name``): the annotated name and where the value sits in
    the call's arguments (a chain of object keys)."""

    name: str
    path: tuple[str, ...]

    @property
    def header(self) -> str:
        """The header's name as the request carries it (lower-case)."""
        return "mcp-param-" + self.name.lower()


# An integer header value as a decimal string; "42.0" is the integer 42 (the spec asks for
# a numeric comparison). No leading zeros: no client writes them.
_INTEGER_TEXT = re.compile(r"(-?(?:0|[1-9][0-9]*))(?:\.0+)?")


def _argument_at(arguments: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = arguments
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _same_value(text: str, value: object) -> bool:
    """The decoded header ``text`` is the header form of argument ``value`` (SEP-2243:
    strings as they are, integers in decimal, booleans as ``true``/``false``)."""
    if isinstance(value, bool):
        return text == ("true" if value else "false")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        match = _INTEGER_TEXT.fullmatch(text)
        if match is None:
            return False
        try:
            return match.group(1) == str(value)
        except ValueError:  # beyond Python's digit limit for int/str conversion
            return False
    return isinstance(value, str) and text == value


def check_param_headers(
    headers: Mapping[str, str],
    params: tuple[ParamHeader, ...],
    arguments: Mapping[str, Any],
    ids: tuple[str | int | None, ...] = (),
) -> None:
    """The ``Mcp-Param-*`` headers of a call agree with its arguments (MCP 2026-07-28).

    For each annotated parameter: a value (not null) needs its header on that revision,
    and any header it carries must match it after decoding; no value, no header. Headers
    of parameters the rule does not annotate are not ours to judge, and pass.
    """
    for param in params:
        value = _argument_at(arguments, param.path)
        header = headers.get(param.header)
        label = f"Mcp-Param-{param.name} header"
        if value is None:
            if header is not None:
                raise Malformed(
                    Problem.HEADER_MISMATCH, f"{label} names an argument with no value", ids
                )
            continue
        if header is None:
            if stateless(headers):
                raise Malformed(
                    Problem.HEADER_MISMATCH,
                    f"{label} is required: the arguments carry its value",
                    ids,
                )
            continue
        # RFC 9110 field values: visible ASCII, space and tab.
        if not (header.isascii() and header.replace("\t", " ").isprintable()):
            raise Malformed(Problem.HEADER_MISMATCH, f"{label} holds invalid characters", ids)
        if not _same_value(decode_header_value(header, ids), value):
            raise Malformed(Problem.HEADER_MISMATCH, f"{label} does not match the arguments", ids)


def check_media(headers: Mapping[str, str]) -> None:
    """A POST must carry uncompressed JSON: the gateway reads the same bytes the server does."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise Malformed(Problem.UNSUPPORTED_MEDIA, "compressed bodies are not accepted")
    media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise Malformed(Problem.UNSUPPORTED_MEDIA, "content-type must be application/json")


def session_id(headers: Mapping[str, str]) -> str | None:
    """The ``Mcp-Session-Id`` of a request, or ``None`` for a stateless request: one
    without the header, or one on a revision without sessions (MCP 2026-07-28), where the
    server ignores it, so a made-up id must not open a session budget of its own.

    It is client-supplied and ends up (hashed) in counter keys, so it must be what the
    MCP spec allows: visible ASCII only; and no longer than any real server issues.
    """
    value = headers.get("mcp-session-id")
    if value is None or stateless(headers):
        return None
    if not 1 <= len(value) <= MAX_SESSION_ID or not all("!" <= ch <= "~" for ch in value):
        raise Malformed(
            Problem.MALFORMED,
            f"Mcp-Session-Id must be 1 to {MAX_SESSION_ID} visible ASCII characters",
        )
    return value
