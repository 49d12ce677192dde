"""MCP over streamable HTTP, parsed strictly into plain values. Pure: no I/O, no policy.

The gateway and the MCP server behind it must see the same message, so anything two JSON
parsers could read differently is refused rather than guessed at: duplicate keys, invalid
UTF-8, a BOM, NaN, compressed bodies, headers that disagree with the body, method names
that only look like MCP methods. Every refusal raises :class:`Malformed` with a reason an
agent can read; the text never quotes argument values (they may carry PHI). The HTTP
headers are checked against the parsed body in :mod:`authz.mcp_headers`.
"""

from __future__ import annotations

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

# Every notification the MCP revisions from 2025-03-26 to 2026-07-28 define, sent by
# either side (each revision's ClientNotification and ServerNotification). They pass under
# any policy; another name under notifications/ follows the policy's default.
NOTIFICATIONS = frozenset(
    {
        "notifications/cancelled",
        "notifications/initialized",
        "notifications/progress",
        "notifications/message",
        "notifications/resources/updated",
        "notifications/resources/list_changed",
        "notifications/tools/list_changed",
        "notifications/prompts/list_changed",
        "notifications/roots/list_changed",
        "notifications/elicitation/complete",
        "notifications/tasks/status",
        "notifications/subscriptions/acknowledged",
    }
)

# Every method the MCP revisions from 2025-03-26 to 2026-07-28 define. Used only to spot
# look-alikes ("Tools/Call", "tools/call "): a server that folds case or trims would run
# them, while a policy keyed on the exact name would not see them.
KNOWN_METHODS = NOTIFICATIONS | frozenset(
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
        "subscriptions/listen",
        "tasks/get",
        "tasks/result",
        "tasks/list",
        "tasks/cancel",
    }
)
_FOLDED_METHODS = {m.casefold(): m for m in KNOWN_METHODS}

NOTIFICATION_PREFIX = "notifications/"

