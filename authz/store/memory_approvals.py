"""Approvals in this process's memory: for a single replica and local runs (``memory://``).

The reference behaviour of :class:`authz.approvals.ApprovalBook`; the Redis book
(``authz.store.redis_approvals``) passes the same contract tests. Meant for one asyncio
loop: no method awaits between reading and writing, so each is one atomic step.
"""

from __future__ import annotations

import time
from dataclasses import replace

from authz.approvals import Approval, Binding, Gate, NotPending, State, Verdict, new_request


class MemoryApprovals:
    """Approvals in this process: for a single replica and local runs."""

    def __init__(self) -> None:
        self._by_binding: dict[str, Approval] = {}
        self._binding_of: dict[str, str] = {}
        self._expired: list[Approval] = []

    def _sweep(self) -> None:
        """Move approvals past their expiry out, remembering their ids for :meth:`expired`."""
        now = time.time()
        for key, approval in list(self._by_binding.items()):
            if approval.expires_at <= now:
                del self._by_binding[key]
                self._binding_of.pop(approval.id, None)
                self._expired.append(approval)

    def _current(self, approval_id: str) -> tuple[str, Approval] | None:
        self._sweep()
        key = self._binding_of.get(approval_id)
        approval = self._by_binding.get(key or "")
        if key is None or approval is None or approval.id != approval_id:
            return None
        return key, approval

    async def gate(self, binding: Binding, ttl_s: float, uses: int, notify: str) -> Gate:
        self._sweep()
        key = binding.key
        current = self._by_binding.get(key)
        if current is not None:
            if current.state is State.PENDING:
                return Gate(Verdict.PENDING, current)
            if current.state is State.REJECTED:
                return Gate(Verdict.REJECTED, current)
            if current.state is State.APPROVED:
                left = current.uses_left - 1
                used = replace(
                    current, uses_left=left, state=State.APPROVED if left else State.CONSUMED
                )
                self._by_binding[key] = used
                return Gate(Verdict.APPROVED, used)
            self._binding_of.pop(current.id, None)
        approval = new_request(binding, ttl_s, uses, notify, time.time())
        self._by_binding[key] = approval
        self._binding_of[approval.id] = key
        return Gate(Verdict.CREATED, approval)

    async def refund(self, approval: Approval) -> None:
        found = self._current(approval.id)
        if found is not None and found[1].state in (State.APPROVED, State.CONSUMED):
            key, current = found
            self._by_binding[key] = replace(
                current, uses_left=current.uses_left + 1, state=State.APPROVED
            )

    async def decide(
        self, approval_id: str, approve: bool, operator: str, reason: str
    ) -> Approval | None:
        found = self._current(approval_id)
        if found is None:
            return None
        key, current = found
        if current.state is not State.PENDING:
            raise NotPending(current.state)
        now = time.time()
        if approve:
            decided = replace(
                current,
                state=State.APPROVED,
                operator=operator,
                expires_at=now + current.ttl_s,
                decided_at=now,
            )
        else:
            decided = replace(
                current, state=State.REJECTED, operator=operator, reason=reason, decided_at=now
            )
        self._by_binding[key] = decided
        return decided

    async def get(self, approval_id: str) -> Approval | None:
        found = self._current(approval_id)
        return None if found is None else found[1]

    async def live(self) -> list[Approval]:
        self._sweep()
        return sorted(self._by_binding.values(), key=lambda a: a.created_at)

    async def expired(self) -> list[Approval]:
        self._sweep()
        gone, self._expired = self._expired, []
        return gone
