"""The upstream's tools as mcp-authz has learnt them: each listed name with its MCP
annotations, and the risk classes those put it in. Pure: values in, values out.

MCP tool annotations are the server's own statement about a tool: ``readOnlyHint``,
``destructiveHint`` (meaningful only for a tool that is not read-only), ``idempotentHint``
and ``openWorldHint``. They are learnt only from the operator's upstream (the ``tools/list``
responses the list filter processes, and the list mcp-authz fetches itself with
``--upstream-url``), never from a client's request. A tool that states nothing, or that is
not known yet, counts as the specification's defaults say: not read-only, destructive, not
idempotent, open-world; so a missing annotation never makes a tool look safer than it may
be.

A :class:`Catalogue` is immutable; the engine holds the current one and replaces it whole
(one attribute assignment), so a check reads one consistent catalogue.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import msgspec

# Most tools a catalogue holds; names beyond it are not learnt (and so count as unlisted).
# Bounds the memory an upstream can make mcp-authz spend.
MAX_TOOLS = 10_000

# The risk classes a policy's ``classes`` section may name, in the order a tool's classes
# are tried against it: a tool is in one of ``destructive``, ``additive`` (writes that only
# add) and ``read_only``, and also in ``open_world`` when it reaches outside the server's
# own domain. The riskier class decides first, so a destructive open-world tool gets the
# ``destructive`` rule and a read-only open-world tool (a web search) the ``open_world`` one.
CLASS_ORDER = ("destructive", "open_world", "additive", "read_only")


class Annotations(msgspec.Struct, frozen=True):
    """A tool's behaviour hints, with the specification's defaults for what is not stated.
    ``stated``: the server sent at least one hint."""

    read_only: bool = False
    destructive: bool = True
    idempotent: bool = False
    open_world: bool = True
    stated: bool = False


# What a tool the upstream never described counts as.
UNSTATED = Annotations()

_HINTS = {
    "readOnlyHint": "read_only",
    "destructiveHint": "destructive",
    "idempotentHint": "idempotent",
    "openWorldHint": "open_world",
}


def annotations_of(raw: object) -> Annotations:
    """The hints of a ``tools/list`` entry's ``annotations`` object; a hint that is not a
    boolean counts as not stated."""
    if not isinstance(raw, Mapping):
        return UNSTATED
    hints = {field: raw[hint] for hint, field in _HINTS.items() if isinstance(raw.get(hint), bool)}
    return Annotations(**hints, stated=bool(hints)) if hints else UNSTATED


def classes(hints: Annotations) -> tuple[str, ...]:
    """``read_only``, or ``destructive`` / ``additive``; then ``open_world`` for a tool
    that reaches outside the server's own domain."""
    kind = "read_only" if hints.read_only else "destructive" if hints.destructive else "additive"
    return (kind, "open_world") if hints.open_world else (kind,)


def ranked_classes(hints: Annotations) -> tuple[str, ...]:
    """The classes of a tool in :data:`CLASS_ORDER`: the order a policy's class rules are
    tried in."""
    mine = classes(hints)
    return tuple(name for name in CLASS_ORDER if name in mine)


def tools_of(result: object) -> list[tuple[str, Annotations]] | None:
    """The named tools of a ``tools/list`` result with their hints (entries without a
    string name are skipped: the list filter refuses such a response anyway), or ``None``
    when it is not a tools/list result."""
    entries = result.get("tools") if isinstance(result, dict) else None
    if not isinstance(entries, list):
        return None
    found = []
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str):
            found.append((name, annotations_of(entry.get("annotations"))))
    return found


@dataclass(frozen=True)
class Catalogue:
    """The tools the upstream lists. ``known``: a complete list has been seen (a
    ``tools/list`` result without ``nextCursor``: its last page), so a name missing from
    ``tools`` is a name the upstream does not list. ``awaited``: mcp-authz fetches the
    list itself (``--upstream-url``), so until it is known, a policy with
    ``unlisted_tools: deny`` refuses every call (fail closed)."""

    tools: Mapping[str, Annotations] = field(default_factory=dict)
    known: bool = False
    awaited: bool = False

    def hints(self, name: str) -> Annotations:
        """What ``name`` states about itself; the specification's defaults when unknown."""
        return self.tools.get(name, UNSTATED)

    def learnt(self, tools: Iterable[tuple[str, Annotations]], complete: bool) -> Catalogue:
        """This catalogue with ``tools`` (one page of the upstream's list) added; ``self``
        when that changes nothing, so a repeated list costs no copy. Names beyond
        :data:`MAX_TOOLS` are dropped."""
        new = {name: hints for name, hints in tools if self.tools.get(name) != hints}
        if not new and (self.known or not complete):
            return self
        merged = dict(self.tools)
        for name, hints in new.items():
            if name in merged or len(merged) < MAX_TOOLS:
                merged[name] = hints
        return Catalogue(merged, known=self.known or complete, awaited=self.awaited)

    @staticmethod
    def fetched(tools: Iterable[tuple[str, Annotations]], awaited: bool = True) -> Catalogue:
        """The catalogue of a complete list (every page) fetched from the upstream; it
        replaces what was learnt before, so tools the upstream dropped are forgotten."""
        kept: dict[str, Annotations] = {}
        for name, hints in tools:
            if name in kept or len(kept) < MAX_TOOLS:
                kept[name] = hints
        return Catalogue(kept, known=True, awaited=awaited)
