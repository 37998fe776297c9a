"""Write-behind streams: records answered from Redis, written to the database in batches.

A vertical that answers before its row is written (fraud decisions with Redis state; IIoT readings
and nodule results later) appends each record as JSON to a Redis stream (:func:`append_record`, or
a Lua script writing the same :data:`RECORD_FIELD`) and declares a :class:`RecordedStream`: the
stream's name and ``apply(session, records)``, which writes one batch inside a transaction it does
not commit. A :class:`StreamRecorder` does the rest, the same way for every vertical:

- reads new entries through a consumer group, at most one transaction every ``flush_interval_s``,
  so rows cost one commit per batch instead of one per request;
- claims entries another recorder read but never acknowledged once idle ``CLAIM_IDLE_MS``
  (``XAUTOCLAIM``: that recorder died) and applies them again, so ``apply`` must make a replay a
  no-op (``INSERT ... ON CONFLICT DO NOTHING``, side effects for new rows only);
- acknowledges and deletes entries only after the commit: a crash before it leaves them pending;
- moves an entry that cannot be applied (not JSON, or refused by the database for its content,
  :data:`RECORD_ERRORS`) to the stream's quarantine stream with the error, after retrying its batch
  one record at a time, so one poison record holds up nothing; any other error (database down)
  leaves the batch pending, and it is retried;
- counts entries applied, claimed and quarantined, and batch time, per stream (Prometheus).

A recorder runs in each API process (:func:`running_recorders`) or in a process of its own
(:func:`run_recorder_process`, behind ``tessera recorder <vertical>``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
import psycopg
import redis.asyncio as aioredis
import sqlalchemy.exc
import uvloop
from prometheus_client import Counter, Histogram
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.orm import Session

from shared.db import session_factory
from shared.kv import async_redis, close_async_redis

logger = logging.getLogger("tessera.streams")

Record = dict[str, Any]
ApplyBatch = Callable[[Session, list[Record]], int]
"""Writes a batch of records in the session's transaction (the recorder commits); returns how many were new."""
Entry = tuple[bytes, dict[bytes, bytes] | None]
"""A stream entry: its id and its fields (None for an entry deleted after it was read)."""

RECORD_FIELD = b"r"
"""The entry field that holds the record's JSON."""
DEFAULT_GROUP = "recorders"
BATCH_SIZE = 1000
"""Entries read per batch (and rows per statement, for ``apply`` functions that chunk)."""
BLOCK_MS = 20
FLUSH_INTERVAL_S = 0.05
"""At most one database transaction this often (per recorder): rows wait at most this long to be written."""
SEPARATE_FLUSH_INTERVAL_S = 0.2
"""A recorder in its own process shares no event loop with requests: larger batches cost less a row."""
CLAIM_IDLE_MS = 5000
"""Entries read but unacknowledged this long belong to a dead recorder and are claimed."""
CLAIM_EVERY_S = 2.0
RECORD_ERRORS: tuple[type[Exception], ...] = (
    sqlalchemy.exc.DataError, sqlalchemy.exc.IntegrityError, psycopg.DataError, psycopg.IntegrityError,
    KeyError, TypeError, ValueError)
"""Errors a record itself causes (quarantined); anything else, such as a lost connection, is retried."""

STREAM_ENTRIES = Counter("tessera_stream_entries_total", "Write-behind stream entries, by outcome "
                         "(applied: committed; claimed: taken from a dead recorder; quarantined)",
                         ["stream", "outcome"])
STREAM_BATCH_SECONDS = Histogram("tessera_stream_batch_seconds", "Applying and committing one batch",
                                 ["stream"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                      1, 2.5, 5))


@dataclass(frozen=True, slots=True)
class RecordedStream:
    """A stream a vertical writes behind: where its records are and how a batch of them is stored."""

    name: str
    apply: ApplyBatch
    group: str = DEFAULT_GROUP
    quarantine: str = ""
    """Where records that cannot be applied go; ``<name>:quarantine`` when empty."""
    what: str = "records"
    """What the records are, for log lines ("decision records")."""

    @property
    def quarantine_stream(self) -> str:
        """The stream that keeps refused records with their error (never dropped)."""
        return self.quarantine or f"{self.name}:quarantine"


def write_batch(stream: RecordedStream, records: list[Record]) -> int:
    """Apply ``records`` in one transaction and commit it; returns how many were new."""
    if not records:
        return 0
    with session_factory()() as session:
        inserted = stream.apply(session, records)
        session.commit()
    return inserted


async def append_record(client: aioredis.Redis, stream: str, record: Record) -> bytes:
    """Append ``record`` to ``stream`` as a recorder reads it; returns the entry id."""
    return cast(bytes, await client.xadd(stream, {RECORD_FIELD: orjson.dumps(record)}))


