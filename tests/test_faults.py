"""Store and service faults under load, with real processes on loopback.

Every test runs the real chain: an MCP client (httpx), Envoy, `mcp-authz`, a real
redis-server and the demo MCP upstream, which records every request that reaches it, so
"nothing got through" is checked where it matters. Loads are bounded in count and time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.redis_server import RedisServer, running_redis
from devstack.stack import Stack, mcp_stack, on_transport
from tests.support.reliability import record

pytestmark = pytest.mark.e2e

MAX_PER_GRANT = 15
POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "start_dicom_export_job": {
            "limits": [
                {"counter": "exports", "window": "minute", "max": MAX_PER_GRANT, "scope": "grant"}
            ]
        },
        "containerize_app": {"action": "allow"},
    },
}
HEADERS = {
    "content-type": "application/json",
    "accept": "application/json, text/event-stream",
    "mcp-protocol-version": "2025-11-25",
}
REASON_HEADER = "x-mcp-authz-reason"
FAIL_OPEN_HEADER = "x-mcp-authz-fail-open"


def grant_id(token: str) -> str:
    return "b-" + hashlib.sha256(token.encode()).hexdigest()[:24]


def export_call(id_: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": "start_dicom_export_job", "arguments": {"datastoreId": "ds-1"}},
    }


def containerize_call(id_: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": "containerize_app", "arguments": {"app_path": "/srv/app"}},
    }


def tools_list(id_: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/list"}


@dataclass(frozen=True)
class Answer:
    """What the client saw for one request."""

    kind: str  # "export" (needs a counter), "containerize" (no counter), "list"
    token: str
    status: int
    reason: str | None  # error.data.reason when mcp-authz denied, else None
    message: str
    from_authz: bool  # carries mcp-authz's reason header (not Envoy's own 503)
    fail_open: bool
    seconds: float

    @property
    def allowed(self) -> bool:
        """Passed mcp-authz and Envoy (the demo upstream may still refuse a call made
        outside an MCP session with 400; it was let through all the same)."""
        return not self.from_authz and self.status != 503


async def send(client: httpx.AsyncClient, url: str, kind: str, token: str, id_: int) -> Answer:
    body = {"export": export_call, "containerize": containerize_call, "list": tools_list}[kind]
    started = time.monotonic()
    resp = await client.post(
        url,
        content=json.dumps(body(id_)),
        headers={**HEADERS, "authorization": f"Bearer {token}"},
    )
    seconds = time.monotonic() - started
    reason, message = None, ""
    if REASON_HEADER in resp.headers:
        error = resp.json()["error"]
        reason, message = error["data"]["reason"], error["message"]
    return Answer(
        kind=kind,
        token=token,
        status=resp.status_code,
        reason=reason,
        message=message,
        from_authz=REASON_HEADER in resp.headers,
        fail_open=FAIL_OPEN_HEADER in resp.headers,
        seconds=seconds,
    )


def recorded_calls(stack: Stack, tool: str) -> Counter[str]:
    """Calls of ``tool`` that reached the upstream, per grant."""
    return Counter(
        r["grant"]
        for r in stack.recorded()
        for m in r["jsonrpc"] or []
        if m.get("method") == "tools/call" and m.get("tool") == tool
    )


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY))
    return path


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis that, like a production one with AOF, keeps every count it acknowledged
    across a crash, so exactness can be checked across the outage."""
    with running_redis(tmp_path, persistent=True) as server:
        yield server


