"""The ways of writing a long-format readings CSV into ``iiot_readings`` that ``bench/iiot.py`` times.

Each way runs in its own process (``bench/iiot.py point ingest ...``), so its peak RSS is its own,
against a fresh copy of a seeded database, and reads the same file:

- ``naive-orm``: ``csv.reader`` row by row, a mapped object per reading, ``session.add`` and a
  commit every 1,000 rows (what a quick script does); sensor ids resolved from an in-memory dict.
- ``to_sql``, ``to_sql-multi``: pandas ``read_csv`` in chunks, ids mapped, timestamps parsed, then
  ``DataFrame.to_sql`` with ``method=None`` (executemany) or ``method="multi"`` (multi-row VALUES).
- ``copy``: ``psql \\copy`` (PostgreSQL) / ``sqlite3 .import`` (SQLite) of the rows already
  resolved to the table's layout: the write limit (no parsing, validation or id lookups in it).
- ``tessera``: the project's ingestion path (H1's ingest job handler, in-process).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from bench._iiot_data import TENANT, count_readings, csv_rows

NAIVE_COMMIT_EVERY = 1_000
TO_SQL_CHUNK_ROWS = 100_000
MULTI_CHUNKSIZE = {"postgresql": 10_000, "sqlite": 5_000}  # bound parameters per statement: 4 a row


def naive_orm(url: str, path: Path, rows: int, keys: dict[str, int]) -> int:
    """Row-by-row ORM inserts of the first ``rows`` rows of ``path``, a commit per 1,000; returns rows."""
    from datetime import datetime

    from sqlalchemy.orm import Session, registry

    from services.iiot.db import readings
    from shared.db import make_engine

    class NaiveReading:
        """A reading as an ORM object (the readings table has no primary key: (sensor_pk, ts) stands in)."""

        def __init__(self, **values: Any) -> None:
            self.__dict__.update(values)

    registry().map_imperatively(NaiveReading, readings, primary_key=[readings.c.sensor_pk, readings.c.ts])
    engine = make_engine(url)
    done = 0
    try:
        with Session(engine) as session:
            for timestamp, asset, sensor, value, _unit in csv_rows(path):
                if done >= rows:
                    break
                session.add(NaiveReading(sensor_pk=keys[f"{asset}/{sensor}"],
                                         ts=datetime.fromisoformat(timestamp), value=float(value), ingest_pk=1))
                done += 1
                if done % NAIVE_COMMIT_EVERY == 0:
                    session.commit()
            session.commit()
    finally:
        engine.dispose()
    return done


def pandas_to_sql(url: str, path: Path, rows: int, keys: dict[str, int], multi: bool) -> int:
    """pandas ``read_csv`` chunks → ``to_sql`` (executemany, or multi-row VALUES); returns rows."""
    import pandas as pd

    from shared.db import make_engine

    lookup = pd.Series(keys)
    engine = make_engine(url)
    method = "multi" if multi else None
    chunksize = MULTI_CHUNKSIZE[engine.dialect.name if engine.dialect.name == "sqlite" else "postgresql"] \
        if multi else None
    done = 0
    try:
        for chunk in pd.read_csv(path, chunksize=TO_SQL_CHUNK_ROWS, nrows=rows, dtype={"asset": str, "sensor": str}):
            frame = pd.DataFrame({"sensor_pk": (chunk["asset"] + "/" + chunk["sensor"]).map(lookup).astype("int64"),
                                  "ts": pd.to_datetime(chunk["timestamp"], utc=True, format="ISO8601"),
                                  "value": chunk["value"].astype("float64"), "ingest_pk": 1})
            frame.to_sql("iiot_readings", engine, if_exists="append", index=False, method=method,
                         chunksize=chunksize)
            done += len(frame)
    finally:
        engine.dispose()
    return done


def copy_limit(url: str, resolved: Path) -> tuple[int, float, dict[str, float | None]]:
    """``psql \\copy`` / ``sqlite3 .import`` of a resolved CSV; returns (rows now stored, seconds, CPU).

    CPU: ``client_cpu_s`` of the tool (its rusage) and, on PostgreSQL, ``server_cpu_s`` of its server
    backend, sampled from ``/proc`` every 20 ms while it runs (the last 20 ms may be missed)."""
    import resource
    import threading
    import uuid

    sampler: _BackendSampler | None = None
    if url.startswith("sqlite"):
        database = url.removeprefix("sqlite:///")
        argv = ["sqlite3", database, ".mode csv", f".import {resolved} iiot_readings"]
    else:
        name = f"bench-copy-{uuid.uuid4().hex[:12]}"
        libpq = url.replace("postgresql+psycopg://", "postgresql://") + f"?application_name={name}"
        argv = ["psql", libpq, "-v", "ON_ERROR_STOP=1", "-c",
                f"\\copy iiot_readings (sensor_pk, ts, value, ingest_pk) FROM '{resolved}' WITH (FORMAT csv)"]
        sampler = _BackendSampler(url, name)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    watcher = threading.Thread(target=sampler.run, daemon=True) if sampler else None
    if watcher:
        watcher.start()
    try:
        subprocess.run(argv, check=True, capture_output=True)
    finally:
        seconds = time.perf_counter() - started
        if sampler and watcher:
            sampler.done.set()
            watcher.join(timeout=5)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {"client_cpu_s": after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime,
           "server_cpu_s": sampler.cpu_s if sampler else None}
    return count_readings(url), seconds, cpu


class _BackendSampler:
    """The CPU used by the server backend of the session named ``application_name``, sampled."""

    def __init__(self, url: str, application_name: str) -> None:
        import threading

        self.url, self.name, self.done = url, application_name, threading.Event()
        self.pid: int | None = None
        self.cpu_s: float | None = None
        """The backend's CPU at the last sample (a backend starts at 0: what the session used)."""

    def run(self) -> None:
        import psycopg

        with psycopg.connect(self.url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
            while self.pid is None and not self.done.is_set():
                row = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                                   (self.name,)).fetchone()
                if row is None:
                    time.sleep(0.005)
                    continue
                self.pid = int(row[0])
        while self.pid is not None:
            used = _process_cpu_s(self.pid)
            if used is None:
                break
            self.cpu_s = used
            if self.done.is_set():
                break
            time.sleep(0.02)


