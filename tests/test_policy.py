"""Policy loading: the reference policy loads verbatim; every error comes with its path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from authz.policy import Action, PolicyError, Scope, compile_policy, load_policy, parse_policy_text

ROOT = Path(__file__).resolve().parents[1]

# The reference policy from the core issue, verbatim.
REFERENCE = """{"version": "1", "default": "deny",
 "tools": {"start_dicom_export_job": {"limits": [
   {"counter": "start_dicom_export_job_rate", "window": "minute", "max": 10, "scope": "grant"}]}}}"""  # noqa: E501


def errors_of(doc: object) -> list[str]:
    with pytest.raises(PolicyError) as info:
        compile_policy(doc)
    return info.value.errors


def test_reference_policy_loads_verbatim() -> None:
    policy = compile_policy(parse_policy_text(REFERENCE))
    assert policy.default.action is Action.DENY
    rule = policy.rule_for_tool("start_dicom_export_job")
    assert rule.action is Action.ALLOW
    (limit,) = rule.limits
    assert (limit.counter, limit.window_ms, limit.max, limit.scope) == (
        "start_dicom_export_job_rate",
        60_000,
        10,
        Scope.GRANT,
    )
    assert policy.rule_for_tool("anything_else") is policy.default


def test_shipped_example_policy_loads() -> None:
    policy = load_policy(ROOT / "examples" / "policy.json")
    assert policy.rule_for_tool("delete_app").action is Action.DENY
    assert len(policy.digest) == 64


def test_every_error_is_reported_with_its_path() -> None:
    errors = errors_of(
        {
            "version": "2",
            "default": "maybe",
            "bogus": True,
            "tools": {
                "t": {
                    "action": "perhaps",
                    "limits": [{"counter": "c", "window": "week", "max": 0, "scope": "x", "y": 1}],
                }
            },
        }
    )
    joined = "\n".join(errors)
    for path in (
        "version:",
        "default:",
        "(top level): unknown field(s) ('bogus'",
        "tools.t.action:",
        "tools.t.limits[0].window:",
        "tools.t.limits[0].max:",
        "tools.t.limits[0].scope:",
        "tools.t.limits[0]: unknown field(s) ('y'",
    ):
        assert path in joined, path
    assert len(errors) == 8


@pytest.mark.parametrize(
    "doc",
    [
        {"version": "1"},
        {"default": "deny"},
        {"version": 1, "default": "deny"},
        {"version": "1", "default": "deny", "tools": {"t": {"limits": [{"counter": "c"}]}}},
        {
            "version": "1",
            "default": "deny",
            "tools": {"t": {"limits": [{"counter": "c", "window": "minute", "max": 1.5}]}},
        },
        {
            "version": "1",
            "default": "deny",
            "tools": {"t": {"limits": [{"counter": "c", "window": "minute", "max": True}]}},
        },
        {"version": "1", "default": "deny", "tools": {"t": {"reason": 5}}},
        {"version": "1", "default": "deny", "tools": []},
        [],
    ],
)
def test_wrong_types_and_missing_fields_are_refused(doc: object) -> None:
    assert errors_of(doc)


def test_shared_counter_must_agree() -> None:
    lim = {"counter": "shared", "window": "minute", "max": 5, "scope": "grant"}
    ok = compile_policy(
        {
            "version": "1",
            "default": "deny",
            "tools": {"a": {"limits": [lim]}, "b": {"limits": [lim]}},
        }
    )
    assert ok.tools["a"].limits == ok.tools["b"].limits
    errors = errors_of(
        {
            "version": "1",
            "default": "deny",
            "tools": {"a": {"limits": [lim]}, "b": {"limits": [{**lim, "max": 6}]}},
        }
    )
    assert errors == [
        "tools.b.limits[0]: counter 'shared' is also defined at tools.a.limits[0] "
        "with a different window, max or scope"
    ]


def test_denied_tool_with_limits_and_repeated_counter_are_errors() -> None:
    lim = {"counter": "c", "window": "minute", "max": 5}
    errors = errors_of(
        {
            "version": "1",
            "default": "deny",
            "tools": {"a": {"action": "deny", "limits": [lim]}, "b": {"limits": [lim, lim]}},
        }
    )
    assert any("tools.a: a denied tool cannot have limits" in e for e in errors)
    assert any("tools.b.limits: the same counter is listed twice" in e for e in errors)


def test_duplicate_keys_in_the_file_are_refused() -> None:
    with pytest.raises(PolicyError, match="duplicate key 'default'"):
        parse_policy_text('{"version": "1", "default": "allow", "default": "deny"}')


def test_check_policy_command(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "authz.cli", "check-policy"]
    good = subprocess.run(
        [*cli, str(ROOT / "examples/policy.json")], capture_output=True, text=True
    )
    assert good.returncode == 0, good.stderr
    assert "tool delete_app: deny" in good.stdout
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(
        json.dumps({"version": "1", "default": "deny", "tools": {"t": {"limits": [{}]}}})
    )
    bad = subprocess.run([*cli, str(bad_file)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "tools.t.limits[0]: 'counter' is a required property" in bad.stderr


def test_serve_refuses_to_start_on_a_bad_policy(tmp_path: Path) -> None:
    bad_file = tmp_path / "bad.json"
    bad_file.write_text('{"version": "1"}')
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "authz.cli",
            "serve",
            "--policy",
            str(bad_file),
            "--store",
            "memory",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 1
    assert "'default' is a required property" in run.stderr
