"""Tools for policy authors: check-policy (with --against a live MCP server), explain, test."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authz import tooling
from tests.support.stack import free_port, running, upstream_proc

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "start_dicom_export_job": {
            "arguments": {
                "properties": {"outputS3Uri": {"type": "string", "pattern": "^s3://ok/"}}
            },
            "limits": [
                {"counter": "exports", "window": "minute", "max": 1},
                {"counter": "studies", "window": "day", "max": 50, "cost": "/studyCount"},
            ],
        },
        "containerize_app": {},
        "list_*": {"mode": "dry-run", "action": "deny", "reason": "rehearsal"},
        "describe_*": {},
        "no_such_tool": {"action": "deny"},
        "session_tool": {
            "limits": [{"counter": "s", "window": "15m", "max": 2, "scope": "session"}]
        },
    },
    "resources": {"ecs://*": {}},
}


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY))
    return path


def run(fn: Any, *args: Any, **kwargs: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = fn(*args, out=out, err=err, **kwargs)
    return code, out.getvalue(), err.getvalue()


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authz.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        cwd=ROOT,
    )


def call(name: str, **arguments: Any) -> str:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name}}
    body["params"]["arguments"] = arguments  # type: ignore[index]
    return json.dumps(body)


# --- check-policy --------------------------------------------------------------------------


def test_check_policy_lists_rules_in_precedence_order(policy_file: Path) -> None:
    code, out, _ = run(tooling.check_policy, str(policy_file))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{policy_file}: ok (version 1, digest ")
    assert lines[0].endswith(", enforce)")
    assert "  grants: from the command line (default: bearer)" in lines
    assert "  default: deny" in lines
    tools = [line.split(":")[0].strip() for line in lines if line.startswith("  tool ")]
    assert tools == [
        "tool containerize_app",
        "tool no_such_tool",
        "tool session_tool",
        "tool start_dicom_export_job",
        "tool describe_* (pattern)",
        "tool list_* (pattern)",
    ]
    assert (
        "  tool start_dicom_export_job: allow, arguments checked within counter 'exports': "
        "1 per minute per grant; counter 'studies': 50 per day per grant, cost from arguments "
        "/studyCount"
    ) in lines
    assert "  tool list_* (pattern): deny, dry-run (reason: rehearsal)" in lines
    assert "  tool session_tool: allow within counter 's': 2 per 15 min per session" in lines
    assert "  resource ecs://* (pattern): allow" in lines


def test_check_policy_shows_warnings_and_errors(tmp_path: Path) -> None:
    warned = tmp_path / "warned.yaml"
    warned.write_text('version: "1"\ndefault: deny\nresources:\n  clusters/*: {}\n')
    code, out, _ = run(tooling.check_policy, str(warned))
    assert code == 0
    assert "  warning: resources.clusters/*: not a URI" in out
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": "1", "default": "deny", "tools": {"a*": {}, "a*b": {}}}')
    code, _, err = run(tooling.check_policy, str(broken))
    assert code == 1
    assert err.splitlines() == [
        f"{broken}: invalid policy",
        "  tools.a*b: ties with tools.a*: both have the literal prefix 'a' and can match the "
        "same name; make one more specific",
    ]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("live")
    port = free_port()
    with running(upstream_proc(tmp, port, tmp / "record.jsonl"), port):
        yield f"http://127.0.0.1:{port}/mcp"


def test_check_policy_against_a_live_server(policy_file: Path, live_server: str) -> None:
    code, out, err = run(
        tooling.check_policy,
        str(policy_file),
        against=live_server,
        headers={"Authorization": "Bearer tok"},
    )
    assert code == 0, err
    report = out.split(f"{live_server}: ", 1)[1].splitlines()
    assert report[0] == "6 tools"
    assert report[1:7] == [
        "  tool containerize_app -> tools.containerize_app: allow",
        "  tool delete_app -> default: deny",
        "  tool ecs_resource_management -> default: deny",
        "  tool ecs_troubleshooting_tool -> default: deny",
        "  tool list_datastores -> tools.list_* (pattern): deny, dry-run (reason: rehearsal)",
        "  tool start_dicom_export_job -> tools.start_dicom_export_job: allow, arguments checked"
        " within counter 'exports': 1 per minute per grant; counter 'studies': 50 per day per "
        "grant, cost from arguments /studyCount",
    ]
    assert set(report[7:]) == {
        "  unmatched: tools.describe_* matches no tool the server lists",
        "  unknown: tools.no_such_tool names a tool the server does not list",
        "  unknown: tools.session_tool names a tool the server does not list",
        "  3 tool(s) fall to default (deny): delete_app, ecs_resource_management, "
        "ecs_troubleshooting_tool",
    }


def test_check_policy_against_an_unreachable_server(policy_file: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp"
    code, _, err = run(tooling.check_policy, str(policy_file), against=url)
    assert code == 2
    assert err.startswith(f"{url}: cannot list tools: ")


# --- explain -------------------------------------------------------------------------------


def test_explain_shows_rule_arguments_and_limits_and_spends_nothing(policy_file: Path) -> None:
    body = call("start_dicom_export_job", outputS3Uri="s3://ok/x", studyCount=7).encode()
    for _ in range(3):  # the limit allows 1 a minute: explain must not spend it
        code, out, _ = run(tooling.explain, str(policy_file), body, grant="alice")
        assert code == 0
    assert out.splitlines() == [
        "grant: alice",
        "message 0: tools/call 'start_dicom_export_job'",
        "  rule: tools.start_dicom_export_job: allow, arguments checked within counter "
        "'exports': 1 per minute per grant; counter 'studies': 50 per day per grant, cost from "
        "arguments /studyCount",
        "  arguments: satisfy the rule schema",
        "  would spend 1 against counter 'exports': 1 per minute per grant "
        "(key mcpauthz:{g:alice}:exports)",
        "  would spend 7 against counter 'studies': 50 per day per grant, cost from arguments "
        "/studyCount (key mcpauthz:{g:alice}:studies)",
        "decision: allow if every counter above has budget left (explain spends none)",
    ]


def test_explain_denials(policy_file: Path) -> None:
    body = call("start_dicom_export_job", outputS3Uri="s3://elsewhere/patient-7").encode()
    code, out, _ = run(tooling.explain, str(policy_file), body, grant="alice")
    assert code == 1
    assert (
        "  arguments: arguments.outputS3Uri: does not match the required pattern '^s3://ok/'" in out
    )
    assert out.splitlines()[-1] == (
        "decision: deny 403 invalid_arguments: policy violation: tool 'start_dicom_export_job':"
        " invalid arguments: arguments.outputS3Uri: does not match the required pattern "
        "'^s3://ok/'"
    )
    assert "patient-7" not in out
    code, out, _ = run(tooling.explain, str(policy_file), call("containerize_app").encode())
    assert code == 1
    assert out.splitlines()[0] == "grant: (none)"
    assert out.splitlines()[-1].startswith("decision: deny 403 no_grant_identity:")
    code, out, _ = run(tooling.explain, str(policy_file), b"{not json")
    assert code == 1
    assert out.splitlines()[-1] == (
        "decision: deny 400 malformed_request: policy violation: malformed request: invalid JSON"
    )


def test_explain_dry_run_sessions_and_headers(policy_file: Path) -> None:
    code, out, _ = run(
        tooling.explain,
        str(policy_file),
        call("list_datastores").encode(),
        headers={"Authorization": "Bearer tok-1"},
    )
    assert code == 0
    assert out.splitlines()[0].startswith("grant: b-")
    assert "  would deny (dry-run): denied_by_rule: tool 'list_datastores' denied: rehearsal" in out
    assert out.splitlines()[-1] == (
        "decision: allow; dry-run would deny: denied_by_rule: policy violation: tool "
        "'list_datastores' denied: rehearsal"
    )
    code, out, _ = run(
        tooling.explain,
        str(policy_file),
        call("session_tool").encode(),
        grant="g",
        headers={"Mcp-Session-Id": "abc"},
    )
    assert code == 0
    assert "(key mcpauthz:{s:" in out


def test_explain_cli_reads_the_body_from_stdin(policy_file: Path) -> None:
    done = cli(
        "explain",
        "--policy",
        str(policy_file),
        "--header",
        "Authorization: Bearer t",
        "-",
        stdin=call("delete_app"),
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines()[-1] == (
        "decision: deny 403 denied_by_default: policy violation: tool 'delete_app' is not "
        "allowed by this policy (default deny)"
    )
    assert cli("explain", "--policy", str(policy_file), "--header", "nocolon", "{}").returncode == 2


# --- test ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "cases", "count"),
    [
        ("ecs.policy.yaml", "ecs.cases.yaml", 12),
        ("ecs-callers.policy.yaml", "ecs-callers.cases.yaml", 17),
        ("healthimaging.policy.json", "healthimaging.cases.yaml", 18),
    ],
)
def test_shipped_examples_pass_their_cases(policy: str, cases: str, count: int) -> None:
    done = cli("test", str(EXAMPLES / policy), str(EXAMPLES / cases))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert sum(line.startswith("PASS  ") for line in lines) == count
    assert lines[-1] == f"{count} passed, 0 failed"


def test_failing_cases_fail_the_run(policy_file: Path, tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "cases:\n"
        "  - {name: allowed, tool: containerize_app, expect: allow}\n"
        "  - {name: wrong expectation, tool: containerize_app, expect: deny}\n"
        "  - name: wrong reason\n"
        "    tool: delete_app\n"
        "    expect: deny\n"
        "    reason: rate_limited\n"
        "  - {name: rehearsal, tool: list_x, expect: would_deny, reason: rehearsal}\n"
        "  - name: second export in a minute\n"
        "    tool: start_dicom_export_job\n"
        "    arguments: {studyCount: 1}\n"
        "    repeat: 2\n"
        "    expect: deny\n"
        "    reason: \"rate_limited: policy violation: tool 'start_dicom_export_job'\"\n"
        "  - name: no identity from headers\n"
        "    tool: containerize_app\n"
        "    grant: null\n"
        "    headers: {authorization: Bearer x}\n"
        "    expect: allow\n"
    )
    code, out, _ = run(tooling.run_cases, str(policy_file), str(cases))
    assert code == 1
    assert out.splitlines() == [
        "PASS  allowed",
        "FAIL  wrong expectation: expected deny, got allow (allowed)",
        "FAIL  wrong reason: expected deny with reason containing 'rate_limited', got deny "
        "(denied_by_default: policy violation: tool 'delete_app' is not allowed by this policy "
        "(default deny))",
        "PASS  rehearsal",
        "PASS  second export in a minute",
        "PASS  no identity from headers",
        "4 passed, 2 failed",
    ]


def test_invalid_cases_files(policy_file: Path, tmp_path: Path) -> None:
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"cases": [{"name": "x", "tool": "a", "expect": "maybe"}, {}]}))
    code, _, err = run(tooling.run_cases, str(policy_file), str(cases))
    assert code == 2
    assert err.splitlines()[0] == f"{cases}: invalid cases"
    assert "  cases.0.expect: 'maybe' is not one of ['allow', 'deny', 'would_deny']" in err
    assert "  cases.1: 'name' is a required property" in err
    dup = tmp_path / "dup.yaml"
    dup.write_text("cases: []\ncases: []\n")
    code, _, err = run(tooling.run_cases, str(policy_file), str(dup))
    assert code == 2 and "duplicate key 'cases'" in err
