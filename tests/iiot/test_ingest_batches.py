"""``accept_readings`` (gateway batches, MQTT) on SQLite and PostgreSQL: the one validation path,
quarantine with reasons, watermarks, idempotent re-sends, payloads that are not rows."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from services.iiot.db import QuarantinedRow, Sensor
from services.iiot.ingest import accept_readings, quarantine_raw
from services.iiot.store import read_readings
from shared.db import session_scope
from tests.conftest import Stack
from tests.iiot.ingest_fixtures import Fleet, register_fleet


@pytest.fixture
def fleet(migrated_stack: Stack) -> Fleet:
    return register_fleet()


def reading(ts: str, value: object, sensor: str = "temp", asset: str = "pump-1", **extra: object) -> dict[str, object]:
    return {"timestamp": ts, "asset": asset, "sensor": sensor, "value": value, **extra}


def quarantined(tenant_id: str) -> list[tuple[int | None, str]]:
    with session_scope() as session:
        return [tuple(row) for row in session.execute(  # type: ignore[misc]
            select(QuarantinedRow.row_number, QuarantinedRow.reason).where(QuarantinedRow.tenant_id == tenant_id)
            .order_by(QuarantinedRow.row_number))]


def test_a_batch_keeps_good_rows_and_quarantines_each_bad_one_with_its_reason(fleet: Fleet) -> None:
    rows: list[dict[str, object]] = [
        reading("2025-03-01T08:00:00Z", 71.5),
        reading("2025-03-01T08:00:01Z", 160.0, unit="degF"),        # 71.1 degC
        reading("2025-03-01T09:00:02", 72.0),                        # naive: Berlin, 08:00:02 UTC
        reading("yesterday", 70.0),                                  # bad_timestamp
        reading("2025-03-01T08:00:03Z", float("nan")),               # not_a_number
        reading("2025-03-01T08:00:04Z", "hot"),                      # not_a_number
        reading("2025-03-01T08:00:05Z", 1.0, sensor="nope"),         # unknown_sensor
        reading("2025-03-01T08:00:05Z", 1.0, asset="pump-99"),       # unknown_asset
        reading("2025-03-01T08:00:06Z", 1.0, unit="furlongs"),       # unknown_unit
        reading("2025-03-01T08:00:07Z", 1.0, unit="psi"),            # incompatible_unit
        reading("2025-03-01T08:00:08Z", 900.0),                      # out_of_range
        reading("2025-03-01T08:00:00Z", 71.6),                       # duplicate (same ts in the batch)
        {"timestamp": "2025-03-01T08:00:09Z", "asset": "pump-1"},    # schema
    ]
    outcome = accept_readings(fleet.tenant_id, rows, source="api")
    assert (outcome.kept, outcome.quarantined) == (3, 10)
    assert outcome.reasons == {"bad_timestamp": 1, "not_a_number": 2, "unknown_sensor": 1, "unknown_asset": 1,
                               "unknown_unit": 1, "incompatible_unit": 1, "out_of_range": 1, "duplicate": 1,
                               "schema": 1}
    pk = fleet.sensor_pks[("pump-1", "temp")]
    with session_scope() as session:
        stored = read_readings(session, [pk], datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 3, 2, tzinfo=UTC))
        sensor = session.get(Sensor, pk)
        assert sensor is not None
        assert sensor.last_ts == datetime(2025, 3, 1, 8, 0, 2, tzinfo=UTC)
        assert sensor.reading_count == 3
    assert [ts.isoformat() for ts in stored["ts"]] == ["2025-03-01T08:00:00+00:00", "2025-03-01T08:00:01+00:00",
                                                       "2025-03-01T08:00:02+00:00"]
    assert stored["value"].round(2).tolist() == [71.5, 71.11, 72.0]
    assert [reason for _, reason in quarantined(fleet.tenant_id)] == [
        "bad_timestamp", "not_a_number", "not_a_number", "unknown_sensor", "unknown_asset", "unknown_unit",
        "incompatible_unit", "out_of_range", "duplicate", "schema"]


def test_late_rows_are_duplicates_when_stored_else_out_of_order_and_resends_are_idempotent(fleet: Fleet) -> None:
    first = [reading("2025-03-01T08:00:00Z", 1.0), reading("2025-03-01T08:00:10Z", 2.0)]
    assert accept_readings(fleet.tenant_id, first, source="mqtt").kept == 2
    again = accept_readings(fleet.tenant_id, first, source="mqtt")
    assert again.replayed and again.kept == 2, "the same batch is answered as before, nothing written"
    late = [reading("2025-03-01T08:00:00Z", 1.0), reading("2025-03-01T08:00:05Z", 3.0),
            reading("2025-03-01T08:00:11Z", 4.0)]
    outcome = accept_readings(fleet.tenant_id, late, source="mqtt")
    assert (outcome.kept, outcome.reasons) == (1, {"duplicate": 1, "out_of_order": 1})
    with session_scope() as session:
        stored = read_readings(session, [fleet.sensor_pks[("pump-1", "temp")]], datetime(2025, 1, 1, tzinfo=UTC),
                               datetime(2026, 1, 1, tzinfo=UTC))
    assert stored["value"].tolist() == [1.0, 2.0, 4.0]


def test_a_payload_that_is_not_rows_is_kept_with_its_reason(fleet: Fleet) -> None:
    quarantine_raw(fleet.tenant_id, "mqtt", "payload_not_json", "Expecting value: line 1 column 1", b"\xff{not json")
    with session_scope() as session:
        row = session.scalars(select(QuarantinedRow).where(QuarantinedRow.tenant_id == fleet.tenant_id)).one()
    assert (row.reason, row.source, row.ingest_pk, row.raw) == ("payload_not_json", "mqtt", None, "\ufffd{not json")


def test_a_tenant_with_no_registry_gets_every_row_quarantined_as_unknown(migrated_stack: Stack) -> None:
    """Found by schemathesis: an empty registry made the range check index an empty array (a 500)."""
    rows = [reading("2025-03-01T08:00:00Z", 1.0), reading("2025-03-01T08:00:01Z", 2.0, unit="degF")]
    outcome = accept_readings("tenant-without-assets", rows, source="api")
    assert (outcome.kept, outcome.quarantined) == (0, 2)
    assert outcome.reasons == {"unknown_asset": 2}
