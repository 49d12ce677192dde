"""The approvals console in a real browser: Debian's chromium driven through chromedriver by
Selenium, against a real Envoy in front of mcp-authz (Redis-backed approvals) and the demo
MCP upstream, with the official MCP SDK client as the agent.

The screenshot of the signed-in page is written to ``.artifacts/console.png`` (ignored by
git) for CI to keep.
"""

from __future__ import annotations

import asyncio
import html.parser
import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devstack.redis_server import running_redis
from devstack.stack import (
    ENVOY_YAML,
    ROOT,
    Proc,
    authz_proc,
    envoy_config,
    envoy_proc,
    free_port,
    running,
    upstream_proc,
    wait_ready,
)
from tests.support.clients import McpCallError, sdk_call_tool

pytestmark = pytest.mark.e2e

TOKEN = "approver-token-0123456789"
OTHER_TOKEN = "steward-token-9876543210"
PATIENT = "patient-7731-MRN"  # an argument value that must never reach the page
ARTIFACTS = ROOT / ".artifacts"

POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "start_dicom_export_job": {
            "action": "require_approval",
            "reason": "exports protected health information",
            "approval": {"ttl": "15m", "uses": 1, "notify": "#phi-exports"},
        },
        "delete_app": {"action": "require_approval", "approval": {"notify": "#ecs-oncall"}},
    },
}
EXPORT = {"datastoreId": "ds-1", "outputS3Uri": f"s3://approved-exports/{PATIENT}", "studyCount": 1}


def _binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or (
            f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None
        )
        if found:
            return found
    return None


CHROMIUM = _binary("chromium", "chromium-browser")
CHROMEDRIVER = _binary("chromedriver")


