"""Policy files read and parsed (JSON, or YAML without its surprises), then compiled."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from authz.policy.model import Policy, PolicyError, ServerFile
from authz.policy.servers import compile_policy, server_file_paths


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
    """Parse a policy in JSON or YAML (``syntax``; ``auto``: JSON when it is an object in
    braces, else YAML), refusing duplicate keys."""
    if syntax == "auto":
        syntax = "json" if text.lstrip("\ufeff \t\r\n").startswith("{") else "yaml"
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
    """``yaml`` for ``.yaml``/``.yml`` files, ``json`` for ``.json``; ``auto`` for any other
    name (the Kubernetes manifests mount the policy as ``policy``, JSON or YAML)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    return "json" if suffix == ".json" else "auto"


def _parse_bytes(raw: bytes, syntax: str) -> object:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(["(file): not UTF-8"]) from None
    return parse_policy_text(text, syntax)


def read_server_file(server: str, path: Path) -> ServerFile:
    """A server's policy file, read and parsed; what went wrong names the file. Its digest
    is of its bytes (``unreadable: ...`` when it cannot be read, as the watcher says)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        error = f"{path}: (file): cannot read: {exc.strerror}"
        return ServerFile(server, str(path), f"unreadable: {exc.strerror}", errors=(error,))
    digest = hashlib.sha256(raw).hexdigest()
    try:
        doc = _parse_bytes(raw, syntax_of(path))
    except PolicyError as exc:
        errors = tuple(f"{path}: {e}" for e in exc.errors)
        return ServerFile(server, str(path), digest, errors=errors)
    return ServerFile(server, str(path), digest, doc)


def policy_from_bytes(
    raw: bytes, syntax: str = "json", *, base: Path | None = None, previous: Policy | None = None
) -> Policy:
    """Parse, validate and compile a policy file's content; the digest is of the bytes.

    Server files (``servers.NAME: {file: PATH}``) are read relative to ``base``, the main
    file's directory; a broken one keeps its server of the ``previous`` policy, if any.
    """
    doc = _parse_bytes(raw, syntax)
    files = {
        name: read_server_file(name, (base or Path()) / path)
        for name, path in server_file_paths(doc).items()
    }
    return compile_policy(doc, hashlib.sha256(raw).hexdigest(), files=files, previous=previous)


def load_policy(path: str | Path, previous: Policy | None = None) -> Policy:
    """Read, validate and compile a policy file (see :func:`syntax_of`), with its server
    files (see :func:`policy_from_bytes`)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyError([f"(file): cannot read {path}: {exc.strerror}"]) from None
    return policy_from_bytes(raw, syntax_of(path), base=Path(path).parent, previous=previous)
