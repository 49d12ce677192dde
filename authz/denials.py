"""The last denials this process decided, for the console's on-call view.

The audit recording feeds each (would-be) denial's audit line here, so the console shows
exactly what the audit log says, without reading the log back. Only fields that never
carry argument values are kept (the audit line's ``arguments``, present for rules with
``log_arguments``, is not), each string cut to a bounded length, in a ring of fixed size:
memory stays bounded however many denials there are, and recording one costs the same as
recording none.

Each process keeps its own ring: with several replicas or ``--workers N``, a console shows
the denials of the process that answered it; the audit log holds them all.
"""

from __future__ import annotations

from collections import deque
from typing import Any

CAPACITY = 200
# Longer values (a tool name or request id near the body and header limits) are cut here.
MAX_TEXT = 300
FIELDS = (
    "time",
    "request_id",
    "grant",
    "caller_set",
    "server",
    "method",
    "tool",
    "decision",
    "reason",
    "reason_text",
    "rule",
)


class RecentDenials:
    """A ring of the last ``capacity`` denials, newest last."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._ring: deque[dict[str, Any]] = deque(maxlen=capacity)

    @property
    def capacity(self) -> int:
        return self._ring.maxlen or 0

    def add(self, line: dict[str, Any]) -> None:
        """Keep the argument-free fields of one denial's audit line."""
        kept: dict[str, Any] = {}
        for name in FIELDS:
            value = line.get(name)
            kept[name] = value[:MAX_TEXT] if isinstance(value, str) else None
        self._ring.append(kept)

    def newest_first(self) -> list[dict[str, Any]]:
        return list(reversed(self._ring))


recent = RecentDenials()
