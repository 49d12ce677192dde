"""``--workers N``: N serving processes on one port, under a parent that supervises them.

One Python process decides on one core. To use more, the parent starts N workers, each a
full ``mcp-authz serve`` (its own event loop, gRPC server and Redis pool) that loads the
policy through the same path as a single process does. They all bind the same gRPC and
HTTP ports with ``SO_REUSEPORT``, so the kernel spreads Envoy's connections across them
(Envoy must open several connections; see the README). The parent serves nothing: it
forwards SIGTERM, SIGINT and SIGHUP to every worker, restarts a worker that died with a
growing delay, and exits once every worker has stopped after it was asked to stop. A
worker that keeps dying right after its start (a crash loop) makes the parent stop the
others and exit non-zero, so the orchestrator sees the failure instead of a service that
silently runs on fewer workers.

Workers are started with ``spawn``, never ``fork``: gRPC's core must not be inherited
across a fork, and a fresh interpreter holds no state of the parent's.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

log = logging.getLogger("mcp_authz.workers")

# A worker's restart waits this long, doubling after each quick death up to the maximum.
RESTART_DELAY_S = 0.5
RESTART_DELAY_MAX_S = 30.0
# A worker that served at least this long was not crash-looping: its delay starts over.
STABLE_AFTER_S = 10.0
# This many quick deaths in a row of one worker: stop everything and exit non-zero.
CRASH_LOOP_DEATHS = 5
# After SIGTERM, a worker still running this long beyond its --drain-seconds is killed.
KILL_AFTER_DRAIN_S = 60.0

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_PR_SET_PDEATHSIG = 1  # prctl(2)
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_STOPPING = (signal.SIGTERM, signal.SIGINT)


@dataclass
class _Slot:
    """One worker position: its current process, and how its recent deaths went."""

    index: int
    process: BaseProcess | None = None
    started_at: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None


@dataclass
class _Supervisor:
    target: Callable[[], int]
    slots: list[_Slot]
    drain_seconds: float
    context: multiprocessing.context.SpawnContext = field(
        default_factory=lambda: multiprocessing.get_context("spawn")
    )
    stop_requested_at: float | None = None

    def start(self, slot: _Slot) -> None:
        process = self.context.Process(
            target=_worker_main,
            args=(self.target, os.getpid()),
            name=f"mcp-authz-worker-{slot.index}",
        )
        process.start()
        slot.process, slot.started_at, slot.restart_at = process, time.monotonic(), None
        log.info("worker %d started (pid %s)", slot.index, process.pid)

    def forward(self, signum: int, _frame: FrameType | None = None) -> None:
        """Signal handler: pass the signal on; SIGTERM and SIGINT also stop the restarts."""
        if signum in _STOPPING and self.stop_requested_at is None:
            self.stop_requested_at = time.monotonic()
        for slot in self.slots:
            if slot.process is not None and slot.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):  # died just now: reaped next
                    os.kill(slot.process.pid, signum)

    def reap(self, slot: _Slot) -> bool:
        """Record the death of ``slot``'s worker; False when it is crash-looping."""
        assert slot.process is not None
        slot.process.join()  # its sentinel fires at exit; this reaps it (at once)
        code = slot.process.exitcode
        if slot.process.pid is not None:  # its live gauges leave the aggregate
            directory = os.environ[MULTIPROC_DIR_ENV]
            mark_process_dead(slot.process.pid, directory)  # type: ignore[no-untyped-call]
        lived = time.monotonic() - slot.started_at
        slot.process.close()
        slot.process = None
        if self.stop_requested_at is not None:
            log.info("worker %d stopped (exit %s)", slot.index, _describe(code))
            return True
        slot.quick_deaths = 0 if lived >= STABLE_AFTER_S else slot.quick_deaths + 1
        if slot.quick_deaths >= CRASH_LOOP_DEATHS:
            log.error(
                "worker %d died %d times within %.0f s of starting (last: %s); giving up",
                slot.index,
                slot.quick_deaths,
                STABLE_AFTER_S,
                _describe(code),
            )
            return False
        delay = min(RESTART_DELAY_MAX_S, RESTART_DELAY_S * 2 ** max(0, slot.quick_deaths - 1))
        slot.restart_at = time.monotonic() + delay
        log.warning(
            "worker %d died (%s) after %.1f s; restarting in %.1f s",
            slot.index,
            _describe(code),
            lived,
            delay,
        )
        return True

    def run(self) -> int:
        for slot in self.slots:
            self.start(slot)
        status = 0
        while True:
            now = time.monotonic()
            if self.stop_requested_at is not None:
                if all(slot.process is None for slot in self.slots):
                    return status
                if now - self.stop_requested_at > self.drain_seconds + KILL_AFTER_DRAIN_S:
                    self.kill_all("did not stop within the grace period")
            else:
                for slot in self.slots:
                    if (
                        slot.process is None
                        and slot.restart_at is not None
                        and slot.restart_at <= now
                    ):
                        self.start(slot)
            running = {slot.process.sentinel: slot for slot in self.slots if slot.process}
            timeout = min(
                [s.restart_at - now for s in self.slots if s.restart_at is not None] + [0.5]
            )
            for sentinel in wait(list(running), timeout=max(0.0, timeout)):
                assert isinstance(sentinel, int)
                if not self.reap(running[sentinel]) and self.stop_requested_at is None:
                    status = 1
                    self.forward(signal.SIGTERM)

    def kill_all(self, why: str) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive():
                log.error("worker %d %s; killing it", slot.index, why)
                slot.process.kill()


def _describe(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"signal {signal.Signals(-exitcode).name}"
    return f"code {exitcode}"


def _worker_main(target: Callable[[], int], parent: int) -> None:
    # A worker must not outlive its supervisor (killed, say, by the OOM killer): the kernel
    # sends it SIGTERM when the parent dies, and it drains and stops as if asked.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(0)
    sys.exit(target())


def supervise(workers: int, target: Callable[[], int], drain_seconds: float = 0.0) -> int:
    """Run ``target`` in ``workers`` spawned processes until asked to stop; the exit status.
    ``drain_seconds``: how long the workers keep answering after SIGTERM.

    ``target`` must be picklable (a module-level function, or a ``functools.partial`` of
    one): each worker unpickles it in a fresh interpreter and exits with what it returns.
    """
    supervisor = _Supervisor(
        target=target, slots=[_Slot(i) for i in range(workers)], drain_seconds=drain_seconds
    )
    for signum in _FORWARDED:
        signal.signal(signum, supervisor.forward)
    log.info("supervising %d workers (pid %d)", workers, os.getpid())
    with _metrics_directory():
        return supervisor.run()


@contextlib.contextmanager
def _metrics_directory() -> Iterator[None]:
    """A fresh directory where every worker's Prometheus samples go (prometheus_client's
    multiprocess mode), named to the workers by ``PROMETHEUS_MULTIPROC_DIR`` before they
    start; ``/metrics`` on any worker adds them up. An operator's own directory is emptied
    of an earlier run's files and kept; one made here is removed at exit."""
    given = os.environ.get(MULTIPROC_DIR_ENV)
    directory = Path(given) if given else Path(tempfile.mkdtemp(prefix="mcp-authz-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_DIR_ENV] = str(directory)
    try:
        yield
    finally:
        if not given:
            shutil.rmtree(directory, ignore_errors=True)
