"""The compiled policy a check reads: rules, limits and the tables that resolve names."""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from authz.catalogue import UNSTATED, Annotations, ranked_classes
from authz.grants import GrantSource
from authz.jsondoc import MAX_MEMBERS
from authz.mcp_headers import ParamHeader
from authz.policy.callers import CallerSet
from authz.policy.globs import glob_regex, literal_prefix
from authz.policy.schemas import first_errors
from authz.policy.texts import argument_error_text, pointer_path, pointer_tokens

WINDOWS_MS = {"second": 1_000, "minute": 60_000, "hour": 3_600_000, "day": 86_400_000}

# How many argument errors one denial lists; the rest are counted.
_MAX_ARGUMENT_ERRORS = 3


class Action(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    REQUIRE_APPROVAL = "require_approval"


class Scope(enum.Enum):
    GRANT = "grant"
    GLOBAL = "global"
    SESSION = "session"


@dataclass(frozen=True)
class Limit:
    """At most ``max`` units in any ``window_ms`` interval, counted per ``scope``.

    A call spends ``cost`` units, or, with ``cost_pointer``, the number at that JSON
    pointer in its arguments. ``callers``: the caller sets the limit applies to; empty,
    every caller.
    """

    counter: str
    window_ms: int
    max: int
    scope: Scope
    cost: int = 1
    cost_pointer: str | None = None
    callers: tuple[str, ...] = ()
    # Namespaces (see authz.plan.counter_key): a counter of one server of a policy with
    # servers is that server's alone; a budget (``counter`` is its name) is the estate's.
    server: str = ""
    budget: bool = False

    @property
    def window_text(self) -> str:
        for name, ms in WINDOWS_MS.items():
            if ms == self.window_ms:
                return name
        for ms, unit in ((86_400_000, "days"), (3_600_000, "h"), (60_000, "min")):
            if self.window_ms % ms == 0:
                return f"{self.window_ms // ms} {unit}"
        return f"{self.window_ms // 1000} s"

    def describe(self) -> str:
        """``counter 'c': 10 per minute per grant, cost /studyCount``: for tooling output
        (``budget 'writes': ...`` for an estate-wide budget)."""
        cost = "" if self.cost_pointer is None and self.cost == 1 else ", cost "
        if self.cost_pointer is not None:
            cost += f"from arguments {self.cost_pointer}"
        elif self.cost != 1:
            cost += str(self.cost)
        scope = "for all callers" if self.scope is Scope.GLOBAL else f"per {self.scope.value}"
        per = f"{self.max} per {self.window_text} {scope}"
        only = f", only for {', '.join(self.callers)}" if self.callers else ""
        kind = "budget" if self.budget else "counter"
        return f"{kind} '{self.counter}': {per}{cost}{only}"

    def cost_of(self, arguments: Mapping[str, Any]) -> int | str:
        """What a call with ``arguments`` spends, or why that cannot be known (a problem
        text naming the argument, never its value)."""
        if self.cost_pointer is None:
            return self.cost
        node: Any = arguments
        path = pointer_path(self.cost_pointer)
        counter = f"counter '{self.counter}'"
        for token in pointer_tokens(self.cost_pointer):
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                return f"{path}: missing; it is the call's cost for {counter}"
        if isinstance(node, float) and math.isfinite(node) and node.is_integer():
            node = int(node)
        if isinstance(node, bool) or not isinstance(node, int):
            return f"{path}: must be a whole number; it is the call's cost for {counter}"
        if node < 0:
            return f"{path}: must not be negative; it is the call's cost for {counter}"
        if node > self.max:
            budget = f"{self.max} per {self.window_text}"
            return f"{path}: more than the whole budget of {counter} ({budget})"
        return node


@dataclass(frozen=True)
class ApprovalSpec:
    """For ``require_approval`` tools: a request (and then the approval) lives ``ttl_s``;
    one approval allows ``uses`` identical calls; ``notify`` labels who should decide."""

    ttl_s: float = 900.0
    uses: int = 1
    notify: str = ""


@dataclass(frozen=True)
class Rule:
    """What happens to a call: ``where`` names the policy entry, for replies and logs.

    ``pattern`` marks a glob key. ``dry_run``: denials of this rule are computed, counted
    and logged, and the call is allowed.

    ``callers``: the caller sets this rule (a variant) applies to; empty, every caller.
    ``variants``: set on an entry that depends on the caller (a list of variants, or one
    with ``callers``): the variants in order, the first whose callers match deciding; the
    entry itself then decides nothing, and a caller no variant matches is not permitted.
    ``param_headers``: the parameters its argument schema marks ``x-mcp-header``, whose
    ``Mcp-Param-*`` headers must match the call.
    """

    where: str
    action: Action
    reason: str | None = None
    limits: tuple[Limit, ...] = ()
    log_arguments: bool = False
    arguments: jsonschema.protocols.Validator | None = field(default=None, compare=False)
    dry_run: bool = False
    pattern: bool = False
    approval: ApprovalSpec | None = None
    callers: tuple[str, ...] = ()
    variants: tuple[Rule, ...] = ()
    param_headers: tuple[ParamHeader, ...] = ()

    def variant_for(self, sets: frozenset[str]) -> tuple[Rule, str | None] | None:
        """The variant deciding for a caller in ``sets``, with the set it matched by
        (``None`` for a variant open to every caller); ``None`` when none matches."""
        for variant in self.variants:
            if not variant.callers:
                return variant, None
            for name in variant.callers:
                if name in sets:
                    return variant, name
        return None

    def argument_problems(self, arguments: Mapping[str, Any]) -> str | None:
        """Why ``arguments`` break this rule's schema (argument paths and the rules they
        broke, never a value), or ``None`` when they satisfy it or there is none."""
        if self.arguments is None:
            return None
        errors = first_errors(self.arguments, arguments, _MAX_ARGUMENT_ERRORS + 1)
        if not errors:
            return None
        texts = sorted({argument_error_text(e) for e in errors[:_MAX_ARGUMENT_ERRORS]})
        if len(errors) > _MAX_ARGUMENT_ERRORS:
            texts.append("and more")
        return "; ".join(texts)


class RuleTable(Mapping[str, Rule]):
    """The rules of one section by key, and the rule a name resolves to: the exact key
    first, then the glob with the longest literal prefix (ties are refused at load).

    Globs are indexed by literal prefix, so a lookup costs one dict probe per distinct
    prefix length plus a regex match for the few globs that share the name's prefix.
    """

    def __init__(self, rules: Mapping[str, Rule] | None = None) -> None:
        self._rules = dict(rules or {})
        self._exact = {key: rule for key, rule in self._rules.items() if "*" not in key}
        index: dict[int, dict[str, list[tuple[re.Pattern[str], Rule]]]] = {}
        for key, rule in self._rules.items():
            if "*" in key:
                prefix = literal_prefix(key)
                index.setdefault(len(prefix), {}).setdefault(prefix, []).append(
                    (glob_regex(key), rule)
                )
        self._globs = tuple(
            (length, {prefix: tuple(group) for prefix, group in index[length].items()})
            for length in sorted(index, reverse=True)
        )

    def match(self, name: str) -> Rule | None:
        rule = self._exact.get(name)
        if rule is not None:
            return rule
        for length, groups in self._globs:
            if len(name) >= length:
                for regex, candidate in groups.get(name[:length], ()):
                    if regex.fullmatch(name):
                        return candidate
        return None

    def patterns(self) -> list[str]:
        """Glob keys, most specific first: the order a name is tried against them."""
        return sorted(
            (key for key in self._rules if "*" in key),
            key=lambda k: (-len(literal_prefix(k)), k),
        )

    def __getitem__(self, key: str) -> Rule:
        return self._rules[key]

    def __contains__(self, key: object) -> bool:
        # Mapping's own __contains__ goes through __getitem__ and a KeyError; the metrics
        # ask this of every call's tool.
        return key in self._rules

    def __iter__(self) -> Iterator[str]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)


