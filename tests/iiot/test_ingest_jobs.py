"""File ingestion end to end: ``POST /iiot/v1/ingest`` on a real uvicorn, the job run by a real Celery
worker, on SQLite and PostgreSQL. Long and wide layouts, CSV / Parquet / JSON Lines (gzip too),
every kind of bad input quarantined or refused with a reason while the good rows are kept,
re-ingesting a file is idempotent, a worker killed mid-file resumes and writes each row once,
and another tenant's job or quarantine answers 404."""

from __future__ import annotations

import csv
import gzip
import io
import signal
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from sqlalchemy import func, select

from services.iiot.db import Ingest, Sensor, readings
from services.iiot.ingest import storage_dir
from services.iiot.tasks import ingest_file_job
from shared.db import session_factory
from shared.jobs import submit_job
from shared.security import create_api_key
from tests.conftest import Stack, Variant, apply_stack_in_process, variant_stack
from tests.iiot.ingest_fixtures import Fleet, register_fleet
from tests.scaffold import ScaffoldServer, serve_scaffold
from tests.support import ManagedProcess, python_argv, wait_until

START = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


def start_worker(stack: Stack, name: str) -> ManagedProcess:
    """A Celery worker on the ``iiot`` queue, with beat (its sweeper re-enqueues a dead worker's job)."""
    argv = python_argv("-m", "celery", "-A", "shared.queue:celery_app", "worker", "-Q", "iiot,default",
                       "--concurrency", "1", "-B", "--schedule", str(stack.data_dir / f"beat-{name}"),
                       "--hostname", f"{name}@%h", "--without-gossip", "--without-mingle", "--loglevel", "INFO")
    worker = ManagedProcess(argv, stack.env, name)
    worker.wait_for_output(r"ready\.", timeout_s=90)
    return worker


@dataclass
class IngestStack:
    """The IIoT app and a worker on one database."""

    stack: Stack
    server: ScaffoldServer
    worker: ManagedProcess


@pytest.fixture(scope="module")
def ingest_stack(request: pytest.FixtureRequest, stack_variant: Variant) -> Iterator[IngestStack]:
    stack = variant_stack(request, stack_variant)
    with serve_scaffold("services.iiot.api:app", stack, f"iiot-{stack.name}") as server:
        worker = start_worker(stack, f"iiot-{uuid.uuid4().hex[:6]}")
        chosen = IngestStack(stack, server, worker)
        try:
            yield chosen
        finally:
            chosen.worker.stop()
            print(f"--- worker log ---\n{chosen.worker.output[-8000:]}")  # shown when a test failed
        assert "Traceback" not in server.process.output, server.process.output[-6000:]


@dataclass
class Tenant:
    fleet: Fleet
    client: httpx.Client


def new_tenant(ingest_stack: IngestStack) -> Tenant:
    fleet = register_fleet(database_url=ingest_stack.stack.database_url)
    with session_factory(ingest_stack.stack.database_url)() as session:
        key = create_api_key(session, tenant_id=fleet.tenant_id, name="test", scopes=["iiot"])
        session.commit()
    return Tenant(fleet, httpx.Client(base_url=ingest_stack.server.base_url + "/v1", headers={"X-API-Key": key},
                                      timeout=60))


@pytest.fixture
def tenant(ingest_stack: IngestStack) -> Iterator[Tenant]:
    chosen = new_tenant(ingest_stack)
    with chosen.client:
        yield chosen


def upload(tenant: Tenant, content: bytes, filename: str) -> httpx.Response:
    return tenant.client.post("/ingest", files={"file": (filename, content, "application/octet-stream")})


def wait_done(tenant: Tenant, job_id: str, timeout_s: float = 120) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def finished() -> bool:
        seen.update(tenant.client.get(f"/jobs/{job_id}").json())
        return seen.get("status") in ("succeeded", "failed")

    wait_until(finished, timeout_s, f"ingestion job {job_id} to finish", interval_s=0.2)
    return seen


