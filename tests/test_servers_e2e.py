"""Several MCP servers behind one gateway, all real: one Envoy (envoy/envoy-servers.yaml)
and two mcp-authz processes sharing one redis-server, in front of the real awslabs ECS MCP
server and the real awslabs HealthImaging MCP server, under the policy of issue 19
(examples/servers.policy.yaml, verbatim).

Without AWS credentials a HealthImaging tool answers with an AWS error result and an ECS
write tool says writes are disabled: either shows the call reached the server. A refusal
by the gateway is a JSON-RPC error with a reason code instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml

from authz.tooling.report import check_policy
from devstack.redis_server import RedisServer, running_redis
from devstack.stack import (
    BIN,
    ROOT,
    Proc,
    authz_proc,
    envoy_proc,
    free_port,
    running,
    wait_ready,
)
from tests.support.clients import McpCallError, sdk_call_tool, sdk_list_tools
from tests.support.load import with_check_timeout

pytest.importorskip("awslabs.ecs_mcp_server")
pytest.importorskip("awslabs.healthimaging_mcp_server")

pytestmark = pytest.mark.e2e

POLICY = ROOT / "examples" / "servers.policy.yaml"
ENVOY_SERVERS = ROOT / "envoy" / "envoy-servers.yaml"
EXPORT = "start_dicom_export_job"
EXPORT_ARGS = {
    "datastore_id": "0" * 32,
    "data_access_role_arn": "arn:aws:iam::123456789012:role/export",
    "output_s3_uri": "s3://bucket/exports/",
}
CALL_TIMEOUT = 30.0
AWS_ENV = {
    "AWS_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "",
    "AWS_SECRET_ACCESS_KEY": "",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def token() -> str:
    return f"tok-{uuid.uuid4().hex}"


def grant_id(tok: str) -> str:
    return "b-" + hashlib.sha256(tok.encode()).hexdigest()[:24]


def bearer(tok: str) -> dict[str, str]:
    return {"authorization": f"Bearer {tok}"}


def ecs_upstream(tmp: Path, port: int) -> Proc:
    code = (
        "from awslabs.ecs_mcp_server.main import mcp; "
        f"mcp.run(transport='http', host='127.0.0.1', port={port}, show_banner=False)"
    )
    return Proc("ecs", [sys.executable, "-c", code], tmp / "ecs.log", env=AWS_ENV)


def healthimaging_upstream(tmp: Path, port: int) -> Proc:
    code = (
        "from awslabs.healthimaging_mcp_server.server import app; "
        f"app.run(transport='streamable-http', host='127.0.0.1', port={port})"
    )
    return Proc("healthimaging", [sys.executable, "-c", code], tmp / "hi.log", env=AWS_ENV)


def servers_config(
    tmp: Path, *, listen: int, admin: int, authz: list[int], ecs: int, healthimaging: int
) -> Path:
    """envoy/envoy-servers.yaml with its ports changed, plus one route to the ECS server
    whose mcp_server names a server the policy does not define, and a longer check timeout."""
    config: dict[str, Any] = yaml.safe_load(ENVOY_SERVERS.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=listen)
    ports = {
        "mcp_authz": authz,
        "ecs_mcp_server": [ecs],
        "healthimaging_mcp_server": [healthimaging],
    }
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "mcp_authz":
            # Random, not round robin: a client's call is several checks (initialize, ...),
            # and strict alternation would put every tools/call on the same process.
            cluster["lb_policy"] = "RANDOM"
        endpoints = cluster["load_assignment"]["endpoints"][0]
        template = endpoints["lb_endpoints"][0]
        endpoints["lb_endpoints"] = []
        for port in ports[cluster["name"]]:
            endpoint = json.loads(json.dumps(template))
            endpoint["endpoint"]["address"]["socket_address"]["port_value"] = port
            endpoints["lb_endpoints"].append(endpoint)
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    plain_ecs = next(route for route in routes if route["match"] == {"path": "/ecs/mcp"})
    billing = json.loads(json.dumps(plain_ecs))
    billing["match"] = {"path": "/billing/mcp"}
    extension = billing["typed_per_filter_config"]["envoy.filters.http.ext_authz"]
    extension["check_settings"]["context_extensions"] = {"mcp_server": "billing"}
    routes.insert(0, billing)
    path = tmp / "envoy-servers.yaml"
    path.write_text(yaml.safe_dump(config))
    # Exact counts are what is tested here, not the 250 ms latency budget, which a check
    # can miss on this shared machine (Envoy would then answer 503 for it).
    return with_check_timeout(path, "5s")


class Estate:
    def __init__(
        self,
        base: str,
        redis: RedisServer,
        authz: list[Proc],
        http_ports: list[int],
        envoy: Proc,
        upstreams: dict[str, str],
    ) -> None:
        self.base = base
        self.redis = redis
        self.authz = authz
        self.http_ports = http_ports
        self.envoy = envoy
        self.upstreams = upstreams

    def url(self, server: str) -> str:
        return f"{self.base}/{server}/mcp"

    def audit(self) -> list[list[dict[str, Any]]]:
        """Each mcp-authz process's audit lines (its stdout, in its log file)."""
        out = []
        for proc in self.authz:
            lines = []
            for line in proc.output().splitlines():
                if line.startswith("{") and '"decision"' in line:
                    lines.append(json.loads(line))
            out.append(lines)
        return out


