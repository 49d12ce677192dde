"""In-process counter store: exact for one replica, and the reference for ``window.lua``.

It keeps the same sliding log as the Redis script (entries ``(time_ms, cost)`` per key plus
a running total), so the one contract suite holds for both stores.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import time
from collections import deque
from collections.abc import Sequence

from authz.approvals import ApprovalBook
from authz.store import Charge, Outcome
from authz.store.memory_approvals import MemoryApprovals


class _Log:
    """The accepted charges of one counter key, oldest first, and the sum of their costs."""

    __slots__ = ("entries", "serial", "total", "window_ms")

    def __init__(self, serial: int) -> None:
        self.entries: deque[tuple[int, int]] = deque()
        self.total = 0
        self.window_ms = 0
        # Tells this log's sweep schedule apart from that of an earlier log of the same key.
        self.serial = serial

    def expire(self, cutoff_ms: int) -> int:
        """Drop the entries at or before ``cutoff_ms``; return the cost still live."""
        entries = self.entries
        while entries and entries[0][0] <= cutoff_ms:
            self.total -= entries.popleft()[1]
        return self.total

    def add(self, now_ms: int, cost: int, window_ms: int) -> None:
        entry = (now_ms, cost)
        if self.entries and self.entries[-1][0] > now_ms:
            # The clock stepped back: keep the log ordered, as Redis's sorted set does.
            bisect.insort(self.entries, entry)
        else:
            self.entries.append(entry)
        self.total += cost
        self.window_ms = window_ms

    def due_ms(self) -> int:
        """When the newest entry expires, i.e. when the whole log can be dropped."""
        return self.entries[-1][0] + self.window_ms if self.entries else 0


class MemoryStore:
    """Counter store in this process's memory, for a single replica and local runs.

    Meant for one asyncio loop: :meth:`acquire` never awaits between its check and its
    record, so concurrent acquires cannot both spend the last unit. Keys whose windows
    have fully passed are dropped (see :meth:`_sweep`), so memory follows the live keys
    rather than every key ever seen.
    """

    def __init__(self) -> None:
        self._logs: dict[str, _Log] = {}
        # Min-heap of (due_ms, serial, key): when each log may have expired entirely.
        self._schedule: list[tuple[int, int, str]] = []
        self._serials = itertools.count()
        # Records (session and task ids): key -> (expires at, ttl), in wall-clock ms as
        # Redis keeps them; and a min-heap of (due_ms, key) to drop the expired ones.
        self._records: dict[str, tuple[int, int]] = {}
        self._record_schedule: list[tuple[int, str]] = []

    async def acquire(self, charges: Sequence[Charge], now_ms: int | None = None) -> Outcome:
        """Record every charge if all fit their sliding windows, otherwise none. A charge
        naming a session spends its ``key`` while the session is recorded, else its
        ``fallback``."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        self._sweep(now)
        charges = [self._resolved(charge) for charge in charges]
        used: list[int] = []
        for index, charge in enumerate(charges):
            log = self._logs.get(charge.key)
            live = 0
            if log is not None:
                live = log.expire(now - charge.window_ms)
                if not log.entries:
                    del self._logs[charge.key]
                    log = None
            used.append(live)
            if live + charge.cost > charge.max:
                return Outcome(
                    allowed=False,
                    remaining=tuple(max(c.max - u, 0) for c, u in zip(charges, used, strict=False)),
                    refused=index,
                    retry_after_ms=_retry_after(log, live, charge, now),
                )
        for charge in charges:
            self._record(charge, now)
        return Outcome(
            allowed=True,
            remaining=tuple(c.max - u - c.cost for c, u in zip(charges, used, strict=True)),
        )

    async def record(self, key: str, ttl_ms: int) -> None:
        now = _wall_ms()
        self._sweep_records(now)
        self._records[key] = (now + ttl_ms, ttl_ms)
        heapq.heappush(self._record_schedule, (now + ttl_ms, key))

    async def forget(self, key: str) -> None:
        self._records.pop(key, None)

    async def recorded(self, keys: Sequence[str]) -> tuple[bool, ...]:
        self._sweep_records(_wall_ms())
        return tuple(key in self._records for key in keys)

    async def ping(self) -> None:
        """Always reachable: the counts live in this process."""

    async def close(self) -> None:
        """Forget every count and record."""
        self._logs.clear()
        self._schedule.clear()
        self._records.clear()
        self._record_schedule.clear()

    def _resolved(self, charge: Charge) -> Charge:
        """The charge on the key it spends: its session's (renewing the session record)
        or, when the session is not recorded, its grant's."""
        if charge.session is None or charge.fallback is None:
            return charge
        now = _wall_ms()
        self._sweep_records(now)
        found = self._records.get(charge.session)
        if found is None:
            return Charge(charge.fallback, charge.window_ms, charge.max, charge.cost)
        ttl = found[1]
        self._records[charge.session] = (now + ttl, ttl)  # the heap entry reschedules
        return Charge(charge.key, charge.window_ms, charge.max, charge.cost)

    def _sweep_records(self, now_ms: int) -> None:
        """Drop the expired records: each heap entry, when due, drops its record or (if
        it was renewed since) reschedules it, as :meth:`_sweep` does for the logs."""
        schedule = self._record_schedule
        while schedule and schedule[0][0] <= now_ms:
            _, key = heapq.heappop(schedule)
            found = self._records.get(key)
            if found is None:
                continue
            if found[0] <= now_ms:
                del self._records[key]
            else:
                heapq.heappush(schedule, (found[0], key))

    def approval_book(self) -> ApprovalBook:
        """Approvals in this process too."""
        return MemoryApprovals()

    def _record(self, charge: Charge, now_ms: int) -> None:
        log = self._logs.get(charge.key)
        if log is None:
            log = self._logs[charge.key] = _Log(next(self._serials))
            heapq.heappush(self._schedule, (now_ms + charge.window_ms, log.serial, charge.key))
        log.add(now_ms, charge.cost, charge.window_ms)

    def _sweep(self, now_ms: int) -> None:
        """Drop the logs whose every entry has expired, so idle keys do not pile up.

        Each log has one entry in the schedule; when it comes due, the log is either dropped
        or, if it was written since, rescheduled for its newest entry's expiry. That costs
        O(log keys) per key and window, with no pass over all keys.
        """
        schedule = self._schedule
        while schedule and schedule[0][0] <= now_ms:
            _, serial, key = heapq.heappop(schedule)
            log = self._logs.get(key)
            if log is None or log.serial != serial:
                continue  # the log this entry scheduled is already gone
            due = log.due_ms()
            if due <= now_ms:
                del self._logs[key]
            else:
                heapq.heappush(schedule, (due, serial, key))


def _wall_ms() -> int:
    return int(time.time() * 1000)


def _retry_after(log: _Log | None, used: int, charge: Charge, now_ms: int) -> int:
    """Time until enough of the oldest entries expire for ``charge.cost`` to fit."""
    if log is None or charge.cost > charge.max:
        return charge.window_ms
    need = used + charge.cost - charge.max
    freed = 0
    for ts, cost in log.entries:
        freed += cost
        if freed >= need:
            return ts + charge.window_ms - now_ms
    return charge.window_ms
