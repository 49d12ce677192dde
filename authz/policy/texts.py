"""Why arguments broke a rule, in words that never quote a value (it may be PHI).

Argument paths show names only when they are identifiers; anything else is client data
that could carry PHI, so it is shown as ``?``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

import jsonschema

_SHOWN_KEY = re.compile(r"[A-Za-z_$][A-Za-z0-9_$-]{0,63}")


def pointer_tokens(pointer: str) -> list[str]:
    """The reference tokens of a JSON pointer (RFC 6901), unescaped."""
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]


def pointer_path(pointer: str) -> str:
    """A cost pointer as an argument path; it is policy text, so shown whole."""
    path = "arguments"
    for token in pointer_tokens(pointer):
        if token.isdigit():
            path += f"[{token}]"
        elif _SHOWN_KEY.fullmatch(token):
            path += f".{token}"
        else:
            path += f"[{json.dumps(token)}]"
    return path


def _key_text(key: str) -> str:
    return f".{key}" if _SHOWN_KEY.fullmatch(key) else "[?]"


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


_KEYWORD_TEXTS = {
    "enum": "is not one of the allowed values",
    "const": "is not the allowed value",
    "uniqueItems": "must not repeat items",
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
# Keywords whose text shows the schema's own value (policy text, never the call's).
_RULE_TEXTS = {
    "pattern": "does not match the required pattern '{}'",
    "minimum": "must be at least {}",
    "maximum": "must be at most {}",
    "exclusiveMinimum": "must be greater than {}",
    "exclusiveMaximum": "must be less than {}",
    "multipleOf": "must be a multiple of {}",
    "minLength": "must be at least {} characters long",
    "maxLength": "must be at most {} characters long",
    "minItems": "must have at least {} items",
    "maxItems": "must have at most {} items",
    "minProperties": "must have at least {} arguments",
    "maxProperties": "must have at most {} arguments",
    "format": "is not a valid {}",
}


def argument_error_text(error: jsonschema.ValidationError) -> str:
    """``arguments.outputS3Uri: does not match the required pattern '^s3://…'``.

    Built from the keyword and the schema, never from jsonschema's own message: that one
    quotes the value, which may be PHI.
    """
    path = _argument_path(error.absolute_path)
    keyword, rule = error.validator, error.validator_value
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
    if keyword == "type":
        return f"{path}: must be of type {' or '.join(rule) if isinstance(rule, list) else rule}"
    if keyword in _RULE_TEXTS:
        shown = str(rule)[:120] if keyword == "pattern" else rule
        return f"{path}: {_RULE_TEXTS[keyword].format(shown)}"
    return f"{path}: {_KEYWORD_TEXTS.get(str(keyword), f'breaks the {keyword!r} rule')}"