# The protocol revisions whose HTTP transport mcp-authz knows, newest first: what an
# unsupported-version refusal lists. A request without MCP-Protocol-Version is 2025-03-26
# (the spec lets servers assume so); any other value is refused, because what the headers
# and Mcp-Session-Id mean depends on it.
PROTOCOL_VERSIONS = ("2026-07-28", "2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
# Revisions without sessions (MCP 2026-07-28): every request names its version in
# params._meta, and a POST carries Mcp-Method (and Mcp-Name where NAMED_BY_HEADER says).
STATELESS_VERSIONS = frozenset({"2026-07-28"})
VERSION_META = "io.modelcontextprotocol/protocolVersion"
# MCP 2026-07-28's long-lived notification stream (it replaces the GET stream); the
# resources it subscribes to are in params.notifications.resourceSubscriptions.
LISTEN = "subscriptions/listen"
# Most resources one subscriptions/listen may subscribe to: the policy judges each URI,
# and the body bounds alone would let one request carry tens of thousands.
MAX_SUBSCRIPTIONS = 1000

# MCP 2025-11-25's methods on one task, named by params.taskId; and the one that lists
# tasks. What they reach is another request's result, so they are bound to the grant
# whose request created the task (authz.records).
TASK_METHODS = frozenset({"tasks/get", "tasks/result", "tasks/cancel"})
TASK_LIST = "tasks/list"

# The methods whose target MCP 2026-07-28 requires in Mcp-Name.
NAMED_BY_HEADER = frozenset({"tools/call", "resources/read", "prompts/get"})

_REQUEST_MEMBERS = frozenset({"jsonrpc", "id", "method", "params"})
_RESPONSE_MEMBERS = frozenset({"jsonrpc", "id", "result", "error"})


class Problem(enum.Enum):
    """Why a request could not be parsed; the value is the reason code operators see."""

    MALFORMED = "malformed_request"
    HEADER_MISMATCH = "header_mismatch"
    UNSUPPORTED_MEDIA = "unsupported_media_type"
    PARTIAL_BODY = "partial_body"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNSUPPORTED_VERSION = "unsupported_protocol_version"


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
    # The protocol version params._meta names (MCP 2026-07-28), if any.
    protocol_version: str | None = None
    # The resource URIs a subscriptions/listen subscribes to.
    subscriptions: tuple[str, ...] = ()
    # A task-augmented request (params.task, MCP 2025-11-25): its result is a task handle.
    task: bool = False
    # The task a tasks/get, tasks/result or tasks/cancel names (params.taskId).
    task_id: str | None = None


class Body(msgspec.Struct, frozen=True):
    """A POST body: one message, or a batch (MCP 2025-03-26) of several. ``ids``: the ids
    of its requests, in order, what a JSON-RPC error reply must echo (found once, when the
    body is parsed, as several steps of a check read them)."""

    messages: tuple[Message, ...]
    batch: bool
    ids: tuple[str | int | None, ...]


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
    if not _REQUEST_MEMBERS.issuperset(raw):
        raise Malformed(Problem.MALFORMED, f"{where}unexpected member(s) in a request", ids)
    method = raw["method"]
    if not isinstance(method, str):
        raise Malformed(Problem.MALFORMED, f"{where}method must be a string", ids)
    if method not in KNOWN_METHODS and (
        method.strip().casefold() in _FOLDED_METHODS or suspicious_name(method)
    ):
        raise Malformed(Problem.MALFORMED, f"{where}method name is not an exact MCP method", ids)
    if "id" in raw:
        if not ids:  # ids holds the id only when it is a string or an integer
            raise Malformed(Problem.MALFORMED, f"{where}id must be a string or an integer")
        if method.startswith(NOTIFICATION_PREFIX):
            # The server answers it, so it is a request; passing it as a notification would
            # let any method hide under the prefix.
            raise Malformed(
                Problem.MALFORMED, f"{where}a notification carries no id; this is a request", ids
            )
        kind = Kind.REQUEST
    else:
        kind = Kind.NOTIFICATION
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise Malformed(Problem.MALFORMED, f"{where}params must be an object", ids)
    meta = params.get("_meta")
    version = meta.get(VERSION_META) if isinstance(meta, dict) else None
    if version is not None and not isinstance(version, str):
        raise Malformed(
            Problem.MALFORMED, f"{where}params._meta {VERSION_META} must be a string", ids
        )
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
    subscriptions = _subscriptions(where, params, ids) if method == LISTEN else ()
    task_id = params.get("taskId")
    if method in TASK_METHODS and (not isinstance(task_id, str) or not task_id):
        raise Malformed(Problem.MALFORMED, f"{where}{method} params.taskId must be a string", ids)
    return Message(
        index=max(index, 0),
        kind=kind,
        method=method,
        id=raw.get("id"),
        name=name,
        arguments=arguments,
        protocol_version=version,
        subscriptions=subscriptions,
        task="task" in params,
        task_id=task_id if method in TASK_METHODS else None,
    )


def _subscriptions(
    where: str, params: Mapping[str, Any], ids: tuple[str | int | None, ...]
) -> tuple[str, ...]:
    """The resource URIs a subscriptions/listen subscribes to, each checked as a
    resources/subscribe URI is: the policy governs them by their exact text."""
    notifications = params.get("notifications", {})
    if not isinstance(notifications, dict):
        raise Malformed(Problem.MALFORMED, f"{where}params.notifications must be an object", ids)
    uris = notifications.get("resourceSubscriptions", [])
    if not isinstance(uris, list) or not all(isinstance(uri, str) for uri in uris):
        raise Malformed(
            Problem.MALFORMED,
            f"{where}params.notifications.resourceSubscriptions must be an array of strings",
            ids,
        )
    if len(uris) > MAX_SUBSCRIPTIONS:
        raise Malformed(
            Problem.MALFORMED,
            f"{where}params.notifications.resourceSubscriptions holds at most "
            f"{MAX_SUBSCRIPTIONS} URIs",
            ids,
        )
    if any(suspicious_name(uri) for uri in uris):
        raise Malformed(
            Problem.MALFORMED,
            f"{where}params.notifications.resourceSubscriptions holds a URI with invisible, "
            "blank or non-normalized characters",
            ids,
        )
    return tuple(uris)


def parse_body(body: bytes, max_members: int = MAX_MEMBERS) -> Body:
    """Parse a POST body into messages; raise :class:`Malformed` for anything not MCP."""
    try:
        doc = decode_json(body, max_members)
    except InvalidJson as exc:
        raise Malformed(Problem.MALFORMED, str(exc)) from None
    if isinstance(doc, list):
        if not doc:
            raise Malformed(Problem.MALFORMED, "empty batch")
        messages = tuple(_message(i, m) for i, m in enumerate(doc))
    else:
        messages = (_message(-1, doc),)
    ids = tuple(m.id for m in messages if m.kind is Kind.REQUEST)
    return Body(messages=messages, batch=isinstance(doc, list), ids=ids)


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
    try:
        # orjson writes the same bytes as the compact, non-ASCII-escaping json.dumps below.
        return orjson.dumps(replies)
    except TypeError:  # integers beyond 64 bits, lone surrogates: json decides, as before
        return json.dumps(replies, ensure_ascii=False, separators=(",", ":")).encode()
