"""End to end through the real Envoy, the mcp-authz process and the demo MCP server, with
the official MCP SDK and fastmcp clients: argument validation, glob patterns, dry-run, hot
reload (file watch, SIGHUP, under load), and grants from a JWT verified by Envoy."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.clients import (
    McpCallError,
    fastmcp_call_tool,
    sdk_call_tool,
    sdk_list_tools,
)
from tests.support.stack import (
    ROOT,
    Stack,
    authz_proc,
    envoy_config,
    envoy_proc,
    free_port,
    mcp_stack,
    running,
    upstream_proc,
    wait_ready,
)

pytestmark = pytest.mark.e2e

CALLERS = {"sdk": sdk_call_tool, "fastmcp": fastmcp_call_tool}
APPROVED = {"datastoreId": "ds-0001", "outputS3Uri": "s3://approved-exports/a", "studyCount": 2}

FEATURES = {
    "version": "1",
    "default": "deny",
    "tools": {
        "start_dicom_export_job": {
            "arguments": {
                "type": "object",
                "required": ["datastoreId", "outputS3Uri", "studyCount"],
                "properties": {
                    "datastoreId": {"enum": ["ds-0001", "ds-0002"]},
                    "outputS3Uri": {"type": "string", "pattern": "^s3://approved-exports/"},
                    "studyCount": {"type": "integer", "minimum": 1},
                },
            },
            "limits": [{"counter": "studies", "window": "day", "max": 5, "cost": "/studyCount"}],
        },
        "list_*": {"action": "allow"},
        "delete_*": {"action": "deny", "reason": "deletes need a human operator"},
        "ecs_*": {"mode": "dry-run", "action": "deny", "reason": "ecs tools under review"},
        "containerize_app": {
            "mode": "dry-run",
            "limits": [{"counter": "containerize", "window": "minute", "max": 1}],
        },
    },
    "prompts": {"deploy_*": {"action": "deny", "reason": "no deployment prompts"}},
}


def bearer(token: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token or 'tok-' + uuid.uuid4().hex}"}


def rpc(method: str, id_: Any = 1, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}


def tool_call(name: str, id_: Any = 1, **arguments: Any) -> dict[str, Any]:
    return rpc("tools/call", id_, name=name, arguments=arguments)


def post(url: str, doc: object, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        url,
        content=json.dumps(doc),
        headers={
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            "mcp-protocol-version": "2025-11-25",
            **headers,
        },
        timeout=10,
    )


def write_policy(path: Path, doc: dict[str, Any] | str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("policy-e2e")
    policy = tmp / "policy.json"
    policy.write_text(json.dumps(FEATURES))
    with mcp_stack(tmp, policy, ["--store", "memory"]) as s:
        yield s


# --- argument validation --------------------------------------------------------------------


@pytest.mark.parametrize("client", ["sdk", "fastmcp"])
async def test_arguments_are_validated_before_the_upstream(stack: Stack, client: str) -> None:
    call = CALLERS[client]
    before = stack.recorded_tools().count("start_dicom_export_job")
    leaky = {**APPROVED, "outputS3Uri": "s3://jane-doe-1970-mrn-4711/"}
    with pytest.raises(McpCallError) as info:
        await call(stack.url, "start_dicom_export_job", leaky, bearer())
    assert info.value.code == -32051
    assert info.value.message == (
        "policy violation: tool 'start_dicom_export_job': invalid arguments: "
        "arguments.outputS3Uri: does not match the required pattern '^s3://approved-exports/'"
    )
    assert info.value.data["reason"] == "invalid_arguments"
    assert "jane" not in json.dumps(info.value.data)
    assert stack.recorded_tools().count("start_dicom_export_job") == before
    text = await call(stack.url, "start_dicom_export_job", APPROVED, bearer())
    assert "s3://approved-exports/a" in text
    assert stack.recorded_tools().count("start_dicom_export_job") == before + 1


def test_argument_denial_over_http(stack: Stack) -> None:
    resp = post(stack.url, tool_call("start_dicom_export_job", 7, datastoreId="ds-9"), bearer())
    assert resp.status_code == 403
    body = resp.json()
    assert body["id"] == 7 and body["error"]["data"]["reason"] == "invalid_arguments"
    assert resp.headers["x-mcp-authz-reason"] == (
        "policy violation: tool 'start_dicom_export_job': invalid arguments: "
        "arguments.datastoreId: is not one of the allowed values; "
        "arguments: missing required argument(s) 'outputS3Uri', 'studyCount'"
    )


async def test_a_cost_budget_from_an_argument(stack: Stack) -> None:
    headers = bearer()
    await sdk_call_tool(stack.url, "start_dicom_export_job", {**APPROVED, "studyCount": 4}, headers)
    resp = post(
        stack.url, tool_call("start_dicom_export_job", 3, **{**APPROVED, "studyCount": 2}), headers
    )
    assert resp.status_code == 429
    assert "counter 'studies' allows 5 units per day" in resp.json()["error"]["message"]
    await sdk_call_tool(stack.url, "start_dicom_export_job", {**APPROVED, "studyCount": 1}, headers)


# --- patterns ---------------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["sdk", "fastmcp"])
async def test_glob_rules(stack: Stack, client: str) -> None:
    call = CALLERS[client]
    assert "Datastores" in await call(stack.url, "list_datastores", {}, bearer())
    with pytest.raises(McpCallError) as info:
        await call(stack.url, "delete_app", {"app_name": "prod"}, bearer())
    assert info.value.message == (
        "policy violation: tool 'delete_app' denied: deletes need a human operator"
    )
    assert "delete_app" not in stack.recorded_tools()


def test_prompt_rules(stack: Stack) -> None:
    resp = post(stack.url, rpc("prompts/get", 4, name="deploy_checklist"), bearer())
    assert resp.status_code == 403
    assert resp.json()["error"]["message"] == (
        "policy violation: prompt 'deploy_checklist' denied: no deployment prompts"
    )


# --- dry-run ------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["sdk", "fastmcp"])
async def test_dry_run_denial_is_allowed_and_marked(stack: Stack, client: str) -> None:
    args = {"action": "list", "resource_type": "cluster"}
    text = await CALLERS[client](stack.url, "ecs_resource_management", args, bearer())
    assert "ecs list cluster" in text
    calls = [
        r
        for r in stack.recorded()
        if any(m["tool"] == "ecs_resource_management" for m in r["jsonrpc"] or [])
    ]
    assert "x-mcp-authz-dry-run" in calls[-1]["headers"]


def test_dry_run_header_on_the_wire(stack: Stack) -> None:
    headers = bearer()
    resp = post(stack.url, tool_call("ecs_troubleshooting_tool", app_name="x"), headers)
    assert resp.headers["x-mcp-authz-dry-run"] == "deny:denied_by_rule"
    assert "x-mcp-authz-reason" not in resp.headers
    # A dry-run rate limit: the second call in a minute would be denied, and passes.
    first = post(stack.url, tool_call("containerize_app", app_path="/a"), headers)
    assert "x-mcp-authz-dry-run" not in first.headers
    second = post(stack.url, tool_call("containerize_app", app_path="/a"), headers)
    assert second.headers["x-mcp-authz-dry-run"] == "deny:rate_limited"
    upstream = [r for r in stack.recorded() if "x-mcp-authz-dry-run" in r["headers"]]
    assert any(m["tool"] == "containerize_app" for r in upstream for m in r["jsonrpc"] or [])
    # The audit line says what the rule would have done.
    audit = [
        json.loads(line)
        for line in stack.authz.output().splitlines()
        if line.startswith("{") and '"tool":"ecs_troubleshooting_tool"' in line
    ]
    assert [(a["decision"], a["reason"]) for a in audit] == [("dry_run_deny", "denied_by_rule")]
    assert audit[0]["rule"] == "tools.ecs_*"


# --- hot reload ---------------------------------------------------------------------------------


def probe_policy(reason: str) -> dict[str, Any]:
    return {
        "version": "1",
        "default": "deny",
        "tools": {
            "delete_app": {"action": "deny", "reason": reason},
            "list_datastores": {},
        },
    }


def probe(url: str) -> str:
    resp = post(url, tool_call("delete_app", app_name="x"), bearer("probe"))
    assert resp.status_code == 403, resp.text
    return str(resp.json()["error"]["message"])


def until(predicate: Any, timeout: float = 30.0) -> None:
    """Poll for a condition; the bound only stops a hung test."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_sighup_reloads_the_running_service(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    write_policy(policy, probe_policy("first"))
    with mcp_stack(tmp_path, policy, ["--store", "memory"], "--reload-interval", "0") as s:
        assert probe(s.url).endswith("denied: first")
        write_policy(policy, probe_policy("second"))
        assert probe(s.url).endswith("denied: first"), "polling is off: nothing reloads"
        assert s.authz.popen is not None
        s.authz.popen.send_signal(signal.SIGHUP)
        until(lambda: probe(s.url).endswith("denied: second"))
        write_policy(policy, '{"version": "1", "default": "maybe"}')
        s.authz.popen.send_signal(signal.SIGHUP)
        until(lambda: "policy reload failed" in s.authz.output())
        assert probe(s.url).endswith("denied: second")
        assert "default: 'maybe' is not one of" in s.authz.output()


