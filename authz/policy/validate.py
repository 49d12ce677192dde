"""A parsed policy checked against the published format, authz/policy.schema.json."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import cache
from importlib import resources

import jsonschema


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


def schema_errors(doc: object) -> list[tuple[tuple[str | int, ...], str]]:
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
