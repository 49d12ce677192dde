"""``make bench``: every configuration of issue #8 in one run, and ``bench/results.md``.

The same request mix (``bench/mix.py``) goes through the same Envoy, which answers ``/mcp``
itself (a ``direct_response`` route: no MCP server is measured); only the ext_authz step
differs between configurations:

1. no ext_authz (the ceiling);
2. the no-op Python gRPC ext_authz (``bench/noop_authz.py``, the Python floor);
3. ``mcp-authz``, reference policy, limits that never deny, Redis store;
   3c. the same on the mix without its ``tools/list`` requests, and 3n the same again with
   Envoy without the list filter (no ext_proc filter, no routes for marked requests, no
   route cache clearing): what the list filter costs a request that is not a list;
4. the same with the memory store;
5. the same as 3 with a 1,000-tool policy;
6. ``mcp-authz --workers N`` for N = 1, 2 and the number of cores (Redis store);
7. the no-op floor of Envoy's HTTP ext_authz mode (``bench/noop_authz.py --authz-http``:
   mcp-authz's HTTP protocol with a decision that allows at once), ``envoy/envoy-http.yaml``;
8. ``mcp-authz`` over the HTTP mode (``--authz-http``), as 3 otherwise (issue #16).

For each: requests per second at saturation, latency percentiles at a fixed moderate rate,
the authorization processes' CPU time per check (``/proc/<pid>/stat``), and Redis commands
per check (``INFO commandstats``); for 2, 3, 7 and 8 also the CPU time per check at a low
fixed rate (issue #16), where every check wakes an idle process. Envoy answers the list
requests with a list of the policy's tools, so the list filter reads and filters a real
list. Checks are counted by Envoy (its ext_authz stats), not
assumed from the generator. On a machine with 2 or more cores, configurations 1-5 pin the
authorization process to the last core and Envoy, wrk and Redis to the others, so the
Python process never competes with the load side; configuration 6 is not pinned, since it
is about using every core.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import grpc
import redis
import yaml

from bench import instructions, micro, mix, woken
from devstack.redis_server import RedisServer, redis_server_binary, running_redis
from devstack.stack import ENVOY_CONFIGS, Proc, free_port, running, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LUA = ROOT / "bench" / "mix.lua"
ENVOY_CONCURRENCY = 1
SATURATION_CONNECTIONS = 32
PACED_CONNECTIONS = 16
WARMUP_S = 3
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The configurations whose saturation runs twice (see main).
REPEATED = ("1", "2", "3", "5", "3c", "3n", "7", "8")

# Targets of issue #8.
TARGET_FLOOR_RATIO = 0.85
TARGET_ADDED_P99_MS = 2.0
TARGET_POLICY_SIZE = 0.05
TARGET_PER_CORE = 0.85
# Targets of issue #16 (the HTTP transport).
TARGET_HTTP_OVER_GRPC_FLOOR = 1.0
TARGET_HTTP_ADDED_P99_MS = 1.0
# Issue #16's low fixed rate: CPU per check when each check wakes an idle process, for the
# two floors and mcp-authz over each transport.
LOW_RATE = 50.0
LOW_RATE_S = 20
LOW_RATE_CONFIGS = ("2", "3", "7", "8")
TARGET_HTTP_LOW_RATE_CPU_US = 400
# Target of issue #15 (the list filter): 3n/3c throughput, a non-list request's cost.
TARGET_LIST_FILTER_RATIO = 0.95


# What Envoy answers every request but the lists with (the list filter reads only lists).
_CALL_RESPONSE = b'{"jsonrpc":"2.0","id":1,"result":{}}'

_SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")


@dataclass(frozen=True)
class Config:
    key: str
    title: str
    authz: Sequence[str] | None  # the command after the port flags are added; None: no ext_authz
    pinned: bool = True
    workers: int = 1
    transport: str = "grpc"  # or "http": Envoy's HTTP ext_authz mode, envoy-http.yaml
    list_filter: bool = True  # False: Envoy without the ext_proc list filter and its routes
    lists: bool = True  # False: the mix without its tools/list requests


@dataclass
class Snapshot:
    cpu_ticks: int
    checks: dict[str, int]
    redis_calls: dict[str, int]
    at: float


@dataclass
class Measure:
    """One wrk run and what the authorization side spent during it."""

    requests: int
    seconds: float
    errors: dict[str, int]
    latency_us: dict[str, float]
    outcomes: dict[str, int]  # ext_authz calls by outcome, as Envoy counted them
    cpu_s: float
    redis_calls: dict[str, int]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def checks(self) -> int:
        return sum(self.outcomes.values())

    @property
    def problems(self) -> dict[str, int]:
        """What went wrong: wrk's errors (non-2xx answers, timeouts) and failed checks."""
        failed = {f"ext_authz {k}": v for k, v in self.outcomes.items() if k != "ok" and v}
        return {**self.errors, **failed}

    @property
    def cpu_us_per_check(self) -> float | None:
        return self.cpu_s * 1e6 / self.checks if self.checks else None

    @property
    def redis_per_check(self) -> float | None:
        """Every command Redis ran, those inside the Lua script included."""
        return sum(self.redis_calls.values()) / self.checks if self.checks else None

    @property
    def scripts_per_check(self) -> float | None:
        scripts = sum(self.redis_calls.get(name, 0) for name in _SCRIPT_COMMANDS)
        return scripts / self.checks if self.checks else None


@dataclass
class Result:
    config: Config
    saturation: Measure
    paced: Measure
    per_process_cpu_s: list[tuple[str, float]] = field(default_factory=list)
    rounds: int = 1  # saturation runs, the best kept
    low: Measure | None = None  # at LOW_RATE (LOW_RATE_CONFIGS only)


# --- the pieces ---------------------------------------------------------------------------


