"""List filtering through the shipped envoy/envoy-jwt.yaml: jwt_authn verifies real RS256
and ES256 tokens (a JWKS file this test writes), ext_authz derives each caller's sets from
the verified claims and marks the list request, and ext_proc filters the demo upstream's
list for those sets. Two callers in different caller sets see two different lists from
the official ``mcp`` SDK client (and ``fastmcp``'s)."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from authz.policy import parse_policy_text
from tests.support.clients import McpCallError, fastmcp_list_tools, sdk_call_tool, sdk_list_tools
from tests.test_callers import ISSUE_POLICY
from tests.test_callers_e2e import Callers, callers, keys, values  # noqa: F401 (fixtures)
from tests.test_mcp_authorization import JwtStack, Keys, bearer, jwt_stack, offline, shipped

pytestmark = pytest.mark.e2e

# What each caller of the issue's policy may use of the demo upstream's six tools (default
# deny: containerize_app, ecs_resource_management and list_datastores are hidden from all).
SEES = {
    "bob": {"start_dicom_export_job", "ecs_troubleshooting_tool"},  # exporters
    "carol": {"delete_app", "ecs_troubleshooting_tool"},  # operators (require_approval)
    "erin": {"ecs_troubleshooting_tool"},  # in no set
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[JwtStack]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("jwt-listing")
    jwks = tmp / "jwks.json"
    jwks.write_text(keys.jwks())
    policy = parse_policy_text(ISSUE_POLICY, "yaml")
    assert isinstance(policy, dict)
    with jwt_stack(tmp, offline(shipped(), jwks), policy) as running:
        yield running


def test_two_callers_see_two_different_lists(stack: JwtStack, callers: Callers) -> None:  # noqa: F811
    def listed(token: str) -> set[str]:
        return set(anyio.run(lambda: sdk_list_tools(stack.url, bearer(token))))

    seen = {name: listed(getattr(callers, name)) for name in SEES}
    assert seen == SEES


def test_fastmcp_sees_the_same_list(stack: JwtStack, callers: Callers) -> None:  # noqa: F811
    listed = anyio.run(lambda: fastmcp_list_tools(stack.url, bearer(callers.bob)))
    assert set(listed) == SEES["bob"]


def test_a_tool_hidden_from_a_caller_is_still_refused(stack: JwtStack, callers: Callers) -> None:  # noqa: F811
    with pytest.raises(McpCallError) as refused:
        anyio.run(
            lambda: sdk_call_tool(stack.url, "delete_app", {"app_name": "x"}, bearer(callers.bob))
        )
    assert refused.value.data["reason"] == "caller_not_permitted"


def test_a_clients_own_list_mark_is_removed(stack: JwtStack, callers: Callers) -> None:  # noqa: F811
    """A client sending x-mcp-authz-list itself gets nothing more: the header is removed
    before ext_authz, and its list is filtered for it as any other."""
    headers = {
        **bearer(callers.erin),
        "x-mcp-authz-list": "tools/list",
        "x-mcp-authz-callers": "operators,exporters",
    }
    listed = anyio.run(lambda: sdk_list_tools(stack.url, headers))
    assert set(listed) == SEES["erin"]
