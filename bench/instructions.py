"""Instructions per check: the in-process decision path counted, not timed.

This machine is a VM on a shared host whose speed moves by up to 2x within minutes, so a
timing cannot show a 10% regression. Valgrind's callgrind counts the instructions a check
executes instead: the same code, inputs and interpreter give the same count whatever else
the host is doing. Counted here: the whole ``AuthorizationService.Check`` of ``mcp-authz``
(``envoy.http_request``, the engine with the memory store, ``envoy.check_response``, the
metrics and the audit line, written to /dev/null), per request shape, without gRPC and
without the kernel (system calls are not user-space instructions), and split by the
shared object the instructions ran in: the interpreter, protobuf, orjson and so on.

The rows "over HTTP" count the same checks through Envoy's HTTP ext_authz mode instead:
``authz_http``'s protocol fed the request as Envoy sends it (httptools parsing, the
``HttpRequest``, the same ``check.answer``, the HTTP encoding of the reply and the task
that writes it), on an in-process connection whose writes go nowhere, on uvloop as
``mcp-authz serve`` runs.

    .venv/bin/python -m bench.instructions            # needs valgrind (make bench installs it)

The measured process toggles callgrind's instrumentation around each shape's loop with
``callgrind_control`` (so the interpreter's start-up and the imports are not counted) and
dumps the counts after it; an empty loop measures what toggling itself costs, and that
is subtracted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import uvloop

from authz import audit, authz_http
from authz.metrics import Metrics
from authz.pb import external_auth_pb2
from authz.server import AuthorizationService
from bench import micro, mix

ITERATIONS = 400
_ROOT = Path(__file__).resolve().parent.parent

# Shared objects grouped under the names an operator reads in the table.
_GROUPS = (
    ("CPython interpreter and built-in types", re.compile(r"libpython|/python3\.\d+$")),
    ("protobuf (upb)", re.compile(r"google/_upb/")),
    ("orjson and msgspec (JSON, the Structs)", re.compile(r"orjson|msgspec")),
    ("SHA-256 (OpenSSL)", re.compile(r"libcrypto|_hashlib")),
    ("C library", re.compile(r"libc\.so|ld-linux|libm\.so")),
)
OTHER = "other (prometheus-client's and the standard library's C modules)"
# The shapes of bench.micro (by index) also counted over the HTTP transport: an allowed
# call and a denial.
HTTP_SHAPES = (0, 5)
GROUP_NAMES = (*(name for name, _ in _GROUPS), OTHER)


@dataclass(frozen=True)
class Count:
    name: str
    per_check: float  # instructions
    by_group: dict[str, float]


def _http_check(check: bytes) -> bytes:
    """A serialized CheckRequest as Envoy's HTTP ext_authz mode sends the same check: the
    client's request line, its headers (``:authority`` as ``host``) and its body."""
    http = external_auth_pb2.CheckRequest.FromString(check).attributes.request.http
    head = [f"{http.method} {http.path} HTTP/1.1", f"host: {http.headers[':authority']}"]
    head += [f"{name}: {value}" for name, value in http.headers.items() if name[0] != ":"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + http.raw_body


class _Discard:
    """The transport of an in-process HTTP connection: the answers are dropped."""

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _names() -> list[str]:
    """The table's rows, in the order the measured process counts them."""
    names = [s.name for s in micro.shapes()]
    return names + [f"{names[i]}, over HTTP" for i in HTTP_SHAPES]


def _measured_process(iterations: int) -> None:
    """Runs inside valgrind: each shape's loop between instrumentation on and a dump."""
    audit.configure_logging("warning", "json", "info")  # the default: an audit line a check
    service = AuthorizationService(micro._engine(mix.reference_policy()), Metrics())
    listener = authz_http.Listener(authz_http.checks(service.engine, service.metrics))
    connection = listener.protocol()
    connection.connection_made(cast(asyncio.BaseTransport, _Discard()))
    pid = str(os.getpid())

    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, pid], check=True, capture_output=True)

    async def loop(request: external_auth_pb2.CheckRequest, n: int) -> None:
        for _ in range(n):
            await service.Check(request, None)

    async def over_http(request: bytes, n: int) -> None:
        for _ in range(n):
            connection.data_received(request)  # parsed, and its answer is a task
            assert connection.last is not None
            await connection.last

    async def main() -> None:
        shapes = micro.shapes()
        for shape, n in [(shapes[0], 0), *((s, iterations) for s in shapes)]:
            request = external_auth_pb2.CheckRequest.FromString(shape.check)
            await loop(request, 200)  # warm caches, counters and lazily built state
            control("--zero")
            control("--instr=on")
            await loop(request, n)
            control("--instr=off")
            control("--dump")
        for i in HTTP_SHAPES:
            raw = _http_check(shapes[i].check)
            await over_http(raw, 200)
            control("--zero")
            control("--instr=on")
            await over_http(raw, iterations)
            control("--instr=off")
            control("--dump")

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def _self_cost_by_object(dump: Path) -> dict[str, int]:
    """Instructions per shared object, from callgrind's format: cost lines after ``fn=``
    are the function's own; the one after a ``calls=`` line is a callee's (skipped)."""
    names: dict[str, str] = {}
    costs: dict[str, int] = defaultdict(int)
    current, skip_next = "?", False
    for line in dump.read_text().splitlines():
        if line.startswith(("ob=", "cob=")):
            ref, _, name = line.partition("=")[2].partition(" ")
            if name:
                names[ref] = name
            if line.startswith("ob="):
                current = names.get(ref, ref)
        elif line.startswith("calls="):
            skip_next = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            fields = line.split()
            if skip_next:
                skip_next = False
            elif len(fields) > 1:  # a position alone costs nothing
                costs[current] += int(fields[-1])
    return costs


