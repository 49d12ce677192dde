"""A scripted MCP upstream for the list filter tests: answers list requests in the form a
test asks for, including forms no well-behaved server sends.

    python tests/support/list_upstream.py --port PORT

The request header ``x-test-form`` picks how list responses come back: ``json`` (default),
``sse`` (an event stream with a priming event and a notification before the response),
``bad-json`` (not JSON), ``huge`` (a 1.5 MiB tools list), ``text`` (text/plain).
``tools/list`` is paginated over three pages (``nextCursor`` p2, p3); batches are
answered per element. ``tools/call`` of ``slow`` and a ``GET`` stream each send one event
at once and the rest only after ``POST /release`` (on this port, not through the
gateway), so a test can see an event arrive while the upstream still holds the stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from aiohttp import web

PAGES: dict[str | None, tuple[list[str], str | None]] = {
    None: (["containerize_app", "delete_app"], "p2"),
    "p2": (["start_dicom_export_job", "build_and_push_image_to_ecr"], "p3"),
    "p3": (["ecs_troubleshooting_tool", "ecs_resource_management"], None),
}
PROMPTS = ["deploy_checklist", "incident_review"]
RESOURCES = ["ecs://clusters/default", "file:///secret/patients.csv"]
TEMPLATES = ["ecs://clusters/{name}", "file:///secret/{name}"]


def tool(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "description": f"The {name} tool.",
        "inputSchema": {"type": "object", "properties": {"app_name": {"type": "string"}}},
    }


def list_result(method: str, params: dict[str, Any], form: str) -> dict[str, Any]:
    if method == "tools/list":
        if form == "huge":
            padding = "x" * 1000
            return {"tools": [{**tool(f"t{i}"), "description": padding} for i in range(1500)]}
        names, cursor = PAGES[params.get("cursor")]
        result: dict[str, Any] = {"tools": [tool(n) for n in names]}
        if cursor is not None:
            result["nextCursor"] = cursor
        return result
    if method == "prompts/list":
        return {"prompts": [{"name": n, "description": n} for n in PROMPTS]}
    if method == "resources/list":
        return {"resources": [{"uri": u, "name": u.rsplit("/", 1)[-1]} for u in RESOURCES]}
    return {"resourceTemplates": [{"uriTemplate": t, "name": t} for t in TEMPLATES]}


def answer(message: dict[str, Any], form: str) -> dict[str, Any]:
    method = message.get("method", "")
    params = message.get("params") or {}
    if method.endswith("/list"):
        result = list_result(method, params, form)
    elif method == "initialize":
        result = {
            "protocolVersion": "2025-11-25",
            "capabilities": {"tools": {}, "prompts": {}, "resources": {}},
            "serverInfo": {"name": "list-upstream", "version": "1"},
        }
    elif method == "tools/call":
        result = {"content": [{"type": "text", "text": f"called {params.get('name')}"}]}
    else:
        result = {}
    return {"jsonrpc": "2.0", "id": message.get("id"), "result": result}


def sse_event(payload: Any, event_id: str = "") -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: message\ndata: {json.dumps(payload)}\n\n".encode()


class Upstream:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def released(self, _: web.Request) -> web.Response:
        self.release.set()
        return web.Response(text="released\n")

    async def get_stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "hi"}}
        await response.write(sse_event(note))
        await self.release.wait()
        self.release.clear()
        await response.write(sse_event({**note, "params": {"data": "bye"}}))
        return response

    async def post(self, request: web.Request) -> web.StreamResponse:
        form = request.headers.get("x-test-form", "json")
        doc = json.loads(await request.read())
        messages = doc if isinstance(doc, list) else [doc]
        requests = [m for m in messages if "id" in m and "method" in m]
        if not requests:
            return web.Response(status=202)
        if any(m["method"] == "tools/call" and m["params"]["name"] == "slow" for m in requests):
            return await self.slow_call(request, requests[0])
        if not any(m["method"].endswith("/list") for m in requests):
            form = "json"  # the faulty forms are for list responses only
        replies = [answer(m, form) for m in requests]
        if form == "bad-json":
            truncated = b'{"jsonrpc": "2.0", "id": 1, "result": {"tools": ['
            return web.Response(body=truncated, content_type="application/json")
        if form == "text":
            return web.Response(text=json.dumps(replies[0]), content_type="text/plain")
        if form == "sse":
            note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "x"}}
            body = b"id: prime-1\ndata:\n\n" + sse_event(note)
            body += b"".join(sse_event(r, f"ev-{i}") for i, r in enumerate(replies))
            return web.Response(body=body, content_type="text/event-stream")
        payload = replies if isinstance(doc, list) else replies[0]
        return web.json_response(payload)

    async def slow_call(self, request: web.Request, call: dict[str, Any]) -> web.StreamResponse:
        """Progress at once; the result only after /release."""
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        token = call["params"].get("_meta", {}).get("progressToken", "p")
        progress = {
            "jsonrpc": "2.0",
            "method": "notifications/progress",
            "params": {"progressToken": token, "progress": 1, "total": 2},
        }
        await response.write(sse_event(progress))
        await self.release.wait()
        self.release.clear()
        await response.write(sse_event(answer(call, "sse")))
        return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    upstream = Upstream()
    app = web.Application()
    app.router.add_post("/mcp", upstream.post)
    app.router.add_get("/mcp", upstream.get_stream)
    app.router.add_post("/release", upstream.released)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