class StreamRecorder:
    """Drains one :class:`RecordedStream` into the database until stopped.

    Every attribute that governs timing can be given per instance; the module constants are the
    defaults, read when the recorder is made.
    """

    def __init__(self, client: aioredis.Redis, stream: RecordedStream, *, consumer: str | None = None,
                 flush_interval_s: float = FLUSH_INTERVAL_S, claim_idle_ms: int | None = None,
                 claim_every_s: float | None = None) -> None:
        self._client = client
        self.stream = stream
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.flush_interval_s = flush_interval_s
        self.claim_idle_ms = CLAIM_IDLE_MS if claim_idle_ms is None else claim_idle_ms
        self.claim_every_s = CLAIM_EVERY_S if claim_every_s is None else claim_every_s
        self._stopping = asyncio.Event()
        self._last_claim = 0.0
        self.recorded = 0
        """Records this recorder stored that were new (a replay adds none)."""
        self._applied = STREAM_ENTRIES.labels(stream.name, "applied")
        self._claimed = STREAM_ENTRIES.labels(stream.name, "claimed")
        self._quarantined = STREAM_ENTRIES.labels(stream.name, "quarantined")
        self._batch_seconds = STREAM_BATCH_SECONDS.labels(stream.name)

    async def ensure_group(self) -> None:
        """Create the consumer group (reading from the stream's start) unless it exists."""
        try:
            await self._client.xgroup_create(self.stream.name, self.stream.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        """Record batches until :meth:`stop`; errors are logged and retried (entries stay pending)."""
        loop = asyncio.get_running_loop()
        group_ready = False
        while not self._stopping.is_set():
            started = loop.time()
            try:
                if not group_ready:
                    await self.ensure_group()
                    group_ready = True
                await self.record_once()
                # Let records accumulate: one transaction per interval, not one per row at low load.
                await asyncio.sleep(max(0.0, started + self.flush_interval_s - loop.time()))
            except asyncio.CancelledError:
                raise
            except RedisError as exc:  # Redis away: nothing to read, nothing lost; say so once a second
                logger.warning("stream %s unreachable (%r); retrying", self.stream.name, exc)
                group_ready = False
                await asyncio.sleep(1.0)
            except Exception:
                logger.exception("recording %s from %s failed; retrying", self.stream.what, self.stream.name)
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
        started = time.perf_counter()
        try:
            self.recorded += await asyncio.to_thread(write_batch, self.stream, records)
            self._applied.inc(len(records))
        except RECORD_ERRORS:
            logger.exception("a batch of %d %s failed; writing them one by one", len(records), self.stream.what)
            await self._write_one_by_one(records)
        # any other error (database down) propagates: the batch stays pending and is retried
        self._batch_seconds.observe(time.perf_counter() - started)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.xack(self.stream.name, self.stream.group, *ids)
            pipe.xdel(self.stream.name, *ids)
            await pipe.execute()
        return len(ids)

    async def _parse(self, entries: list[dict[bytes, bytes]]) -> list[Record]:
        records = []
        for fields in entries:
            try:
                records.append(orjson.loads(fields[RECORD_FIELD]))
            except (KeyError, orjson.JSONDecodeError) as exc:
                await self._quarantine(fields.get(RECORD_FIELD, repr(fields).encode()), exc)
        return records

    async def _write_one_by_one(self, records: list[Record]) -> None:
        """Isolate a poison record: it goes to the quarantine stream, the others are stored."""
        for record in records:
            try:
                self.recorded += await asyncio.to_thread(write_batch, self.stream, [record])
                self._applied.inc()
            except RECORD_ERRORS as exc:
                await self._quarantine(orjson.dumps(record), exc)

    async def _quarantine(self, raw: bytes, error: Exception) -> None:
        logger.error("%s entry quarantined in %s: %r", self.stream.name, self.stream.quarantine_stream, error)
        await self._client.xadd(self.stream.quarantine_stream, {RECORD_FIELD: raw, "error": repr(error)[:2000]})
        self._quarantined.inc()

    async def _read_new(self) -> list[Entry]:
        reply: Any = await self._client.xreadgroup(self.stream.group, self.consumer, {self.stream.name: ">"},
                                                   count=BATCH_SIZE, block=BLOCK_MS)
        return cast(list[Entry], reply[0][1]) if reply else []  # RESP2: [[stream, entries]]

    async def _claim_abandoned(self) -> list[Entry]:
        loop_time = asyncio.get_running_loop().time()
        if loop_time - self._last_claim < self.claim_every_s:
            return []
        self._last_claim = loop_time
        _next, claimed, *_deleted = await self._client.xautoclaim(
            self.stream.name, self.stream.group, self.consumer, min_idle_time=self.claim_idle_ms, start_id="0-0",
            count=BATCH_SIZE)
        if claimed:
            logger.warning("claimed %d %s abandoned by a dead recorder", len(claimed), self.stream.what)
            self._claimed.inc(len(claimed))
        return list(claimed)  # entries deleted meanwhile come back without fields: acknowledged all the same

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Record everything already in the stream (shutdown, tests)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline and await self.record_once():
            pass


@contextlib.asynccontextmanager
async def running_recorders(recorders: Sequence[StreamRecorder]) -> AsyncIterator[None]:
    """Run ``recorders`` on this event loop meanwhile (an API process); on exit stop them and drain."""
    tasks = [asyncio.create_task(recorder.run()) for recorder in recorders]
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.stop()
        for recorder, task in zip(recorders, tasks, strict=True):
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, timeout=5.0)
            try:
                await recorder.drain()
            except Exception:  # entries left in the stream are recorded by the next process
                logger.exception("could not drain %s at shutdown", recorder.stream.name)


def run_recorder_process(make_recorders: Callable[[aioredis.Redis], Sequence[StreamRecorder]], what: str) -> int:
    """The body of ``tessera recorder <vertical>``: record until SIGTERM or Ctrl-C, drain, exit 0.

    ``make_recorders(client)`` builds the vertical's recorders on this process's Redis client;
    ``what`` names them in the log ("recording <what> as <consumer>").
    """

    async def record() -> None:
        recorders = make_recorders(async_redis())

        def stop_all() -> None:
            for recorder in recorders:
                recorder.stop()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop_all)
        logger.info("recording %s as %s", what, ", ".join(recorder.consumer for recorder in recorders))
        try:
            await asyncio.gather(*(recorder.run() for recorder in recorders))
            for recorder in recorders:
                await recorder.drain()
        finally:
            await close_async_redis()
        logger.info("recorder stopped after %d rows", sum(recorder.recorded for recorder in recorders))

    uvloop.run(record())
    return 0
