"""Loading, validating and compiling the operator's policy. Pure: text in, values out.

A policy that loads must mean what it says, so every problem is reported at once, each
with its path (``tools.start_dicom_export_job.limits[0].window: ...``), and a policy with
any error is refused rather than guessed at. Rules that load but can never match come
back as warnings.

Everything a check needs is compiled here, once: argument schemas into validators, glob
keys into regexes indexed by literal prefix, windows into milliseconds, so a check does a
dict lookup and at most a few regex matches, never a scan over all rules.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import referencing.exceptions
import referencing.jsonschema
import yaml

from authz.grants import GrantSource, Source
from authz.mcp import MAX_MEMBERS, suspicious_name

WINDOWS_MS = {"second": 1_000, "minute": 60_000, "hour": 3_600_000, "day": 86_400_000}
_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MAX_WINDOW_MS = 366 * 86_400_000

ARGUMENT_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_FORMAT_CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER

# How many argument errors one denial lists; the rest are counted.
_MAX_ARGUMENT_ERRORS = 3
_SECTIONS = {"tools": "tool", "resources": "resource", "prompts": "prompt"}
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*(:|$)")
# Argument names shown in denials: identifiers only. Anything else is client data that
# could carry PHI, so it is not echoed.
_SHOWN_KEY = re.compile(r"[A-Za-z_$][A-Za-z0-9_$-]{0,63}")


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
    pointer in its arguments.
    """

    counter: str
    window_ms: int
    max: int
    scope: Scope
    cost: int = 1
    cost_pointer: str | None = None

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
        """``counter 'c': 10 per minute per grant, cost /studyCount``: for tooling output."""
        cost = "" if self.cost_pointer is None and self.cost == 1 else ", cost "
        if self.cost_pointer is not None:
            cost += f"from arguments {self.cost_pointer}"
        elif self.cost != 1:
            cost += str(self.cost)
        scope = "for all callers" if self.scope is Scope.GLOBAL else f"per {self.scope.value}"
        per = f"{self.max} per {self.window_text} {scope}"
        return f"counter '{self.counter}': {per}{cost}"

    def cost_of(self, arguments: Mapping[str, Any]) -> int | str:
        """What a call with ``arguments`` spends, or why that cannot be known (a problem
        text naming the argument, never its value)."""
        if self.cost_pointer is None:
            return self.cost
        node: Any = arguments
        path = _pointer_path(self.cost_pointer)
        counter = f"counter '{self.counter}'"
        for token in _pointer_tokens(self.cost_pointer):
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

    def argument_problems(self, arguments: Mapping[str, Any]) -> str | None:
        """Why ``arguments`` break this rule's schema (argument paths and the rules they
        broke, never a value), or ``None`` when they satisfy it or there is none."""
        if self.arguments is None:
            return None
        errors = list(islice(self.arguments.iter_errors(arguments), _MAX_ARGUMENT_ERRORS + 1))
        if not errors:
            return None
        texts = sorted({_argument_error_text(e) for e in errors[:_MAX_ARGUMENT_ERRORS]})
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
                prefix = _literal_prefix(key)
                index.setdefault(len(prefix), {}).setdefault(prefix, []).append(
                    (_glob_regex(key), rule)
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
            key=lambda k: (-len(_literal_prefix(k)), k),
        )

    def __getitem__(self, key: str) -> Rule:
        return self._rules[key]

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

    def rule_for_tool(self, name: str) -> Rule:
        return self.tools.match(name) or self.default

    def rule_for_resource(self, uri: str) -> Rule:
        return self.resources.match(uri) or self.default

    def rule_for_prompt(self, name: str) -> Rule:
        return self.prompts.match(name) or self.default


