"""``check-policy``: a policy validated and printed the way the service resolves it (rules,
the caller x tool matrix), and, with ``--against``, checked against the tools a real MCP
server lists (the risk report, one per server of an estate)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from authz.policy import (
    Action,
    Policy,
    Rule,
    Scope,
)
from authz.risk import annotations_of, risk_report
from authz.tooling.common import describe_rule, load, rule_text

# A server's tools as check-policy lists them: each name, with its annotations as sent.
Listed = Sequence[tuple[str, Mapping[str, Any] | None]]

LIST_TIMEOUT_S = 15.0


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
        print(f"{indent}tool {name} -> {rule_text(rule)}", file=out)
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
    policy = load(path, err)
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
            f"{indent}  {row.tool}: {', '.join(row.classes)}{stated} -> {rule_text(row.rule)}",
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
