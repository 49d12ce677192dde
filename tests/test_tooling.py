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

from authz.tooling.cases import run_cases
from authz.tooling.explain import explain
from authz.tooling.report import check_policy
from devstack.stack import free_port, running, upstream_proc

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
    code, out, _ = run(check_policy, str(policy_file))
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
    code, out, _ = run(check_policy, str(warned))
    assert code == 0
    assert "  warning: resources.clusters/*: not a URI" in out
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": "1", "default": "deny", "tools": {"a*": {}, "a*b": {}}}')
    code, _, err = run(check_policy, str(broken))
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
        check_policy,
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
    risk = report.index(
        "  risk (from the server's tool annotations; none stated: not read-only, destructive, "
        "open-world):"
    )
    assert set(report[7:risk]) == {
        "  unmatched: tools.describe_* matches no tool the server lists",
        "  unknown: tools.no_such_tool names a tool the server does not list",
        "  unknown: tools.session_tool names a tool the server does not list",
        "  3 tool(s) fall to default (deny): delete_app, ecs_resource_management, "
        "ecs_troubleshooting_tool",
    }
    # Each tool's class from its annotations (the demo server states some, not all).
    assert report[risk + 1 : risk + 7] == [
        "    containerize_app: additive -> tools.containerize_app: allow",
        "    delete_app: destructive, open_world -> default: deny",
        "    ecs_resource_management: destructive, open_world, no annotations -> default: deny",
        "    ecs_troubleshooting_tool: read_only, open_world -> default: deny",
        "    list_datastores: read_only, open_world -> tools.list_* (pattern): deny, dry-run "
        "(reason: rehearsal)",
        "    start_dicom_export_job: destructive, open_world, no annotations -> "
        "tools.start_dicom_export_job: allow, arguments checked within counter 'exports': 1 per "
        "minute per grant; counter 'studies': 50 per day per grant, cost from arguments "
        "/studyCount",
    ]
    # A write tool let through with neither a limit nor an argument schema.
    assert report[risk + 7 :] == [
        "  warning: tool containerize_app (tools.containerize_app): its annotations say not "
        "read-only, and the rule has neither a limit nor an argument schema"
    ]


