"""What a caller sees in list responses: the entries of ``tools/list``, ``prompts/list``,
``resources/list`` and ``resources/templates/list`` results it may use. Pure: bytes in,
bytes out, no I/O.

ext_authz decides about requests only, so without this an agent plans with tools the
policy refuses, and the whole catalogue (names, descriptions, schemas) reaches callers who
may not use it. :func:`visible` is the one place that says whether a caller may use an
entry; :func:`filter_response` applies it to the upstream's response, in either form
streamable HTTP answers with (``application/json``, or ``text/event-stream`` where the
list response is one ``data:`` event among others).

It fails closed: a response it cannot read completely (not JSON, not an event stream, a
list result without its array, an entry without a name) raises :class:`Unfilterable`, and
the caller of this module answers with a JSON-RPC error instead of passing it on. A list
message is always written anew from what was parsed, so the client reads exactly what was
filtered (two parsers can disagree on a document's duplicate keys; they cannot on ours).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import msgspec

from authz import mcp
from authz.catalogue import Annotations, Catalogue, tools_of
from authz.policy import Action, Policy

# The list methods, the result member holding their entries, the entry member naming it,
# and the kind label metrics and audit lines use.
LISTS: dict[str, tuple[str, str, str]] = {
    "tools/list": ("tools", "name", "tools"),
    "prompts/list": ("prompts", "name", "prompts"),
    "resources/list": ("resources", "uri", "resources"),
    "resources/templates/list": ("resourceTemplates", "uriTemplate", "resource_templates"),
}
LIST_METHODS = frozenset(LISTS)
KINDS = tuple(kind for _, _, kind in LISTS.values())

# MCP 2026-07-28 (caching, SEP-2549): a result that varies per caller says so, so that no
# shared cache serves one caller's list to another.
CACHE_SCOPE_VERSION = "2026-07-28"

# A resource template's {expressions} (RFC 6570), each standing for one value when the
# template is matched against the policy's resource rules.
_TEMPLATE_EXPRESSION = re.compile(r"\{[^{}]*\}")
_TEMPLATE_VALUE = "x"

# Longest hidden name an audit line carries (MCP names have at most 128 characters).
MAX_LOGGED_NAME = 128

_SSE_LINE = re.compile(rb"\r\n|\r|\n")
_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()


class Unfilterable(Exception):
    """A list response that cannot be filtered; the text says why (never its content)."""


_NO_CATALOGUE = Catalogue()


class Caller(msgspec.Struct, frozen=True):
    """Whom a list is filtered for, as ext_authz decided the list request: its grant, and
    the policy's caller sets it belongs to."""

    grant: str | None
    sets: frozenset[str] = frozenset()


def visible(
    policy: Policy,
    caller: Caller,
    method: str,
    name: str,
    catalogue: Catalogue = _NO_CATALOGUE,
) -> bool:
    """May ``caller`` use the entry ``name`` of a ``method`` list under ``policy``? A
    tool's risk class (for the policy's ``classes``) comes from ``catalogue``.

    Hidden: what ext_authz would refuse whatever the arguments: a rule with action
    ``deny`` (or ``default: deny`` for names no rule matches), any tool for a caller
    without a grant, and names a request could not even carry (invisible or
    non-normalized characters are refused as malformed). Listed: ``require_approval``
    (it becomes callable), rules with limits (spent now does not mean never), and rules in
    dry-run mode (their denials are not enforced).
    """
    if mcp.suspicious_name(name):
        return False
    if method == "tools/list":
        if caller.grant is None:
            return False
        rule = policy.rule_for_tool(name, catalogue.hints(name))
    elif method == "prompts/list":
        rule = policy.rule_for_prompt(name)
    elif method == "resources/list":
        rule = policy.rule_for_resource(name)
    elif method == "resources/templates/list":
        rule = policy.rule_for_resource(_TEMPLATE_EXPRESSION.sub(_TEMPLATE_VALUE, name))
    else:
        raise ValueError(f"not a list method: {method}")
    if rule.variants:  # a rule for some callers: the variant that decides for this one
        chosen = rule.variant_for(caller.sets)
        if chosen is None:
            return False  # ext_authz refuses it: caller_not_permitted
        rule = chosen[0]
    return rule.action is not Action.DENY or rule.dry_run