async def test_reload_under_load(tmp_path: Path) -> None:
    """The file is replaced 20 times, valid and broken versions alternating, while checks
    stream through Envoy: every check is answered, always under a valid version."""
    policy = tmp_path / "policy.json"
    write_policy(policy, probe_policy("version 0"))
    valid = {"version 0"}
    with mcp_stack(tmp_path, policy, ["--store", "memory"], "--reload-interval", "0.05") as s:
        stop = asyncio.Event()
        denials: list[str] = []
        allowed: list[str] = []
        failures: list[str] = []

        async def raw_stream() -> None:
            async with httpx.AsyncClient(timeout=10) as http:
                while not stop.is_set():
                    resp = await http.post(
                        s.url,
                        content=json.dumps(tool_call("delete_app", app_name="x")),
                        headers={"content-type": "application/json", **bearer("load")},
                    )
                    if resp.status_code == 403:
                        denials.append(resp.json()["error"]["message"])
                    else:
                        failures.append(f"{resp.status_code} {resp.text[:200]}")

        async def client_stream() -> None:
            while not stop.is_set():
                try:
                    allowed.append(
                        await sdk_call_tool(s.url, "list_datastores", {}, bearer("load"))
                    )
                except Exception as exc:
                    failures.append(repr(exc))

        async def rewrite() -> None:
            for n in range(1, 21):
                failed_before = s.authz.output().count("policy reload failed")
                if n % 2:
                    write_policy(policy, probe_policy(f"version {n}"))
                    valid.add(f"version {n}")
                    while not denials or not denials[-1].endswith(f"denied: version {n}"):
                        await asyncio.sleep(0.02)
                else:
                    broken = probe_policy(f"BROKEN {n}")
                    broken["tools"]["delete_app"]["maximum"] = 1
                    write_policy(policy, broken)
                    while s.authz.output().count("policy reload failed") == failed_before:
                        await asyncio.sleep(0.02)

        streams = [asyncio.create_task(raw_stream()) for _ in range(3)]
        streams.append(asyncio.create_task(client_stream()))
        try:
            await asyncio.wait_for(rewrite(), 120)
        finally:
            stop.set()
            await asyncio.gather(*streams)
        log = s.authz.output()
    assert failures == []
    assert allowed and all("Datastores" in text for text in allowed)
    reasons = {d.split("denied: ", 1)[1] for d in denials}
    assert reasons <= valid, reasons - valid
    assert {f"version {n}" for n in range(1, 21, 2)} <= reasons
    assert log.count("policy reload failed") == 10
    assert log.count("policy reloaded:") == 10


