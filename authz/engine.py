"""The decision for one HTTP request under the current policy, with counters from a store.

The order of the steps is the order of trust: transport checks, strict parsing, header and
body agreement, identity, the rule of every message, and only when every message passes,
one all-or-nothing spend against the counters (a denied call consumes no budget).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from authz import mcp
from authz.grants import grant_of
from authz.policy import Action, Limit, Policy, Rule, Scope
from authz.store import Charge, CounterStore, StoreUnavailable

# Lifecycle and listing methods pass under any policy: an agent must be able to connect
# and discover what exists; the calls that act are what the policy governs.
UNGOVERNED = frozenset(
    {
        "initialize",
        "ping",
        "tools/list",
        "resources/list",
        "resources/templates/list",
        "prompts/list",
        "server/discover",
    }
)

# Methods that carry no body and only open or close a stream or session.
BODYLESS_METHODS = frozenset({"GET", "DELETE", "HEAD", "OPTIONS"})

PARTIAL_BODY_HEADER = "x-envoy-auth-partial-body"


class Reason(enum.Enum):
    """The fixed set of reason codes (metrics labels, logs, the reply's ``data.reason``).

    Each carries the HTTP status and the JSON-RPC error code of its reply. The codes
    -32051..-32053 are in JSON-RPC's server-error range and unused by the MCP spec
    (which assigns -32002 and -32042); protocol refusals use JSON-RPC's -32600.
    """

    ALLOWED = ("allowed", 200, 0)
    DENIED_BY_RULE = ("denied_by_rule", 403, -32051)
    DENIED_BY_DEFAULT = ("denied_by_default", 403, -32051)
    NO_GRANT = ("no_grant_identity", 403, -32051)
    RATE_LIMITED = ("rate_limited", 429, -32052)
    STORE_UNAVAILABLE = ("store_unavailable", 503, -32053)
    INTERNAL_ERROR = ("internal_error", 503, -32053)
    MALFORMED = ("malformed_request", 400, -32600)
    HEADER_MISMATCH = ("header_mismatch", 400, -32600)
    UNSUPPORTED_MEDIA = ("unsupported_media_type", 415, -32600)
    PARTIAL_BODY = ("partial_body", 413, -32600)
    METHOD_NOT_ALLOWED = ("method_not_allowed", 405, -32600)

    def __init__(self, code: str, status: int, rpc_code: int) -> None:
        self.code = code
        self.status = status
        self.rpc_code = rpc_code


_PROBLEM_REASON = {
    mcp.Problem.MALFORMED: Reason.MALFORMED,
    mcp.Problem.HEADER_MISMATCH: Reason.HEADER_MISMATCH,
    mcp.Problem.UNSUPPORTED_MEDIA: Reason.UNSUPPORTED_MEDIA,
    mcp.Problem.PARTIAL_BODY: Reason.PARTIAL_BODY,
    mcp.Problem.METHOD_NOT_ALLOWED: Reason.METHOD_NOT_ALLOWED,
}


@dataclass(frozen=True)
class CounterState:
    """A counter a decision touched, and the budget left in its window afterwards."""

    counter: str
    remaining: int
    max: int


@dataclass(frozen=True)
class Decision:
    """Allow, or deny with everything the reply and the audit line need.

    ``message`` is the agent-readable text; on a denial it starts with "policy violation:".
    ``fail_open`` marks a call allowed only because the store failed under ``--fail-open``.
    """

    reason: Reason
    message: str = ""
    grant: str | None = None
    method: str | None = None
    tool: str | None = None
    arguments_sha256: str | None = None
    rule: str | None = None
    counter: str | None = None
    counters: tuple[CounterState, ...] = ()
    retry_after_s: int | None = None
    element: int | None = None
    ids: tuple[str | int | None, ...] = ()
    batch: bool = False
    fail_open: bool = False

    @property
    def allowed(self) -> bool:
        return self.reason is Reason.ALLOWED

    def data(self) -> dict[str, Any]:
        """The machine-readable ``error.data`` of the reply."""
        data: dict[str, Any] = {"reason": self.reason.code}
        if self.tool is not None:
            data["tool"] = self.tool
        if self.counter is not None:
            data["counter"] = self.counter
        if self.retry_after_s is not None:
            data["retryAfter"] = self.retry_after_s
        if self.element is not None:
            data["element"] = self.element
        return data

    def reply_body(self) -> bytes:
        return mcp.error_reply(
            self.ids, self.batch, self.reason.rpc_code, self.message, self.data()
        )


def counter_key(limit: Limit, grant: str) -> str:
    """The store key of a limit. Every key of one grant shares the ``{g:...}`` hash tag, so
    a request's grant-scoped counters live in one Redis Cluster slot."""
    tag = "global" if limit.scope is Scope.GLOBAL else f"g:{grant}"
    return f"mcpauthz:{{{tag}}}:{limit.counter}"


def _window_text(window_ms: int) -> str:
    names = {1_000: "second", 60_000: "minute", 3_600_000: "hour", 86_400_000: "day"}
    return names.get(window_ms, f"{window_ms // 1000} s")


def _subject(msg: mcp.Message) -> str:
    if msg.method == "tools/call":
        return f"tool '{msg.name}'"
    return f"method '{msg.method}'"


@dataclass(frozen=True)
class _Spend:
    """A limit to charge, with the message that asked for it (for the denial text)."""

    msg: mcp.Message
    rule: str
    limit: Limit
    key: str


class Engine:
    """Decides requests. ``policy`` may be replaced at any time (hot reload): a check reads
    it once at its start and finishes on that policy."""

    def __init__(
        self,
        policy: Policy,
        store: CounterStore,
        *,
        grant_header: str | None = None,
        fail_open: bool = False,
        clock: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.policy = policy
        self.store = store
        self.grant_header = grant_header
        self.fail_open = fail_open
        self.clock = clock

    async def check(self, request: mcp.HttpRequest) -> Decision:
        policy = self.policy
        grant = grant_of(request.headers, self.grant_header)
        try:
            body = _parse(request)
        except mcp.Malformed as exc:
            return Decision(
                reason=_PROBLEM_REASON[exc.problem],
                message=f"policy violation: malformed request: {exc.detail}",
                grant=grant,
                ids=exc.ids,
            )
        if body is None:
            return Decision(reason=Reason.ALLOWED, grant=grant)

        spends: list[_Spend] = []
        for msg in body.messages:
            denial = _deny_message(policy, msg, grant, spends)
            if denial is not None:
                reason, text, rule = denial
                where = f"batch element {msg.index}: " if body.batch else ""
                return replace(
                    _about(msg, body, grant),
                    reason=reason,
                    message=f"policy violation: {where}{text}",
                    rule=rule,
                    element=msg.index if body.batch else None,
                )
        allowed = _about(_first_governed(body), body, grant)
        if not spends:
            return allowed
        return await self._spend(spends, body, allowed)

    async def _spend(self, spends: list[_Spend], body: mcp.Body, allowed: Decision) -> Decision:
        # One charge per key: a batch calling a tool twice spends 2 against its counter.
        costs: dict[str, int] = {}
        first: dict[str, _Spend] = {}
        for spend in spends:
            costs[spend.key] = costs.get(spend.key, 0) + 1
            first.setdefault(spend.key, spend)
        charges = [
            Charge(key=k, window_ms=first[k].limit.window_ms, max=first[k].limit.max, cost=c)
            for k, c in costs.items()
        ]
        try:
            outcome = await self.store.acquire(charges, self.clock())
        except StoreUnavailable:
            if self.fail_open:
                return replace(allowed, fail_open=True)
            return replace(
                allowed,
                reason=Reason.STORE_UNAVAILABLE,
                message=(
                    f"policy violation: {_subject(spends[0].msg)}: rate-limit store unavailable"
                ),
            )
        if outcome.allowed:
            return replace(
                allowed,
                counters=tuple(
                    CounterState(first[c.key].limit.counter, left, c.max)
                    for c, left in zip(charges, outcome.remaining, strict=True)
                ),
            )
        assert outcome.refused is not None
        refused = first[charges[outcome.refused].key]
        lim = refused.limit
        retry = max(1, math.ceil(outcome.retry_after_ms / 1000))
        where = f"batch element {refused.msg.index}: " if body.batch else ""
        return replace(
            _about(refused.msg, body, allowed.grant),
            reason=Reason.RATE_LIMITED,
            message=(
                f"policy violation: {where}{_subject(refused.msg)}: rate limit exceeded "
                f"(counter '{lim.counter}' allows {lim.max} per {_window_text(lim.window_ms)}"
                f"{' for all callers' if lim.scope is Scope.GLOBAL else ''}); "
                f"retry after {retry} s"
            ),
            rule=refused.rule,
            counter=lim.counter,
            counters=(CounterState(lim.counter, outcome.remaining[outcome.refused], lim.max),),
            retry_after_s=retry,
            element=refused.msg.index if body.batch else None,
        )


def _first_governed(body: mcp.Body) -> mcp.Message:
    """The message a request is logged under: its first call, else its first message."""
    for msg in body.messages:
        if msg.kind is not mcp.Kind.RESPONSE and msg.method == "tools/call":
            return msg
    return body.messages[0]


def _about(msg: mcp.Message, body: mcp.Body, grant: str | None) -> Decision:
    """An allow decision describing ``msg``; denials are derived from it with ``replace``."""
    is_call = msg.method == "tools/call"
    return Decision(
        reason=Reason.ALLOWED,
        grant=grant,
        method=msg.method,
        tool=msg.name if is_call else None,
        arguments_sha256=mcp.arguments_digest(msg.arguments) if is_call else None,
        ids=body.ids,
        batch=body.batch,
    )


def _parse(request: mcp.HttpRequest) -> mcp.Body | None:
    """Transport checks and parsing; ``None`` for a bodyless stream/session request."""
    method = request.method.upper()
    if method in BODYLESS_METHODS:
        if request.body:
            raise mcp.Malformed(mcp.Problem.MALFORMED, f"{method} request with a body")
        return None
    if method != "POST":
        raise mcp.Malformed(mcp.Problem.METHOD_NOT_ALLOWED, f"HTTP method {method} not allowed")
    if request.headers.get(PARTIAL_BODY_HEADER, "").strip().lower() == "true":
        raise mcp.Malformed(mcp.Problem.PARTIAL_BODY, "body too large to inspect")
    mcp.check_media(request.headers)
    body = mcp.parse_body(request.body)
    mcp.check_headers(request.headers, body)
    return body


def _deny_message(
    policy: Policy, msg: mcp.Message, grant: str | None, spends: list[_Spend]
) -> tuple[Reason, str, str] | None:
    """Why ``msg`` is denied (reason, text, rule), or ``None`` after queueing its limits."""
    if msg.kind is mcp.Kind.RESPONSE or msg.method is None:
        return None
    if msg.method in UNGOVERNED or msg.method.startswith("notifications/"):
        return None
    rule: Rule = (
        policy.rule_for_tool(msg.name or "") if msg.method == "tools/call" else policy.default
    )
    subject = _subject(msg)
    if msg.method == "tools/call" and grant is None:
        return Reason.NO_GRANT, f"{subject}: no grant identity", rule.where
    if rule.action is Action.DENY:
        if rule.where == "default":
            text = f"{subject} is not allowed by this policy (default deny)"
            return Reason.DENIED_BY_DEFAULT, text, rule.where
        return (
            Reason.DENIED_BY_RULE,
            f"{subject} denied: {rule.reason or 'denied by policy'}",
            rule.where,
        )
    for limit in rule.limits:
        spends.append(
            _Spend(msg=msg, rule=rule.where, limit=limit, key=counter_key(limit, grant or ""))
        )
    return None
