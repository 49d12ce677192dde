"""Caller-aware rules end to end: the real Envoy running the shipped envoy/envoy-jwt.yaml
(jwt_authn with a JWKS file this test writes), a real mcp-authz with the policy of issue 14
and the demo MCP upstream, called with real RS256 and ES256 tokens made here and with the
official ``mcp`` SDK and ``fastmcp`` clients:

- different callers get different answers for the same call;
- per-caller budgets are separate and exact;
- a token lacking only a caller set's scopes gets 403 with the step-up challenge;
- both clients surface ``caller_not_permitted`` with its message;
- the audit line and the metrics name the caller set.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from authz.policy import parse_policy_text
from tests.support.clients import McpCallError, fastmcp_call_tool, sdk_call_tool
from tests.test_callers import ISSUE_POLICY
from tests.test_mcp_authorization import (
    PAYLOAD_HEADER,
    JwtStack,
    Keys,
    OperatorValues,
    bearer,
    claims,
    es256,
    istio_like,
    jwt_stack,
    offline,
    operator_values,
    rs256,
    shipped,
)

pytestmark = pytest.mark.e2e

EXPORT = {"datastoreId": "ds-1", "outputS3Uri": "s3://exports/x"}
NOT_PERMITTED = "policy violation: tool 'delete_app' is not permitted for this caller"


def body(tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments},
    }


def post(stack: JwtStack, tool: str, arguments: dict[str, Any], token: str) -> httpx.Response:
    return httpx.post(
        stack.url,
        content=json.dumps(body(tool, arguments)),
        headers={
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            "mcp-protocol-version": "2025-11-25",
            **bearer(token),
        },
        timeout=10,
    )


def verdict(resp: httpx.Response) -> str:
    """What the gateway said: ``allow`` when it let the call through to the upstream (which
    answers a session-less call itself), else the reason code of its denial."""
    if "x-mcp-authz-reason" not in resp.headers:
        return "allow"
    reason: str = resp.json()["error"]["data"]["reason"]
    return reason


class Callers:
    """Tokens for the callers of the issue's policy, signed RS256 or ES256."""

    def __init__(self, keys: Keys, values: OperatorValues) -> None:
        def token(sub: str, signer: Any, **extra: Any) -> str:
            return signer(keys, claims(values, sub, **extra))

        self.nightly = token("svc-nightly-export", rs256, groups=["radiology-export"])
        self.alice = token("alice", es256, groups=["radiology", "radiology-export"])
        self.bob = token("bob", rs256, groups="radiology-export")
        self.carol = token("carol", es256, scope="ecs:read ecs:write")
        self.erin = token("erin", rs256)  # scope ecs:read only: in no set


@pytest.fixture(scope="module")
def values() -> OperatorValues:
    return operator_values(shipped())


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
    )


@pytest.fixture(scope="module")
def callers(keys: Keys, values: OperatorValues) -> Callers:
    return Callers(keys, values)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, values: OperatorValues, keys: Keys
) -> Iterator[JwtStack]:
    tmp = tmp_path_factory.mktemp("callers")
    jwks = tmp / "jwks.json"
    jwks.write_text(keys.jwks())
    policy = parse_policy_text(ISSUE_POLICY, "yaml")
    assert isinstance(policy, dict)
    policy["resource_metadata"] = values.metadata_url
    with jwt_stack(tmp, offline(shipped(), jwks), policy) as running:
        yield running


def test_different_callers_get_different_answers_for_the_same_call(
    stack: JwtStack, callers: Callers, values: OperatorValues
) -> None:
    answers = {
        name: post(stack, "start_dicom_export_job", EXPORT, getattr(callers, name))
        for name in ("nightly", "bob", "carol", "erin")
    }
    assert {name: verdict(r) for name, r in answers.items()} == {
        "nightly": "allow",
        "bob": "allow",
        "carol": "caller_not_permitted",
        "erin": "caller_not_permitted",
    }
    for name in ("carol", "erin"):
        assert answers[name].status_code == 403
        error = answers[name].json()["error"]
        assert error["message"] == (
            "policy violation: tool 'start_dicom_export_job' is not permitted for this caller"
        )
        assert error["data"]["reason"] == "caller_not_permitted"
        assert "www-authenticate" not in answers[name].headers  # no scope would help
    # delete_app: operators need an approval (none is configured here: refused as such).
    approval = post(stack, "delete_app", {"app_name": "web"}, callers.carol)
    assert (approval.status_code, verdict(approval)) == (403, "approval_required")
    assert {"svc-nightly-export", "bob"} <= set(stack.recorded_grants())
    assert not {"carol", "erin"} & set(stack.recorded_grants())
    # Everyone may troubleshoot.
    for name in ("nightly", "alice", "carol", "erin"):
        resp = post(stack, "ecs_troubleshooting_tool", {"app_name": "web"}, getattr(callers, name))
        assert verdict(resp) == "allow", name


