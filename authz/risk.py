"""Risk classes of tools from their MCP annotations, and the risk report. Pure.

MCP tool annotations are the server's own statement about a tool: ``readOnlyHint``,
``destructiveHint`` (meaningful only for a tool that is not read-only), ``idempotentHint``
and ``openWorldHint``. They come from the operator's upstream (its ``tools/list``), never
from a client. A tool that states nothing counts as the specification's defaults say: not
read-only, destructive, not idempotent, open-world; so a missing annotation never makes a
tool look safer than it may be.

The report shows, for each tool a server lists, its class and the rule it resolves to
(a class rule of the policy's ``classes`` section among them), and
warns about every tool that is not read-only yet whose rule lets it through with neither a
limit nor an argument schema (the seed: "Execute tools should be rate-limited and have
argument validation enabled").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from authz.catalogue import Annotations, annotations_of, classes
from authz.policy import Action, Policy, Rule

__all__ = ["Annotations", "RiskRow", "annotations_of", "classes", "risk_report"]


class RiskRow(msgspec.Struct, frozen=True):
    """One tool of the report: its hints and classes, the rule it resolves to, and why it
    deserves a look (``None``: nothing)."""

    tool: str
    hints: Annotations
    classes: tuple[str, ...]
    rule: Rule
    warning: str | None = None


def _warning(name: str, hints: Annotations, rule: Rule) -> str | None:
    """Why a tool that is not read-only deserves a look: a rule (or a variant of it, for
    some callers) that lets it through with neither a limit nor an argument schema."""
    if hints.read_only:
        return None
    unchecked = [
        r
        for r in rule.variants or (rule,)
        if r.action is not Action.DENY and not r.limits and r.arguments is None
    ]
    if not unchecked:
        return None
    stated = "its annotations say" if hints.stated else "it states no annotations, so it counts as"
    kind = "destructive" if hints.destructive else "not read-only"
    where = ", ".join(r.where for r in unchecked)
    return (
        f"tool {name} ({where}): {stated} {kind}, and the rule has neither a limit nor "
        "an argument schema"
    )


def risk_report(
    policy: Policy, tools: Sequence[tuple[str, Mapping[str, Any] | None]]
) -> list[RiskRow]:
    """A row per ``(name, annotations)`` a server lists, in name order, each with the rule
    it resolves to: its name, a glob, its risk class (see ``classes`` in the policy), or
    ``default``."""
    rows = []
    for name, raw in sorted(tools, key=lambda t: t[0]):
        hints = annotations_of(raw)
        rule = policy.rule_for_tool(name, hints)
        rows.append(RiskRow(name, hints, classes(hints), rule, _warning(name, hints, rule)))
    return rows
