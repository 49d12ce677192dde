"""Argument schemas (JSON Schema draft 2020-12) compiled once, at load, into validators."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jsonschema
import referencing
import referencing.exceptions
import referencing.jsonschema

ARGUMENT_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_FORMAT_CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER


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


def argument_validator(
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
