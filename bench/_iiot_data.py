"""Readings files and databases for ``bench/iiot.py`` (simulated data: the numbers are throughput only).

- :func:`write_long_csv`: a long-format CSV (``timestamp, asset, sensor, value, unit``) of a
  synthetic fleet, streamed in chunks of time steps (never the whole file in memory). H4's
  ``services.iiot.simulate.write_readings`` is meant to replace it once it lands; until then this
  generator lets the ingestion ways be timed (every way reads the same file).
- :func:`write_resolved_csv`: the same rows as the readings table stores them
  (``sensor_pk, ts, value, ingest_pk``), for ``psql \\copy`` / ``sqlite3 .import`` (the write limit).
- :class:`BenchDatabases`: a migrated template database with the fleet's registry (PostgreSQL:
  ``CREATE DATABASE ... TEMPLATE``; SQLite: a file copied), a fresh copy per measured point, all
  dropped at the end.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
TENANT = "bench-iiot"
DB_PREFIX = "tessera_bench_iiot"
START = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class SensorKind:
    """One sensor of every synthetic asset: its quantity, canonical unit, typical level and range."""

    sensor_id: str
    quantity: str
    unit: str
    level: float
    noise: float
    low: float
    high: float


SENSOR_KINDS = (
    SensorKind("temp1", "temperature", "degC", 65.0, 2.0, -40.0, 200.0),
    SensorKind("vib1", "vibration", "mm/s", 3.0, 0.5, 0.0, 50.0),
    SensorKind("pres1", "pressure", "bar", 6.0, 0.3, 0.0, 25.0),
    SensorKind("curr1", "current", "A", 40.0, 3.0, 0.0, 200.0),
    SensorKind("speed1", "speed", "rpm", 1480.0, 10.0, 0.0, 4000.0),
)


@dataclass(frozen=True)
class Layout:
    """A synthetic fleet: ``assets`` x :data:`SENSOR_KINDS`, one reading a sensor every ``interval_s``."""

    assets: int = 200
    interval_s: int = 60
    lines: int = 10

    @property
    def sensors(self) -> int:
        return self.assets * len(SENSOR_KINDS)

    def asset_id(self, index: int) -> str:
        return f"A{index:05d}"


def write_long_csv(path: Path, rows: int, layout: Layout, seed: int = 7, chunk_steps: int = 1000) -> int:
    """Write ``rows`` long-format rows (time-ordered, every sensor each step) to ``path``; returns rows."""
    rng = np.random.default_rng(seed)
    kinds = len(SENSOR_KINDS)
    assets = np.repeat([layout.asset_id(i) for i in range(layout.assets)], kinds)
    sensors = np.tile([k.sensor_id for k in SENSOR_KINDS], layout.assets)
    units = np.tile([k.unit for k in SENSOR_KINDS], layout.assets)
    level = np.tile([k.level for k in SENSOR_KINDS], layout.assets)
    noise = np.tile([k.noise for k in SENSOR_KINDS], layout.assets)
    written, step = 0, 0
    with path.open("w", newline="") as sink:
        sink.write("timestamp,asset,sensor,value,unit\n")
        while written < rows:
            steps = min(chunk_steps, -(-(rows - written) // layout.sensors))
            times = pd.date_range(START + timedelta(seconds=step * layout.interval_s), periods=steps,
                                  freq=f"{layout.interval_s}s").strftime("%Y-%m-%dT%H:%M:%SZ")
            values = level[None, :] + noise[None, :] * rng.standard_normal((steps, layout.sensors))
            frame = pd.DataFrame({"timestamp": np.repeat(np.asarray(times), layout.sensors),
                                  "asset": np.tile(assets, steps), "sensor": np.tile(sensors, steps),
                                  "value": values.ravel(), "unit": np.tile(units, steps)})
            frame = frame.iloc[: rows - written]
            frame.to_csv(sink, header=False, index=False, float_format="%.3f")
            written += len(frame)
            step += steps
    return written


def head_csv(source: Path, target: Path, rows: int) -> int:
    """The header and the first ``rows`` data rows of ``source`` into ``target``; returns the rows copied."""
    copied = 0
    with source.open() as reader, target.open("w") as sink:
        sink.write(reader.readline())
        for line in reader:
            if copied >= rows:
                break
            sink.write(line)
            copied += 1
    return copied


def sensor_keys(layout: Layout) -> dict[tuple[str, str], int]:
    """(asset_id, sensor_id) → the ``iiot_sensors.id`` :meth:`BenchDatabases.seed` gives it."""
    keys: dict[tuple[str, str], int] = {}
    for index in range(layout.assets):
        for offset, kind in enumerate(SENSOR_KINDS):
            keys[(layout.asset_id(index), kind.sensor_id)] = index * len(SENSOR_KINDS) + offset + 1
    return keys


def write_resolved_csv(source: Path, target: Path, layout: Layout, ingest_pk: int = 1,
                       chunk_rows: int = 1_000_000) -> int:
    """``source``'s rows as the readings table stores them (``sensor_pk,ts,value,ingest_pk``), header-less."""
    keys = pd.Series(sensor_keys(layout))
    keys.index = keys.index.map(lambda pair: f"{pair[0]}/{pair[1]}")
    written = 0
    with target.open("w") as sink:
        for chunk in pd.read_csv(source, chunksize=chunk_rows, dtype={"asset": str, "sensor": str}):
            pks = (chunk["asset"] + "/" + chunk["sensor"]).map(keys).astype("int64")
            out = pd.DataFrame({"sensor_pk": pks, "ts": chunk["timestamp"], "value": chunk["value"],
                                "ingest_pk": ingest_pk})
            out.to_csv(sink, header=False, index=False)
            written += len(out)
    return written


