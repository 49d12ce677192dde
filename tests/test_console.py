"""The console's session cookie and the ring of recent denials the audit recording feeds.

The page itself, its CSRF and headers are tested in a real browser and over HTTP in
tests/test_console_e2e.py.
"""

from __future__ import annotations

import io
import json
from typing import cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from authz import audit, denials
from authz.approvals import Approval, ApprovalBook
from authz.console import PATH, SESSION_S, console_app, issue_session, session_of
from authz.engine import Engine
from authz.mcp import HttpRequest
from authz.policy import compile_policy
from authz.store import StoreUnavailable, open_store

TOKENS = {"alice-token-0123456789": "alice", "bob-token-0123456789ab": "bob"}
NOW = 1_800_000_000.0


def test_a_session_proves_its_operator_until_it_ends() -> None:
    cookie = issue_session("alice-token-0123456789", "alice", NOW)
    session = session_of(cookie, TOKENS, NOW + 60)
    assert session is not None and session.operator == "alice"
    assert session.csrf is not None and len(session.csrf) == 64
    again = session_of(cookie, TOKENS, NOW + 120)
    assert again is not None and again.csrf == session.csrf, "the CSRF token is per session"
    other = session_of(issue_session("alice-token-0123456789", "alice", NOW), TOKENS, NOW)
    assert other is not None and other.csrf != session.csrf
    assert session_of(cookie, TOKENS, NOW + SESSION_S) is None, "expired"
    assert session_of(cookie, TOKENS, NOW - 10) is None, "issued in the future"
    assert session_of(cookie, {"bob-token-0123456789ab": "bob"}, NOW) is None, "token removed"


@pytest.mark.parametrize(
    "forge",
    [
        lambda c: "Ym9i." + c.split(".", 1)[1],  # bob's name on alice's signature
        lambda c: c[:-1] + ("0" if c[-1] != "0" else "1"),  # a changed signature
        lambda c: ".".join([*c.split(".")[:2], "00" * 16, *c.split(".")[3:]]),  # new nonce
        lambda c: c + ".x",
        lambda c: "",
        lambda c: "!!!.1.2.3",
        lambda c: "YWxpY2U.notanumber.00.00",
        lambda c: c[:-1] + "é",
    ],
)
def test_a_forged_or_mangled_cookie_proves_nothing(forge: object) -> None:
    cookie = issue_session("alice-token-0123456789", "alice", NOW)
    assert callable(forge)
    assert session_of(forge(cookie), TOKENS, NOW + 1) is None


def test_the_ring_is_bounded_and_keeps_no_argument_value() -> None:
    ring = denials.RecentDenials(capacity=3)
    for n in range(5):
        ring.add({"tool": f"t{n}", "reason": "denied_by_default", "arguments": {"mrn": "PHI"}})
    assert [d["tool"] for d in ring.newest_first()] == ["t4", "t3", "t2"]
    assert "PHI" not in json.dumps(ring.newest_first())
    ring.add({"tool": "x" * 10_000, "request_id": 7})
    newest = ring.newest_first()[0]
    assert len(newest["tool"]) == denials.MAX_TEXT and newest["request_id"] is None


async def test_the_audit_recording_feeds_denials_only(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = compile_policy(
        {
            "version": "1",
            "default": "deny",
            "tools": {
                "ping": {"action": "allow"},
                "export": {"action": "deny", "reason": "not here", "log_arguments": True},
            },
        }
    )
    engine = Engine(policy, open_store("memory://", timeout_s=1.0))
    ring = denials.RecentDenials()
    monkeypatch.setattr(denials, "recent", ring)
    monkeypatch.setattr(audit._sink, "stream", io.StringIO())
    for request_id, tool in (("r-allow", "ping"), ("r-deny", "export")):
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": tool, "arguments": {"mrn": "patient-7731-MRN"}},
            }
        ).encode()
        http = HttpRequest(
            method="POST",
            headers={"content-type": "application/json", "authorization": "Bearer agent-1"},
            body=body,
        )
        audit.record(await engine.check(http), request_id, 0.001)
    written = audit._sink.stream.getvalue()
    assert "patient-7731-MRN" in written, "the rule opted in to logging its arguments"
    (only,) = ring.newest_first()
    assert only["request_id"] == "r-deny" and only["tool"] == "export"
    assert only["reason"] == "denied_by_rule" and only["decision"] == "deny"
    assert only["grant"] and only["time"]
    assert "patient-7731-MRN" not in json.dumps(only)


class _StoreDown:
    """A book whose store does not answer (the only fake here: Redis outages are tested
    end to end elsewhere; this checks what the console makes of one)."""

    async def live(self) -> list[Approval]:
        raise StoreUnavailable("approvals: ConnectionError")

    async def decide(
        self, approval_id: str, approve: bool, operator: str, reason: str
    ) -> Approval | None:
        raise StoreUnavailable("approvals: ConnectionError")


async def test_a_store_outage_still_shows_the_denials() -> None:
    ring = denials.RecentDenials()
    ring.add({"tool": "delete_app", "reason": "store_unavailable", "decision": "deny"})
    events: list[str] = []
    app = web.Application()
    book = cast(ApprovalBook, _StoreDown())
    app.add_subapp(PATH, console_app(book, TOKENS, lambda e, a: events.append(e), ring))
    bearer = {"Authorization": "Bearer alice-token-0123456789"}
    async with TestClient(TestServer(app)) as client:
        resp = await client.get(f"{PATH}/api/state", headers=bearer)
        assert resp.status == 200
        body = await resp.json()
        assert body["approvals"] is None and "unavailable" in body["approvals_error"]
        assert body["denials"][0]["reason"] == "store_unavailable"
        decided = await client.post(f"{PATH}/api/approvals/apr_1/approve", headers=bearer, json={})
        assert decided.status == 503
    assert events == []
