"""Bounds: pathological bodies are answered quickly, per policy, without blowing up.

The issue's bound is 50 ms per answer for any 1 MiB body: 100,000 levels of nesting, tiny
keys, long strings, and whatever else a body can hold as much of as possible. What is
measured is the in-process decision (``Engine.check`` on an ``HttpRequest``, the whole of
mcp-authz's work for a request apart from gRPC framing), as thread CPU time, best of a few
runs: other processes share this 2-core machine, and wall-clock time would measure them.
Memory is the tracemalloc peak of one decision.

This machine is a VM on a shared host: when the host is busy, the same work shows up to
twice its quiet CPU time. So the 50 ms target is recorded per body in RELIABILITY.md as met
or MISSED, and the test fails at ``FAIL_MS``: far enough above the target not to fail CI on
a noisy host, low enough to catch a blow-up (1 MiB of empty arrays took 600 ms before the
bounds). Each body's expected answer (and refusal reason) is asserted exactly.

The costliest bodies are the ones that pass every bound: as many members and array
elements as allowed, plus an integer beyond 64 bits, which takes the exact parser too.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from authz import mcp
from authz.decision import Decision, Reason
from authz.engine import Engine
from authz.jsondoc import MAX_ARRAY_ELEMENTS, MAX_DEPTH, MAX_MEMBERS
from authz.policy import PolicyError, compile_policy
from authz.store.memory import MemoryStore
from tests.support.reliability import record

POLICY: dict[str, Any] = {
    "version": "1",
    "default": "deny",
    "tools": {"containerize_app": {"action": "allow"}, "delete_app": {"action": "deny"}},
}
RAISED = {**POLICY, "max_json_members": 20_000}
# Argument schemas whose keywords jsonschema (or Python's re) evaluated in more than linear
# time: uniqueItems on objects, format: regex, a pattern with a nested quantifier.
SCHEMAS: dict[str, Any] = {
    **POLICY,
    "tools": {
        "import_rows": {
            "arguments": {
                "properties": {
                    "rows": {"type": "array", "uniqueItems": True},
                    "filter": {"type": "string", "format": "regex"},
                    "filters": {"type": "array", "items": {"format": "regex"}},
                    "name": {"type": "string", "pattern": "^(a+)+$"},
                }
            }
        }
    },
}
HEADERS = {"content-type": "application/json", "authorization": "Bearer bounds"}
ONE_MIB = 1 << 20
BOUND_MS = 50.0
FAIL_MS = 4 * BOUND_MS
RUNS = 5
PREFIX = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"'
# Members of a call outside its arguments: jsonrpc, id, method, params, name, arguments.
ENVELOPE_MEMBERS = 6
LONG_INTEGER = b"123456789012345678901234567890"


def call_with_arguments(name: str, arguments: bytes) -> bytes:
    return PREFIX + name.encode() + b'","arguments":' + arguments + b"}}"


def tiny_keys(size: int, tail: bytes = b"") -> bytes:
    """An object of distinct keys of 1-4 characters with 0 values, ``size`` bytes long;
    ``tail`` (members) goes last."""
    parts: list[str] = []
    total = 2 + len(tail)
    i = 0
    while total < size - 16:
        part = f'"{i:x}":0'
        parts.append(part)
        total += len(part) + 1
        i += 1
    return ("{" + ",".join(parts)).encode() + tail + b"}"


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def padded_call(members: int, value: bytes = b"0", extra: bytes = b"") -> bytes:
    """A 1 MiB call to the allowed tool holding exactly ``members`` object members: keys
    with ``value``, then ``extra`` (more members, counted), then a string filling the MiB."""
    keys = members - ENVELOPE_MEMBERS - 1 - extra.count(b":")  # 1: the filler's own member
    parts = [b'"%x":%s' % (i, value) for i in range(keys)]
    if extra:
        parts.append(extra)
    arguments = b"{" + b",".join(parts) + b',"filler":"'
    body = call_with_arguments("containerize_app", arguments + b'"}')
    filler = b"a" * (ONE_MIB - len(body))
    return call_with_arguments("containerize_app", arguments + filler + b'"}')


def array_of(element: bytes, count: int) -> bytes:
    return b"[" + b",".join([element] * count) + b"]"


@dataclass(frozen=True)
class Case:
    name: str
    body: Callable[[], bytes]
    reason: Reason
    detail: str = ""  # in the decision's message
    policy: dict[str, Any] = field(default_factory=lambda: POLICY)


# The costliest body that passes every bound: members up to the cap, arrays up to theirs,
# and one integer beyond 64 bits.
_AT_BOTH_CAPS = b'"arrays":' + array_of(b"[]", MAX_ARRAY_ELEMENTS) + b',"long":' + LONG_INTEGER

CASES = [
    Case(
        "nesting 100,000 (top level)",
        lambda: nested(100_000),
        Reason.MALFORMED,
        detail="nested too deeply",
    ),
    Case(
        "nesting 100,000 objects",
        lambda: b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        Reason.MALFORMED,
        detail="more than 10000 object members",
    ),
    Case(
        "nesting 100,000 in arguments",
        lambda: call_with_arguments("containerize_app", b'{"x":' + nested(100_000) + b"}"),
        Reason.MALFORMED,
        detail="nested too deeply",
    ),
    Case(
        "nesting 1,000,000 unclosed",
        lambda: b"[" * 1_000_000,
        Reason.MALFORMED,
        detail="nested too deeply",
    ),
    Case(
        "1 MiB string, allowed tool",
        lambda: call_with_arguments("containerize_app", b'{"x":"' + b"a" * ONE_MIB + b'"}'),
        Reason.ALLOWED,
    ),
    Case(
        "1 MiB string, denied tool",
        lambda: call_with_arguments("delete_app", b'{"x":"' + b"a" * ONE_MIB + b'"}'),
        Reason.DENIED_BY_RULE,
    ),
    Case(
        "1 MiB string of escapes",
        lambda: call_with_arguments(
            "containerize_app", b'{"x":"' + b"\\u00e9" * (ONE_MIB // 6) + b'"}'
        ),
        Reason.ALLOWED,
    ),
    Case(
        "1 MiB string of digits (read exactly)",
        lambda: call_with_arguments("containerize_app", b'{"x":"' + b"7" * ONE_MIB + b'"}'),
        Reason.ALLOWED,
    ),
    Case(
        "1 MiB string as the tool name",
        lambda: call_with_arguments("a" * ONE_MIB, b"{}"),
        Reason.DENIED_BY_DEFAULT,
    ),
    # Tiny keys: refused by the member bound before anything is parsed, however the body
    # tries to reach the slower paths.
    Case(
        "1 MiB of one repeated tiny key",
        lambda: b"{" + b'"a":0,' * (ONE_MIB // 6) + b'"b":0}',
        Reason.MALFORMED,
        detail="more than 10000 object members",
    ),
    Case(
        "1 MiB of tiny keys at top level",
        lambda: tiny_keys(ONE_MIB),
        Reason.MALFORMED,
        detail="more than 10000 object members",
    ),
    Case(
        "1 MiB of tiny keys in arguments, allowed tool",
        lambda: call_with_arguments("containerize_app", tiny_keys(ONE_MIB)),
        Reason.MALFORMED,
        detail="more than 10000 object members",
    ),
    Case(
        "1 MiB of tiny keys in arguments, denied tool",
        lambda: call_with_arguments("delete_app", tiny_keys(ONE_MIB)),
        Reason.MALFORMED,
        detail="more than 10000 object members",
    ),
    Case(
        "1 MiB of tiny keys and one escaped colon",
        lambda: call_with_arguments("containerize_app", tiny_keys(ONE_MIB, b',"\\u003a":0')),
        Reason.MALFORMED,
        detail="more than 10000 object members",
    ),
    Case(
        "1 MiB of tiny keys and one integer beyond 64 bits",
        lambda: call_with_arguments(
            "containerize_app", tiny_keys(ONE_MIB, b',"n":' + LONG_INTEGER)
        ),
        Reason.MALFORMED,
        detail="more than 10000 object members",
    ),
    Case(
        "1 MiB of tiny keys, invalid at the very end",
        lambda: call_with_arguments("containerize_app", tiny_keys(ONE_MIB))[:-1] + b"]",
        Reason.MALFORMED,
        detail="more than 10000 object members",
    ),
    # Arrays: cheaper per element than members, but a MiB holds 350,000 of them.
    Case(
        "1 MiB of empty arrays",
        lambda: call_with_arguments(
            "containerize_app", b'{"x":' + array_of(b"[]", ONE_MIB // 3 - 20) + b"}"
        ),
        Reason.MALFORMED,
        detail="more than 50000 array elements",
    ),
    Case(
        "1 MiB of small integers",
        lambda: call_with_arguments(
            "containerize_app", b'{"x":' + array_of(b"0", ONE_MIB // 2 - 40) + b"}"
        ),
        Reason.MALFORMED,
        detail="more than 50000 array elements",
    ),
    Case(
        "1 MiB of empty strings",
        lambda: call_with_arguments(
            "containerize_app", b'{"x":' + array_of(b'""', ONE_MIB // 3 - 20) + b"}"
        ),
        Reason.MALFORMED,
        detail="more than 50000 array elements",
    ),
    # What passes every bound.
    Case(f"{MAX_MEMBERS:,} members (the bound)", lambda: padded_call(MAX_MEMBERS), Reason.ALLOWED),
    Case(
        f"{MAX_MEMBERS + 1:,} members (one over)",
        lambda: padded_call(MAX_MEMBERS + 1),
        Reason.MALFORMED,
        detail="more than 10000 object members",
    ),
    Case(
        "20,000 members, max_json_members 20,000",
        lambda: padded_call(20_000),
        Reason.ALLOWED,
        policy=RAISED,
    ),
    Case(
        "at both bounds, with floats and an integer beyond 64 bits",
        lambda: padded_call(MAX_MEMBERS, b"1.2345678901234567e22", _AT_BOTH_CAPS),
        Reason.ALLOWED,
    ),
    Case(
        "at both bounds, with arrays and an integer beyond 64 bits",
        lambda: padded_call(MAX_MEMBERS, b"[]", _AT_BOTH_CAPS),
        Reason.ALLOWED,
    ),
]

# Rows of one member each: as many as the member bound leaves room for.
_ROWS = MAX_MEMBERS - ENVELOPE_MEMBERS - 1
_REGEX_TEXT = "is not a valid regex"


def _rows(repeat_last: bool) -> bytes:
    rows = b",".join(b'{"i":%d}' % i for i in range(_ROWS - 1))
    last = b'{"i":%d.0}' % (_ROWS - 2) if repeat_last else b'{"i":%d}' % (_ROWS - 1)
    return call_with_arguments("import_rows", b'{"rows":[' + rows + b"," + last + b"]}")


CASES += [
    Case(
        f"{_ROWS:,} objects under uniqueItems", lambda: _rows(False), Reason.ALLOWED, policy=SCHEMAS
    ),
    Case(
        f"{_ROWS:,} objects under uniqueItems, the last repeated",
        lambda: _rows(True),
        Reason.ARGUMENTS_INVALID,
        detail="arguments.rows: must not repeat items",
        policy=SCHEMAS,
    ),
    Case(
        "format: regex, 5,000 open parentheses",
        lambda: call_with_arguments("import_rows", b'{"filter":"' + b"(" * 5_000 + b'"}'),
        Reason.ARGUMENTS_INVALID,
        detail=f"arguments.filter: {_REGEX_TEXT}",
        policy=SCHEMAS,
    ),
    Case(
        "format: regex, 1 MiB value",
        lambda: call_with_arguments("import_rows", b'{"filter":"' + b"a" * (ONE_MIB - 200) + b'"}'),
        Reason.ARGUMENTS_INVALID,
        detail=f"arguments.filter: {_REGEX_TEXT}",
        policy=SCHEMAS,
    ),
    Case(
        "format: regex, 50,000 short values",
        lambda: call_with_arguments(
            "import_rows", b'{"filters":' + array_of(b'"a{1,9}"', MAX_ARRAY_ELEMENTS) + b"}"
        ),
        Reason.ARGUMENTS_INVALID,
        detail=_REGEX_TEXT,
        policy=SCHEMAS,
    ),
    Case(
        "1 MiB against the pattern ^(a+)+$",
        lambda: call_with_arguments("import_rows", b'{"name":"' + b"a" * (ONE_MIB - 200) + b'!"}'),
        Reason.ARGUMENTS_INVALID,
        detail="arguments.name: does not match the required pattern '^(a+)+$'",
        policy=SCHEMAS,
    ),
]

_figures: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _record_figures() -> object:
    yield
    if _figures:
        record(
            "Bounds (pathological bodies)",
            "One in-process decision (Engine.check) per body: thread CPU time, best of "
            f"{RUNS} runs, and the tracemalloc peak of one decision. Target: "
            f"{BOUND_MS:.0f} ms.",
            dict(sorted(_figures.items())),
        )


def _engine(policy: dict[str, Any] = POLICY) -> Engine:
    return Engine(compile_policy(policy), MemoryStore())


def _decide(engine: Engine, body: bytes) -> Decision:
    request = mcp.HttpRequest(method="POST", headers=HEADERS, body=body)
    return asyncio.run(engine.check(request)).decision


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bounded_answer(case: Case) -> None:
    engine = _engine(case.policy)
    body = case.body()
    assert len(body) <= ONE_MIB + 256  # what Envoy lets through at most
    best = float("inf")
    for _ in range(RUNS):
        started = time.thread_time()
        decision = _decide(engine, body)
        best = min(best, time.thread_time() - started)
        assert decision.reason is case.reason, decision.message
        assert case.detail in decision.message
    tracemalloc.start()
    try:
        _decide(engine, body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    best_ms = best * 1000
    _figures[case.name] = (
        f"{best_ms:.1f} ms, peak {peak / ONE_MIB:.1f} MiB for a {len(body) / ONE_MIB:.2f} MiB "
        f"body ({case.reason.code}; 50 ms target {'met' if best_ms < BOUND_MS else 'MISSED'})"
    )
    assert best_ms < FAIL_MS
    # A decision may hold a few copies of the body and one Python object per key; a
    # blow-up (quadratic copies, runaway recursion) would be far above this.
    assert peak < 64 * ONE_MIB


def _members_and_elements(doc: object) -> tuple[int, int]:
    if isinstance(doc, dict | list):
        values = list(doc.values()) if isinstance(doc, dict) else doc
        inner = [_members_and_elements(v) for v in values]
        own = (len(doc), 0) if isinstance(doc, dict) else (0, len(doc))
        return own[0] + sum(m for m, _ in inner), own[1] + sum(e for _, e in inner)
    return 0, 0


def test_the_bodies_at_the_bounds_hold_exactly_that_much() -> None:
    """The cases that pass every bound are really at it (and one over is one over)."""
    for members in (MAX_MEMBERS, MAX_MEMBERS + 1, 20_000):
        assert _members_and_elements(json.loads(padded_call(members))) == (members, 0)
    for value in (b"1.2345678901234567e22", b"[]"):
        body = padded_call(MAX_MEMBERS, value, _AT_BOTH_CAPS)
        assert len(body) == ONE_MIB
        assert _members_and_elements(json.loads(body)) == (MAX_MEMBERS, MAX_ARRAY_ELEMENTS)


def test_depth_is_bounded_below_the_recursion_limit() -> None:
    """Depth up to MAX_DEPTH is parsed; deeper is refused cleanly, including every depth
    around the interpreter's recursion limit (where the parsers, the digest and the
    schema checks would otherwise raise RecursionError at different depths)."""
    engine = _engine()
    limit = sys.getrecursionlimit()
    outer = 3  # the body, params, and the arguments object holding "x"
    for depth in [*range(MAX_DEPTH - outer - 3, MAX_DEPTH + 3), *range(limit - 60, limit + 20)]:
        body = call_with_arguments("containerize_app", b'{"x":' + nested(depth) + b"}")
        decision = _decide(engine, body)
        expected = Reason.ALLOWED if depth + outer <= MAX_DEPTH else Reason.MALFORMED
        assert decision.reason is expected, (depth, decision.message)


def test_huge_batch_is_answered_once() -> None:
    """A 1 MiB batch of tiny requests: one decision, denied whole for the one bad call
    (under a policy that lets a body hold that many members)."""
    engine = _engine({**POLICY, "max_json_members": 40_000})
    ping = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'
    count = (ONE_MIB - 200) // (len(ping) + 1)
    body = (
        b"["
        + b",".join([ping] * count)
        + b","
        + json.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "delete_app"}}
        ).encode()
        + b"]"
    )
    decision = _decide(engine, body)
    assert decision.reason is Reason.DENIED_BY_RULE
    assert decision.element == count


def test_max_json_members_comes_from_the_policy() -> None:
    ping = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'  # three members
    for bound, reason in ((3, Reason.ALLOWED), (2, Reason.MALFORMED)):
        decision = _decide(_engine({**POLICY, "default": "allow", "max_json_members": bound}), ping)
        assert decision.reason is reason, decision.message
    assert "more than 2 object members" in decision.message
    for bad in (0, -5, 2.5, "100", True):
        with pytest.raises(PolicyError, match="max_json_members"):
            compile_policy({**POLICY, "max_json_members": bad})