class Load:
    """Workers sending a fixed mix of requests until told to stop, tagging each answer
    with the phase it was sent and answered in."""

    def __init__(self, url: str, tokens: list[str], workers: int = 4) -> None:
        self.url = url
        self.tokens = tokens
        self.workers = workers
        self.phase = "before"
        self.answers: list[tuple[str, Answer]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self._client = httpx.AsyncClient(timeout=10)
        self._tasks = [asyncio.create_task(self._worker(n)) for n in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._client.aclose()

    async def _worker(self, n: int) -> None:
        kinds = ("export", "export", "containerize", "list")
        i = 0
        while not self._stop.is_set() and i < 2_000:  # bounded even if never stopped
            kind = kinds[i % len(kinds)]
            token = self.tokens[(n + i) % len(self.tokens)]
            phase = self.phase
            answer = await send(self._client, self.url, kind, token, n * 10_000 + i)
            # A request sent during the outage but answered after Redis was started again
            # may rightly be allowed: it belongs to neither phase.
            self.answers.append((phase if self.phase == phase else "transition", answer))
            i += 1
            await asyncio.sleep(0.01)

    def during(self, phase: str) -> list[Answer]:
        return [a for p, a in self.answers if p == phase]


async def test_redis_killed_mid_load_fails_closed_and_recovers(
    tmp_path: Path, policy_file: Path, persistent_redis: RedisServer, transport: str
) -> None:
    tokens = [f"fault-{n}" for n in range(6)]
    with mcp_stack(
        tmp_path,
        policy_file,
        ["--redis", persistent_redis.url],
        "--store-timeout-ms",
        "100",
        transport=transport,
    ) as stack:
        async with httpx.AsyncClient(timeout=10) as client, Load(stack.url, tokens) as load:
            await asyncio.sleep(1.0)
            persistent_redis.stop()  # SIGKILL, mid-load; returns once the process is gone
            load.phase = "down"
            await asyncio.sleep(1.5)
            load.phase = "restart"
            persistent_redis.start()  # same port; the append-only file restores the counts
            back = time.monotonic()
            recovered_after = None
            for n in range(60):
                probe = await send(client, stack.url, "export", "probe", 900_000 + n)
                load.answers.append(("probe", probe))
                if probe.allowed:
                    recovered_after = time.monotonic() - back
                    break
                await asyncio.sleep(0.02)
            load.phase = "after"
            await asyncio.sleep(1.0)
        alive = stack.authz.popen is not None and stack.authz.popen.poll() is None
        async with httpx.AsyncClient(timeout=10) as client:
            # Spend what is left of every grant's budget: the total allowed is then exact.
            for token in tokens:
                for n in range(MAX_PER_GRANT + 2):
                    answer = await send(client, stack.url, "export", token, 800_000 + n)
                    load.answers.append(("drain", answer))
                    if answer.status == 429:
                        break
        exports = recorded_calls(stack, "start_dicom_export_job")

    down = load.during("down")
    assert alive, "mcp-authz exited during the Redis outage"
    assert recovered_after is not None and recovered_after < 1.0, recovered_after
    # While Redis was down: every check that needs a counter is a clear 503 from mcp-authz,
    # the others kept their normal answer.
    down_exports = [a for a in down if a.kind == "export"]
    assert down_exports
    for answer in down_exports:
        assert (answer.status, answer.reason) == (503, "store_unavailable"), answer
        assert "rate-limit store unavailable" in answer.message
    assert all(a.allowed for a in down if a.kind != "export"), down
    # No grant was ever allowed over its limit, across the outage and the restart, and
    # what the clients were allowed is exactly what reached the upstream.
    every = [a for _, a in load.answers]
    allowed = Counter(grant_id(a.token) for a in every if a.kind == "export" and a.allowed)
    assert max(allowed.values()) <= MAX_PER_GRANT
    assert allowed == exports
    drained = [allowed[grant_id(t)] for t in tokens]
    assert {a.status for a in every if a.kind == "export" and not a.allowed} <= {429, 503}
    record(
        on_transport("Store fault: Redis killed mid-load", transport),
        "Four clients send a mix of rate-limited calls, unlimited calls and tools/list "
        "through Envoy; Redis (append-only, fsync always) is killed with SIGKILL, left "
        "down for 1.5 s and restarted on the same port. Afterwards every grant's budget is "
        f"spent to its limit of {MAX_PER_GRANT}.",
        {
            "requests": len(every),
            "rate-limited calls during the outage, all 503 store_unavailable": len(down_exports),
            "unlimited calls and listings during the outage, all answered normally": len(
                [a for a in down if a.kind != "export"]
            ),
            "mcp-authz crashed": "no" if alive else "yes",
            "recovered after Redis came back (s)": round(recovered_after, 3),
            "grants allowed over their limit": sum(v > MAX_PER_GRANT for v in allowed.values()),
            "allowed calls vs calls that reached the upstream": f"{sum(allowed.values())} / "
            f"{sum(exports.values())}",
            "budget units lost to calls that failed mid-crash": sum(
                MAX_PER_GRANT - n for n in drained
            ),
        },
    )


async def test_slow_redis_answers_within_the_store_timeout(
    tmp_path: Path, policy_file: Path, redis_server: RedisServer, transport: str
) -> None:
    """CLIENT PAUSE and DEBUG SLEEP: checks needing a counter are refused in about the
    store timeout, by mcp-authz itself (its reason header), well inside Envoy's 250 ms."""
    timeout_ms = 50
    with mcp_stack(
        tmp_path,
        policy_file,
        ["--redis", redis_server.url],
        "--store-timeout-ms",
        str(timeout_ms),
        transport=transport,
    ) as stack:
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await send(client, stack.url, "export", "slow", 1)).allowed
            answers: dict[str, list[Answer]] = {}
            with redis_server.client() as admin:
                admin.execute_command("CLIENT PAUSE", 2000, "ALL")
                answers["CLIENT PAUSE"] = [
                    await send(client, stack.url, kind, "slow", n)
                    for n, kind in enumerate(["export", "list"] * 5)
                ]
                admin.execute_command("CLIENT UNPAUSE")
            assert (await send(client, stack.url, "export", "slow", 2)).allowed

            sleeper = threading.Thread(
                target=lambda: redis_server.client(timeout=10).execute_command("DEBUG SLEEP", 2)
            )
            sleeper.start()
            await asyncio.sleep(0.1)  # let DEBUG SLEEP reach the server first
            answers["DEBUG SLEEP"] = [
                await send(client, stack.url, kind, "slow", n)
                for n, kind in enumerate(["export", "list"] * 5)
            ]
            await asyncio.to_thread(sleeper.join, 10)
            assert (await send(client, stack.url, "export", "slow", 3)).allowed
        latencies = _audit_latencies_ms(stack, "store_unavailable")

    for fault, seen in answers.items():
        for answer in seen:
            if answer.kind == "export":
                assert answer.from_authz, f"{fault}: Envoy answered, not mcp-authz"
                assert (answer.status, answer.reason) == (503, "store_unavailable"), answer
            else:
                assert answer.allowed, f"{fault}: a listing needs no counter"
    assert len(latencies) == 10
    # Within the store timeout plus a margin for a loaded machine, far inside Envoy's
    # 250 ms ext_authz timeout.
    assert max(latencies) < timeout_ms + 150, latencies
    record(
        on_transport("Store fault: Redis slow (CLIENT PAUSE, DEBUG SLEEP)", transport),
        f"mcp-authz with --store-timeout-ms {timeout_ms} behind Envoy (ext_authz timeout "
        "250 ms) while Redis is paused for 2 s, then while DEBUG SLEEP blocks it for 2 s.",
        {
            "rate-limited calls during the stalls, all 503 store_unavailable": 10,
            "listings during the stalls, all answered normally": 10,
            "check latency, median (ms, mcp-authz audit log)": round(
                statistics.median(latencies), 1
            ),
            "check latency, max (ms)": round(max(latencies), 1),
            "client round trip through Envoy, max (ms)": round(
                max(a.seconds for seen in answers.values() for a in seen) * 1000, 1
            ),
        },
    )


def _audit_latencies_ms(stack: Stack, reason: str) -> list[float]:
    latencies = []
    for line in stack.authz.output().splitlines():
        if line.startswith("{") and f'"reason":"{reason}"' in line:
            entry = json.loads(line)
            if "latency_ms" in entry:
                latencies.append(float(entry["latency_ms"]))
    return latencies


async def test_fail_open_allows_and_says_so(
    tmp_path: Path, policy_file: Path, redis_server: RedisServer, transport: str
) -> None:
    with mcp_stack(
        tmp_path, policy_file, ["--redis", redis_server.url], "--fail-open", transport=transport
    ) as stack:
        redis_server.stop()
        async with httpx.AsyncClient(timeout=10) as client:
            opened = [await send(client, stack.url, "export", "open", n) for n in range(3)]
            normal = await send(client, stack.url, "containerize", "open", 9)
        records = stack.recorded()
        audit = [json.loads(x) for x in stack.authz.output().splitlines() if x.startswith("{")]

    assert all(a.allowed and a.fail_open for a in opened), opened
    assert normal.allowed and not normal.fail_open
    reached = [
        r
        for r in records
        if any(m.get("tool") == "start_dicom_export_job" for m in r["jsonrpc"] or [])
    ]
    assert len(reached) == 3
    assert all(FAIL_OPEN_HEADER in r["headers"] for r in reached)
    flagged = [e for e in audit if e.get("fail_open") is True]
    assert len(flagged) == 3
    assert {e["tool"] for e in flagged} == {"start_dicom_export_job"}
    record(
        on_transport("Store fault: --fail-open", transport),
        "The operator's opt-out: Redis down, rate-limited calls are allowed and say so.",
        {
            "calls allowed while Redis was down": len(opened),
            f"carrying {FAIL_OPEN_HEADER} (client and upstream)": len(reached),
            "audit lines with fail_open": len(flagged),
        },
    )


async def test_authz_down_under_load_fails_closed(
    tmp_path: Path, policy_file: Path, redis_server: RedisServer, transport: str
) -> None:
    """mcp-authz killed mid-load: Envoy answers 503 to every MCP request, of every kind,
    and nothing more reaches the upstream."""
    with mcp_stack(
        tmp_path, policy_file, ["--redis", redis_server.url], transport=transport
    ) as stack:
        async with Load(stack.url, ["down-1", "down-2"]) as load:
            await asyncio.sleep(0.7)
            assert stack.authz.popen is not None
            stack.authz.popen.kill()
            stack.authz.popen.wait()
            await asyncio.sleep(0.3)  # requests already past ext_authz finish
            reached_before = len(stack.recorded())
            load.phase = "down"
            await asyncio.sleep(1.0)
        async with httpx.AsyncClient(timeout=10) as client:
            others = [
                await client.request(
                    method, stack.url, headers={**HEADERS, "authorization": "Bearer x"}
                )
                for method in ("GET", "DELETE")
            ]
        reached_after = len(stack.recorded())

    down = load.during("down")
    assert len(down) > 20
    assert {a.status for a in down} == {503}
    assert {r.status_code for r in others} == {503}
    assert reached_after == reached_before
    record(
        on_transport("Service fault: mcp-authz down", transport),
        "mcp-authz killed with SIGKILL under load; Envoy (failure_mode_allow: false) must "
        "answer every MCP request itself.",
        {
            "requests while mcp-authz was down": len(down) + len(others),
            "answered 503": sum(a.status == 503 for a in down)
            + sum(r.status_code == 503 for r in others),
            "requests that reached the upstream": reached_after - reached_before,
        },
    )
