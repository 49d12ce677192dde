"""Risk classes of tools from their MCP annotations, and the risk report. Pure.

MCP tool annotations are the server's own statement about a tool: ``readOnlyHint``,
``destructiveHint`` (meaningful only for a tool that is not read-only), ``idempotentHint``
and ``openWorldHint``. They come from the operator's upstream (its ``tools/list``), never
from a client. A tool that states nothing counts as the specification's defaults say: not
read-only, destructive, not idempotent, open-world; so a missing annotation never makes a
tool look safer than it may be.

The report shows, for each tool a server lists, its class and the rule it resolves to, and
warns about every tool that is not read-only yet whose rule lets it through with neither a
limit nor an argument schema (the seed: "Execute tools should be rate-limited and have
argument validation enabled").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from authz.policy import Action, Policy, Rule


class Annotations(msgspec.Struct, frozen=True):
    """A tool's behaviour hints, with the specification's defaults for what is not stated.
    ``stated``: the server sent at least one hint."""

    read_only: bool = False
    destructive: bool = True
    idempotent: bool = False
    open_world: bool = True
    stated: bool = False


_HINTS = {
    "readOnlyHint": "read_only",
    "destructiveHint": "destructive",
    "idempotentHint": "idempotent",
    "openWorldHint": "open_world",
}


def annotations_of(raw: Mapping[str, Any] | None) -> Annotations:
    """The hints of a ``tools/list`` entry's ``annotations`` object; a hint that is not a
    boolean counts as not stated."""
    if not isinstance(raw, Mapping):
        return Annotations()
    hints = {field: raw[hint] for hint, field in _HINTS.items() if isinstance(raw.get(hint), bool)}
    return Annotations(**hints, stated=bool(hints))


def classes(hints: Annotations) -> tuple[str, ...]:
    """``read_only``, or ``destructive`` / ``additive`` (writes that only add); then
    ``open_world`` for a tool that reaches outside the server's own domain."""
    kind = "read_only" if hints.read_only else "destructive" if hints.destructive else "additive"
    return (kind, "open_world") if hints.open_world else (kind,)


class RiskRow(msgspec.Struct, frozen=True):
    """One tool of the report: its hints and classes, the rule it resolves to, and why it
    deserves a look (``None``: nothing)."""

    tool: str
    hints: Annotations
    classes: tuple[str, ...]
    rule: Rule
    warning: str | None = None


def _warning(name: str, hints: Annotations, rule: Rule) -> str | None:
    if hints.read_only or rule.action is Action.DENY:
        return None
    if rule.limits or rule.arguments is not None:
        return None
    stated = "its annotations say" if hints.stated else "it states no annotations, so it counts as"
    kind = "destructive" if hints.destructive else "not read-only"
    return (
        f"tool {name} ({rule.where}): {stated} {kind}, and the rule has neither a limit nor "
        "an argument schema"
    )


def risk_report(
    policy: Policy, tools: Sequence[tuple[str, Mapping[str, Any] | None]]
) -> list[RiskRow]:
    """A row per ``(name, annotations)`` a server lists, in name order."""
    rows = []
    for name, raw in sorted(tools, key=lambda t: t[0]):
        hints = annotations_of(raw)
        rule = policy.rule_for_tool(name)
        rows.append(RiskRow(name, hints, classes(hints), rule, _warning(name, hints, rule)))
    return rows
