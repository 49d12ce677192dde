"""Tools for policy authors: ``check-policy``, ``explain`` and ``test``.

They decide through the very code the service runs (:meth:`authz.engine.Engine.decide_for`:
the server's policy, :func:`authz.plan.plan`, :meth:`authz.engine.Engine.decide`), so what
they print is what the gateway would do.
``explain`` consumes no budget; ``test`` gives every case fresh in-memory counters and a
fixed clock, so a policy's unit tests give the same result on every run and in CI.

Exit codes: ``check-policy`` and ``test``: 0 success, 1 an invalid policy or a failing
case, 2 unusable input (an invalid cases file, an MCP server that cannot be listed).
``explain``: 0 allowed, 1 denied, 2 an invalid policy.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TextIO

import jsonschema

from authz import mcp
from authz.decision import CheckResult, Decision, Reason, Step
from authz.engine import Engine
from authz.grants import JWT_NAMESPACE, GrantSource, Source, grant_of
from authz.plan import caller_of, server_policy
from authz.policy import (
    Action,
    Policy,
    PolicyError,
    Rule,
    Scope,
    load_policy,
    parse_policy_text,
    syntax_of,
)
from authz.policy.callers import NOBODY, Caller
from authz.risk import annotations_of, risk_report
from authz.store import Charge, Outcome
from authz.store.memory import MemoryStore

# A server's tools as check-policy lists them: each name, with its annotations as sent.
Listed = Sequence[tuple[str, Mapping[str, Any] | None]]

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
                    "claims": {"type": "object"},
                    "scopes": {"type": "array", "items": {"type": "string", "minLength": 1}},
                    "principal": {"type": "string"},
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
    """One line: ``allow, arguments checked, dry-run within counter 'c': 10 per minute ...``;
    for a rule that depends on the caller, its variants in order."""
    if rule.variants:
        return "; then ".join(
            f"for {', '.join(v.callers) if v.callers else 'any other caller'}: {describe_rule(v)}"
            for v in rule.variants
        ) + ("" if not rule.variants[-1].callers else "; any other caller: not permitted")
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
    for name, caller_set in policy.callers.items():
        print(f"{indent}callers {name}: {caller_set.describe()}", file=out)
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

    for name, rule in policy.classes.items():
        print(f"{indent}class {name}: {describe_rule(rule)}", file=out)
    if policy.deny_unlisted:
        print(f"{indent}unlisted tools: denied (unknown_tool)", file=out)


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
        if server.callers:
            _print_matrix(server, _tool_keys(server), out, "    ")
    for warning in policy.warnings:
        print(f"  warning: {warning}", file=out)
    if policy.callers:
        _print_matrix(policy, _tool_keys(policy), out)


def _tool_keys(policy: Policy) -> list[str]:
    """The tool names a policy's rules name, then its patterns."""
    return [*sorted(k for k in policy.tools if "*" not in k), *policy.tools.patterns()]


ANYONE_ELSE = "anyone else"


def _cell(rule: Rule, sets: frozenset[str]) -> str:
    """What a caller in exactly ``sets`` gets from a rule: the action and the limits that
    apply to it (``allow 10/minute``), ``not permitted``, ``approval``, ``deny``."""
    if rule.variants:
        chosen = rule.variant_for(sets)
        if chosen is None:
            return "not permitted"
        rule = chosen[0]
    text = "approval" if rule.action is Action.REQUIRE_APPROVAL else rule.action.value
    for lim in rule.limits:
        if not lim.callers or any(name in sets for name in lim.callers):
            unit = "" if lim.cost_pointer is None and lim.cost == 1 else " units"
            shared = " global" if lim.scope is Scope.GLOBAL else ""
            text += f" {lim.max}{unit}/{lim.window_text}{shared}"
    if rule.arguments is not None:
        text += ", args checked"
    return text + (" (dry-run)" if rule.dry_run else "")


def _print_matrix(policy: Policy, tools: Sequence[str], out: TextIO, indent: str = "  ") -> None:
    """Who may call what: a row per tool (and one for any other tool, under ``default``),
    a column per caller set (a caller in that set only) and one for a caller in none."""
    columns = [*policy.callers, ANYONE_ELSE]
    rules = [(tool, policy.rule_for_tool(tool)) for tool in tools]
    rules.append(("(any other tool)", policy.default))
    rows = [
        [name, *(_cell(rule, frozenset([c]) - {ANYONE_ELSE}) for c in columns)]
        for name, rule in rules
    ]
    header = ["tool", *columns]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print(
        f"{indent}who may call what (a caller in several sets gets the first variant naming one):",
        file=out,
    )
    for row in [header, *rows]:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print(f"{indent}  {line.rstrip()}", file=out)


async def _server_tools(
    url: str, headers: Mapping[str, str]
) -> list[tuple[str, dict[str, Any] | None]]:
    """Every tool a live MCP server lists (streamable HTTP, all pages), with its
    annotations as the server sent them."""
    import anyio
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    tools: list[tuple[str, dict[str, Any] | None]] = []
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
                tools.extend(
                    (
                        tool.name,
                        tool.annotations.model_dump(by_alias=True, exclude_none=True)
                        if tool.annotations is not None
                        else None,
                    )
                    for tool in page.tools
                )
                cursor = page.next_cursor
                if not cursor:
                    return tools


