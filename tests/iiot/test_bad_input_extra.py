"""Bad input found by fuzzing a running server, each a precise 4xx or a quarantined row with its reason,
never a 500 or a job failing with an opaque "internal error", and the rest of the input kept.

- Times whose UTC equivalent leaves years 1-9999 or predates 1970 (the sensors' floor): quarantined
  readings (batches, files), 422 for a maintenance record's ``occurred_at`` and the risk timelines'
  ``start``/``end``; ``occurred_at`` only as ISO 8601 text with an offset.
- Ingestion files: a header naming a column twice (422 at upload), a truncated gzip or one with
  trailing bytes (the job fails saying which, and how much was ingested before the fault).
- A finite value too large for the features (1e308) quarantined on every path: batches, files, MQTT.
- NaN and Infinity (Python's json reads them) in alert settings and asset details: 422.

HTTP tests run on a real uvicorn and Celery worker on SQLite and PostgreSQL (the fixtures of
``test_ingest_jobs``); the MQTT one through ``tessera listen iiot mqtt`` and Mosquitto."""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select

from services.iiot.db import Asset, Sensor
from services.iiot.mqtt_io import readings_topic
from services.iiot.readers import FileRefused, check_head, file_shape, read_chunks
from services.iiot.validation import check_rows, check_watermarks
from shared.db import session_scope
from tests.iiot.mqtt_support import Publisher
from tests.iiot.test_ingest_jobs import (
    IngestStack,
    Tenant,
    csv_bytes,
    ingest,
    ingest_stack,  # noqa: F401 - the server and worker fixture, reused
    long_rows,
    new_tenant,
    quarantine,
    stored_count,
    upload,
)
from tests.iiot.test_mqtt_ingest import (
    add_registry,
    listener,  # noqa: F401 - the MQTT listener fixture, reused
    quarantine_reasons,
    reading,
    stored_values,
)
from tests.iiot.test_registry_api import problem
from tests.iiot.test_validation import REGISTRY, long_frame
from tests.support import ManagedProcess, wait_until

LONG_HEADER = ["timestamp", "asset", "sensor", "value", "unit"]
OUTSIDE = ["0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00Z", "1000-01-01T00:00:00Z", "1677-09-21T00:00:00Z",
           "1969-12-31T23:59:59Z", "9999-12-31T23:59:59-14:00"]
"""Times no reading can have: before the 1970 floor (some before year 1 in UTC), or past year 9999."""


@pytest.fixture
def tenant(ingest_stack: IngestStack) -> Iterator[Tenant]:  # noqa: F811
    """A tenant of its own on the served stack: ``register_fleet``'s plant-1 (Europe/Berlin), line-1,
    pump-1 and pump-2 with ranged temp, vib and press sensors, and a client with its key."""
    chosen = new_tenant(ingest_stack)
    with chosen.client:
        yield chosen


def add_sensor(tenant: Tenant, sensor_id: str) -> None:
    """A sensor on pump-1 without an expected range and without readings yet."""
    answer = tenant.client.post("/assets/pump-1/sensors", json={"sensor_id": sensor_id, "unit": "mm/s"})
    assert answer.status_code == 201, answer.text


def batch(readings: list[tuple[str, float]], sensor: str) -> dict[str, Any]:
    return {"readings": [{"timestamp": ts, "asset": "pump-1", "sensor": sensor, "value": value}
                         for ts, value in readings]}


def raw_json(tenant: Tenant, method: str, path: str, body: bytes) -> Any:
    """Send ``body`` as JSON as it is (NaN and Infinity literals included)."""
    return tenant.client.request(method, path, content=body, headers={"content-type": "application/json"})


# --- in-process: the validation path and the readers ------------------------------------------------------