# --- grants from a JWT verified by Envoy's jwt_authn ----------------------------------------


JWT_POLICY = {
    "version": "1",
    "default": "deny",
    "grants": {"source": "jwt", "claim": "sub"},
    "tools": {
        "containerize_app": {"limits": [{"counter": "c", "window": "minute", "max": 1}]},
    },
}


def jwt_envoy_source(tmp: Path, jwks: str) -> Path:
    """envoy/envoy-jwt.yaml with the remote JWKS replaced by an inline one (no network)."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "envoy" / "envoy-jwt.yaml").read_text())
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (jwt_filter,) = [f for f in manager["http_filters"] if f["name"].endswith("jwt_authn")]
    provider = jwt_filter["typed_config"]["providers"]["idp"]
    del provider["remote_jwks"]
    provider["local_jwks"] = {"inline_string": jwks}
    clusters = config["static_resources"]["clusters"]
    config["static_resources"]["clusters"] = [c for c in clusters if c["name"] != "idp_jwks"]
    path = tmp / "envoy-jwt-source.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(config)))
    return path


def test_envoy_jwt_config_validates() -> None:
    import subprocess
    import sys

    envoy = Path(sys.executable).parent / "envoy"
    done = subprocess.run(
        [str(envoy), "--mode", "validate", "-c", str(ROOT / "envoy" / "envoy-jwt.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def test_grant_from_a_jwt_claim_through_envoy(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]})

    def token(sub: str, signer: Any = key) -> str:
        claims = {
            "iss": "https://login.example.com/",
            "aud": "https://mcp.example.com/mcp",
            "sub": sub,
            "exp": int(time.time()) + 600,
        }
        return jwt.encode(claims, signer, algorithm="RS256", headers={"kid": "k1"})

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(JWT_POLICY))
    listen, admin, upstream, grpc_port, http_port = (free_port() for _ in range(5))
    record = tmp_path / "record.jsonl"
    source = jwt_envoy_source(tmp_path, jwks)
    config = envoy_config(
        tmp_path, listen=listen, authz=grpc_port, upstream=upstream, admin=admin, source=source
    )
    with (
        running(upstream_proc(tmp_path, upstream, record), upstream),
        running(
            authz_proc(tmp_path, policy, grpc_port, http_port, ["--store", "memory"]), grpc_port
        ),
        running(envoy_proc(tmp_path, config), listen),
    ):
        wait_ready(f"http://127.0.0.1:{admin}/ready")
        url = f"http://127.0.0.1:{listen}/mcp"
        alice = bearer(token("alice@example.com"))
        text = await sdk_call_tool(url, "containerize_app", {"app_path": "/a"}, alice)
        assert "/a" in text
        grants = {json.loads(line)["grant"] for line in record.read_text().splitlines()}
        assert "alice@example.com" in grants
        second = post(url, tool_call("containerize_app", app_path="/a"), alice)
        assert second.status_code == 429
        # The budget belongs to the subject, whatever token carries it.
        again = post(
            url, tool_call("containerize_app", app_path="/a"), bearer(token("alice@example.com"))
        )
        assert again.status_code == 429
        assert "/b" in await sdk_call_tool(
            url, "containerize_app", {"app_path": "/b"}, bearer(token("bob"))
        )
        forged = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        for headers in ({}, bearer(token("alice@example.com", forged)), bearer("not-a-jwt")):
            resp = post(url, tool_call("containerize_app", app_path="/x"), headers)
            assert resp.status_code == 401, headers
        assert await sdk_list_tools(url, bearer(token("carol")))
