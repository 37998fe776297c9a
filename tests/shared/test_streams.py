"""The write-behind stream recorder on a real Redis, writing to SQLite and to PostgreSQL.

Each test has a stream and a table of its own; the recorder is driven in-process, as an API process
runs it. ``apply`` here is what a vertical supplies: an idempotent INSERT of a batch.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.orm import Session

from shared import streams
from shared.db import session_scope
from shared.streams import RECORD_FIELD, RecordedStream, StreamRecorder, append_record, running_recorders
from tests.conftest import REDIS_TEST_DB, REDIS_TEST_URL, Stack
from tests.support import port_open


@pytest.fixture
def redis_url(stack: Stack) -> str:
    """The fast-state Redis of ``stack`` (the SQLite stack borrows the test Redis)."""
    if not port_open("127.0.0.1", 6379):
        pytest.skip("Redis is not listening on 127.0.0.1:6379: stream recorder tests skipped")
    return stack.redis_url or f"{REDIS_TEST_URL}/{REDIS_TEST_DB - 1}"


@pytest.fixture
def table(stack: Stack) -> Iterator[str]:
    """A table of this test's own: ``id`` unique, ``amount`` required (a null one is a poison record)."""
    name = f"test_stream_rows_{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        session.execute(text(f"CREATE TABLE {name} (id VARCHAR(64) PRIMARY KEY, amount INTEGER NOT NULL)"))
    yield name
    with session_scope() as session:
        session.execute(text(f"DROP TABLE IF EXISTS {name}"))


@pytest.fixture
def stream_name(redis_url: str) -> Iterator[str]:
    name = f"test:stream:{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    client.delete(name, f"{name}:quarantine")
    client.close()


def inserter(table: str, inside_transaction: Callable[[], None] = lambda: None) -> streams.ApplyBatch:
    """An idempotent batch INSERT into ``table``; ``inside_transaction`` runs before the recorder commits."""

    def apply(session: Session, records: list[dict[str, Any]]) -> int:
        inserted = 0
        for record in records:
            result: Any = session.execute(text(f"INSERT INTO {table} (id, amount) VALUES (:id, :amount) "
                                               "ON CONFLICT (id) DO NOTHING"), record)
            inserted += result.rowcount
        inside_transaction()
        return inserted

    return apply


def stored(table: str) -> dict[str, int]:
    with session_scope() as session:
        return {row[0]: row[1] for row in session.execute(text(f"SELECT id, amount FROM {table}"))}


