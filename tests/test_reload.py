"""Hot reload in process: a watched file, real signals, the memory store.

The end-to-end versions (the real service process behind Envoy) are in
``test_policy_e2e.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from authz.decision import Decision, Reason
from authz.engine import Engine
from authz.mcp import HttpRequest
from authz.policy import Policy, load_policy
from authz.reload import FAILURE, SUCCESS, watch_policy
from authz.store import Charge, Outcome, open_store
from authz.store.memory import MemoryStore

INTERVAL = 0.02
TOKEN = "tok-reload"


def version(reason: str, counter: str = "c", max_: int = 3) -> dict[str, Any]:
    return {
        "version": "1",
        "default": "deny",
        "tools": {
            "probe": {"action": "deny", "reason": reason},
            "counted": {"limits": [{"counter": counter, "window": "minute", "max": max_}]},
        },
    }


BROKEN = '{"version": "1", "default": "deny", "tools": {"probe": {"reason": "BROKEN", "x": 1}}}'


def write(path: Path, content: str | dict[str, Any]) -> None:
    """Replace the file the way editors and tools do: a new file renamed over the old."""
    text = content if isinstance(content, str) else json.dumps(content)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def request(tool: str) -> HttpRequest:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool}}
    return HttpRequest(
        method="POST",
        headers={"content-type": "application/json", "authorization": f"Bearer {TOKEN}"},
        body=json.dumps(body).encode(),
    )


class Results:
    """The watcher's callback: every (result, policy) it reported."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Policy | None]] = []

    def __call__(self, result: str, policy: Policy | None) -> None:
        self.seen.append((result, policy))

    def kinds(self) -> list[str]:
        return [result for result, _ in self.seen]


async def until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll for a condition; the bound only stops a hung test, it is not what is tested."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@asynccontextmanager
async def watching(
    path: Path, engine: Engine, results: Results, **options: Any
) -> AsyncIterator[None]:
    task = asyncio.create_task(watch_policy(path, engine, results, **options))
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.json"
    write(path, version("v0"))
    return path


async def reason_of(engine: Engine, tool: str = "probe") -> str:
    return (await engine.check(request(tool))).decision.message


async def test_a_changed_file_is_validated_swapped_and_reported(policy_file: Path) -> None:
    engine = Engine(load_policy(policy_file), open_store("memory://"))
    results = Results()
    async with watching(policy_file, engine, results, interval=INTERVAL):
        write(policy_file, version("v1"))
        await until(lambda: results.seen != [])
        assert results.kinds() == [SUCCESS]
        assert results.seen[0][1] is engine.policy
        assert (await reason_of(engine)).endswith("denied: v1")
    assert engine.policy.digest == load_policy(policy_file).digest


async def test_a_broken_file_keeps_the_old_policy_and_is_reported_once(
    policy_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = Engine(load_policy(policy_file), open_store("memory://"))
    serving = engine.policy
    results = Results()
    async with watching(policy_file, engine, results, interval=INTERVAL):
        write(policy_file, BROKEN)
        await until(lambda: results.seen != [])
        assert results.seen == [(FAILURE, None)]
        assert engine.policy is serving
        assert (await reason_of(engine)).endswith("denied: v0")
        # The same broken content is not reported again on every poll.
        polls = 10
        await asyncio.sleep(polls * INTERVAL)
        assert results.kinds() == [FAILURE]
        write(policy_file, version("v2"))
        await until(lambda: len(results.seen) == 2)
        assert results.kinds() == [FAILURE, SUCCESS]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "keeps serving" in errors[0]
    assert "tools.probe: unknown field(s) ('x' was unexpected)" in errors[0]


async def test_a_missing_file_is_a_failure_too(policy_file: Path) -> None:
    engine = Engine(load_policy(policy_file), open_store("memory://"))
    results = Results()
    async with watching(policy_file, engine, results, interval=INTERVAL):
        policy_file.unlink()
        await until(lambda: results.seen != [])
        assert results.kinds() == [FAILURE]
        write(policy_file, version("back"))
        await until(lambda: len(results.seen) == 2)
    assert (await reason_of(engine)).endswith("denied: back")


async def test_kubernetes_configmap_symlink_swap(tmp_path: Path) -> None:
    """A ConfigMap volume: policy.json -> ..data/policy.json, ..data -> ..<timestamp>/."""
    mount = tmp_path / "mount"
    first = mount / "..2026_01_01_00_00_00.1"
    first.mkdir(parents=True)
    (first / "policy.json").write_text(json.dumps(version("configmap-1")))
    (mount / "..data").symlink_to(first.name)
    (mount / "policy.json").symlink_to("..data/policy.json")
    path = mount / "policy.json"
    engine = Engine(load_policy(path), open_store("memory://"))
    results = Results()
    async with watching(path, engine, results, interval=INTERVAL):
        second = mount / "..2026_01_01_00_01_00.2"
        second.mkdir()
        (second / "policy.json").write_text(json.dumps(version("configmap-2")))
        (mount / "..data_tmp").symlink_to(second.name)
        os.replace(mount / "..data_tmp", mount / "..data")  # the kubelet's atomic swap
        (first / "policy.json").unlink()
        first.rmdir()
        await until(lambda: results.seen != [])
        assert results.kinds() == [SUCCESS]
    assert (await reason_of(engine)).endswith("denied: configmap-2")


async def test_sighup_reloads_at_once(policy_file: Path) -> None:
    engine = Engine(load_policy(policy_file), open_store("memory://"))
    results = Results()
    async with watching(policy_file, engine, results, interval=0, sighup=True):
        await until(lambda: signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL)
        write(policy_file, version("by-sighup"))
        await asyncio.sleep(10 * INTERVAL)
        assert results.seen == [], "with polling off, only SIGHUP reloads"
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: results.seen != [])
        assert results.kinds() == [SUCCESS]
        assert (await reason_of(engine)).endswith("denied: by-sighup")
        # A broken file on SIGHUP is reported at once, and the policy stays.
        write(policy_file, BROKEN)
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: len(results.seen) == 2)
        assert results.kinds() == [SUCCESS, FAILURE]
        # SIGHUP on an unchanged file reloads it again (the operator asked).
        write(policy_file, version("by-sighup"))
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: len(results.seen) == 3)
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


