"""Instructions per check: the in-process decision path counted, not timed.

This machine is a VM on a shared host whose speed moves by up to 2x within minutes, so a
timing cannot show a 10% regression. Valgrind's callgrind counts the instructions a check
executes instead: the same code, inputs and interpreter give the same count whatever else
the host is doing. Counted here: the whole ``AuthorizationService.Check`` of ``mcp-authz``
(``envoy.http_request``, the engine with the memory store, ``envoy.check_response``, the
metrics and the audit line, written to /dev/null), per request shape, without gRPC and
without the kernel (system calls are not user-space instructions), and split by the
shared object the instructions ran in: the interpreter, protobuf, orjson and so on.

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

from authz import audit
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
GROUP_NAMES = (*(name for name, _ in _GROUPS), OTHER)


@dataclass(frozen=True)
class Count:
    name: str
    per_check: float  # instructions
    by_group: dict[str, float]


def _measured_process(iterations: int) -> None:
    """Runs inside valgrind: each shape's loop between instrumentation on and a dump."""
    audit.configure_logging("warning", "json", "info")  # the default: an audit line a check
    service = AuthorizationService(micro._engine(mix.reference_policy()), Metrics())
    pid = str(os.getpid())

    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, pid], check=True, capture_output=True)

    async def loop(request: external_auth_pb2.CheckRequest, n: int) -> None:
        for _ in range(n):
            await service.Check(request, None)

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

    asyncio.run(main())


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
    """Instructions per check for each shape of ``bench.micro``."""
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
    names = [s.name for s in micro.shapes()]
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
