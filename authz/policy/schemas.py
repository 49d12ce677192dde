"""Argument schemas (JSON Schema draft 2020-12) compiled once, at load, into validators.

A check runs on the one event loop every caller shares, so checking one call's arguments
must cost time linear in the body, whatever the body holds. jsonschema's own keywords are
not all like that, and these are replaced:

- ``pattern`` and ``patternProperties`` (and the property names ``additionalProperties``
  weighs against them) run on RE2, whose matching time is linear in the input, instead
  of Python's backtracking ``re``: an operator's ``^(a+)+$`` meets attacker-chosen text.
- ``uniqueItems`` compares every pair of items that are objects; here each item is
  reduced to a digest of its canonical JSON and the digests are collected in a set.
- ``unevaluatedItems`` and ``unevaluatedProperties`` look every item up in a list of the
  evaluated ones; here in a set.
- ``format: regex`` compiled values with Python's ``re`` (unbounded recursion, and seconds
  for a long value); here RE2 checks them within a per-call allowance (see
  :func:`_is_regex`).

jsonschema has no hook for its regex engine, so these keywords are small functions of
our own, wired in with ``jsonschema.validators.extend``.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import jsonschema
import orjson
import re2
import referencing
import referencing.exceptions
import referencing.jsonschema
from jsonschema import _utils as jsonschema_utils

ARGUMENT_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

# What RE2 may spend on one regular expression a call's arguments carry, in units of
# about one compiled instruction: a fixed part per expression, and its length times every
# counted repetition in it (``{n,m}`` multiplies what it repeats; counting each of them as
# if they nested over-estimates, never under-). Unicode classes (``\p{..}``) compile to
# large automata, so each counts as many characters.
_REGEX_FIXED_COST = 100
_UNICODE_CLASS_COST = 500
_REGEX_ALLOWANCE_PER_CALL = 100_000
_COUNTED_REPETITION = re.compile(rb"\{([0-9]{1,9})(?:,([0-9]{0,9}))?\}")


def _re2_options(*, never_capture: bool) -> re2.Options:
    options = re2.Options()
    # RE2 would otherwise log a refused expression to stderr: it may be a call's argument.
    options.log_errors = False
    options.never_capture = never_capture
    return options


_POLICY_OPTIONS = _re2_options(never_capture=False)
_VALUE_OPTIONS = _re2_options(never_capture=True)


def re2_problem(pattern: str) -> str | None:
    """Why RE2 cannot run a policy's pattern (its own words), or ``None`` when it can."""
    try:
        policy_regex(pattern)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        return reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
    return None


@functools.lru_cache(maxsize=4096)
def policy_regex(pattern: str) -> Any:
    """A pattern of the policy, compiled by RE2 once (every one was checked at load)."""
    return re2.compile(pattern, _POLICY_OPTIONS)


# The allowance left to the call being checked (see first_errors); None outside a check.
_allowance: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "regex_allowance", default=None
)


def _regex_cost(value: str) -> int:
    raw = value.encode()
    cost = len(raw) + _UNICODE_CLASS_COST * (raw.count(b"\\p") + raw.count(b"\\P"))
    for low, high in _COUNTED_REPETITION.findall(raw):
        cost *= max(int(low), int(high or b"0"), 1)
        if cost > _REGEX_ALLOWANCE_PER_CALL:
            break
    return _REGEX_FIXED_COST + cost


def _is_regex(value: object) -> bool:
    """A ``format: regex`` value is valid when RE2 compiles it within what is left of the
    call's allowance; anything RE2 refuses, or that would cost more, is invalid."""
    if not isinstance(value, str):
        return True
    allowance = _allowance.get()
    left = allowance[0] if allowance is not None else _REGEX_ALLOWANCE_PER_CALL
    cost = _regex_cost(value)
    if cost > left:
        return False
    if allowance is not None:
        allowance[0] -= cost
    try:
        re2.compile(value, _VALUE_OPTIONS)
    except Exception:  # whatever RE2 raises, the value is not a regex it runs
        return False
    return True


