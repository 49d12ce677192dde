"""Policies with ``servers``: one policy service for several MCP servers.

Each entry of ``servers`` is a whole policy body (``default``, ``callers``, ``tools``,
``resources``, ``prompts``, ``mode``, ``resource_metadata``, ...) compiled by the very
function a policy without servers is compiled by,
:func:`authz.policy.compile.compile_policy`, as that server: its counters are its own (see
:func:`authz.plan.counter_key`), its caller sets (checked against the estate's
``grants``) and rule variants are its own, and a rule of one server never applies to
another. An entry may instead be ``{file: PATH}``, a policy file of its own (relative to
the main file), so each team owns its server's file; the loader reads it
(:mod:`authz.policy.load`) and this module compiles it.

What the estate shares is said once, at the top: ``grants`` (who the caller is),
``max_json_members`` (a server may set its own) and ``budgets``, counters that rules of
any server spend with ``{budget: NAME}``.

Which server a check is for is set by the gateway, never by the client: the Envoy
route's ``mcp_server`` context extension, or, in the Istio central topology, the
destination workload a server's ``match`` lists (see :meth:`Policy.server_name`).

A server file that is broken when the policy is reloaded keeps the previous version of
that server in force (``Policy.kept`` holds every error, each naming the file), as long
as the budgets it spends are unchanged; at start, or with no previous version, it is an
error like any other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from authz.grants import GrantSource, Source
from authz.jsondoc import MAX_MEMBERS
from authz.policy.compile import budgets_of, compile_body, grants_of
from authz.policy.model import Action, Limit, Policy, PolicyError, Rule, RuleTable, ServerFile
from authz.policy.validate import schema_errors

# Sections that belong to a server, not to the top of a policy with servers.
_SERVER_ONLY = ("default", "mode", "callers", "resource_metadata", "tools", "resources", "prompts")
# Sections that belong to the top, said once for every server.
_ESTATE_ONLY = ("servers", "budgets", "grants")


def server_file_paths(doc: object) -> dict[str, str]:
    """The ``file`` of each server entry that names one, by server name, as written."""
    if not isinstance(doc, dict) or not isinstance(doc.get("servers"), dict):
        return {}
    return {
        name: entry["file"]
        for name, entry in doc["servers"].items()
        if isinstance(entry, dict) and isinstance(entry.get("file"), str)
    }


def _within(prefix: str, error: str) -> str:
    """An error of a server body, with the path of the server in front of its own."""
    if error.startswith("(top level)"):
        return prefix + error.removeprefix("(top level)")
    return f"{prefix}.{error}"


def _digest(name: str, content: object, budgets: object) -> str:
    """A server's digest (approvals are bound to it): its name, its body (or its file's
    digest) and the budgets, so a change to any of them needs approvals anew."""
    doc = {"server": name, "content": content, "budgets": budgets}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _nested(doc: Mapping[str, Any], where: str) -> list[str]:
    return [
        f"{where}.{key}: set once, at the top of the policy with servers, not in a server"
        for key in _ESTATE_ONLY
        if key in doc
    ]


def _claim(
    name: str,
    match: Mapping[str, Any],
    principals: dict[str, str],
    hosts: dict[str, str],
    errors: list[str],
) -> None:
    """Record the destinations a server's ``match`` lists; one may select one server."""
    for field, table in (("principals", principals), ("hosts", hosts)):
        for value in match.get(field, ()):
            key = value.lower() if field == "hosts" else value
            other = table.setdefault(key, name)
            if other != name:
                errors.append(
                    f"servers.{name}.match.{field}: {value!r} is also matched by server {other!r}"
                )


def _keepable(
    previous: Policy | None, name: str, source: ServerFile, budgets: Mapping[str, Limit]
) -> Policy | None:
    """The previous version of a server whose file is now broken, if it may stay."""
    if previous is None or previous.servers is None or previous.budgets != budgets:
        return None
    if not any(f.server == name and f.path == source.path for f in previous.files):
        return None
    return previous.servers.get(name)


