"""Loading, validating and compiling the operator's policy. Pure: text in, values out.

A policy that loads must mean what it says, so every problem is reported at once, each
with its JSON path (``tools.start_dicom_export_job.limits[0].window: ...``), and the
service refuses to start on any of them rather than guessing.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

WINDOWS_MS = {"second": 1_000, "minute": 60_000, "hour": 3_600_000, "day": 86_400_000}


class Action(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


class Scope(enum.Enum):
    GRANT = "grant"
    GLOBAL = "global"


@dataclass(frozen=True)
class Limit:
    """At most ``max`` calls in any ``window_ms`` interval, counted per ``scope``."""

    counter: str
    window_ms: int
    max: int
    scope: Scope


@dataclass(frozen=True)
class Rule:
    """What happens to a call: ``where`` names the policy entry, for replies and logs."""

    where: str
    action: Action
    reason: str | None = None
    limits: tuple[Limit, ...] = ()


@dataclass(frozen=True)
class Policy:
    version: str
    default: Rule
    tools: Mapping[str, Rule]
    digest: str

    def rule_for_tool(self, name: str) -> Rule:
        return self.tools.get(name, self.default)


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
    return cls(schema)


def _path(parts: Iterable[str | int]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _schema_errors(doc: object) -> list[str]:
    errors = []
    for err in _validator().iter_errors(doc):  # type: ignore[arg-type]
        message = err.message
        if err.validator == "additionalProperties":
            message = message.replace("Additional properties are not allowed", "unknown field(s)")
        errors.append(f"{_path(err.absolute_path)}: {message}")
    return sorted(errors)


def _duplicate_free(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise PolicyError([f"duplicate key {key!r} in the policy file"])
        obj[key] = value
    return obj


def parse_policy_text(text: str) -> object:
    """Parse policy JSON, refusing duplicate keys (the second would silently win)."""
    try:
        return json.loads(text, object_pairs_hook=_duplicate_free)
    except json.JSONDecodeError as exc:
        raise PolicyError([f"(file): invalid JSON: {exc}"]) from None


def _rule(where: str, raw: Mapping[str, Any]) -> Rule:
    limits = tuple(
        Limit(
            counter=lim["counter"],
            window_ms=WINDOWS_MS[lim["window"]],
            max=lim["max"],
            scope=Scope(lim.get("scope", "grant")),
        )
        for lim in raw.get("limits", ())
    )
    return Rule(
        where=where,
        action=Action(raw.get("action", "allow")),
        reason=raw.get("reason"),
        limits=limits,
    )


def _counter_conflicts(rules: Iterable[Rule]) -> list[str]:
    """Tools sharing a counter share one budget, so they must agree on what it counts."""
    seen: dict[str, tuple[str, Limit]] = {}
    errors = []
    for rule in rules:
        for i, lim in enumerate(rule.limits):
            first = seen.setdefault(lim.counter, (f"{rule.where}.limits[{i}]", lim))
            where, other = first
            if (other.window_ms, other.max, other.scope) != (lim.window_ms, lim.max, lim.scope):
                errors.append(
                    f"{rule.where}.limits[{i}]: counter {lim.counter!r} is also defined at "
                    f"{where} with a different window, max or scope"
                )
    return errors


def compile_policy(doc: object, digest: str = "") -> Policy:
    """Validate a parsed policy document and compile it, or raise :class:`PolicyError`."""
    errors = _schema_errors(doc)
    if errors:
        raise PolicyError(errors)
    assert isinstance(doc, dict)  # the schema guarantees it
    tools = {name: _rule(f"tools.{name}", raw) for name, raw in doc.get("tools", {}).items()}
    errors = _counter_conflicts(tools.values())
    for name, rule in tools.items():
        counters = [lim.counter for lim in rule.limits]
        if len(set(counters)) != len(counters):
            errors.append(f"{rule.where}.limits: the same counter is listed twice")
        if rule.action is Action.DENY and rule.limits:
            errors.append(f"tools.{name}: a denied tool cannot have limits")
    if errors:
        raise PolicyError(errors)
    if not digest:
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    return Policy(
        version=doc["version"],
        default=Rule(where="default", action=Action(doc["default"])),
        tools=tools,
        digest=digest,
    )


def load_policy(path: str | Path) -> Policy:
    """Read, validate and compile a policy file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyError([f"(file): cannot read {path}: {exc.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(["(file): not UTF-8"]) from None
    return compile_policy(parse_policy_text(text), hashlib.sha256(raw).hexdigest())
