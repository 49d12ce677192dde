"""What a check comes to, as values: the reason codes, the decision with its reply, what the
policy said about each message, and the one result that audit, metrics, the Envoy reply and
the policy tools all read (so none of them needs to know how a decision is made)."""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from authz import mcp
from authz.policy import Limit, Policy, Rule


class Reason(enum.Enum):
    """The fixed set of reason codes (metrics labels, logs, the reply's ``data.reason``).

    Each carries the HTTP status and the JSON-RPC error code of its reply. The codes
    -32051..-32053 are in JSON-RPC's server-error range and unused by the MCP spec
    (which assigns -32002 and -32042); protocol refusals use JSON-RPC's -32600, except
    those MCP 2026-07-28 gives a code of its own (HeaderMismatch -32020,
    UnsupportedProtocolVersion -32022).
    """

    ALLOWED = ("allowed", 200, 0)
    DENIED_BY_RULE = ("denied_by_rule", 403, -32051)
    DENIED_BY_DEFAULT = ("denied_by_default", 403, -32051)
    ARGUMENTS_INVALID = ("invalid_arguments", 403, -32051)
    APPROVAL_REQUIRED = ("approval_required", 403, -32051)
    APPROVAL_REJECTED = ("approval_rejected", 403, -32051)
    CALLER_NOT_PERMITTED = ("caller_not_permitted", 403, -32051)
    UNKNOWN_TOOL = ("unknown_tool", 403, -32051)
    NO_GRANT = ("no_grant_identity", 403, -32051)
    UNKNOWN_SERVER = ("unknown_server", 403, -32051)
    RATE_LIMITED = ("rate_limited", 429, -32052)
    STORE_UNAVAILABLE = ("store_unavailable", 503, -32053)
    INTERNAL_ERROR = ("internal_error", 503, -32053)
    MALFORMED = ("malformed_request", 400, -32600)
    HEADER_MISMATCH = ("header_mismatch", 400, -32020)
    UNSUPPORTED_MEDIA = ("unsupported_media_type", 415, -32600)
    PARTIAL_BODY = ("partial_body", 413, -32600)
    METHOD_NOT_ALLOWED = ("method_not_allowed", 405, -32600)
    UNSUPPORTED_VERSION = ("unsupported_protocol_version", 400, -32022)
    TASK_NOT_OWNED = ("task_not_owned", 403, -32051)

    def __init__(self, code: str, status: int, rpc_code: int) -> None:
        self.code = code
        self.status = status
        self.rpc_code = rpc_code


# Read several times a check. On Python 3.11 a member read from its enum class goes
# through EnumType's __getattr__ hook, a module name is one dict lookup.
_ALLOWED = Reason.ALLOWED

# Denials a rule in dry-run mode turns into "would deny". Identity and protocol refusals
# stay enforced: they say nothing about the policy being tried out.
DRY_RUNNABLE = frozenset(
    {
        Reason.DENIED_BY_RULE,
        Reason.DENIED_BY_DEFAULT,
        Reason.CALLER_NOT_PERMITTED,
        Reason.UNKNOWN_TOOL,
        Reason.ARGUMENTS_INVALID,
        Reason.APPROVAL_REQUIRED,
        Reason.RATE_LIMITED,
        Reason.STORE_UNAVAILABLE,
    }
)


# Frozen msgspec Structs for the same reason as in authz.mcp: a check builds several.
class CounterState(msgspec.Struct, frozen=True):
    """A counter a decision touched, and the budget left in its window afterwards."""

    counter: str
    remaining: int
    max: int


