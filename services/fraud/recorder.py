"""Write-behind of fraud decisions: what a batch of the ``fraud:decisions`` stream becomes in the database.

With Redis configured, scoring answers once the decision record is in the stream
(:mod:`services.fraud.redis_state`). The platform's stream recorder (:mod:`shared.streams`; one in
each API process, or ``tessera recorder fraud`` in its own, see :func:`main`) reads the stream
through a consumer group and hands whatever has accumulated to :func:`apply_decisions`, in one
transaction: the rows (``INSERT ... ON CONFLICT DO NOTHING``), a review case and a bank callback job
for each newly stored flagged decision. Entries are acknowledged only after the commit, and a dead
recorder's entries are claimed and replayed by another; the conflict clause makes the replay a
no-op (exactly once in effect). Records the database refuses go to ``fraud:decisions:quarantine``.

Batching replaces one synchronous commit per request (a ~4 ms disk flush on PostgreSQL) with one
per batch, which is what lets the webhook hold its rate.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio as aioredis
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.fraud.db import Case, Transaction
from services.fraud.redis_state import DECISION_STREAM
from services.fraud.schemas import Decision, DecisionOut
from services.fraud.tasks import enqueue_callback
from services.fraud.window_store import window_store
from shared.observability import configure_logging
from shared.streams import (
    BATCH_SIZE,
    FLUSH_INTERVAL_S,
    SEPARATE_FLUSH_INTERVAL_S,
    RecordedStream,
    StreamRecorder,
    run_recorder_process,
    write_batch,
)

GROUP = "recorders"
DEAD_LETTER_STREAM = "fraud:decisions:quarantine"
"""Records the database refused (kept with the error for an operator, never dropped)."""


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
    assert raw is not None, "a checked-out connection has its driver connection"
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


def apply_decisions(session: Session, records: list[dict[str, Any]]) -> int:
    """Store decision records in ``session``'s transaction (not committed); returns how many were new.

    Cases and callbacks are created only for rows this call inserted, so replaying a batch after a
    crash creates none twice.
    """
    inserted = _insert_ignoring_duplicates(session, records)
    flagged_new = set()
    for record in records:
        key = (record["tenant_id"], record["transaction_id"])
        if key in inserted and key not in flagged_new and record["decision"] != Decision.approve.value:
            flagged_new.add(key)  # the same record twice in one batch still gets one case
            session.add(Case(tenant_id=key[0], transaction_id=key[1]))
            enqueue_callback(session, key[0], _decision_out(record))
    return len(inserted)


def _decision_out(record: dict[str, Any]) -> DecisionOut:
    return DecisionOut(transaction_id=record["transaction_id"], decision=Decision(record["decision"]),
                       score=record["score"], reasons=record["reasons"], model_version=record["model_version"],
                       rules_version=record["rules_version"])


def decision_stream() -> RecordedStream:
    """The decision stream as the recorder drains it (names read now: tests point them elsewhere)."""
    return RecordedStream(name=DECISION_STREAM, apply=apply_decisions, group=GROUP, quarantine=DEAD_LETTER_STREAM,
                          what="decision records")


def write_records(records: list[dict[str, Any]]) -> int:
    """Store decision records in one committed transaction; returns how many were new."""
    return write_batch(decision_stream(), records)


class DecisionRecorder(StreamRecorder):
    """Drains the decision stream into the database until stopped.

    One runs in each API process unless ``TESSERA_RECORDER_IN_API=false``, in which case
    ``tessera recorder fraud`` (:func:`main`) runs it in its own process: the batches then cost the
    API's event loop nothing (measured in bench/fraud.py).
    """

    def __init__(self, client: aioredis.Redis, consumer: str | None = None,
                 flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        super().__init__(client, decision_stream(), consumer=consumer, flush_interval_s=flush_interval_s)


def main(argv: list[str]) -> int:
    """``tessera recorder fraud``: drain the decision stream in this process until SIGTERM or Ctrl-C."""
    parser = argparse.ArgumentParser(prog="tessera recorder fraud", description=main.__doc__)
    parser.add_argument("--flush-interval", type=float, default=SEPARATE_FLUSH_INTERVAL_S,
                        help="seconds between database transactions (default %(default)s)")
    args = parser.parse_args(argv)
    configure_logging()
    if not window_store().written_behind:
        print("tessera recorder fraud: TESSERA_REDIS_URL is not set: decisions are committed by the API "
              "itself, there is nothing to record", file=sys.stderr)
        return 2
    return run_recorder_process(lambda client: [DecisionRecorder(client, flush_interval_s=args.flush_interval)],
                                "fraud decisions")
