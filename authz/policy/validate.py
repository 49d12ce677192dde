"""A parsed policy checked against the published format, authz/policy.schema.json."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable
from functools import cache
from importlib import resources
from typing import Any

import jsonschema


@cache
def _format() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(
        resources.files("authz").joinpath("policy.schema.json").read_text(encoding="utf-8")
    )
    return schema


@cache
def _validator() -> jsonschema.protocols.Validator:
    schema = _format()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    # The format checker makes the metaschema check argument schemas' regexes, too.
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _known_fields(schema: object) -> set[str]:
    """The field names a schema of the policy format declares, through its local ``$ref``s
    (a rule's fields are shared through ``#/$defs/ruleFields``)."""
    if not isinstance(schema, dict):
        return set()
    names = set(schema.get("properties", {}))
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = _format()
        for token in ref[2:].split("/"):
            target = target.get(token, {}) if isinstance(target, dict) else {}
        names |= _known_fields(target)
    return names


def _unknown_fields(err: jsonschema.ValidationError) -> str:
    """``unknown field(s) ('limit' was unexpected); did you mean 'limits'?``"""
    message = re.sub(
        r"^(Additional|Unevaluated) properties are not allowed", "unknown field(s)", err.message
    )
    known = sorted(_known_fields(err.schema))
    instance = err.instance if isinstance(err.instance, dict) else {}
    unknown = sorted(name for name in instance if name not in known)
    guesses = [
        (name, close[0])
        for name in unknown
        if (close := difflib.get_close_matches(name, known, n=1))
    ]
    if not guesses:
        return message
    if len(unknown) == 1:
        return f"{message}; did you mean {guesses[0][1]!r}?"
    pairs = ", ".join(f"{guess!r} for {name!r}" for name, guess in guesses)
    return f"{message}; did you mean {pairs}?"


def _not_the_string(err: jsonschema.ValidationError) -> str | None:
    """A number or boolean where the format wants a string, as YAML reads ``version: 1``."""
    if err.validator != "const" or not isinstance(err.validator_value, str):
        return None
    if not isinstance(err.instance, int | float):
        return None
    kind = "a boolean" if isinstance(err.instance, bool) else "a number"
    field = err.absolute_path[-1] if err.absolute_path else "value"
    wanted = err.validator_value
    shown = json.dumps(err.instance)
    return f'{shown} is {kind}, not the string {wanted!r}; quote it: {field}: "{wanted}"'


def _path(parts: Iterable[str | int]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def schema_errors(doc: object) -> list[tuple[tuple[str | int, ...], str]]:
    """Schema violations as ``(path, "path: message")``, sorted by their text."""
    errors = []
    for err in _validator().iter_errors(doc):  # type: ignore[arg-type]
        message = err.message
        if isinstance(err.schema, dict) and "x-error" in err.schema:
            message = f"{err.instance!r} {err.schema['x-error']}"
        elif err.validator in ("additionalProperties", "unevaluatedProperties"):
            message = _unknown_fields(err)
        else:
            message = _not_the_string(err) or message
        path = tuple(err.absolute_path)
        errors.append((path, f"{_path(path)}: {message}"))
    return sorted(errors, key=lambda e: e[1])