def _by_group(costs: dict[str, int]) -> dict[str, int]:
    """Instructions per shared object, added up under the table's group names."""
    grouped = dict.fromkeys(GROUP_NAMES, 0)
    for obj, cost in costs.items():
        grouped[next((name for name, pattern in _GROUPS if pattern.search(obj)), OTHER)] += cost
    return grouped


def count(iterations: int = ITERATIONS) -> list[Count]:
    """Instructions per check for each shape of ``bench.micro``, and for those of
    :data:`HTTP_SHAPES` over the HTTP transport."""
    with tempfile.TemporaryDirectory(prefix="mcp-authz-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-m",
                "bench.instructions",
                "--measured-process",
                str(iterations),
            ],
            cwd=_ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        dumps = sorted(Path(tmp).glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
        totals = [_by_group(_self_cost_by_object(d)) for d in dumps]
    names = _names()
    if len(totals) != len(names) + 1:
        raise RuntimeError(f"callgrind wrote {len(totals)} dumps, expected {len(names) + 1}")
    overhead = totals[0]
    results = []
    for name, grouped in zip(names, totals[1:], strict=True):
        by_group = {g: max(0.0, (grouped[g] - overhead[g]) / iterations) for g in GROUP_NAMES}
        results.append(Count(name, sum(by_group.values()), by_group))
    return results


def table(counts: list[Count]) -> list[str]:
    lines = [
        "| what | instructions per check | " + " | ".join(GROUP_NAMES) + " |",
        "|---|---:|" + "---:|" * len(GROUP_NAMES),
    ]
    for c in counts:
        shares = " | ".join(f"{c.by_group[g] / c.per_check:.0%}" for g in GROUP_NAMES)
        lines.append(f"| {c.name} | {c.per_check:,.0f} | {shares} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--measured-process", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measured_process is not None:
        _measured_process(args.measured_process)
        return
    print("\n".join(table(count(args.iterations))))


if __name__ == "__main__":
    main()
