"""Telling people about approval events: an audit line for each, a webhook notice when a
request opens.

The notice carries enough to decide where to look (grant, tool, argument names and their
digest, the commands to approve or reject), never an argument value.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from authz import audit
from authz.approvals import Approval

log = logging.getLogger("mcp_authz")

WEBHOOK_ATTEMPTS = 3
WEBHOOK_TIMEOUT_S = 2.0


def notice(approval: Approval) -> dict[str, Any]:
    """The webhook body."""
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
        audit.approval_event(event, approval)
        if event == "requested" and webhook_url:
            task = asyncio.get_running_loop().create_task(send_notice(webhook_url, approval))
            sending.add(task)
            task.add_done_callback(sending.discard)

    return on_event
