"""The approvals console: a web page on the admin (``--http``) port for the people who approve.

It exists only where the admin API does (admin tokens configured) and takes the same named
tokens: an operator signs in once with a form, or a script sends the bearer header. The
page lists pending approvals (tool, grant, argument names and digest, age, expiry, the
``notify`` label) with Approve and Reject, the decided ones with who decided, and the last
denials this process decided (:mod:`authz.denials`). Argument values never reach it: an
approval holds only the names and the SHA-256 of the arguments.

The session is a cookie holding the operator's name, its issue time and a nonce, signed
with HMAC-SHA256 keyed by that operator's admin token. Every process holding the same tokens
verifies it (replicas, ``--workers N``) without sharing session state; removing a token
ends its sessions, and a session ends after :data:`SESSION_S` (or when the browser closes).
Signing out drops the cookie from the browser; a copy taken before stays valid until then,
which is why the cookie is HttpOnly (the page's scripts cannot read it), SameSite=Strict
and scoped to the console's path. Decisions are
POSTs carrying a per-session CSRF token (derived from the session, so also stateless), sent
in a header the page's script sets; a POST from another origin is refused outright.

The page is plain HTML, one stylesheet and one small script shipped in the package
(``authz/static``): no build step, nothing fetched from elsewhere, no inline script, so the
Content-Security-Policy allows only this origin's files, and no page may frame it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from aiohttp import web

from authz import denials
from authz.admin import operator_of
from authz.approvals import Approval, ApprovalBook, NotPending, State
from authz.store import StoreUnavailable

log = logging.getLogger("mcp_authz")

PATH = "/console"
COOKIE = "mcp_authz_console"
CSRF_HEADER = "X-CSRF-Token"
# A session lasts one working shift at most.
SESSION_S = 8 * 3600
MAX_REASON = 500

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    # Not no-referrer: with it, browsers send "Origin: null" on form posts.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

_STATIC = files("authz").joinpath("static")


@dataclass(frozen=True)
class Session:
    """Who is signed in; ``csrf`` is None for bearer-header callers, who need none."""

    operator: str
    csrf: str | None


def _mac(token: str, purpose: str, *parts: str) -> str:
    message = "\x00".join(("mcp-authz console", purpose, *parts)).encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _unb64(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


def issue_session(token: str, operator: str, now: float) -> str:
    """The cookie value of a new session of ``operator``, who signed in with ``token``."""
    issued, nonce = str(int(now)), secrets.token_hex(16)
    return ".".join(
        (_b64(operator), issued, nonce, _mac(token, "session", operator, issued, nonce))
    )


def session_of(cookie: str, tokens: Mapping[str, str], now: float) -> Session | None:
    """The session a cookie proves, or None (forged, expired, or its token was removed)."""
    try:
        name, issued, nonce, mac = cookie.split(".")
        operator = _unb64(name)
        age = now - int(issued)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    if not 0 <= age < SESSION_S:
        return None
    found = None
    for token, owner in tokens.items():
        if owner == operator and hmac.compare_digest(
            mac.encode(), _mac(token, "session", operator, issued, nonce).encode()
        ):
            found = Session(operator, _mac(token, "csrf", nonce))
    return found


def _authenticated(request: web.Request, tokens: Mapping[str, str]) -> Session | None:
    header = request.headers.get("Authorization")
    if header is not None:
        operator = operator_of(header, tokens)
        return None if operator is None else Session(operator, None)
    cookie = request.cookies.get(COOKIE)
    return None if cookie is None else session_of(cookie, tokens, time.time())


def _same_origin(request: web.Request) -> bool:
    """A browser's POST names its page's origin; one from another site is refused."""
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{request.scheme}://{request.host}"


def view(approval: Approval, decided_at: float | None) -> dict[str, Any]:
    """What the page shows of an approval: names and digest, never an argument value."""
    if approval.decided_at:
        decided_at = approval.decided_at
    elif decided_at is None and approval.state in (State.APPROVED, State.CONSUMED):
        # Approving restarts the approval's time: it expires one ttl after the decision.
        decided_at = approval.expires_at - approval.ttl_s
    return {
        "id": approval.id,
        "tool": approval.tool,
        "server": approval.server or None,
        "grant": approval.grant,
        "caller_set": approval.caller or None,
        "argument_names": list(approval.argument_names),
        "arguments_sha256": approval.arguments_sha256,
        "state": approval.state.value,
        "created_at": approval.created_at,
        "expires_at": approval.expires_at,
        "decided_at": decided_at,
        "uses_left": approval.uses_left,
        "notify": approval.notify,
        "operator": approval.operator,
        "reason": approval.reason,
    }


def console_app(
    book: ApprovalBook,
    tokens: Mapping[str, str],
    on_event: Callable[[str, Approval], None],
    recent: denials.RecentDenials = denials.recent,
) -> web.Application:
    """The console, to mount at :data:`PATH` beside the admin API.

    ``on_event`` is the engine's approval callback: a decision made here is audited like
    one made through the admin API.
    """
    login_page = _STATIC.joinpath("login.html").read_text(encoding="utf-8")
    console_page = _STATIC.joinpath("console.html").read_bytes()
    assets = {
        "console.js": (_STATIC.joinpath("console.js").read_bytes(), "text/javascript"),
        "console.css": (_STATIC.joinpath("console.css").read_bytes(), "text/css"),
    }
    # When this process decided an approval: the record keeps no decision time for a
    # rejection, so one made elsewhere shows none.
    decided_here: dict[str, float] = {}

    def login_form(error: str = "", status: int = 200) -> web.Response:
        notice = f'<p class="error" role="alert">{error}</p>' if error else ""
        return web.Response(
            text=login_page.replace("<!--error-->", notice),
            status=status,
            content_type="text/html",
        )

    async def page(request: web.Request) -> web.Response:
        if _authenticated(request, tokens) is None:
            return login_form()
        return web.Response(body=console_page, content_type="text/html")

    async def to_page(_: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect(f"{PATH}/")

    async def login(request: web.Request) -> web.Response:
        if not _same_origin(request):
            return login_form("Sign-in from another site refused.", 403)
        form = await request.post()
        token = str(form.get("token", "")).strip()
        operator = operator_of(f"Bearer {token}", tokens) if token else None
        if operator is None:
            log.warning("console: sign-in with an unknown token refused")
            return login_form("That is not an admin token of this server.", 401)
        log.info("console: %s signed in", operator)
        response = web.HTTPSeeOther(f"{PATH}/")
        response.set_cookie(
            COOKIE,
            issue_session(token, operator, time.time()),
            path=PATH,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
        raise response

    def refused(request: web.Request) -> tuple[Session | None, web.Response | None]:
        """The caller's session, or the answer refusing the request."""
        session = _authenticated(request, tokens)
        if session is None:
            return None, web.json_response({"error": "sign in first"}, status=401)
        if request.method == "POST" and session.csrf is not None:
            presented = request.headers.get(CSRF_HEADER, "")
            if not _same_origin(request) or not hmac.compare_digest(
                presented.encode(), session.csrf.encode()
            ):
                return None, web.json_response({"error": "missing or wrong CSRF token"}, status=403)
        return session, None

    async def logout(request: web.Request) -> web.Response:
        _, refusal = refused(request)
        if refusal is not None:
            return refusal
        response = web.json_response({"signed_out": True})
        response.del_cookie(COOKIE, path=PATH)
        return response

    async def state(request: web.Request) -> web.Response:
        session, refusal = refused(request)
        if refusal is not None:
            return refusal
        assert session is not None
        approvals: list[dict[str, Any]] | None = None
        problem = None
        try:
            live = await book.live()
        except StoreUnavailable:
            problem = "the approval store is unavailable; approvals cannot be shown or decided"
        else:
            for gone in set(decided_here) - {a.id for a in live}:
                del decided_here[gone]
            approvals = [view(a, decided_here.get(a.id)) for a in live]
        return web.json_response(
            {
                "operator": session.operator,
                "csrf": session.csrf,
                "now": time.time(),
                "approvals": approvals,
                "approvals_error": problem,
                "denials": recent.newest_first(),
                "denials_capacity": recent.capacity,
            }
        )

    async def decide(request: web.Request) -> web.Response:
        session, refusal = refused(request)
        if refusal is not None:
            return refusal
        assert session is not None
        verb = request.match_info["verb"]
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": "the body must be JSON"}, status=400)
        reason = body.get("reason", "") if isinstance(body, dict) else ""
        reason = reason.strip()[:MAX_REASON] if isinstance(reason, str) else ""
        if verb == "reject" and not reason:
            return web.json_response({"error": "say why the call is rejected"}, status=400)
        try:
            approval = await book.decide(
                request.match_info["id"], verb == "approve", session.operator, reason
            )
        except NotPending as exc:
            return web.json_response({"error": str(exc)}, status=409)
        except StoreUnavailable:
            return web.json_response({"error": "the approval store is unavailable"}, status=503)
        if approval is None:
            return web.json_response({"error": "no such approval (or it expired)"}, status=404)
        decided_here[approval.id] = time.time()
        on_event("approved" if verb == "approve" else "rejected", approval)
        return web.json_response(view(approval, decided_here[approval.id]))

    def asset(name: str) -> Callable[[web.Request], Any]:
        body, content_type = assets[name]

        async def serve(_: web.Request) -> web.Response:
            return web.Response(body=body, content_type=content_type)

        return serve

    async def secure(_: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(SECURITY_HEADERS)

    app = web.Application()
    app.on_response_prepare.append(secure)
    app.router.add_get("", to_page)
    app.router.add_get("/", page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/api/state", state)
    app.router.add_post("/api/approvals/{id}/{verb:approve|reject}", decide)
    for name in assets:
        app.router.add_get(f"/{name}", asset(name))
    return app
