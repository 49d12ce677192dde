"""The decision for one HTTP request under the current policy, with counters from a store.

The order of the steps is the order of trust: transport checks, strict parsing, header and
body agreement, identity, the rule of every message (action, arguments, costs), and only
when every message passes, one all-or-nothing spend against the counters (a denied call
consumes no budget).

:func:`plan` does everything but the spend and is pure, so ``mcp-authz explain`` shows
what a request would touch without consuming anything; :meth:`Engine.check` spends.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from msgspec.structs import replace

from authz import mcp, records
from authz.approvals import Approval, ApprovalBook, Binding, Verdict
from authz.catalogue import Annotations, Catalogue
from authz.grants import BEARER, GrantSource, Source, claims_of, grant_of
from authz.listing import LIST_METHODS
from authz.policy import Action, Limit, Policy, PolicyError, Rule, Scope
from authz.policy.callers import NOBODY, Caller, identity_of, recognise
from authz.store import Charge, CounterStore, Outcome, StoreUnavailable

log = logging.getLogger("mcp_authz")

# Lifecycle and listing methods pass under any policy: an agent must be able to connect
# and discover what exists; the calls that act are what the policy governs. Unsubscribing
# only stops notifications.
UNGOVERNED = frozenset(
    {
        "initialize",
        "ping",
        "tools/list",
        "resources/list",
        "resources/templates/list",
        "resources/unsubscribe",
        "prompts/list",
        "server/discover",
        # Lists only the caller's own tasks (filtered from the response, authz.records).
        mcp.TASK_LIST,
    }
)

# Methods that carry no body and only open or close a stream or session.
BODYLESS_METHODS = frozenset({"GET", "DELETE", "HEAD", "OPTIONS"})

PARTIAL_BODY_HEADER = "x-envoy-auth-partial-body"

# Before anything is learnt: every tool counts as the specification's defaults say.
NO_CATALOGUE = Catalogue()


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

_PROBLEM_REASON = {
    mcp.Problem.MALFORMED: Reason.MALFORMED,
    mcp.Problem.HEADER_MISMATCH: Reason.HEADER_MISMATCH,
    mcp.Problem.UNSUPPORTED_MEDIA: Reason.UNSUPPORTED_MEDIA,
    mcp.Problem.PARTIAL_BODY: Reason.PARTIAL_BODY,
    mcp.Problem.METHOD_NOT_ALLOWED: Reason.METHOD_NOT_ALLOWED,
    mcp.Problem.UNSUPPORTED_VERSION: Reason.UNSUPPORTED_VERSION,
}

# Longest MCP-Protocol-Version value an unsupported-version refusal echoes.
MAX_ECHOED_VERSION = 64


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
        return self.reason is Reason.ALLOWED

    @property
    def labels(self) -> tuple[str, str]:
        """(decision, reason) as the audit line and the metrics name them: ``allow`` or
        ``deny`` with the reason code; ``dry_run_deny`` with the reason a rule in dry-run
        mode would have denied for (the call was allowed)."""
        if self.would_deny is not None and self.reason is Reason.ALLOWED:
            return "dry_run_deny", self.would_deny.code
        return ("allow" if self.reason is Reason.ALLOWED else "deny"), self.reason.code

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


def counter_key(limit: Limit, grant: str, session: str | None = None) -> str:
    """The store key of a limit.

    Every key of one grant shares the ``{g:...}`` hash tag, so a request's grant-scoped
    and session-scoped counters (and the session records they depend on) live in one
    Redis Cluster slot. A session key hashes the grant and the client-supplied session id
    together (bounded, and no session can touch another grant's); a request without a
    session spends its grant's counter instead, and so does one whose session the
    upstream never issued to its grant (see :class:`authz.store.Charge`).

    Under a policy with servers, a server's counter is named ``server:<name>:<counter>``
    (and a global one is tagged ``{global:<name>}``, a slot per server), so the same
    counter name on two servers never shares a budget; a budget is ``budget:<name>``,
    shared by every server on purpose. The grant tag stays the grant's alone, so a call's
    grant-scoped counters and budgets are still one slot, one round trip. (These names
    start with ``server:`` or ``budget:``, never with a record's ``session:`` or
    ``task:``.)
    """
    name = limit.counter
    if limit.budget:
        name = f"budget:{name}"
    elif limit.server:
        name = f"server:{limit.server}:{name}"
    if limit.scope is Scope.GLOBAL:
        tag = f"global:{limit.server}" if limit.server else "global"
        return f"mcpauthz:{{{tag}}}:{name}"
    if limit.scope is Scope.SESSION and session is not None:
        return records.session_counter(grant, session, name)
    return f"{records.grant_prefix(grant)}{name}"


# Longest name a denial echoes (MCP tool names have at most 128 characters); a longer one
# is cut, so a 1 MiB name does not come back in the reply.
MAX_ECHOED_NAME = 128


def _subject(msg: mcp.Message) -> str:
    """How a denial names its target. Resource URIs are not echoed: they may identify a
    patient; the rule that matched is in the audit line."""
    name = msg.name or ""
    if len(name) > MAX_ECHOED_NAME:
        name = name[:MAX_ECHOED_NAME] + "..."
    if msg.method == "tools/call":
        return f"tool '{name}'"
    if msg.method == "prompts/get":
        return f"prompt '{name}'"
    return f"method '{msg.method}'"


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


class Plan(msgspec.Struct, frozen=True):
    """A request's decision up to the spend, under ``policy``. ``refusal`` is set when it
    was refused before any rule (transport, parsing); ``body`` is ``None`` for a bodyless
    stream request. ``caller``: the caller set the decision names (see
    :attr:`Decision.caller`)."""

    policy: Policy
    grant: str | None
    refusal: Decision | None = None
    body: mcp.Body | None = None
    steps: tuple[Step, ...] = ()
    caller: str | None = None


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


def rule_for(policy: Policy, msg: mcp.Message, catalogue: Catalogue = NO_CATALOGUE) -> Rule:
    """The rule governing a governed message (see :data:`UNGOVERNED`); a tool's risk
    class comes from ``catalogue``."""
    if msg.method == "tools/call":
        name = msg.name or ""
        return policy.rule_for_tool(name, catalogue.hints(name))
    if msg.method in ("resources/read", "resources/subscribe", mcp.LISTEN):
        return policy.rule_for_resource(msg.name or "")
    if msg.method == "prompts/get":
        return policy.rule_for_prompt(msg.name or "")
    return policy.default


def server_policy(policy: Policy, request: mcp.HttpRequest) -> tuple[Policy | None, str | None]:
    """The policy that decides ``request``, and the server it is for: ``policy`` itself
    and ``None`` under a policy without servers; under one with servers, the policy of
    the server the gateway names (see :meth:`Policy.server_name`), or ``None`` when the
    policy defines no such server."""
    if policy.servers is None:
        return policy, None
    name = policy.server_name(request.server, request.destination_principal, request.host)
    return policy.servers.get(name), name


def caller_of(
    policy: Policy, request: mcp.HttpRequest, source: GrantSource, grant: str | None
) -> Caller:
    """The caller sets of ``policy`` a request's caller, known by ``grant``, belongs to
    (derived only when the policy names any)."""
    if not policy.callers:
        return NOBODY
    return recognise(policy.callers, identity_of(request, claims_of(request, source), grant))


def plan(
    policy: Policy,
    request: mcp.HttpRequest,
    grant: str | None,
    caller: Caller = NOBODY,
    catalogue: Catalogue = NO_CATALOGUE,
) -> Plan:
    """Everything about a request's decision except spending: pure, consumes nothing.
    ``catalogue``: the upstream's tools as known (their risk classes, and which names it
    lists)."""
    try:
        body = _parse(request, policy.max_json_members)
    except mcp.Malformed as exc:
        requested = None
        if exc.problem is mcp.Problem.UNSUPPORTED_VERSION:
            requested = request.headers.get("mcp-protocol-version", "")[:MAX_ECHOED_VERSION]
        refusal = Decision(
            reason=_PROBLEM_REASON[exc.problem],
            message=f"policy violation: malformed request: {exc.detail}",
            grant=grant,
            ids=exc.ids,
            caller=caller.first,
            requested_version=requested,
        )
        return Plan(policy, grant, refusal=refusal, caller=caller.first)
    if body is None:
        return Plan(policy, grant, caller=caller.first)
    steps = tuple(
        _step(policy, target, grant, request.headers, caller, catalogue)
        for msg in body.messages
        for target in _targets(msg)
    )
    named = caller.first
    if policy.callers:
        named = next((s.caller for s in steps if s.caller is not None), named)
    return Plan(policy, grant, body=body, steps=steps, caller=named)


def _targets(msg: mcp.Message) -> tuple[mcp.Message, ...]:
    """What the policy judges of a message: the message, or for a subscriptions/listen
    that subscribes to resources, each of them as its target (governed as
    resources/subscribe is; without any, the stream is lifecycle)."""
    if not msg.subscriptions:
        return (msg,)
    return tuple(replace(msg, name=uri, subscriptions=()) for uri in msg.subscriptions)


def _step_up(policy: Policy, entry: Rule, caller: Caller, chosen: Rule | None) -> str | None:
    """The ``WWW-Authenticate`` challenge for a caller refused by an entry with variants
    (none matched, or ``chosen`` denies) when a token with more scopes would put it in a
    caller set of an earlier variant; ``None`` when no scope would help."""
    for variant in entry.variants:
        if variant is chosen:
            return None
        for name in variant.callers:
            needed = caller.short.get(name)
            if needed:
                challenge = f'Bearer error="insufficient_scope", scope="{" ".join(needed)}"'
                if policy.resource_metadata:
                    challenge += f', resource_metadata="{policy.resource_metadata}"'
                return challenge
    return None


def _step(
    policy: Policy,
    msg: mcp.Message,
    grant: str | None,
    headers: Mapping[str, str],
    caller: Caller,
    catalogue: Catalogue = NO_CATALOGUE,
) -> Step:
    if msg.kind is mcp.Kind.RESPONSE or msg.method is None:
        return Step(msg, None)
    if (
        msg.method in UNGOVERNED
        or msg.method in mcp.NOTIFICATIONS
        or (msg.method == mcp.LISTEN and msg.name is None)
    ):
        return Step(msg, None)
    if msg.method in mcp.TASK_METHODS:
        # No rule: the call that created the task was governed. Whose task it is, the
        # check asks the store (Engine.decide).
        if grant is None:
            return Step(msg, None, Reason.NO_GRANT, f"{_subject(msg)}: no grant identity")
        return Step(msg, None)
    rule = rule_for(policy, msg, catalogue)
    subject = _subject(msg)
    if msg.method == "tools/call" and grant is None:
        return Step(msg, rule, Reason.NO_GRANT, f"{subject}: no grant identity")
    if msg.method == "tools/call" and policy.deny_unlisted:
        unlisted = _unlisted(msg.name or "", catalogue)
        if unlisted is not None:
            return Step(msg, rule, Reason.UNKNOWN_TOOL, f"{subject}: {unlisted}")
    matched = None
    if rule.variants:
        entry, chosen = rule, rule.variant_for(caller.sets)
        if chosen is None:
            text = f"{subject} is not permitted for this caller"
            challenge = _step_up(policy, entry, caller, None)
            return Step(msg, rule, Reason.CALLER_NOT_PERMITTED, text, challenge=challenge)
        rule, matched = chosen
        if rule.action is Action.DENY:
            text = f"{subject} denied: {rule.reason or 'denied by policy'}"
            challenge = _step_up(policy, entry, caller, rule)
            return Step(msg, rule, Reason.DENIED_BY_RULE, text, caller=matched, challenge=challenge)
    if rule.param_headers and msg.method == "tools/call":
        try:
            mcp.check_param_headers(headers, rule.param_headers, msg.arguments)
        except mcp.Malformed as exc:
            return Step(
                msg, rule, Reason.HEADER_MISMATCH, f"{subject}: {exc.detail}", caller=matched
            )
    if rule.action is Action.DENY:
        if rule.where == "default":
            text = f"{subject} is not allowed by this policy (default deny)"
            return Step(msg, rule, Reason.DENIED_BY_DEFAULT, text)
        text = f"{subject} denied: {rule.reason or 'denied by policy'}"
        return Step(msg, rule, Reason.DENIED_BY_RULE, text)
    limits = rule.limits
    if policy.callers:  # a limit may apply to some caller sets only
        limits = tuple(lim for lim in limits if _applies(lim.callers, caller.sets))
    checked = rule.argument_problems(msg.arguments) if rule.arguments is not None else None
    costs = [limit.cost_of(msg.arguments) for limit in limits]
    problems = checked
    if problems is None and limits:
        problems = next((c for c in costs if isinstance(c, str)), None)
    arguments = None if rule.arguments is None else checked or ""
    if problems is not None:
        text = f"{subject}: invalid arguments: {problems}"
        return Step(msg, rule, Reason.ARGUMENTS_INVALID, text, arguments=arguments, caller=matched)
    spends = []
    for limit, cost in zip(limits, costs, strict=True):
        assert isinstance(cost, int)  # problems above returned otherwise
        if limit.scope is not Scope.GLOBAL and grant is None:
            text = f"{subject}: no grant identity"
            return Step(msg, rule, Reason.NO_GRANT, text, arguments=arguments, caller=matched)
        session = None
        if limit.scope is Scope.SESSION:
            try:
                session = mcp.session_id(headers)
            except mcp.Malformed as exc:
                text = f"{subject}: {exc.detail}"
                return Step(msg, rule, Reason.MALFORMED, text, arguments=arguments, caller=matched)
        key = counter_key(limit, grant or "", session)
        spend = Spend(msg=msg, rule=rule, limit=limit, key=key, cost=cost)
        if session is not None and grant is not None:
            spend = replace(
                spend,
                session=records.session_record(grant, session),
                fallback=counter_key(limit, grant),
            )
        spends.append(spend)
    if rule.action is Action.REQUIRE_APPROVAL:
        # The spends stay on the step: an approved call still spends against its limits.
        text = f"{subject}: approval required" + (f" ({rule.reason})" if rule.reason else "")
        return Step(
            msg,
            rule,
            Reason.APPROVAL_REQUIRED,
            text,
            spends=tuple(spends),
            arguments=arguments,
            caller=matched,
        )
    return Step(msg, rule, spends=tuple(spends), arguments=arguments, caller=matched)


def _unlisted(name: str, catalogue: Catalogue) -> str | None:
    """Why a call to ``name`` is refused under ``unlisted_tools: deny``, or ``None``. Until
    the upstream's list is known, a call is refused only when mcp-authz fetches the list
    itself (fail closed: it will be known shortly); otherwise the rules alone judge it, as
    there is no list to judge by until a client lists the tools."""
    if catalogue.known:
        return None if name in catalogue.tools else "not a tool the upstream lists"
    if catalogue.awaited:
        return "the upstream's tool list is not known yet"
    return None


def _session_event(request: mcp.HttpRequest, result: CheckResult) -> str | None:
    """Whether the response to an allowed request issues a session (an ``initialize``) or
    ends one (a ``DELETE`` naming it), on a revision with sessions, for a known grant:
    only then is a session recorded or dropped."""
    decision = result.decision
    if not decision.allowed or decision.grant is None or mcp.stateless(request.headers):
        return None
    if request.method.upper() == "DELETE":
        try:
            return "close" if mcp.session_id(request.headers) is not None else None
        except mcp.Malformed:
            return None
    initializes = any(
        s.msg.method == "initialize" and s.msg.kind is mcp.Kind.REQUEST for s in result.steps
    )
    return "open" if initializes else None


def _task_event(result: CheckResult) -> str | None:
    """Whether the response to an allowed request creates tasks (a task-augmented
    ``tools/call``) or lists them (``tasks/list``): only then is it read."""
    if not result.decision.allowed:
        return None
    requests = [s.msg for s in result.steps if s.msg.kind is mcp.Kind.REQUEST]
    if any(m.method == mcp.TASK_LIST for m in requests):
        return "list"
    if result.decision.grant is not None and any(
        m.method == "tools/call" and m.task for m in requests
    ):
        return "create"
    return None


def _applies(sets: tuple[str, ...], caller_sets: frozenset[str]) -> bool:
    """A limit listing ``sets`` applies to a caller in ``caller_sets``."""
    return not sets or any(name in caller_sets for name in sets)


class Engine:
    """Decides requests. ``policy`` may be replaced at any time (hot reload, through
    :meth:`swap`): a check reads it once at its start and finishes on that policy."""

    def __init__(
        self,
        policy: Policy,
        store: CounterStore,
        *,
        grant_header: str | None = None,
        fail_open: bool = False,
        clock: Callable[[], int | None] = lambda: None,
        approvals: ApprovalBook | None = None,
        approval_events: Callable[[str, Approval], None] = lambda event, approval: None,
        catalogue: Catalogue = NO_CATALOGUE,
    ) -> None:
        self.store = store
        # The upstream's tools as learnt from its lists; replaced whole (see learn_tools).
        self.catalogue = catalogue
        # Without a book, require_approval denies with "approval required".
        self.approvals = approvals
        # Told "requested" when a request opens and "consumed" when an approved call passes.
        self.approval_events = approval_events
        self.grant_header = grant_header
        self.fail_open = fail_open
        self.clock = clock
        self._flag_source = (
            GrantSource(Source.HEADER, header=grant_header.lower()) if grant_header else BEARER
        )
        self.swap(policy)

    def swap(self, policy: Policy) -> None:
        """Put ``policy`` in force, or raise :class:`PolicyError` if this engine cannot run
        it (it names an identity source while ``--grant-header`` names another)."""
        if policy.grants is not None and self.grant_header:
            raise PolicyError(
                [
                    "grants: the policy chooses the grant identity source, and so does "
                    "--grant-header (MCP_AUTHZ_GRANT_HEADER); remove one of them"
                ]
            )
        self.policy = policy

    def learn_tools(self, tools: list[tuple[str, Annotations]], complete: bool) -> None:
        """Add one page of the upstream's ``tools/list`` to the catalogue (``complete``:
        its last page). A replaced catalogue, never one changed in place: a check reads
        one consistent catalogue."""
        self.catalogue = self.catalogue.learnt(tools, complete)

    def grant_source(self, policy: Policy) -> GrantSource:
        return policy.grants or self._flag_source

    async def check(self, request: mcp.HttpRequest) -> CheckResult:
        """Decide ``request`` under the policy in force at its start. Never raises: a bug
        denies (fail closed) with ``internal_error``, logged without the request."""
        policy = self.policy
        try:
            source = self.grant_source(policy)
            deciding, _ = server_policy(policy, request)
            if deciding is not None and deciding.callers:  # the caller's identity, derived once
                claims = claims_of(request, source)
                grant = grant_of(request, source, claims)
                caller = recognise(deciding.callers, identity_of(request, claims, grant))
            else:
                grant, caller = grant_of(request, source), NOBODY
            result = await self.decide_for(policy, request, grant, caller)
            event = _session_event(request, result)
            if event is not None:
                result = replace(result, decision=replace(result.decision, session_event=event))
            tasks = _task_event(result)
            if tasks is not None:
                result = replace(result, decision=replace(result.decision, task_event=tasks))
            return result
        except Exception as exc:  # a bug must deny, never allow or crash
            log.error("check failed: %s", type(exc).__name__)
            internal = Decision(
                reason=Reason.INTERNAL_ERROR,
                message="policy violation: internal error in the authorization service",
            )
            return CheckResult(internal, policy)

    async def decide_for(
        self,
        policy: Policy,
        request: mcp.HttpRequest,
        grant: str | None,
        caller: Caller | None = None,
    ) -> CheckResult:
        """Decide ``request`` under ``policy``; a policy with servers first picks the policy
        of the server the gateway says the request is for, and refuses it (fail closed) with
        ``unknown_server`` when it defines no such server. ``caller``: the caller sets of the
        deciding policy the caller is in (derived from ``grant`` when not given)."""
        deciding, server = server_policy(policy, request)
        if deciding is None:
            return CheckResult(_unknown_server(server or "", grant), policy)
        if caller is None:
            caller = caller_of(deciding, request, self.grant_source(policy), grant)
        result = await self.decide(plan(deciding, request, grant, caller, self.catalogue))
        decision = result.decision
        if caller.sets and decision.lists and decision.allowed:
            decision = replace(decision, caller_sets=tuple(sorted(caller.sets)))
        if server is not None:
            decision = replace(decision, server=server)
        return replace(result, decision=decision)

    async def decide(self, planned: Plan) -> CheckResult:
        """Deny on the first enforced denial; otherwise spend, all or nothing. The decision
        names the caller set of the plan."""
        policy, steps, caller = planned.policy, planned.steps, planned.caller
        if planned.refusal is not None:
            return CheckResult(planned.refusal, policy)
        body, grant = planned.body, planned.grant
        if body is None:
            return CheckResult(Decision(reason=Reason.ALLOWED, grant=grant, caller=caller), policy)
        would: Decision | None = None
        spends: list[Spend] = []
        approved: list[Approval] = []
        for step in steps:
            if step.denial is None:
                spends.extend(step.spends)
                continue
            denial = _denial(step, body, grant, caller)
            if step.denial is Reason.APPROVAL_REQUIRED and self.approvals and not step.dry_run:
                gated = await self._gate(self.approvals, step, denial, policy.digest, policy.server)
                if isinstance(gated, Decision):
                    return CheckResult(gated, policy, steps)
                approved.append(gated)
                spends.extend(step.spends)
                continue
            if not step.dry_run:
                return CheckResult(denial, policy, steps)
            would = would or denial
        tasks = [s.msg for s in steps if s.msg.task_id is not None]
        if tasks and grant is not None:
            foreign = await self._foreign_task(tasks, body, grant, caller)
            if foreign is not None:
                return CheckResult(foreign, policy, steps)
        first = _first_governed(steps)
        spent = _Spent()
        if spends:
            spent = await self._spend(spends, body, grant, caller)
            if spent.refusal is not None:
                for approval in approved:  # the call did not happen: give the use back
                    await _refund(self.approvals, approval)
                return CheckResult(spent.refusal, policy, steps, spent.counters)
            would = would or spent.would
        for approval in approved:
            self.approval_events("consumed", approval)
        decision = _about(
            first.msg,
            first.rule,
            body,
            grant,
            caller,
            dry_run=any(s.rule is not None and s.rule.dry_run for s in steps),
            fail_open=spent.fail_open,
        )
        if would is not None:
            decision = replace(
                decision,
                would_deny=would.reason,
                message=would.message,
                rule=would.rule,
                counter=would.counter,
                element=would.element,
            )
        return CheckResult(decision, policy, steps, spent.counters)

    async def _foreign_task(
        self, tasks: list[mcp.Message], body: mcp.Body, grant: str, caller: str | None
    ) -> Decision | None:
        """The refusal of a request naming a task not created by ``grant`` (another
        grant's, made up, or expired), or ``None`` when every task it names is its own.
        A store that cannot answer refuses (503), never lets it through."""
        keys = [records.task_record(grant, m.task_id or "") for m in tasks]
        try:
            owned = await self.store.recorded(keys)
        except StoreUnavailable:
            return replace(
                _about(tasks[0], None, body, grant, caller),
                reason=Reason.STORE_UNAVAILABLE,
                message=f"policy violation: {_subject(tasks[0])}: task store unavailable",
            )
        for msg, own in zip(tasks, owned, strict=True):
            if not own:
                where = f"batch element {msg.index}: " if body.batch else ""
                return replace(
                    _about(msg, None, body, grant, caller),
                    reason=Reason.TASK_NOT_OWNED,
                    message=(
                        f"policy violation: {where}{_subject(msg)}: the task was not created "
                        "by this caller, or has expired"
                    ),
                    element=msg.index if body.batch else None,
                )
        return None

    async def _gate(
        self, book: ApprovalBook, step: Step, denial: Decision, policy_digest: str, server: str
    ) -> Decision | Approval:
        """The approval for this exact call: one approved use (consumed), or the denial
        saying the request is pending (opened now or earlier) or was rejected."""
        msg, rule = step.msg, step.rule
        assert rule is not None and rule.approval is not None and denial.grant is not None
        subject = _subject(msg)
        if denial.batch:
            return replace(
                denial, message=f"{denial.message}: send a call that needs approval on its own"
            )
        binding = Binding(
            grant=denial.grant,
            tool=msg.name or "",
            arguments_sha256=denial.arguments_sha256 or "",
            argument_names=tuple(sorted(msg.arguments)),
            policy_digest=policy_digest,
            server=server,
            caller=denial.caller or "",
        )
        spec = rule.approval
        try:
            gate = await book.gate(binding, spec.ttl_s, spec.uses, spec.notify)
        except StoreUnavailable:
            # Never fail open here: an outage must not stand in for a person's yes.
            return replace(
                denial,
                reason=Reason.STORE_UNAVAILABLE,
                message=f"policy violation: {subject}: approval store unavailable",
            )
        approval = gate.approval
        if gate.verdict is Verdict.APPROVED:
            return approval
        if gate.verdict is Verdict.REJECTED:
            return replace(
                denial,
                reason=Reason.APPROVAL_REJECTED,
                approval_id=approval.id,
                message=(
                    f"policy violation: {subject}: approval {approval.id} was rejected: "
                    f"{approval.reason or 'no reason given'}"
                ),
            )
        if gate.verdict is Verdict.CREATED:
            self.approval_events("requested", approval)
        minutes = max(1, math.ceil((approval.expires_at - time.time()) / 60))
        why = f" ({rule.reason})" if rule.reason else ""
        return replace(
            denial,
            approval_id=approval.id,
            message=(
                f"policy violation: {subject} requires human approval{why}: request "
                f"{approval.id} is pending and expires in {minutes} min; ask an operator to "
                "approve it, then retry the identical call"
            ),
        )

    async def _spend(
        self, spends: list[Spend], body: mcp.Body, grant: str | None, caller: str | None
    ) -> _Spent:
        """Charge every spend at once.

        A dry-run limit that is spent leaves out the spends of its message (under
        enforcement that message would be denied and spend nothing) and the rest is
        charged again, so dry-run counts follow what enforcement would count.
        """
        would: Decision | None = None
        while spends:
            charges, first = _charges(spends)
            try:
                outcome = await self.store.acquire(charges, self.clock())
            except StoreUnavailable:
                denial = replace(
                    _about(spends[0].msg, spends[0].rule, body, grant, caller),
                    reason=Reason.STORE_UNAVAILABLE,
                    message=(
                        f"policy violation: {_subject(spends[0].msg)}: rate-limit store unavailable"
                    ),
                )
                if all(s.rule.dry_run for s in spends):
                    return _Spent(would=would or denial)
                if self.fail_open:
                    return _Spent(fail_open=True, would=would)
                return _Spent(refusal=denial)
            if outcome.allowed:
                counters = tuple(
                    CounterState(first[c.key].limit.counter, left, c.max)
                    for c, left in zip(charges, outcome.remaining, strict=True)
                )
                return _Spent(counters=counters, would=would)
            assert outcome.refused is not None
            refused = first[charges[outcome.refused].key]
            denial = _rate_limited(refused, outcome, body, grant, caller)
            if not refused.rule.dry_run:
                left = outcome.remaining[outcome.refused]
                state = CounterState(refused.limit.counter, left, refused.limit.max)
                return _Spent(refusal=denial, counters=(state,))
            would = would or denial
            spends = [s for s in spends if s.msg.index != refused.msg.index]
        return _Spent(would=would)


async def _refund(book: ApprovalBook | None, approval: Approval) -> None:
    if book is None:
        return
    with contextlib.suppress(StoreUnavailable):  # the use then stays spent: fail closed
        await book.refund(approval)


class _Spent(msgspec.Struct, frozen=True):
    """What a spend came to: the ``counters`` it left (and whether it was let through by
    ``fail_open``), with a dry-run ``would`` deny; or an enforced ``refusal`` (with the
    counter that refused, if one did)."""

    refusal: Decision | None = None
    counters: tuple[CounterState, ...] = ()
    fail_open: bool = False
    would: Decision | None = None


def _charges(spends: list[Spend]) -> tuple[list[Charge], dict[str, Spend]]:
    """One charge per key, costs added up: a batch calling a tool twice spends twice.
    Keys whose cost adds up to 0 are left out."""
    costs: dict[str, int] = {}
    first: dict[str, Spend] = {}
    for spend in spends:
        costs[spend.key] = costs.get(spend.key, 0) + spend.cost
        first.setdefault(spend.key, spend)
    charges = [
        Charge(
            key=k,
            window_ms=first[k].limit.window_ms,
            max=first[k].limit.max,
            cost=c,
            session=first[k].session,
            fallback=first[k].fallback,
        )
        for k, c in costs.items()
        if c > 0
    ]
    return charges, first


def _rate_limited(
    spend: Spend, outcome: Outcome, body: mcp.Body, grant: str | None, caller: str | None
) -> Decision:
    assert outcome.refused is not None
    lim = spend.limit
    retry = max(1, math.ceil(outcome.retry_after_ms / 1000))
    where = f"batch element {spend.msg.index}: " if body.batch else ""
    unit = "units " if lim.cost_pointer is not None or lim.cost != 1 else ""
    kind = "budget" if lim.budget else "counter"
    allows = f"{lim.max} {unit}per {lim.window_text}"
    scope = {Scope.GLOBAL: " for all callers", Scope.SESSION: " per session"}.get(lim.scope, "")
    return replace(
        _about(spend.msg, spend.rule, body, grant, caller),
        reason=Reason.RATE_LIMITED,
        message=(
            f"policy violation: {where}{_subject(spend.msg)}: rate limit exceeded "
            f"({kind} '{lim.counter}' allows {allows}{scope}); retry after {retry} s"
        ),
        rule=spend.rule.where,
        counter=lim.counter,
        retry_after_s=retry,
        element=spend.msg.index if body.batch else None,
    )


def _unknown_server(name: str, grant: str | None) -> Decision:
    """The refusal of a check for a server the policy does not define (fail closed)."""
    if name:
        shown = name if len(name) <= MAX_ECHOED_NAME else name[:MAX_ECHOED_NAME] + "..."
        text = f"MCP server '{shown}' is not defined by this policy"
    else:
        text = "the gateway did not say which MCP server this request is for"
    return Decision(
        reason=Reason.UNKNOWN_SERVER, message=f"policy violation: {text}", grant=grant, server=name
    )


def _denial(step: Step, body: mcp.Body, grant: str | None, caller: str | None) -> Decision:
    assert step.denial is not None
    where = f"batch element {step.msg.index}: " if body.batch else ""
    return replace(
        _about(step.msg, step.rule, body, grant, caller),
        reason=step.denial,
        message=f"policy violation: {where}{step.text}",
        element=step.msg.index if body.batch else None,
        challenge=step.challenge,
    )


def _first_governed(steps: tuple[Step, ...]) -> Step:
    """The message a request is logged under: its first call, else its first message."""
    for step in steps:
        if step.msg.kind is not mcp.Kind.RESPONSE and step.msg.method == "tools/call":
            return step
    return steps[0]


def _about(
    msg: mcp.Message,
    rule: Rule | None,
    body: mcp.Body,
    grant: str | None,
    caller: str | None,
    *,
    dry_run: bool = False,
    fail_open: bool = False,
) -> Decision:
    """An allow decision describing ``msg``; denials are derived from it with ``replace``."""
    is_call = msg.method == "tools/call"
    return Decision(
        reason=Reason.ALLOWED,
        grant=grant,
        caller=caller,
        method=msg.method,
        tool=msg.name if is_call else None,
        arguments_sha256=mcp.arguments_digest(msg.arguments) if is_call else None,
        rule=rule.where if rule is not None else None,
        ids=body.ids,
        batch=body.batch,
        log_arguments=is_call and rule is not None and rule.log_arguments,
        fail_open=fail_open,
        dry_run=dry_run,
        lists=tuple(
            m.method
            for m in body.messages
            if m.method in LIST_METHODS and m.kind is mcp.Kind.REQUEST
        ),
    )


def _parse(request: mcp.HttpRequest, max_json_members: int) -> mcp.Body | None:
    """Transport checks and parsing; ``None`` for a bodyless stream/session request."""
    method = request.method.upper()
    if method in BODYLESS_METHODS:
        if request.body:
            raise mcp.Malformed(mcp.Problem.MALFORMED, f"{method} request with a body")
        mcp.protocol_version(request.headers)
        return None
    if method != "POST":
        raise mcp.Malformed(mcp.Problem.METHOD_NOT_ALLOWED, f"HTTP method {method} not allowed")
    if request.headers.get(PARTIAL_BODY_HEADER, "").strip().lower() == "true":
        raise mcp.Malformed(mcp.Problem.PARTIAL_BODY, "body too large to inspect")
    mcp.check_media(request.headers)
    body = mcp.parse_body(request.body, max_members=max_json_members)
    mcp.check_headers(request.headers, body)
    if body.batch and any(
        m.task or m.method in mcp.TASK_METHODS or m.method == mcp.TASK_LIST for m in body.messages
    ):
        # Tasks (MCP 2025-11-25) came after batches were dropped (2025-06-18); a batch
        # would also take its response past the task filter (another's list route).
        raise mcp.Malformed(
            mcp.Problem.MALFORMED, "task requests cannot be sent in a batch", body.ids
        )
    return body
