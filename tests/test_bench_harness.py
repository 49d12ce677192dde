"""The benchmark's in-process harnesses still drive the current code.

``make bench`` is not part of ``make test`` (it takes 15 minutes), so a change to the HTTP
protocol or the check could break its harnesses unseen until the next benchmark run. These
run each harness briefly: no figure is asserted, only that every check it drives is
answered.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import httptools

from bench import woken

ROOT = Path(__file__).resolve().parents[1]


class _Parsed:
    """What httptools reads of one request."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body = b""
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def test_woken_renders_what_envoys_http_mode_sends() -> None:
    """Each request parses as one HTTP/1.1 request whose body is the Content-Length."""
    for raw in woken.envoy_requests()[:20]:
        parsed = _Parsed()
        httptools.HttpRequestParser(parsed).feed_data(raw)
        assert parsed.complete
        assert int(parsed.headers["content-length"]) == len(parsed.body) > 0
        assert parsed.headers["authorization"].startswith("Bearer ")


def test_woken_measures_the_floor_and_the_whole_check(tmp_path: Path) -> None:
    """Both children run (they assert that the connection answered in HTTP)."""
    for flag in ("--floor", "--check"):
        out = tmp_path / f"{flag[2:]}.json"
        cmd = [sys.executable, "-m", "bench.woken", flag, "--out", str(out), "--runs", "3"]
        done = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr[-2000:]
        back_to_back, woken_us = json.loads(out.read_text())
        assert back_to_back > 0 and woken_us > 0


def test_the_instruction_counts_measured_process_runs_every_shape(tmp_path: Path) -> None:
    """bench/instructions.py's measured process, outside valgrind: callgrind_control is
    replaced by a command that records its calls, so every shape's loop runs and is
    toggled (the gRPC shapes and the ones over the HTTP transport)."""
    calls = tmp_path / "calls"
    control = tmp_path / "callgrind_control"
    control.write_text(f'#!/bin/sh\necho "$1" >> {calls}\n')
    control.chmod(control.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.instructions", "--measured-process", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    from bench import instructions

    dumps = calls.read_text().split().count("--dump")
    assert dumps == len(instructions._names()) + 1  # and the empty loop measuring toggling