@pytest.fixture(scope="module")
def estate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Estate]:
    tmp = tmp_path_factory.mktemp("servers")
    listen, admin, ecs, hi = (free_port() for _ in range(4))
    grpc_ports = [free_port(), free_port()]
    http_ports = [free_port(), free_port()]
    config = servers_config(
        tmp, listen=listen, admin=admin, authz=grpc_ports, ecs=ecs, healthimaging=hi
    )
    with running_redis(tmp) as redis:
        store = ["--redis", redis.url, "--store-timeout-ms", "2000"]
        procs = [
            authz_proc(tmp, POLICY, grpc, http, store)
            for grpc, http in zip(grpc_ports, http_ports, strict=True)
        ]
        with (
            running(ecs_upstream(tmp, ecs), ecs),
            running(healthimaging_upstream(tmp, hi), hi),
            running(procs[0], grpc_ports[0]),
            running(procs[1], grpc_ports[1]),
            running(envoy_proc(tmp, config), listen) as envoy,
        ):
            wait_ready(f"http://127.0.0.1:{admin}/ready")
            yield Estate(
                f"http://127.0.0.1:{listen}",
                redis,
                procs,
                http_ports,
                envoy,
                {
                    "ecs": f"http://127.0.0.1:{ecs}/mcp",
                    "healthimaging": f"http://127.0.0.1:{hi}/mcp",
                },
            )


def call(url: str, tool: str, arguments: dict[str, Any], tok: str, **headers: str) -> str:
    """The tool's text, or ``upstream: ...`` for an error result the server itself gave."""

    async def run() -> str:
        try:
            return await sdk_call_tool(
                url, tool, arguments, {**bearer(tok), **headers}, timeout=CALL_TIMEOUT
            )
        except McpCallError as exc:
            if exc.code is None:  # an isError result: the call reached the server
                return f"upstream: {exc.message}"
            raise

    return anyio.run(run)


def refusal(url: str, tool: str, arguments: dict[str, Any], tok: str, **headers: str) -> str:
    """The gateway's reason code for refusing the call."""
    with pytest.raises(McpCallError) as info:
        call(url, tool, arguments, tok, **headers)
    assert info.value.code is not None, info.value
    reason: str = info.value.data["reason"]
    return reason


def test_healthimaging_exports_are_limited_and_reach_the_real_server(estate: Estate) -> None:
    tok = token()
    url = estate.url("healthimaging")
    for _ in range(10):
        text = call(url, EXPORT, EXPORT_ARGS, tok)
        assert text.startswith("upstream: "), text  # the AWS error: it reached the server
    assert refusal(url, EXPORT, EXPORT_ARGS, tok) == "rate_limited"
    # Another grant has its own per-minute budget.
    assert call(url, EXPORT, EXPORT_ARGS, token()).startswith("upstream: ")


