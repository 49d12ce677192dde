"""Approvals in Redis, beside the counters: on the counter store's own connection.

The book asks its counter store (:class:`authz.store.redis.RedisStore` for one Redis or
the master Sentinel names, :class:`authz.store.cluster.ClusterStore` for a Cluster) to run
its commands, so approvals share the store's connection, its timeout and its error mapping:
a Redis that does not answer in time is :class:`authz.store.StoreUnavailable`, which the
engine turns into a 503 ``store_unavailable`` denial.

Three keys hold every approval, all under the hash tag ``{approvals}`` so they live in one
Cluster slot and each script names every key it touches; approvals come at a human's pace,
so one slot carries them easily:

- ``records``: a hash of approval id -> the approval as JSON (its public form plus the
  binding key);
- ``bindings``: a hash of binding key -> the id of the approval for that exact call;
- ``expiries``: a sorted set of approval id -> expiry in ms, to report each expiry once.

Each state change is one Lua script (``approval_*.lua``), atomic across replicas; reading
one approval or listing them all is one command. Every call is one round trip.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Protocol

from authz.approvals import Approval, Binding, Gate, NotPending, Verdict, new_request
from authz.store.connection import Arg, Script

_PREFIX = "mcpauthz:{approvals}:"
KEYS = [_PREFIX + "records", _PREFIX + "bindings", _PREFIX + "expiries"]
RECORDS = KEYS[0]

GATE = Script.named("approval_gate.lua")
DECIDE = Script.named("approval_decide.lua")
EXPIRED = Script.named("approval_expired.lua")

# Most expired approvals one sweep takes (the rest are taken by the next): bounds the
# time the script holds Redis.
EXPIRED_PER_SWEEP = 500


class Commands(Protocol):
    """How the book reaches Redis: its counter store's way, bounded by the store's
    timeout, every failure raised as :class:`authz.store.StoreUnavailable`."""

    async def script(
        self, operation: str, script: Script, keys: Sequence[str], args: Sequence[Arg]
    ) -> Any: ...

    async def command(self, operation: str, *command: Arg) -> Any: ...


def _approval(raw: bytes | str) -> Approval:
    return Approval.from_public(json.loads(raw))


def _now_ms() -> int:
    return int(time.time() * 1000)


class RedisApprovals:
    """:class:`authz.approvals.ApprovalBook` in Redis, shared by every replica."""

    def __init__(self, redis: Commands) -> None:
        self._redis = redis

    async def gate(self, binding: Binding, ttl_s: float, uses: int, notify: str) -> Gate:
        now_ms = _now_ms()
        request = new_request(binding, ttl_s, uses, notify, now_ms / 1000)
        stored = json.dumps({**request.public(), "binding": binding.key})
        args: list[Arg] = [now_ms, binding.key, stored, now_ms + int(ttl_s * 1000)]
        verdict, raw = await self._redis.script("approval gate", GATE, KEYS, args)
        return Gate(Verdict(verdict.decode()), _approval(raw))

    async def refund(self, approval: Approval) -> None:
        await self._redis.script(
            "approval refund", DECIDE, KEYS, ["refund", approval.id, _now_ms(), "", ""]
        )

    async def decide(
        self, approval_id: str, approve: bool, operator: str, reason: str
    ) -> Approval | None:
        op = "approve" if approve else "reject"
        args: list[Arg] = [op, approval_id, _now_ms(), operator, reason]
        status, *raw = await self._redis.script("approval decide", DECIDE, KEYS, args)
        if status == b"missing":
            return None
        approval = _approval(raw[0])
        if status == b"conflict":
            raise NotPending(approval.state)
        return approval

    async def get(self, approval_id: str) -> Approval | None:
        raw = await self._redis.command("approval get", "HGET", RECORDS, approval_id)
        if raw is None:
            return None
        approval = _approval(raw)
        return approval if approval.expires_at > time.time() else None

    async def live(self) -> list[Approval]:
        raws = await self._redis.command("approval list", "HVALS", RECORDS)
        now = time.time()
        found = (_approval(raw) for raw in raws)
        return sorted((a for a in found if a.expires_at > now), key=lambda a: a.created_at)

    async def expired(self) -> list[Approval]:
        args: list[Arg] = [_now_ms(), EXPIRED_PER_SWEEP]
        raws = await self._redis.script("approval expiries", EXPIRED, KEYS, args)
        return [_approval(raw) for raw in raws]