def test_times_before_the_floor_are_bad_timestamps_and_other_local_times_of_the_zone_still_kept() -> None:
    checked = check_rows(long_frame([
        ("0001-01-01T00:00:00+14:00", "p2", 1.0),   # year 0 in UTC
        ("0001-01-01T00:00:00", "p1", 1.0),         # naive, Berlin: localising it fails
        ("2025-07-01T10:00:00", "p1", 1.0),         # naive, Berlin: 08:00 UTC, kept
        ("1969-12-31T23:59:59Z", "p2", 1.0),
        ("1970-01-01T00:30:00", "p1", 1.0),         # naive, Berlin: 1969-12-31T23:30Z
        ("1970-01-01T00:00:00Z", "p2", 1.0),        # the floor itself
    ]), REGISTRY)
    assert checked.kept["row_number"].tolist() == [3, 6]
    assert sorted(checked.quarantined["row_number"]) == [1, 2, 4, 5]
    assert set(checked.quarantined["reason"]) == {"bad_timestamp"}
    assert all(detail.startswith("before 1970-01-01T00:00:00Z") for detail in checked.quarantined["detail"])
    ordered = check_watermarks(checked.kept, {}, lambda rows: np.zeros(len(rows), bool), REGISTRY)
    assert ordered.watermarks == {1: datetime(2025, 7, 1, 8, tzinfo=UTC), 2: datetime(1970, 1, 1, tzinfo=UTC)}


def test_magnitudes_beyond_the_plausibility_bound_are_out_of_range_with_or_without_a_sensor_range() -> None:
    checked = check_rows(long_frame([("2025-07-01T08:00:00Z", "p2", 1e308), ("2025-07-01T08:00:01Z", "p2", -1e16),
                                     ("2025-07-01T08:00:02Z", "p2", 1e15), ("2025-07-01T08:00:03Z", "p1", 1e300)]),
                         REGISTRY)
    assert checked.kept["row_number"].tolist() == [3]
    assert checked.quarantined["reason"].tolist() == ["out_of_range"] * 3
    assert checked.quarantined["detail"].iloc[0] == "1e+308 is beyond ±1e+15, the bound of every sensor's readings"


@pytest.mark.parametrize(("header", "named"), [
    (b"timestamp,asset,sensor,value,value\n", "'value'"), (b"timestamp,asset,vib,vib\n", "'vib'"),
    (b"Timestamp,asset,sensor,value, timestamp\n", "'timestamp'")])
def test_a_header_naming_a_column_twice_is_refused_naming_it(header: bytes, named: str) -> None:
    with pytest.raises(FileRefused, match=f"schema: the header names column {named} more than once"):
        check_head(header + b"2025-03-01T08:00:00Z,pump-1,1,2\n")


