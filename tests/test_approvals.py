"""Approvals: the book contract (a real redis-server and in memory), the engine, tokens."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from authz.admin import operator_of, parse_tokens
from authz.approvals import (
    ApprovalBook,
    Binding,
    MemoryApprovals,
    NotPending,
    RedisApprovals,
    State,
    Verdict,
)
from authz.engine import Engine, Reason
from authz.mcp import HttpRequest
from authz.policy import compile_policy
from authz.store import open_store
from devstack.redis_server import RedisServer


def binding(args_digest: str = "a" * 64, grant: str = "b-1") -> Binding:
    return Binding(
        grant=grant,
        tool="start_dicom_export_job",
        arguments_sha256=args_digest,
        argument_names=("datastoreId", "outputS3Uri"),
        policy_digest="p" * 64,
    )


@pytest.fixture(params=["memory", "redis"])
async def book(request: pytest.FixtureRequest) -> AsyncIterator[ApprovalBook]:
    if request.param == "memory":
        yield MemoryApprovals()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis_book = RedisApprovals(server.url)
    yield redis_book
    await redis_book.close()


async def test_pending_is_not_duplicated(book: ApprovalBook) -> None:
    first = await book.gate(binding(), 60, 1, "")
    assert first.verdict is Verdict.CREATED and first.approval.state is State.PENDING
    again = await book.gate(binding(), 60, 1, "")
    assert again.verdict is Verdict.PENDING and again.approval.id == first.approval.id
    assert [a.id for a in await book.live()] == [first.approval.id]


async def test_approved_once_then_pending_again(book: ApprovalBook) -> None:
    opened = (await book.gate(binding(), 60, 1, "")).approval
    decided = await book.decide(opened.id, True, "alice", "")
    assert decided is not None and decided.state is State.APPROVED and decided.operator == "alice"
    used = await book.gate(binding(), 60, 1, "")
    assert used.verdict is Verdict.APPROVED and used.approval.uses_left == 0
    after = await book.gate(binding(), 60, 1, "")
    assert after.verdict is Verdict.CREATED and after.approval.id != opened.id


async def test_uses_and_refund(book: ApprovalBook) -> None:
    opened = (await book.gate(binding(), 60, 2, "")).approval
    await book.decide(opened.id, True, "alice", "")
    first = await book.gate(binding(), 60, 2, "")
    assert first.verdict is Verdict.APPROVED and first.approval.uses_left == 1
    second = await book.gate(binding(), 60, 2, "")
    assert second.verdict is Verdict.APPROVED and second.approval.uses_left == 0
    await book.refund(second.approval)  # e.g. a rate limit then refused that call
    third = await book.gate(binding(), 60, 2, "")
    assert third.verdict is Verdict.APPROVED and third.approval.id == opened.id


async def test_changed_arguments_need_their_own_approval(book: ApprovalBook) -> None:
    opened = (await book.gate(binding("a" * 64), 60, 1, "")).approval
    await book.decide(opened.id, True, "alice", "")
    other = await book.gate(binding("b" * 64), 60, 1, "")
    assert other.verdict is Verdict.CREATED
    other_grant = await book.gate(binding("a" * 64, grant="b-2"), 60, 1, "")
    assert other_grant.verdict is Verdict.CREATED


async def test_reject_carries_the_reason(book: ApprovalBook) -> None:
    opened = (await book.gate(binding(), 60, 1, "")).approval
    rejected = await book.decide(opened.id, False, "bob", "not this datastore")
    assert rejected is not None and rejected.state is State.REJECTED
    gate = await book.gate(binding(), 60, 1, "")
    assert gate.verdict is Verdict.REJECTED
    assert (gate.approval.reason, gate.approval.operator) == ("not this datastore", "bob")
    with pytest.raises(NotPending):
        await book.decide(opened.id, True, "alice", "")


async def test_unknown_ids(book: ApprovalBook) -> None:
    assert await book.decide("apr_nope", True, "alice", "") is None
    assert await book.get("apr_nope") is None


async def test_expiry_is_reported_once(book: ApprovalBook) -> None:
    opened = (await book.gate(binding(), 0.3, 1, "")).approval
    assert (await book.get(opened.id)) is not None
    await asyncio.sleep(0.45)
    assert await book.get(opened.id) is None
    assert await book.decide(opened.id, True, "alice", "") is None
    assert [a.id for a in await book.expired()] == [opened.id]
    assert await book.expired() == []
    assert (await book.gate(binding(), 60, 1, "")).verdict is Verdict.CREATED


async def test_replicas_share_state(redis_server: RedisServer) -> None:
    one, two = RedisApprovals(redis_server.url), RedisApprovals(redis_server.url)
    try:
        opened = (await one.gate(binding(), 60, 1, "")).approval
        assert (await two.gate(binding(), 60, 1, "")).verdict is Verdict.PENDING
        await two.decide(opened.id, True, "alice", "")
        results = await asyncio.gather(*(b.gate(binding(), 60, 1, "") for b in (one, two) * 5))
        # Exactly one of ten concurrent identical calls consumes the single use.
        assert [g.verdict for g in results].count(Verdict.APPROVED) == 1
    finally:
        await one.close()
        await two.close()


APPROVAL_POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "start_dicom_export_job": {"action": "require_approval", "approval": {"uses": 1}},
        "containerize_app": {"action": "allow"},
    },
}


def _post(doc: object) -> HttpRequest:
    headers = {"content-type": "application/json", "authorization": "Bearer agent-token"}
    return HttpRequest(method="POST", path="/mcp", headers=headers, body=json.dumps(doc).encode())


def _call(name: str, id_: int = 1, **arguments: object) -> dict[str, object]:
    params = {"name": name, "arguments": arguments}
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": params}


async def test_engine_events_and_batches() -> None:
    events: list[tuple[str, str]] = []
    book = MemoryApprovals()
    engine = Engine(
        compile_policy(APPROVAL_POLICY),
        open_store("memory://"),
        approvals=book,
        approval_events=lambda event, approval: events.append((event, approval.id)),
    )
    first = await engine.check(_post(_call("start_dicom_export_job", datastoreId="d")))
    assert first.reason is Reason.APPROVAL_REQUIRED and first.approval_id
    assert json.loads(first.reply_body())["error"]["data"]["approvalId"] == first.approval_id
    assert events == [("requested", first.approval_id)]
    batch = [_call("containerize_app", 1), _call("start_dicom_export_job", 2, datastoreId="d")]
    in_batch = await engine.check(_post(batch))
    assert in_batch.reason is Reason.APPROVAL_REQUIRED
    assert in_batch.message.endswith("send a call that needs approval on its own")
    await book.decide(first.approval_id, True, "alice", "")
    assert (await engine.check(_post(batch))).reason is Reason.APPROVAL_REQUIRED
    allowed = await engine.check(_post(_call("start_dicom_export_job", datastoreId="d")))
    assert allowed.allowed
    assert events[-1] == ("consumed", first.approval_id)


async def test_without_a_book_require_approval_just_denies() -> None:
    engine = Engine(compile_policy(APPROVAL_POLICY), open_store("memory://"))
    decision = await engine.check(_post(_call("start_dicom_export_job", datastoreId="d")))
    assert decision.reason is Reason.APPROVAL_REQUIRED and decision.approval_id is None
    assert "approval required" in decision.message


def test_admin_tokens_parse_and_authenticate() -> None:
    tokens = parse_tokens("alice:0123456789abcdefXYZ  # on call\nbob:fedcba9876543210QQ, ")
    assert tokens == {"0123456789abcdefXYZ": "alice", "fedcba9876543210QQ": "bob"}
    assert operator_of("Bearer fedcba9876543210QQ", tokens) == "bob"
    assert operator_of("Bearer fedcba9876543210Q", tokens) is None
    assert operator_of("Basic fedcba9876543210QQ", tokens) is None
    for bad in ("alice", "alice:short", ":0123456789abcdefXYZ"):
        with pytest.raises(ValueError):
            parse_tokens(bad)
