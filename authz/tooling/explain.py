"""``explain``: one request decided by the very code the service runs, step by step, without
spending any budget."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from authz.decision import Step
from authz.engine import Engine
from authz.grants import grant_of
from authz.plan import caller_of, server_policy
from authz.policy import (
    Policy,
)
from authz.policy.callers import NOBODY, Caller
from authz.store import Charge, Outcome
from authz.tooling.common import load, request_of, rule_text


class _NothingSpent:
    """A counter store that lets every charge fit and records nothing: ``explain`` shows
    what a request would spend without spending it."""

    async def acquire(self, charges: Sequence[Charge], now_ms: int | None = None) -> Outcome:
        return Outcome(allowed=True, remaining=tuple(c.max - c.cost for c in charges))

    async def record(self, key: str, ttl_ms: int) -> None:
        """Nothing is recorded."""

    async def forget(self, key: str) -> None:
        """Nothing is recorded."""

    async def recorded(self, keys: Sequence[str]) -> tuple[bool, ...]:
        """Nothing is recorded: a session is taken as never issued."""
        return tuple(False for _ in keys)

    async def ping(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Nothing to release."""


def _caller_text(policy: Policy, caller: Caller, decided: str | None) -> str:
    """``nightly (in: exporters, nightly)``: the set the decision names, and every set the
    caller is in."""
    if decided is None:
        return "in no caller set"
    return f"{decided} (in: {', '.join(n for n in policy.callers if n in caller.sets)})"


def _print_step(step: Step, out: TextIO) -> None:
    msg = step.msg
    target = f" '{msg.name}'" if msg.name is not None and msg.method != "resources/read" else ""
    label = msg.method or "response"
    print(f"message {msg.index}: {label}{target}", file=out)
    if step.rule is None:
        print("  passes under any policy (lifecycle, listing, notification or response)", file=out)
        return
    print(f"  rule: {rule_text(step.rule)}", file=out)
    if step.arguments is not None:
        print(f"  arguments: {step.arguments or 'satisfy the rule schema'}", file=out)
    if step.denial is not None:
        mode = "would deny (dry-run)" if step.dry_run else "denied"
        print(f"  {mode}: {step.denial.code}: {step.text}", file=out)
    for spend in step.spends:
        key = f"key {spend.key}"
        if spend.fallback is not None:
            key += f"; {spend.fallback} unless the upstream issued this session to the grant"
        print(f"  would spend {spend.cost} against {spend.limit.describe()} ({key})", file=out)


def explain(
    policy_path: str,
    body: bytes,
    grant: str | None = None,
    headers: Mapping[str, str] | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    claims: Mapping[str, Any] | None = None,
    principal: str = "",
    server: str = "",
) -> int:
    """The decision for one request body (to ``server``, under a policy with servers), the
    rule each message matched, the limits it would spend against and why; consumes no
    budget. ``claims``: the caller's verified JWT claims; ``principal``: its mTLS
    principal."""
    policy = load(policy_path, err)
    if policy is None:
        return 2
    engine = Engine(policy, _NothingSpent())
    source = engine.grant_source(policy)
    request = request_of(body, headers or {}, source, claims, principal, server)
    if grant is None:
        grant = grant_of(request, source)
    deciding, _ = server_policy(policy, request)
    caller = caller_of(deciding, request, source, grant) if deciding is not None else NOBODY
    result = asyncio.run(engine.decide_for(policy, request, grant, caller))
    decision = result.decision
    print(f"grant: {grant or '(none)'}", file=out)
    if decision.server is not None:
        print(f"server: {decision.server or '(none)'}", file=out)
    if deciding is not None and deciding.callers:
        print(f"caller: {_caller_text(deciding, caller, decision.caller)}", file=out)
    for step in result.steps:
        _print_step(step, out)
    if decision.allowed:
        verdict = "allow"
        if any(s.spends for s in result.steps):
            verdict += " if every counter above has budget left (explain spends none)"
        if decision.would_deny is not None:
            verdict += f"; dry-run would deny: {decision.would_deny.code}: {decision.message}"
        print(f"decision: {verdict}", file=out)
        return 0
    print(
        f"decision: deny {decision.reason.status} {decision.reason.code}: {decision.message}",
        file=out,
    )
    if decision.challenge is not None:
        print(f"  www-authenticate: {decision.challenge}", file=out)
    return 1
