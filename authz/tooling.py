"""Tools for policy authors: ``check-policy``, ``explain`` and ``test``.

They decide through the very code the service runs (:meth:`authz.engine.Engine.decide_for`:
the server's policy, :func:`authz.engine.plan`, :meth:`authz.engine.Engine.decide`), so what
they print is what the gateway would do.
``explain`` consumes no budget; ``test`` gives every case fresh in-memory counters and a
fixed clock, so a policy's unit tests give the same result on every run and in CI.

Exit codes: ``check-policy`` and ``test``: 0 success, 1 an invalid policy or a failing
case, 2 unusable input (an invalid cases file, an MCP server that cannot be listed).
``explain``: 0 allowed, 1 denied, 2 an invalid policy.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TextIO

import jsonschema

from authz import mcp
from authz.engine import CheckResult, Decision, Engine, Reason, Step
from authz.grants import grant_of
from authz.policy import (
    Action,
    Policy,
    PolicyError,
    Rule,
    load_policy,
    parse_policy_text,
    syntax_of,
)
from authz.store import Charge, Outcome
from authz.store.memory import MemoryStore

# Cases run at this fixed time (Unix ms), so every repetition of a case lands in one window.
CASE_CLOCK_MS = 1_700_000_000_000
DEFAULT_CASE_GRANT = "test-grant"
LIST_TIMEOUT_S = 15.0

CASES_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["cases"],
    "properties": {
        "cases": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "expect"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "tool": {"type": "string"},
                    "resource": {"type": "string"},
                    "prompt": {"type": "string"},
                    "body": {"type": ["object", "array"]},
                    "arguments": {"type": "object"},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                    "grant": {"type": ["string", "null"]},
                    "repeat": {"type": "integer", "minimum": 1, "maximum": 10000},
                    "expect": {"enum": ["allow", "deny", "would_deny"]},
                    "reason": {"type": "string", "minLength": 1},
                    "server": {"type": "string", "minLength": 1},
                },
                "oneOf": [
                    {"required": ["tool"]},
                    {"required": ["resource"]},
                    {"required": ["prompt"]},
                    {"required": ["body"]},
                ],
            },
        }
    },
}


class _NothingSpent:
    """A counter store that lets every charge fit and records nothing: ``explain`` shows
    what a request would spend without spending it."""

    async def acquire(self, charges: Sequence[Charge], now_ms: int | None = None) -> Outcome:
        return Outcome(allowed=True, remaining=tuple(c.max - c.cost for c in charges))

    async def ping(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Nothing to release."""


def _print_errors(path: str, errors: Sequence[str], out: TextIO) -> None:
    print(f"{path}: invalid policy", file=out)
    for error in errors:
        print(f"  {error}", file=out)


def _load(path: str, err: TextIO) -> Policy | None:
    try:
        return load_policy(path)
    except PolicyError as exc:
        _print_errors(path, exc.errors, err)
        return None


def describe_rule(rule: Rule) -> str:
    """One line: ``allow, arguments checked, dry-run within counter 'c': 10 per minute ...``."""
    parts = [rule.action.value]
    if rule.arguments is not None:
        parts.append("arguments checked")
    if rule.dry_run:
        parts.append("dry-run")
    text = ", ".join(parts)
    if rule.limits:
        text += " within " + "; ".join(lim.describe() for lim in rule.limits)
    if rule.reason:
        text += f" (reason: {rule.reason})"
    return text


def _rule_text(rule: Rule) -> str:
    return f"{rule.where}{' (pattern)' if rule.pattern else ''}: {describe_rule(rule)}"


def _print_rules(policy: Policy, indent: str, out: TextIO) -> None:
    print(f"{indent}default: {describe_rule(policy.default)}", file=out)
    for noun, table in (
        ("tool", policy.tools),
        ("resource", policy.resources),
        ("prompt", policy.prompts),
    ):
        exact = sorted(k for k in table if "*" not in k)
        for key in [*exact, *table.patterns()]:
            rule = table[key]
            kind = " (pattern)" if rule.pattern else ""
            print(f"{indent}{noun} {key}{kind}: {describe_rule(rule)}", file=out)