def test_check_policy_against_an_unreachable_server(policy_file: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp"
    code, _, err = run(check_policy, str(policy_file), against=url)
    assert code == 2
    assert err.startswith(f"{url}: cannot list tools: ")


# --- explain -------------------------------------------------------------------------------


def test_explain_shows_rule_arguments_and_limits_and_spends_nothing(policy_file: Path) -> None:
    body = call("start_dicom_export_job", outputS3Uri="s3://ok/x", studyCount=7).encode()
    for _ in range(3):  # the limit allows 1 a minute: explain must not spend it
        code, out, _ = run(explain, str(policy_file), body, grant="alice")
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
    code, out, _ = run(explain, str(policy_file), body, grant="alice")
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
    code, out, _ = run(explain, str(policy_file), call("containerize_app").encode())
    assert code == 1
    assert out.splitlines()[0] == "grant: (none)"
    assert out.splitlines()[-1].startswith("decision: deny 403 no_grant_identity:")
    code, out, _ = run(explain, str(policy_file), b"{not json")
    assert code == 1
    assert out.splitlines()[-1] == (
        "decision: deny 400 malformed_request: policy violation: malformed request: invalid JSON"
    )


def test_explain_dry_run_sessions_and_headers(policy_file: Path) -> None:
    code, out, _ = run(
        explain,
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
        explain,
        str(policy_file),
        call("session_tool").encode(),
        grant="g",
        headers={"Mcp-Session-Id": "abc"},
    )
    assert code == 0
    assert "(key mcpauthz:{g:g}:s:" in out
    assert "; mcpauthz:{g:g}:s unless the upstream issued this session to the grant" in out


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
    code, out, _ = run(run_cases, str(policy_file), str(cases))
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
    code, _, err = run(run_cases, str(policy_file), str(cases))
    assert code == 2
    assert err.splitlines()[0] == f"{cases}: invalid cases"
    assert "  cases.0.expect: 'maybe' is not one of ['allow', 'deny', 'would_deny']" in err
    assert "  cases.1: 'name' is a required property" in err
    dup = tmp_path / "dup.yaml"
    dup.write_text("cases: []\ncases: []\n")
    code, _, err = run(run_cases, str(policy_file), str(dup))
    assert code == 2 and "duplicate key 'cases'" in err


# --- callers -------------------------------------------------------------------------------

CALLERS_POLICY = {
    "version": "1",
    "default": "deny",
    "grants": {"source": "jwt", "claim": "sub"},
    "resource_metadata": "https://mcp.example.com/.well-known/oauth-protected-resource/mcp",
    "callers": {
        "exporters": {"claims": {"groups": "radiology-export"}},
        "operators": {"scopes": ["ecs:write"]},
        "nightly": {"grants": ["svc-nightly-export"]},
    },
    "tools": {
        "start_dicom_export_job": [
            {
                "callers": ["nightly"],
                "limits": [{"counter": "export_nightly", "window": "day", "max": 500}],
            },
            {
                "callers": ["exporters"],
                "limits": [{"counter": "export_rate", "window": "minute", "max": 10}],
            },
        ],
        "delete_app": {"callers": ["operators"], "action": "require_approval"},
        "containerize_app": {
            "limits": [
                {"counter": "c", "window": "hour", "max": 5, "callers": ["exporters"]},
                {"counter": "all", "window": "minute", "max": 600, "scope": "global"},
            ]
        },
        "list_*": [{"callers": ["operators"], "action": "deny"}, {}],
    },
}


@pytest.fixture
def callers_file(tmp_path: Path) -> Path:
    path = tmp_path / "callers.json"
    path.write_text(json.dumps(CALLERS_POLICY))
    return path


def test_check_policy_prints_who_may_call_what(callers_file: Path) -> None:
    code, out, _ = run(check_policy, str(callers_file))
    assert code == 0
    lines = out.splitlines()
    assert lines[2:5] == [
        "  callers exporters: claims groups=radiology-export",
        "  callers operators: scopes ecs:write",
        "  callers nightly: grants svc-nightly-export",
    ]
    assert (
        "  tool start_dicom_export_job: for nightly: allow within counter 'export_nightly': 500 "
        "per day per grant; then for exporters: allow within counter 'export_rate': 10 per "
        "minute per grant; any other caller: not permitted"
    ) in lines
    assert "  tool list_* (pattern): for operators: deny; then for any other caller: allow" in lines
    matrix = lines[
        lines.index(
            "  who may call what (a caller in several sets gets the first variant naming one):"
        )
        + 1 :
    ]
    assert [line.split() for line in matrix] == [
        ["tool", "exporters", "operators", "nightly", "anyone", "else"],
        [
            "containerize_app",
            "allow",
            "5/hour",
            "600/minute",
            "global",
            "allow",
            "600/minute",
            "global",
            "allow",
            "600/minute",
            "global",
            "allow",
            "600/minute",
            "global",
        ],
        ["delete_app", "not", "permitted", "approval", "not", "permitted", "not", "permitted"],
        [
            "start_dicom_export_job",
            "allow",
            "10/minute",
            "not",
            "permitted",
            "allow",
            "500/day",
            "not",
            "permitted",
        ],
        ["list_*", "allow", "deny", "allow", "allow"],
        ["(any", "other", "tool)", "deny", "deny", "deny", "deny"],
    ]
    # The columns line up: every cell starts where its header does.
    starts = [matrix[0].index(word) for word in ("exporters", "operators", "nightly", "anyone")]
    assert matrix[2][starts[1] :].startswith("approval")


def test_check_policy_matrix_over_a_live_server(callers_file: Path, live_server: str) -> None:
    code, out, err = run(check_policy, str(callers_file), against=live_server)
    assert code == 0, err
    report = out.split(f"{live_server}: ", 1)[1].splitlines()
    matrix = report[
        report.index(
            "  who may call what (a caller in several sets gets the first variant naming one):"
        )
        + 1 :
    ]
    end = next(i for i, line in enumerate(matrix) if line.split()[0] == "(any")
    rows = {line.split()[0]: line.split()[1:] for line in matrix[1:end]}
    assert set(rows) == {
        "containerize_app",
        "delete_app",
        "ecs_resource_management",
        "ecs_troubleshooting_tool",
        "list_datastores",
        "start_dicom_export_job",
    }
    assert rows["ecs_troubleshooting_tool"] == ["deny"] * 4  # falls to default
    assert rows["list_datastores"] == ["allow", "deny", "allow", "allow"]


def test_explain_as_a_caller(callers_file: Path) -> None:
    done = cli(
        "explain",
        "--policy",
        str(callers_file),
        "--claims",
        '{"sub": "erin", "scope": "ecs:read"}',
        call("delete_app", app_name="web"),
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [
        "grant: erin",
        "caller: in no caller set",
        "message 0: tools/call 'delete_app'",
        "  rule: tools.delete_app: for operators: require_approval; any other caller: not "
        "permitted",
        "  denied: caller_not_permitted: tool 'delete_app' is not permitted for this caller",
        "decision: deny 403 caller_not_permitted: policy violation: tool 'delete_app' is not "
        "permitted for this caller",
        '  www-authenticate: Bearer error="insufficient_scope", scope="ecs:write", '
        'resource_metadata="https://mcp.example.com/.well-known/oauth-protected-resource/mcp"',
    ]
    code, out, _ = run(
        explain,
        str(callers_file),
        call("start_dicom_export_job").encode(),
        claims={"sub": "svc-nightly-export", "groups": ["radiology-export"]},
    )
    assert code == 0
    assert out.splitlines()[:3] == [
        "grant: svc-nightly-export",
        "caller: nightly (in: exporters, nightly)",
        "message 0: tools/call 'start_dicom_export_job'",
    ]
    assert "(key mcpauthz:{g:svc-nightly-export}:export_nightly)" in out
    assert cli("explain", "--policy", str(callers_file), "--claims", "[1]", "{}").returncode == 2


def test_cases_decide_as_their_caller(callers_file: Path, tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "cases:\n"
        "  - {name: exporter, tool: start_dicom_export_job, claims: {groups: [radiology-export]},"
        " repeat: 10, expect: allow}\n"
        "  - {name: eleventh, tool: start_dicom_export_job, claims: {groups: radiology-export},"
        " repeat: 11, expect: deny, reason: export_rate}\n"
        "  - {name: nightly by grant, tool: start_dicom_export_job, grant: svc-nightly-export,"
        " repeat: 11, expect: allow}\n"
        "  - {name: scopes add up, tool: delete_app, claims: {scope: ecs:read},"
        " scopes: [ecs:write], expect: deny, reason: approval_required}\n"
        "  - {name: claims give the grant, tool: start_dicom_export_job, grant: null,"
        " claims: {sub: svc-nightly-export}, expect: allow}\n"
        "  - {name: nobody, tool: delete_app, claims: {scope: ecs:read}, expect: deny,"
        " reason: caller_not_permitted}\n"
    )
    code, out, err = run(run_cases, str(callers_file), str(cases))
    assert code == 0, out + err
    assert out.splitlines()[-1] == "6 passed, 0 failed"