def test_per_caller_budgets_are_separate_and_exact(stack: JwtStack, callers: Callers) -> None:
    def spent(token: str) -> int:
        return sum(
            verdict(post(stack, "start_dicom_export_job", EXPORT, token)) == "allow"
            for _ in range(12)
        )

    # alice's own 10 a minute; then bob's budget is his own (one spent by the test above).
    assert spent(callers.alice) == 10
    refused = post(stack, "start_dicom_export_job", EXPORT, callers.alice)
    assert (refused.status_code, verdict(refused)) == (429, "rate_limited")
    assert refused.json()["error"]["data"]["counter"] == "start_dicom_export_job_rate"
    assert spent(callers.bob) == 9
    # The nightly job spends its daily counter, untouched by the exporters'.
    assert spent(callers.nightly) == 12
    lines = [
        line
        for line in stack.audit_lines()
        if line["tool"] == "start_dicom_export_job" and line["grant"] == "svc-nightly-export"
    ]
    assert lines[-1]["counters"] == [{"counter": "export_nightly", "remaining": 487, "max": 500}]
    assert {line["caller"] for line in lines} == {"nightly"}


def test_insufficient_scope_gets_the_step_up_challenge(
    stack: JwtStack, callers: Callers, values: OperatorValues
) -> None:
    resp = post(stack, "delete_app", {"app_name": "web"}, callers.erin)
    assert resp.status_code == 403
    assert resp.headers.get_list("www-authenticate") == [
        f'Bearer error="insufficient_scope", scope="ecs:write", '
        f'resource_metadata="{values.metadata_url}"'
    ]
    assert resp.headers["x-mcp-authz-reason"] == NOT_PERMITTED
    error = resp.json()["error"]
    assert (error["message"], error["data"]["reason"]) == (NOT_PERMITTED, "caller_not_permitted")
    # The metadata it names answers without a token.
    assert (
        httpx.get(stack.base + "/.well-known/oauth-protected-resource/mcp", timeout=5).json()[
            "resource"
        ]
        == values.resource
    )


async def test_both_clients_surface_caller_not_permitted(stack: JwtStack, callers: Callers) -> None:
    for client in (sdk_call_tool, fastmcp_call_tool):
        with pytest.raises(McpCallError) as info:
            await client(stack.url, "delete_app", {"app_name": "web"}, bearer(callers.alice))
        assert info.value.message == NOT_PERMITTED, client.__name__
        assert info.value.code == -32051
        if client is sdk_call_tool:
            assert info.value.data["reason"] == "caller_not_permitted"
        # The same client, as an exporter, may export.
        text = await client(stack.url, "start_dicom_export_job", EXPORT, bearer(callers.nightly))
        assert text


def test_audit_and_metrics_name_the_caller_set(stack: JwtStack) -> None:
    # (envoy-jwt.yaml filters lists too: their audit lines name no tool)
    lines = [line for line in stack.audit_lines() if line["decision"] != "list_filtered"]
    by_grant = {(line["grant"], line["tool"]): line["caller"] for line in lines}
    assert by_grant[("alice", "start_dicom_export_job")] == "exporters"
    assert by_grant[("carol", "delete_app")] == "operators"
    assert by_grant[("erin", "delete_app")] is None
    text = httpx.get(stack.metrics, timeout=5).text
    callers = {
        label.split('"')[1]
        for line in text.splitlines()
        if line.startswith("mcp_authz_decisions_total{")
        for label in line.split("{", 1)[1].split(",")
        if label.startswith("caller=")
    }
    assert callers == {"exporters", "operators", "nightly", "other"}
    for grant in ("alice", "bob", "carol", "erin", "svc-nightly-export"):
        assert grant not in text


def test_the_policy_file_is_the_issue_s(stack: JwtStack) -> None:
    """The stack runs the issue's policy as written (plus the metadata URL)."""
    assert stack.authz_log is not None
    policy = json.loads((stack.authz_log.parent / "policy.json").read_text())
    issue = parse_policy_text(ISSUE_POLICY, "yaml")
    assert isinstance(issue, dict)
    assert {k: v for k, v in policy.items() if k != "resource_metadata"} == issue


def test_callers_from_istio_s_payload_header(tmp_path: Path, keys: Keys, callers: Callers) -> None:
    """Istio's topology: the verified payload in a header the proxy sets and strips from
    clients; the same caller sets decide."""
    jwks = tmp_path / "jwks.json"
    jwks.write_text(keys.jwks())
    policy = parse_policy_text(ISSUE_POLICY, "yaml")
    assert isinstance(policy, dict)
    policy["grants"] = {"source": "jwt", "claim": "sub", "payload_in_header": PAYLOAD_HEADER}
    with jwt_stack(tmp_path, istio_like(offline(shipped(), jwks)), policy) as istio:
        assert verdict(post(istio, "start_dicom_export_job", EXPORT, callers.alice)) == "allow"
        refused = post(istio, "start_dicom_export_job", EXPORT, callers.erin)
        assert verdict(refused) == "caller_not_permitted"
        assert verdict(post(istio, "delete_app", {"app_name": "w"}, callers.carol)) == (
            "approval_required"
        )
        assert {line["caller"] for line in istio.audit_lines()} == {"exporters", None, "operators"}


def test_envoy_s_access_log_carries_the_caller(stack: JwtStack, callers: Callers) -> None:
    post(stack, "ecs_troubleshooting_tool", {"app_name": "log"}, callers.carol)
    assert stack.authz_log is not None
    envoy_log = stack.authz_log.parent / "envoy.log"
    wanted = {"operators", "exporters", "nightly"}
    deadline = time.monotonic() + 10
    seen: set[str] = set()
    while not wanted <= seen and time.monotonic() < deadline:
        time.sleep(0.1)  # Envoy flushes its access log on a timer
        lines = [json.loads(line) for line in envoy_log.read_text().splitlines() if line[:1] == "{"]
        seen = {line.get("authz_caller") for line in lines if line.get("authz_tool")}
    assert wanted <= seen
