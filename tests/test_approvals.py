"""The approval book contract, against a real redis-server and in memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from authz.approvals import (
    ApprovalBook,
    Binding,
    MemoryApprovals,
    NotPending,
    RedisApprovals,
    State,
    Verdict,
)
from tests.support.redis_server import RedisServer


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
    assert await book.expired() == [opened.id]
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
