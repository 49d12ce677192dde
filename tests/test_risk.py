"""Risk classes from MCP tool annotations, and the risk report of check-policy --against."""

from __future__ import annotations

import importlib.util
import io
import os
import sys
from pathlib import Path

import pytest

from authz.policy import compile_policy
from authz.risk import Annotations, annotations_of, classes, risk_report
from authz.tooling.report import check_policy
from devstack.stack import ROOT, Proc, free_port, running


def test_missing_hints_count_as_the_specification_defaults() -> None:
    assert annotations_of(None) == Annotations()
    hints = annotations_of({"title": "x", "readOnlyHint": "yes"})  # not a boolean: not stated
    assert hints == Annotations() and not hints.stated
    assert classes(hints) == ("destructive", "open_world")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"readOnlyHint": True}, ("read_only", "open_world")),
        ({"readOnlyHint": True, "openWorldHint": False}, ("read_only",)),
        ({"destructiveHint": False}, ("additive", "open_world")),
        ({"destructiveHint": True, "openWorldHint": False}, ("destructive",)),
        # destructiveHint means nothing for a read-only tool
        ({"readOnlyHint": True, "destructiveHint": True}, ("read_only", "open_world")),
    ],
)
def test_classes(raw: dict[str, bool], expected: tuple[str, ...]) -> None:
    assert classes(annotations_of(raw)) == expected


def test_write_tools_let_through_unchecked_are_warned_about() -> None:
    policy = compile_policy(
        {
            "version": "1",
            "default": "allow",
            "tools": {
                "limited": {"limits": [{"counter": "c", "window": "minute", "max": 1}]},
                "checked": {"arguments": {"type": "object"}},
                "denied": {"action": "deny"},
            },
        }
    )
    rows = risk_report(
        policy,
        [
            ("reader", {"readOnlyHint": True}),
            ("limited", None),
            ("checked", None),
            ("denied", None),
            ("writer", {"destructiveHint": False}),
            ("unknown", None),
        ],
    )
    warned = {row.tool: row.warning for row in rows if row.warning is not None}
    assert set(warned) == {"writer", "unknown"}
    assert "its annotations say not read-only" in warned["writer"]
    assert "states no annotations, so it counts as destructive" in warned["unknown"]
    assert [row.tool for row in rows] == sorted(row.tool for row in rows)


HAS_ECS = importlib.util.find_spec("awslabs") is not None and (
    importlib.util.find_spec("awslabs.ecs_mcp_server") is not None
)


@pytest.mark.e2e
@pytest.mark.skipif(not HAS_ECS, reason="awslabs-ecs-mcp-server is not installed")
def test_risk_report_against_the_real_ecs_server(tmp_path: Path) -> None:
    """The real server states no annotations: every tool counts as destructive, and each
    one examples/policy.json allows without a limit or schema is warned about."""
    port = free_port()
    server = Proc(
        "ecs-mcp-server",
        [
            sys.executable,
            "-c",
            "from awslabs.ecs_mcp_server.main import mcp; "
            f"mcp.run(transport='http', host='127.0.0.1', port={port}, show_banner=False)",
        ],
        tmp_path / "ecs.log",
        env={"AWS_REGION": os.environ.get("AWS_REGION", "us-east-1")},
    )
    out, err = io.StringIO(), io.StringIO()
    with running(server, port):
        code = check_policy(
            str(ROOT / "examples/policy.json"),
            against=f"http://127.0.0.1:{port}/mcp",
            out=out,
            err=err,
        )
    assert code == 0, err.getvalue()
    text = out.getvalue()
    rows = [line for line in text.splitlines() if line.startswith("    ")]
    assert len(rows) == 7
    assert all(": destructive, open_world, no annotations -> " in row for row in rows)
    warned = sorted(
        line.split("warning: tool ", 1)[1].split(" ", 1)[0]
        for line in text.splitlines()
        if "and the rule has neither a limit nor an argument schema" in line
    )
    assert warned == [
        "containerize_app",
        "validate_ecs_express_mode_prerequisites",
        "wait_for_service_ready",
    ]
