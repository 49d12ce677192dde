"""Human approval of exact calls: the record, its life cycle, and where it is kept.

An approval binds {grant, tool, SHA-256 of the canonical arguments, policy digest}: a call
with any argument changed, from another grant, or under another policy needs its own.
The approval id is shown to the agent so it can tell its user what to ask for; it is not a
capability. Only an operator holding an admin token can approve, through the admin API on
the ``--http`` port, which the shipped Envoy config never routes to.

Approvals live in Redis (every replica sees the same state; approving through one replica
allows the call through another) or, for a single replica, in memory. Each state change
is one atomic step (a Lua script in Redis), so two replicas never both consume one use.
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from importlib.resources import files
from typing import Any, Protocol

import redis.asyncio
from redis.exceptions import RedisError

from authz.store import StoreUnavailable


class State(enum.Enum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    CONSUMED = "consumed"


@dataclass(frozen=True)
class Binding:
    """What an approval is for: one exact call by one grant under one policy."""

    grant: str
    tool: str
    arguments_sha256: str
    argument_names: tuple[str, ...]
    policy_digest: str

    @property
    def key(self) -> str:
        parts = (self.grant, self.tool, self.arguments_sha256, self.policy_digest)
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class Approval:
    """An approval request and its state. Times are Unix seconds."""

    id: str
    grant: str
    tool: str
    arguments_sha256: str
    argument_names: tuple[str, ...]
    policy_digest: str
    state: State
    created_at: float
    expires_at: float
    uses_left: int
    ttl_s: float
    notify: str = ""
    operator: str = ""
    reason: str = ""

    def public(self) -> dict[str, Any]:
        """The JSON form the admin API and the webhook use (no argument values exist here)."""
        out = asdict(self)
        out["state"] = self.state.value
        out["argument_names"] = list(self.argument_names)
        return out


class Verdict(enum.Enum):
    """What :meth:`ApprovalBook.gate` found for a call."""

    CREATED = "created"  # a new request was opened now: notify, deny as pending
    PENDING = "pending"  # a request is already open: deny as pending, no second request
    APPROVED = "approved"  # one use was consumed: the call may go on (limits still apply)
    REJECTED = "rejected"  # an operator said no: deny with their reason


@dataclass(frozen=True)
class Gate:
    verdict: Verdict
    approval: Approval


class ApprovalBook(Protocol):
    """Where approvals are kept. Every method is one atomic step."""

    async def gate(self, binding: Binding, ttl_s: float, uses: int, notify: str) -> Gate:
        """Open a request for ``binding``, report the open one, or consume one approved use."""
        ...

    async def refund(self, approval: Approval) -> None:
        """Give back a use consumed by a call that was then denied (e.g. by a limit)."""
        ...

    async def decide(
        self, approval_id: str, approve: bool, operator: str, reason: str
    ) -> Approval | None:
        """Approve (for the rule's ``ttl`` from now) or reject a pending request.

        ``None`` when the request is unknown or expired.

        Raises :class:`NotPending` when it was already decided.
        """
        ...

    async def get(self, approval_id: str) -> Approval | None: ...

    async def live(self) -> list[Approval]:
        """Every live approval (pending, approved, rejected), oldest first."""
        ...

    async def expired(self) -> list[Approval]:
        """Approvals whose time ran out since the last call, each reported once across
        replicas (a record replaced by an identical new call first is not reported)."""
        ...

    async def close(self) -> None: ...


class NotPending(Exception):
    def __init__(self, state: State) -> None:
        super().__init__(f"approval is already {state.value}")
        self.state = state


def new_id() -> str:
    return "apr_" + secrets.token_hex(10)


def _record(approval: Approval) -> dict[str, str]:
    return {
        "id": approval.id,
        "grant": approval.grant,
        "tool": approval.tool,
        "arguments_sha256": approval.arguments_sha256,
        "argument_names": json.dumps(list(approval.argument_names)),
        "policy_digest": approval.policy_digest,
        "state": approval.state.value,
        "created_at": repr(approval.created_at),
        "expires_at": repr(approval.expires_at),
        "uses_left": str(approval.uses_left),
        "ttl_s": repr(approval.ttl_s),
        "notify": approval.notify,
        "operator": approval.operator,
        "reason": approval.reason,
    }


def _from_record(raw: Mapping[str, str]) -> Approval:
    return Approval(
        id=raw["id"],
        grant=raw["grant"],
        tool=raw["tool"],
        arguments_sha256=raw["arguments_sha256"],
        argument_names=tuple(json.loads(raw["argument_names"])),
        policy_digest=raw["policy_digest"],
        state=State(raw["state"]),
        created_at=float(raw["created_at"]),
        expires_at=float(raw["expires_at"]),
        uses_left=int(raw["uses_left"]),
        ttl_s=float(raw["ttl_s"]),
        notify=raw.get("notify", ""),
        operator=raw.get("operator", ""),
        reason=raw.get("reason", ""),
    )


def _pending(binding: Binding, ttl_s: float, uses: int, notify: str, now: float) -> Approval:
    return Approval(
        id=new_id(),
        grant=binding.grant,
        tool=binding.tool,
        arguments_sha256=binding.arguments_sha256,
        argument_names=binding.argument_names,
        policy_digest=binding.policy_digest,
        state=State.PENDING,
        created_at=now,
        expires_at=now + ttl_s,
        uses_left=uses,
        ttl_s=ttl_s,
        notify=notify,
    )


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
        approval = _pending(binding, ttl_s, uses, notify, time.time())
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
        if approve:
            decided = replace(
                current,
                state=State.APPROVED,
                operator=operator,
                expires_at=time.time() + current.ttl_s,
            )
        else:
            decided = replace(current, state=State.REJECTED, operator=operator, reason=reason)
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

    async def close(self) -> None:
        return None


_PREFIX = "mcpauthz:{approvals}:"
_INDEX = _PREFIX + "index"
_SCRIPTS = files("authz.store")


class RedisApprovals:
    """Approvals in Redis under one hash tag, so they also live in one Cluster slot.

    ``b:<binding>`` is a hash holding the approval; ``i:<id>`` points from an id to its
    binding; ``index`` orders ids by expiry for listing and for reporting expiries once.
    """

    def __init__(self, url: str, timeout_s: float = 0.25) -> None:
        self._timeout_s = timeout_s
        self._client = redis.asyncio.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        self._gate = self._client.register_script(
            _SCRIPTS.joinpath("approval_gate.lua").read_text(encoding="utf-8")
        )
        self._decide = self._client.register_script(
            _SCRIPTS.joinpath("approval_decide.lua").read_text(encoding="utf-8")
        )

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"approvals: {type(exc).__name__}") from exc

    async def gate(self, binding: Binding, ttl_s: float, uses: int, notify: str) -> Gate:
        candidate = _pending(binding, ttl_s, uses, notify, time.time())
        fields = _record(candidate)
        reply = await self._call(
            self._gate(
                keys=[_PREFIX + "b:" + binding.key, _PREFIX + "i:" + candidate.id, _INDEX],
                args=[
                    int(candidate.created_at * 1000),
                    int(ttl_s * 1000),
                    binding.key,
                    *[item for pair in fields.items() for item in pair],
                ],
            )
        )
        verdict, flat = reply[0], reply[1:]
        return Gate(Verdict(verdict), _from_record(dict(zip(flat[::2], flat[1::2], strict=True))))

    async def refund(self, approval: Approval) -> None:
        binding = await self._call(self._client.get(_PREFIX + "i:" + approval.id))
        if binding:
            await self._call(
                self._decide(
                    keys=[_PREFIX + "b:" + binding, _PREFIX + "i:" + approval.id, _INDEX],
                    args=["refund", approval.id, int(time.time() * 1000), "", ""],
                )
            )

    async def decide(
        self, approval_id: str, approve: bool, operator: str, reason: str
    ) -> Approval | None:
        binding = await self._call(self._client.get(_PREFIX + "i:" + approval_id))
        if not binding:
            return None
        reply = await self._call(
            self._decide(
                keys=[_PREFIX + "b:" + binding, _PREFIX + "i:" + approval_id, _INDEX],
                args=[
                    "approve" if approve else "reject",
                    approval_id,
                    int(time.time() * 1000),
                    operator,
                    reason,
                ],
            )
        )
        status, flat = reply[0], reply[1:]
        if status == "missing":
            return None
        approval = _from_record(dict(zip(flat[::2], flat[1::2], strict=True)))
        if status == "conflict":
            raise NotPending(approval.state)
        return approval

    async def _record(self, approval_id: str) -> Approval | None:
        """The stored record, expired or not (records outlive expiry by a grace period)."""
        binding = await self._call(self._client.get(_PREFIX + "i:" + approval_id))
        if not binding:
            return None
        raw = await self._call(self._client.hgetall(_PREFIX + "b:" + binding))
        if not raw or raw.get("id") != approval_id:
            return None
        return _from_record(raw)

    async def get(self, approval_id: str) -> Approval | None:
        approval = await self._record(approval_id)
        return approval if approval is not None and approval.expires_at > time.time() else None

    async def live(self) -> list[Approval]:
        ids = await self._call(self._client.zrangebyscore(_INDEX, int(time.time() * 1000), "+inf"))
        found = [await self.get(i) for i in ids]
        return sorted((a for a in found if a is not None), key=lambda a: a.created_at)

    async def expired(self) -> list[Approval]:
        now_ms = int(time.time() * 1000)
        ids: Sequence[str] = await self._call(self._client.zrangebyscore(_INDEX, "-inf", now_ms))
        reported = []
        for approval_id in ids:
            # ZREM answers 1 to exactly one replica: each expiry is reported once.
            if await self._call(self._client.zrem(_INDEX, approval_id)):
                approval = await self._record(approval_id)
                if approval is not None:
                    reported.append(approval)
        return reported

    async def close(self) -> None:
        await self._client.aclose()


def open_book(url: str) -> ApprovalBook:
    """Approvals beside the counters: in the same Redis, or in memory for ``memory://``.

    Sentinel and Cluster URLs are refused for now rather than silently keeping approvals
    per replica.
    """
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisApprovals(url)
    if url.startswith("memory://"):
        return MemoryApprovals()
    raise ValueError("approvals need a redis://, rediss:// or unix:// Redis (or memory)")
