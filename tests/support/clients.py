"""Talk to an MCP endpoint over streamable HTTP with the two real client stacks.

The end-to-end tests use these to drive the gateway the way real agents do: with the
official `mcp` SDK client (`mcp.Client`) and with the `fastmcp` client. Every helper opens
a fresh connection, sends the caller's extra HTTP headers (e.g. `Authorization`) on every
request, closes the connection cleanly and gives up after `timeout` seconds.

A JSON-RPC error from the server, or from a gateway answering in its place, surfaces as
`McpCallError` with the error's message, code and data; the client's own exception is
kept as `__cause__`. A tool result flagged `isError` also raises `McpCallError` (code None).

`mode` is passed to both clients: "auto" (their default) probes `server/discover` and
speaks the stateless 2026-07-28 protocol if the server does; "legacy" forces the
`initialize` handshake and an `Mcp-Session-Id` session (protocol 2025-11-25).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import fastmcp
import httpx2
from fastmcp.client.transports import StreamableHttpTransport
from fastmcp.exceptions import ToolError
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import TextContent

DEFAULT_TIMEOUT = 10.0


class McpCallError(Exception):
    """An MCP request failed with a JSON-RPC error (or a tool reported `isError`)."""

    def __init__(self, message: str, code: int | None, data: Any = None) -> None:
        super().__init__(message if code is None else f"[{code}] {message}")
        self.message = message
        self.code = code
        self.data = data


def _find_error(exc: BaseException) -> MCPError | ToolError | None:
    """The first MCPError/ToolError in `exc`, looking inside (nested) exception groups."""
    if isinstance(exc, MCPError | ToolError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _find_error(inner)) is not None:
                return found
    return None


@contextmanager
def _surface_errors() -> Iterator[None]:
    # The mcp SDK's task groups re-raise an error that leaves `async with Client(...)`
    # wrapped in (nested) ExceptionGroups; unwrap it so callers see one McpCallError.
    try:
        yield
    except McpCallError:
        raise
    except Exception as exc:
        found = _find_error(exc)
        if isinstance(found, MCPError):
            raise McpCallError(found.message, found.code, found.data) from found
        if isinstance(found, ToolError):
            raise McpCallError(str(found), None) from found
        raise


def _checked_text(content: Sequence[object], is_error: bool) -> str:
    text = "\n".join(block.text for block in content if isinstance(block, TextContent))
    if is_error:
        raise McpCallError(text, None)
    return text


@asynccontextmanager
async def _sdk_client(
    url: str, headers: dict[str, str], mode: str, timeout: float
) -> AsyncIterator[Client]:
    with anyio.fail_after(timeout), _surface_errors():
        async with (
            httpx2.AsyncClient(headers=headers, timeout=timeout) as http,
            Client(
                streamable_http_client(url, http_client=http),
                mode=mode,
                read_timeout_seconds=timeout,
            ) as client,
        ):
            yield client


@asynccontextmanager
async def _fastmcp_client(
    url: str, headers: dict[str, str], mode: str, timeout: float
) -> AsyncIterator[fastmcp.Client[StreamableHttpTransport]]:
    transport = StreamableHttpTransport(url, headers=headers)
    with anyio.fail_after(timeout), _surface_errors():
        async with fastmcp.Client(
            transport, timeout=timeout, init_timeout=timeout, mode=mode
        ) as client:
            yield client


async def sdk_list_tools(
    url: str, headers: dict[str, str], *, mode: str = "auto", timeout: float = DEFAULT_TIMEOUT
) -> list[str]:
    """Names of the tools the endpoint lists, via the official `mcp` SDK client."""
    async with _sdk_client(url, headers, mode, timeout) as client:
        result = await client.list_tools()
    return [tool.name for tool in result.tools]


async def sdk_call_tool(
    url: str,
    tool: str,
    arguments: dict[str, Any],
    headers: dict[str, str],
    *,
    mode: str = "auto",
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Text content of a `tools/call` result, via the official `mcp` SDK client."""
    async with _sdk_client(url, headers, mode, timeout) as client:
        result = await client.call_tool(tool, arguments)
    return _checked_text(result.content, result.is_error)


async def fastmcp_list_tools(
    url: str, headers: dict[str, str], *, mode: str = "auto", timeout: float = DEFAULT_TIMEOUT
) -> list[str]:
    """Names of the tools the endpoint lists, via `fastmcp.Client`."""
    async with _fastmcp_client(url, headers, mode, timeout) as client:
        tools = await client.list_tools()
    return [tool.name for tool in tools]


async def fastmcp_call_tool(
    url: str,
    tool: str,
    arguments: dict[str, Any],
    headers: dict[str, str],
    *,
    mode: str = "auto",
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Text content of a `tools/call` result, via `fastmcp.Client`."""
    async with _fastmcp_client(url, headers, mode, timeout) as client:
        result = await client.call_tool(tool, arguments, raise_on_error=False)
    return _checked_text(result.content, result.is_error)