class PolicyError(Exception):
    """Every problem found in a policy, each as ``path: message``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@cache
def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(
        resources.files("authz").joinpath("policy.schema.json").read_text(encoding="utf-8")
    )
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    # The format checker makes the metaschema check argument schemas' regexes, too.
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _path(parts: Iterable[str | int]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _schema_errors(doc: object) -> list[tuple[tuple[str | int, ...], str]]:
    """Schema violations as ``(path, "path: message")``, sorted by their text."""
    errors = []
    for err in _validator().iter_errors(doc):  # type: ignore[arg-type]
        message = err.message
        if isinstance(err.schema, dict) and "x-error" in err.schema:
            message = f"{err.instance!r} {err.schema['x-error']}"
        elif err.validator in ("additionalProperties", "unevaluatedProperties"):
            message = re.sub(
                r"^(Additional|Unevaluated) properties are not allowed", "unknown field(s)", message
            )
        path = tuple(err.absolute_path)
        errors.append((path, f"{_path(path)}: {message}"))
    return sorted(errors, key=lambda e: e[1])


def _duplicate_free(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise PolicyError([f"(file): duplicate key {key!r}"])
        obj[key] = value
    return obj


class _StrictYamlLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that also refuses duplicate keys (the second would silently win),
    non-string keys, and aliases (a small file could expand into a huge document)."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.MarkedYAMLError(
                problem="aliases (*name) are not allowed in a policy", problem_mark=mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                raise yaml.MarkedYAMLError(
                    problem=f"keys must be strings, not {key!r}", problem_mark=key_node.start_mark
                )
            if key in seen:
                raise yaml.MarkedYAMLError(
                    problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_policy_text(text: str, syntax: str = "json") -> object:
    """Parse a policy in JSON or YAML (``syntax``), refusing duplicate keys."""
    if syntax == "yaml":
        try:
            return yaml.load(text, Loader=_StrictYamlLoader)  # noqa: S506 (a SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise PolicyError([f"(file): invalid YAML{where}: {exc.problem}"]) from None
        except yaml.YAMLError as exc:
            raise PolicyError([f"(file): invalid YAML: {exc}"]) from None
    try:
        return json.loads(text, object_pairs_hook=_duplicate_free)
    except json.JSONDecodeError as exc:
        raise PolicyError([f"(file): invalid JSON: {exc}"]) from None


def syntax_of(path: str | Path) -> str:
    """``yaml`` for ``.yaml``/``.yml`` files, else ``json``."""
    return "yaml" if Path(path).suffix.lower() in (".yaml", ".yml") else "json"


def _literal_prefix(key: str) -> str:
    return key.split("*", 1)[0]


def _glob_regex(key: str) -> re.Pattern[str]:
    parts = re.split(r"\*+", key)
    return re.compile(".*".join(re.escape(p) for p in parts), re.DOTALL)


def _globs_overlap(a: str, b: str) -> bool:
    """True when some name matches both globs (``*`` is any run of characters).

    Dynamic programming over positions: ``meet[i][j]`` says the rest ``a[i:]`` and
    ``b[j:]`` can match a common string.
    """
    n, m = len(a), len(b)
    below: list[bool] = []
    for i in range(n, -1, -1):
        row = [False] * (m + 1)
        for j in range(m, -1, -1):
            if i == n and j == m:
                row[j] = True
            elif i < n and a[i] == "*":
                row[j] = below[j] or (j < m and row[j + 1])
            elif j < m and b[j] == "*":
                row[j] = row[j + 1] or (i < n and below[j])
            else:
                row[j] = i < n and j < m and a[i] == b[j] and below[j + 1]
        below = row
    return below[0]


def _pattern_ties(section: str, keys: Iterable[str]) -> list[str]:
    """Globs of equal specificity that can match the same name: which wins is undefined.

    Equal-length literal prefixes that differ can never match the same name, so only
    globs with the very same literal prefix are compared.
    """
    by_prefix: dict[str, list[str]] = {}
    for key in keys:
        if "*" in key:
            by_prefix.setdefault(_literal_prefix(key), []).append(key)
    errors = []
    for prefix, group in by_prefix.items():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                if _globs_overlap(a, b):
                    errors.append(
                        f"{section}.{b}: ties with {section}.{a}: both have the literal prefix "
                        f"{prefix!r} and can match the same name; make one more specific"
                    )
    return errors


def _window_ms(text: str) -> int:
    if text in WINDOWS_MS:
        return WINDOWS_MS[text]
    return int(text[:-1]) * _UNIT_MS[text[-1]]


def _pointer_tokens(pointer: str) -> list[str]:
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]


def _key_text(key: str) -> str:
    return f".{key}" if _SHOWN_KEY.fullmatch(key) else "[?]"


def _pointer_path(pointer: str) -> str:
    """A cost pointer as an argument path; it is policy text, so shown whole."""
    path = "arguments"
    for token in _pointer_tokens(pointer):
        if token.isdigit():
            path += f"[{token}]"
        elif _SHOWN_KEY.fullmatch(token):
            path += f".{token}"
        else:
            path += f"[{json.dumps(token)}]"
    return path


def _argument_path(parts: Iterable[str | int]) -> str:
    return "arguments" + "".join(f"[{p}]" if isinstance(p, int) else _key_text(p) for p in parts)


def _quoted_names(names: Iterable[object]) -> str:
    shown = [f"'{n}'" if isinstance(n, str) and _SHOWN_KEY.fullmatch(n) else "'?'" for n in names]
    return ", ".join(shown)


def _extra_arguments(error: jsonschema.ValidationError) -> list[str]:
    schema = error.schema if isinstance(error.schema, dict) else {}
    declared = schema.get("properties", {})
    patterns = [re.compile(p) for p in schema.get("patternProperties", {})]
    instance = error.instance if isinstance(error.instance, dict) else {}
    return sorted(
        k for k in instance if k not in declared and not any(p.search(k) for p in patterns)
    )


def _argument_error_text(error: jsonschema.ValidationError) -> str:
    """``arguments.outputS3Uri: does not match the required pattern '^s3://…'``.

    Built from the keyword and the schema, never from jsonschema's own message: that one
    quotes the value, which may be PHI.
    """
    path = _argument_path(error.absolute_path)
    keyword, rule = error.validator, error.validator_value
    texts: dict[str, str] = {
        "type": f"must be of type {' or '.join(rule) if isinstance(rule, list) else rule}",
        "pattern": f"does not match the required pattern '{str(rule)[:120]}'",
        "enum": "is not one of the allowed values",
        "const": "is not the allowed value",
        "minimum": f"must be at least {rule}",
        "maximum": f"must be at most {rule}",
        "exclusiveMinimum": f"must be greater than {rule}",
        "exclusiveMaximum": f"must be less than {rule}",
        "multipleOf": f"must be a multiple of {rule}",
        "minLength": f"must be at least {rule} characters long",
        "maxLength": f"must be at most {rule} characters long",
        "minItems": f"must have at least {rule} items",
        "maxItems": f"must have at most {rule} items",
        "uniqueItems": "must not repeat items",
        "minProperties": f"must have at least {rule} arguments",
        "maxProperties": f"must have at most {rule} arguments",
        "format": f"is not a valid {rule}",
        "propertyNames": "has an argument name the policy does not allow",
        "contains": "does not contain a required item",
        "minContains": "does not contain enough of the required items",
        "maxContains": "contains too many of the limited items",
        "anyOf": "does not match any of the allowed forms",
        "oneOf": "must match exactly one of the allowed forms",
        "not": "has a form the policy forbids",
        "unevaluatedProperties": "has arguments the policy does not allow",
        "unevaluatedItems": "has items the policy does not allow",
        "additionalItems": "has items the policy does not allow",
        "items": "has items the policy does not allow",
        "prefixItems": "has items the policy does not allow",
    }
    if keyword == "required":
        instance = error.instance if isinstance(error.instance, dict) else {}
        required = rule if isinstance(rule, list) else []
        missing = [name for name in required if name not in instance]
        return f"{path}: missing required argument(s) {_quoted_names(missing)}"
    if keyword == "dependentRequired":
        return f"{path}: missing argument(s) another argument requires"
    if keyword == "additionalProperties":
        return f"{path}: unexpected argument(s) {_quoted_names(_extra_arguments(error))}"
    if keyword is None or rule is False:
        return f"{path}: is not allowed"
    return f"{path}: {texts.get(str(keyword), f'breaks the {keyword!r} rule')}"


def _schema_walk(node: object, path: str) -> Iterator[tuple[str, str, object]]:
    """Every ``(path, keyword, value)`` in a JSON Schema, without descending into data
    keywords (``const``, ``enum``, ``default``, ``examples``)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", key, value
            if key not in ("const", "enum", "default", "examples"):
                yield from _schema_walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _schema_walk(value, f"{path}[{i}]")