def _file_server(
    name: str,
    source: ServerFile,
    top: Mapping[str, Any],
    budgets: Mapping[str, Limit],
    budgets_raw: object,
    grants: GrantSource | None,
) -> Policy:
    if source.errors:
        raise PolicyError(list(source.errors))
    doc = source.doc
    errors = []
    if isinstance(doc, dict):
        errors = _nested(doc, "(top level)")
        if "max_json_members" in top and "max_json_members" not in doc:
            doc = {**doc, "max_json_members": top["max_json_members"]}
    try:
        policy = compile_body(
            doc,
            _digest(name, source.digest, budgets_raw),
            server=name,
            budgets=budgets,
            estate_grants=grants,
        )
    except PolicyError as exc:
        errors += exc.errors
    if errors:
        raise PolicyError([f"{source.path}: {error}" for error in errors])
    return policy


def compile_servers(
    doc: Mapping[str, Any],
    digest: str,
    files: Mapping[str, ServerFile],
    previous: Policy | None,
) -> Policy:
    """Compile a policy with ``servers`` (see the module docstring), every error at once."""
    found = schema_errors(doc)
    errors = [text for _, text in found]
    broken = {path[:2] for path, _ in found}
    errors += [
        f"{key}: a policy with servers says it in each server (servers.NAME.{key})"
        for key in _SERVER_ONLY
        if key in doc
    ]
    budgets_raw = doc.get("budgets", {})
    budgets = budgets_of(doc, broken, errors)
    grants_ok = not any(path[:1] == ("grants",) for path in broken)
    grants = grants_of(doc.get("grants"), errors) if grants_ok else None
    # A broken grants section is reported already: check the servers' caller sets as if
    # it were jwt (the policy is refused anyway).
    checked_against = grants if grants_ok else GrantSource(Source.JWT)
    top = {key: doc[key] for key in ("version", "max_json_members") if key in doc}
    servers: dict[str, Policy] = {}
    principals: dict[str, str] = {}
    hosts: dict[str, str] = {}
    read: list[ServerFile] = []
    kept: list[str] = []
    raw_servers = doc.get("servers") if ("servers",) not in broken else None
    for name, entry in (raw_servers if isinstance(raw_servers, dict) else {}).items():
        if ("servers", name) in broken or not isinstance(entry, dict):
            continue
        _claim(name, entry.get("match", {}), principals, hosts, errors)
        if "file" in entry:
            other = sorted(set(entry) - {"file", "match"})
            if other:
                errors.append(
                    f"servers.{name}: a server in a file of its own has only file and match "
                    f"here, not {', '.join(other)}"
                )
                continue
            source = files.get(name)
            if source is None:
                errors.append(f"servers.{name}.file: not read (load_policy reads server files)")
                continue
            read.append(source)
            try:
                servers[name] = _file_server(
                    name, source, top, budgets, budgets_raw, checked_against
                )
            except PolicyError as exc:
                old = _keepable(previous, name, source, budgets)
                if old is None:
                    errors += exc.errors
                else:
                    kept += exc.errors
                    servers[name] = old
            continue
        body = {key: value for key, value in entry.items() if key != "match"}
        where = f"servers.{name}"
        errors += _nested(body, where)
        try:
            servers[name] = compile_body(
                {**top, **body},
                _digest(name, body, budgets_raw),
                server=name,
                budgets=budgets,
                estate_grants=checked_against,
            )
        except PolicyError as exc:
            errors += [_within(where, error) for error in exc.errors]
    if errors:
        raise PolicyError(errors)
    if not digest:
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    warnings = [
        f"servers.{name}.{warning}"
        for name, server in servers.items()
        for warning in server.warnings
    ]
    return Policy(
        version=doc["version"],
        # Never used: every check is decided by a server's policy, or refused as
        # unknown_server before any rule.
        default=Rule(where="default", action=Action.DENY),
        tools=RuleTable(),
        digest=digest,
        grants=grants,
        warnings=tuple(warnings),
        max_json_members=int(doc.get("max_json_members", MAX_MEMBERS)),
        budgets=budgets,
        servers=servers,
        server_principals=principals,
        server_hosts=hosts,
        files=tuple(read),
        kept=tuple(kept),
    )


def compile_policy(
    doc: object,
    digest: str = "",
    *,
    files: Mapping[str, ServerFile] | None = None,
    previous: Policy | None = None,
) -> Policy:
    """Validate a parsed policy document and compile it, or raise :class:`PolicyError`:
    one body, or a policy with ``servers`` (with the server ``files`` the loader read, and
    the ``previous`` policy whose servers a broken file keeps)."""
    if isinstance(doc, dict) and "servers" in doc:
        return compile_servers(doc, digest, files or {}, previous)
    return compile_body(doc, digest)