def pg_admin_url(pg_url: str) -> str:
    """A libpq URL to the server's ``postgres`` database (for CREATE / DROP DATABASE)."""
    return pg_url.replace("postgresql+psycopg://", "postgresql://") + "/postgres"


@dataclass
class BenchDatabases:
    """A migrated, seeded template per backend and a fresh copy of it for each measured point."""

    workdir: Path
    pg_url: str
    layout: Layout
    _copies: list[str] = field(default_factory=list)
    _serial: int = 0

    @property
    def template_name(self) -> str:
        return f"{DB_PREFIX}_tpl_{os.getpid()}"

    def prepare(self, backends: tuple[str, ...]) -> None:
        """Create, migrate and seed the template of each backend (``sqlite``, ``postgres``)."""
        if "postgres" in backends:
            self._pg_execute(f'DROP DATABASE IF EXISTS "{self.template_name}" WITH (FORCE)',
                             f'CREATE DATABASE "{self.template_name}"')
            self._copies.append(self.template_name)
            self._migrate_and_seed(f"{self.pg_url}/{self.template_name}")
        if "sqlite" in backends:
            self._migrate_and_seed(f"sqlite:///{self.workdir / 'template.db'}")

    def fresh(self, backend: str) -> str:
        """A SQLAlchemy URL to a new copy of ``backend``'s template (empty readings, seeded registry)."""
        self._serial += 1
        if backend == "sqlite":
            target = self.workdir / f"point{self._serial}.db"
            shutil.copyfile(self.workdir / "template.db", target)
            return f"sqlite:///{target}"
        name = f"{DB_PREFIX}_{os.getpid()}_{self._serial}"
        self._pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
                         f'CREATE DATABASE "{name}" TEMPLATE "{self.template_name}"')
        self._copies.append(name)
        return f"{self.pg_url}/{name}"

    def discard(self, url: str) -> None:
        """Drop a copy made by :meth:`fresh` (its disk space back before the next point)."""
        if url.startswith("sqlite"):
            path = Path(url.removeprefix("sqlite:///"))
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            return
        name = url.rsplit("/", 1)[1]
        self._pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        with contextlib.suppress(ValueError):
            self._copies.remove(name)

    def close(self) -> None:
        """Drop every PostgreSQL database this object created."""
        for name in list(self._copies):
            with contextlib.suppress(Exception):
                self._pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._copies.clear()

    def _pg_execute(self, *statements: str) -> None:
        import psycopg

        with psycopg.connect(pg_admin_url(self.pg_url), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]  # names are ours, not input

    def _migrate_and_seed(self, url: str) -> None:
        env = {**os.environ, "TESSERA_DATABASE_URL": url, "TESSERA_DATA_DIR": str(self.workdir / "data"),
               "TESSERA_LOG_LEVEL": "WARNING"}
        subprocess.run([sys.executable, "-m", "services.cli", "db", "upgrade"], cwd=REPO, env=env, check=True,
                       capture_output=True)
        seed_registry(url, self.layout)


def seed_registry(url: str, layout: Layout) -> None:
    """The fleet's plant, lines, assets and sensors (ids as :func:`sensor_keys`) for :data:`TENANT`."""
    from sqlalchemy import insert

    from services.iiot.db import Asset, Line, Plant, Sensor
    from shared.db import make_engine

    engine = make_engine(url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as connection:
            connection.execute(insert(Plant), [{"id": 1, "tenant_id": TENANT, "plant_id": "P1", "name": "bench plant",
                                                "timezone": "UTC", "created_at": now}])
            connection.execute(insert(Line), [{"id": i + 1, "tenant_id": TENANT, "plant_pk": 1, "line_id": f"L{i + 1}",
                                               "created_at": now} for i in range(layout.lines)])
            connection.execute(insert(Asset), [{"id": i + 1, "tenant_id": TENANT, "line_pk": i % layout.lines + 1,
                                                "asset_id": layout.asset_id(i), "kind": "pump", "details": {},
                                                "created_at": now} for i in range(layout.assets)])
            keys = sensor_keys(layout)
            kinds = {kind.sensor_id: kind for kind in SENSOR_KINDS}
            connection.execute(insert(Sensor), [
                {"id": pk, "tenant_id": TENANT, "asset_pk": int(asset[1:]) + 1, "sensor_id": sensor,
                 "quantity": kinds[sensor].quantity, "unit": kinds[sensor].unit, "min_value": kinds[sensor].low,
                 "max_value": kinds[sensor].high, "sampling_interval_s": float(layout.interval_s),
                 "reading_count": 0, "created_at": now}
                for (asset, sensor), pk in keys.items()])
        if not url.startswith("sqlite"):
            with engine.begin() as connection:
                for table in ("iiot_plants", "iiot_lines", "iiot_assets", "iiot_sensors"):
                    connection.exec_driver_sql(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
    finally:
        engine.dispose()


def count_readings(url: str) -> int:
    """Rows in the readings table of ``url``."""
    from sqlalchemy import func, select

    from services.iiot.db import readings
    from shared.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(readings)).scalar_one())
    finally:
        engine.dispose()


def csv_rows(path: Path) -> Iterator[list[str]]:
    """Data rows of a CSV file (header skipped)."""
    with path.open(newline="") as source:
        reader = csv.reader(source)
        next(reader)
        yield from reader


def timed(callable_: Any, *args: Any) -> tuple[Any, float]:
    """(result, seconds) of ``callable_(*args)``."""
    started = time.perf_counter()
    result = callable_(*args)
    return result, time.perf_counter() - started
