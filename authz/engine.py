"""The engine: decides requests under the policy in force, with counters from a store.

It plans a request (:func:`authz.plan.plan`, pure), then, when every message passes, gates
approvals and makes one all-or-nothing spend against the counters (a denied call consumes no
budget).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable

import msgspec
from msgspec.structs import replace

from authz import mcp, mcp_headers, records
from authz.approvals import Approval, ApprovalBook, Binding, Verdict
from authz.catalogue import Annotations, Catalogue
from authz.decision import CheckResult, CounterState, Decision, Reason, Spend, Step
from authz.grants import BEARER, GrantSource, Source, claims_of, grant_of
from authz.listing import LIST_METHODS
from authz.plan import (
    MAX_ECHOED_NAME,
    NO_CATALOGUE,
    Plan,
    caller_of,
    plan,
    server_policy,
    subject_of,
)
from authz.policy import Policy, PolicyError, Rule, Scope
from authz.policy.callers import NOBODY, Caller, identity_of, recognise
from authz.store import Charge, CounterStore, Outcome, StoreUnavailable

log = logging.getLogger("mcp_authz")


def _session_event(request: mcp.HttpRequest, result: CheckResult) -> str | None:
    """Whether the response to an allowed request issues a session (an ``initialize``) or
    ends one (a ``DELETE`` naming it), on a revision with sessions, for a known grant:
    only then is a session recorded or dropped."""
    decision = result.decision
    if not decision.allowed or decision.grant is None:
        return None
    if request.method.upper() == "DELETE":
        try:
            # None on a revision without sessions too (see mcp_headers.session_id).
            return "close" if mcp_headers.session_id(request.headers) is not None else None
        except mcp.Malformed:
            return None
    for step in result.steps:
        if step.msg.method == "initialize" and step.msg.kind is mcp.Kind.REQUEST:
            return None if mcp_headers.stateless(request.headers) else "open"
    return None


def _task_event(result: CheckResult) -> str | None:
    """Whether the response to an allowed request creates tasks (a task-augmented
    ``tools/call``) or lists them (``tasks/list``): only then is it read."""
    if not result.decision.allowed:
        return None
    creates = False
    for step in result.steps:
        msg = step.msg
        if msg.kind is mcp.Kind.REQUEST:
            if msg.method == mcp.TASK_LIST:
                return "list"
            creates = creates or (msg.method == "tools/call" and msg.task)
    return "create" if creates and result.decision.grant is not None else None


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
        # The upstream's tools as learnt from its lists (or fetched), under a policy without
        # servers; under one with servers, each server's tools are learnt from its own
        # lists, so one server's list never vouches for a name on another. Replaced whole,
        # never changed in place (see learn_tools).
        self.catalogue = catalogue
        self.server_catalogues: dict[str, Catalogue] = {}
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

    def catalogue_of(self, server: str | None) -> Catalogue:
        """The tools ``server`` lists (``None``: the upstream of a policy without servers)."""
        if server is None:
            return self.catalogue
        return self.server_catalogues.get(server, NO_CATALOGUE)

    def learn_tools(
        self, tools: list[tuple[str, Annotations]], complete: bool, server: str | None = None
    ) -> None:
        """Add one page of ``server``'s ``tools/list`` to its catalogue (``complete``: its
        last page). A replaced catalogue, never one changed in place: a check reads one
        consistent catalogue."""
        if server is None:
            self.catalogue = self.catalogue.learnt(tools, complete)
        else:
            self.server_catalogues[server] = self.catalogue_of(server).learnt(tools, complete)

    def grant_source(self, policy: Policy) -> GrantSource:
        return policy.grants or self._flag_source

    async def check(self, request: mcp.HttpRequest) -> CheckResult:
        """Decide ``request`` under the policy in force at its start. Never raises: a bug
        denies (fail closed) with ``internal_error``, logged without the request."""
        policy = self.policy
        try:
            source = self.grant_source(policy)
            deciding, server = server_policy(policy, request)
            if deciding is not None and deciding.callers:  # the caller's identity, derived once
                claims = claims_of(request, source)
                grant = grant_of(request, source, claims)
                caller = recognise(deciding.callers, identity_of(request, claims, grant))
            else:
                grant, caller = grant_of(request, source), NOBODY
            result = await self._decide_under(policy, deciding, server, request, grant, caller)
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
        if caller is None:
            caller = NOBODY
            if deciding is not None:
                caller = caller_of(deciding, request, self.grant_source(policy), grant)
        return await self._decide_under(policy, deciding, server, request, grant, caller)

    async def _decide_under(
        self,
        policy: Policy,
        deciding: Policy | None,
        server: str | None,
        request: mcp.HttpRequest,
        grant: str | None,
        caller: Caller,
    ) -> CheckResult:
        """Decide ``request`` under ``deciding``, the policy :func:`server_policy` picked
        from ``policy`` for ``server`` (``None``: no such server)."""
        if deciding is None:
            return CheckResult(_unknown_server(server or "", grant), policy)
        catalogue = self.catalogue_of(server)
        result = await self.decide(plan(deciding, request, grant, caller, catalogue))
        decision = result.decision
        if caller.sets and decision.lists and decision.allowed:
            decision = replace(decision, caller_sets=tuple(sorted(caller.sets)))
        if server is not None:
            decision = replace(decision, server=server)
        return result if decision is result.decision else replace(result, decision=decision)

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
        tasks: list[mcp.Message] = []  # the messages naming a task
        dry_run = False  # a rule in dry-run mode governs a message
        for step in steps:
            if step.msg.task_id is not None:
                tasks.append(step.msg)
            if step.rule is not None and step.rule.dry_run:
                dry_run = True
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
            dry_run=dry_run,
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
                message=f"policy violation: {subject_of(tasks[0])}: task store unavailable",
            )
        for msg, own in zip(tasks, owned, strict=True):
            if not own:
                where = f"batch element {msg.index}: " if body.batch else ""
                return replace(
                    _about(msg, None, body, grant, caller),
                    reason=Reason.TASK_NOT_OWNED,
                    message=(
                        f"policy violation: {where}{subject_of(msg)}: the task was not created "
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
        subject = subject_of(msg)
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
                        f"policy violation: {subject_of(spends[0].msg)}: "
                        "rate-limit store unavailable"
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
            key=key,
            window_ms=spend.limit.window_ms,
            max=spend.limit.max,
            cost=costs[key],
            session=spend.session,
            fallback=spend.fallback,
        )
        for key, spend in first.items()
        if costs[key] > 0
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
            f"policy violation: {where}{subject_of(spend.msg)}: rate limit exceeded "
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
