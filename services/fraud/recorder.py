"""Write-behind of fraud decisions: the ``fraud:decisions`` stream drained into the database in batches.

With Redis configured, scoring answers once the decision record is in the stream
(:mod:`services.fraud.redis_state`); a :class:`DecisionRecorder` (one in each API process, or
``tessera recorder fraud`` in its own, see :func:`main`) reads the stream through a consumer group
and writes whatever has accumulated in one transaction: the rows (``INSERT ... ON CONFLICT DO
NOTHING``), a review case and a bank callback job for each newly stored flagged decision. Entries
are acknowledged only after the commit, so a recorder that dies mid-batch leaves them pending, and
another recorder claims them once idle for ``CLAIM_IDLE_MS``; the conflict clause makes the replay
a no-op (exactly once in effect).

Batching replaces one synchronous commit per request (a ~4 ms disk flush on PostgreSQL) with one
per batch, which is what lets the webhook hold its rate.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import redis.asyncio as aioredis
import sqlalchemy.exc
import uvloop
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.fraud.db import Case, Transaction
from services.fraud.redis_state import DECISION_STREAM
from services.fraud.schemas import Decision, DecisionOut
from services.fraud.tasks import enqueue_callback
from shared.db import session_factory
from shared.kv import async_redis, close_async_redis, redis_configured
from shared.observability import configure_logging

logger = logging.getLogger("tessera.fraud.recorder")

GROUP = "recorders"
BATCH_SIZE = 1000
BLOCK_MS = 20
FLUSH_INTERVAL_S = 0.05
"""At most one database transaction this often (per recorder): rows wait at most this long to be written."""
CLAIM_IDLE_MS = 5000
"""Entries read but unacknowledged this long belong to a dead recorder and are claimed."""
CLAIM_EVERY_S = 2.0
DEAD_LETTER_STREAM = "fraud:decisions:quarantine"
"""Records the database refused (kept with the error for an operator, never dropped)."""
RECORD_ERRORS = (sqlalchemy.exc.DataError, sqlalchemy.exc.IntegrityError, psycopg.DataError,
                 psycopg.IntegrityError, KeyError, TypeError, ValueError)
"""Errors a record itself causes (quarantined); anything else, such as a lost connection, is retried."""


_COPY_COLUMNS = ("tenant_id", "transaction_id", "customer_id", "terminal_id", "tx_time_s", "amount", "currency",
                 "channel", "score", "decision", "reasons", "features", "model_version", "rules_version",
                 "received_at", "request_digest")
_STAGING = "fraud_transactions_staging"


def _copy_ignoring_duplicates(session: Session, records: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """PostgreSQL: COPY the batch into a temporary staging table, then INSERT ... ON CONFLICT DO NOTHING.

    COPY costs a fraction of an INSERT per row in the client (no statement per row, no SQL text
    built per batch size), which matters because the recorder shares the API process's CPU.
    """
    connection = session.connection()
    raw = connection.connection.driver_connection
    columns = ", ".join(_COPY_COLUMNS)
    with raw.cursor() as cursor:
        # every batch: a rolled-back batch takes the table's creation with it
        cursor.execute(f"CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGING} "
                       f"(LIKE fraud_transactions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
        with cursor.copy(f"COPY {_STAGING} ({columns}) FROM STDIN") as copy:
            for record in records:
                copy.write_row(_copy_row(record))
        cursor.execute(f"INSERT INTO fraud_transactions ({columns}) SELECT {columns} FROM {_STAGING} "
                       f"ON CONFLICT (tenant_id, transaction_id) DO NOTHING RETURNING tenant_id, transaction_id")
        return {(tenant, transaction) for tenant, transaction in cursor.fetchall()}


def _copy_row(record: dict[str, Any]) -> tuple[Any, ...]:
    row = _row(record)
    row["reasons"] = orjson.dumps(row["reasons"]).decode()
    row["features"] = orjson.dumps(row["features"]).decode()
    return tuple(row[column] for column in _COPY_COLUMNS)


def _insert_ignoring_duplicates(session: Session, records: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """Insert rows, skipping ids already stored; returns the (tenant, transaction) keys inserted.

    PostgreSQL through psycopg uses COPY; other databases an executemany of one cached statement.
    """
    dialect = session.get_bind().dialect
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        return _copy_ignoring_duplicates(session, records)
    module = {"postgresql": postgresql, "sqlite": sqlite}.get(dialect.name)
    if module is None:  # pragma: no cover - the supported databases are handled above
        raise RuntimeError(f"write-behind is not implemented for {dialect.name}")
    table = Transaction.__table__
    statement = module.insert(table).on_conflict_do_nothing(index_elements=["tenant_id", "transaction_id"])
    statement = statement.returning(table.c.tenant_id, table.c.transaction_id)
    inserted: set[tuple[str, str]] = set()
    for start in range(0, len(records), BATCH_SIZE):  # bounded statements on every database
        chunk = [_row(r) for r in records[start:start + BATCH_SIZE]]
        inserted |= {(tenant, transaction) for tenant, transaction in session.execute(statement, chunk)}
    return inserted


def _row(record: dict[str, Any]) -> dict[str, Any]:
    row = {key: value for key, value in record.items() if key != "received_at_s"}
    row["received_at"] = datetime.fromtimestamp(record["received_at_s"], UTC)
    row.setdefault("request_digest", None)  # a record queued by a version that kept no digest
    return row


def write_records(records: list[dict[str, Any]]) -> int:
    """Store decision records in one transaction; returns how many were new.

    Cases and callbacks are created only for rows this call inserted, so replaying a batch after a
    crash creates none twice.
    """
    if not records:
        return 0
    with session_factory()() as session:
        inserted = _insert_ignoring_duplicates(session, records)
        flagged_new = set()
        for record in records:
            key = (record["tenant_id"], record["transaction_id"])
            if key in inserted and key not in flagged_new and record["decision"] != Decision.approve.value:
                flagged_new.add(key)  # the same record twice in one batch still gets one case
                session.add(Case(tenant_id=key[0], transaction_id=key[1]))
                enqueue_callback(session, key[0], _decision_out(record))
        session.commit()
    return len(inserted)


def _decision_out(record: dict[str, Any]) -> DecisionOut:
    return DecisionOut(transaction_id=record["transaction_id"], decision=Decision(record["decision"]),
                       score=record["score"], reasons=record["reasons"], model_version=record["model_version"],
                       rules_version=record["rules_version"])


class DecisionRecorder:
    """Drains the decision stream into the database until stopped.

    One runs in each API process unless ``TESSERA_RECORDER_IN_API=false``, in which case
    ``tessera recorder fraud`` (:func:`main`) runs it in its own process: the batches then cost the
    API's event loop nothing (measured in bench/fraud.py).
    """

    def __init__(self, client: aioredis.Redis, consumer: str | None = None,
                 flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        self._client = client
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.flush_interval_s = flush_interval_s
        self._stopping = asyncio.Event()
        self._last_claim = 0.0
        self.recorded = 0

    async def ensure_group(self) -> None:
        """Create the consumer group (reading from the stream's start) unless it exists."""
        try:
            await self._client.xgroup_create(DECISION_STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        """Record batches until :meth:`stop`; errors are logged and retried (entries stay pending)."""
        group_ready = False
        while not self._stopping.is_set():
            started = asyncio.get_running_loop().time()
            try:
                if not group_ready:
                    await self.ensure_group()
                    group_ready = True
                await self.record_once()
                # Let records accumulate: one transaction per interval, not one per row at low load.
                await asyncio.sleep(max(0.0, started + self.flush_interval_s - asyncio.get_running_loop().time()))
            except asyncio.CancelledError:
                raise
            except RedisError as exc:  # Redis away: nothing to read, nothing lost; say so once a second
                logger.warning("decision stream unreachable (%r); retrying", exc)
                group_ready = False
                await asyncio.sleep(1.0)
            except Exception:
                logger.exception("recording decisions failed; retrying")
                group_ready = False  # a Redis that lost its data lost the group too: re-create it
                await asyncio.sleep(1.0)

    def stop(self) -> None:
        """Finish the current batch, then return from :meth:`run`."""
        self._stopping.set()

    async def record_once(self) -> int:
        """Read (or claim) one batch, store it, acknowledge it; returns how many entries it handled."""
        entries = await self._claim_abandoned() or await self._read_new()
        if not entries:
            return 0
        ids = [entry_id for entry_id, _ in entries]
        records = await self._parse([fields for _, fields in entries if fields])
        try:
            self.recorded += await asyncio.to_thread(write_records, records)
        except RECORD_ERRORS:
            logger.exception("a batch of %d decision records failed; writing them one by one", len(records))
            await self._write_one_by_one(records)
        # any other error (database down) propagates: the batch stays pending and is retried
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.xack(DECISION_STREAM, GROUP, *ids)
            pipe.xdel(DECISION_STREAM, *ids)
            await pipe.execute()
        return len(ids)

    async def _parse(self, entries: list[dict[bytes, bytes]]) -> list[dict[str, Any]]:
        records = []
        for fields in entries:
            try:
                records.append(orjson.loads(fields[b"r"]))
            except (KeyError, orjson.JSONDecodeError) as exc:
                await self._quarantine(fields.get(b"r", repr(fields).encode()), exc)
        return records

    async def _write_one_by_one(self, records: list[dict[str, Any]]) -> None:
        """Isolate a poison record: it goes to the dead-letter stream, the others are stored."""
        for record in records:
            try:
                self.recorded += await asyncio.to_thread(write_records, [record])
            except RECORD_ERRORS as exc:
                await self._quarantine(orjson.dumps(record), exc)

    async def _quarantine(self, raw: bytes, error: Exception) -> None:
        logger.error("decision record quarantined in %s: %r", DEAD_LETTER_STREAM, error)
        await self._client.xadd(DEAD_LETTER_STREAM, {"r": raw, "error": repr(error)[:2000]})

    async def _read_new(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply = await self._client.xreadgroup(GROUP, self.consumer, {DECISION_STREAM: ">"}, count=BATCH_SIZE,
                                              block=BLOCK_MS)
        return reply[0][1] if reply else []

    async def _claim_abandoned(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        loop_time = asyncio.get_running_loop().time()
        if loop_time - self._last_claim < CLAIM_EVERY_S:
            return []
        self._last_claim = loop_time
        _next, claimed, *_deleted = await self._client.xautoclaim(
            DECISION_STREAM, GROUP, self.consumer, min_idle_time=CLAIM_IDLE_MS, start_id="0-0", count=BATCH_SIZE)
        if claimed:
            logger.warning("claimed %d decision records abandoned by a dead recorder", len(claimed))
        return list(claimed)  # entries deleted meanwhile come back without fields: acknowledged below

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Record everything already in the stream (shutdown, tests)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline and await self.record_once():
            pass


SEPARATE_FLUSH_INTERVAL_S = 0.2
"""A recorder in its own process shares no event loop with requests: larger batches cost less a row."""


def main(argv: list[str]) -> int:
    """``tessera recorder fraud``: drain the decision stream in this process until SIGTERM or Ctrl-C."""
    parser = argparse.ArgumentParser(prog="tessera recorder fraud", description=main.__doc__)
    parser.add_argument("--flush-interval", type=float, default=SEPARATE_FLUSH_INTERVAL_S,
                        help="seconds between database transactions (default %(default)s)")
    args = parser.parse_args(argv)
    configure_logging()
    if not redis_configured():
        print("tessera recorder fraud: TESSERA_REDIS_URL is not set: decisions are committed by the API "
              "itself, there is nothing to record", file=sys.stderr)
        return 2

    async def run() -> None:
        recorder = DecisionRecorder(async_redis(), flush_interval_s=args.flush_interval)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, recorder.stop)
        logger.info("recording fraud decisions as %s", recorder.consumer)
        try:
            await recorder.run()
            await recorder.drain()
        finally:
            await close_async_redis()
        logger.info("recorder stopped after %d rows", recorder.recorded)

    uvloop.run(run())
    return 0
