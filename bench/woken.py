"""A check that wakes the process: the HTTP transport's check in process, back to back and
each after a sleep.

At a low request rate every check wakes an idle process, and by then the rest of the
machine has taken back the caches the last check filled, so the same instructions cost
several times more CPU than when checks follow each other. This measures that split without
Envoy or the network: ``mcp-authz``'s HTTP protocol (``authz/authz_http.py``) fed the bytes
Envoy's HTTP ext_authz mode sends for the benchmark's request mix, with the no-op decision
(what configuration 7 runs) and with the whole check (memory store, metrics, the audit
line written to /dev/null); each request back to back, and each after 20 ms asleep in the
event loop (the gap between checks at 50 requests/s). Reported: the median thread CPU time
of a check.

    .venv/bin/python -m bench.woken
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import mix

ASLEEP_S = 0.02
RUNS = 300


@dataclass(frozen=True)
class Woken:
    name: str
    back_to_back_us: float
    after_sleep_us: float


def envoy_requests() -> list[bytes]:
    """The mix's first requests as Envoy's HTTP ext_authz mode sends them: the allowed
    headers, lower-cased, with the ones Envoy adds."""
    out = []
    for n, req in enumerate(mix.requests()[:200]):
        headers = [
            ("host", "127.0.0.1"),
            ("content-length", str(len(req.body))),
            ("x-request-id", f"0f0c6a2e-7a52-4d6e-9a8e-{n:012d}"),
            *((name.lower(), value) for name, value in req.headers),
            ("x-envoy-auth-partial-body", "false"),
            ("x-envoy-internal", "true"),
            ("x-envoy-expected-rq-timeout-ms", "250"),
        ]
        head = "POST /mcp HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        out.append(head.encode() + b"\r\n" + req.body)
    return out


class _Transport:
    """Where the protocol writes its answers: kept, to check the last one."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("the benchmark's connection is kept alive")


async def _measure(whole_check: bool, checks: int = RUNS) -> tuple[float, float]:
    from authz import audit, authz_http, reply
    from authz.metrics import Metrics
    from bench import micro

    audit.configure_logging("warning", "json", "info")  # the default: an audit line a check
    if whole_check:
        decide = authz_http.checks(micro._engine(mix.reference_policy()), Metrics())
    else:
        allow = reply.Reply(allowed=True, status=200, reason="allowed")

        async def decide(_: object) -> reply.Reply:
            return allow

    connection = authz_http.Listener(decide).protocol()
    transport = _Transport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    requests = envoy_requests()

    async def one(raw: bytes) -> int:
        started = time.thread_time_ns()
        connection.data_received(raw)
        assert connection.last is not None
        await connection.last
        return time.thread_time_ns() - started

    for raw in requests * 3:  # warm: lazily built state, counters, caches
        await one(raw)
    medians = []
    for asleep in (0.0, ASLEEP_S):
        runs = []
        for n in range(checks):
            if asleep:
                await asyncio.sleep(asleep)  # in epoll, as the service waits
            runs.append(await one(requests[n % len(requests)]))
        medians.append(statistics.median(runs) / 1000)
    assert transport.written[-1].startswith(b"HTTP/1.1 "), "no HTTP answer"
    return medians[0], medians[1]


def run(cpus: str | None = None) -> list[Woken]:
    """Both measurements, each in a process of its own (pinned to ``cpus`` when given)
    whose audit lines go to /dev/null."""
    out = []
    for name, flag in (
        ("HTTP protocol, no-op decision (the floor of 7)", "--floor"),
        ("HTTP protocol and the whole check (memory store)", "--check"),
    ):
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            cmd = [sys.executable, "-m", "bench.woken", flag, "--out", result.name]
            if cpus:
                cmd = ["taskset", "-c", cpus, *cmd]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=300)
            hot, woken = json.loads(Path(result.name).read_text())
        out.append(Woken(name, hot, woken))
    return out


def table(rows: list[Woken]) -> list[str]:
    lines = [
        "| what | CPU µs per check, back to back | after 20 ms asleep | ratio |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r.name} | {r.back_to_back_us:.0f} | {r.after_sleep_us:.0f} | "
        f"{r.after_sleep_us / r.back_to_back_us:.1f}x |"
        for r in rows
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floor", action="store_true", help="(child) the no-op decision")
    parser.add_argument("--check", action="store_true", help="(child) the whole check")
    parser.add_argument("--out", type=Path, help="(child) where to write the two medians")
    parser.add_argument("--runs", type=int, default=RUNS, help="(child) checks per median")
    args = parser.parse_args()
    if args.out is not None:
        import uvloop

        medians = uvloop.run(_measure(whole_check=args.check, checks=args.runs))
        args.out.write_text(json.dumps(medians))
        return
    print("\n".join(table(run())))


if __name__ == "__main__":
    main()
