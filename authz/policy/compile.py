"""A validated policy document compiled into the runtime model, every error reported."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from authz.catalogue import CLASS_ORDER
from authz.grants import GrantSource, Source
from authz.jsondoc import MAX_MEMBERS
from authz.mcp_headers import ParamHeader
from authz.policy.callers import compile_caller_set
from authz.policy.globs import pattern_ties
from authz.policy.lint import key_never_matching, never_matching
from authz.policy.model import (
    WINDOWS_MS,
    Action,
    ApprovalSpec,
    Limit,
    Policy,
    PolicyError,
    Rule,
    RuleTable,
    Scope,
)
from authz.policy.params import param_headers
from authz.policy.schemas import argument_validator
from authz.policy.validate import schema_errors

_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MAX_WINDOW_MS = 366 * 86_400_000
_SECTIONS = {"tools": "tool", "resources": "resource", "prompts": "prompt"}


@dataclass(frozen=True)
class _Names:
    """What the names in a policy's limits refer to: ``server``, the server of a policy with
    servers whose counters they are (``""`` otherwise), and the estate-wide ``budgets``
    a ``{budget: NAME}`` limit spends."""

    server: str = ""
    budgets: Mapping[str, Limit] = field(default_factory=dict)


def _window_ms(text: str) -> int:
    if text in WINDOWS_MS:
        return WINDOWS_MS[text]
    return int(text[:-1]) * _UNIT_MS[text[-1]]


def _limit(where: str, raw: Mapping[str, Any], errors: list[str], names: _Names) -> Limit:
    if "budget" in raw:
        budget = names.budgets.get(raw["budget"])
        if budget is None:
            errors.append(f"{where}.budget: no budget {raw['budget']!r} is defined under budgets")
            return Limit(raw["budget"], 1_000, 1, Scope.GRANT, budget=True)
        return replace(budget, callers=tuple(raw.get("callers", ())))
    window_ms = _window_ms(raw["window"])
    if window_ms > MAX_WINDOW_MS:
        errors.append(f"{where}.window: longer than 366 days")
    cost = raw.get("cost", 1)
    if isinstance(cost, int) and cost > raw["max"]:
        errors.append(
            f"{where}.cost: {cost} is more than max {raw['max']}, so every call would be refused"
        )
    return Limit(
        counter=raw["counter"],
        window_ms=window_ms,
        max=raw["max"],
        scope=Scope(raw.get("scope", "grant")),
        cost=cost if isinstance(cost, int) else 1,
        cost_pointer=cost if isinstance(cost, str) else None,
        callers=tuple(raw.get("callers", ())),
        server=names.server,
    )


def budgets_of(
    doc: Mapping[str, Any], broken: set[tuple[str | int, ...]], errors: list[str]
) -> dict[str, Limit]:
    """The estate-wide counters of ``budgets:``, by name. One the schema found broken (its
    errors are reported already) stands in as a placeholder, so the rules naming it are
    not reported as naming no budget."""
    raw = doc.get("budgets", {})
    if ("budgets",) in broken or not isinstance(raw, dict):
        return {}
    budgets = {}
    for name, spec in raw.items():
        if ("budgets", name) in broken:
            budgets[name] = Limit(name, 1_000, 1, Scope.GRANT, budget=True)
            continue
        window_ms = _window_ms(spec["window"])
        if window_ms > MAX_WINDOW_MS:
            errors.append(f"budgets.{name}.window: longer than 366 days")
        scope = Scope(spec.get("scope", "grant"))
        budgets[name] = Limit(name, window_ms, spec["max"], scope, budget=True)
    return budgets


def _rule(
    section: str,
    where: str,
    key: str,
    raw: Mapping[str, Any],
    policy_dry_run: bool,
    errors: list[str],
    warnings: list[str],
    names: _Names,
) -> Rule:
    limits = tuple(
        _limit(f"{where}.limits[{i}]", lim, errors, names)
        for i, lim in enumerate(raw.get("limits", ()))
    )
    arguments = None
    headers: tuple[ParamHeader, ...] = ()
    if "arguments" in raw:
        arguments = argument_validator(f"{where}.arguments", raw["arguments"], errors, warnings)
        headers = param_headers(f"{where}.arguments", raw["arguments"], errors)
    action = Action(raw.get("action", "allow"))
    noun = _SECTIONS.get(section, "tool class")
    if action is Action.DENY and limits:
        errors.append(f"{where}: a denied {noun} cannot have limits")
    if action is Action.DENY and arguments is not None:
        errors.append(f"{where}: a denied {noun} checks no arguments")
    counters = [(lim.budget, lim.counter) for lim in limits]
    if len(set(counters)) != len(counters):
        errors.append(f"{where}.limits: the same counter is listed twice")
    approval = None
    if action is Action.REQUIRE_APPROVAL:
        spec = raw.get("approval", {})
        approval = ApprovalSpec(
            ttl_s=_window_ms(spec.get("ttl", "15m")) / 1000,
            uses=spec.get("uses", 1),
            notify=spec.get("notify", ""),
        )
    elif "approval" in raw:
        errors.append(f"{where}.approval: only a rule with action require_approval uses it")
    mode = raw.get("mode")
    return Rule(
        where=where,
        action=action,
        reason=raw.get("reason"),
        limits=limits,
        log_arguments=raw.get("log_arguments", False),
        arguments=arguments,
        dry_run=policy_dry_run if mode is None else mode == "dry-run",
        pattern="*" in key,
        approval=approval,
        callers=tuple(raw.get("callers", ())),
        param_headers=headers,
    )


def _entry(
    section: str,
    key: str,
    raw: Mapping[str, Any] | list[Mapping[str, Any]],
    policy_dry_run: bool,
    errors: list[str],
    warnings: list[str],
    names: _Names,
) -> Rule:
    """The rule of one key: a plain rule, or, when it depends on the caller (a list of
    variants, or one rule with ``callers``), an entry holding its variants."""
    where = f"{section}.{key}"
    if isinstance(raw, list):
        variants = tuple(
            _rule(section, f"{where}[{i}]", key, v, policy_dry_run, errors, warnings, names)
            for i, v in enumerate(raw)
        )
    elif "callers" in raw:
        variants = (_rule(section, where, key, raw, policy_dry_run, errors, warnings, names),)
    else:
        return _rule(section, where, key, raw, policy_dry_run, errors, warnings, names)
    everyone = next((v for v in variants if not v.callers), None)
    if everyone is not None and everyone is not variants[-1]:
        errors.append(
            f"{variants[variants.index(everyone) + 1].where}: unreachable: {everyone.where} "
            "lists no callers, so it matches every caller first"
        )
    return Rule(
        where=where,
        action=Action.DENY,
        dry_run=policy_dry_run,
        pattern="*" in key,
        variants=variants,
    )


def _decided_by(rule: Rule) -> tuple[Rule, ...]:
    """The rules that decide for an entry: its variants, or itself."""
    return rule.variants or (rule,)


def _unknown_callers(rules: Iterable[Rule], known: Mapping[str, object]) -> list[str]:
    errors = []
    for rule in rules:
        for variant in _decided_by(rule):
            for name in variant.callers:
                if name not in known:
                    errors.append(f"{variant.where}.callers: no caller set named {name!r}")
            for i, lim in enumerate(variant.limits):
                for name in lim.callers:
                    if name not in known:
                        errors.append(
                            f"{variant.where}.limits[{i}].callers: no caller set named {name!r}"
                        )
    return errors


def _counter_conflicts(rules: Iterable[Rule]) -> list[str]:
    """Rules sharing a counter share one budget, so they must agree on what it counts."""
    seen: dict[tuple[bool, str], tuple[str, Limit, bool]] = {}
    errors = []
    for rule in (variant for entry in rules for variant in _decided_by(entry)):
        for i, lim in enumerate(rule.limits):
            where, other, other_dry = seen.setdefault(
                (lim.budget, lim.counter), (f"{rule.where}.limits[{i}]", lim, rule.dry_run)
            )
            if (other.window_ms, other.max, other.scope) != (lim.window_ms, lim.max, lim.scope):
                errors.append(
                    f"{rule.where}.limits[{i}]: counter {lim.counter!r} is also defined at "
                    f"{where} with a different window, max or scope"
                )
            elif other_dry != rule.dry_run:
                errors.append(
                    f"{rule.where}.limits[{i}]: counter {lim.counter!r} is shared with {where}, "
                    "but one rule is in dry-run mode and the other enforces"
                )
    return errors


def grants_of(raw: Mapping[str, Any] | None, errors: list[str]) -> GrantSource | None:
    if raw is None:
        return None
    source = Source(raw["source"])
    for name, used_by in (
        ("header", Source.HEADER),
        ("claim", Source.JWT),
        ("payload_in_metadata", Source.JWT),
        ("payload_in_header", Source.JWT),
    ):
        if name in raw and source is not used_by:
            errors.append(f"grants.{name}: only used with source {used_by.value!r}")
    if "payload_in_metadata" in raw and "payload_in_header" in raw:
        errors.append(
            "grants.payload_in_header: the payload comes from metadata or a header, not both"
        )
    return GrantSource(
        source=source,
        header=raw.get("header", ""),
        claim=raw.get("claim", ""),
        payload_in_metadata=raw.get("payload_in_metadata", "jwt_payload"),
        payload_in_header=raw.get("payload_in_header", ""),
    )


def compile_body(
    doc: object,
    digest: str = "",
    *,
    server: str = "",
    budgets: Mapping[str, Limit] | None = None,
    estate_grants: GrantSource | None = None,
) -> Policy:
    """Validate one policy body and compile it, or raise :class:`PolicyError`.

    Rules the schema accepts are compiled even when others are broken, so one run
    reports the schema errors and the errors only compiling finds (ties, conflicting
    counters, unresolvable references) together. A server's body is compiled here too
    (:mod:`authz.policy.servers`), as ``server`` with the estate's ``budgets`` and
    ``estate_grants`` (what the body's caller sets are checked against).
    """
    found = schema_errors(doc)
    errors = [text for _, text in found]
    if not isinstance(doc, dict):
        raise PolicyError(errors)
    broken = {path[:2] for path, _ in found}
    if budgets is None:
        budgets = budgets_of(doc, broken, errors)
    names = _Names(server, budgets)
    dry_run = doc.get("mode") == "dry-run"
    warnings: list[str] = []
    tables: dict[str, RuleTable] = {}
    for section in _SECTIONS:
        raw_rules = doc.get(section, {})
        if (section,) in broken or not isinstance(raw_rules, dict):
            continue
        rules = {
            key: _entry(section, key, raw, dry_run, errors, warnings, names)
            for key, raw in raw_rules.items()
            if (section, key) not in broken
        }
        errors += pattern_ties(section, rules)
        for key, rule in rules.items():
            raws = raw_rules[key] if isinstance(raw_rules[key], list) else [raw_rules[key]]
            warnings += key_never_matching(section, key)
            for variant, raw in zip(_decided_by(rule), raws, strict=True):
                warnings += never_matching(variant.where, raw)
        tables[section] = RuleTable(rules)
    raw_classes = doc.get("classes", {})
    class_rules = {
        key: _entry("classes", key, raw, dry_run, errors, warnings, names)
        for key, raw in (raw_classes.items() if isinstance(raw_classes, dict) else ())
        if ("classes", key) not in broken and key in CLASS_ORDER
    }
    every_rule = [rule for table in tables.values() for rule in table.values()]
    every_rule += class_rules.values()
    errors += _counter_conflicts(every_rule)
    grants_ok = not any(path[:1] == ("grants",) for path in broken)
    if server:
        # A server's caller sets are checked against the estate's grants, said at the top.
        grants, grants_ok = estate_grants, True
    else:
        grants = grants_of(doc.get("grants"), errors) if grants_ok else None
    raw_callers = doc.get("callers")
    raw_callers = raw_callers if isinstance(raw_callers, dict) else {}
    # A broken grants section is reported already: check the sets as if it were jwt.
    source = grants if grants_ok else GrantSource(Source.JWT)
    callers = {
        name: compile_caller_set(name, raw, source, errors)
        for name, raw in raw_callers.items()
        if ("callers", name) not in broken and isinstance(raw, dict)
    }
    errors += _unknown_callers(every_rule, raw_callers)
    resource_metadata = doc.get("resource_metadata", "")
    if resource_metadata and grants_ok and (grants is None or grants.source is not Source.JWT):
        errors.append(
            "resource_metadata: only a grants source 'jwt' carries the scopes a step-up asks for"
        )
    if errors:
        raise PolicyError(errors)
    if not digest:
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    return Policy(
        version=doc["version"],
        default=Rule(where="default", action=Action(doc["default"]), dry_run=dry_run),
        tools=tables["tools"],
        resources=tables["resources"],
        prompts=tables["prompts"],
        digest=digest,
        grants=grants,
        dry_run=dry_run,
        warnings=tuple(warnings),
        max_json_members=int(doc.get("max_json_members", MAX_MEMBERS)),
        callers=callers,
        resource_metadata=resource_metadata if isinstance(resource_metadata, str) else "",
        classes=class_rules,
        deny_unlisted=doc.get("unlisted_tools") == "deny",
        server=server,
        budgets=budgets,
    )
