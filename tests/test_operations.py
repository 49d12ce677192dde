"""Operations, end to end: metrics, health, the audit trail, Envoy's access log, the
dashboard and alert rules, and a graceful shutdown, all against the real processes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import promql_parser
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from authz.decision import Reason
from authz.metrics import Metrics
from authz.pb import external_auth_pb2, external_auth_pb2_grpc
from authz.policy import compile_policy
from authz.server import AUTHZ_SERVICE
from devstack.checks import json_check
from devstack.redis_server import running_redis
from devstack.stack import ROOT, Stack, authz_proc, free_port, mcp_stack, running
from tests.support.reliability import record

pytestmark = pytest.mark.e2e

DASHBOARD = ROOT / "deploy" / "grafana" / "mcp-authz.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
PROMETHEUS_RULE = ROOT / "deploy" / "prometheus" / "prometheusrule.yaml"

# Series a dashboard or rule may read that no scrape of ours holds: Prometheus makes `up`
# itself for every target.
PROMETHEUS_SERIES = {"up"}
# Metrics a panel shows before the service exports them (documented in authz/metrics.py).
# The test asserts they are really absent, so the exemption goes when they land.

EXPORT_LIMIT = 5
POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "start_dicom_export_job": {
            "limits": [
                {"counter": "dicom_exports", "window": "minute", "max": EXPORT_LIMIT},
            ]
        },
        "containerize_app": {"action": "allow", "log_arguments": True},
        "delete_app": {"action": "deny", "reason": "deleting an ECS service needs a human"},
        "ecs_resource_management": {"action": "deny", "mode": "dry-run"},
    },
}

# What a DICOM export carries: none of it may reach a log or a metric.
PHI = {
    "datastoreId": "ds-PATIENT-4711",
    "outputS3Uri": "s3://exports/Doe-Jane-1970-01-01",
    "patientName": "Jane Q. Doe",
}
PHI_VALUES = ["PATIENT-4711", "Doe-Jane-1970-01-01", "Jane Q. Doe"]
TOKEN = "tok-ops-SECRET-bearer-credential"
UNNAMED_TOOL = "unnamed-tool-7c1e"


def grant_id(token: str) -> str:
    return "b-" + hashlib.sha256(token.encode()).hexdigest()[:24]


def arguments_sha256(arguments: dict[str, Any]) -> str:
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def post(stack: Stack, body: Any, token: str | None = TOKEN) -> httpx.Response:
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(stack.url, content=content, headers=headers, timeout=10)


def call(name: str, arguments: dict[str, Any], id_: int = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }


def metrics_url(stack: Stack) -> str:
    cmd = list(stack.authz.cmd)
    return f"http://{cmd[cmd.index('--http') + 1]}/metrics"


def envoy_stats_url(stack: Stack) -> str:
    config = yaml.safe_load((stack.tmp / "envoy.yaml").read_text())
    port = config["admin"]["address"]["socket_address"]["port_value"]
    return f"http://127.0.0.1:{port}/stats/prometheus"


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return lines


def audit_lines(text: str) -> list[dict[str, Any]]:
    return [e for e in json_lines(text) if "decision" in e and "request_id" in e]


def wait_for(predicate: Any, what: str, timeout: float = 10.0) -> Any:
    """``predicate()`` once it is true; a port not open yet counts as not yet (the HTTP
    port opens after the ext_authz ports a test waits for)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = None
        with contextlib.suppress(httpx.ConnectError):
            found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    scrape: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return scrape.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, transport: str) -> Iterator[Stack]:
    """The stack with a known mix of traffic already sent through it."""
    tmp = tmp_path_factory.mktemp("ops")
    policy = tmp / "policy.json"
    policy.write_text(json.dumps(POLICY))
    tokens = tmp / "admin-tokens"
    tokens.write_text("ops:ops-token-0123456789abcdef\n")  # approvals on: their gauge too
    with (
        running_redis(tmp) as redis,
        mcp_stack(
            tmp,
            policy,
            ["--redis", redis.url],
            "--admin-tokens-file",
            str(tokens),
            transport=transport,
        ) as s,
    ):
        for i in range(EXPORT_LIMIT + 2):  # 5 allowed (the last near the limit), 2 refused
            post(s, call("start_dicom_export_job", PHI, i))
        post(s, call("delete_app", PHI))
        post(s, call("containerize_app", {"app_path": "/srv/app"}))
        post(s, call("some_unnamed_tool", PHI))
        post(s, call(UNNAMED_TOOL, PHI))  # any tool the policy does not name: "other"
        post(s, {"jsonrpc": "2.0", "id": 9, "method": "tools/list"})
        post(s, b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":1}}')
        post(s, call("delete_app", PHI), token=None)  # no grant identity
        post(s, call("ecs_resource_management", PHI))  # would be denied, is allowed
        yield s


def test_denied_request_is_traced_from_envoy_access_log_to_audit_line(stack: Stack) -> None:
    resp = post(stack, call("delete_app", PHI, 4242))
    assert resp.status_code == 403
    envoy_line = wait_for(
        lambda: [
            e
            for e in json_lines(stack.envoy.output())
            if e.get("authz_reason") == "denied_by_rule" and e.get("status") == 403
        ],
        "Envoy's access log line",
    )[-1]
    request_id = envoy_line["request_id"]
    assert re.fullmatch(r"[0-9a-f-]{36}", request_id)
    audit = wait_for(
        lambda: [e for e in audit_lines(stack.authz.output()) if e["request_id"] == request_id],
        "the audit line with Envoy's request id",
    )
    assert len(audit) == 1
    line = audit[0]
    assert envoy_line["authz_decision"] == line["decision"] == "deny"
    assert envoy_line["authz_reason"] == line["reason"] == "denied_by_rule"
    assert envoy_line["authz_grant"] == line["grant"] == grant_id(TOKEN)
    assert envoy_line["authz_tool"] == line["tool"] == "delete_app"


def test_audit_lines_carry_the_decision_and_never_values_or_tokens(stack: Stack) -> None:
    log = stack.authz.output()
    for secret in [*PHI_VALUES, TOKEN]:
        assert secret not in log
    lines = audit_lines(log)
    exports = [e for e in lines if e["tool"] == "start_dicom_export_job"]
    assert [e["decision"] for e in exports] == ["allow"] * EXPORT_LIMIT + ["deny"] * 2
    first, last_allowed, refused = exports[0], exports[EXPORT_LIMIT - 1], exports[-1]
    assert first == {
        **first,
        "grant": grant_id(TOKEN),
        "method": "tools/call",
        "reason": "allowed",
        "reason_text": None,
        "rule": "tools.start_dicom_export_job",
        "counters": [{"counter": "dicom_exports", "remaining": EXPORT_LIMIT - 1, "max": 5}],
        "arguments_sha256": arguments_sha256(PHI),
    }
    assert "arguments" not in first
    assert last_allowed["counters"] == [{"counter": "dicom_exports", "remaining": 0, "max": 5}]
    assert refused["reason"] == "rate_limited"
    assert refused["reason_text"].startswith("policy violation:")
    assert refused["retry_after_s"] >= 1
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
        assert line["latency_ms"] >= 0
        assert line["policy"]
    no_grant = [e for e in lines if e["reason"] == "no_grant_identity"]
    assert no_grant and no_grant[0]["grant"] is None
    dry_run = [e for e in lines if e["tool"] == "ecs_resource_management"]
    assert [(e["decision"], e["reason"], e["rule"]) for e in dry_run] == [
        ("dry_run_deny", "denied_by_rule", "tools.ecs_resource_management")
    ]


def test_rule_with_log_arguments_puts_them_in_the_audit_line(stack: Stack) -> None:
    lines = [e for e in audit_lines(stack.authz.output()) if e["tool"] == "containerize_app"]
    assert lines[0]["arguments"] == {"app_path": "/srv/app"}
    assert lines[0]["arguments_sha256"] == arguments_sha256({"app_path": "/srv/app"})


def test_scrape_follows_naming_conventions_with_help_text(stack: Stack) -> None:
    text = httpx.get(metrics_url(stack), timeout=5).text
    families = list(text_string_to_metric_families(text))
    ours = [f for f in families if f.name.startswith("mcp_authz_")]
    assert {f.name for f in families} >= {"process_cpu_seconds", "python_gc_collections"}
    assert len(ours) >= 9
    for family in families:
        assert family.documentation.strip(), f"{family.name} has no help text"
        assert re.fullmatch(r"[a-z][a-z0-9_]*", family.name), family.name
        if family.type == "counter":
            assert all(s.name == family.name + "_total" for s in family.samples), family.name
        else:
            assert not family.name.endswith("_total"), family.name
    for family in ours:
        if family.type == "histogram" or "timestamp" in family.name:
            assert family.name.endswith("_seconds"), family.name
        assert not any(s.name.endswith("_created") for s in family.samples)
    openmetrics = httpx.get(
        metrics_url(stack),
        headers={"accept": "application/openmetrics-text; version=1.0.0"},
        timeout=5,
    )
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert {f.name for f in openmetrics_families(openmetrics.text)} >= {
        "mcp_authz_decisions",
        "mcp_authz_policy",
    }


def test_metrics_count_decisions_with_bounded_labels(stack: Stack) -> None:
    text = httpx.get(metrics_url(stack), timeout=5).text
    for secret in [*PHI_VALUES, TOKEN, grant_id(TOKEN), "some_unnamed_tool", UNNAMED_TOOL]:
        assert secret not in text
    scrape = samples(text)
    decisions = [dict(labels) for name, labels in scrape if name == "mcp_authz_decisions_total"]
    assert {d["tool"] for d in decisions} <= {*POLICY["tools"], "other", ""}
    assert {d["reason"] for d in decisions} <= {r.code for r in Reason}
    assert {d["decision"] for d in decisions} <= {"allow", "deny", "dry_run_deny"}
    assert {d["caller"] for d in decisions} == {"other"}  # the policy names no caller sets

    def decided(decision: str, reason: str, tool: str) -> float:
        return value(
            scrape,
            "mcp_authz_decisions_total",
            decision=decision,
            reason=reason,
            tool=tool,
            caller="other",
            server="",
        )

    assert decided("allow", "allowed", "start_dicom_export_job") == EXPORT_LIMIT
    assert decided("deny", "rate_limited", "start_dicom_export_job") == 2
    assert decided("deny", "denied_by_default", "other") == 2
    assert decided("deny", "malformed_request", "") == 1
    assert decided("allow", "allowed", "") >= 1  # tools/list
    assert decided("deny", "no_grant_identity", "delete_app") == 1
    assert decided("dry_run_deny", "denied_by_rule", "ecs_resource_management") == 1
    assert value(scrape, "mcp_authz_limit_near_total", counter="dicom_exports", server="") == 1
    assert value(scrape, "mcp_authz_limit_exceeded_total", counter="dicom_exports", server="") == 2
    total = sum(v for (n, _), v in scrape.items() if n == "mcp_authz_decisions_total")
    assert value(scrape, "mcp_authz_check_duration_seconds_count") == total
    assert value(scrape, "mcp_authz_store_duration_seconds_count", op="acquire") == 7
    assert value(scrape, "mcp_authz_store_errors_total", op="acquire") == 0
    assert value(scrape, "mcp_authz_ready") == 1
    digest = hashlib.sha256(stack.tmp.joinpath("policy.json").read_bytes()).hexdigest()
    assert value(scrape, "mcp_authz_policy_info", digest=digest, version="1") == 1
    loaded = value(scrape, "mcp_authz_policy_last_reload_success_timestamp_seconds")
    assert 0 < time.time() - loaded < 3600
    assert value(scrape, "mcp_authz_policy_reloads_total", result="failure") == 0


def promql_metric_names(expr: str) -> set[str]:
    """Every metric name an expression selects, by parsing it as PromQL."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            names.update(m.value for m in node.matchers.matchers if m.name == "__name__")

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def dashboard_queries() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {
        f"panel '{panel['title']}' {target['refId']}": target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["definition"])
            assert match, variable["definition"]
            queries[f"variable {variable['name']}"] = match.group(1)
    return queries


def rule_queries() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {f"rule {rule['alert']}": rule["expr"] for group in groups for rule in group["rules"]}


def exposed_series(text: str) -> dict[str, tuple[str, str]]:
    """Series name -> (family, type), as Prometheus stores a text-format scrape: sample names
    exactly as exposed (the client library's parser would add ``_total`` to Envoy's
    counters), each under the ``# TYPE`` line it follows."""
    series: dict[str, tuple[str, str]] = {}
    family = kind = ""
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
        elif line and not line.startswith("#"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            series[name] = (family, kind) if name.startswith(family) else (name, "untyped")
    return series


def test_dashboard_and_alerts_query_only_metrics_the_services_export(stack: Stack) -> None:
    exported = {
        **exposed_series(httpx.get(metrics_url(stack), timeout=5).text),
        **exposed_series(httpx.get(envoy_stats_url(stack), timeout=5).text),
    }
    queries = {**dashboard_queries(), **rule_queries()}
    assert len(queries) > 20
    used: set[str] = set()
    for where, expr in queries.items():
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for name in names - PROMETHEUS_SERIES:
            assert name in exported, f"{where}: {name} is not in any scrape"
            family, kind = exported[name]
            if name.endswith(("_bucket", "_sum", "_count")) and name != family:
                assert kind == "histogram", f"{where}: {name} is no histogram's series"
        used |= names
    # And the other way: every metric of ours is on the dashboard.
    ours = {family for family, _ in exported.values() if family.startswith("mcp_authz_")}
    shown = {exported[name][0] for name in used if name in exported}
    assert ours - shown == set(), "metrics on no dashboard panel or rule"


def test_rule_files_agree_and_every_alert_explains_itself() -> None:
    plain = yaml.safe_load(RULES.read_text())
    operator = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert operator["apiVersion"] == "monitoring.coreos.com/v1"
    assert operator["kind"] == "PrometheusRule"
    assert operator["spec"]["groups"] == plain["groups"]
    alerts = [rule for group in plain["groups"] for rule in group["rules"]]
    assert len({rule["alert"] for rule in alerts}) == len(alerts)
    for rule in alerts:
        promql_parser.parse(rule["expr"])
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    assert {
        "Decisions per tool and reason",
        "Decisions per caller",
        "Deny ratio",
        "Check latency p50 / p99",
    } <= titles


def health_status(port: int, service: str = AUTHZ_SERVICE) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)


def test_readiness_and_store_errors_follow_the_store(tmp_path: Path) -> None:
    """Also: text operational logs, and an audit level that keeps only the denials."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    grpc_port, http_port = free_port(), free_port()
    with running_redis(tmp_path) as redis:
        proc = authz_proc(
            tmp_path,
            policy,
            grpc_port,
            http_port,
            ["--redis", redis.url],
            "--log-format",
            "text",
            "--audit-level",
            "warning",
        )
        with running(proc, grpc_port):
            base = f"http://127.0.0.1:{http_port}"
            wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, "ready")
            assert health_status(grpc_port) == health_pb2.HealthCheckResponse.SERVING
            assert health_status(grpc_port, "") == health_pb2.HealthCheckResponse.SERVING
            allowed = check_once(grpc_port, call("containerize_app", {"app_path": "/a"}))
            assert allowed.WhichOneof("http_response") == "ok_response"
            redis.stop()
            ready = httpx.get(f"{base}/readyz")
            assert (ready.status_code, ready.text) == (503, "store unavailable\n")
            assert httpx.get(f"{base}/healthz").status_code == 200
            reply = check_once(grpc_port, call("start_dicom_export_job", PHI))
            assert reply.denied_response.status.code == 503
            scrape = samples(httpx.get(f"{base}/metrics").text)
            assert value(scrape, "mcp_authz_ready") == 0
            assert value(scrape, "mcp_authz_store_errors_total", op="acquire") == 1
            assert value(scrape, "mcp_authz_store_errors_total", op="ping") >= 2
            redis.start()
            wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, "ready again")
    log = proc.output()
    assert [(e["tool"], e["reason"]) for e in audit_lines(log)] == [
        ("start_dicom_export_job", "store_unavailable")
    ]
    assert re.search(r"^\S+ \S+ mcp_authz INFO serving ext_authz", log, re.MULTILINE)


def test_policy_reload_callback_updates_the_policy_metrics() -> None:
    metrics = Metrics()
    metrics.policy_loaded(compile_policy(POLICY, "a" * 64))
    metrics.policy_reloaded("failure", None)
    before = samples(generate_latest(metrics.registry).decode())
    time.sleep(0.01)
    metrics.policy_reloaded("success", compile_policy({**POLICY, "default": "allow"}, "b" * 64))
    after = samples(generate_latest(metrics.registry).decode())
    assert value(before, "mcp_authz_policy_reloads_total", result="failure") == 1
    assert value(before, "mcp_authz_policy_reloads_total", result="success") == 0
    assert value(after, "mcp_authz_policy_reloads_total", result="success") == 1
    info = [dict(labels) for name, labels in after if name == "mcp_authz_policy_info"]
    assert info == [{"digest": "b" * 64, "version": "1"}]
    stamp = "mcp_authz_policy_last_reload_success_timestamp_seconds"
    assert value(after, stamp) > value(before, stamp) > 0


def check_once(port: int, body: dict[str, Any]) -> external_auth_pb2.CheckResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        return stub.Check(json_check(body, TOKEN), timeout=10)


DRAIN_S = 3.0
# Checks keep coming for this long after SIGTERM: well inside the drain, as from an Envoy
# that has not yet seen the NOT_SERVING health status.
SEND_DURING_DRAIN_S = 1.5
WORKERS = 8


async def test_sigterm_drains_without_dropping_a_check(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    grpc_port, http_port = free_port(), free_port()
    proc = authz_proc(
        tmp_path,
        policy,
        grpc_port,
        http_port,
        ["--store", "memory"],
        "--drain-seconds",
        str(DRAIN_S),
    )
    results: list[tuple[float, float, str]] = []  # started, finished, outcome
    stop_sending = asyncio.Event()
    bodies = [
        call("containerize_app", {"app_path": "/srv"}),
        call("delete_app", {}),
        call("start_dicom_export_job", {"n": 1}),
    ]

    async def worker(stub: Any, n: int) -> None:
        i = n
        while not stop_sending.is_set():
            started = time.monotonic()
            try:
                reply = await stub.Check(json_check(bodies[i % 3], f"t{i}"), timeout=15)
                outcome = reply.WhichOneof("http_response")
            except grpc.aio.AioRpcError as exc:
                outcome = f"rpc error {exc.code()}"
            results.append((started, time.monotonic(), outcome))
            i += WORKERS

    with running(proc, grpc_port):
        assert proc.popen is not None
        base = f"http://127.0.0.1:{http_port}"
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        async with httpx.AsyncClient(timeout=5) as http:
            workers = [asyncio.create_task(worker(stub, n)) for n in range(WORKERS)]
            while len(results) < 50:
                await asyncio.sleep(0.02)
            sigterm_at = time.monotonic()
            proc.popen.send_signal(signal.SIGTERM)
            not_serving = ready_status = None
            while time.monotonic() < sigterm_at + SEND_DURING_DRAIN_S:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=AUTHZ_SERVICE))
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    not_serving = not_serving or time.monotonic()
                    ready_status = (await http.get(f"{base}/readyz")).status_code
                    assert (await http.get(f"{base}/healthz")).status_code == 200
                await asyncio.sleep(0.05)
            stop_sending.set()
            await asyncio.gather(*workers)
        await channel.close()
        exit_code = await asyncio.to_thread(proc.popen.wait, 20)
    assert not_serving is not None, "health never reported NOT_SERVING"
    assert ready_status == 503
    assert exit_code == 0, proc.output()[-2000:]
    outcomes = {outcome for _, _, outcome in results}
    assert outcomes <= {"ok_response", "denied_response"}, outcomes
    in_flight = [r for r in results if r[0] < sigterm_at < r[1]]
    during_drain = [r for r in results if r[0] > sigterm_at]
    assert in_flight and len(during_drain) >= WORKERS
    assert "stopped" in proc.output()
    record(
        "Graceful shutdown: SIGTERM under load",
        f"{WORKERS} concurrent gRPC clients send Check calls to mcp-authz (--drain-seconds "
        f"{DRAIN_S:g}) without pause; SIGTERM arrives mid-stream and the clients keep sending "
        f"for {SEND_DURING_DRAIN_S:g} s, as an Envoy that has not yet seen the health change.",
        {
            "checks answered": len(results),
            "in flight when SIGTERM arrived, all answered": len(in_flight),
            "sent during the drain, all answered": len(during_drain),
            "checks without an answer": len(results)
            - sum(outcome in ("ok_response", "denied_response") for _, _, outcome in results),
            "health NOT_SERVING after SIGTERM (s)": round(not_serving - sigterm_at, 3),
            "exit code": exit_code,
        },
    )
