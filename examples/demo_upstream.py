"""Demo MCP upstream: a fake ECS / HealthImaging MCP server over streamable HTTP.

Stands in for the real awslabs ECS MCP server when it is not installed, for local
`make run` and for the end-to-end tests. Tools only return plausible text; nothing
calls AWS. Some tools carry MCP annotations (read-only, destructive ...), as a real server's
may, for the risk report of `mcp-authz check-policy --against`; the others state none.
Built with the official `mcp` SDK (`MCPServer`), served by uvicorn at `/mcp`.

    python examples/demo_upstream.py --host 127.0.0.1 --port 8000 [--record PATH] [--stateless]

`--record PATH` appends one JSON line per HTTP request that reaches `/mcp`:
`{"http_method", "jsonrpc": [{"method", "tool", "id"}, ...] | null, "grant", "headers"}`,
so tests can check what the gateway let through and which headers it forwarded.
"""

from __future__ import annotations

import argparse
import json
from typing import IO, Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations
from starlette.types import ASGIApp, Message, Receive, Scope, Send

GRANT_HEADER = "x-mcp-authz-grant"

mcp = MCPServer("demo-upstream", instructions="Demo ECS / HealthImaging tools (no AWS calls).")


@mcp.tool(
    annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False, openWorldHint=False)
)
def containerize_app(app_path: str, port: int = 8080) -> str:
    """Generate a Dockerfile and ECS task definition for the app at `app_path`."""
    return f"Containerized {app_path}: Dockerfile and task definition created, port {port}."


@mcp.tool(annotations=ToolAnnotations(destructiveHint=True))
def delete_app(app_name: str) -> str:
    """Delete the ECS service, task definition and load balancer of `app_name`."""
    return f"Deleted ECS service, task definition and load balancer for {app_name}."


@mcp.tool()
def ecs_resource_management(action: str, resource_type: str) -> str:
    """Run `action` (list, describe, create, update, delete) on an ECS resource type."""
    return f"ecs {action} {resource_type}: 2 {resource_type}(s) matched (demo data)."


@mcp.tool(annotations=ToolAnnotations(readOnlyHint=True))
def ecs_troubleshooting_tool(app_name: str) -> str:
    """Diagnose deployment problems of `app_name`."""
    return f"Troubleshooting {app_name}: service stable, 2/2 tasks running, no failed events."


@mcp.tool()
def start_dicom_export_job(datastoreId: str, outputS3Uri: str, studyCount: int = 1) -> str:
    """Start a HealthImaging DICOM export job from a datastore to S3."""
    job = "demo-job-0001"
    return f"Export job {job} started: {studyCount} study(ies) from {datastoreId} to {outputS3Uri}."


@mcp.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=True))
def list_datastores() -> str:
    """List HealthImaging datastores."""
    return "Datastores: ds-0001 (ACTIVE, demo-imaging), ds-0002 (ACTIVE, demo-research)."


@mcp.resource("ecs://clusters/default", mime_type="text/plain")
def default_cluster() -> str:
    """Summary of the default ECS cluster."""
    return "cluster default: ACTIVE, 3 services, 7 running tasks."


@mcp.prompt()
def deploy_checklist(app_name: str) -> str:
    """A checklist prompt for deploying an app to ECS."""
    return f"Check image, task definition, service and load balancer before deploying {app_name}."


def summarize(body: bytes) -> list[dict[str, Any]] | None:
    """Method, tool name and id of every JSON-RPC message in a body; None if not JSON-RPC."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    messages = parsed if isinstance(parsed, list) else [parsed]
    if not messages or not all(isinstance(m, dict) for m in messages):
        return None
    out = []
    for msg in messages:
        params = msg.get("params")
        is_call = msg.get("method") == "tools/call" and isinstance(params, dict)
        tool = params.get("name") if is_call else None
        out.append({"method": msg.get("method"), "tool": tool, "id": msg.get("id")})
    return out


class RecordMiddleware:
    """Pure ASGI middleware: log each /mcp request as a JSON line, then replay its body."""

    def __init__(self, app: ASGIApp, sink: IO[str]) -> None:
        self.app = app
        self.sink = sink

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/mcp"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        first: Message | None = None
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away before the body ended
                first = message
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        record = {
            "http_method": scope["method"],
            "jsonrpc": summarize(body) if body else None,
            "grant": headers.get(GRANT_HEADER),
            "headers": sorted(headers),
        }
        self.sink.write(json.dumps(record) + "\n")
        self.sink.flush()

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first or {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for http.disconnect, as streaming needs

        await self.app(scope, replay, send)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--record", metavar="PATH", help="append one JSON line per /mcp request")
    parser.add_argument("--stateless", action="store_true", help="no Mcp-Session-Id sessions")
    args = parser.parse_args(argv)

    app: ASGIApp = mcp.streamable_http_app(stateless_http=args.stateless, host=args.host)
    if args.record:
        app = RecordMiddleware(app, open(args.record, "a", encoding="utf-8"))  # noqa: SIM115
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