def envoy_config(
    tmp: Path,
    *,
    listen: int,
    admin: int,
    authz: int | None,
    list_filter: int | None = None,
    transport: str = "grpc",
    with_list_filter: bool = True,
) -> Path:
    """``envoy/envoy.yaml`` (``envoy-http.yaml`` for the HTTP transport) with ports changed,
    ``/mcp`` answered by Envoy itself, the access log off (it measures Envoy's stdout, not
    the check), and, for configuration 1, no ext_authz filter. ``authz``: the ext_authz
    port; ``list_filter``: the list filter's gRPC port, where it is not ``authz`` (the HTTP
    transport). ``with_list_filter=False``: Envoy as it was before the list filter, to
    measure what the filter costs the other requests (configuration 3n)."""
    config: dict[str, Any] = yaml.safe_load(ENVOY_CONFIGS[transport].read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=listen)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm.pop("access_log", None)
    if not with_list_filter:
        _without_list_filter(hcm)
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        if route["match"].get("path") == "/mcp":
            marks = {h["name"] for h in route["match"].get("headers", ())}
            body = mix.list_response() if "x-mcp-authz-list" in marks else _CALL_RESPONSE
            route.pop("route")
            route["direct_response"] = {"status": 200, "body": {"inline_string": body.decode()}}
            route["response_headers_to_add"] = [
                {
                    "header": {"key": "content-type", "value": "application/json"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ]
    ports = {"mcp_authz": authz}
    if transport == "http":
        ports = {"mcp_authz_http": authz, "mcp_authz": list_filter}
    clusters = config["static_resources"]["clusters"]
    config["static_resources"]["clusters"] = [c for c in clusters if c["name"] in ports]
    if authz is None:
        hcm["http_filters"] = [
            f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_authz"
        ]
        config["static_resources"]["clusters"] = []
    else:
        for cluster in config["static_resources"]["clusters"]:
            endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            endpoint["address"]["socket_address"]["port_value"] = ports[cluster["name"]]
    path = tmp / f"envoy-{listen}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _without_list_filter(hcm: dict[str, Any]) -> None:
    """Remove from the connection manager ``hcm`` everything the list filter added: the
    ext_proc filter, the routes of the requests ext_authz marks (``x-mcp-authz-*``), the
    removal of clients' copies of those marks, and ext_authz's route cache clearing (it
    exists so that a marked request finds its route)."""
    marks = "x-mcp-authz-"
    hcm["http_filters"] = [
        f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"
    ]
    for http_filter in hcm["http_filters"]:
        typed = http_filter["typed_config"]
        typed.pop("clear_route_cache", None)
        mutations = typed.get("mutations", {})
        if "request_mutations" in mutations:
            mutations["request_mutations"] = [
                m
                for m in mutations["request_mutations"]
                if not m.get("remove", "").startswith(marks)
            ]
    virtual_host = hcm["route_config"]["virtual_hosts"][0]
    virtual_host["routes"] = [
        route
        for route in virtual_host["routes"]
        if not any(h["name"].startswith(marks) for h in route["match"].get("headers", ()))
    ]
    for route in virtual_host["routes"]:
        per_filter = route.pop("typed_per_filter_config", {})
        per_filter.pop("envoy.filters.http.ext_proc", None)
        if per_filter:
            route["typed_per_filter_config"] = per_filter


def cpu_sets() -> tuple[str | None, str | None]:
    """(load side, authorization side) as taskset CPU lists; (None, None) on one core."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return ",".join(map(str, cpus[:-1])), str(cpus[-1])


def on_cpus(cmd: Sequence[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *cmd] if cpus else list(cmd)


def pin_all_threads(pid: int, cpus: str | None) -> None:
    if cpus:
        for task in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(task), {int(c) for c in cpus.split(",")})


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (the workers of ``--workers N``, and multiprocessing's
    resource tracker)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry))
    return [pid, *children]


def _role(pid: int, root: int) -> str:
    if pid == root:
        return "supervisor" if process_tree(root)[1:] else "the one process"
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    return "worker" if b"spawn_main" in cmdline else "resource tracker"


def cpu_ticks(pid: int) -> int:
    """User plus system CPU ticks of one process (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def listening_sockets(port: int) -> int:
    """How many sockets listen on ``port`` (one per worker with SO_REUSEPORT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def envoy_checks(admin: int) -> dict[str, int]:
    """ext_authz calls Envoy made, by outcome: ok, denied, error (timed out or failed, so
    Envoy answered 503), failure_mode_allowed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=ext_authz") as resp:
        text = resp.read().decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        found = re.fullmatch(r"http\.mcp\.ext_authz\.(ok|denied|error|failure_mode_allowed)", name)
        if found:
            out[found.group(1)] = int(value)
    return out


def redis_calls(client: redis.Redis | None) -> dict[str, int]:
    if client is None:
        return {}
    stats: dict[str, Any] = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name not in ("cmdstat_info", "cmdstat_config", "cmdstat_flushall")
    }


def snapshot(pids: list[int], admin: int, client: redis.Redis | None) -> Snapshot:
    return Snapshot(
        cpu_ticks=sum(cpu_ticks(p) for p in pids),
        checks=envoy_checks(admin),
        redis_calls=redis_calls(client),
        at=time.monotonic(),
    )


def wrk(
    url: str,
    inputs: Path,
    seconds: float,
    connections: int,
    cpus: str | None,
    rate: float | None = None,
) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--timeout", "5s"]
    cmd += ["-s", str(LUA), url, "--", str(inputs)]
    if rate:
        cmd += [str(rate), "1"]
    out = subprocess.run(
        on_cpus(cmd, cpus), capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("BENCH_JSON "))
    result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
    return result


def measure(
    up: Serving,
    inputs: Path,
    seconds: float,
    connections: int,
    client: redis.Redis | None,
    rate: float | None = None,
) -> Measure:
    before = snapshot(up.pids, up.admin, client)
    run = wrk(up.url, inputs, seconds, connections, up.load_cpus, rate)
    after = snapshot(up.pids, up.admin, client)
    return Measure(
        requests=run["requests"],
        seconds=run["duration_us"] / 1e6,
        errors={k: v for k, v in run["errors"].items() if v},
        latency_us=run["latency_us"],
        outcomes={k: v - before.checks.get(k, 0) for k, v in after.checks.items()},
        cpu_s=(after.cpu_ticks - before.cpu_ticks) / CLK_TCK,
        redis_calls={
            k: v - before.redis_calls.get(k, 0)
            for k, v in after.redis_calls.items()
            if v - before.redis_calls.get(k, 0)
        },
    )


# --- one configuration ----------------------------------------------------------------------


@dataclass
class Serving:
    """Envoy (and the configuration's ext_authz) up and warm."""

    url: str
    admin: int
    pids: list[int]  # the authorization process(es): supervisor and workers
    load_cpus: str | None


@contextlib.contextmanager
def serving(config: Config, tmp: Path, store: RedisServer) -> Iterator[Serving]:
    """Start the configuration's ext_authz and Envoy in front of it, on free ports."""
    load_cpus, authz_cpus = cpu_sets() if config.pinned else (None, None)
    if store.proc is not None:
        pin_all_threads(store.proc.pid, load_cpus or ",".join(map(str, os.sched_getaffinity(0))))
    grpc_port, listen, admin = free_port(), free_port(), free_port()
    # The HTTP transport: ext_authz on its own port, the list filter on the gRPC one.
    authz_http = free_port() if config.transport == "http" else None
    check_port = authz_http or grpc_port
    envoy_cmd = [
        str(BIN / "envoy"),
        "-c",
        str(
            envoy_config(
                tmp,
                listen=listen,
                admin=admin,
                authz=check_port if config.authz else None,
                list_filter=grpc_port,
                transport=config.transport,
                with_list_filter=config.list_filter,
            )
        ),
        "--concurrency",
        str(ENVOY_CONCURRENCY),
        "--log-level",
        "warning",
        "--base-id",
        str(free_port()),
    ]
    name = re.sub(r"\W+", "", config.key)
    envoy = Proc(f"envoy-{name}", on_cpus(envoy_cmd, load_cpus), tmp / f"envoy-{name}.log")
    with contextlib.ExitStack() as stack:
        pids: list[int] = []
        if config.authz is not None:
            is_service = config.authz[0].endswith("mcp-authz")
            if authz_http is None:
                cmd = [*config.authz, "--grpc", f"127.0.0.1:{grpc_port}"]
            elif is_service:
                cmd = [*config.authz, "--grpc", f"127.0.0.1:{grpc_port}"]
                cmd += ["--authz-http", f"127.0.0.1:{authz_http}"]
            else:  # the no-op floor allows everything: no list is marked for the filter
                cmd = [*config.authz, "--authz-http", f"127.0.0.1:{authz_http}"]
            if is_service:
                cmd += ["--http", f"127.0.0.1:{free_port()}"]
            authz = Proc(name, on_cpus(cmd, authz_cpus), tmp / f"authz-{name}.log")
            stack.enter_context(running(authz, check_port))
            assert authz.popen is not None
            deadline = time.monotonic() + 60
            while listening_sockets(check_port) < config.workers:
                if time.monotonic() > deadline or authz.popen.poll() is not None:
                    raise RuntimeError(f"{config.key} did not start:\n{authz.output()[-3000:]}")
                time.sleep(0.1)
            pids = process_tree(authz.popen.pid)
        stack.enter_context(running(envoy, listen))
        assert envoy.popen is not None
        wait_for_port(admin, envoy.popen, envoy.log)
        yield Serving(f"http://127.0.0.1:{listen}/mcp", admin, pids, load_cpus)


def run_config(
    config: Config,
    tmp: Path,
    inputs: Path,
    seconds: float,
    rate: float,
    store: RedisServer,
    earlier: Result | None = None,
) -> Result:
    """Saturation, then the fixed rate; with ``earlier``, both again, and the result keeps
    the better saturation run and the fixed-rate run with the lower p99."""
    client = store.client()
    client.flushall()
    client.config_resetstat()
    with serving(config, tmp, store) as up:
        wrk(up.url, inputs, WARMUP_S, SATURATION_CONNECTIONS, up.load_cpus)
        ticks_before = [cpu_ticks(p) for p in up.pids]
        sat = measure(up, inputs, seconds, SATURATION_CONNECTIONS, client)
        per_process = [
            (_role(p, up.pids[0]), (cpu_ticks(p) - t) / CLK_TCK)
            for p, t in zip(up.pids, ticks_before, strict=True)
        ]
        paced = measure(up, inputs, seconds, PACED_CONNECTIONS, client, rate)
        low = None
        if config.key in LOW_RATE_CONFIGS:
            low = measure(up, inputs, LOW_RATE_S, PACED_CONNECTIONS, client, LOW_RATE)
    client.close()
    if earlier is None:
        return Result(config, sat, paced, per_process, low=low)
    if earlier.paced.latency_us["p99"] < paced.latency_us["p99"]:
        paced = earlier.paced
    if earlier.low is not None and low is not None:
        low = min(earlier.low, low, key=lambda m: m.cpu_us_per_check or float("inf"))
    if sat.rps > earlier.saturation.rps:
        return Result(config, sat, paced, per_process, rounds=2, low=low)
    return Result(config, earlier.saturation, paced, earlier.per_process_cpu_s, rounds=2, low=low)


def client_commands(store: RedisServer, action: Callable[[], None]) -> list[str]:
    """The commands clients sent to Redis while ``action`` ran, i.e. the round trips (Redis's
    own statistics also count the commands a Lua script runs, MONITOR tells them apart)."""
    end = f"bench-end-{os.getpid()}-{time.monotonic_ns()}"
    sent: list[str] = []
    ready = threading.Event()

    def watch() -> None:
        with store.client() as client, client.monitor() as monitor:
            ready.set()
            for command in monitor.listen():
                if command["command"] == f"ECHO {end}":
                    return
                if command["client_type"] != "lua":
                    sent.append(command["command"].split(" ", 1)[0].upper())

    with store.client() as client:
        client.ping()  # connected (and its handshake done) before MONITOR starts
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        ready.wait(5)
        time.sleep(0.2)  # MONITOR is registered once the server has answered it
        action()
        client.echo(end)
        watcher.join(10)
    return sent


def round_trips(
    config: Config, tmp: Path, store: RedisServer, reqs: list[mix.Request]
) -> dict[str, Any]:
    """Exactly how many Redis round trips a check costs, with and without a limit to spend:
    200 calls of each kind sent one at a time through Envoy and mcp-authz (Redis store)."""
    out: dict[str, Any] = {}
    with serving(config, tmp, store) as up:
        conn = HTTPConnection("127.0.0.1", int(up.url.rsplit(":", 1)[1].split("/")[0]), timeout=5)

        def send(req: mix.Request) -> int:
            conn.request("POST", "/mcp", body=req.body, headers=dict(req.headers))
            resp = conn.getresponse()
            resp.read()
            return resp.status

        for needs_counter in (False, True):
            sample = [
                r for r in reqs if r.method == "tools/call" and r.needs_counter == needs_counter
            ]
            sample = sample[:200]
            send(sample[0])  # opens the connections before counting
            statuses: list[int] = []
            sent = client_commands(store, lambda: statuses.extend(map(send, sample)))  # noqa: B023
            out["with_limit" if needs_counter else "without_limit"] = {
                "checks": len(sample),
                "allowed": statuses.count(200),
                "commands": dict(collections.Counter(sent)),
                "per_check": len(sent) / len(sample),
            }
        conn.close()
    return out


# --- the report -----------------------------------------------------------------------------


def _version(cmd: list[str], pattern: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except OSError:
        return "?"
    found = re.search(pattern, done.stdout + done.stderr)
    return found.group(1) if found else "?"


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    mem = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
    return {
        "CPU": model.group(1).strip() if model else platform.processor(),
        "cores (nproc)": str(len(os.sched_getaffinity(0))),
        "memory": f"{int(mem.group(1)) / 1024 / 1024:.1f} GiB" if mem else "?",
        "kernel": f"{platform.system()} {platform.release()}",
        "load average before the run (1, 5, 15 min)": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "Python": platform.python_version(),
        "grpcio": grpc.__version__,
        "Envoy": _version([str(BIN / "envoy"), "--version"], r"version: \S+/([\d.]+)"),
        "wrk": _version(["wrk", "-v"], r"wrk (?:\S+/)?([\d.]+)"),
        "redis-server": _version([redis_server_binary(), "--version"], r"v=(\S+)"),
    }


def calibration_ms() -> float:
    """CPU time of a fixed single-thread Python workload, best of 3. On a VM the same work
    takes longer while the host is busy, so this at the start and at the end of the run
    says how far the machine's speed moved during it."""
    best = float("inf")
    for _ in range(3):
        started = time.thread_time()
        table: dict[int, int] = {}
        for i in range(300_000):
            table[i % 1_000] = table.get(i % 1_000, 0) + i
        best = min(best, time.thread_time() - started)
    return best * 1000


def wake_cost_us() -> tuple[float, float]:
    """CPU time of a small fixed Python workload run back to back, and each time after
    20 ms asleep (median of 200 runs each). The second is what a service pays per request
    at a low rate, when every request wakes it: on a VM the caches it left are cold by
    then, so the same instructions take longer."""

    def work() -> int:
        table: dict[str, str] = {}
        for i in range(10):
            table[str(i)] = json.dumps({"a": i, "b": [1, 2, 3]})
        return len(table)

    out = []
    for gap in (0.0, 0.02):
        runs = []
        for _ in range(200):
            if gap:
                time.sleep(gap)
            started = time.thread_time_ns()
            work()
            runs.append(time.thread_time_ns() - started)
        out.append(statistics.median(runs) / 1000)
    return out[0], out[1]


def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def _opt(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _low_summary(result: Result) -> str:
    low = result.low
    if low is None:
        return ""
    return f"; at {LOW_RATE:g}/s CPU {_opt(low.cpu_us_per_check, '.0f')} µs/check"


def _verdict(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def render(
    started: float,
    elapsed: float,
    note: str,
    host: dict[str, str],
    setup: dict[str, Any],
    results: list[Result],
    trips: dict[str, Any],
    micro_shapes: list[micro.Timing],
    micro_stages: list[micro.Timing],
    woken_rows: list[woken.Woken],
    counts: list[instructions.Count],
) -> str:
    by = {r.config.key: r for r in results}
    rate = setup["rate"]
    lines = [
        "# mcp-authz benchmark results",
        "",
        f"Generated by `make bench` (`bench/run.py`) on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} in {elapsed / 60:.1f} "
        "minutes; every figure below was measured by that run. Do not edit by hand.",
        "",
    ]
    if note:
        lines += [f"> {note}", ""]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in host.items()]
    lines += [
        "",
        "## Set-up",
        "",
        f"- Envoy `--concurrency {ENVOY_CONCURRENCY}` with `envoy/envoy.yaml`, changed only so "
        "that Envoy answers `/mcp` itself (`direct_response` 200, so no MCP server is measured), "
        "and the access log is off (its ext_authz cluster allows a few HTTP/2 streams per "
        "connection, so Envoy opens several connections, which `--workers` needs). "
        "Configuration 1 has no ext_authz filter; 7 and 8 use `envoy/envoy-http.yaml` (Envoy's "
        "HTTP ext_authz mode, HTTP/1.1 connections to the authorization service) changed the "
        "same way. 3n has `envoy/envoy.yaml` without the list filter: no ext_proc filter, no "
        "routes for the requests ext_authz marks (`x-mcp-authz-*`), no removal of clients' "
        "copies of those marks, no `clear_route_cache`. 3c and 3n replay the mix without its "
        "`tools/list` requests (the only ones that go through the list filter), so that "
        "3n/3c is what the filter costs every other request.",
        f"- Load: wrk {host['wrk']} with `bench/mix.lua` replaying {setup['requests']:,} "
        f"pre-rendered requests: {setup['calls']:,} `tools/call` (bodies {setup['body_min']:,} "
        f"to {setup['body_max']:,} B, median {setup['body_median']:,} B), "
        f"{setup['lists']:,} `tools/list`, {setup['notifications']:,} notifications, over "
        f"{mix.GRANTS:,} grants (one bearer token each); {setup['limited_share']:.0%} of the "
        "requests call a tool with a limit (a Redis round trip), the rest need no counter.",
        f"- Saturation: {SATURATION_CONNECTIONS} connections for {setup['seconds']:.0f} s after "
        f"a {WARMUP_S} s warm-up. Run order 1, 2, 3, 5, 3c, 3n, 4, 7, 8, 6, then "
        f"{', '.join(reversed(REPEATED))}"
        " again (the better saturation run, and the fixed-rate run with the lower p99, of "
        "those count, so that the ratios of the targets are not decided by a burst of load "
        "elsewhere on the machine: it is a VM on a shared host).\n"
        f"- Latency: a fixed offered rate of {rate:g} requests/s "
        f"({PACED_CONNECTIONS} connections, each waiting for the next send slot of a fixed "
        f"schedule) for {setup['seconds']:.0f} s; wrk's latency starts when a request is "
        "written, so it is the latency at that rate without queueing in the generator.",
        f"- CPU: {setup['pinning']}",
        "- Checks are counted by Envoy (`http.mcp.ext_authz.*` stats); CPU time per check is "
        "the user+system time of the authorization process(es) from `/proc/<pid>/stat` "
        "over the run divided by the checks; Redis commands from `INFO commandstats` "
        "(scripts: `EVALSHA` and the like; all commands: those the scripts ran included).",
        "",
        "## Results",
        "",
        f"| # | configuration | requests/s at saturation | p50 / p99 / p99.9 ms at "
        f"{rate:g}/s | achieved rate | authz CPU µs/check (saturation / at {rate:g}/s) | "
        "Redis scripts / all commands per check | errors |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(results, key=lambda r: r.config.key):
        sat, paced = r.saturation, r.paced
        lat = paced.latency_us
        errors = {**sat.problems, **{f"paced {k}": v for k, v in paced.problems.items()}}
        lines.append(
            f"| {r.config.key} | {r.config.title} | {sat.rps:,.0f} | "
            f"{_ms(lat['p50'])} / {_ms(lat['p99'])} / {_ms(lat['p999'])} | {paced.rps:,.0f} | "
            f"{_opt(sat.cpu_us_per_check, '.0f')} / {_opt(paced.cpu_us_per_check, '.0f')} | "
            f"{_opt(sat.scripts_per_check, '.2f')} / {_opt(sat.redis_per_check, '.2f')} | "
            f"{', '.join(f'{k} {v}' for k, v in errors.items()) or 'none'} |"
        )
    workers = [r for r in results if r.config.key.startswith("6")]
    if workers:
        lines += [
            "",
            "CPU seconds of each process during the saturation run of configuration 6 (how "
            "evenly the kernel spread Envoy's connections over the workers):",
            "",
        ]
        lines += [
            f"- N={r.config.workers}: "
            + ", ".join(f"{name} {cpu:.2f}" for name, cpu in r.per_process_cpu_s)
            for r in workers
        ]
    three, two, one, five = by["3"], by["2"], by["1"], by["5"]
    floor_ratio = three.saturation.rps / two.saturation.rps
    ceiling_ratio = three.saturation.rps / one.saturation.rps
    added_p99 = (three.paced.latency_us["p99"] - one.paced.latency_us["p99"]) / 1000
    size_ratio = five.saturation.rps / three.saturation.rps
    with_limit, without = trips["with_limit"], trips["without_limit"]
    trips_ok = with_limit["per_check"] <= 1 and without["per_check"] == 0
    lines += [
        "",
        "## Targets",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        f"| 3/2 throughput ≥ {TARGET_FLOOR_RATIO} | {floor_ratio:.2f} "
        f"({three.saturation.rps:,.0f} / {two.saturation.rps:,.0f}) | "
        f"{_verdict(floor_ratio >= TARGET_FLOOR_RATIO)} |",
        f"| 3/1 throughput (reported) | {ceiling_ratio:.2f} | - |",
        f"| p99 added by mcp-authz over 1 at {rate:g}/s ≤ {TARGET_ADDED_P99_MS} ms | "
        f"{added_p99:.2f} ms ({_ms(three.paced.latency_us['p99'])} - "
        f"{_ms(one.paced.latency_us['p99'])}) | {_verdict(added_p99 <= TARGET_ADDED_P99_MS)} |",
        f"| at most one Redis round trip per check, none without a limit | "
        f"{with_limit['per_check']:.2f} commands per check with a limit "
        f"({_calls(with_limit['commands'])}), {without['per_check']:.2f} without, over "
        f"{with_limit['checks']} + {without['checks']} checks sent one at a time | "
        f"{_verdict(trips_ok)} |",
        f"| 5 within {TARGET_POLICY_SIZE:.0%} of 3 | {size_ratio:.3f} | "
        f"{_verdict(abs(size_ratio - 1) <= TARGET_POLICY_SIZE)} |",
    ]
    if "3c" in by and "3n" in by:
        with_filter, without_filter = by["3c"], by["3n"]
        filter_ratio = with_filter.saturation.rps / without_filter.saturation.rps
        lines += [
            f"| 3c/3n throughput ≥ {TARGET_LIST_FILTER_RATIO} (the list filter costs a "
            f"request that is not a list at most {1 - TARGET_LIST_FILTER_RATIO:.0%}) | "
            f"{filter_ratio:.3f} ({with_filter.saturation.rps:,.0f} / "
            f"{without_filter.saturation.rps:,.0f}) | "
            f"{_verdict(filter_ratio >= TARGET_LIST_FILTER_RATIO)} |",
            f"| p99 at {rate:g}/s with the list filter (3c) / without (3n) (reported) | "
            f"{_ms(with_filter.paced.latency_us['p99'])} / "
            f"{_ms(without_filter.paced.latency_us['p99'])} ms | - |",
        ]
    if "8" in by:
        eight = by["8"]
        http_ratio = eight.saturation.rps / two.saturation.rps
        http_p99 = (eight.paced.latency_us["p99"] - one.paced.latency_us["p99"]) / 1000
        lines += [
            f"| 8/2 throughput ≥ {TARGET_HTTP_OVER_GRPC_FLOOR} (mcp-authz over HTTP against "
            f"the no-op gRPC floor) | {http_ratio:.2f} ({eight.saturation.rps:,.0f} / "
            f"{two.saturation.rps:,.0f}) | {_verdict(http_ratio >= TARGET_HTTP_OVER_GRPC_FLOOR)} |",
            f"| p99 added by 8 over 1 at {rate:g}/s ≤ {TARGET_HTTP_ADDED_P99_MS} ms | "
            f"{http_p99:.2f} ms | {_verdict(http_p99 <= TARGET_HTTP_ADDED_P99_MS)} |",
            f"| CPU per check at {rate:g}/s, HTTP (8) beside gRPC (3) (reported) | "
            f"{_opt(eight.paced.cpu_us_per_check, '.0f')} µs / "
            f"{_opt(three.paced.cpu_us_per_check, '.0f')} µs | - |",
        ]
        if eight.low is not None and three.low is not None:
            low_cpu = eight.low.cpu_us_per_check
            lines.append(
                f"| CPU per check at {LOW_RATE:g}/s, HTTP (8) ≤ {TARGET_HTTP_LOW_RATE_CPU_US} "
                f"µs, beside gRPC (3) | {_opt(low_cpu, '.0f')} µs / "
                f"{_opt(three.low.cpu_us_per_check, '.0f')} µs | "
                f"{_verdict(low_cpu is not None and low_cpu <= TARGET_HTTP_LOW_RATE_CPU_US)} |"
            )
    if len(workers) >= 2:
        low, high = workers[0], workers[-1]
        speedup = high.saturation.rps / low.saturation.rps
        per_core = [
            w.saturation.checks / w.saturation.cpu_s if w.saturation.cpu_s else 0.0
            for w in (low, high)
        ]
        held = per_core[1] / per_core[0] if per_core[0] else 0.0
        lines.append(
            f"| 6 scales with cores: per-core throughput (checks per authz CPU-second) at "
            f"N={high.config.workers} ≥ {TARGET_PER_CORE} x N={low.config.workers}, and more "
            f"throughput | {per_core[0]:,.0f} → {per_core[1]:,.0f} per CPU-s ({held:.2f}); "
            f"throughput x{speedup:.2f} | {_verdict(held >= TARGET_PER_CORE and speedup > 1)} |"
        )
    if int(host["cores (nproc)"]) <= 2:
        lines += [
            "",
            "On this machine Envoy, wrk and Redis share the cores with `mcp-authz`, so "
            "configuration 6 cannot show a 2x speed-up here; the per-core figure says whether "
            "the workers keep their per-core throughput, which is what carries over to a "
            "larger machine.",
        ]
    lows = [r for r in sorted(results, key=lambda r: r.config.key) if r.low is not None]
    if lows:
        lines += [
            "",
            f"## CPU per check at a low rate ({LOW_RATE:g} requests/s)",
            "",
            f"The same mix at a fixed {LOW_RATE:g} requests/s for {LOW_RATE_S} s, right after "
            f"the {rate:g}/s run (of two rounds, the one with less CPU per check): every "
            "check now wakes an idle process. Compare the no-op floors (2, 7) with their "
            "saturation figure above, and the Machine section's workload run back to back "
            "and after a sleep.",
            "",
            "| # | configuration | checks | authz CPU µs/check | p50 / p99 ms |",
            "|---|---|---:|---:|---:|",
        ]
        for r in lows:
            assert r.low is not None
            lat = r.low.latency_us
            lines.append(
                f"| {r.config.key} | {r.config.title} | {r.low.checks:,} | "
                f"{_opt(r.low.cpu_us_per_check, '.0f')} | {_ms(lat['p50'])} / "
                f"{_ms(lat['p99'])} |"
            )
    lines += [
        "",
        "## Micro-benchmark: the in-process decision path",
        "",
        "`bench/micro.py`: CheckRequest decode, `envoy.http_request`, `Engine.check` (memory "
        "store), `envoy.check_response`, CheckResponse encode, in one event loop, no network "
        "(except the row with the Redis store, whose CPU time is this process's side of the "
        "round trip to the benchmark's redis-server); the reference policy unless named.",
        "",
        *micro.table(micro_shapes),
        "",
        f"Stages of the first shape ({micro_shapes[0].name}):",
        "",
        *micro.table(micro_stages),
        "",
        "## A check that wakes the process",
        "",
        "`bench/woken.py`: `mcp-authz`'s HTTP protocol fed the bytes Envoy's HTTP mode sends "
        "for the mix, in process (no Envoy, no network), with the no-op decision and with the "
        f"whole check (memory store, metrics, audit line); {woken.RUNS} checks back to back, "
        f"then {woken.RUNS} each after {woken.ASLEEP_S * 1000:.0f} ms asleep in the event loop "
        "(the gap at 50 requests/s); the median thread CPU time of a check. The same "
        "instructions cost this much more when the check wakes the process.",
        "",
        *woken.table(woken_rows),
        "",
        "## Instructions per check: the same path counted, not timed",
        "",
        "`bench/instructions.py`: valgrind's callgrind counts the user-space instructions of "
        f"`AuthorizationService.Check` ({instructions.ITERATIONS} checks per shape, memory "
        "store, metrics and the audit line included, no gRPC and no kernel), split by the "
        "shared object they ran in; the rows over HTTP count the same checks through the HTTP "
        "transport's protocol code (`authz_http`) instead. The host's speed does not move a "
        "count: a change to the code shows here even when the timings above are too noisy to "
        "tell.",
        "",
        *instructions.table(counts),
        "",
    ]
    return "\n".join(lines)


def _calls(commands: dict[str, int]) -> str:
    return ", ".join(f"{k.upper()} {v}" for k, v in sorted(commands.items())) or "no commands"


# --- main -----------------------------------------------------------------------------------


def configurations(tmp: Path, store_url: str) -> list[Config]:
    ref, big = tmp / "policy-reference.json", tmp / "policy-1000-tools.json"
    ref.write_text(json.dumps(mix.reference_policy()))
    big.write_text(json.dumps(mix.big_policy()))
    authz = str(BIN / "mcp-authz")
    redis_store = ["--redis", store_url]
    cores = len(os.sched_getaffinity(0))
    configs = [
        Config("1", "Envoy alone, no ext_authz (ceiling)", None),
        Config(
            "2",
            "no-op Python gRPC ext_authz (floor)",
            [sys.executable, str(ROOT / "bench" / "noop_authz.py")],
        ),
        Config("3", "mcp-authz, Redis store", [authz, "serve", "--policy", str(ref), *redis_store]),
        Config(
            "4",
            "mcp-authz, memory store",
            [authz, "serve", "--policy", str(ref), "--store", "memory"],
        ),
        Config(
            "5",
            f"mcp-authz, Redis store, policy of {mix.BIG_POLICY_TOOLS:,} more tools, "
            f"{mix.BIG_POLICY_PATTERNS} patterns, argument schemas",
            [authz, "serve", "--policy", str(big), *redis_store],
        ),
    ]
    configs += [
        Config(
            "7",
            "no-op ext_authz over Envoy's HTTP mode: mcp-authz's HTTP protocol allowing at "
            "once (HTTP floor)",
            [sys.executable, str(ROOT / "bench" / "noop_authz.py")],
            transport="http",
        ),
        Config(
            "8",
            "mcp-authz over Envoy's HTTP mode, Redis store",
            [authz, "serve", "--policy", str(ref), *redis_store],
            transport="http",
        ),
    ]
    # 5 runs right after 3, and 3n right after 3c, so that a change in the machine's load
    # between them (it is shared) weighs as little as possible on the 5/3 and 3n/3c ratios;
    # the report sorts by key.
    configs[3], configs[4] = configs[4], configs[3]
    configs[4:4] = [
        Config(
            "3c",
            "mcp-authz, Redis store, the mix without its tools/list requests",
            [authz, "serve", "--policy", str(ref), *redis_store],
            lists=False,
        ),
        Config(
            "3n",
            "as 3c, Envoy without the list filter (no ext_proc filter, no routes for the "
            "requests ext_authz marks, no route cache clearing)",
            [authz, "serve", "--policy", str(ref), *redis_store],
            lists=False,
            list_filter=False,
        ),
    ]
    for n in sorted({1, 2, cores}):
        configs.append(
            Config(
                f"6 (N={n})",
                f"mcp-authz --workers {n}, Redis store, not pinned",
                [authz, "serve", "--policy", str(ref), *redis_store, "--workers", str(n)],
                pinned=False,
                workers=n,
            )
        )
    return configs


def profile(tmp: Path, inputs: Path, seconds: int, store: RedisServer, out: Path) -> None:
    """py-spy on configuration 3 at saturation: the raw stacks go to ``out``, the functions
    that hold the most samples (by self and by total time) to stdout."""
    config = next(c for c in configurations(tmp, store.url) if c.key == "3")
    with serving(config, tmp, store) as up:
        wrk(up.url, inputs, WARMUP_S, SATURATION_CONNECTIONS, up.load_cpus)
        spy_cmd = [str(BIN / "py-spy"), "record", "--pid", str(up.pids[0]), "--rate", "250"]
        spy_cmd += ["--duration", str(seconds), "--native", "--format", "raw"]
        spy = subprocess.Popen([*spy_cmd, "--output", str(out)], stdout=subprocess.DEVNULL)
        wrk(up.url, inputs, seconds + 2, SATURATION_CONNECTIONS, up.load_cpus)
        spy.wait(60)
    print_profile(out)
    print(f"\nraw stacks: {out}")


# A frame only the event loop thread has: asyncio's own loop, or uvloop's (mcp-authz uses
# uvloop when it is installed).
_LOOP_FRAMES = (
    "BaseEventLoop._run_once (asyncio/base_events.py)",
    "Runner.run (asyncio/runners.py)",
)


def print_profile(stacks: Path) -> None:
    """The event loop thread's samples: by the deepest Python function (native code counted
    to its Python caller, so "Handle._run" is gRPC's Cython core), and by total time."""
    self_time: collections.Counter[str] = collections.Counter()
    total_time: collections.Counter[str] = collections.Counter()
    samples = loop_samples = 0
    for line in stacks.read_text().splitlines():
        stack, _, text = line.rpartition(" ")
        count = int(text)
        samples += count
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        if not any(f in _LOOP_FRAMES for f in frames):
            continue  # gRPC's and the executor's threads, mostly waiting
        loop_samples += count
        python = [f for f in frames if ".py)" in f or "(<string>)" in f]
        self_time[python[-1]] += count
        for frame in set(python):
            total_time[frame] += count
    print(f"{loop_samples / samples:.0%} of {samples} samples are of the event loop thread")
    for title, counter in (("self", self_time), ("total (self + callees)", total_time)):
        print(f"\n{title}: share of the event loop thread's samples")
        for frame, count in counter.most_common(40):
            print(f"  {count / loop_samples:6.1%}  {frame.replace(str(ROOT) + '/', '')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="per measured run")
    parser.add_argument("--rate", type=float, default=300.0, help="fixed rate for latency")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.md")
    parser.add_argument("--note", default=os.environ.get("BENCH_NOTE", ""), help="put on top")
    parser.add_argument("--only", help="comma-separated configuration keys (for trying out)")
    parser.add_argument("--profile", action="store_true", help="instead: py-spy on configuration 3")
    args = parser.parse_args()
    if not all(shutil.which(tool) for tool in ("wrk", "taskset", "valgrind")):
        print(
            "bench: wrk, taskset and valgrind are needed (make bench installs them)",
            file=sys.stderr,
        )
        return 2
    started = time.time()
    host = machine()
    calibration_before = calibration_ms()
    reqs = mix.requests()
    bodies = [len(r.body) for r in reqs if r.method == "tools/call"]
    load_cpus, authz_cpus = cpu_sets()
    setup = {
        "rate": args.rate,
        "seconds": args.seconds,
        "requests": len(reqs),
        "calls": len(bodies),
        "lists": sum(r.method == "tools/list" for r in reqs),
        "notifications": sum(r.method.startswith("notifications/") for r in reqs),
        "body_min": min(bodies),
        "body_max": max(bodies),
        "body_median": int(statistics.median(bodies)),
        "limited_share": sum(r.needs_counter for r in reqs) / len(reqs),
        "pinning": (
            f"configurations 1-5 pin the authorization process to CPU {authz_cpus} and "
            f"Envoy, wrk and Redis to CPU {load_cpus}; configuration 6 is not pinned."
            if authz_cpus
            else "one core: nothing is pinned."
        ),
    }
    with tempfile.TemporaryDirectory(prefix="mcp-authz-bench-") as name:
        tmp = Path(name)
        inputs = {True: tmp / "mix.bin", False: tmp / "mix-without-lists.bin"}
        mix.write_wrk_input(reqs, inputs[True])
        mix.write_wrk_input([r for r in reqs if r.method != "tools/list"], inputs[False])
        with running_redis(tmp) as store:
            if args.profile:
                stacks = ROOT / ".run" / "profile-stacks.txt"
                profile(tmp, inputs[True], args.seconds, store, stacks)
                return 0
            configs = configurations(tmp, store.url)
            if args.only:
                wanted = args.only.split(",")
                configs = [c for c in configs if c.key.split(" ")[0] in wanted or c.key in wanted]
            results = []
            for config in configs:
                print(f"bench: configuration {config.key}: {config.title}", flush=True)
                mix_file = inputs[config.lists]
                result = run_config(config, tmp, mix_file, args.seconds, args.rate, store)
                print(
                    f"  {result.saturation.rps:,.0f} req/s; p99 "
                    f"{_ms(result.paced.latency_us['p99'])} ms at {result.paced.rps:,.0f}/s; "
                    f"CPU {_opt(result.saturation.cpu_us_per_check, '.0f')} µs/check; "
                    f"Redis {_opt(result.saturation.scripts_per_check, '.2f')} scripts, "
                    f"{_opt(result.saturation.redis_per_check, '.2f')} commands/check; errors "
                    f"{result.saturation.problems or 'none'} {result.paced.problems or 'none'}"
                    + _low_summary(result),
                    flush=True,
                )
                results.append(result)
            # The targets compare 3 with 2, 5 with 3 and 3n with 3c, and 3's p99 with 1's:
            # these run
            # again in the reverse order and the better run counts, so that a passing burst
            # of load from elsewhere on the machine hurts neither side of a ratio alone.
            for n, result in reversed(list(enumerate(results))):
                if result.config.key in REPEATED:
                    print(f"bench: configuration {result.config.key} again", flush=True)
                    mix_file = inputs[result.config.lists]
                    results[n] = run_config(
                        result.config, tmp, mix_file, args.seconds, args.rate, store, result
                    )
                    print(
                        f"  {results[n].saturation.rps:,.0f} req/s, p99 "
                        f"{_ms(results[n].paced.latency_us['p99'])} ms (best)"
                        + _low_summary(results[n]),
                        flush=True,
                    )
            by = {r.config.key: r for r in results}
            if "3c" in by and "3n" in by:
                ratio = by["3c"].saturation.rps / by["3n"].saturation.rps
                print(f"bench: 3c/3n throughput {ratio:.3f}", flush=True)
            print("bench: Redis round trips per check", flush=True)
            reference = next(c for c in configurations(tmp, store.url) if c.key == "3")
            trips = round_trips(reference, tmp, store, reqs)
            print(f"  {json.dumps(trips)}", flush=True)
            print("bench: micro-benchmark", flush=True)
            micro_shapes, micro_stages = asyncio.run(micro.run(redis_url=store.url))
            print("bench: a check that wakes the process", flush=True)
            woken_rows = woken.run(authz_cpus)
            print("bench: instructions per check (callgrind)", flush=True)
            counts = instructions.count()
    if args.only:
        print("bench: --only given, results.md not written", flush=True)
        return 0
    elapsed = time.time() - started
    host[
        "calibration: a fixed Python workload, ms of CPU at the start / the end (lower is faster)"
    ] = f"{calibration_before:.1f} / {calibration_ms():.1f}"
    hot, after_sleep = wake_cost_us()
    host[
        "a small fixed Python workload, µs of CPU run back to back / each after 20 ms asleep "
        "(the cost of waking: see CPU per check at a low rate)"
    ] = f"{hot:.0f} / {after_sleep:.0f}"
    report = render(
        started,
        elapsed,
        args.note,
        host,
        setup,
        results,
        trips,
        micro_shapes,
        micro_stages,
        woken_rows,
        counts,
    )
    args.out.write_text(report)
    print(f"bench: wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
