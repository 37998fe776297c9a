"""Ingestion of sensor readings: files as resumable jobs, gateway and MQTT batches, one validation path.

- :func:`accept_readings`: a batch of long-format rows (``POST /iiot/v1/readings``, the MQTT
  subscriber) validated and written in one transaction of its own; a batch re-sent with the same
  content is recognised by its digest and answered with the first outcome, writing nothing.
- :func:`quarantine_raw`: a payload that is not even rows (not JSON, not a list), kept with its reason.
- :func:`run_file_ingest`: the body of the ``iiot.ingest_file`` job. The file is read in chunks
  (:mod:`services.iiot.readers`); each chunk's readings, quarantined rows, sensor watermarks, the
  ingestion's counters and its checkpoint (``Ingest.rows_done``) commit together. The checkpoint
  moves by compare-and-set, so a worker killed mid-file resumes after the last committed chunk,
  and two workers racing on one ingestion write each chunk once.

Counts: ``rows_read`` are source rows (lines, Parquet rows, batch items); ``rows_kept`` and
``rows_quarantined`` count readings, which for the wide layout are cells of a row.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import orjson
import pandas as pd
from sqlalchemy import func, select, text, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.iiot.db import Ingest, QuarantinedRow, Sensor
from services.iiot.readers import CHUNK_ROWS, FileRefused, FileShape, SourceChunk, file_shape, read_chunks
from services.iiot.store import BinaryRows, binary_rows, dialect_of, stored_lookup, write_quarantine, write_readings
from services.iiot.validation import (
    LONG_COLUMNS,
    Checked,
    Ordered,
    Registry,
    check_rows,
    check_watermarks,
    empty_quarantine,
    order_rows,
)
from shared.config import get_settings
from shared.db import after_commit, session_scope, utcnow
from shared.jobs import Job, PublicJobError, report_progress

logger = logging.getLogger("tessera.iiot.ingest")

T = TypeVar("T")
PROGRESS_EVERY_S = 1.0
"""Progress (the job's heartbeat) is recorded after a chunk at most this often (leases last longer)."""
REGISTRY_TTL_S = 5.0
"""A batch's registry is reused this long (reloaded at once when a batch names an unknown sensor)."""


@dataclass
class ReadingsOutcome:
    """What became of a batch: readings kept, quarantined, and how many per reason."""

    kept: int
    quarantined: int
    reasons: dict[str, int] = field(default_factory=dict)
    ingest_id: int | None = None
    replayed: bool = False
    """True when the same batch was accepted before: nothing was written this time."""


@dataclass
class ChunkOutcome:
    """One chunk's effect, added to its ingestion's counters."""

    kept: int = 0
    quarantined: int = 0
    gaps: int = 0
    reasons: Counter[str] = field(default_factory=Counter)


# --- the one validation-and-write path ------------------------------------------------------------------

@dataclass
class PreparedChunk:
    """What a chunk needs before the database is asked anything: :func:`check_rows`, the kept rows in
    storage order and, for PostgreSQL, encoded for binary COPY (made in the read-ahead thread)."""

    checked: Checked
    ordered: Ordered
    binary: BinaryRows | None = None


def prepare_chunk(chunk: SourceChunk, registry: Registry, ingest_pk: int | None = None) -> PreparedChunk:
    """Validate ``chunk`` against ``registry`` and order its kept rows; with ``ingest_pk``, encode them too."""
    checked = check_rows(chunk.frame, registry)
    ordered = order_rows(checked.kept)
    binary = None if ingest_pk is None else binary_rows(ordered.pks, ordered.micros, ordered.values, ingest_pk)
    return PreparedChunk(checked, ordered, binary)


def process_chunk(session: Session, *, tenant_id: str, source: str, ingest_pk: int, registry: Registry,
                  chunk: SourceChunk, prepared: PreparedChunk | None = None) -> ChunkOutcome:
    """Validate ``chunk`` and write its readings and quarantine in ``session`` (not committed).

    ``prepared``: :func:`prepare_chunk` of it when already done (by the read-ahead thread).
    Locks the sensors it writes (``FOR UPDATE`` on PostgreSQL; SQLite has one writer) before reading
    their watermarks, so concurrent ingestions of one sensor keep its watermark consistent.
    """
    prepared = prepared if prepared is not None else prepare_chunk(chunk, registry)
    locked = lock_sensors(session, prepared.ordered.sensors)
    outcome, moves = write_chunk(session, tenant_id=tenant_id, source=source, ingest_pk=ingest_pk,
                                 registry=registry, chunk=chunk, prepared=prepared, locked=locked)
    _advance_sensors(session, *moves)
    return outcome


SensorMoves = tuple[dict[int, datetime], dict[int, int], dict[int, datetime | None], dict[int, int]]
"""New watermarks and added counts per sensor, beside their locked values (:func:`_advance_sensors`)."""


def write_chunk(session: Session, *, tenant_id: str, source: str, ingest_pk: int, registry: Registry,
                chunk: SourceChunk, prepared: PreparedChunk,
                locked: tuple[dict[int, datetime | None], dict[int, int]]) -> tuple[ChunkOutcome, SensorMoves]:
    """:func:`process_chunk` once its sensors are locked (``locked``: their watermarks and counts),
    short of moving the sensors (returned for the caller to write)."""
    watermarks, counts = locked
    ordered = check_watermarks(prepared.ordered, watermarks, stored_lookup(session), registry)
    written = ordered.kept.assign(ingest_pk=ingest_pk)
    binary = prepared.binary
    if binary is not None and ordered.keep is not None and not ordered.keep.all():
        binary = binary[ordered.keep]
    write_readings(session, written, binary)
    quarantined = _quarantine_rows(chunk, prepared.checked, ordered, registry)
    write_quarantine(session, tenant_id, source, ingest_pk, quarantined)
    outcome = ChunkOutcome(kept=len(written), quarantined=len(quarantined), gaps=ordered.gaps,
                           reasons=Counter(quarantined["reason"].tolist()))
    return outcome, (ordered.watermarks, ordered.counts, watermarks, counts)


def lock_sensors(session: Session, sensor_pks: Iterable[int]) -> tuple[dict[int, datetime | None], dict[int, int]]:
    """Each sensor's watermark and reading count, the rows locked until the transaction ends."""
    pks = [int(pk) for pk in sensor_pks]
    if not pks:
        return {}, {}
    rows = session.execute(select(Sensor.id, Sensor.last_ts, Sensor.reading_count).where(Sensor.id.in_(pks))
                           .order_by(Sensor.id).with_for_update()).all()
    return {row[0]: row[1] for row in rows}, {row[0]: row[2] for row in rows}


def _quarantine_rows(chunk: SourceChunk, checked: Checked, ordered: Checked, registry: Registry) -> pd.DataFrame:
    """Every refused row of the chunk with its raw text, asset and sensor ids."""
    late = ordered.quarantined
    if not late.empty:
        ids = _ids_by_pk(registry)
        pks = ordered_pks(late, checked)
        late = late.assign(asset_id=[ids.get(pk, (None, None))[0] for pk in pks],
                           sensor_id=[ids.get(pk, (None, None))[1] for pk in pks])
    parts = [frame for frame in (checked.quarantined, late) if not frame.empty]
    validated = pd.concat(parts, ignore_index=True) if parts else empty_quarantine()
    if not validated.empty:
        validated = validated.assign(raw=chunk.raw_text(validated["row_number"].tolist()))
    refused = chunk.refused.assign(asset_id=None, sensor_id=None)
    parts = [frame for frame in (refused, validated) if not frame.empty]
    return pd.concat(parts, ignore_index=True) if parts else empty_quarantine().assign(raw=None)


def ordered_pks(late: pd.DataFrame, checked: Checked) -> list[int]:
    """The sensor pk of each late row (row numbers repeat in the wide layout: first match is fine)."""
    by_row = dict(zip(checked.kept["row_number"].tolist(), checked.kept["sensor_pk"].tolist(), strict=True))
    return [int(by_row.get(number, -1)) for number in late["row_number"].tolist()]


def _ids_by_pk(registry: Registry) -> dict[int, tuple[str, str]]:
    pairs = [str(key).split("\x1f", 1) for key in registry.keys]
    return {int(pk): (pair[0], pair[1]) for pk, pair in zip(registry.sensor_pk.tolist(), pairs, strict=True)}


def _advance_sensors(session: Session, newest: dict[int, datetime], added: dict[int, int],
                     old_marks: dict[int, datetime | None], old_counts: dict[int, int]) -> None:
    """Move each written sensor's watermark and reading count (one executemany)."""
    changes = _sensor_changes(newest, added, old_marks, old_counts)
    if not changes:
        return
    if dialect_of(session) == "postgresql":  # one statement, not one per sensor
        session.execute(_UPDATE_SENSORS_PG, {"ids": [change["id"] for change in changes],
                                             "stamps": [change["last_ts"] for change in changes],
                                             "counts": [change["reading_count"] for change in changes]})
    else:
        session.execute(update(Sensor), changes)


def _sensor_changes(newest: dict[int, datetime], added: dict[int, int], old_marks: dict[int, datetime | None],
                    old_counts: dict[int, int]) -> list[dict[str, Any]]:
    return [{"id": pk, "last_ts": _later(old_marks.get(pk), moment),
             "reading_count": int(old_counts.get(pk) or 0) + added.get(pk, 0)} for pk, moment in newest.items()]


_UPDATE_SENSORS_SQL = (
    "UPDATE iiot_sensors AS sensor SET last_ts = moved.last_ts, reading_count = moved.reading_count "
    "FROM unnest(%s::integer[], %s::timestamptz[], %s::bigint[]) AS moved(id, last_ts, reading_count) "
    "WHERE sensor.id = moved.id")
_UPDATE_SENSORS_PG = text(
    "UPDATE iiot_sensors AS sensor SET last_ts = moved.last_ts, reading_count = moved.reading_count "
    "FROM unnest(CAST(:ids AS integer[]), CAST(:stamps AS timestamptz[]), CAST(:counts AS bigint[])) "
    "AS moved(id, last_ts, reading_count) WHERE sensor.id = moved.id")


def _later(old: datetime | None, new: datetime) -> datetime:
    if old is None:
        return new
    return max(old if old.tzinfo else old.replace(tzinfo=UTC), new)


# --- batches: gateways and MQTT ---------------------------------------------------------------------------

_registry_cache: dict[tuple[str, str], tuple[float, Registry]] = {}


def batch_registry(session: Session, tenant_id: str, *, fresh: bool = False) -> Registry:
    """The tenant's registry, reused for :data:`REGISTRY_TTL_S` unless ``fresh``."""
    key = (str(session.get_bind().engine.url), tenant_id)
    cached = _registry_cache.get(key)
    if not fresh and cached is not None and time.monotonic() - cached[0] < REGISTRY_TTL_S:
        return cached[1]
    registry = Registry.load(session, tenant_id)
    _registry_cache[key] = (time.monotonic(), registry)
    return registry


def batch_frame(rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, list[tuple[int, str, str]]]:
    """A batch as a long-format frame (``row_number`` 1-based), and the items that are not rows."""
    numbers, records, refused = [], [], []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            refused.append((number, "schema", "not a JSON object"))
            continue
        missing = [key for key in ("timestamp", "asset", "sensor", "value") if key not in row]
        if missing:
            refused.append((number, "schema", f"missing {', '.join(missing)}"))
            continue
        numbers.append(number)
        records.append(row)
    columns = {name: pd.Series([_as_sent(record.get(name)) for record in records], dtype=object)
               for name in LONG_COLUMNS}
    frame = pd.DataFrame({"row_number": np.asarray(numbers, dtype=np.int64), **columns})
    frame["unit"] = frame["unit"].where(frame["unit"].notna(), "")
    return frame, refused


def _as_sent(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def batch_digest(rows: list[dict[str, Any]], source: str) -> str:
    """sha256 of a batch's content (key order ignored): the same batch sent twice has one digest."""
    body = orjson.dumps(rows, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY, default=str)
    return hashlib.sha256(source.encode() + b"\n" + body).hexdigest()


def accept_readings(tenant_id: str, rows: list[dict[str, Any]], *, source: str,
                    raw: list[str] | None = None) -> ReadingsOutcome:
    """Validate and store a batch of long-format rows of ``tenant_id`` in a transaction of its own.

    ``source``: ``api`` or ``mqtt``. ``rows``: dicts with ``timestamp`` (ISO 8601 text or datetime;
    naive = the plant's zone), ``asset``, ``sensor``, ``value`` and optionally ``unit``. ``raw``: each
    row's text as received (kept with a quarantined row; its JSON otherwise). Idempotent by content.
    """
    digest = batch_digest(rows, source)
    with session_scope() as session:
        existing = session.scalar(select(Ingest).where(Ingest.tenant_id == tenant_id, Ingest.digest == digest))
        if existing is not None:
            return _replayed(session, existing)
        ingest = Ingest(tenant_id=tenant_id, source=source, digest=digest, rows_read=len(rows),
                        started_at=utcnow())
        session.add(ingest)
        try:
            session.flush()
        except IntegrityError:  # the same batch, committed concurrently
            session.rollback()
            existing = session.scalars(select(Ingest).where(Ingest.tenant_id == tenant_id,
                                                            Ingest.digest == digest)).one()
            return _replayed(session, existing)
        outcome = _store_batch(session, tenant_id, source, ingest, rows, raw)
        ingest.rows_kept, ingest.rows_quarantined, ingest.gaps = outcome.kept, outcome.quarantined, outcome.gaps
        ingest.rows_done, ingest.finished_at = len(rows), utcnow()
    return ReadingsOutcome(kept=outcome.kept, quarantined=outcome.quarantined, reasons=dict(outcome.reasons),
                           ingest_id=ingest.id)


def _store_batch(session: Session, tenant_id: str, source: str, ingest: Ingest, rows: list[dict[str, Any]],
                 raw: list[str] | None) -> ChunkOutcome:
    frame, refused = batch_frame(rows)
    registry = batch_registry(session, tenant_id)
    if not registry.knows_all(frame["asset"], frame["sensor"]):  # perhaps registered since it was cached
        registry = batch_registry(session, tenant_id, fresh=True)
    texts = raw if raw is not None and len(raw) == len(rows) else None

    def raw_text(numbers: Iterable[int]) -> list[str]:
        return [texts[int(number) - 1] if texts else orjson.dumps(rows[int(number) - 1], default=str).decode()
                for number in numbers]

    chunk = SourceChunk(frame=frame, refused=pd.DataFrame({
        "row_number": pd.Series([item[0] for item in refused], dtype=np.int64),
        "reason": [item[1] for item in refused], "detail": [item[2] for item in refused],
        "raw": raw_text(item[0] for item in refused)}), rows_read=len(rows), end_position=len(rows), progress=1.0,
        raw_text=raw_text)
    return process_chunk(session, tenant_id=tenant_id, source=source, ingest_pk=ingest.id, registry=registry,
                         chunk=chunk)


def _replayed(session: Session, ingest: Ingest) -> ReadingsOutcome:
    counted = session.execute(select(QuarantinedRow.reason, func.count()).where(
        QuarantinedRow.tenant_id == ingest.tenant_id, QuarantinedRow.ingest_pk == ingest.id)
        .group_by(QuarantinedRow.reason)).all()
    reasons = {str(reason): int(count) for reason, count in counted}
    return ReadingsOutcome(kept=ingest.rows_kept, quarantined=ingest.rows_quarantined, reasons=reasons,
                           ingest_id=ingest.id, replayed=True)


def quarantine_raw(tenant_id: str, source: str, reason: str, detail: str | None, raw: str | bytes | None) -> None:
    """Keep a payload that is not even rows (``payload_not_json``, ``schema``, ...) with its reason."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    with session_scope() as session:
        write_quarantine(session, tenant_id, source, None, pd.DataFrame({
            "row_number": [None], "reason": [reason], "detail": [detail], "raw": [text],
            "asset_id": [None], "sensor_id": [None]}))


# --- files: the durable job ------------------------------------------------------------------------------

class IngestRefused(PublicJobError):
    """A file the job refuses as a whole (no usable header, a gzip bomb): its reason is public."""


def storage_dir() -> Path:
    """Where uploaded ingestion files wait for their job."""
    settings = get_settings()
    return settings.iiot_storage_dir or settings.data_dir / "iiot"


def run_file_ingest(session: Session, job: Job) -> dict[str, Any]:
    """Ingest the job's file chunk by chunk, resuming after the last committed chunk (module doc)."""
    ingest = session.get(Ingest, int(job.payload["ingest_pk"]))
    if ingest is None or ingest.tenant_id != job.tenant_id:
        raise IngestRefused("the ingestion this job was for no longer exists")
    if ingest.finished_at is not None:
        return summary(ingest)
    path = Path(job.payload["path"])
    try:
        shape = file_shape(path, ingest.filename)
        if ingest.started_at is None:
            ingest.started_at, ingest.file_format, ingest.layout = utcnow(), shape.format, shape.layout
            session.commit()
        _ingest_chunks(session, job, ingest, path, shape)
    except FileRefused as exc:
        session.rollback()
        session.refresh(ingest)  # its counters as the committed chunks left them
        reason = refusal_reason(exc, ingest)
        _close(session, ingest, path, error=reason)
        session.commit()
        raise IngestRefused(reason) from None
    _close(session, ingest, path, error=None)
    return summary(ingest)


def refusal_reason(exc: FileRefused, ingest: Ingest) -> str:
    """Why the file was refused and, when chunks before the fault were committed, what of it stays
    ingested (``ingest`` as committed: its readings are stored once and counted, the rest is not read)."""
    if not ingest.rows_done:
        return str(exc)
    return (f"{exc}; the file's first {ingest.rows_done} lines were ingested before it "
            f"({ingest.rows_kept} readings kept, {ingest.rows_quarantined} quarantined)")


@dataclass
class _Checkpoint:
    """The ingestion as the chunk loop knows it (the ORM object expires at each commit; reading it
    again would cost two round trips a chunk)."""

    ingest_pk: int
    tenant_id: str
    rows_done: int


def _ingest_chunks(session: Session, job: Job, ingest: Ingest, path: Path, shape: FileShape) -> None:
    registry = Registry.load(session, ingest.tenant_id)
    limit = get_settings().iiot_max_upload_bytes
    chunk_rows = int(job.payload.get("chunk_rows") or CHUNK_ROWS)  # smaller in tests of resumption
    job_id, state = job.id, _Checkpoint(ingest.id, ingest.tenant_id, ingest.rows_done)
    encode_for = state.ingest_pk if dialect_of(session) == "postgresql" else None
    chunks = read_chunks(path, shape, skip=state.rows_done, chunk_rows=chunk_rows, max_decompressed_bytes=limit)
    with prefetched((chunk, prepare_chunk(chunk, registry, encode_for)) for chunk in chunks) as prepared_chunks:
        reported = time.monotonic()
        for chunk, prepared in prepared_chunks:
            if not _commit_chunk(session, state, registry, chunk, prepared):
                logger.warning("ingest %s: chunk ending at %s was committed by another worker; stopping",
                               state.ingest_pk, chunk.end_position)
                break
            if time.monotonic() - reported >= PROGRESS_EVERY_S:
                report_progress(job_id, chunk.progress)  # also the job's heartbeat: it renews the lease
                reported = time.monotonic()
    session.refresh(ingest)


@contextlib.contextmanager
def prefetched(items: Iterator[T]) -> Iterator[Iterator[T]]:
    """``items`` produced one ahead by a thread: the next chunk is read and validated while this one is
    written (the database's work and ours overlap; numpy, pandas and the driver release the GIL).
    Memory: one chunk more. An exception of the producer is raised here, in order."""
    handoff: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if not _put(handoff, ("item", item), stop):
                    return
            _put(handoff, ("end", None), stop)
        except BaseException as exc:  # handed to the consumer, raised there
            _put(handoff, ("error", exc), stop)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # the file it reads

    def consume() -> Iterator[T]:
        while True:
            kind, value = handoff.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    producer = threading.Thread(target=produce, name="iiot-ingest-prefetch", daemon=True)
    producer.start()
    try:
        yield consume()
    finally:
        stop.set()
        producer.join(timeout=30)


def _put(handoff: queue.Queue[tuple[str, Any]], entry: tuple[str, Any], stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            handoff.put(entry, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _commit_chunk(session: Session, state: _Checkpoint, registry: Registry, chunk: SourceChunk,
                  prepared: PreparedChunk) -> bool:
    """Write one chunk and move the checkpoint past it, all in one transaction; False if another
    worker had already moved it (nothing written then).

    On PostgreSQL the statements around the COPY go in two pipelines (psycopg's pipeline mode: one
    round trip each): the checkpoint's compare-and-set with the sensors' locks, then the sensors'
    watermarks with the ingestion's counters; then the commit. Four round trips a chunk with the
    COPY, eleven before: with the box's cores shared, each one waits for the server to be scheduled.
    """
    if dialect_of(session) != "postgresql":
        moved = cast(CursorResult[Any], session.execute(
            update(Ingest).where(Ingest.id == state.ingest_pk, Ingest.rows_done == state.rows_done)
            .values(rows_done=chunk.end_position)))
        if moved.rowcount != 1:
            session.rollback()
            return False
        outcome = process_chunk(session, tenant_id=state.tenant_id, source="file", ingest_pk=state.ingest_pk,
                                registry=registry, chunk=chunk, prepared=prepared)
        session.execute(update(Ingest).where(Ingest.id == state.ingest_pk).values(
            rows_read=Ingest.rows_read + chunk.rows_read, rows_kept=Ingest.rows_kept + outcome.kept,
            rows_quarantined=Ingest.rows_quarantined + outcome.quarantined, gaps=Ingest.gaps + outcome.gaps))
    else:
        locked = _claim_chunk_pg(session, state, chunk, prepared.ordered.sensors)
        if locked is None:
            session.rollback()
            return False
        outcome, moves = write_chunk(session, tenant_id=state.tenant_id, source="file", ingest_pk=state.ingest_pk,
                                     registry=registry, chunk=chunk, prepared=prepared, locked=locked)
        _finish_chunk_pg(session, state, chunk, outcome, moves)
    session.commit()
    state.rows_done = chunk.end_position
    return True


def _claim_chunk_pg(session: Session, state: _Checkpoint, chunk: SourceChunk, sensor_pks: Any,
                    ) -> tuple[dict[int, datetime | None], dict[int, int]] | None:
    """One round trip: this transaction skips the WAL flush wait (the checkpoint commits with the rows:
    a commit lost to a crash is redone from the one before), moves the checkpoint by compare-and-set
    and locks the chunk's sensors. None when another worker moved the checkpoint first."""
    connection = session.connection().connection.driver_connection
    assert connection is not None
    with connection.cursor() as settings, connection.cursor() as claim, connection.cursor() as lock:
        with connection.pipeline():
            settings.execute("SET LOCAL synchronous_commit TO OFF")
            claim.execute("UPDATE iiot_ingests SET rows_done = %s WHERE id = %s AND rows_done = %s",
                          (chunk.end_position, state.ingest_pk, state.rows_done))
            lock.execute("SELECT id, last_ts, reading_count FROM iiot_sensors WHERE id = ANY(%s) ORDER BY id "
                         "FOR UPDATE", ([int(pk) for pk in sensor_pks],))
        if claim.rowcount != 1:
            return None
        rows = lock.fetchall()
    return {int(row[0]): row[1] for row in rows}, {int(row[0]): int(row[2] or 0) for row in rows}


def _finish_chunk_pg(session: Session, state: _Checkpoint, chunk: SourceChunk, outcome: ChunkOutcome,
                     moves: SensorMoves) -> None:
    """One round trip: the sensors' new watermarks and counts, and the ingestion's counters."""
    connection = session.connection().connection.driver_connection
    assert connection is not None
    changes = _sensor_changes(*moves)
    with connection.cursor() as sensors, connection.cursor() as counters, connection.pipeline():
        if changes:
            sensors.execute(_UPDATE_SENSORS_SQL, ([change["id"] for change in changes],
                                                  [change["last_ts"] for change in changes],
                                                  [change["reading_count"] for change in changes]))
        counters.execute("UPDATE iiot_ingests SET rows_read = rows_read + %s, rows_kept = rows_kept + %s, "
                         "rows_quarantined = rows_quarantined + %s, gaps = gaps + %s WHERE id = %s",
                         (chunk.rows_read, outcome.kept, outcome.quarantined, outcome.gaps, state.ingest_pk))


def _close(session: Session, ingest: Ingest, path: Path, *, error: str | None) -> None:
    """Mark the ingestion finished; its file is deleted once that commits."""
    ingest.finished_at, ingest.error = utcnow(), error
    after_commit(session, lambda: path.unlink(missing_ok=True))


def summary(ingest: Ingest) -> dict[str, Any]:
    """The job result: the ingestion's counters."""
    return {"ingest_id": ingest.id, "rows_read": ingest.rows_read, "rows_kept": ingest.rows_kept,
            "rows_quarantined": ingest.rows_quarantined, "gaps": ingest.gaps, "error": ingest.error}


def elapsed_s(ingest: Ingest, now: datetime | None = None) -> float | None:
    """Seconds the ingestion has run (to its end when finished)."""
    if ingest.started_at is None:
        return None
    end = ingest.finished_at or now or utcnow()
    return max((end - ingest.started_at).total_seconds(), 1e-6)