def _print_policy(path: str, policy: Policy, out: TextIO) -> None:
    mode = "dry-run" if policy.dry_run else "enforce"
    if policy.servers is not None:
        mode = f"{len(policy.servers)} servers"
    print(f"{path}: ok (version {policy.version}, digest {policy.digest[:12]}, {mode})", file=out)
    source = (
        policy.grants.describe() if policy.grants else "from the command line (default: bearer)"
    )
    print(f"  grants: {source}", file=out)
    if policy.servers is None:
        _print_rules(policy, "  ", out)
    for budget in policy.budgets.values():
        print(f"  {budget.describe()}", file=out)
    for name, server in (policy.servers or {}).items():
        mode = "dry-run" if server.dry_run else "enforce"
        source = next((f" from {f.path}" for f in policy.files if f.server == name), "")
        print(f"  server {name}{source} ({mode}, digest {server.digest[:12]})", file=out)
        for kind, table in (("principal", policy.server_principals), ("host", policy.server_hosts)):
            for value, owner in table.items():
                if owner == name:
                    print(f"    matches destination {kind} {value}", file=out)
        _print_rules(server, "    ", out)
    for warning in policy.warnings:
        print(f"  warning: {warning}", file=out)


async def _server_tools(url: str, headers: Mapping[str, str]) -> list[str]:
    """Every tool a live MCP server lists (streamable HTTP, all pages)."""
    import anyio
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    names: list[str] = []
    with anyio.fail_after(LIST_TIMEOUT_S):
        async with (
            httpx2.AsyncClient(headers=dict(headers), timeout=LIST_TIMEOUT_S) as http,
            Client(
                streamable_http_client(url, http_client=http),
                read_timeout_seconds=LIST_TIMEOUT_S,
            ) as client,
        ):
            cursor: str | None = None
            while True:
                page = await client.list_tools(cursor=cursor)
                names.extend(tool.name for tool in page.tools)
                cursor = page.next_cursor
                if not cursor:
                    return names


