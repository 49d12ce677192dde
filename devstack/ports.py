"""Free loopback ports for the processes the tests, the benchmark and the local stack start.

Asking the kernel for port 0 hands out a port of the ephemeral range, the range it also
takes the local port of every outgoing connection from: between the moment a port is
chosen and the moment a process binds it, a client connection elsewhere in the run can
take it, and the process then fails with "Address already in use". So ports are drawn
below that range, where the kernel puts no outgoing connection, checked free, and never
handed out twice by one process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

# The lowest port drawn: above the registered services a machine may run.
_FLOOR = 10_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()
# Not the module-level generator: tests (hypothesis) seed that one.
_draw = random.SystemRandom()


def _ephemeral_start() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def port_is_free(port: int) -> bool:
    """Nothing holds ``port`` on loopback (no listener, no connection in TIME_WAIT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A loopback TCP port nobody holds now, below the ephemeral range, not handed out
    before by this process."""
    top = _ephemeral_start()
    if top - _FLOOR >= 1_000:
        for _ in range(1_000):
            port = _draw.randrange(_FLOOR, top)
            if port not in _handed_out and port_is_free(port):
                _handed_out.add(port)
                return port
    # No room below the ephemeral range on this machine: the kernel's choice, as before.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    _handed_out.add(port)
    return port
