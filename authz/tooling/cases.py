"""``test``: a policy's unit tests (a cases file), each case decided by the code the
service runs, with fresh in-memory counters and a fixed clock, so the result is the same on
every run and in CI."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, TextIO

import jsonschema

from authz.decision import CheckResult, Decision, Reason
from authz.engine import Engine
from authz.grants import grant_of
from authz.policy import (
    Policy,
    PolicyError,
    parse_policy_text,
    syntax_of,
)
from authz.store.memory import MemoryStore
from authz.tooling.common import load, request_of

# Cases run at this fixed time (Unix ms), so every repetition of a case lands in one window.
CASE_CLOCK_MS = 1_700_000_000_000
DEFAULT_CASE_GRANT = "test-grant"

CASES_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["cases"],
    "properties": {
        "cases": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "expect"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "tool": {"type": "string"},
                    "resource": {"type": "string"},
                    "prompt": {"type": "string"},
                    "body": {"type": ["object", "array"]},
                    "arguments": {"type": "object"},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                    "grant": {"type": ["string", "null"]},
                    "claims": {"type": "object"},
                    "scopes": {"type": "array", "items": {"type": "string", "minLength": 1}},
                    "principal": {"type": "string"},
                    "repeat": {"type": "integer", "minimum": 1, "maximum": 10000},
                    "expect": {"enum": ["allow", "deny", "would_deny"]},
                    "reason": {"type": "string", "minLength": 1},
                    "server": {"type": "string", "minLength": 1},
                },
                "oneOf": [
                    {"required": ["tool"]},
                    {"required": ["resource"]},
                    {"required": ["prompt"]},
                    {"required": ["body"]},
                ],
            },
        }
    },
}


@cache
def _cases_validator() -> jsonschema.protocols.Validator:
    return jsonschema.Draft202012Validator(CASES_SCHEMA)


def _case_body(case: Mapping[str, Any]) -> bytes:
    arguments = case.get("arguments", {})
    if "body" in case:
        doc: Any = case["body"]
    elif "tool" in case:
        doc = {"method": "tools/call", "params": {"name": case["tool"], "arguments": arguments}}
    elif "prompt" in case:
        doc = {"method": "prompts/get", "params": {"name": case["prompt"], "arguments": arguments}}
    else:
        doc = {"method": "resources/read", "params": {"uri": case["resource"]}}
    if "body" not in case:
        doc = {"jsonrpc": "2.0", "id": 1, **doc}
    return json.dumps(doc).encode()


def _outcome(decision: Decision) -> tuple[str, str]:
    """("allow" | "deny" | "would_deny", "<reason code>: <message>")."""
    if not decision.allowed:
        return "deny", f"{decision.reason.code}: {decision.message}"
    if decision.would_deny is not None:
        return "would_deny", f"{decision.would_deny.code}: {decision.message}"
    return "allow", Reason.ALLOWED.code


def _case_claims(case: Mapping[str, Any]) -> dict[str, Any] | None:
    """A case's ``claims``, with its ``scopes`` added to their ``scope`` claim."""
    if "claims" not in case and "scopes" not in case:
        return None
    claims = dict(case.get("claims", {}))
    if "scopes" in case:
        scope = claims.get("scope")
        given = scope.split() if isinstance(scope, str) else []
        claims["scope"] = " ".join([*given, *case["scopes"]])
    return claims


async def _run_case(policy: Policy, case: Mapping[str, Any]) -> CheckResult:
    engine = Engine(policy, MemoryStore(), clock=lambda: CASE_CLOCK_MS)
    source = engine.grant_source(policy)
    request = request_of(
        _case_body(case),
        case.get("headers", {}),
        source,
        _case_claims(case),
        case.get("principal", ""),
        case.get("server", ""),
    )
    grant = case.get("grant", DEFAULT_CASE_GRANT)
    if grant is None:
        grant = grant_of(request, source)
    result = await engine.decide_for(policy, request, grant)
    for _ in range(case.get("repeat", 1) - 1):
        result = await engine.decide_for(policy, request, grant)
    return result


def run_cases(
    policy_path: str, cases_path: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Run a policy's unit tests: one PASS/FAIL line per case, 1 if any failed."""
    policy = load(policy_path, err)
    if policy is None:
        return 1
    try:
        doc = parse_policy_text(Path(cases_path).read_text(encoding="utf-8"), syntax_of(cases_path))
    except (OSError, UnicodeDecodeError) as exc:
        print(f"{cases_path}: cannot read: {exc}", file=err)
        return 2
    except PolicyError as exc:
        print(f"{cases_path}: {'; '.join(exc.errors)}", file=err)
        return 2
    problems = sorted(
        f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}"
        for e in _cases_validator().iter_errors(doc)  # type: ignore[arg-type]
    )
    if problems:
        print(f"{cases_path}: invalid cases", file=err)
        for problem in problems:
            print(f"  {problem}", file=err)
        return 2
    assert isinstance(doc, dict)
    failed = 0
    for case in doc["cases"]:
        result = asyncio.run(_run_case(policy, case))
        got, why = _outcome(result.decision)
        want, reason = case["expect"], case.get("reason")
        if got == want and (reason is None or reason in why):
            print(f"PASS  {case['name']}", file=out)
            continue
        failed += 1
        wanted = want + (f" with reason containing {reason!r}" if reason else "")
        print(f"FAIL  {case['name']}: expected {wanted}, got {got} ({why})", file=out)
    total = len(doc["cases"])
    print(f"{total - failed} passed, {failed} failed", file=out)
    return 1 if failed else 0