def counted(stream: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("tessera_stream_entries_total", {"stream": stream, "outcome": outcome}) or 0.0


@asynccontextmanager
async def recorder_on(redis_url: str, stream: RecordedStream, consumer: str = "survivor",
                      **options: Any) -> AsyncIterator[tuple[StreamRecorder, aioredis.Redis]]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        recorder = StreamRecorder(client, stream, consumer=consumer, **options)
        await recorder.ensure_group()
        yield recorder, client
    finally:
        await client.aclose()


async def pending_ids(client: aioredis.Redis, stream: RecordedStream) -> list[bytes]:
    pending: list[Any] = await client.xpending_range(stream.name, stream.group, "-", "+", 100)
    return [p["message_id"] for p in pending]


def test_entries_are_acknowledged_only_after_the_commit(redis_url: str, table: str, stream_name: str) -> None:
    """While the batch's transaction is open its entries are still pending; after the commit they are
    acknowledged and deleted, and the rows are there."""
    pending_seen_in_transaction: list[int] = []
    sync_client = redis.Redis.from_url(redis_url)

    def look_at_the_stream() -> None:
        pending_seen_in_transaction.append(int(sync_client.xpending(stream_name, streams.DEFAULT_GROUP)["pending"]))

    stream = RecordedStream(name=stream_name, apply=inserter(table, look_at_the_stream))

    async def scenario() -> None:
        async with recorder_on(redis_url, stream) as (recorder, client):
            for index in range(3):
                await append_record(client, stream_name, {"id": f"r{index}", "amount": index})
            assert await recorder.record_once() == 3
            assert await pending_ids(client, stream) == []
            assert await client.xlen(stream_name) == 0
            assert recorder.recorded == 3

    try:
        asyncio.run(scenario())
    finally:
        sync_client.close()
    assert pending_seen_in_transaction == [3]
    assert stored(table) == {"r0": 0, "r1": 1, "r2": 2}


def test_a_batch_whose_transaction_fails_stays_pending_and_is_applied_later(redis_url: str, table: str,
                                                                          stream_name: str) -> None:
    """A database error that is not the records' fault (here: the table is not there yet) acknowledges
    nothing and quarantines nothing; the same entries are applied once the database takes them."""
    missing = f"{table}_later"
    stream = RecordedStream(name=stream_name, apply=inserter(missing))

    async def scenario() -> None:
        async with recorder_on(redis_url, stream, claim_idle_ms=0, claim_every_s=0) as (recorder, client):
            ids = [await append_record(client, stream_name, {"id": f"r{i}", "amount": i}) for i in range(2)]
            with pytest.raises(Exception, match=missing):
                await recorder.record_once()
            assert sorted(await pending_ids(client, stream)) == sorted(ids)
            with session_scope() as session:
                session.execute(text(f"CREATE TABLE {missing} (id VARCHAR(64) PRIMARY KEY, amount INTEGER NOT NULL)"))
            assert await recorder.record_once() == 2  # its own pending entries, claimed back
            assert await pending_ids(client, stream) == []
            assert not await client.exists(stream.quarantine_stream)

    try:
        asyncio.run(scenario())
        assert stored(missing) == {"r0": 0, "r1": 1}
    finally:
        with session_scope() as session:
            session.execute(text(f"DROP TABLE IF EXISTS {missing}"))


def test_abandoned_entries_are_claimed_and_a_replay_stores_nothing_twice(redis_url: str, table: str,
                                                                          stream_name: str) -> None:
    """A recorder that read a batch and died leaves it pending; another claims it once it is idle past
    the claim time (0 here) and applies it; entries the dead one had already committed are not stored twice."""
    stream = RecordedStream(name=stream_name, apply=inserter(table))

    async def scenario() -> None:
        # claim_idle_ms=0: the dead recorder's entries count as abandoned at once (no idle wait)
        async with recorder_on(redis_url, stream, claim_idle_ms=0, claim_every_s=0) as (survivor, client):
            ids = [await append_record(client, stream_name, {"id": f"r{i}", "amount": i}) for i in range(3)]
            read: Any = await client.xreadgroup(stream.group, "dead-recorder", {stream_name: ">"}, count=10)
            [(_, entries)] = read
            assert [entry_id for entry_id, _ in entries] == ids
            streams.write_batch(stream, [orjson.loads(entries[0][1][RECORD_FIELD])])  # committed, then it died
            assert await survivor.record_once() == 3
            assert await pending_ids(client, stream) == []
            assert await client.xlen(stream_name) == 0
            assert survivor.recorded == 2, "the replay stored again a row the dead recorder had committed"

    claimed_before = counted(stream_name, "claimed")
    asyncio.run(scenario())
    assert stored(table) == {"r0": 0, "r1": 1, "r2": 2}
    assert counted(stream_name, "claimed") - claimed_before == 3


def test_poison_entries_are_quarantined_with_their_error_and_the_rest_stored(redis_url: str, table: str,
                                                                             stream_name: str) -> None:
    """A record the database refuses, an entry that is not JSON and one without a record are moved to
    the quarantine stream with their error; the good records of the same batch are stored, and the
    whole batch is acknowledged."""
    stream = RecordedStream(name=stream_name, apply=inserter(table))

    async def scenario() -> list[dict[bytes, bytes]]:
        async with recorder_on(redis_url, stream) as (recorder, client):
            await append_record(client, stream_name, {"id": "good-1", "amount": 1})
            await append_record(client, stream_name, {"id": "poison", "amount": None})
            await client.xadd(stream_name, {RECORD_FIELD: b"{not json"})
            await client.xadd(stream_name, {b"something": b"else"})
            await append_record(client, stream_name, {"id": "good-2", "amount": 2})
            assert await recorder.record_once() == 5
            assert await pending_ids(client, stream) == []
            assert await client.xlen(stream_name) == 0
            quarantined: Any = await client.xrange(stream.quarantine_stream)
            return [fields for _, fields in quarantined]

    quarantined_before = counted(stream_name, "quarantined")
    quarantined = asyncio.run(scenario())
    assert stored(table) == {"good-1": 1, "good-2": 2}
    assert [fields[RECORD_FIELD] for fields in quarantined] == [
        b"{not json", b"{b'something': b'else'}", orjson.dumps({"id": "poison", "amount": None})]
    assert b"JSONDecodeError" in quarantined[0][b"error"] and b"KeyError" in quarantined[1][b"error"]
    assert b"IntegrityError" in quarantined[2][b"error"]
    assert counted(stream_name, "quarantined") - quarantined_before == 3


def test_a_recorder_in_an_app_writes_while_it_runs_and_drains_when_it_stops(redis_url: str, table: str,
                                                                            stream_name: str) -> None:
    """``running_recorders`` (an API process's lifespan): records appended while it runs become rows;
    those appended as it stops are drained before it returns."""
    stream = RecordedStream(name=stream_name, apply=inserter(table))

    async def scenario() -> None:
        async with recorder_on(redis_url, stream) as (recorder, client):
            async with running_recorders([recorder]):
                await append_record(client, stream_name, {"id": "while-running", "amount": 1})
                for _ in range(500):
                    if await asyncio.to_thread(stored, table):
                        break
                    await asyncio.sleep(0.01)
                assert await asyncio.to_thread(stored, table) == {"while-running": 1}
                await append_record(client, stream_name, {"id": "at-shutdown", "amount": 2})
            assert await client.xlen(stream_name) == 0

    asyncio.run(scenario())
    assert stored(table) == {"while-running": 1, "at-shutdown": 2}
