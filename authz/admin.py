"""The admin API of approvals, its tokens, and the watcher of their expiries.

The API is JSON over HTTP on the ``--http`` port under ``/admin/v1/``, and exists only when
admin tokens are configured. Each token has a name, which becomes the operator recorded on
the decision. The shipped Envoy config routes only ``/mcp`` to the MCP server and nothing to
this port, so an agent's MCP traffic cannot reach it. Its client is
:mod:`authz.admin_client`; webhook notices are :mod:`authz.notify`'s.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import Gauge

from authz import audit
from authz.approvals import ApprovalBook, NotPending, State
from authz.store import StoreUnavailable

log = logging.getLogger("mcp_authz")

# The operator an admin request's token names.
OPERATOR = web.RequestKey("operator", str)


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


async def watch_expiries(
    book: ApprovalBook, pending: Gauge | None, interval_s: float = 2.0
) -> None:
    """Report expired requests (once across replicas) and keep the pending gauge current."""
    while True:
        try:
            for approval in await book.expired():
                audit.approval_event("expired", approval)
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
        request[OPERATOR] = operator
        try:
            response: web.StreamResponse = await handler(request)
        except StoreUnavailable as exc:
            log.warning("approvals: %s", exc)
            return web.json_response({"error": "approval store unavailable"}, status=503)
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
        operator = request[OPERATOR]
        try:
            approval = await book.decide(request.match_info["id"], approve, operator, reason[:500])
        except NotPending as exc:
            return web.json_response({"error": str(exc)}, status=409)
        if approval is None:
            return web.json_response({"error": "no such approval (or it expired)"}, status=404)
        audit.approval_event("approved" if approve else "rejected", approval, operator)
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
