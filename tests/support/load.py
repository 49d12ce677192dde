"""Steady, bounded load through Envoy for the restart and soak tests (loopback only).

Requests go out at a fixed rate (open loop: a slow answer does not slow the schedule, up
to ``concurrency`` in flight), for a fixed duration, each of a kind with the replies the
test accepts for it. Anything else, a transport error included, is a failure.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from devstack.stack import Proc

PROTOCOL_VERSION = "2025-11-25"


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix, and the HTTP statuses that count as correct."""

    name: str
    body: bytes
    expected: frozenset[int]


@dataclass
class Tally:
    """What a load run saw."""

    sent: int = 0
    replies: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, kind: str, status: int) -> int:
        return self.replies[(kind, status)]

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def p99_ms(self) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[int(len(ordered) * 0.99)] if ordered else 0.0


def tool_call(name: str, id_: int, **arguments: Any) -> bytes:
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": id_,
            "method": "tools/call",
            "params": {"name": name, "arguments": arguments},
        }
    ).encode()


def client_headers(token: str) -> dict[str, str]:
    """What every request carries (for an upstream started with ``--stateless``)."""
    return {
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "authorization": f"Bearer {token}",
        "mcp-protocol-version": PROTOCOL_VERSION,
    }


def with_check_timeout(config: Path, timeout: str) -> Path:
    """An Envoy config (from ``envoy_config``) with another ext_authz timeout.

    Load tests on this shared 2-core machine measure errors, counts and memory under a
    steady load, not the 250 ms latency budget of the shipped config (latency is recorded).
    """
    doc = yaml.safe_load(config.read_text())
    manager = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    for http_filter in manager["typed_config"]["http_filters"]:
        if http_filter["name"] == "envoy.filters.http.ext_authz":
            http_filter["typed_config"]["grpc_service"]["timeout"] = timeout
    config.write_text(yaml.safe_dump(doc))
    return config


def stateless(proc: Proc) -> Proc:
    """The demo upstream without sessions: requests of a load run do not queue behind one
    session's stream, and each allowed call runs on its own."""
    proc.cmd = [*proc.cmd, "--stateless"]
    return proc


async def steady_load(
    url: str,
    headers: dict[str, str],
    mix: Sequence[Kind],
    *,
    rate: float,
    seconds: float,
    concurrency: int = 16,
    stop_when: Callable[[], bool] | None = None,
) -> Tally:
    """Send ``mix`` round-robin at ``rate`` requests/s for ``seconds`` (or until
    ``stop_when()`` holds, if sooner); tally the replies."""
    tally = Tally()
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.monotonic()

    async def one(client: httpx.AsyncClient, kind: Kind) -> None:
        sent_at = time.monotonic()
        try:
            resp = await client.post(url, content=kind.body, headers=headers)
        except httpx.HTTPError as exc:
            tally.failures[f"{kind.name}: {type(exc).__name__}"] += 1
            return
        finally:
            slots.release()
        tally.latencies_ms.append((time.monotonic() - sent_at) * 1000)
        tally.replies[(kind.name, resp.status_code)] += 1
        if resp.status_code not in kind.expected:
            tally.failures[f"{kind.name}: HTTP {resp.status_code}"] += 1

    async with httpx.AsyncClient(timeout=10, limits=limits) as client:
        tasks: set[asyncio.Task[None]] = set()
        i = 0
        while (now := time.monotonic() - started) < seconds:
            due = i / rate
            if due > now:
                await asyncio.sleep(due - now)
            if stop_when is not None and stop_when():
                break
            await slots.acquire()
            task = asyncio.create_task(one(client, mix[i % len(mix)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            tally.sent += 1
            i += 1
        await asyncio.gather(*tasks)
    tally.seconds = time.monotonic() - started
    return tally