async def test_counters_survive_a_reload_that_keeps_counter_window_and_scope(
    policy_file: Path,
) -> None:
    engine = Engine(load_policy(policy_file), MemoryStore())
    results = Results()
    async with watching(policy_file, engine, results, interval=INTERVAL):
        for _ in range(2):
            assert (await engine.check(request("counted"))).decision.allowed
        write(policy_file, version("other reason, same limit"))
        await until(lambda: len(results.seen) == 1)
        last = await engine.check(request("counted"))
        assert last.decision.allowed and last.counters[0].remaining == 0
        assert (await engine.check(request("counted"))).decision.reason is Reason.RATE_LIMITED
        write(policy_file, version("renamed counter", counter="c2"))
        await until(lambda: len(results.seen) == 2)
        fresh = await engine.check(request("counted"))
        assert fresh.decision.allowed and fresh.counters[0].remaining == 2


class HeldStore:
    """Narrow stand-in: a memory store whose acquire waits until the test releases it."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def acquire(self, charges: Sequence[Charge], now_ms: int | None = None) -> Outcome:
        self.entered.set()
        await self.release.wait()
        return await self.inner.acquire(charges, now_ms)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_a_check_in_flight_finishes_on_the_policy_it_started_with(
    policy_file: Path,
) -> None:
    store = HeldStore()
    started_under = load_policy(policy_file)
    engine = Engine(started_under, store)
    results = Results()
    async with watching(policy_file, engine, results, interval=INTERVAL):
        in_flight = asyncio.create_task(engine.check(request("counted")))
        await store.entered.wait()
        denies_everything = {"version": "1", "default": "deny"}
        write(policy_file, denies_everything)
        await until(lambda: results.seen != [])
        after = await engine.check(request("counted"))
        assert after.decision.reason is Reason.DENIED_BY_DEFAULT
        assert after.policy is engine.policy and after.policy is not started_under
        store.release.set()
        finished = await in_flight
        assert finished.decision.allowed and finished.decision.rule == "tools.counted"
        assert finished.policy is started_under, "the result names the policy it was decided by"


async def test_a_policy_the_engine_cannot_run_is_a_failed_reload(policy_file: Path) -> None:
    engine = Engine(load_policy(policy_file), MemoryStore(), grant_header="x-mcp-grant")
    serving = engine.policy
    results = Results()
    async with watching(policy_file, engine, results, interval=INTERVAL):
        write(policy_file, {**version("v1"), "grants": {"source": "mtls"}})
        await until(lambda: results.seen != [])
    assert results.kinds() == [FAILURE] and engine.policy is serving


async def test_reload_under_load(policy_file: Path) -> None:
    """20 replacements, good and broken alternating, while checks stream: every check is
    answered, and only ever under a valid version."""
    engine = Engine(load_policy(policy_file), MemoryStore())
    results = Results()
    decisions: list[Decision] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def stream(tool: str) -> None:
        while not stop.is_set():
            try:
                decisions.append((await engine.check(request(tool))).decision)
            except Exception as exc:
                failures.append(exc)
            await asyncio.sleep(0)

    valid = {"denied: v0"}
    async with watching(policy_file, engine, results, interval=INTERVAL):
        streams = [asyncio.create_task(stream(t)) for t in ("probe", "probe", "counted")]
        for n in range(1, 21):
            if n % 2:
                write(policy_file, version(f"v{n}", max_=1_000_000))
                valid.add(f"denied: v{n}")
            else:
                write(policy_file, BROKEN.replace("BROKEN", f"BROKEN {n}"))
            await until(lambda n=n: len(results.seen) == n)
        stop.set()
        await asyncio.gather(*streams)
    assert failures == []
    assert results.kinds() == [SUCCESS, FAILURE] * 10
    probes = [d for d in decisions if d.tool == "probe"]
    counted = [d for d in decisions if d.tool == "counted"]
    assert probes and counted
    assert all(d.reason is Reason.DENIED_BY_RULE for d in probes)
    seen = {d.message.split("'probe' ", 1)[1] for d in probes}
    assert seen <= valid, seen - valid
    assert len(seen) > 1, "the stream saw the policy change"
    assert all(d.allowed or d.reason is Reason.RATE_LIMITED for d in counted)
    assert (await reason_of(engine)).endswith("denied: v19")