class ListFiltered(msgspec.Struct, frozen=True):
    """One list result that was filtered: its method, and the entries kept and hidden.
    ``hidden_names`` holds hidden tool and prompt names, never resource URIs (they may
    identify a patient)."""

    method: str
    kept: int
    hidden: int
    hidden_names: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return LISTS[self.method][2]


class Filtered(msgspec.Struct, frozen=True):
    """A filtered response body and what was filtered in it."""

    body: bytes
    lists: tuple[ListFiltered, ...]


def id_key(value: object) -> str | None:
    """A JSON-RPC id as the list filter matches it: ``1``, ``1.0`` and ``"1"`` alike, so a
    response whose id a lax client would take for a list request's is filtered too."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, str | int) else None


def list_requests(body: mcp.Body) -> dict[str, str]:
    """The list requests of a request body: their JSON-RPC id (see :func:`id_key`) and
    method."""
    return {
        key: m.method
        for m in body.messages
        if m.kind is mcp.Kind.REQUEST and m.method in LISTS and (key := id_key(m.id)) is not None
    }


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def filter_response(
    policy: Policy,
    caller: Caller,
    requests: Mapping[str, str],
    content_type: str,
    body: bytes,
    protocol_version: str = "",
    catalogue: Catalogue = _NO_CATALOGUE,
) -> Filtered:
    """``body`` with every entry ``caller`` may not use removed from the results of the
    list ``requests`` (id -> method); other messages and events pass unchanged.

    Raises :class:`Unfilterable` for a body it cannot read completely.
    """
    private = protocol_version >= CACHE_SCOPE_VERSION
    media = media_type(content_type)
    if media == "application/json":
        return _filter_json(policy, caller, requests, body, private, catalogue)
    if media == "text/event-stream":
        return _filter_event_stream(policy, caller, requests, body, private, catalogue)
    raise Unfilterable(f"list response of content type {media or '(none)'!r}")


def _decode(raw: bytes) -> Any:
    try:
        return _DECODER.decode(raw)
    except msgspec.DecodeError:
        raise Unfilterable("list response is not valid JSON") from None


def _filter_json(
    policy: Policy,
    caller: Caller,
    requests: Mapping[str, str],
    body: bytes,
    private: bool,
    catalogue: Catalogue,
) -> Filtered:
    doc = _decode(body)
    done = _filter_document(policy, caller, requests, doc, private, catalogue)
    return Filtered(body=_ENCODER.encode(doc), lists=tuple(done))


def _filter_document(
    policy: Policy,
    caller: Caller,
    requests: Mapping[str, str],
    doc: object,
    private: bool,
    catalogue: Catalogue,
) -> list[ListFiltered]:
    """Filter, in place, the list results in one message or a batch of them."""
    done = []
    for message in doc if isinstance(doc, list) else [doc]:
        filtered = _filter_message(policy, caller, requests, message, private, catalogue)
        if filtered is not None:
            done.append(filtered)
    return done


def _filter_message(
    policy: Policy,
    caller: Caller,
    requests: Mapping[str, str],
    message: object,
    private: bool,
    catalogue: Catalogue,
) -> ListFiltered | None:
    """Filter ``message`` in place if it is the result of one of ``requests``: anything
    with a ``result`` and such an id (even if it also has a ``method``, which a lax client
    might overlook)."""
    if not isinstance(message, dict) or "result" not in message:
        return None  # a request or notification of the server's, or an error reply
    key = id_key(message.get("id"))
    method = requests.get(key) if key is not None else None
    if method is None:
        return None  # the response to another request
    result = message["result"]
    member, key, _ = LISTS[method]
    entries = result.get(member) if isinstance(result, dict) else None
    if not isinstance(entries, list):
        raise Unfilterable(f"{method} result without its {member!r} array")
    kept, hidden_names, hidden = [], [], 0
    for entry in entries:
        name = entry.get(key) if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise Unfilterable(f"{method} entry without a string {key!r}")
        if visible(policy, caller, method, name, catalogue):
            kept.append(entry)
            continue
        hidden += 1
        if key == "name":
            hidden_names.append(name[:MAX_LOGGED_NAME])
    result[member] = kept
    if private or "cacheScope" in result:
        result["cacheScope"] = "private"
    return ListFiltered(method, len(kept), hidden, tuple(hidden_names))


def _filter_event_stream(
    policy: Policy,
    caller: Caller,
    requests: Mapping[str, str],
    body: bytes,
    private: bool,
    catalogue: Catalogue,
) -> Filtered:
    """Filter the list responses among the events of a stream; every other event is passed
    on byte for byte. An event whose data is not JSON fails the whole response: it could be
    a list a laxer parser would read."""
    out: list[bytes] = []
    done: list[ListFiltered] = []
    for lines in events(body):
        raw = event_data(lines)
        if not raw.strip():
            out.extend(lines)  # a comment, a priming event or a keep-alive
            continue
        message = _decode(raw)
        filtered = _filter_document(policy, caller, requests, message, private, catalogue)
        if not filtered:
            out.extend(lines)
            continue
        done.extend(filtered)
        kept = [line for line in lines if line.rstrip(b"\r\n") and not _is_data(line)]
        out += [*kept, b"data: ", _ENCODER.encode(message), b"\n\n"]
    return Filtered(body=b"".join(out), lists=tuple(done))


def listed_tools(
    requests: Mapping[str, str], content_type: str, body: bytes
) -> list[tuple[list[tuple[str, Annotations]], bool]]:
    """The pages of the upstream's tool list in a response to ``requests`` (id -> method):
    each ``tools/list`` result's named tools with their annotations, and whether it is the
    last page (no ``nextCursor``). What the upstream says about its own tools, read before
    the response is filtered for a caller. Raises :class:`Unfilterable` for a body it
    cannot read (which the filter then refuses)."""
    media = media_type(content_type)
    if media == "application/json":
        docs = [_decode(body)]
    elif media == "text/event-stream":
        docs = [_decode(raw) for lines in events(body) if (raw := event_data(lines)).strip()]
    else:
        raise Unfilterable(f"list response of content type {media or '(none)'!r}")
    pages = []
    for doc in docs:
        for message in doc if isinstance(doc, list) else [doc]:
            if not isinstance(message, dict) or "result" not in message:
                continue
            key = id_key(message.get("id"))
            if key is None or requests.get(key) != "tools/list":
                continue
            result = message["result"]
            tools = tools_of(result)
            if tools is not None:
                pages.append((tools, not result.get("nextCursor")))
    return pages


def events(body: bytes) -> Iterator[list[bytes]]:
    """The events of a stream as an SSE client splits them (lines end in CRLF, LF or CR;
    an empty line ends an event), each as its lines with their terminators; the last one
    may be unterminated."""
    event: list[bytes] = []
    pos = 0
    for match in _SSE_LINE.finditer(body):
        line = body[pos : match.end()]
        pos = match.end()
        event.append(line)
        if line == match.group():  # an empty line: the event is complete
            yield event
            event = []
    if pos < len(body):
        event.append(body[pos:])
    if event:
        yield event


def _is_data(line: bytes) -> bool:
    return line.rstrip(b"\r\n").partition(b":")[0] == b"data"


def event_data(lines: list[bytes]) -> bytes:
    """An event's data as a client reads it: its ``data`` lines joined with LF, one space
    after the colon dropped."""
    data = []
    for line in lines:
        if _is_data(line):
            value = line.rstrip(b"\r\n").partition(b":")[2]
            data.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(data)