def ingest(tenant: Tenant, content: bytes, filename: str) -> dict[str, Any]:
    response = upload(tenant, content, filename)
    assert response.status_code == 202, response.text
    return wait_done(tenant, response.json()["job_id"])


def long_rows(count: int, asset: str = "pump-1", sensors: tuple[str, ...] = ("temp", "vib")) -> list[list[str]]:
    """``count`` seconds of readings of each sensor, as CSV fields (timestamp with offset)."""
    return [[(START + timedelta(seconds=second)).isoformat(), asset, sensor, f"{20 + second % 7}.5", ""]
            for second in range(count) for sensor in sensors]


def csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def stored_count(stack: Stack, tenant_id: str) -> int:
    with session_factory(stack.database_url)() as session:
        pks = select(Sensor.id).where(Sensor.tenant_id == tenant_id)
        return int(session.scalar(select(func.count()).select_from(readings).where(readings.c.sensor_pk.in_(pks)))
                   or 0)


def quarantine(tenant: Tenant, ingest_id: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"ingest": ingest_id, "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = tenant.client.get("/quarantine", params=params)
        assert page.status_code == 200, page.text
        items += page.json()["items"]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return items


def test_a_long_csv_keeps_good_rows_and_quarantines_every_bad_one_with_its_line(
        ingest_stack: IngestStack, tenant: Tenant) -> None:
    good = long_rows(50)
    bad_lines = [
        "not,enough",                                                          # malformed_row
        f"{START.isoformat()},pump-1,temp,warm,",                              # not_a_number
        f"{(START + timedelta(seconds=1)).isoformat()},pump-1,vib,NaN,",       # not_a_number
        f"{(START + timedelta(seconds=2)).isoformat()},pump-1,vib,inf,",       # not_a_number
        f"{START.isoformat()},pump-1,humidity,1,",                             # unknown_sensor
        f"{START.isoformat()},pump-1,temp,1,furlong",                          # unknown_unit
        "03/01/2025 8am,pump-1,temp,1,",                                      # bad_timestamp
        f"{START.isoformat()},pump-1,temp,20.5,",                              # duplicate of line 2
        "x" * (2 << 20),                                                       # line_too_long
        f"{(START + timedelta(seconds=60)).isoformat()},pump-1,temp,200,degF", # kept, 93.3 degC
    ]
    content = csv_bytes(["timestamp", "asset", "sensor", "value", "unit"], good) + "\n".join(bad_lines).encode()
    job = ingest(tenant, content, "readings.csv")
    assert job["status"] == "succeeded", job
    assert (job["file_format"], job["layout"], job["rows_read"]) == ("csv", "long", len(good) + len(bad_lines))
    assert (job["rows_kept"], job["rows_quarantined"]) == (len(good) + 1, len(bad_lines) - 1)
    assert job["rows_per_s"] > 0 and job["eta_s"] == 0 and job["progress"] == 1
    assert stored_count(ingest_stack.stack, tenant.fleet.tenant_id) == len(good) + 1
    first_bad = len(good) + 2
    rows = quarantine(tenant, job["ingest_id"])
    assert sorted((row["row_number"], row["reason"]) for row in rows) == [
        (first_bad, "malformed_row"), (first_bad + 1, "not_a_number"), (first_bad + 2, "not_a_number"),
        (first_bad + 3, "not_a_number"), (first_bad + 4, "unknown_sensor"), (first_bad + 5, "unknown_unit"),
        (first_bad + 6, "bad_timestamp"), (first_bad + 7, "duplicate"), (first_bad + 8, "line_too_long")]
    by_reason = {row["reason"]: row for row in rows}
    assert by_reason["malformed_row"]["raw"] == "not,enough"
    assert len(by_reason["line_too_long"]["raw"]) < 1000
    download = tenant.client.get(f"/ingests/{job['ingest_id']}/quarantine.csv")
    assert download.status_code == 200 and download.headers["content-type"].startswith("text/csv")
    assert len(list(csv.reader(io.StringIO(download.text)))) == len(rows) + 1
    wait_until(lambda: not list(storage_dir_of(ingest_stack).glob("*.csv")), 10, "the file to be deleted once ingested")


def storage_dir_of(ingest_stack: IngestStack) -> Path:
    return ingest_stack.stack.data_dir / "iiot"


def test_re_ingesting_the_same_file_answers_the_same_job_and_writes_nothing(
        ingest_stack: IngestStack, tenant: Tenant) -> None:
    content = csv_bytes(["timestamp", "asset", "sensor", "value"], [row[:4] for row in long_rows(20)])
    first = ingest(tenant, content, "a.csv")
    again = upload(tenant, content, "renamed.csv")
    assert again.status_code == 200, again.text
    assert (again.json()["job_id"], again.json()["status"]) == (first["id"], "succeeded")
    assert stored_count(ingest_stack.stack, tenant.fleet.tenant_id) == 40


def test_wide_parquet_and_gzipped_json_lines_are_read_and_late_rows_refused(
        ingest_stack: IngestStack, tenant: Tenant) -> None:
    times = pd.date_range(START, periods=30, freq="1s", tz="UTC")
    wide = pd.DataFrame({"timestamp": times, "asset": "pump-2", "temp": 50.0, "vib": 2.0, "press": 3.0})
    wide.loc[5, "vib"] = None  # no reading, not an error
    wide.loc[6, "press"] = 99.0  # out_of_range
    buffer = io.BytesIO()
    wide.to_parquet(buffer, index=False)
    job = ingest(tenant, buffer.getvalue(), "wide.parquet")
    assert (job["file_format"], job["layout"], job["rows_read"]) == ("parquet", "wide", 30)
    assert (job["rows_kept"], job["rows_quarantined"]) == (88, 1)
    assert [row["reason"] for row in quarantine(tenant, job["ingest_id"])] == ["out_of_range"]
    lines = [f'{{"timestamp": "{(START + timedelta(seconds=second)).isoformat()}", "asset": "pump-2", '
             f'"sensor": "temp", "value": 51.0}}' for second in range(25, 40)]  # 25..29 are stored already
    lines.append('{"timestamp": "2025-03-01T09:00:00Z", "asset": "pump-2", "sensor": "temp"')  # malformed
    job = ingest(tenant, gzip.compress("\n".join(lines).encode()), "late.jsonl.gz")
    assert (job["file_format"], job["rows_read"], job["rows_kept"]) == ("jsonl", 16, 10)
    reasons = [row["reason"] for row in quarantine(tenant, job["ingest_id"])]
    assert sorted(reasons) == ["duplicate"] * 5 + ["malformed_row"]


def gzip_bomb(header: bytes, zeros: int) -> bytes:
    """``header`` then ``zeros`` zero bytes, gzip-compressed (about 1000:1)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(header)]
    block = bytes(1 << 20)
    parts += [compressor.compress(block) for _ in range(zeros >> 20)]
    return b"".join([*parts, compressor.flush()])


def test_a_gzip_bomb_is_refused_with_its_reason(ingest_stack: IngestStack, tenant: Tenant) -> None:
    bomb = gzip_bomb(csv_bytes(["timestamp", "asset", "sensor", "value"], [row[:4] for row in long_rows(5)]),
                     300 << 20)
    assert len(bomb) < 1 << 20
    job = ingest(tenant, bomb, "bomb.csv.gz")
    assert job["status"] == "failed"
    assert "gzip file decompresses to more than" in job["error"]


def test_a_header_that_is_neither_layout_is_refused_before_the_upload_completes(tenant: Tenant) -> None:
    response = upload(tenant, b"time,machine,reading\n1,2,3\n", "x.csv")
    assert response.status_code == 422
    assert "schema" in response.json()["detail"]


def test_another_tenants_job_and_quarantine_answer_404(ingest_stack: IngestStack, tenant: Tenant) -> None:
    job = ingest(tenant, csv_bytes(["timestamp", "asset", "sensor", "value"], [["bad", "pump-1", "temp", "1"]]),
                 "one.csv")
    intruder = new_tenant(ingest_stack)
    with intruder.client:
        assert intruder.client.get(f"/jobs/{job['id']}").status_code == 404
        assert intruder.client.get("/quarantine", params={"ingest": job["ingest_id"]}).status_code == 404
        assert intruder.client.get(f"/ingests/{job['ingest_id']}/quarantine.csv").status_code == 404
        assert intruder.client.get("/quarantine").json()["items"] == []
    assert tenant.client.get("/jobs/no-such-job").status_code == 404


def test_a_gateway_batch_is_validated_like_a_file(tenant: Tenant) -> None:
    batch = {"readings": [{"timestamp": "2025-03-01T08:00:00Z", "asset": "pump-1", "sensor": "temp", "value": 70.0},
                          {"timestamp": "2025-03-01T08:00:01Z", "asset": "pump-1", "sensor": "temp", "value": 900.0}]}
    answer = tenant.client.post("/readings", json=batch)
    assert answer.status_code == 200, answer.text
    assert (answer.json()["kept"], answer.json()["reasons"]) == (1, {"out_of_range": 1})
    assert tenant.client.post("/readings", json=batch).json()["replayed"] is True
    wrong_type = {"readings": [{**batch["readings"][0], "value": "70"}]}
    assert tenant.client.post("/readings", json=wrong_type).status_code == 422


def test_a_worker_killed_mid_file_resumes_and_writes_each_row_once(
        ingest_stack: IngestStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job is submitted here with small chunks so the kill lands between committed chunks; it is
    this module's last test (it replaces the module's worker)."""
    stack = ingest_stack.stack
    apply_stack_in_process(stack, monkeypatch)
    fleet = register_fleet(database_url=stack.database_url)
    seconds = 3000
    content = csv_bytes(["timestamp", "asset", "sensor", "value"], [row[:4] for row in long_rows(seconds)])
    path = storage_dir() / f"resume-{uuid.uuid4().hex}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    with session_factory(stack.database_url)() as session:
        row = Ingest(tenant_id=fleet.tenant_id, source="file", digest=uuid.uuid4().hex, size_bytes=len(content))
        session.add(row)
        session.flush()
        job = submit_job(session, ingest_file_job, key=f"resume-{row.id}", tenant_id=fleet.tenant_id,
                         payload={"ingest_pk": row.id, "path": str(path), "chunk_rows": 100})
        row.job_id, ingest_pk, job_id = job.id, row.id, job.id
        session.commit()
    wait_until(lambda: 0 < rows_done(stack, ingest_pk) < 2 * seconds - 500, 60, "a first chunk to commit",
               interval_s=0.005)
    ingest_stack.worker.kill_group(signal.SIGKILL)  # nothing of the worker survives
    assert rows_done(stack, ingest_pk) < 2 * seconds, "the kill came after the end: the test proves nothing"
    ingest_stack.worker = start_worker(stack, f"second-{uuid.uuid4().hex[:6]}")  # the module's fixture stops it
    wait_until(lambda: job_status(stack, job_id) == "succeeded", 120, "the job to finish on the second worker")
    with session_factory(stack.database_url)() as session:
        ingest_row = session.get(Ingest, ingest_pk)
        assert ingest_row is not None
        assert (ingest_row.rows_read, ingest_row.rows_kept, ingest_row.rows_quarantined) == (2 * seconds,
                                                                                             2 * seconds, 0)
    assert stored_count(stack, fleet.tenant_id) == 2 * seconds, "each row written exactly once"


def rows_done(stack: Stack, ingest_pk: int) -> int:
    with session_factory(stack.database_url)() as session:
        return int(session.scalar(select(Ingest.rows_done).where(Ingest.id == ingest_pk)) or 0)


def job_status(stack: Stack, job_id: str) -> str:
    from shared.jobs import Job

    with session_factory(stack.database_url)() as session:
        job = session.get(Job, job_id)
        return job.status if job else "missing"
