"""What the property tests and the atheris harness hold the decision path to.

Shared by ``tests/test_fuzz_properties.py`` (hypothesis) and ``fuzz/fuzz_check.py``
(atheris): one oracle for "this body contains a call the policy denies", one check that a
CheckResponse is the well-formed, documented reply, and a synchronous way to run the
decision path (``envoy.http_request`` → ``Engine.check`` → ``envoy.check_response``).

The oracle is deliberately more generous than the parser: it reads the body the ways
other JSON parsers might (first or last duplicate key wins, invalid UTF-8 replaced) and
folds look-alike names (NFKC, invisible characters, surrounding blanks, and for methods
case). A denied call it finds under any reading must never be allowed.
"""

from __future__ import annotations

import asyncio
import json
import unicodedata
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from authz import envoy, reply
from authz.decision import Decision, Reason
from authz.engine import Engine
from authz.pb import external_auth_pb2
from authz.policy import compile_policy
from authz.store.memory import MemoryStore

ALLOWED_TOOL = "containerize_app"
DENIED_TOOL = "delete_app"

POLICIES: dict[str, dict[str, Any]] = {
    "default-deny": {
        "version": "1",
        "default": "deny",
        "tools": {ALLOWED_TOOL: {"action": "allow"}, DENIED_TOOL: {"action": "deny"}},
    },
    "default-allow": {
        "version": "1",
        "default": "allow",
        "tools": {DENIED_TOOL: {"action": "deny", "reason": "needs a human"}},
    },
}

T = TypeVar("T")

DENIAL_STATUS = {400, 403, 405, 413, 415, 429, 503}
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})


def engine_for(policy_name: str) -> Engine:
    return Engine(compile_policy(POLICIES[policy_name]), MemoryStore())


def fold(text: str) -> str:
    """A name as a lenient server might read it: NFKC, without invisible characters."""
    normal = unicodedata.normalize("NFKC", text)
    return "".join(ch for ch in normal if unicodedata.category(ch) not in _INVISIBLE)


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


def _readings(body: bytes) -> Iterator[Any]:
    text = body.decode("utf-8", "replace").lstrip("\ufeff")
    for hook in (dict, _first_wins):
        try:
            yield json.loads(text, object_pairs_hook=hook)
        except (ValueError, RecursionError):
            continue


def _calls(doc: Any) -> Iterator[str]:
    """Tool names of everything in a reading that some server might run as tools/call."""
    for msg in doc if isinstance(doc, list) else [doc]:
        if not isinstance(msg, dict):
            continue
        method = msg.get("method")
        params = msg.get("params")
        if (
            isinstance(method, str)
            and fold(method).strip().casefold() == "tools/call"
            and isinstance(params, dict)
            and isinstance(params.get("name"), str)
        ):
            yield params["name"]


def contains_denied_call(body: bytes, policy_name: str) -> bool:
    """Whether any reading of ``body`` calls a tool the policy denies (or a look-alike)."""
    for doc in _readings(body):
        for name in _calls(doc):
            if fold(name).strip() == DENIED_TOOL:
                return True
            if policy_name == "default-deny" and name != ALLOWED_TOOL:
                return True
    return False


_loop = asyncio.new_event_loop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the one loop every call here shares (no loop per example)."""
    return _loop.run_until_complete(coro)


def decide(
    engine: Engine, request: external_auth_pb2.CheckRequest
) -> tuple[Decision, external_auth_pb2.CheckResponse]:
    """The decision path of one Check, synchronously (one event loop for every call)."""
    http = envoy.http_request(request)
    decision = run(engine.check(http)).decision
    return decision, envoy.check_response(decision, http.headers)


def assert_well_formed(decision: Decision, response: external_auth_pb2.CheckResponse) -> None:
    """A CheckResponse Envoy can act on, and the documented reply for the decision."""
    parsed = external_auth_pb2.CheckResponse.FromString(response.SerializeToString())
    assert parsed == response
    kind = response.WhichOneof("http_response")
    if decision.allowed:
        assert kind == "ok_response" and response.status.code == 0
        return
    assert decision.reason is not Reason.INTERNAL_ERROR, decision.message
    assert kind == "denied_response" and response.status.code != 0
    denied = response.denied_response
    assert denied.status.code == decision.reason.status
    assert denied.status.code in DENIAL_STATUS
    headers = {h.header.key: h.header.value for h in denied.headers}
    assert headers["content-type"] == "application/json"
    reason_text = headers[reply.REASON_HEADER]
    assert reason_text.startswith("policy violation:")
    assert len(reason_text) <= 256 and all(" " <= ch <= "~" for ch in reason_text)
    body = json.loads(denied.body)
    errors = body if isinstance(body, list) else [body]
    assert errors
    for error in errors:
        assert error["jsonrpc"] == "2.0"
        assert error["error"]["code"] == decision.reason.rpc_code
        assert error["error"]["message"].startswith("policy violation:")
        assert error["error"]["data"]["reason"] == decision.reason.code
        assert isinstance(error["id"], str | int | None) and not isinstance(error["id"], bool)