def _innermost(exc: BaseException) -> BaseException:
    """The first leaf of (nested) exception groups: the error worth showing."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _print_against(
    url: str, policy: Policy, tools: Sequence[str], out: TextIO, indent: str = "  "
) -> None:
    print(f"{url}: {len(tools)} tools", file=out)
    used: set[str] = set()
    fallen = []
    for name in sorted(tools):
        rule = policy.rule_for_tool(name)
        print(f"{indent}tool {name} -> {_rule_text(rule)}", file=out)
        if rule.where == "default":
            fallen.append(name)
        else:
            used.add(rule.where)
    for key in policy.tools:
        rule = policy.tools[key]
        if rule.where in used:
            continue
        if rule.pattern:
            print(f"{indent}unmatched: {rule.where} matches no tool the server lists", file=out)
        else:
            print(f"{indent}unknown: {rule.where} names a tool the server does not list", file=out)
    if fallen:
        action = policy.default.action.value
        listed = ", ".join(fallen)
        print(f"{indent}{len(fallen)} tool(s) fall to default ({action}): {listed}", file=out)


def _print_estate(
    policy: Policy, listed: Mapping[str, tuple[str, Sequence[str]]], out: TextIO
) -> None:
    """Every tool of every server the agents can reach, its rule, and the budgets it spends:
    everything the agents can call, on one page."""
    assert policy.servers is not None
    total = sum(len(tools) for _, tools in listed.values())
    print(f"estate: {len(listed)} servers, {total} tools", file=out)
    spenders: dict[str, list[str]] = {name: [] for name in policy.budgets}
    for name, (url, tools) in listed.items():
        server = policy.servers[name]
        print(f"server {name}: ", end="", file=out)
        _print_against(url, server, tools, out, indent="  ")
        for tool in sorted(tools):
            rule = server.rule_for_tool(tool)
            for limit in rule.limits:
                if limit.budget and rule.action is not Action.DENY:
                    spenders[limit.counter].append(f"{name}/{tool}")
    for name in policy.servers:
        if name not in listed:
            print(f"server {name}: not listed (give --against {name}=URL)", file=out)
    for budget, tools in spenders.items():
        who = ", ".join(tools) if tools else "no listed tool"
        print(f"{policy.budgets[budget].describe()}: spent by {who}", file=out)


def _against_pairs(policy: Policy, against: Sequence[str], err: TextIO) -> dict[str, str] | None:
    """``--against`` values by server: ``NAME=URL`` for a policy with servers (every name
    one it defines); one plain ``URL`` otherwise (keyed ``""``)."""
    if policy.servers is None:
        if len(against) != 1:
            print("check-policy: a policy without servers takes one --against URL", file=err)
            return None
        return {"": against[0]}
    pairs: dict[str, str] = {}
    for value in against:
        name, sep, url = value.partition("=")
        if not sep or name not in policy.servers:
            known = ", ".join(policy.servers)
            print(
                f"check-policy: --against {value!r}: expected NAME=URL, NAME one of {known}",
                file=err,
            )
            return None
        pairs[name] = url
    return pairs


def check_policy(
    path: str,
    against: Sequence[str] | str | None = None,
    headers: Mapping[str, str] | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Validate and describe a policy; with ``against``, resolve live servers' tools: one
    URL for a policy without servers, ``NAME=URL`` per server for a policy with them."""
    policy = _load(path, err)
    if policy is None:
        return 1
    _print_policy(path, policy, out)
    if not against:
        return 0
    pairs = _against_pairs(policy, [against] if isinstance(against, str) else against, err)
    if pairs is None:
        return 2
    listed: dict[str, tuple[str, Sequence[str]]] = {}
    for name, url in pairs.items():
        try:
            listed[name] = (url, asyncio.run(_server_tools(url, headers or {})))
        except ImportError:
            print(
                "check-policy --against needs the mcp SDK: pip install 'mcp-authz[tooling]'",
                file=err,
            )
            return 2
        except Exception as exc:
            leaf = _innermost(exc)
            print(f"{url}: cannot list tools: {type(leaf).__name__}: {leaf}", file=err)
            return 2
    if policy.servers is None:
        url, tools = listed[""]
        _print_against(url, policy, tools, out)
    else:
        _print_estate(policy, listed, out)
    return 0


def _request(body: bytes, headers: Mapping[str, str], server: str = "") -> mcp.HttpRequest:
    lowered = {k.lower(): v for k, v in headers.items()}
    return mcp.HttpRequest(
        method="POST",
        headers={"content-type": "application/json", **lowered},
        body=body,
        server=server,
    )


def _print_step(step: Step, out: TextIO) -> None:
    msg = step.msg
    target = f" '{msg.name}'" if msg.name is not None and msg.method != "resources/read" else ""
    label = msg.method or "response"
    print(f"message {msg.index}: {label}{target}", file=out)
    if step.rule is None:
        print("  passes under any policy (lifecycle, listing, notification or response)", file=out)
        return
    print(f"  rule: {_rule_text(step.rule)}", file=out)
    if step.arguments is not None:
        print(f"  arguments: {step.arguments or 'satisfy the rule schema'}", file=out)
    if step.denial is not None:
        mode = "would deny (dry-run)" if step.dry_run else "denied"
        print(f"  {mode}: {step.denial.code}: {step.text}", file=out)
    for spend in step.spends:
        print(
            f"  would spend {spend.cost} against {spend.limit.describe()} (key {spend.key})",
            file=out,
        )