def _runs_on_re2(pattern: object) -> bool:
    problem = re2_problem(pattern) if isinstance(pattern, str) else None
    if problem is not None:
        raise ValueError(problem)
    return True


def _format_checker(check_regex: Callable[[object], bool]) -> jsonschema.FormatChecker:
    """Draft 2020-12's format checks, with ``regex`` checked by RE2."""
    checker = jsonschema.FormatChecker(())
    checker.checkers = dict(jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers)
    checker.checks("regex", raises=ValueError)(check_regex)
    return checker


# Arguments: a value RE2 refuses, or that overspends the call's allowance, is invalid.
FORMAT_CHECKER = _format_checker(_is_regex)
# Policies: an argument schema's pattern must be one RE2 runs (the error says why not).
POLICY_FORMAT_CHECKER = _format_checker(_runs_on_re2)


def _json_key(value: object) -> object:
    """``value`` rebuilt so that equal JSON values (JSON Schema's equality: ``1 == 1.0``,
    ``true != 1``, key order irrelevant) serialise to the same bytes and unequal ones
    never do: numbers and strings become tagged strings, so they cannot meet each other
    or ``true``; integers (exact, however long) and whole floats share one text."""
    if isinstance(value, str):
        return "s" + value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return "n" + hex(value)
    if isinstance(value, float):
        return "n" + hex(int(value)) if value.is_integer() else "f" + repr(value)
    if isinstance(value, list):
        return [_json_key(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_key(item) for key, item in value.items()}
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def all_distinct(items: list[Any]) -> bool:
    """Whether no two items are equal JSON values, in time linear in their size.

    Each item is kept as a digest of its canonical JSON: a fixed size per item, where
    orjson's output may hold a buffer far larger than the item.
    """
    seen: set[bytes] = set()
    for item in items:
        canonical = orjson.dumps(_json_key(item), option=orjson.OPT_SORT_KEYS)
        key = hashlib.blake2b(canonical, digest_size=16).digest()
        if key in seen:
            return False
        seen.add(key)
    return True


# The keywords below replace jsonschema's (same signature: validator, keyword value,
# instance, schema). Their messages never quote the instance: it may be PHI.


def _unique_items(
    validator: Any, unique: object, instance: object, schema: object
) -> Iterator[jsonschema.ValidationError]:
    if unique and isinstance(instance, list) and not all_distinct(instance):
        yield jsonschema.ValidationError("has repeated items")


def _pattern(
    validator: Any, pattern: str, instance: object, schema: object
) -> Iterator[jsonschema.ValidationError]:
    if isinstance(instance, str) and not policy_regex(pattern).search(instance):
        yield jsonschema.ValidationError(f"does not match {pattern!r}")


def extra_properties(schema: Mapping[str, Any], instance: Mapping[str, Any]) -> list[str]:
    """The names in ``instance`` neither ``properties`` nor ``patternProperties`` cover."""
    declared = schema.get("properties", {})
    patterns = [policy_regex(p) for p in schema.get("patternProperties", {})]
    return [k for k in instance if k not in declared and not any(p.search(k) for p in patterns)]


def _pattern_properties(
    validator: Any, patterns: Mapping[str, Any], instance: object, schema: object
) -> Iterator[jsonschema.ValidationError]:
    if not isinstance(instance, dict):
        return
    for pattern, subschema in patterns.items():
        regex = policy_regex(pattern)
        for key, value in instance.items():
            if regex.search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(
    validator: Any, additional: object, instance: object, schema: Mapping[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    if not isinstance(instance, dict):
        return
    extras = extra_properties(schema, instance)
    if isinstance(additional, dict):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif additional is False and extras:
        yield jsonschema.ValidationError("has properties the schema does not allow")


def _unevaluated_items(
    validator: Any, unevaluated: object, instance: object, schema: object
) -> Iterator[jsonschema.ValidationError]:
    # The helper counts the items unevaluatedItems itself accepts as evaluated, too.
    if not isinstance(instance, list):
        return
    evaluated = set(
        jsonschema_utils.find_evaluated_item_indexes_by_schema(validator, instance, schema)
    )
    if any(index not in evaluated for index in range(len(instance))):
        yield jsonschema.ValidationError("has items the schema does not allow")


def _unevaluated_properties(
    validator: Any, unevaluated: object, instance: object, schema: object
) -> Iterator[jsonschema.ValidationError]:
    if not isinstance(instance, dict):
        return
    evaluated = set(
        jsonschema_utils.find_evaluated_property_keys_by_schema(validator, instance, schema)
    )
    for key, value in instance.items():
        if key not in evaluated and next(
            validator.descend(value, unevaluated, path=key, schema_path=key), None
        ):
            yield jsonschema.ValidationError("has properties the schema does not allow")
            return


ArgumentValidator = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft202012Validator,
    validators={
        "uniqueItems": _unique_items,
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
        "unevaluatedItems": _unevaluated_items,
        "unevaluatedProperties": _unevaluated_properties,
    },
    format_checker=FORMAT_CHECKER,
)


def first_errors(
    validator: jsonschema.protocols.Validator, arguments: Mapping[str, Any], count: int
) -> list[jsonschema.ValidationError]:
    """At most ``count`` ways ``arguments`` break the schema, within one call's allowance
    for the regular expressions they carry."""
    token = _allowance.set([_REGEX_ALLOWANCE_PER_CALL])
    try:
        return list(islice(validator.iter_errors(arguments), count))
    finally:
        _allowance.reset(token)


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


def _re2_problems(path: str, patterns: Iterable[str]) -> list[str]:
    """Patterns RE2 cannot run. The metaschema check finds them wherever a schema keyword
    can hold one; this finds those a ``$ref`` reaches elsewhere in the document."""
    return [
        f"{path}: {pattern!r} is not a pattern RE2 runs: {problem}"
        for pattern in patterns
        if (problem := re2_problem(pattern)) is not None
    ]


def argument_validator(
    where: str, schema: Mapping[str, Any] | bool, errors: list[str], warnings: list[str]
) -> jsonschema.protocols.Validator:
    """Compile a rule's argument schema (the policy schema already checked it against the
    draft 2020-12 metaschema, and that its patterns run on RE2); references must resolve
    locally, unchecked formats warn.

    ``patternProperties`` and ``unevaluatedProperties`` in one schema are refused:
    jsonschema finds the properties the patterns evaluated with Python's ``re``.
    """
    if schema is False:
        warnings.append(f"{where}: false denies every call as invalid; use action deny instead")
    if isinstance(schema, dict) and schema.get("$schema", ARGUMENT_SCHEMA_DIALECT) != (
        ARGUMENT_SCHEMA_DIALECT
    ):
        errors.append(f"{where}.$schema: argument schemas are JSON Schema draft 2020-12")
    root = referencing.jsonschema.DRAFT202012.create_resource(schema)
    resolver = referencing.Registry[Any]().resolver_with_root(root)
    pattern_properties = unevaluated_properties = None
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
            keyword == "format" and isinstance(value, str) and value not in FORMAT_CHECKER.checkers
        ):
            warnings.append(
                f"{path}: format {value!r} is not checked (checked: "
                f"{', '.join(sorted(FORMAT_CHECKER.checkers))})"
            )
        elif keyword == "patternProperties" and isinstance(value, dict) and value:
            pattern_properties = pattern_properties or path
            errors += _re2_problems(path, value)
        elif keyword == "pattern" and isinstance(value, str):
            errors += _re2_problems(path, [value])
        elif keyword == "unevaluatedProperties":
            unevaluated_properties = unevaluated_properties or path
    if pattern_properties and unevaluated_properties:
        errors.append(
            f"{unevaluated_properties}: cannot be combined with patternProperties "
            f"({pattern_properties}) in one argument schema"
        )
    return ArgumentValidator(schema, format_checker=FORMAT_CHECKER)  # type: ignore[no-any-return]
