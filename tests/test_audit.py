"""The audit line and the metrics of a check, written from the engine's one result.

The end-to-end tests in test_operations.py read the same lines from a running service.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from prometheus_client import generate_latest

from authz import audit
from authz.decision import Reason
from authz.engine import Engine
from authz.mcp import HttpRequest
from authz.metrics import Metrics
from authz.policy import compile_policy
from authz.store import Charge, Outcome, open_store

POLICY = compile_policy(
    {
        "version": "1",
        "default": "deny",
        "tools": {
            "logged": {
                "log_arguments": True,
                "arguments": {"properties": {"region": {"enum": ["eu"]}}},
                "limits": [{"counter": "logged", "window": "minute", "max": 1}],
            },
            "quiet": {"action": "allow"},
        },
    }
)


def post(doc: object) -> HttpRequest:
    headers = {"content-type": "application/json", "authorization": "Bearer tok"}
    return HttpRequest(method="POST", headers=headers, body=json.dumps(doc).encode())


def call(name: str, id_: int, **arguments: Any) -> dict[str, Any]:
    params = {"name": name, "arguments": arguments}
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": params}


@pytest.fixture
def lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    sink = io.StringIO()
    monkeypatch.setattr(audit._sink, "stream", sink)
    monkeypatch.setattr(audit._sink, "level", audit.AUDIT_LEVELS["info"])
    yield sink


def written(sink: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in sink.getvalue().splitlines()]


async def test_logged_arguments_are_those_of_the_batch_element_decided(
    lines: io.StringIO,
) -> None:
    engine = Engine(POLICY, open_store("memory://", timeout_s=1.0), clock=lambda: 1_000)
    batch = [call("logged", 1, region="eu"), call("logged", 2, region="us")]
    result = await engine.check(post(batch))
    assert result.decision.reason is Reason.ARGUMENTS_INVALID and result.decision.element == 1
    audit.record(result, "req-1", 0.001)
    (line,) = written(lines)
    assert line["arguments"] == {"region": "us"}
    assert line["batch_element"] == 1 and line["rule"] == "tools.logged"
    assert line["policy"] == POLICY.digest[:12]


async def test_a_rate_limited_call_logs_the_counter_that_refused(lines: io.StringIO) -> None:
    engine = Engine(POLICY, open_store("memory://", timeout_s=1.0), clock=lambda: 1_000)
    assert (await engine.check(post(call("logged", 1, region="eu")))).decision.allowed
    result = await engine.check(post(call("logged", 2, region="eu")))
    assert result.decision.reason is Reason.RATE_LIMITED
    audit.record(result, "req-4", 0.001)
    (line,) = written(lines)
    assert line["counters"] == [{"counter": "logged", "remaining": 0, "max": 1}]
    assert line["arguments"] == {"region": "eu"}


async def test_an_allowed_call_is_logged_under_its_rule_without_arguments_by_default(
    lines: io.StringIO,
) -> None:
    engine = Engine(POLICY, open_store("memory://", timeout_s=1.0))
    result = await engine.check(post(call("quiet", 1, secret="patient-jane-doe")))
    assert result.decision.allowed and result.policy is POLICY
    audit.record(result, "req-2", 0.001)
    (line,) = written(lines)
    assert line["decision"] == "allow" and line["rule"] == "tools.quiet"
    assert "arguments" not in line and "jane" not in json.dumps(line)


class BrokenStore:
    """Narrow stand-in: a store with a bug (not an outage)."""

    async def acquire(self, charges: Sequence[Charge], now_ms: int | None = None) -> Outcome:
        raise RuntimeError("bug")

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_a_bug_denies_and_is_audited_and_counted_under_the_policy(
    lines: io.StringIO,
) -> None:
    engine = Engine(POLICY, BrokenStore())
    result = await engine.check(post(call("logged", 1)))
    assert result.decision.reason is Reason.INTERNAL_ERROR and result.policy is POLICY
    audit.record(result, "req-3", 0.001)
    (line,) = written(lines)
    assert (line["decision"], line["reason"]) == ("deny", "internal_error")
    assert line["policy"] == POLICY.digest[:12]
    metrics = Metrics()
    metrics.record_check(result, 0.001)
    exposition = generate_latest(metrics.registry).decode()
    assert (
        'mcp_authz_decisions_total{caller="other",decision="deny",reason="internal_error",'
        'server="",tool=""} 1.0' in exposition
    )
