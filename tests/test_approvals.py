"""Approvals: the book contract (in memory; a real redis-server over TCP, a Unix socket and
TLS; a real Redis Cluster), the engine, tokens."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from authz.admin import admin_app, operator_of, parse_tokens
from authz.approvals import ApprovalBook, Binding, NotPending, State, Verdict
from authz.decision import Reason
from authz.engine import Engine
from authz.mcp import HttpRequest
from authz.policy import compile_policy
from authz.store import StoreUnavailable, open_store
from authz.store.memory_approvals import MemoryApprovals
from devstack.redis_server import (
    ClusterSetup,
    RedisServer,
    free_port,
    make_tls_files,
    running_cluster,
    running_redis,
    tls_supported,
)


def binding(args_digest: str = "a" * 64, grant: str = "b-1") -> Binding:
    return Binding(
        grant=grant,
        tool="start_dicom_export_job",
        arguments_sha256=args_digest,
        argument_names=("datastoreId", "outputS3Uri"),
        policy_digest="p" * 64,
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as setup:
        yield setup


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server on a Unix socket (and a loopback port nobody uses); its URL."""
    socket = tmp_path / "redis.sock"
    server = RedisServer(
        port=free_port(),
        directory=tmp_path,
        extra=["--unixsocket", str(socket), "--unixsocketperm", "700"],
    )
    server.start()
    try:
        yield f"unix://{socket}"
    finally:
        server.terminate()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    """A TLS-only redis-server; its ``rediss://`` URL."""
    if not tls_supported():
        message = "redis-server lacks TLS: `make test` installs Debian's redis-server"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with running_redis(tmp_path, tls=make_tls_files(tmp_path / "tls")) as server:
        yield server.url


@pytest.fixture(params=["memory", "redis", "unix", "tls", "cluster"])
async def book(request: pytest.FixtureRequest) -> AsyncIterator[ApprovalBook]:
    """A book as ``serve`` gets it: from the counter store the URL names."""
    if request.param == "memory":
        url = "memory://"
    elif request.param == "redis":
        url = request.getfixturevalue("redis_server").url
    elif request.param in ("unix", "tls"):
        url = request.getfixturevalue(f"{request.param}_redis")
    else:
        setup: ClusterSetup = request.getfixturevalue("cluster")
        for node in setup.nodes:
            with node.client() as client:
                client.flushall()
        url = setup.url
    store = open_store(url, timeout_s=2.0)
    yield store.approval_book()
    await store.close()


async def test_pending_is_not_duplicated(book: ApprovalBook) -> None:
    first = await book.gate(binding(), 60, 1, "")
    assert first.verdict is Verdict.CREATED and first.approval.state is State.PENDING
    again = await book.gate(binding(), 60, 1, "")
    assert again.verdict is Verdict.PENDING and again.approval.id == first.approval.id
    assert [a.id for a in await book.live()] == [first.approval.id]


async def test_approved_once_then_pending_again(book: ApprovalBook) -> None:
    opened = (await book.gate(binding(), 60, 1, "")).approval
    assert opened.decided_at == 0
    decided = await book.decide(opened.id, True, "alice", "")
    assert decided is not None and decided.state is State.APPROVED and decided.operator == "alice"
    assert decided.decided_at >= opened.created_at  # the record says when it was decided
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
    assert rejected.decided_at >= opened.created_at
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


async def test_an_expired_request_replaced_by_a_new_one_is_still_reported(
    book: ApprovalBook,
) -> None:
    opened = (await book.gate(binding(), 0.3, 1, "")).approval
    await asyncio.sleep(0.45)
    again = await book.gate(binding(), 60, 1, "")
    assert again.verdict is Verdict.CREATED and again.approval.id != opened.id
    assert [a.id for a in await book.expired()] == [opened.id]
    assert [a.id for a in await book.live()] == [again.approval.id]


async def test_replicas_share_state(redis_server: RedisServer) -> None:
    stores = [open_store(redis_server.url, timeout_s=2.0) for _ in range(2)]
    one, two = (store.approval_book() for store in stores)
    try:
        opened = (await one.gate(binding(), 60, 1, "")).approval
        assert (await two.gate(binding(), 60, 1, "")).verdict is Verdict.PENDING
        await two.decide(opened.id, True, "alice", "")
        results = await asyncio.gather(*(b.gate(binding(), 60, 1, "") for b in (one, two) * 5))
        # Exactly one of ten concurrent identical calls consumes the single use.
        assert [g.verdict for g in results].count(Verdict.APPROVED) == 1
    finally:
        for store in stores:
            await store.close()


