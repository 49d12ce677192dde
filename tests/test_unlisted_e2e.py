"""Names the upstream resolves differently, end to end: the shipped envoy/envoy.yaml,
mcp-authz, and a real FastMCP upstream that resolves the hashed alias
``__<12 hex>_delete_app`` to its tool ``delete_app`` (tests/support/alias_upstream.py).

Under ``default: allow`` a rule denying ``delete_app`` by name does not match the alias;
``unlisted_tools: deny`` refuses it because the upstream never lists that name (issue 18,
item 5). The catalogue is learnt either from a client's tools/list (through ext_proc) or
fetched by mcp-authz itself with --upstream-url.
"""

from __future__ import annotations

import contextlib
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from devstack.stack import (
    ROOT,
    Proc,
    authz_proc,
    envoy_config,
    envoy_proc,
    free_port,
    running,
    wait_ready,
)
from tests.support.alias_upstream import ALIAS
from tests.support.clients import (
    McpCallError,
    fastmcp_call_tool,
    fastmcp_list_tools,
    sdk_list_tools,
)

pytestmark = pytest.mark.e2e

POLICY: dict[str, Any] = {
    "version": "1",
    "default": "allow",
    "unlisted_tools": "deny",
    "tools": {"delete_app": {"action": "deny", "reason": "deleting needs a human"}},
}


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer tok-{uuid.uuid4().hex}"}


@contextlib.contextmanager
def gateway(tmp: Path, policy: dict[str, Any], *extra: str) -> Iterator[str]:
    """Envoy -> mcp-authz (``extra`` flags, ``{upstream}`` replaced by the upstream's URL)
    -> the alias upstream; yields the gateway's MCP URL."""
    listen, admin, grpc_port, http_port, upstream = (free_port() for _ in range(5))
    path = tmp / "policy.json"
    path.write_text(json.dumps(policy))
    url = f"http://127.0.0.1:{upstream}/mcp"
    flags = [flag.replace("{upstream}", url) for flag in extra]
    server = Proc(
        "alias-upstream",
        [sys.executable, str(ROOT / "tests/support/alias_upstream.py"), str(upstream)],
        tmp / "upstream.log",
        env={"FASTMCP_LOG_LEVEL": "WARNING"},
    )
    config = envoy_config(tmp, listen=listen, authz=grpc_port, upstream=upstream, admin=admin)
    authz = authz_proc(tmp, path, grpc_port, http_port, ["--store", "memory"], *flags)
    with (
        running(server, upstream),
        running(authz, grpc_port),
        running(envoy_proc(tmp, config), listen),
    ):
        wait_ready(f"http://127.0.0.1:{admin}/ready")
        yield f"http://127.0.0.1:{listen}/mcp"


def call(url: str, tool: str) -> str:
    return anyio.run(lambda: fastmcp_call_tool(url, tool, {"name": "billing"}, bearer()))


def refusal(url: str, tool: str) -> McpCallError:
    with pytest.raises(McpCallError) as refused:
        call(url, tool)
    return refused.value


def test_without_the_option_the_alias_reaches_the_denied_tool(tmp_path: Path) -> None:
    """The defect itself: the alias passes the rule written for the listed name."""
    with gateway(tmp_path, {**POLICY, "unlisted_tools": "allow"}) as url:
        assert "deleted billing" in call(url, ALIAS)
        assert "deleting needs a human" in refusal(url, "delete_app").message


def test_an_alias_is_refused_once_a_client_has_listed_the_tools(tmp_path: Path) -> None:
    """No --upstream-url: the catalogue is learnt from a list response ext_proc
    processes; before it, the rules alone judge."""
    with gateway(tmp_path, POLICY) as url:
        listed = anyio.run(lambda: sdk_list_tools(url, bearer()))
        assert set(listed) == {"list_apps"}  # delete_app is denied: hidden
        refused = refusal(url, ALIAS)
        assert "not a tool the upstream lists" in refused.message
        assert refused.data["reason"] == "unknown_tool"
        assert call(url, "list_apps") == "billing,search"


def test_an_alias_is_refused_with_the_list_fetched_at_start(tmp_path: Path) -> None:
    """--upstream-url: mcp-authz fetches the list itself, so the first call of a client
    that never lists is judged by it too."""
    with gateway(tmp_path, POLICY, "--upstream-url", "{upstream}") as url:
        for _ in range(100):  # the fetch runs beside serving; until done, calls fail closed
            try:
                assert call(url, "list_apps") == "billing,search"
                break
            except McpCallError as exc:
                assert "not known yet" in exc.message
                anyio.run(anyio.sleep, 0.1)
        else:
            pytest.fail("the upstream's tool list was never fetched")
        assert "not a tool the upstream lists" in refusal(url, ALIAS).message
        listed = anyio.run(lambda: fastmcp_list_tools(url, bearer()))
        assert set(listed) == {"list_apps"}


def test_classes_decide_through_the_gateway(tmp_path: Path) -> None:
    """A class rule applies to the tools the upstream describes: list_apps says it is
    read-only, delete_app states nothing and so counts as destructive."""
    policy = {
        "version": "1",
        "default": "deny",
        "unlisted_tools": "deny",
        "classes": {"read_only": {}, "destructive": {"action": "require_approval"}},
    }
    with gateway(tmp_path, policy, "--upstream-url", "{upstream}") as url:
        for _ in range(100):
            try:
                assert call(url, "list_apps") == "billing,search"
                break
            except McpCallError:
                anyio.run(anyio.sleep, 0.1)
        assert "approval required" in refusal(url, "delete_app").message
        listed = anyio.run(lambda: sdk_list_tools(url, bearer()))
        assert set(listed) == {"list_apps", "delete_app"}  # require_approval stays listed
