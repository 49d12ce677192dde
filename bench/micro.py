"""Micro-benchmark of the in-process decision path, so a regression shows as a number.

For a few request shapes it measures, over many iterations in one event loop, the CPU time
one check costs inside ``mcp-authz`` without the network: decoding the CheckRequest protobuf,
``envoy.http_request``, ``Engine.check`` (memory store, so no Redis wait is counted),
``envoy.check_response`` and encoding the CheckResponse. It also splits the most common
shape into those stages.

    .venv/bin/python -m bench.micro [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from authz import envoy
from authz.engine import Engine
from authz.pb import external_auth_pb2
from authz.policy import compile_policy
from authz.store import CounterStore, open_store
from authz.store.memory import MemoryStore
from bench import mix


@dataclass(frozen=True)
class Shape:
    name: str
    check: bytes  # a serialized CheckRequest, as gRPC hands it over


@dataclass(frozen=True)
class Timing:
    name: str
    iterations: int
    us_per_op: float

    @property
    def ops_per_s(self) -> float:
        return 1e6 / self.us_per_op


def _check_request(headers: dict[str, str], body: bytes) -> bytes:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.protocol = "POST", "/mcp", "HTTP/1.1"
    http.id = "9183371462349132761"
    http.headers.update(
        {
            ":authority": "127.0.0.1",
            ":method": "POST",
            ":path": "/mcp",
            ":scheme": "http",
            "x-forwarded-proto": "http",
            "x-request-id": "0f0c6a2e-7a52-4d6e-9a8e-0c1f1d1b7a10",
            "content-length": str(len(body)),
            **{k.lower(): v for k, v in headers.items()},
        }
    )
    http.raw_body = body
    http.size = len(body)
    return bytes(req.SerializeToString())


def shapes() -> list[Shape]:
    reqs = mix.requests()

    def first(pred: Callable[[mix.Request], bool]) -> mix.Request:
        return next(r for r in reqs if pred(r))

    def shape(name: str, req: mix.Request, body: bytes | None = None) -> Shape:
        return Shape(name, _check_request(dict(req.headers), req.body if body is None else body))

    def call(r: mix.Request) -> bool:
        return r.method == "tools/call"

    unlimited = first(lambda r: call(r) and not r.needs_counter and 900 < len(r.body) < 1300)
    limited = first(lambda r: call(r) and r.needs_counter and 900 < len(r.body) < 1300)
    large = first(lambda r: call(r) and len(r.body) > 3800)
    denied = json.loads(unlimited.body)
    denied["params"]["name"] = "delete_app"
    duplicate = unlimited.body.replace(b'"jsonrpc":"2.0"', b'"jsonrpc":"2.0","jsonrpc":"2.0"', 1)
    return [
        shape(f"tools/call, no limit, {len(unlimited.body)} B", unlimited),
        shape(f"tools/call, 1 limit (memory store), {len(limited.body)} B", limited),
        shape(f"tools/call, no limit, {len(large.body)} B", large),
        shape("tools/list", first(lambda r: r.method == "tools/list")),
        shape("notification", first(lambda r: r.method.startswith("notifications/"))),
        shape("denied by rule", unlimited, json.dumps(denied).encode()),
        shape("malformed (duplicate key)", unlimited, duplicate),
    ]


def _engine(policy_doc: dict[str, Any], store: CounterStore | None = None) -> Engine:
    return Engine(compile_policy(policy_doc), store or MemoryStore())


ROUNDS = 5


async def _best(name: str, op: Callable[[], Awaitable[object]], seconds: float) -> Timing:
    """CPU time per operation: the fastest of ``ROUNDS`` rounds. CPU time (not wall time)
    and the minimum are the figures least disturbed by other processes on a shared
    machine."""
    for _ in range(200):  # warm caches and the store's keys
        await op()
    best, total = float("inf"), 0
    for _ in range(ROUNDS):
        n, started = 0, time.process_time()
        while time.process_time() - started < seconds / ROUNDS:
            for _ in range(100):
                await op()
            n += 100
        best = min(best, (time.process_time() - started) * 1e6 / n)
        total += n
    return Timing(name, total, best)


async def _time_shape(engine: Engine, shape: Shape, seconds: float) -> Timing:
    async def once() -> None:
        req = external_auth_pb2.CheckRequest.FromString(shape.check)
        http = envoy.http_request(req)
        decision = (await engine.check(http)).decision
        envoy.check_response(decision, http.headers).SerializeToString()

    return await _best(shape.name, once, seconds)


async def _stages(engine: Engine, shape: Shape, seconds: float) -> list[Timing]:
    """The same check split into its stages, each timed on its own."""
    req = external_auth_pb2.CheckRequest.FromString(shape.check)
    http = envoy.http_request(req)
    decision = (await engine.check(http)).decision
    response = envoy.check_response(decision, http.headers)

    def sync(fn: Callable[[], object]) -> Callable[[], Awaitable[object]]:
        async def run() -> object:
            return fn()

        return run

    stages: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        (
            "CheckRequest decode (protobuf)",
            sync(lambda: external_auth_pb2.CheckRequest.FromString(shape.check)),
        ),
        ("envoy.http_request", sync(lambda: envoy.http_request(req))),
        ("Engine.check", lambda: engine.check(http)),
        ("envoy.check_response", sync(lambda: envoy.check_response(decision, http.headers))),
        ("CheckResponse encode (protobuf)", sync(response.SerializeToString)),
    ]
    return [await _best(name, op, seconds) for name, op in stages]


async def run(
    seconds: float = 1.0, redis_url: str | None = None
) -> tuple[list[Timing], list[Timing]]:
    """(per shape, stages of the first shape); the reference policy, limits never deny.

    With ``redis_url``, the limited call once more against that Redis: this process's CPU
    time then includes its side of the round trip (packing, writing, reading the reply),
    not the Redis server's.
    """
    engine = _engine(mix.reference_policy())
    all_shapes = shapes()
    per_shape = [await _time_shape(engine, s, seconds) for s in all_shapes]
    if redis_url is not None:
        store = open_store(redis_url, timeout_s=1.0)
        limited = all_shapes[1]
        name = limited.name.replace("memory store", "Redis store on loopback")
        try:
            with_redis = _engine(mix.reference_policy(), store)
            per_shape.append(await _time_shape(with_redis, Shape(name, limited.check), seconds))
        finally:
            await store.close()
    big = _engine(mix.big_policy())
    per_shape.append(
        await _time_shape(
            big, Shape(f"{all_shapes[0].name}, 1,000-tool policy", all_shapes[0].check), seconds
        )
    )
    return per_shape, await _stages(engine, all_shapes[0], seconds / 2)


def table(timings: list[Timing]) -> list[str]:
    lines = ["| what | CPU µs per check (best of 5) | checks/s (one core) | iterations |"]
    lines.append("|---|---:|---:|---:|")
    lines += [
        f"| {t.name} | {t.us_per_op:.1f} | {t.ops_per_s:,.0f} | {t.iterations:,} |" for t in timings
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description="micro-benchmark of the decision path")
    parser.add_argument("--seconds", type=float, default=1.0, help="per shape")
    per_shape, stages = asyncio.run(run(parser.parse_args().seconds))
    print("\n".join(table(per_shape)))
    print()
    print("\n".join(table(stages)))


if __name__ == "__main__":
    main()
