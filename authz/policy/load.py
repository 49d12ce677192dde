"""Policy files read and parsed (JSON, or YAML without its surprises), then compiled."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from authz.policy.compile import compile_policy
from authz.policy.model import Policy, PolicyError


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