@dataclass
class ConsoleStack:
    mcp_url: str
    console_url: str
    authz: Proc

    def audit_lines(self) -> list[dict[str, Any]]:
        return [
            json.loads(line)
            for line in self.authz.output().splitlines()
            if line.startswith('{"time"') and '"decision"' in line
        ]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleStack]:
    tmp = tmp_path_factory.mktemp("console")
    policy = tmp / "policy.json"
    policy.write_text(json.dumps(POLICY))
    tokens = tmp / "admin-tokens"
    tokens.write_text(f"alice:{TOKEN}\nbob:{OTHER_TOKEN}\n")
    listen, admin, upstream, grpc_port, http_port = (free_port() for _ in range(5))
    with ExitStack() as es:
        redis = es.enter_context(running_redis(tmp))
        es.enter_context(running(upstream_proc(tmp, upstream, tmp / "record.jsonl"), upstream))
        authz = es.enter_context(
            running(
                authz_proc(
                    tmp,
                    policy,
                    grpc_port,
                    http_port,
                    ["--redis", redis.url],
                    "--admin-tokens-file",
                    str(tokens),
                ),
                http_port,
            )
        )
        config = envoy_config(tmp, listen=listen, authz=grpc_port, upstream=upstream, admin=admin)
        es.enter_context(running(envoy_proc(tmp, config), listen))
        wait_ready(f"http://127.0.0.1:{admin}/ready")
        yield ConsoleStack(
            mcp_url=f"http://127.0.0.1:{listen}/mcp",
            console_url=f"http://127.0.0.1:{http_port}/console/",
            authz=authz,
        )


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "console browser test: no chromium and chromedriver on this machine "
            "(`make system-browser` installs Debian's chromium and chromium-driver, as root)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tmp = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1500,900",
        f"--user-data-dir={tmp / 'profile'}",
    ):
        options.add_argument(flag)
    # A driver path given to the Service keeps Selenium Manager (which downloads) out.
    service = Service(CHROMEDRIVER, log_output=str(tmp / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def agent() -> dict[str, str]:
    return {"Authorization": f"Bearer agent-{uuid.uuid4().hex}"}


def pending_id(
    stack: ConsoleStack, tool: str, args: dict[str, Any], headers: dict[str, str]
) -> str:
    with pytest.raises(McpCallError) as info:
        asyncio.run(sdk_call_tool(stack.mcp_url, tool, args, headers))
    assert info.value.data["reason"] == "approval_required", info.value.message
    approval_id: str = info.value.data["approvalId"]
    return approval_id


def state(stack: ConsoleStack, token: str = TOKEN) -> dict[str, Any]:
    resp = httpx.get(stack.console_url + "api/state", headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def wait_for(driver: Any, what: str, check: Any, timeout: float = 15.0) -> Any:
    """The first true value of ``check``; rows re-rendered meanwhile are looked up again."""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)
    wait = WebDriverWait(driver, timeout, ignored_exceptions=ignored)
    return wait.until(lambda d: check(d), message=what)


def row(driver: Any, table: str, approval_id: str) -> Any:
    from selenium.webdriver.common.by import By

    def find(d: Any) -> Any:
        found = d.find_elements(By.CSS_SELECTOR, f'#{table} tr[data-approval-id="{approval_id}"]')
        return found[0] if found else False

    return wait_for(driver, f"{approval_id} in #{table}", find)


def row_text(driver: Any, table: str, key: str, *needles: str) -> str:
    """The text of the row of ``table`` holding ``key``, once it holds every needle."""
    from selenium.webdriver.common.by import By

    def find(d: Any) -> str | bool:
        for tr in d.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr"):
            text: str = tr.text
            if key in text and all(needle in text for needle in needles):
                return text
        return False

    found: str = wait_for(driver, f"a row of #{table} with {key} and {needles}", find)
    return found


def sign_in(driver: Any, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(url)
    field = driver.find_element(By.ID, "token")
    field.send_keys(token)
    field.submit()


def test_operator_decides_in_the_browser(stack: ConsoleStack, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    sign_in(browser, stack.console_url, TOKEN)
    wait_for(
        browser, "signed in", lambda d: "Signed in as alice" in d.find_element(By.ID, "status").text
    )
    assert browser.get_cookie("mcp_authz_console")["httpOnly"] is True
    browser.execute_script("window.sameDocument = true")

    exporter, deleter = agent(), agent()
    export = pending_id(stack, "start_dicom_export_job", EXPORT, exporter)
    delete = pending_id(stack, "delete_app", {"app_name": "billing-prod"}, deleter)
    with pytest.raises(McpCallError) as denied:
        asyncio.run(sdk_call_tool(stack.mcp_url, "list_datastores", {}, deleter))
    assert denied.value.data["reason"] == "denied_by_default"

    shown = row(browser, "pending", export)
    assert browser.execute_script("return window.sameDocument") is True, "the page reloaded"
    assert PATIENT not in browser.page_source
    grant = next(a["grant"] for a in state(stack)["approvals"] if a["id"] == export)
    cells = [c.text for c in shown.find_elements(By.TAG_NAME, "td")]
    assert cells[:4] == [
        export,
        "start_dicom_export_job",
        grant,
        "datastoreId, outputS3Uri, studyCount",
    ]
    digest = shown.find_elements(By.TAG_NAME, "td")[4].get_attribute("title")
    assert len(digest) == 64 and cells[7] == "#phi-exports"
    assert row(browser, "pending", delete)

    # The denial, with the request id its audit line carries.
    denial = next(
        line
        for line in reversed(stack.audit_lines())
        if line["tool"] == "list_datastores" and line["decision"] == "deny"
    )
    row_text(
        browser,
        "denials",
        denial["request_id"],
        "list_datastores",
        "denied_by_default",
        denial["grant"],
    )

    shown.find_element(By.CSS_SELECTOR, "button.approve").click()
    row_text(browser, "decided", export, "approved", "alice")
    assert browser.find_elements(By.CSS_SELECTOR, f'#pending tr[data-approval-id="{export}"]') == []

    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "console.png"))

    text = asyncio.run(sdk_call_tool(stack.mcp_url, "start_dicom_export_job", EXPORT, exporter))
    assert "ds-1" in text, "the identical retry passes once approved"

    pending_row = row(browser, "pending", delete)
    pending_row.find_element(By.NAME, "reason").send_keys("billing-prod is not to be deleted")
    pending_row.find_element(By.CSS_SELECTOR, "button.reject").click()
    row_text(browser, "decided", delete, "rejected", "alice", "billing-prod is not to be deleted")
    with pytest.raises(McpCallError) as info:
        asyncio.run(
            sdk_call_tool(stack.mcp_url, "delete_app", {"app_name": "billing-prod"}, deleter)
        )
    assert info.value.data["reason"] == "approval_rejected"
    assert "billing-prod is not to be deleted" in info.value.message

    events = [
        json.loads(line)
        for line in stack.authz.output().splitlines()
        if '"event":"approval_' in line
    ]
    assert {
        "event": "approval_approved",
        "approval_id": export,
        "operator": "alice",
    }.items() <= next(
        e for e in events if e["event"] == "approval_approved" and e["approval_id"] == export
    ).items()
    assert any(e["event"] == "approval_rejected" and e["approval_id"] == delete for e in events)

    row_text(browser, "decided", export, "consumed")
    assert PATIENT not in browser.page_source
    assert PATIENT not in json.dumps(state(stack))
    assert PATIENT not in stack.authz.output()


def test_a_wrong_token_sees_nothing(stack: ConsoleStack, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    hidden = pending_id(stack, "start_dicom_export_job", {**EXPORT, "studyCount": 7}, agent())
    sign_in(browser, stack.console_url, TOKEN)
    row(browser, "pending", hidden)
    browser.find_element(By.ID, "logout").click()
    wait_for(browser, "signed out", lambda d: d.find_elements(By.ID, "token"))
    assert hidden not in browser.page_source

    sign_in(browser, stack.console_url, "not-an-admin-token-at-all")
    alert = browser.find_element(By.CSS_SELECTOR, "p.error")
    assert "not an admin token" in alert.text
    assert browser.find_elements(By.ID, "pending") == []
    assert hidden not in browser.page_source and "start_dicom_export_job" not in browser.page_source
    assert browser.get_cookie("mcp_authz_console") is None

    api = stack.console_url + "api/state"
    assert httpx.get(api).status_code == 401
    assert (
        httpx.get(api, headers={"Authorization": "Bearer nope-nope-nope-nope"}).status_code == 401
    )
    assert httpx.get(api, headers=agent()).status_code == 401
    assert httpx.get(api, cookies={"mcp_authz_console": "YWxpY2U.1.00.00"}).status_code == 401
    # A session signed for alice does not become bob's by editing the name in it.
    signed = _session_cookie(stack, TOKEN)
    bob = "Ym9i." + signed.split(".", 1)[1]
    assert httpx.get(api, cookies={"mcp_authz_console": bob}).status_code == 401
    approve = f"{stack.console_url}api/approvals/{hidden}/approve"
    wrong = {"Authorization": "Bearer nope-nope-nope-nope"}
    assert httpx.post(approve, headers=wrong, json={}).status_code == 401
    assert next(a for a in state(stack)["approvals"] if a["id"] == hidden)["state"] == "pending"


def _session_cookie(stack: ConsoleStack, token: str) -> str:
    resp = httpx.post(stack.console_url + "login", data={"token": token})
    assert resp.status_code == 303, resp.text
    cookie = resp.headers["set-cookie"]
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/console"):
        assert attribute in cookie
    assert "Secure" not in cookie, "plain HTTP: a Secure cookie would never be sent back"
    return resp.cookies["mcp_authz_console"]


def test_decisions_need_the_sessions_csrf_token(stack: ConsoleStack) -> None:
    approval = pending_id(stack, "delete_app", {"app_name": "csrf-check"}, agent())
    cookies = {"mcp_authz_console": _session_cookie(stack, OTHER_TOKEN)}
    url = f"{stack.console_url}api/approvals/{approval}/approve"
    own = httpx.get(stack.console_url + "api/state", cookies=cookies).json()
    assert own["operator"] == "bob" and len(own["csrf"]) == 64
    for headers in (
        {},
        {"X-CSRF-Token": "0" * 64},
        {"X-CSRF-Token": own["csrf"], "Origin": "https://evil.example"},
    ):
        resp = httpx.post(url, cookies=cookies, headers=headers, json={})
        assert resp.status_code == 403, (headers, resp.text)
    assert next(a for a in state(stack)["approvals"] if a["id"] == approval)["state"] == "pending"
    reject = f"{stack.console_url}api/approvals/{approval}/reject"
    no_reason = httpx.post(reject, cookies=cookies, headers={"X-CSRF-Token": own["csrf"]}, json={})
    assert no_reason.status_code == 400
    ok = httpx.post(url, cookies=cookies, headers={"X-CSRF-Token": own["csrf"]}, json={})
    assert ok.status_code == 200 and ok.json()["operator"] == "bob"
    again = httpx.post(url, cookies=cookies, headers={"X-CSRF-Token": own["csrf"]}, json={})
    assert again.status_code == 409


class _Scripts(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts.append(dict(attrs))
        if any(name.startswith("on") for name, _ in attrs) or any(
            (value or "").startswith("javascript:") for _, value in attrs
        ):
            self.inline = True


def test_security_headers_and_no_inline_script(stack: ConsoleStack) -> None:
    cookies = {"mcp_authz_console": _session_cookie(stack, TOKEN)}
    for path in ("", "console.js", "console.css", "api/state", "no-such-page"):
        for jar in (cookies, {}):
            resp = httpx.get(stack.console_url + path, cookies=jar)
            headers = resp.headers
            csp = headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "script-src 'self';" in csp
            assert "unsafe" not in csp and "default-src 'none'" in csp
            assert headers["x-frame-options"] == "DENY"
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["cache-control"] == "no-store"
    page = httpx.get(stack.console_url, cookies=cookies)
    assert 'id="pending"' in page.text
    parser = _Scripts()
    parser.feed(page.text)
    assert parser.scripts == [{"src": "console.js", "defer": None}] and not parser.inline
    assert (
        httpx.get(stack.console_url + "console.js")
        .headers["content-type"]
        .startswith("text/javascript")
    )


def test_console_is_not_reachable_through_envoy(stack: ConsoleStack) -> None:
    base = stack.mcp_url.removesuffix("/mcp")
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/console/", "/console/api/state", "/mcp/../console/", "/console"):
        resp = httpx.get(base + path, headers=bearer)
        assert resp.status_code in (400, 404), (path, resp.status_code)
        assert "approvals" not in resp.text
    # The shipped config routes exactly one path, /mcp, to anything (list requests take a
    # route of their own on it); the rest is a 404.
    config = yaml.safe_load(ENVOY_YAML.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    forwarded = {r["match"]["path"] for r in routes if "route" in r}
    assert forwarded == {"/mcp"}
    assert all("prefix" not in r["match"] for r in routes if "route" in r)
    assert all(r["direct_response"]["status"] == 404 for r in routes if "route" not in r)