def explain(
    policy_path: str,
    body: bytes,
    grant: str | None = None,
    headers: Mapping[str, str] | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    server: str = "",
) -> int:
    """The decision for one request body (to ``server``, under a policy with servers), the
    rule each message matched, the limits it would spend against and why; consumes no
    budget."""
    policy = _load(policy_path, err)
    if policy is None:
        return 2
    engine = Engine(policy, _NothingSpent())
    request = _request(body, headers or {}, server)
    if grant is None:
        grant = grant_of(request, engine.grant_source(policy))
    result = asyncio.run(engine.decide_for(policy, request, grant))
    decision = result.decision
    print(f"grant: {grant or '(none)'}", file=out)
    if decision.server is not None:
        print(f"server: {decision.server or '(none)'}", file=out)
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
    return 1


@cache
def _cases_validator() -> jsonschema.protocols.Validator:
    return jsonschema.Draft202012Validator(CASES_SCHEMA)


def _case_body(case: Mapping[str, Any]) -> bytes:
    arguments = case.get("arguments", {})
    if "body" in case:
        doc: Any = case["body"]
    elif "tool" in case:
        doc = {"method": "tools/call", "params": {"name": case["tool"], "arguments": arguments}}
    elif "prompt" in case:
        doc = {"method": "prompts/get", "params": {"name": case["prompt"], "arguments": arguments}}
    else:
        doc = {"method": "resources/read", "params": {"uri": case["resource"]}}
    if "body" not in case:
        doc = {"jsonrpc": "2.0", "id": 1, **doc}
    return json.dumps(doc).encode()


def _outcome(decision: Decision) -> tuple[str, str]:
    """("allow" | "deny" | "would_deny", "<reason code>: <message>")."""
    if not decision.allowed:
        return "deny", f"{decision.reason.code}: {decision.message}"
    if decision.would_deny is not None:
        return "would_deny", f"{decision.would_deny.code}: {decision.message}"
    return "allow", Reason.ALLOWED.code


async def _run_case(policy: Policy, case: Mapping[str, Any]) -> CheckResult:
    engine = Engine(policy, MemoryStore(), clock=lambda: CASE_CLOCK_MS)
    request = _request(_case_body(case), case.get("headers", {}), case.get("server", ""))
    grant = case.get("grant", DEFAULT_CASE_GRANT)
    if grant is None:
        grant = grant_of(request, engine.grant_source(policy))
    result = await engine.decide_for(policy, request, grant)
    for _ in range(case.get("repeat", 1) - 1):
        result = await engine.decide_for(policy, request, grant)
    return result


def run_cases(
    policy_path: str, cases_path: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Run a policy's unit tests: one PASS/FAIL line per case, 1 if any failed."""
    policy = _load(policy_path, err)
    if policy is None:
        return 1
    try:
        doc = parse_policy_text(Path(cases_path).read_text(encoding="utf-8"), syntax_of(cases_path))
    except (OSError, UnicodeDecodeError) as exc:
        print(f"{cases_path}: cannot read: {exc}", file=err)
        return 2
    except PolicyError as exc:
        print(f"{cases_path}: {'; '.join(exc.errors)}", file=err)
        return 2
    problems = sorted(
        f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}"
        for e in _cases_validator().iter_errors(doc)  # type: ignore[arg-type]
    )
    if problems:
        print(f"{cases_path}: invalid cases", file=err)
        for problem in problems:
            print(f"  {problem}", file=err)
        return 2
    assert isinstance(doc, dict)
    failed = 0
    for case in doc["cases"]:
        result = asyncio.run(_run_case(policy, case))
        got, why = _outcome(result.decision)
        want, reason = case["expect"], case.get("reason")
        if got == want and (reason is None or reason in why):
            print(f"PASS  {case['name']}", file=out)
            continue
        failed += 1
        wanted = want + (f" with reason containing {reason!r}" if reason else "")
        print(f"FAIL  {case['name']}: expected {wanted}, got {got} ({why})", file=out)
    total = len(doc["cases"])
    print(f"{total - failed} passed, {failed} failed", file=out)
    return 1 if failed else 0