def test_ecs_has_its_own_policy_and_no_rule_crosses_servers(estate: Estate) -> None:
    tok = token()
    guidance = call(
        estate.url("ecs"), "containerize_app", {"app_path": "/tmp/app", "port": 8080}, tok
    )
    assert "dockerfile" in guidance.lower()  # the real ECS server's guidance
    assert refusal(estate.url("ecs"), "ecs_troubleshooting_tool", {}, tok) == "denied_by_default"
    # ECS's rule for containerize_app does not apply on HealthImaging, nor HealthImaging's
    # export rule on ECS: each server's own default decides.
    hi_args = {"app_path": "/tmp/app", "port": 8080}
    assert refusal(estate.url("healthimaging"), "containerize_app", hi_args, tok) == (
        "denied_by_default"
    )
    assert refusal(estate.url("ecs"), EXPORT, EXPORT_ARGS, tok) == "denied_by_default"


def test_the_estate_budget_counts_calls_on_both_servers_exactly(estate: Estate) -> None:
    """50 writes a day per grant, spent on either server, through two mcp-authz processes
    that share one redis-server: exactly 50 pass, and refused calls spend nothing."""
    tok = token()
    ecs, hi = estate.url("ecs"), estate.url("healthimaging")
    before = [len(lines) for lines in estate.audit()]
    for _ in range(45):
        assert call(ecs, "delete_app", {"app_name": "a"}, tok).startswith(("upstream: ", "{"))
    for _ in range(5):
        assert call(hi, EXPORT, EXPORT_ARGS, tok).startswith("upstream: ")
    # The 51st write, on either server, is refused by the budget (HealthImaging's own
    # per-minute counter still has 5 left).
    with pytest.raises(McpCallError) as info:
        call(hi, EXPORT, EXPORT_ARGS, tok)
    assert info.value.data["reason"] == "rate_limited"
    assert info.value.data["counter"] == "writes"
    assert "budget 'writes' allows 50 per day" in info.value.message
    assert refusal(ecs, "delete_app", {"app_name": "a"}, tok) == "rate_limited"
    # Exactly 50 spends are recorded in the one budget key, and the HealthImaging counter
    # holds only the 5 exports that passed (the refused one spent nothing there either).
    client = estate.redis.client()
    grant = grant_id(tok)
    assert client.zcard(f"mcpauthz:{{g:{grant}}}:budget:writes") == 50
    rate = f"mcpauthz:{{g:{grant}}}:server:healthimaging:start_dicom_export_job_rate"
    assert client.zcard(rate) == 5
    # Both processes decided some of these calls.
    added = [
        [line for line in lines[n:] if line["grant"] == grant and line["method"] == "tools/call"]
        for lines, n in zip(estate.audit(), before, strict=True)
    ]
    assert all(added), [len(lines) for lines in added]
    allowed = [line for lines in added for line in lines if line["decision"] == "allow"]
    assert len(allowed) == 50
    assert {line["server"] for line in allowed} == {"ecs", "healthimaging"}


def test_a_check_for_an_undefined_server_is_refused(estate: Estate) -> None:
    body = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "containerize_app"},
    }
    response = httpx.post(
        estate.url("billing"),
        json=body,
        headers={**bearer(token()), "accept": "application/json, text/event-stream"},
        timeout=10,
    )
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["data"]["reason"] == "unknown_server"
    assert "MCP server 'billing' is not defined by this policy" in error["message"]
    # Even listing: a server the policy does not know gets nothing through.
    with pytest.raises(McpCallError) as info:
        anyio.run(lambda: sdk_list_tools(estate.url("billing"), bearer(token())))
    assert info.value.data["reason"] == "unknown_server"


def test_a_client_header_cannot_move_a_call_to_another_server_s_policy(estate: Estate) -> None:
    tok = token()
    args = {"app_path": "/tmp/app", "port": 8080}
    spoofed = {
        "x-mcp-server": "ecs",
        "mcp-server": "ecs",
        "x-mcp-authz-server": "ecs",
        "x-envoy-original-path": "/ecs/mcp",
    }
    assert refusal(estate.url("healthimaging"), "containerize_app", args, tok, **spoofed) == (
        "denied_by_default"
    )
    # The authority is the client's too: it changes nothing either.
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "containerize_app", "arguments": args},
    }
    response = httpx.post(
        estate.url("healthimaging"),
        json=body,
        headers={
            **bearer(tok),
            **spoofed,
            "host": "ecs",
            "accept": "application/json, text/event-stream",
        },
        timeout=10,
    )
    assert response.status_code == 403
    assert response.json()["error"]["data"]["reason"] == "denied_by_default"


