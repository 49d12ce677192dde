"""What Envoy is told about one decision, as plain values: one reply, two encodings.

:func:`of` turns a :class:`authz.decision.Decision` into a :class:`Reply`; ``envoy.py`` encodes
it as a gRPC CheckResponse and ``authz_http.py`` as the HTTP answer of Envoy's HTTP
ext_authz mode, so both transports tell the client, the upstream, the list filter and the
access log the same.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from authz.decision import Decision, Reason

HEADER_PREFIX = "x-mcp-authz-"
GRANT_HEADER = "x-mcp-authz-grant"
REASON_HEADER = "x-mcp-authz-reason"
FAIL_OPEN_HEADER = "x-mcp-authz-fail-open"
# On a call a dry-run rule would have denied: "deny:<reason code>", to the upstream (for
# its logs) and in the response.
DRY_RUN_HEADER = "x-mcp-authz-dry-run"
# On an allowed list request, to the upstream: the list methods it asks for. Envoy routes
# such a request to the route whose response goes through the list filter (ext_proc);
# on every other allowed request the header is removed, and the removal (a header
# mutation) makes Envoy match the route again without a copy a client may have sent.
LIST_HEADER = "x-mcp-authz-list"
# With it, to the list filter: the caller sets the caller belongs to, comma-separated.
CALLERS_HEADER = "x-mcp-authz-callers"
# With it, under a policy with servers: the server whose policy the list is filtered with
# (the one whose policy allowed the request).
SERVER_HEADER = "x-mcp-authz-server"
# On an allowed request whose response issues or ends a session ("open": an initialize;
# "close": a DELETE of a session): Envoy routes it to the route whose response headers
# go through ext_proc, which records or drops the session (authz.records). Removed, like
# the list mark, from every other allowed request.
SESSION_HEADER = "x-mcp-authz-session"
# On an allowed request whose response creates tasks ("create": a task-augmented
# tools/call) or lists them ("list": tasks/list): Envoy routes it to the route whose
# response body goes through ext_proc, which records the task ids for the grant or
# filters the list (authz.records). Removed from every other allowed request.
TASKS_HEADER = "x-mcp-authz-tasks"
# The marks that route a response through ext_proc: set on the requests they concern,
# removed from every other allowed request.
_MARKS = (LIST_HEADER, SESSION_HEADER, TASKS_HEADER)

_MAX_HEADER_TEXT = 256
_JSON = (("content-type", "application/json"),)

Headers = tuple[tuple[str, str], ...]


class Reply(msgspec.Struct, frozen=True):
    """Allow or deny, and every header, body and log field that goes with it.

    On an allow, ``upstream_headers`` are set on the request to the upstream,
    ``remove_headers`` are taken off it, and ``client_headers`` are added to the upstream's
    response. On a denial the client gets ``status``, ``client_headers`` and ``body``.
    ``metadata``: the decision fields for Envoy's access log (decision, reason, grant,
    tool, would_deny always; caller under a policy with caller sets).
    """

    allowed: bool
    status: int
    reason: str
    client_headers: Headers = ()
    upstream_headers: Headers = ()
    remove_headers: tuple[str, ...] = ()
    body: bytes = b""
    metadata: Headers = ()


def header_text(text: str) -> str:
    """Printable ASCII only, bounded: header values must not carry controls or raw UTF-8.

    Most texts already are (a denial's message names the tool and the rule), and two C
    checks tell so without a Python loop over the characters: for ASCII text,
    ``isprintable`` is exactly "every character in space..tilde".
    """
    text = text[:_MAX_HEADER_TEXT]
    if text.isascii() and text.isprintable():
        return text
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)


def _spoofed(request_headers: Mapping[str, str], decision: Decision) -> tuple[str, ...]:
    """Client-supplied x-mcp-authz-* names: they must never reach the upstream as ours.

    The names are joined (in C) and searched once, since most requests carry none; only
    then are they looked at one by one. Ours that this reply sets are left to overwrite
    them, and the marks are removed (or set) on every allowed request anyway.
    """
    if HEADER_PREFIX not in "\n".join(request_headers):
        return ()
    return tuple(
        name
        for name in request_headers
        if name.startswith(HEADER_PREFIX)
        and not (name == GRANT_HEADER and decision.grant)
        and not (name == CALLERS_HEADER and decision.caller_sets)
        and not (name == SERVER_HEADER and decision.lists and decision.server)
        and name not in _MARKS
    )


def of(decision: Decision, request_headers: Mapping[str, str]) -> Reply:
    """Allow with the grant header for the upstream, or deny with a JSON-RPC error body."""
    metadata: Headers = (
        ("decision", "allow" if decision.allowed else "deny"),
        ("reason", decision.reason.code),
        ("grant", decision.grant or ""),
        ("tool", decision.tool or ""),
        ("would_deny", decision.would_deny.code if decision.would_deny else ""),
    )
    if decision.caller is not None:  # only under a policy with caller sets
        metadata += (("caller", decision.caller),)
    if decision.server is not None:  # only under a policy with servers
        metadata += (("server", decision.server),)
    if decision.allowed:
        grant = decision.grant
        upstream: Headers = ((GRANT_HEADER, grant),) if grant else ()
        client: Headers = ()
        if decision.fail_open:
            client += ((FAIL_OPEN_HEADER, "store unavailable"),)
        if decision.would_deny is not None:
            client += ((DRY_RUN_HEADER, f"deny:{decision.would_deny.code}"),)
        if client:  # the markers go both ways: the upstream logs them, the client sees them
            upstream += client
        if decision.lists and decision.caller_sets:
            upstream += ((CALLERS_HEADER, ",".join(decision.caller_sets)),)
        if decision.lists and decision.server:
            upstream += ((SERVER_HEADER, decision.server),)
        unmarked: tuple[str, ...] = _MARKS  # most requests carry no mark: all are removed
        if decision.lists or decision.session_event or decision.task_event:
            unmarked = ()
            marks = (
                (LIST_HEADER, ",".join(decision.lists)),
                (SESSION_HEADER, decision.session_event),
                (TASKS_HEADER, decision.task_event),
            )
            for name, value in marks:
                if value:
                    upstream += ((name, value),)
                else:
                    unmarked += (name,)
        remove = unmarked + _spoofed(request_headers, decision)
        return Reply(
            allowed=True,
            status=200,
            reason=decision.reason.code,
            client_headers=client,
            upstream_headers=upstream,
            remove_headers=remove,
            metadata=metadata,
        )
    headers: Headers = (*_JSON, (REASON_HEADER, header_text(decision.message)))
    if decision.reason is Reason.RATE_LIMITED and decision.retry_after_s is not None:
        headers += (("retry-after", str(decision.retry_after_s)),)
    if decision.challenge is not None:  # step-up: the token lacks a caller set's scopes
        headers += (("www-authenticate", header_text(decision.challenge)),)
    return Reply(
        allowed=False,
        status=decision.reason.status,
        reason=decision.reason.code,
        client_headers=headers,
        body=decision.reply_body(),
        metadata=metadata,
    )
