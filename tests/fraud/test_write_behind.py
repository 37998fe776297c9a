"""Write-behind of fraud decisions on real PostgreSQL + Redis: the recorder and the Redis window state.

The recorder is driven in-process against a decision stream of each test's own (the module constant
is patched), so a fraud server of another module, or entries left in the shared stream by an earlier
run, can neither take these entries nor hand over theirs; assertions are about this test's tenant only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import numpy as np
import orjson
import pytest
import redis
import redis.asyncio as aioredis
from sqlalchemy import text

from services.fraud import recorder, redis_state
from services.fraud.features import FEATURE_NAMES, SECONDS_PER_DAY
from services.fraud.recorder import DEAD_LETTER_STREAM, GROUP, DecisionRecorder, write_records
from services.fraud.redis_state import RedisWindowState, record_label_sync, terminal_fraud_key
from services.fraud.schemas import Decision, DecisionOut, Reason, TransactionIn
from services.fraud.scoring import decision_record
from shared import streams
from shared.db import session_scope
from shared.kv import RedisMultiplexer
from tests.conftest import Stack, apply_stack_in_process

T0 = 1_790_000_000.0
"""An event time (2026-09-21) for the window tests."""


@pytest.fixture
def redis_url(postgres_stack: Stack) -> str:
    """The PostgreSQL stack's Redis (that stack always has one)."""
    assert postgres_stack.redis_url is not None
    return postgres_stack.redis_url


@pytest.fixture
def tenant_id(redis_url: str) -> Iterator[str]:
    """A tenant of this test's own; its Redis keys are removed afterwards."""
    tenant = f"wb-{uuid4().hex[:8]}"
    yield tenant
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"fraud:{{{tenant}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def stream(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A decision stream (and its consumer group) that only this test reads and writes."""
    name = f"fraud:decisions:test-{uuid4().hex[:8]}"
    monkeypatch.setattr(recorder, "DECISION_STREAM", name)
    monkeypatch.setattr(redis_state, "DECISION_STREAM", name)
    yield name
    client = redis.Redis.from_url(redis_url)
    client.delete(name)
    client.close()