def _innermost(exc: BaseException) -> BaseException:
    """The first leaf of (nested) exception groups: the error worth showing."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _print_against(
    url: str,
    policy: Policy,
    tools: Sequence[tuple[str, Mapping[str, Any] | None]],
    out: TextIO,
    indent: str = "  ",
) -> None:
    print(f"{url}: {len(tools)} tools", file=out)
    used: set[str] = set()
    fallen = []
    for name, raw in sorted(tools, key=lambda t: t[0]):
        rule = policy.rule_for_tool(name, annotations_of(raw))
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
    if policy.callers:
        _print_matrix(policy, sorted(name for name, _ in tools), out, indent)


def _print_estate(policy: Policy, listed: Mapping[str, tuple[str, Listed]], out: TextIO) -> None:
    """Every tool of every server the agents can reach, its risk class, its rule, the
    caller sets that may use it and the budgets it spends: everything the agents can call,
    on one page."""
    assert policy.servers is not None
    total = sum(len(tools) for _, tools in listed.values())
    print(f"estate: {len(listed)} servers, {total} tools", file=out)
    spenders: dict[str, list[str]] = {name: [] for name in policy.budgets}
    for name, (url, tools) in listed.items():
        server = policy.servers[name]
        print(f"server {name}: ", end="", file=out)
        _print_against(url, server, tools, out, indent="  ")
        _print_risk(server, tools, out, indent="  ")
        for tool, raw in sorted(tools, key=lambda t: t[0]):
            entry = server.rule_for_tool(tool, annotations_of(raw))
            spent = {
                limit.counter
                for rule in entry.variants or (entry,)
                if rule.action is not Action.DENY
                for limit in rule.limits
                if limit.budget
            }
            for budget in sorted(spent):
                spenders[budget].append(f"{name}/{tool}")
    for name in policy.servers:
        if name not in listed:
            print(f"server {name}: not listed (give --against {name}=URL)", file=out)
    for budget, spending in spenders.items():
        who = ", ".join(spending) if spending else "no listed tool"
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
    listed: dict[str, tuple[str, Listed]] = {}
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
        _print_risk(policy, tools, out)
    else:
        _print_estate(policy, listed, out)
    return 0


def _print_risk(policy: Policy, tools: Listed, out: TextIO, indent: str = "  ") -> None:
    """Each tool's risk class from its annotations (the spec's defaults for a tool without
    them) and the rule it resolves to; a warning for each write tool let through unchecked."""
    rows = risk_report(policy, tools)
    print(
        f"{indent}risk (from the server's tool annotations; none stated: not read-only, "
        "destructive, open-world):",
        file=out,
    )
    for row in rows:
        stated = "" if row.hints.stated else ", no annotations"
        print(
            f"{indent}  {row.tool}: {', '.join(row.classes)}{stated} -> {_rule_text(row.rule)}",
            file=out,
        )
        if policy.callers:  # what each caller set gets of that rule
            cells = (
                f"{name}: {_cell(row.rule, frozenset([name]) - {ANYONE_ELSE})}"
                for name in [*policy.callers, ANYONE_ELSE]
            )
            print(f"      {'; '.join(cells)}", file=out)
    for row in rows:
        if row.warning is not None:
            print(f"{indent}warning: {row.warning}", file=out)


def _request(
    body: bytes,
    headers: Mapping[str, str],
    source: GrantSource,
    claims: Mapping[str, Any] | None = None,
    principal: str = "",
    server: str = "",
) -> mcp.HttpRequest:
    """The request as Envoy would pass it: with verified ``claims`` where the grant source
    reads them (jwt_authn metadata, or the payload header), the mTLS ``principal``, and the
    ``server`` its route names (context extension ``mcp_server``)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    metadata: dict[str, dict[str, Any]] = {}
    if claims is not None and source.source is Source.JWT:
        if source.payload_in_header:
            payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode()
            lowered[source.payload_in_header] = payload.rstrip("=")
        else:
            metadata[JWT_NAMESPACE] = {source.payload_in_metadata: dict(claims)}
    return mcp.HttpRequest(
        method="POST",
        headers={"content-type": "application/json", **lowered},
        body=body,
        peer_principal=principal,
        metadata=metadata,
        server=server,
    )


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
    print(f"  rule: {_rule_text(step.rule)}", file=out)
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
    policy = _load(policy_path, err)
    if policy is None:
        return 2
    engine = Engine(policy, _NothingSpent())
    source = engine.grant_source(policy)
    request = _request(body, headers or {}, source, claims, principal, server)
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


def _case_claims(case: Mapping[str, Any]) -> dict[str, Any] | None:
    """A case's ``claims``, with its ``scopes`` added to their ``scope`` claim."""
    if "claims" not in case and "scopes" not in case:
        return None
    claims = dict(case.get("claims", {}))
    if "scopes" in case:
        scope = claims.get("scope")
        given = scope.split() if isinstance(scope, str) else []
        claims["scope"] = " ".join([*given, *case["scopes"]])
    return claims


async def _run_case(policy: Policy, case: Mapping[str, Any]) -> CheckResult:
    engine = Engine(policy, MemoryStore(), clock=lambda: CASE_CLOCK_MS)
    source = engine.grant_source(policy)
    request = _request(
        _case_body(case),
        case.get("headers", {}),
        source,
        _case_claims(case),
        case.get("principal", ""),
        case.get("server", ""),
    )
    grant = case.get("grant", DEFAULT_CASE_GRANT)
    if grant is None:
        grant = grant_of(request, source)
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