def test_each_server_s_list_is_filtered_by_its_own_policy(estate: Estate) -> None:
    """The list filter uses the policy of the server the list came from: ECS lists only
    its two allowed tools, HealthImaging only its export, and a client's
    x-mcp-authz-server cannot make a list be filtered under another server's policy."""
    tok = token()
    ecs = anyio.run(lambda: sdk_list_tools(estate.url("ecs"), bearer(tok)))
    assert sorted(ecs) == ["containerize_app", "delete_app"]
    hi = anyio.run(lambda: sdk_list_tools(estate.url("healthimaging"), bearer(tok)))
    assert hi == [EXPORT]
    spoofed = {**bearer(tok), "x-mcp-authz-server": "ecs"}
    assert anyio.run(lambda: sdk_list_tools(estate.url("healthimaging"), spoofed)) == [EXPORT]


def test_metrics_audit_and_envoy_s_log_name_the_server(estate: Estate) -> None:
    tok = token()
    call(estate.url("ecs"), "containerize_app", {"app_path": "/tmp/app", "port": 8080}, tok)
    refusal(estate.url("healthimaging"), "containerize_app", {}, tok)
    labels: set[str] = set()
    for port in estate.http_ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("mcp_authz_decisions_total{"):
                labels.add(line.split('server="')[1].split('"')[0])
    assert labels <= {"ecs", "healthimaging", "other"}
    assert {"ecs", "healthimaging"} <= labels
    servers = {line.get("server") for lines in estate.audit() for line in lines}
    assert {"ecs", "healthimaging"} <= servers
    wanted = {"ecs", "healthimaging"}
    deadline = time.monotonic() + 15
    seen: set[str] = set()
    while not wanted <= seen and time.monotonic() < deadline:
        time.sleep(0.1)  # Envoy flushes its access log on a timer
        seen = {
            json.loads(line)["authz_server"]
            for line in estate.envoy.output().splitlines()
            if line.startswith("{") and '"authz_server"' in line
        }
    assert wanted <= seen


def test_check_policy_prints_the_estate_from_both_real_servers(estate: Estate) -> None:
    out, err = io.StringIO(), io.StringIO()
    against = [f"{name}={url}" for name, url in estate.upstreams.items()]
    assert check_policy(str(POLICY), against, out=out, err=err) == 0, err.getvalue()
    text = out.getvalue()
    assert "estate: 2 servers, 46 tools" in text
    assert f"server ecs: {estate.upstreams['ecs']}: 7 tools" in text
    assert "  tool delete_app -> tools.delete_app: allow within budget 'writes'" in text
    assert f"  tool {EXPORT} -> tools.{EXPORT}: allow within counter" in text
    assert (
        f"budget 'writes': 50 per day per grant: spent by ecs/delete_app, healthimaging/{EXPORT}"
    ) in text
    # Every tool of each server is on the page, its rule or the default it falls to.
    assert "tool(s) fall to default (deny)" in text
    # A server left out is said to be left out, not silently skipped.
    out = io.StringIO()
    ecs_only = [f"ecs={estate.upstreams['ecs']}"]
    assert check_policy(str(POLICY), ecs_only, out=out, err=io.StringIO()) == 0
    assert "server healthimaging: not listed (give --against healthimaging=URL)" in out.getvalue()


def test_envoy_servers_config_validates() -> None:
    import subprocess

    result = subprocess.run(
        [str(BIN / "envoy"), "--mode", "validate", "-c", str(ENVOY_SERVERS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = yaml.safe_load(ENVOY_SERVERS.read_text())
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = manager["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    named = {
        route["match"]["path"]: route["typed_per_filter_config"]["envoy.filters.http.ext_authz"][
            "check_settings"
        ]["context_extensions"]["mcp_server"]
        for route in routes
        if "route" in route
    }
    assert named == {"/ecs/mcp": "ecs", "/healthimaging/mcp": "healthimaging"}
    policy = yaml.safe_load(POLICY.read_text())
    assert set(named.values()) == set(policy["servers"])