@dataclass(frozen=True)
class Policy:
    """A compiled policy. ``digest`` is the SHA-256 of the file (or of the document).

    ``grants`` is the policy's identity source, ``None`` when it leaves that to the
    command line. ``warnings`` lists rules that load but can never match.
    ``max_json_members`` bounds the object members a request body may hold.
    ``callers``: the named caller sets, in the policy's order. ``resource_metadata``: the
    RFC 9728 metadata URL a step-up challenge names ("" for none). ``classes``: rules by
    risk class (see :data:`authz.catalogue.CLASS_ORDER`). ``deny_unlisted``: a call naming
    a tool the upstream does not list is refused (``unlisted_tools: deny``).
    """

    version: str
    default: Rule
    tools: RuleTable
    digest: str
    resources: RuleTable = field(default_factory=RuleTable)
    prompts: RuleTable = field(default_factory=RuleTable)
    grants: GrantSource | None = None
    dry_run: bool = False
    warnings: tuple[str, ...] = ()
    max_json_members: int = MAX_MEMBERS
    callers: Mapping[str, CallerSet] = field(default_factory=dict)
    resource_metadata: str = ""
    classes: Mapping[str, Rule] = field(default_factory=dict)
    deny_unlisted: bool = False
    # The name of a server of a policy with servers (its counters' namespace).
    server: str = ""
    # The estate-wide counters a ``{budget: NAME}`` limit spends.
    budgets: Mapping[str, Limit] = field(default_factory=dict)
    # A policy with servers: each server's policy by name, the servers the Istio
    # destination (principal, host) selects, the server files read (server, path, SHA-256
    # of the bytes), and the errors of broken files whose server kept its previous version.
    servers: Mapping[str, Policy] | None = None
    server_principals: Mapping[str, str] = field(default_factory=dict)
    server_hosts: Mapping[str, str] = field(default_factory=dict)
    files: tuple[ServerFile, ...] = ()
    kept: tuple[str, ...] = ()

    def server_name(self, route: str, principal: str, host: str) -> str:
        """The server a check is for: the one the Envoy route names (``route``, its
        ``mcp_server`` context extension), else the one whose ``match`` lists the
        destination's mTLS ``principal``, else its ``host``; ``""`` when none does.

        The route and the principal come from Envoy and the mesh, and win over the host
        (the request's authority, which the client chose)."""
        if route:
            return route
        name = self.server_principals.get(principal) if principal else None
        return name or self.server_hosts.get(bare_host(host), "")

    def rule_for_tool(self, name: str, hints: Annotations = UNSTATED) -> Rule:
        """The rule of a tool: its exact name, then the glob with the longest literal
        prefix, then the first of its risk classes (from ``hints``, its annotations; the
        specification's defaults when unknown) the policy has a rule for, then
        ``default``."""
        rule = self.tools.match(name)
        if rule is not None:
            return rule
        if self.classes:
            for name_of_class in ranked_classes(hints):
                by_class = self.classes.get(name_of_class)
                if by_class is not None:
                    return by_class
        return self.default

    def rule_for_resource(self, uri: str) -> Rule:
        return self.resources.match(uri) or self.default

    def rule_for_prompt(self, name: str) -> Rule:
        return self.prompts.match(name) or self.default


@dataclass(frozen=True)
class ServerFile:
    """A server's policy file (``servers.NAME: {file: PATH}``) as the loader read it:
    ``path`` resolved, the SHA-256 of its bytes, and its parsed document, or the errors
    that kept it from being read or parsed (each naming the file)."""

    server: str
    path: str
    digest: str
    doc: object = None
    errors: tuple[str, ...] = ()


def bare_host(host: str) -> str:
    """A request authority without its port, lower-case: ``Ecs.Example:8000`` -> ``ecs.example``."""
    host = host.lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() else host


class PolicyError(Exception):
    """Every problem found in a policy, each as ``path: message``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