class Decision(msgspec.Struct, frozen=True):
    """Allow, or deny with everything the reply and the audit line need.

    ``message`` is the agent-readable text; on a denial it starts with "policy violation:".
    ``fail_open`` marks a call allowed only because the store failed under ``--fail-open``.
    ``log_arguments``: the matched rule lets the audit line carry the call's arguments.
    ``dry_run``: a rule in dry-run mode governed the request. ``would_deny``: such a rule
    would have denied it (``message``, ``rule`` and ``counter`` then describe that denial),
    and it was allowed. ``caller``: the caller set the caller was recognised as (the one its
    rule's variant matched, else its first set), ``None`` for none or a policy without
    caller sets. ``challenge``: the ``WWW-Authenticate`` value of a step-up denial (the
    token lacks the scopes a caller set requires). ``requested_version``: the protocol
    version an ``unsupported_protocol_version`` refusal did not know.
    """

    reason: Reason
    message: str = ""
    grant: str | None = None
    method: str | None = None
    tool: str | None = None
    arguments_sha256: str | None = None
    rule: str | None = None
    counter: str | None = None
    retry_after_s: int | None = None
    element: int | None = None
    ids: tuple[str | int | None, ...] = ()
    batch: bool = False
    fail_open: bool = False
    log_arguments: bool = False
    dry_run: bool = False
    would_deny: Reason | None = None
    approval_id: str | None = None
    # The list methods the request asks for, in order: Envoy routes the response of an
    # allowed one through the list filter (authz.listing).
    lists: tuple[str, ...] = ()
    caller: str | None = None
    # On an allowed list request: every caller set the caller belongs to, for the list
    # filter to show it what those sets may use (the filter does not derive them again).
    caller_sets: tuple[str, ...] = ()
    challenge: str | None = None
    requested_version: str | None = None
    # On an allowed request whose response issues or ends a session: "open" (an
    # initialize) or "close" (a DELETE of a session). Envoy routes its response headers
    # through ext_proc, which records the session id the upstream issued to the grant, or
    # drops it (authz.records).
    session_event: str | None = None
    # On an allowed request whose response lists or creates tasks: "create" (a
    # task-augmented tools/call) or "list" (tasks/list). Envoy routes its response through
    # ext_proc, which records the task ids it creates for the grant, or removes from the
    # list the tasks of other grants (authz.records).
    task_event: str | None = None
    # Under a policy with servers: the server the check was for ("" when the gateway named
    # none); ``None`` under a policy without servers. The list filter of an allowed list
    # request filters with that server's policy.
    server: str | None = None

    @property
    def allowed(self) -> bool:
        return self.reason is _ALLOWED

    @property
    def labels(self) -> tuple[str, str]:
        """(decision, reason) as the audit line and the metrics name them: ``allow`` or
        ``deny`` with the reason code; ``dry_run_deny`` with the reason a rule in dry-run
        mode would have denied for (the call was allowed)."""
        if self.would_deny is not None and self.reason is _ALLOWED:
            return "dry_run_deny", self.would_deny.code
        return ("allow" if self.reason is _ALLOWED else "deny"), self.reason.code

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
        if self.approval_id is not None:
            data["approvalId"] = self.approval_id
        if self.requested_version is not None:
            # MCP's UnsupportedProtocolVersionError: what to retry with, what was asked for.
            data["supported"] = list(mcp.PROTOCOL_VERSIONS)
            data["requested"] = self.requested_version
        return data

    def reply_body(self) -> bytes:
        return mcp.error_reply(
            self.ids, self.batch, self.reason.rpc_code, self.message, self.data()
        )


class Spend(msgspec.Struct, frozen=True):
    """A limit a message spends against: ``cost`` units under store key ``key``; for a
    session-scoped limit, under ``fallback`` (its grant's counter) instead when the
    ``session`` record is missing: the upstream never issued that session id to the
    grant."""

    msg: mcp.Message
    rule: Rule
    limit: Limit
    key: str
    cost: int
    session: str | None = None
    fallback: str | None = None


class Step(msgspec.Struct, frozen=True):
    """What the policy says about one message: the rule that governs it (``None`` for
    lifecycle, listing, notifications and responses), why it is denied if it is, and
    otherwise the limits it spends against. ``arguments`` is what the rule's argument
    schema found: ``None`` when it was not checked, ``""`` when they satisfy it, else the
    problems. ``caller``: the caller set the rule's variant matched by; ``challenge``: the
    step-up ``WWW-Authenticate`` value of a ``caller_not_permitted`` denial."""

    msg: mcp.Message
    rule: Rule | None
    denial: Reason | None = None
    text: str = ""
    spends: tuple[Spend, ...] = ()
    arguments: str | None = None
    caller: str | None = None
    challenge: str | None = None

    @property
    def dry_run(self) -> bool:
        """The denial is only a "would deny": the rule is in dry-run mode."""
        return self.rule is not None and self.rule.dry_run and self.denial in DRY_RUNNABLE


class CheckResult(msgspec.Struct, frozen=True):
    """What one check came to, and what it was decided from: the ``decision``, the
    ``policy`` it was decided under (a reload may have replaced the engine's since), the
    parsed messages with the rule each matched (``steps``; empty when the request was
    refused before any rule or carried no body), and the ``counters`` it touched with the
    budget left (on a rate-limited denial, the counter that refused). The audit line, the
    metrics, the Envoy reply and the policy tools all read this one value."""

    decision: Decision
    policy: Policy
    steps: tuple[Step, ...] = ()
    counters: tuple[CounterState, ...] = ()

    def logged_call(self) -> mcp.Message | None:
        """The call whose arguments a ``log_arguments`` rule puts in the audit line: the
        decision's tool, in the batch element it names, if any."""
        decision = self.decision
        for step in self.steps:
            msg = step.msg
            if (
                msg.method == "tools/call"
                and msg.name == decision.tool
                and (decision.element is None or msg.index == decision.element)
            ):
                return msg
        return None
