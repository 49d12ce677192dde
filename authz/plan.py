"""A request's decision up to the spend, from the policy alone: pure, so ``mcp-authz explain``
shows what a request would touch without consuming anything.

The order of the steps is the order of trust: transport checks, strict parsing, header and
body agreement, identity, then the rule of every message (action, arguments, costs); only
when every message passes does the engine (:mod:`authz.engine`) spend, all or nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
from msgspec.structs import replace

from authz import mcp, mcp_headers, records
from authz.catalogue import Catalogue
from authz.decision import Decision, Reason, Spend, Step
from authz.grants import GrantSource, claims_of
from authz.policy import Action, Limit, Policy, Rule, Scope
from authz.policy.callers import NOBODY, Caller, identity_of, recognise

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


def subject_of(msg: mcp.Message) -> str:
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
            return Step(msg, None, Reason.NO_GRANT, f"{subject_of(msg)}: no grant identity")
        return Step(msg, None)
    rule = rule_for(policy, msg, catalogue)
    subject = subject_of(msg)
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
            mcp_headers.check_param_headers(headers, rule.param_headers, msg.arguments)
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
    priced = [(limit, limit.cost_of(msg.arguments)) for limit in limits] if limits else []
    problems = checked
    if problems is None and limits:
        problems = next((cost for _, cost in priced if isinstance(cost, str)), None)
    arguments = None if rule.arguments is None else checked or ""
    if problems is not None:
        text = f"{subject}: invalid arguments: {problems}"
        return Step(msg, rule, Reason.ARGUMENTS_INVALID, text, arguments=arguments, caller=matched)
    spends = []
    for limit, cost in priced:
        assert isinstance(cost, int)  # problems above returned otherwise
        if limit.scope is not Scope.GLOBAL and grant is None:
            text = f"{subject}: no grant identity"
            return Step(msg, rule, Reason.NO_GRANT, text, arguments=arguments, caller=matched)
        session = None
        if limit.scope is Scope.SESSION:
            try:
                session = mcp_headers.session_id(headers)
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


def _applies(sets: tuple[str, ...], caller_sets: frozenset[str]) -> bool:
    """A limit listing ``sets`` applies to a caller in ``caller_sets``."""
    return not sets or any(name in caller_sets for name in sets)


def _parse(request: mcp.HttpRequest, max_json_members: int) -> mcp.Body | None:
    """Transport checks and parsing; ``None`` for a bodyless stream/session request."""
    method = request.method.upper()
    if method in BODYLESS_METHODS:
        if request.body:
            raise mcp.Malformed(mcp.Problem.MALFORMED, f"{method} request with a body")
        mcp_headers.protocol_version(request.headers)
        return None
    if method != "POST":
        raise mcp.Malformed(mcp.Problem.METHOD_NOT_ALLOWED, f"HTTP method {method} not allowed")
    if request.headers.get(PARTIAL_BODY_HEADER, "").strip().lower() == "true":
        raise mcp.Malformed(mcp.Problem.PARTIAL_BODY, "body too large to inspect")
    mcp_headers.check_media(request.headers)
    body = mcp.parse_body(request.body, max_members=max_json_members)
    mcp_headers.check_headers(request.headers, body)
    if body.batch and any(
        m.task or m.method in mcp.TASK_METHODS or m.method == mcp.TASK_LIST for m in body.messages
    ):
        # Tasks (MCP 2025-11-25) came after batches were dropped (2025-06-18); a batch
        # would also take its response past the task filter (another's list route).
        raise mcp.Malformed(
            mcp.Problem.MALFORMED, "task requests cannot be sent in a batch", body.ids
        )
    return body