async def test_listing_is_one_round_trip(redis_server: RedisServer) -> None:
    store = open_store(redis_server.url, timeout_s=2.0)
    book = store.approval_book()
    try:
        for n in range(20):
            await book.gate(binding(f"{n:064x}"), 60, 1, "")
        with redis_server.client() as client:
            client.config_resetstat()
            listed = await book.live()
            stats = client.info("commandstats")
    finally:
        await store.close()
    assert len(listed) == 20
    # This test's own commands (Redis 7 names subcommands: cmdstat_config|resetstat).
    inspecting = ("cmdstat_info", "cmdstat_config")
    ours = {name: s["calls"] for name, s in stats.items() if name.split("|")[0] not in inspecting}
    assert ours == {"cmdstat_hvals": 1}, ours


async def test_a_paused_redis_fails_within_the_store_timeout(redis_server: RedisServer) -> None:
    """The book answers on the store's timeout and maps the failure as the counters do."""
    store = open_store(redis_server.url, timeout_s=0.05)
    book = store.approval_book()
    try:
        await book.gate(binding(), 60, 1, "")  # connected, scripts loaded
        redis_server.pause()
        try:
            with pytest.raises(StoreUnavailable, match="timed out"):
                await asyncio.wait_for(book.gate(binding(), 60, 1, ""), timeout=5)
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(book.live(), timeout=5)
        finally:
            redis_server.resume()
        assert (await book.gate(binding(), 60, 1, "")).verdict is Verdict.PENDING
    finally:
        await store.close()


def test_the_engine_and_the_policy_import_no_io_library() -> None:
    code = (
        "import sys, authz.engine, authz.policy, authz.approvals, authz.store; "
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('redis', 'hiredis', 'aiohttp', 'grpc')); "
        "assert not loaded, loaded"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


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
    return HttpRequest(method="POST", headers=headers, body=json.dumps(doc).encode())


def _call(name: str, id_: int = 1, **arguments: object) -> dict[str, object]:
    params = {"name": name, "arguments": arguments}
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": params}


async def test_engine_events_and_batches() -> None:
    events: list[tuple[str, str]] = []
    book = MemoryApprovals()
    engine = Engine(
        compile_policy(APPROVAL_POLICY),
        open_store("memory://", timeout_s=1.0),
        approvals=book,
        approval_events=lambda event, approval: events.append((event, approval.id)),
    )
    first = (await engine.check(_post(_call("start_dicom_export_job", datastoreId="d")))).decision
    assert first.reason is Reason.APPROVAL_REQUIRED and first.approval_id
    assert json.loads(first.reply_body())["error"]["data"]["approvalId"] == first.approval_id
    assert events == [("requested", first.approval_id)]
    batch = [_call("containerize_app", 1), _call("start_dicom_export_job", 2, datastoreId="d")]
    in_batch = (await engine.check(_post(batch))).decision
    assert in_batch.reason is Reason.APPROVAL_REQUIRED
    assert in_batch.message.endswith("send a call that needs approval on its own")
    await book.decide(first.approval_id, True, "alice", "")
    assert (await engine.check(_post(batch))).decision.reason is Reason.APPROVAL_REQUIRED
    allowed = (await engine.check(_post(_call("start_dicom_export_job", datastoreId="d")))).decision
    assert allowed.allowed
    assert events[-1] == ("consumed", first.approval_id)


async def test_without_a_book_require_approval_just_denies() -> None:
    engine = Engine(compile_policy(APPROVAL_POLICY), open_store("memory://", timeout_s=1.0))
    decision = (
        await engine.check(_post(_call("start_dicom_export_job", datastoreId="d")))
    ).decision
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


async def test_admin_api_answers_503_while_redis_is_paused(redis_server: RedisServer) -> None:
    token = "ops-token-0123456789abcdef"
    store = open_store(redis_server.url, timeout_s=0.05)
    book = store.approval_book()
    opened = (await book.gate(binding(), 60, 1, "")).approval
    headers = {"Authorization": f"Bearer {token}"}
    client = TestClient(TestServer(admin_app(book, {token: "ops"})))
    await client.start_server()
    try:
        listed = await client.get("/approvals", headers=headers)
        assert [a["id"] for a in (await listed.json())["approvals"]] == [opened.id]
        redis_server.pause()
        try:
            for method, path in (
                ("GET", "/approvals"),
                ("GET", f"/approvals/{opened.id}"),
                ("POST", f"/approvals/{opened.id}/approve"),
            ):
                resp = await client.request(method, path, headers=headers)
                assert resp.status == 503, (method, path)
                assert await resp.json() == {"error": "approval store unavailable"}
        finally:
            redis_server.resume()
        approved = await client.post(f"/approvals/{opened.id}/approve", headers=headers)
        assert approved.status == 200 and (await approved.json())["operator"] == "ops"
    finally:
        await client.close()
        await store.close()