def _argument_validator(
    where: str, schema: Mapping[str, Any] | bool, errors: list[str], warnings: list[str]
) -> jsonschema.protocols.Validator:
    """Compile a rule's argument schema (the policy schema already checked it against the
    draft 2020-12 metaschema); references must resolve locally, unchecked formats warn."""
    if schema is False:
        warnings.append(f"{where}: false denies every call as invalid; use action deny instead")
    if isinstance(schema, dict) and schema.get("$schema", ARGUMENT_SCHEMA_DIALECT) != (
        ARGUMENT_SCHEMA_DIALECT
    ):
        errors.append(f"{where}.$schema: argument schemas are JSON Schema draft 2020-12")
    root = referencing.jsonschema.DRAFT202012.create_resource(schema)
    resolver = referencing.Registry[Any]().resolver_with_root(root)
    for path, keyword, value in _schema_walk(schema, where):
        if keyword in ("$ref", "$dynamicRef") and isinstance(value, str):
            if not value.startswith("#"):
                errors.append(f"{path}: only local references (#/...) are supported")
                continue
            try:
                resolver.lookup(value)
            except referencing.exceptions.Unresolvable:
                errors.append(f"{path}: reference {value!r} does not resolve")
        elif (
            keyword == "format" and isinstance(value, str) and value not in _FORMAT_CHECKER.checkers
        ):
            warnings.append(
                f"{path}: format {value!r} is not checked (checked: "
                f"{', '.join(sorted(_FORMAT_CHECKER.checkers))})"
            )
    return jsonschema.Draft202012Validator(schema, format_checker=_FORMAT_CHECKER)