def tessera_missing() -> str | None:
    """Why the project's ingestion path cannot be measured yet (None when it can)."""
    try:
        from services.iiot import ingest
    except ImportError as error:
        return f"services.iiot.ingest does not import: {error}"
    if not hasattr(ingest, "run_file_ingest"):
        return "H1's ingestion job (services.iiot.ingest.run_file_ingest) has not landed"
    return None


def tessera_ingest(path: Path) -> dict[str, Any]:
    """The ``iiot.ingest_file`` job's handler on ``path``, in this process, as a worker runs it.

    The database is the configured one (``TESSERA_DATABASE_URL``, set by the caller). The
    ingestion and its job rows are made as ``POST /ingest`` makes them (the upload itself, its
    streaming to disk and sha256, is not timed); the file is hard-linked, as the job deletes its
    file when done. Returns the job's summary (rows read, kept, quarantined, gaps) and, on PostgreSQL,
    ``server_cpu_s``: the CPU its server backend used (``/proc``; the server runs on this box).
    """
    import os
    import uuid

    from services.iiot.db import Ingest
    from services.iiot.ingest import run_file_ingest
    from shared.db import session_scope, utcnow
    from shared.jobs import RUNNING, Job

    linked = path.with_name(f"upload-{uuid.uuid4().hex}{path.suffix}")
    os.link(path, linked)
    digest = uuid.uuid4().hex + uuid.uuid4().hex
    with session_scope() as session:
        ingest = Ingest(tenant_id=TENANT, source="file", digest=digest, filename=path.name,
                        size_bytes=path.stat().st_size)
        session.add(ingest)
        session.flush()
        job = Job(idempotency_key=f"iiot-ingest:{TENANT}:{digest}", task_name="iiot.ingest_file", queue="iiot",
                  tenant_id=TENANT, payload={"ingest_pk": ingest.id, "path": str(linked)}, status=RUNNING,
                  attempts=1, lease_until=utcnow())
        session.add(job)
        session.flush()
        job_id = job.id
    with session_scope() as session:
        stored = session.get(Job, job_id)
        assert stored is not None
        backend = _backend_pid(session)
        server_before = _process_cpu_s(backend)
        summary = run_file_ingest(session, stored)
        server_after = _process_cpu_s(backend)
        if server_before is not None and server_after is not None:
            summary["server_cpu_s"] = server_after - server_before
        return summary


def _backend_pid(session: Any) -> int | None:
    """The PostgreSQL backend process serving ``session`` (None on SQLite)."""
    from sqlalchemy import text

    if session.get_bind().dialect.name != "postgresql":
        return None
    return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (None when it cannot be read)."""
    import os

    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def accept_readings_missing() -> str | None:
    """Why H1's batch validation path (``ingest.accept_readings``) cannot be used yet (None when it can)."""
    try:
        from services.iiot import ingest
    except ImportError as error:
        return f"services.iiot.ingest does not import: {error}"
    if not hasattr(ingest, "accept_readings"):
        return "H1's validation path (services.iiot.ingest.accept_readings) has not landed"
    return None
