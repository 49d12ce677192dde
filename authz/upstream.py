"""The upstream's tool list, fetched by mcp-authz itself (``--upstream-url``): at start,
until it succeeds, and again after every policy reload.

Without it the catalogue (:mod:`authz.catalogue`) is learnt only from the ``tools/list``
responses clients ask for, so until a client lists the tools, a tool's risk class is the
specification's defaults and ``unlisted_tools: deny`` cannot judge names. With it, the
engine starts with an awaited catalogue: ``unlisted_tools: deny`` refuses calls until the
list is fetched (fail closed), and each fetch replaces the catalogue whole.

Written on aiohttp (a runtime dependency) rather than the MCP SDK (an optional one, for
``check-policy --against``): the exchange is four small requests of streamable HTTP
(initialize, the initialized notification, tools/list page by page, closing the session).
Every response is bounded by the list filter's buffer limit and every exchange by a
timeout, so an upstream cannot make mcp-authz hold memory or wait without end.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import msgspec

from authz import listing
from authz.catalogue import Annotations, Catalogue, tools_of
from authz.engine import Engine
from authz.extproc import MAX_LIST_BYTES

log = logging.getLogger("mcp_authz")

PROTOCOL_VERSION = "2025-06-18"
FETCH_TIMEOUT_S = 15.0
# Most pages of one list fetched: an upstream handing out cursors without end is refused.
MAX_PAGES = 100
# Between failed fetches, doubling up to the longest wait.
RETRY_S = 1.0
MAX_RETRY_S = 30.0
# How often the policy in force is compared with the one the last fetch was made under.
RELOAD_POLL_S = 1.0

_ACCEPT = "application/json, text/event-stream"


class FetchError(Exception):
    """The upstream's list could not be fetched; the text says why (never a body)."""


async def _rpc(
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    message: dict[str, Any],
) -> tuple[dict[str, Any] | None, str | None]:
    """POST one JSON-RPC message; its response (``None`` for a notification) and the
    session id the upstream named."""
    async with http.post(url, json=message, headers=headers) as reply:
        if reply.status >= 300:
            raise FetchError(f"{message['method']}: HTTP {reply.status}")
        session = reply.headers.get("mcp-session-id")
        if "id" not in message:
            return None, session
        body = bytearray()
        async for chunk in reply.content.iter_any():
            body += chunk
            if len(body) > MAX_LIST_BYTES:
                raise FetchError(f"{message['method']}: response over {MAX_LIST_BYTES} bytes")
        media = listing.media_type(reply.headers.get("content-type", ""))
    if media == "text/event-stream":
        raws = [raw for lines in listing.events(bytes(body)) if (raw := listing.event_data(lines))]
    else:
        raws = [bytes(body)]
    for raw in raws:
        try:
            doc = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise FetchError(f"{message['method']}: response is not JSON") from None
        if isinstance(doc, dict) and doc.get("id") == message["id"]:
            if not isinstance(doc.get("result"), dict):
                raise FetchError(f"{message['method']}: answered without a result")
            return doc["result"], session
    raise FetchError(f"{message['method']}: no response")


async def fetch_tools(url: str) -> list[tuple[str, Annotations]]:
    """Every tool the MCP server at ``url`` lists (streamable HTTP, all pages)."""
    headers = {"accept": _ACCEPT}
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        hello = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "mcp-authz", "version": "1"},
            },
        }
        result, session = await _rpc(http, url, headers, hello)
        if result is None:
            raise FetchError("initialize: no result")
        version = result.get("protocolVersion")
        headers["mcp-protocol-version"] = version if isinstance(version, str) else PROTOCOL_VERSION
        if session:
            headers["mcp-session-id"] = session
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        await _rpc(http, url, headers, initialized)
        tools: list[tuple[str, Annotations]] = []
        cursor = None
        for page in range(1, MAX_PAGES + 1):
            params: dict[str, Any] = {"cursor": cursor} if cursor else {}
            ask = {"jsonrpc": "2.0", "id": page, "method": "tools/list", "params": params}
            result, _ = await _rpc(http, url, headers, ask)
            listed = tools_of(result)
            if result is None or listed is None:
                raise FetchError("tools/list: a result without its tools array")
            tools += listed
            cursor = result.get("nextCursor")
            if not cursor:
                break
        else:
            raise FetchError(f"tools/list: more than {MAX_PAGES} pages")
        if session:  # best effort: the upstream drops idle sessions anyway
            try:
                async with http.delete(url, headers=headers):
                    pass
            except aiohttp.ClientError:
                pass
        return tools


async def keep_catalogue(engine: Engine, url: str) -> None:
    """Fetch the upstream's list into ``engine`` until it succeeds, then again whenever
    the policy in force changes (a reload). Runs until cancelled."""
    wait = RETRY_S
    fetched_under = None
    while True:
        policy = engine.policy
        if policy is not fetched_under:
            try:
                tools = await fetch_tools(url)
            except Exception as exc:  # any fault: keep the old catalogue, try again later
                log.warning(
                    "cannot fetch the upstream's tool list: %s: %s", type(exc).__name__, exc
                )
                await asyncio.sleep(wait)
                wait = min(wait * 2, MAX_RETRY_S)
                continue
            engine.catalogue = Catalogue.fetched(tools)
            fetched_under, wait = policy, RETRY_S
            log.info("upstream tool list fetched: %d tools", len(engine.catalogue.tools))
        await asyncio.sleep(RELOAD_POLL_S)