def _limit(where: str, raw: Mapping[str, Any], errors: list[str]) -> Limit:
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
    )


def _rule(
    section: str,
    key: str,
    raw: Mapping[str, Any],
    policy_dry_run: bool,
    errors: list[str],
    warnings: list[str],
) -> Rule:
    where = f"{section}.{key}"
    limits = tuple(
        _limit(f"{where}.limits[{i}]", lim, errors) for i, lim in enumerate(raw.get("limits", ()))
    )
    arguments = None
    if "arguments" in raw:
        arguments = _argument_validator(f"{where}.arguments", raw["arguments"], errors, warnings)
    action = Action(raw.get("action", "allow"))
    noun = _SECTIONS[section]
    if action is Action.DENY and limits:
        errors.append(f"{where}: a denied {noun} cannot have limits")
    if action is Action.DENY and arguments is not None:
        errors.append(f"{where}: a denied {noun} checks no arguments")
    counters = [lim.counter for lim in limits]
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
    )


def _counter_conflicts(rules: Iterable[Rule]) -> list[str]:
    """Rules sharing a counter share one budget, so they must agree on what it counts."""
    seen: dict[str, tuple[str, Limit, bool]] = {}
    errors = []
    for rule in rules:
        for i, lim in enumerate(rule.limits):
            where, other, other_dry = seen.setdefault(
                lim.counter, (f"{rule.where}.limits[{i}]", lim, rule.dry_run)
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


def _never_matching(section: str, key: str, raw: Mapping[str, Any]) -> list[str]:
    """Warnings for a rule that loads but can never apply."""
    where = f"{section}.{key}"
    warnings = []
    if section == "resources":
        prefix = _literal_prefix(key)
        if prefix and not _URI_SCHEME.match(prefix):
            warnings.append(
                f"{where}: not a URI (no scheme such as file: or https:), and resource URIs "
                "always have one, so this rule never matches"
            )
    elif suspicious_name(key.replace("*", "x")):
        warnings.append(
            f"{where}: the name has blank, invisible or non-normalized characters; requests "
            "naming it are refused as malformed, so this rule never matches"
        )
    schema = raw.get("arguments")
    if not isinstance(schema, dict):
        return warnings
    declared = schema.get("properties", {})
    closed = schema.get("additionalProperties") is False
    for i, lim in enumerate(raw.get("limits", ())):
        pointer = lim.get("cost")
        if not isinstance(pointer, str):
            continue
        first = _pointer_tokens(pointer)[0]
        prop = declared.get(first) if isinstance(declared, dict) else None
        if closed and prop is None:
            warnings.append(
                f"{where}.limits[{i}].cost: {pointer} names an argument the arguments schema "
                "does not allow, so every call is denied"
            )
        elif isinstance(prop, dict) and len(_pointer_tokens(pointer)) == 1:
            types = prop.get("type")
            types = [types] if isinstance(types, str) else types
            if isinstance(types, list) and not {"integer", "number"} & set(types):
                warnings.append(
                    f"{where}.limits[{i}].cost: {pointer} is declared as {'/'.join(types)}, "
                    "not a number, so every call is denied"
                )
    return warnings


def _grants(raw: Mapping[str, Any] | None, errors: list[str]) -> GrantSource | None:
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


def compile_policy(doc: object, digest: str = "") -> Policy:
    """Validate a parsed policy document and compile it, or raise :class:`PolicyError`.

    Rules the schema accepts are compiled even when others are broken, so one run
    reports the schema errors and the errors only compiling finds (ties, conflicting
    counters, unresolvable references) together.
    """
    schema_errors = _schema_errors(doc)
    errors = [text for _, text in schema_errors]
    if not isinstance(doc, dict):
        raise PolicyError(errors)
    broken = {path[:2] for path, _ in schema_errors}
    dry_run = doc.get("mode") == "dry-run"
    warnings: list[str] = []
    tables: dict[str, RuleTable] = {}
    for section in _SECTIONS:
        raw_rules = doc.get(section, {})
        if (section,) in broken or not isinstance(raw_rules, dict):
            continue
        rules = {
            key: _rule(section, key, raw, dry_run, errors, warnings)
            for key, raw in raw_rules.items()
            if (section, key) not in broken
        }
        errors += _pattern_ties(section, rules)
        for key in rules:
            warnings += _never_matching(section, key, raw_rules[key])
        tables[section] = RuleTable(rules)
    errors += _counter_conflicts(rule for table in tables.values() for rule in table.values())
    grants_ok = not any(path[:1] == ("grants",) for path in broken)
    grants = _grants(doc.get("grants"), errors) if grants_ok else None
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
    )


def policy_from_bytes(raw: bytes, syntax: str = "json") -> Policy:
    """Parse, validate and compile a policy file's content; the digest is of the bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(["(file): not UTF-8"]) from None
    return compile_policy(parse_policy_text(text, syntax), hashlib.sha256(raw).hexdigest())


def load_policy(path: str | Path) -> Policy:
    """Read, validate and compile a policy file (YAML for .yaml/.yml, else JSON)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyError([f"(file): cannot read {path}: {exc.strerror}"]) from None
    return policy_from_bytes(raw, syntax_of(path))