def gzip_faults(rows: int) -> dict[str, bytes]:
    """A gzip CSV of ``rows`` readings cut before its end, and followed by bytes that are no gzip member."""
    whole = gzip.compress(csv_bytes(LONG_HEADER, long_rows(rows // 2)))
    return {"truncated": whole[:-100], "trailing": whole + b"garbage"}


@pytest.mark.parametrize(("fault", "reason"), [("truncated", "the gzip stream is truncated"),
                                               ("trailing", "trailing data after the gzip stream")])
def test_a_gzip_fault_is_refused_with_its_reason_after_the_chunks_before_it(tmp_path: Path, fault: str,
                                                                           reason: str) -> None:
    path = tmp_path / "readings.csv.gz"
    path.write_bytes(gzip_faults(200_000)[fault])
    shape = file_shape(path, path.name)
    read: list[int] = []
    with pytest.raises(FileRefused, match=reason):
        for chunk in read_chunks(path, shape, chunk_rows=20_000):
            read.append(chunk.rows_read)
    assert read and sum(read) < 200_000  # the chunks of the first 4 MiB came before the fault


# --- over HTTP, with the worker ---------------------------------------------------------------------------

def test_readings_outside_the_time_window_are_quarantined_as_bad_timestamps(tenant: Tenant) -> None:
    add_sensor(tenant, "fresh")
    alone = tenant.client.post("/readings", json=batch([("0001-01-01T00:00:00+14:00", 1.0)], "fresh"))
    assert alone.status_code == 200, alone.text
    assert (alone.json()["kept"], alone.json()["reasons"]) == (0, {"bad_timestamp": 1})
    mixed = tenant.client.post("/readings", json=batch([(ts, 1.0) for ts in OUTSIDE]
                                                       + [("2025-03-01T08:00:00Z", 2.0)], "fresh"))
    assert mixed.status_code == 200, mixed.text
    assert (mixed.json()["kept"], mixed.json()["reasons"]) == (1, {"bad_timestamp": len(OUTSIDE)})
    sensor = tenant.client.get("/assets/pump-1/sensors/fresh").json()
    assert pd.Timestamp(sensor["last_ts"]) == pd.Timestamp("2025-03-01T08:00:00Z")


def test_a_file_row_outside_the_time_window_is_quarantined_and_the_rest_kept(tenant: Tenant) -> None:
    add_sensor(tenant, "fresh")
    rows = [row[:4] for row in long_rows(5)] + [["0001-01-01T00:00:00+14:00", "pump-1", "fresh", "1"],
                                                ["2025-03-01T09:00:00Z", "pump-1", "fresh", "2"]]
    job = ingest(tenant, csv_bytes(LONG_HEADER[:4], rows), "old.csv")
    assert job["status"] == "succeeded", job
    assert (job["rows_kept"], job["rows_quarantined"]) == (11, 1)
    assert [(row["row_number"], row["reason"]) for row in quarantine(tenant, job["ingest_id"])] == [
        (12, "bad_timestamp")]


def test_maintenance_times_are_offset_text_inside_the_window(tenant: Tenant) -> None:
    path = "/assets/pump-1/maintenance"
    for occurred_at in [*OUTSIDE, "9999-12-31T23:59:59Z", 1700000000, "1700000000", "2026-03-01T00:00:00",
                        "2026-03-01"]:
        refused = problem(tenant.client.post(path, json={"kind": "failure", "occurred_at": occurred_at}), 422)
        assert refused["errors"][0]["loc"] == ["body", "occurred_at"], (occurred_at, refused)
    kept = tenant.client.post(path, json={"kind": "inspection", "occurred_at": "2026-03-01T02:00:00+02:00"})
    assert kept.status_code == 201, kept.text
    assert pd.Timestamp(kept.json()["occurred_at"]) == pd.Timestamp("2026-03-01T00:00:00Z")


def test_risk_timelines_refuse_times_outside_the_window(tenant: Tenant) -> None:
    for path in ("/assets/pump-1/risk.png", "/lines/line-1/risk.png"):
        for params, name in [({"end": "9999-12-31T23:59:59-14:00"}, "end"), ({"end": "9999-12-31T00:00:00Z"}, "end"),
                             ({"start": "0001-01-01T00:00:00+14:00"}, "start"),
                             ({"start": "1969-12-31T00:00:00Z", "end": "1970-01-02T00:00:00Z"}, "start")]:
            refused = problem(tenant.client.get(path, params=params), 422)
            assert refused["errors"][0]["loc"] == ["query", name], (path, params, refused)
        drawn = tenant.client.get(path, params={"start": "1970-01-01T00:00:00Z", "end": "1970-01-10T00:00:00Z"})
        assert drawn.status_code == 200 and drawn.headers["content-type"] == "image/png"


@pytest.mark.parametrize(("header", "named"), [("timestamp,asset,sensor,value,value", "'value'"),
                                               ("timestamp,asset,vib,vib", "'vib'")])
def test_a_header_naming_a_column_twice_is_422_at_upload(tenant: Tenant, header: str, named: str) -> None:
    refused = problem(upload(tenant, f"{header}\n2025-03-01T08:00:00Z,pump-1,1,2\n".encode(), "dup.csv"), 422)
    assert f"names column {named} more than once" in refused["detail"]


def test_a_gzip_fault_fails_the_job_with_its_reason_and_what_was_kept_before_it(
        ingest_stack: IngestStack, tenant: Tenant) -> None:  # noqa: F811
    small = gzip_faults(40)
    for fault, reason in [("truncated", "the gzip stream is truncated"),
                          ("trailing", "trailing data after the gzip stream")]:
        job = ingest(tenant, small[fault], f"small-{fault}.csv.gz")
        assert job["status"] == "failed" and job["error"].startswith(reason), job
        assert (job["rows_kept"], job["rows_quarantined"]) == (0, 0)
    job = ingest(tenant, gzip_faults(250_000)["truncated"], "large.csv.gz")  # ~11 MB: a chunk of 100k commits
    assert job["status"] == "failed" and job["error"].startswith("the gzip stream is truncated"), job
    assert job["rows_kept"] > 0
    assert job["error"].endswith(f"({job['rows_kept']} readings kept, {job['rows_quarantined']} quarantined)")
    assert stored_count(ingest_stack.stack, tenant.fleet.tenant_id) == job["rows_kept"]


def test_a_value_too_large_for_the_features_is_quarantined_from_batches_and_files(tenant: Tenant) -> None:
    add_sensor(tenant, "raw")
    answer = tenant.client.post("/readings", json=batch([("2025-03-01T08:00:00Z", 1e308),
                                                         ("2025-03-01T08:00:01Z", 3.0)], "raw"))
    assert answer.status_code == 200, answer.text
    assert (answer.json()["kept"], answer.json()["reasons"]) == (1, {"out_of_range": 1})
    rows = [["2025-03-01T08:00:02Z", "pump-1", "raw", "-1e308"], ["2025-03-01T08:00:03Z", "pump-1", "raw", "4"]]
    job = ingest(tenant, csv_bytes(LONG_HEADER[:4], rows), "huge.csv")
    assert (job["status"], job["rows_kept"], job["rows_quarantined"]) == ("succeeded", 1, 1)
    refused = quarantine(tenant, job["ingest_id"])
    assert [(row["row_number"], row["reason"]) for row in refused] == [(2, "out_of_range")]
    assert "beyond ±1e+15" in refused[0]["detail"]


def test_nan_and_infinity_in_settings_and_asset_details_are_422(tenant: Tenant) -> None:
    for body in (b'{"policy": {"rul_open_hours": Infinity, "rul_close_hours": Infinity}}',
                 b'{"policy": {"rul_critical_hours": Infinity}}', b'{"policy": {"rul_open_hours": NaN}}'):
        problem(raw_json(tenant, "PUT", "/settings", body), 422)
    assert tenant.client.get("/settings").json()["policy"]["rul_open_hours"] == 216.0  # unchanged
    for details in (b'{"x": NaN}', b'{"x": [1, {"y": -Infinity}]}'):
        problem(raw_json(tenant, "POST", "/assets", b'{"asset_id": "a9", "line_id": "line-1", "details": '
                         + details + b"}"), 422)
        problem(raw_json(tenant, "PATCH", "/assets/pump-1", b'{"details": ' + details + b"}"), 422)
    assert tenant.client.get("/assets/a9").status_code == 404


def test_a_nul_character_is_never_a_500(ingest_stack: IngestStack, tenant: Tenant) -> None:  # noqa: F811
    """PostgreSQL's text cannot hold U+0000 and SQLite is made to refuse it too: a value holding one is a
    422 on both, and a quarantined row's text has it replaced, so the row is still quarantined on both."""
    plant = tenant.client.post("/plants", json={"plant_id": "p-nul", "name": "a\u0000b", "timezone": "UTC"})
    assert problem(plant, 422)["errors"][0]["type"] == "nul_character"
    assert tenant.client.get("/plants/p-nul").status_code == 404
    problem(tenant.client.get("/assets/pump%00x"), 422)  # ids have a pattern
    readings = tenant.client.post("/readings", json={"readings": [
        {"timestamp": "2025-03-01T08:00:00Z", "asset": "pump-1\u0000", "sensor": "temp", "value": 1.0}]})
    assert readings.status_code == 200, readings.text
    assert readings.json()["reasons"] == {"unknown_asset": 1}


# --- MQTT -------------------------------------------------------------------------------------------------

def add_unranged_sensor(tenant_id: str, sensor_id: str) -> None:
    """A sensor without an expected range on :func:`add_registry`'s asset a1."""
    with session_scope() as session:
        asset_pk = session.scalars(select(Asset.id).where(Asset.tenant_id == tenant_id, Asset.asset_id == "a1")).one()
        session.add(Sensor(tenant_id=tenant_id, asset_pk=asset_pk, sensor_id=sensor_id, quantity="vibration",
                           unit="mm/s"))


def test_a_value_too_large_for_the_features_is_quarantined_from_mqtt(
        listener: tuple[str, ManagedProcess]) -> None:  # noqa: F811
    prefix, _process = listener
    tenant_id = f"t-{uuid.uuid4().hex[:8]}"
    add_registry(tenant_id)
    add_unranged_sensor(tenant_id, "raw")
    with Publisher.connected() as publisher:
        publisher.publish(readings_topic(prefix, tenant_id, "p1", "l1", "a1"),
                          json.dumps([reading("raw", 1, 1e308), reading("raw", 2, 3.0)]))
        wait_until(lambda: len(stored_values(tenant_id)) == 1 and bool(quarantine_reasons(tenant_id)), 30,
                   "1 reading kept, 1 quarantined")
    assert stored_values(tenant_id) == [3.0]
    assert quarantine_reasons(tenant_id) == {"out_of_range": 1}
