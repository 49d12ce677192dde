"""The operator side of approvals: the admin HTTP API, its tokens, webhook notices, audit.

The API is JSON over HTTP on the ``--http`` port under ``/admin/v1/``, and exists only when
admin tokens are configured. Each token has a name, which becomes the operator recorded on
the decision. The shipped Envoy config routes only ``/mcp`` to the MCP server and nothing to
this port, so an agent's MCP traffic cannot reach it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import Gauge

from authz.approvals import Approval, ApprovalBook, NotPending, State
from authz.store import StoreUnavailable

audit = logging.getLogger("mcp_authz.audit")
log = logging.getLogger("mcp_authz")

WEBHOOK_ATTEMPTS = 3
WEBHOOK_TIMEOUT_S = 2.0


def parse_tokens(text: str) -> dict[str, str]:
    """``name:token`` entries, one per line or comma-separated; ``#`` starts a comment.

    Returns token -> operator name.
    """
    tokens: dict[str, str] = {}
    for raw in text.replace(",", "\n").splitlines():
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        name, sep, token = entry.partition(":")
        if not sep or not name.strip() or len(token.strip()) < 16:
            raise ValueError("admin tokens must be 'name:token' with a token of 16+ characters")
        tokens[token.strip()] = name.strip()
    return tokens


def load_tokens(path: str | None, env_value: str | None) -> dict[str, str]:
    """Admin tokens from a file (preferred, e.g. a mounted Secret) or an environment value."""
    if path:
        return parse_tokens(Path(path).read_text(encoding="utf-8"))
    return parse_tokens(env_value or "")


def operator_of(header: str, tokens: Mapping[str, str]) -> str | None:
    """The operator a ``Bearer`` header authenticates, compared in constant time."""
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return None
    found = None
    for token, name in tokens.items():
        if hmac.compare_digest(token.encode(), presented.strip().encode()):
            found = name
    return found


def audit_event(event: str, approval: Approval, operator: str = "") -> None:
    """One structured line per approval event; argument values never exist here."""
    audit.info(
        "%s",
        json.dumps(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "event": f"approval_{event}",
                "approval_id": approval.id,
                "grant": approval.grant,
                "tool": approval.tool,
                "arguments_sha256": approval.arguments_sha256,
                "operator": operator or approval.operator or None,
            },
            separators=(",", ":"),
        ),
    )


def notice(approval: Approval) -> dict[str, Any]:
    """The webhook body: enough to decide where to look, never an argument value."""
    return {
        "id": approval.id,
        "grant": approval.grant,
        "tool": approval.tool,
        "argument_names": list(approval.argument_names),
        "arguments_sha256": approval.arguments_sha256,
        "expires_at": approval.expires_at,
        "notify": approval.notify,
        "approve": f"mcp-authz approvals approve {approval.id}",
        "reject": f"mcp-authz approvals reject {approval.id} --reason TEXT",
    }


async def send_notice(url: str, approval: Approval) -> bool:
    """POST the notice with retries and a timeout. A failure is logged, never fatal: the
    request stays pending either way, so a webhook can neither allow nor block a call."""
    timeout = aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
            try:
                async with session.post(url, json=notice(approval)) as resp:
                    if resp.status < 300:
                        return True
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = type(exc).__name__
            log.warning(
                "approval webhook attempt %d/%d for %s failed: %s",
                attempt,
                WEBHOOK_ATTEMPTS,
                approval.id,
                problem,
            )
            await asyncio.sleep(0.2 * attempt)
    return False


def approval_events(webhook_url: str) -> Callable[[str, Approval], None]:
    """The engine's approval callback: audit every event; notify the webhook of requests.

    The notice is sent in the background: the check that opened the request is answered
    at once, and a slow or failing webhook changes no decision.
    """
    sending: set[asyncio.Task[bool]] = set()

    def on_event(event: str, approval: Approval) -> None:
        audit_event(event, approval)
        if event == "requested" and webhook_url:
            task = asyncio.get_running_loop().create_task(send_notice(webhook_url, approval))
            sending.add(task)
            task.add_done_callback(sending.discard)

    return on_event


async def watch_expiries(
    book: ApprovalBook, pending: Gauge | None, interval_s: float = 2.0
) -> None:
    """Report expired requests (once across replicas) and keep the pending gauge current."""
    while True:
        try:
            for approval in await book.expired():
                audit_event("expired", approval)
            if pending is not None:
                live = await book.live()
                pending.set(sum(1 for a in live if a.state is State.PENDING))
        except StoreUnavailable as exc:
            log.warning("approvals: %s", exc)
        await asyncio.sleep(interval_s)


def admin_app(book: ApprovalBook, tokens: Mapping[str, str]) -> web.Application:
    """The ``/admin/v1`` sub-application; every route needs an admin token."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
        operator = operator_of(request.headers.get("Authorization", ""), tokens)
        if operator is None:
            return web.json_response(
                {"error": "a valid admin bearer token is required"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        request["operator"] = operator
        response: web.StreamResponse = await handler(request)
        return response

    async def list_approvals(_: web.Request) -> web.Response:
        return web.json_response({"approvals": [a.public() for a in await book.live()]})

    async def show(request: web.Request) -> web.Response:
        approval = await book.get(request.match_info["id"])
        if approval is None:
            return web.json_response({"error": "no such approval (or it expired)"}, status=404)
        return web.json_response(approval.public())

    async def decide(request: web.Request, approve: bool) -> web.Response:
        reason = ""
        if not approve and request.can_read_body:
            try:
                body = await request.json()
            except json.JSONDecodeError:
                return web.json_response({"error": "body must be JSON"}, status=400)
            reason = str(body.get("reason", "")) if isinstance(body, dict) else ""
        operator = request["operator"]
        try:
            approval = await book.decide(request.match_info["id"], approve, operator, reason[:500])
        except NotPending as exc:
            return web.json_response({"error": str(exc)}, status=409)
        if approval is None:
            return web.json_response({"error": "no such approval (or it expired)"}, status=404)
        audit_event("approved" if approve else "rejected", approval, operator)
        return web.json_response(approval.public())

    async def approve(request: web.Request) -> web.Response:
        return await decide(request, True)

    async def reject(request: web.Request) -> web.Response:
        return await decide(request, False)

    app = web.Application(middlewares=[authenticate])
    app.router.add_get("/approvals", list_approvals)
    app.router.add_get("/approvals/{id}", show)
    app.router.add_post("/approvals/{id}/approve", approve)
    app.router.add_post("/approvals/{id}/reject", reject)
    return app


def admin_request(
    base_url: str, token: str, method: str, path: str, body: Mapping[str, Any] | None = None
) -> tuple[int, Any]:
    """Call the admin API (used by ``mcp-authz approvals``); returns (status, JSON body).

    The standard library's urllib is enough for a handful of synchronous CLI calls.
    """
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(  # noqa: S310 (the operator's own admin URL)
        base_url.rstrip("/") + "/admin/v1" + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        try:
            return exc.code, json.loads(payload or b"null")
        except json.JSONDecodeError:
            return exc.code, {"error": payload.decode(errors="replace")[:200]}