@pytest.fixture
def database(postgres_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """This process pointed at the migrated PostgreSQL + Redis stack."""
    from services.cli import db_upgrade

    apply_stack_in_process(postgres_stack, monkeypatch)
    db_upgrade()
    return postgres_stack


def decision(tenant_id: str, outcome: str, *, tx_id: str | None = None) -> tuple[DecisionOut, dict[str, Any]]:
    """A decision and its record exactly as scoring builds them."""
    tx = TransactionIn(id=tx_id or f"tx-{uuid4().hex[:12]}", timestamp=datetime.fromtimestamp(T0, UTC),
                       customer_id="cust-1", terminal_id="term-1", amount=42.5)
    out = DecisionOut(transaction_id=tx.id, decision=Decision(outcome), score=0.1 if outcome == "approve" else 0.9,
                      reasons=[Reason(source="rule", code="r-1", description="test rule")],
                      model_version="test", rules_version=1)
    return out, decision_record(tenant_id, tx, np.zeros(len(FEATURE_NAMES)), out)


async def commit_all(redis_url: str, decisions: list[tuple[DecisionOut, dict[str, Any]]]) -> None:
    """Queue decisions as the API does (answer stored, record appended to the stream)."""
    multiplexer = RedisMultiplexer(redis_url)
    try:
        state = RedisWindowState(multiplexer)
        for out, record in decisions:
            assert await state.commit(record["tenant_id"], out.transaction_id, out.model_dump_json().encode(),
                                      record) is None
    finally:
        await multiplexer.close()


def reserve_new(redis_url: str, tenant_id: str, tx_id: str, customer_id: str, terminal_id: str, at: float,
                amount: float) -> Any:
    """Reserve a new transaction on a fresh client; returns its window aggregates."""

    async def reserve() -> Any:
        multiplexer = RedisMultiplexer(redis_url)
        try:
            return await RedisWindowState(multiplexer).reserve(tenant_id, tx_id, customer_id, terminal_id, at,
                                                              amount)
        finally:
            await multiplexer.close()

    reservation = asyncio.run(reserve())
    assert reservation.status == "new" and reservation.aggregates is not None
    return reservation.aggregates


ByteEntries = list[tuple[bytes, dict[bytes, bytes]]]
"""Stream entries (id, fields) as the tests' clients read them: RESP2, bytes (no ``decode_responses``)."""


def byte_entries(reply: object) -> ByteEntries:
    """``reply`` (XRANGE, XREVRANGE, or one stream's part of XREADGROUP) checked and typed as ByteEntries."""
    assert isinstance(reply, list), reply
    entries: ByteEntries = []
    for entry_id, fields in reply:
        assert isinstance(entry_id, bytes) and isinstance(fields, dict), (entry_id, fields)
        entries.append((entry_id, fields))
    return entries


def count(sql: str, **params: object) -> int:
    with session_scope() as session:
        return int(session.execute(text(sql), params).scalar_one())


def test_recorder_replay_after_crash_is_exactly_once(database: Stack, redis_url: str, tenant_id: str, stream: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A recorder that dies after its commit but before XACK leaves its entries pending; another
    recorder claims and replays them, and the replay stores no row, case or entry twice."""
    monkeypatch.setattr(streams, "CLAIM_IDLE_MS", 0)  # the dead recorder's entries count as abandoned at once
    monkeypatch.setattr(streams, "CLAIM_EVERY_S", 0)
    decisions = [decision(tenant_id, "review"), decision(tenant_id, "approve"), decision(tenant_id, "approve")]

    async def scenario() -> tuple[list[bytes], int]:
        client = aioredis.Redis.from_url(redis_url)
        try:
            survivor = DecisionRecorder(client, consumer="survivor")
            await survivor.ensure_group()
            await commit_all(redis_url, decisions)
            read = await client.xreadgroup(GROUP, "dead-recorder", {stream: ">"}, count=100)
            assert isinstance(read, list), read
            [(_, stream_entries)] = read
            entries = byte_entries(stream_entries)
            ids = [entry_id for entry_id, _ in entries]
            write_records([orjson.loads(fields[b"r"]) for _, fields in entries])
            assert count("SELECT count(*) FROM fraud_transactions WHERE tenant_id = :t", t=tenant_id) == 3
            # ... and the process dies here, before XACK
            pending = await client.xpending_range(stream, GROUP, min="-", max="+", count=100)
            assert sorted(p["message_id"] for p in pending) == sorted(ids)
            assert {p["consumer"] for p in pending} == {b"dead-recorder"}
            handled = await survivor.record_once()
            still_pending = await client.xpending_range(stream, GROUP, min="-", max="+", count=100)
            assert not [p for p in still_pending if p["message_id"] in ids]
            remaining = {entry_id for entry_id, _ in byte_entries(await client.xrange(stream))}
            assert not remaining & set(ids), "acknowledged entries must be deleted from the stream"
            assert survivor.recorded == 0, "the replay inserted rows the dead recorder had already committed"
            return ids, handled
        finally:
            await client.aclose()

    ids, handled = asyncio.run(scenario())
    assert len(ids) == 3 and handled == 3
    assert count("SELECT count(*) FROM fraud_transactions WHERE tenant_id = :t", t=tenant_id) == 3
    review_id = decisions[0][0].transaction_id
    assert count("SELECT count(*) FROM fraud_cases WHERE tenant_id = :t", t=tenant_id) == 1
    assert count("SELECT count(*) FROM fraud_cases WHERE tenant_id = :t AND transaction_id = :x",
                 t=tenant_id, x=review_id) == 1


def test_poison_record_is_quarantined_not_dropped(database: Stack, redis_url: str, tenant_id: str,
                                                  stream: str) -> None:
    """A record the database refuses (tenant id longer than its column) goes to the dead-letter stream
    with the error, while the good record of the same batch is stored and the batch is acknowledged."""
    poison_tenant = tenant_id + "x" * (80 - len(tenant_id))
    good_out, good = decision(tenant_id, "review")
    poison_out, poison = decision(poison_tenant, "approve")

    async def scenario() -> tuple[int, list[dict[bytes, bytes]]]:
        client = aioredis.Redis.from_url(redis_url)
        quarantined: list[bytes] = []
        try:
            survivor = DecisionRecorder(client, consumer="survivor")
            await survivor.ensure_group()
            await commit_all(redis_url, [(good_out, good), (poison_out, poison)])
            handled = await survivor.record_once()
            assert await client.xpending_range(stream, GROUP, min="-", max="+", count=100) == []
            assert await client.xlen(stream) == 0
            dead_letters = byte_entries(await client.xrevrange(DEAD_LETTER_STREAM, count=100))
            mine = [(entry_id, fields) for entry_id, fields in dead_letters
                    if orjson.loads(fields[b"r"])["tenant_id"] in (tenant_id, poison_tenant)]
            quarantined = [entry_id for entry_id, _ in mine]
            return handled, [fields for _, fields in mine]
        finally:
            if quarantined:
                await client.xdel(DEAD_LETTER_STREAM, *quarantined)
            await client.aclose()

    handled, quarantined = asyncio.run(scenario())
    assert handled == 2
    assert len(quarantined) == 1
    assert orjson.loads(quarantined[0][b"r"]) == poison
    assert b"too long" in quarantined[0][b"error"]
    assert count("SELECT count(*) FROM fraud_transactions WHERE tenant_id = :t", t=tenant_id) == 1
    assert count("SELECT count(*) FROM fraud_cases WHERE tenant_id = :t", t=tenant_id) == 1
    assert count("SELECT count(*) FROM fraud_transactions WHERE tenant_id LIKE :t", t=f"{tenant_id}x%") == 0


def test_crashed_reservation_is_taken_over_without_double_counting(redis_url: str, tenant_id: str,
                                                                   stream: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A duplicate of a pending reservation is told 'busy'; a reservation never committed (its process
    died) counts in later windows, then, once its lease lapses, is 'seen' and taken over without being
    counted twice; the taken-over answer is what a resend gets."""
    monkeypatch.setattr(redis_state, "PENDING_LEASE_MS", 600_000)  # lapses below when the test says so

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        multiplexer = RedisMultiplexer(redis_url)
        try:
            state = RedisWindowState(multiplexer)
            first = await state.reserve(tenant_id, "tx-a", "cust-c", "term-1", T0, 10.0)
            assert first.status == "new" and first.aggregates is not None
            assert first.aggregates.customer_count_1h == 1
            duplicate = await state.reserve(tenant_id, "tx-a", "cust-c", "term-1", T0, 10.0)
            assert duplicate.status == "busy"
            # tx-a's process dies: nothing is committed
            later = await state.reserve(tenant_id, "tx-b", "cust-c", "term-1", T0 + 60, 20.0)
            assert later.status == "new" and later.aggregates is not None
            assert later.aggregates.customer_count_1h == 2
            assert later.aggregates.customer_amount_sum_1h == 30.0
            assert later.aggregates.seconds_since_prev_customer_tx == 60.0
            await client.delete(redis_state.answer_key(tenant_id, "tx-a"))  # the lease lapses, as its PX ends it
            resend = await state.reserve(tenant_id, "tx-a", "cust-c", "term-1", T0, 10.0)
            assert resend.status == "seen"
            takeover = await state.reserve(tenant_id, "tx-a", "cust-c", "term-1", T0, 10.0, takeover=True)
            assert takeover.status == "new" and takeover.aggregates is not None
            assert takeover.aggregates.customer_count_1h == 1
            assert takeover.aggregates.customer_amount_sum_1h == 10.0
            assert takeover.aggregates.terminal_count_1h == 1
            assert takeover.aggregates.seconds_since_prev_customer_tx is None
            assert await client.zcard(f"fraud:{{{tenant_id}}}:cust:cust-c") == 2
            assert await client.zcard(f"fraud:{{{tenant_id}}}:term:term-1") == 2
            out, record = decision(tenant_id, "approve", tx_id="tx-a")
            await commit_all(redis_url, [(out, record)])
            done = await state.reserve(tenant_id, "tx-a", "cust-c", "term-1", T0, 10.0)
            assert done.status == "done" and done.answer == out.model_dump_json().encode()
        finally:
            await multiplexer.close()
            await client.aclose()

    asyncio.run(scenario())


def test_label_moves_terminal_risk_in_redis(redis_url: str, tenant_id: str) -> None:
    """A fraud label enters the terminal's delayed risk windows ((t - 7 d - W, t - 7 d], as the database
    store) and a reversed label leaves them."""
    labelled_at = T0 + 7 * SECONDS_PER_DAY + 12 * 3600  # the label's tx is inside the delayed 1-day window
    boundary = T0 + 8 * SECONDS_PER_DAY  # the delayed 1-day window is (T0, T0 + 1 d]: T0 is just outside

    def reserve(tx_id: str, at: float) -> Any:
        return reserve_new(redis_url, tenant_id, tx_id, "cust-other", "term-t", at, 5.0)

    first = reserve("tx-fraud", T0)
    assert first.terminal_fraud_delayed_30d == 0
    sync_client = redis.Redis.from_url(redis_url)
    try:
        record_label_sync(sync_client, tenant_id, "term-t", "tx-fraud", T0, is_fraud=True)
        assert sync_client.zscore(terminal_fraud_key(tenant_id, "term-t"), "tx-fraud") == T0
        inside = reserve("tx-later-1", labelled_at)
        assert (inside.terminal_fraud_delayed_1d, inside.terminal_fraud_delayed_7d,
                inside.terminal_fraud_delayed_30d) == (1, 1, 1)
        assert inside.terminal_count_delayed_1d == 1
        edge = reserve("tx-later-2", boundary)
        assert (edge.terminal_fraud_delayed_1d, edge.terminal_fraud_delayed_7d) == (0, 1)
        assert (edge.terminal_count_delayed_1d, edge.terminal_count_delayed_7d) == (0, 1)
        record_label_sync(sync_client, tenant_id, "term-t", "tx-fraud", T0, is_fraud=False)
        reversed_ = reserve("tx-later-3", labelled_at)
        assert (reversed_.terminal_fraud_delayed_1d, reversed_.terminal_fraud_delayed_7d,
                reversed_.terminal_fraud_delayed_30d) == (0, 0, 0)
        assert reversed_.terminal_count_delayed_1d == 1
    finally:
        sync_client.close()


def test_restore_rebuilds_the_redis_windows_from_the_database(database: Stack, redis_url: str,
                                                              tenant_id: str) -> None:
    """After Redis lost a tenant's state, `tessera restore-state fraud` puts stored transactions back in
    the card and terminal windows, labels in the terminal fraud windows, and a second run adds nothing."""
    from services.fraud.restore import restore_window_state
    from shared.db import session_factory

    stored = [decision(tenant_id, "approve") for _ in range(2)]
    assert write_records([record for _, record in stored]) == 2
    with session_scope() as session:
        session.execute(text("UPDATE fraud_transactions SET is_fraud = true WHERE tenant_id = :t AND "
                             "transaction_id = :i"), {"t": tenant_id, "i": stored[0][0].transaction_id})
    sync_client = redis.Redis.from_url(redis_url)
    try:
        for _ in range(2):  # idempotent: the second run re-adds the same members
            with session_factory()() as session:
                assert restore_window_state(session, sync_client, tenant_id) == 2
        assert sync_client.zcard(f"fraud:{{{tenant_id}}}:cust:cust-1") == 2
    finally:
        sync_client.close()

    def reserve(tx_id: str, at: float) -> Any:
        return reserve_new(redis_url, tenant_id, tx_id, "cust-1", "term-1", at, 10.0)

    soon = reserve("tx-after-restore", T0 + 60)
    assert soon.customer_count_1h == 3 and soon.customer_amount_sum_1h == 42.5 * 2 + 10.0
    week_later = reserve("tx-week-later", T0 + 7 * SECONDS_PER_DAY + 3600)
    # the two restored transactions and tx-after-restore, one of them labelled fraud
    assert (week_later.terminal_count_delayed_1d, week_later.terminal_fraud_delayed_1d) == (3, 1)


def test_a_failed_scoring_releases_its_lease(redis_url: str, tenant_id: str, stream: str) -> None:
    """Scoring that fails after the reservation (overload 503, deadline 504) drops the pending lease, so the
    processor's retry is taken over at once instead of waiting the lease out, and counted once."""

    async def scenario() -> None:
        multiplexer = RedisMultiplexer(redis_url)
        try:
            state = RedisWindowState(multiplexer)
            assert (await state.reserve(tenant_id, "tx-shed", "cust-r", "term-r", T0, 7.0)).status == "new"
            await state.release(tenant_id, "tx-shed")
            retry = await state.reserve(tenant_id, "tx-shed", "cust-r", "term-r", T0, 7.0)
            assert retry.status == "seen"
            taken = await state.reserve(tenant_id, "tx-shed", "cust-r", "term-r", T0, 7.0, takeover=True)
            assert taken.aggregates is not None and taken.aggregates.customer_count_1h == 1
            out, record = decision(tenant_id, "approve", tx_id="tx-shed")
            await commit_all(redis_url, [(out, record)])
            await state.release(tenant_id, "tx-shed")  # a committed answer is never released
            assert (await state.reserve(tenant_id, "tx-shed", "cust-r", "term-r", T0, 7.0)).status == "done"
        finally:
            await multiplexer.close()

    asyncio.run(scenario())
