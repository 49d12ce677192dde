"""MCP over streamable HTTP, parsed strictly into plain values. Pure: no I/O, no policy.

The gateway and the MCP server behind it must see the same message, so anything two JSON
parsers could read differently is refused rather than guessed at: duplicate keys, invalid
UTF-8, a BOM, NaN, compressed bodies, headers that disagree with the body, method names
that only look like MCP methods. Every refusal raises :class:`Malformed` with a reason an
agent can read; the text never quotes argument values (they may carry PHI).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import unicodedata
from collections.abc import Mapping
from typing import Any

import msgspec
import orjson

from authz.jsondoc import MAX_MEMBERS, InvalidJson, decode_json

JSONRPC_VERSION = "2.0"

# Methods that carry a target name, and where it sits in params (SEP-2243 mirrors it in
# the Mcp-Name header).
NAME_PARAM = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
    "resources/subscribe": "uri",
    "resources/unsubscribe": "uri",
}

# Every method the MCP revisions from 2025-03-26 to 2026-07-28 define. Used only to spot
# look-alikes ("Tools/Call", "tools/call "): a server that folds case or trims would run
# them, while a policy keyed on the exact name would not see them.
KNOWN_METHODS = frozenset(
    {
        "initialize",
        "ping",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "sampling/createMessage",
        "elicitation/create",
        "roots/list",
        "server/discover",
        "tasks/get",
        "tasks/result",
        "tasks/list",
        "tasks/cancel",
    }
)
_FOLDED_METHODS = {m.casefold(): m for m in KNOWN_METHODS}

_REQUEST_MEMBERS = frozenset({"jsonrpc", "id", "method", "params"})
_RESPONSE_MEMBERS = frozenset({"jsonrpc", "id", "result", "error"})


MAX_SESSION_ID = 256

_BASE64_PREFIX = "=?base64?"
_BASE64_SUFFIX = "?="


class Problem(enum.Enum):
    """Why a request could not be parsed; the value is the reason code operators see."""

    MALFORMED = "malformed_request"
    HEADER_MISMATCH = "header_mismatch"
    UNSUPPORTED_MEDIA = "unsupported_media_type"
    PARTIAL_BODY = "partial_body"
    METHOD_NOT_ALLOWED = "method_not_allowed"


class Malformed(Exception):
    """A request refused before any policy is consulted.

    ``ids`` holds the JSON-RPC ids already known when the problem was found, so the error
    reply can echo them.
    """

    def __init__(
        self, problem: Problem, detail: str, ids: tuple[str | int | None, ...] = ()
    ) -> None:
        super().__init__(detail)
        self.problem = problem
        self.detail = detail
        self.ids = ids


class Kind(enum.Enum):
    REQUEST = "request"
    NOTIFICATION = "notification"
    RESPONSE = "response"


# The values a check builds are frozen msgspec Structs, not frozen dataclasses: just as
# immutable, and much cheaper to build (a frozen dataclass sets every field through
# object.__setattr__).
class Message(msgspec.Struct, frozen=True):
    """One JSON-RPC message, reduced to what a policy looks at.

    ``name`` is the target (tool or prompt name, resource URI) for methods that have one;
    ``arguments`` the tool or prompt arguments (empty when absent).
    """

    index: int
    kind: Kind
    method: str | None
    id: str | int | None
    name: str | None = None
    arguments: Mapping[str, Any] = msgspec.field(default_factory=dict)


class Body(msgspec.Struct, frozen=True):
    """A POST body: one message, or a batch (MCP 2025-03-26) of several."""

    messages: tuple[Message, ...]
    batch: bool

    @property
    def ids(self) -> tuple[str | int | None, ...]:
        """Ids of the requests, in order: what a JSON-RPC error reply must echo."""
        return tuple(m.id for m in self.messages if m.kind is Kind.REQUEST)


class HttpRequest(msgspec.Struct, frozen=True):
    """The HTTP request Envoy asks about, as plain values (header names lower-case)."""

    method: str
    headers: Mapping[str, str]
    body: bytes
    request_id: str = ""
    peer_principal: str = ""
    # Envoy filter metadata by namespace (e.g. jwt_authn's verified payload), as plain JSON.
    metadata: Mapping[str, Mapping[str, Any]] = msgspec.field(default_factory=dict)
    # Which MCP server the request is for, as the gateway says: the route's ``mcp_server``
    # context extension, the destination's mTLS identity, and the authority (see
    # authz.policy.Policy.server_name).
    server: str = ""
    destination_principal: str = ""
    host: str = ""


def suspicious_name(name: str) -> bool:
    """True for names that could be a look-alike of another: invisible or unnormalized text.

    A server that strips, normalizes or ignores such characters would run a tool the policy
    never matched, so these names are refused instead of falling to ``default``.
    """
    if not name or name != name.strip() or unicodedata.normalize("NFKC", name) != name:
        return True
    # Characters a real name never needs: Unicode's "Other" (controls, format characters
    # such as zero-width joiners and bidi overrides, surrogates, private use, unassigned)
    # and "Separator" categories. str.isprintable() is exactly "none of those, except the
    # ASCII space", and runs in C, so a long name costs no Python loop.
    return not name.isprintable() or " " in name


def _valid_id(value: object) -> bool:
    # MCP: a request id is a string or an integer (bool is an int in Python, but not here).
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _message(index: int, raw: object) -> Message:
    where = f"batch element {index}: " if index >= 0 else ""
    if not isinstance(raw, dict):
        raise Malformed(Problem.MALFORMED, f"{where}JSON-RPC message must be an object")
    msg_id = raw.get("id")
    ids: tuple[str | int | None, ...] = (msg_id,) if _valid_id(msg_id) else ()
    if raw.get("jsonrpc") != JSONRPC_VERSION:
        raise Malformed(Problem.MALFORMED, f'{where}"jsonrpc" must be "2.0"', ids)
    if "method" in raw:
        return _request(index, where, raw, ids)
    extra = raw.keys() - _RESPONSE_MEMBERS
    if extra:
        raise Malformed(Problem.MALFORMED, f"{where}unexpected member(s) in a response", ids)
    if "id" not in raw or ("result" in raw) == ("error" in raw):
        raise Malformed(
            Problem.MALFORMED,
            f"{where}not a JSON-RPC request, notification or response",
            ids,
        )
    if msg_id is not None and not _valid_id(msg_id):
        raise Malformed(Problem.MALFORMED, f"{where}id must be a string or an integer")
    return Message(index=max(index, 0), kind=Kind.RESPONSE, method=None, id=msg_id)


def _request(
    index: int, where: str, raw: dict[str, Any], ids: tuple[str | int | None, ...]
) -> Message:
    if raw.keys() - _REQUEST_MEMBERS:
        raise Malformed(Problem.MALFORMED, f"{where}unexpected member(s) in a request", ids)
    method = raw["method"]
    if not isinstance(method, str):
        raise Malformed(Problem.MALFORMED, f"{where}method must be a string", ids)
    if method not in KNOWN_METHODS and (
        method.strip().casefold() in _FOLDED_METHODS or suspicious_name(method)
    ):
        raise Malformed(Problem.MALFORMED, f"{where}method name is not an exact MCP method", ids)
    if "id" in raw:
        if not _valid_id(raw["id"]):
            raise Malformed(Problem.MALFORMED, f"{where}id must be a string or an integer")
        kind = Kind.REQUEST
    else:
        kind = Kind.NOTIFICATION
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise Malformed(Problem.MALFORMED, f"{where}params must be an object", ids)
    name: str | None = None
    arguments: Mapping[str, Any] = {}
    name_param = NAME_PARAM.get(method)
    if name_param is not None:
        name = params.get(name_param)
        if not isinstance(name, str):
            raise Malformed(
                Problem.MALFORMED, f"{where}{method} params.{name_param} must be a string", ids
            )
        if suspicious_name(name):
            raise Malformed(
                Problem.MALFORMED,
                f"{where}{method} params.{name_param} contains invisible, blank or "
                "non-normalized characters",
                ids,
            )
        args = params.get("arguments", {})
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise Malformed(Problem.MALFORMED, f"{where}params.arguments must be an object", ids)
        arguments = args
    return Message(
        index=max(index, 0),
        kind=kind,
        method=method,
        id=raw.get("id"),
        name=name,
        arguments=arguments,
    )


def parse_body(body: bytes, max_members: int = MAX_MEMBERS) -> Body:
    """Parse a POST body into messages; raise :class:`Malformed` for anything not MCP."""
    try:
        doc = decode_json(body, max_members)
    except InvalidJson as exc:
        raise Malformed(Problem.MALFORMED, str(exc)) from None
    if isinstance(doc, list):
        if not doc:
            raise Malformed(Problem.MALFORMED, "empty batch")
        return Body(messages=tuple(_message(i, m) for i, m in enumerate(doc)), batch=True)
    return Body(messages=(_message(-1, doc),), batch=False)


def decode_header_value(value: str) -> str:
    """Decode a SEP-2243 header value: ``=?base64?<base64 of UTF-8>?=`` or a literal.

    The markers are case-sensitive; a value that only resembles them is literal.
    """
    if value.startswith(_BASE64_PREFIX) and value.endswith(_BASE64_SUFFIX):
        encoded = value[len(_BASE64_PREFIX) : -len(_BASE64_SUFFIX)]
        try:
            return base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise Malformed(
                Problem.HEADER_MISMATCH, "malformed base64 value in an Mcp-* header"
            ) from None
    return value


def check_headers(headers: Mapping[str, str], body: Body) -> None:
    """MCP 2026-07-28 (SEP-2243): ``Mcp-Method``/``Mcp-Name`` must agree with the body.

    The body stays the source of truth; a disagreement means some hop would route or
    authorize on a different message than the server runs, so it is refused.
    """
    header_method = headers.get("mcp-method")
    header_name = headers.get("mcp-name")
    if header_method is None and header_name is None:
        return
    if body.batch:
        raise Malformed(
            Problem.HEADER_MISMATCH, "Mcp-Method/Mcp-Name headers cannot describe a batch", body.ids
        )
    message = body.messages[0]
    if header_method is not None and decode_header_value(header_method) != message.method:
        raise Malformed(
            Problem.HEADER_MISMATCH, "Mcp-Method header does not match the body", body.ids
        )
    if header_name is not None and decode_header_value(header_name) != message.name:
        raise Malformed(
            Problem.HEADER_MISMATCH, "Mcp-Name header does not match the body", body.ids
        )


def check_media(headers: Mapping[str, str]) -> None:
    """A POST must carry uncompressed JSON: the gateway reads the same bytes the server does."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise Malformed(Problem.UNSUPPORTED_MEDIA, "compressed bodies are not accepted")
    media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise Malformed(Problem.UNSUPPORTED_MEDIA, "content-type must be application/json")


