"""A real MCP server (the official SDK's low-level ``Server``) that implements tasks as
MCP 2025-11-25 specifies them, for the end-to-end tests of task ownership.

The SDK serves tools but not tasks, so this server adds them: a ``tools/call`` carrying
``params.task`` is answered at once with a ``CreateTaskResult`` (the tool runs and its
result is kept for ``tasks/result``); ``tasks/get``, ``tasks/result``, ``tasks/cancel``
and ``tasks/list`` (paged, two tasks a page) serve every task to anyone who names it, as
a server that trusts its gateway does. Sessions are kept (streamable HTTP, SSE replies).

    python tests/support/task_upstream.py --port 8000 --record PATH

``--record PATH`` appends one JSON line per request that reaches ``/mcp``: its method and
``taskId``, so tests can check what the gateway let through.
"""

from __future__ import annotations

import argparse
import json
import uuid
from datetime import UTC, datetime
from typing import IO, Any

import mcp_types as types
import uvicorn
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError
from mcp_types.jsonrpc import INVALID_PARAMS
from pydantic import Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TASKS: dict[str, dict[str, Any]] = {}
RESULTS: dict[str, dict[str, Any]] = {}
PAGE = 2


def _text(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": False}


async def list_tools(
    ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
) -> types.ListToolsResult:
    schema = {"type": "object", "properties": {"study": {"type": "string"}}}
    return types.ListToolsResult(
        tools=[types.Tool(name="export_study", description="Export a study", inputSchema=schema)]
    )


def run_tool(params: dict[str, Any]) -> dict[str, Any]:
    study = (params.get("arguments") or {}).get("study", "?")
    return _text(f"exported study {study}")


async def call_tool(
    ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text="done at once")])


async def tasks_middleware(
    ctx: ServerRequestContext[Any, Any], call_next: CallNext
) -> HandlerResult:
    """A task-augmented tools/call: create the task, run the tool, answer the handle."""
    params = dict(ctx.params or {})
    if ctx.method != "tools/call" or not isinstance(params.get("task"), dict):
        return await call_next(ctx)
    now = datetime.now(UTC).isoformat()
    task_id = str(uuid.uuid4())
    ttl = params["task"].get("ttl", 60_000)
    TASKS[task_id] = {
        "taskId": task_id,
        "status": "completed",
        "createdAt": now,
        "lastUpdatedAt": now,
        "ttl": ttl,
        "pollInterval": 500,
    }
    RESULTS[task_id] = run_tool(params)
    return {"task": {**TASKS[task_id], "status": "working"}}


class TaskParams(types.RequestParams):
    task_id: str = Field(alias="taskId")


class ListParams(types.RequestParams):
    cursor: str | None = None


def _task(params: TaskParams) -> dict[str, Any]:
    task = TASKS.get(params.task_id)
    if task is None:
        raise MCPError(code=INVALID_PARAMS, message="no such task")
    return task


async def tasks_get(ctx: ServerRequestContext[Any, Any], params: TaskParams) -> HandlerResult:
    return dict(_task(params))


async def tasks_result(ctx: ServerRequestContext[Any, Any], params: TaskParams) -> HandlerResult:
    _task(params)
    return RESULTS[params.task_id]


async def tasks_cancel(ctx: ServerRequestContext[Any, Any], params: TaskParams) -> HandlerResult:
    task = _task(params)
    task["status"] = "cancelled"
    return dict(task)


async def tasks_list(ctx: ServerRequestContext[Any, Any], params: ListParams) -> HandlerResult:
    ids = list(TASKS)
    start = int(params.cursor or 0)
    page: dict[str, Any] = {"tasks": [TASKS[i] for i in ids[start : start + PAGE]]}
    if start + PAGE < len(ids):
        page["nextCursor"] = str(start + PAGE)
    return page


def build() -> Server[Any]:
    server: Server[Any] = Server("task-upstream", on_list_tools=list_tools, on_call_tool=call_tool)
    server.middleware.append(tasks_middleware)
    server.add_request_handler("tasks/get", TaskParams, tasks_get)
    server.add_request_handler("tasks/result", TaskParams, tasks_result)
    server.add_request_handler("tasks/cancel", TaskParams, tasks_cancel)
    server.add_request_handler("tasks/list", ListParams, tasks_list)
    return server


class Record:
    """Pure ASGI middleware: log each /mcp request's method and taskId, replay its body."""

    def __init__(self, app: ASGIApp, sink: IO[str]) -> None:
        self.app = app
        self.sink = sink

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/mcp"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            doc = {}
        params = doc.get("params") if isinstance(doc, dict) else None
        params = params if isinstance(params, dict) else {}
        entry = {"method": doc.get("method") if isinstance(doc, dict) else None}
        entry["taskId"] = params.get("taskId")
        self.sink.write(json.dumps(entry) + "\n")
        self.sink.flush()
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--record", metavar="PATH")
    parser.add_argument("--json", action="store_true", help="JSON replies instead of SSE")
    args = parser.parse_args()
    app: ASGIApp = build().streamable_http_app(json_response=args.json, host="127.0.0.1")
    if args.record:
        app = Record(app, open(args.record, "a", encoding="utf-8"))  # noqa: SIM115
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
