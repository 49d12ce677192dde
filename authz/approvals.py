"""Human approval of exact calls: the record, its life cycle, and what keeps it.

An approval binds {grant, tool, SHA-256 of the canonical arguments, policy digest, and the
MCP server under a policy with servers}: a call with any argument changed, from another
grant, under another policy or to another server needs its own.
The approval id is shown to the agent so it can tell its user what to ask for; it is not a
capability. Only an operator holding an admin token can approve, through the admin API on
the ``--http`` port, which the shipped Envoy config never routes to.

This module is the model and the :class:`ApprovalBook` contract only, free of I/O. The
books live beside the counter stores and are chosen by the same ``--redis`` URL: in memory
for a single replica (``authz.store.memory_approvals``), or in Redis, on the counter
store's own connection, timeout and error mapping (``authz.store.redis_approvals``), so
every replica sees the same state and approving through one allows the call through
another. Each state change is one atomic step, so two replicas never both consume a use.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol


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
    # The MCP server, under a policy with servers ("" otherwise, which keeps the keys of
    # approvals made before servers existed).
    server: str = ""
    # The caller set the caller was recognised as (policies with caller sets): shown to the
    # operator; not part of the key, since the grant already names the caller.
    caller: str = ""

    @property
    def key(self) -> str:
        parts: tuple[str, ...] = (self.grant, self.tool, self.arguments_sha256, self.policy_digest)
        if self.server:
            parts += (self.server,)
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
    server: str = ""
    caller: str = ""
    # When an operator approved or rejected it (Unix seconds); 0 while pending.
    decided_at: float = 0.0

    def public(self) -> dict[str, Any]:
        """The JSON form the admin API and the Redis book use (no argument values exist
        here)."""
        out = asdict(self)
        out["state"] = self.state.value
        out["argument_names"] = list(self.argument_names)
        return out

    @classmethod
    def from_public(cls, data: Mapping[str, Any]) -> Approval:
        """The approval a :meth:`public` form describes."""
        return cls(
            id=str(data["id"]),
            grant=str(data["grant"]),
            tool=str(data["tool"]),
            arguments_sha256=str(data["arguments_sha256"]),
            argument_names=tuple(data["argument_names"] or ()),
            policy_digest=str(data["policy_digest"]),
            state=State(data["state"]),
            created_at=float(data["created_at"]),
            expires_at=float(data["expires_at"]),
            uses_left=int(data["uses_left"]),
            ttl_s=float(data["ttl_s"]),
            notify=str(data.get("notify") or ""),
            operator=str(data.get("operator") or ""),
            reason=str(data.get("reason") or ""),
            server=str(data.get("server") or ""),
            caller=str(data.get("caller") or ""),
            decided_at=float(data.get("decided_at") or 0.0),
        )


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
        replicas (a used-up approval replaced by a new request for the same call is over,
        and not reported)."""
        ...


class NotPending(Exception):
    def __init__(self, state: State) -> None:
        super().__init__(f"approval is already {state.value}")
        self.state = state


def new_request(binding: Binding, ttl_s: float, uses: int, notify: str, now: float) -> Approval:
    """A pending request for ``binding``, opened at ``now`` (Unix seconds)."""
    return Approval(
        id="apr_" + secrets.token_hex(10),
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
        server=binding.server,
        caller=binding.caller,
    )