def session_id(headers: Mapping[str, str]) -> str | None:
    """The ``Mcp-Session-Id`` of a request, or ``None`` (stateless requests carry none).

    It is client-supplied and ends up (hashed) in counter keys, so it must be what the
    MCP spec allows: visible ASCII only; and no longer than any real server issues.
    """
    value = headers.get("mcp-session-id")
    if value is None:
        return None
    if not 1 <= len(value) <= MAX_SESSION_ID or not all("!" <= ch <= "~" for ch in value):
        raise Malformed(
            Problem.MALFORMED,
            f"Mcp-Session-Id must be 1 to {MAX_SESSION_ID} visible ASCII characters",
        )
    return value


def arguments_digest(arguments: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a call's arguments (sorted keys, no spaces, UTF-8).

    Lets logs and approvals refer to "this exact call" without ever holding the values.
    """
    try:
        # orjson is much faster than json here and its output is just as canonical.
        canonical = orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # integers beyond 64 bits: msgspec writes them exactly, as fast
        canonical = msgspec.json.encode(arguments, order="sorted")
    return hashlib.sha256(canonical).hexdigest()


def error_reply(
    ids: tuple[str | int | None, ...],
    batch: bool,
    code: int,
    message: str,
    data: Mapping[str, Any],
) -> bytes:
    """A JSON-RPC error reply echoing the request ids: one error per request of a batch."""
    if batch and ids:
        replies: Any = [
            {
                "jsonrpc": JSONRPC_VERSION,
                "id": i,
                "error": {"code": code, "message": message, "data": data},
            }
            for i in ids
        ]
    else:
        replies = {
            "jsonrpc": JSONRPC_VERSION,
            "id": ids[0] if ids else None,
            "error": {"code": code, "message": message, "data": data},
        }
    return json.dumps(replies, ensure_ascii=False, separators=(",", ":")).encode()
